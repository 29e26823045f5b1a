"""The training recipe's defaults, written once: the trainer's command line, the launcher's
`gpu-run train` options and its TrainSpec all read them. Torch-free, so the launcher imports it
without paying for torch."""

MODEL = "resnet18"
EPOCHS = 20
BATCH_SIZE = 32
LR = 1e-3
STEP_SIZE = 5  # epochs between learning-rate decays
GAMMA = 0.5  # the decay factor
IMAGE_SIZE = 224
AUGMENT = "standard"  # standard | light | none
WORKERS = -1  # -1: picked from the host's cores
SEED = 0
AMP = "auto"  # auto | off
DECODE = "auto"  # auto | cpu | gpu: where JPEGs are decoded (auto: gpu on CUDA when measured faster)

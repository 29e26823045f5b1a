"""The shipped figures `gpu-run plan` starts from, each with where it came from.

Three tables, no I/O:

- GPUS: ResNet-50 training throughput (images/s, 224 px, mixed precision, one GPU) per GPU model,
  from published benchmarks. A user's own past run on a host replaces these (see estimate.py).
- MODEL_SPEED: how fast each model trains relative to ResNet-50 on the same GPU, from one
  published benchmark that ran them all the same way. FLOPs alone would mislead here: EfficientNet-B0
  has a tenth of ResNet-50's FLOPs and trains about as fast (depthwise convolutions are bound by
  memory, not arithmetic), which NVIDIA's and timm's figures both show.
- GFLOPS: forward GFLOPs per image at 224 px, for scaling to other image sizes, to models missing
  from MODEL_SPEED, and for CPU hosts (whose speed follows FLOPs more closely).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REFERENCE_MODEL = "resnet50"
REFERENCE_SIZE = 224

# Where the GPU figures come from. Lambda's harness runs NVIDIA's DeepLearningExamples ResNet-50 in
# an NGC PyTorch container with AMP and large batches (448 to 1280); gpu-run's recipe trains
# torchvision's ResNet at batch 32, which is slower on the biggest GPUs (see STEP_FLOOR_S).
_LAMBDA = "github.com/lambdal/deeplearning-benchmark"
LAMBDA_2024 = f"Lambda, {_LAMBDA} pytorch/pytorch-train-throughput-fp16.csv, resnet50, 1 GPU (commit 4e11f689, 2024-07)"
LAMBDA_2025 = (
    f"Lambda, {_LAMBDA} pytorch/csv_v1_v2/pytorch-train-throughput-fp16.csv, resnet50, 1 GPU (commit aa5addb6, 2025-12)"
)
LAMBDA_2022_11 = (
    f"Lambda, {_LAMBDA} pytorch/pytorch-train-throughput-fp16.csv, resnet50, 1 GPU (commit 8be85ce5, 2022-11)"
)
LAMBDA_2022_07 = (
    f"Lambda, {_LAMBDA} pytorch/pytorch-train-throughput-fp16.csv, resnet50, 1 GPU (commit a5681044, "
    f"2022-07: older software, whose RTX 3090 figure is 801 against 905 in 2024)"
)
NVIDIA_QUOTED = (
    "NVIDIA's published ResNet-50 training figure (Data Center Deep Learning Product Performance), "
    "as quoted in gpu-run's plan issue; not re-checked against NVIDIA's page"
)
NVIDIA_DLE = (
    "NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5/README.md "
    "(pytorch-21.03 NGC container, AMP, batch 256, DALI)"
)
T4_DERIVED = (
    f"derived, no published T4 training figure found: T4 AMP inference 1198 img/s x the V100's "
    f"training/inference ratio 1200/3382, both from {NVIDIA_DLE}"
)


@dataclass(frozen=True)
class GpuFigure:
    name: str  # as shown in the table
    tokens: frozenset  # every one must be in the normalised GPU name for this row to match
    resnet50_images_per_s: float
    source: str  # the full reference
    cite: str  # the short one, for the table's notes


_CITES = {
    LAMBDA_2024: "Lambda 2024-07",
    LAMBDA_2025: "Lambda 2025-12",
    LAMBDA_2022_11: "Lambda 2022-11",
    LAMBDA_2022_07: "Lambda 2022-07",
    NVIDIA_QUOTED: "NVIDIA, as quoted in the plan issue",
    T4_DERIVED: "derived from NVIDIA's T4 inference and V100 figures",
}


def _gpu(name: str, tokens: str, images_per_s: float, source: str) -> GpuFigure:
    cite = next((c for ref, c in _CITES.items() if ref in source), source)
    if source.startswith("taken as"):
        cite = f"the A10's figure, {cite}"
    return GpuFigure(name, frozenset(tokens.split()), images_per_s, source, cite)


# Most specific first: the first row whose tokens are all in the name wins ("A100 PCIe" before "A100").
GPUS: tuple[GpuFigure, ...] = (
    _gpu("H200", "h200", 3079, NVIDIA_QUOTED),
    _gpu("GH200", "gh200", 2844, LAMBDA_2025),
    _gpu("B200", "b200", 3076, LAMBDA_2025),
    _gpu("H100 PCIe", "h100 pcie", 1866, f"{LAMBDA_2024}, H100 80GB PCIe Gen5"),
    _gpu("H100 SXM", "h100", 2616, f"{LAMBDA_2024}, H100 80GB SXM5 (NVIDIA's own figure: 2,683)"),
    _gpu("A100 40GB PCIe", "a100 pcie 40gb", 1396, f"{LAMBDA_2024}, LambdaCloud A100 40GB PCIe"),
    _gpu("A100 80GB PCIe", "a100 pcie", 1527, f"{LAMBDA_2024}, A100 80GB PCIe"),
    _gpu("A100 40GB SXM4", "a100 40gb", 1455, f"{LAMBDA_2022_11}, A100 40GB SXM4"),
    _gpu(
        "A100 80GB SXM4",
        "a100",
        1582,
        f"{LAMBDA_2024}, A100 80GB SXM4 (NVIDIA DeepLearningExamples: 2,470 with DALI at batch 256)",
    ),
    _gpu(
        "A10G",
        "a10g",
        638,
        f"taken as the A10's figure (AWS g5's A10G is the same GA102 chip): {LAMBDA_2024}, LambdaCloud A10",
    ),
    _gpu("A10", "a10", 638, f"{LAMBDA_2024}, LambdaCloud A10"),
    _gpu("A40", "a40", 653, f"{LAMBDA_2022_07}, RTX A40"),
    _gpu(
        "V100", "v100", 833, f"{LAMBDA_2024}, LambdaCloud V100 16GB (NVIDIA DeepLearningExamples: 1,200 at batch 256)"
    ),
    _gpu("T4", "t4", 425, T4_DERIVED),
    _gpu("RTX 6000 Ada", "6000 ada", 1146, f"{LAMBDA_2024}, RTX 6000 Ada"),
    _gpu("RTX A6000", "a6000", 916, f"{LAMBDA_2024}, RTX A6000"),
    _gpu("RTX A5500", "a5500", 735, f"{LAMBDA_2022_07}, RTX A5500"),
    _gpu("RTX A5000", "a5000", 703, f"{LAMBDA_2022_07}, RTX A5000"),
    _gpu("RTX A4500", "a4500", 607, f"{LAMBDA_2022_07}, RTX A4500"),
    _gpu("RTX A4000", "a4000", 452, f"{LAMBDA_2022_07}, RTX A4000"),
    _gpu("Quadro RTX 8000", "rtx 8000", 651, f"{LAMBDA_2024}, Quadro RTX 8000"),
    _gpu("Quadro RTX 6000", "rtx 6000", 645, f"{LAMBDA_2022_07}, Quadro RTX 6000"),
    _gpu("Titan RTX", "titan rtx", 644, f"{LAMBDA_2022_07}, Titan RTX"),
    _gpu("RTX 4090", "4090", 1301, f"{LAMBDA_2024}, RTX 4090"),
    _gpu("RTX 3090", "3090", 905, f"{LAMBDA_2024}, RTX 3090"),
    _gpu("RTX 3080", "3080", 650, f"{LAMBDA_2022_07}, RTX 3080"),
    _gpu("RTX 3070", "3070", 419, f"{LAMBDA_2022_07}, RTX 3070"),
    _gpu("RTX 2080 Ti", "2080 ti", 526, f"{LAMBDA_2022_07}, RTX 2080Ti"),
)

_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


def gpu_tokens(name: str) -> frozenset:
    """'NVIDIA A100-SXM4-80GB' -> {a100, sxm4, 80gb}; 'RTX 2080Ti' -> {rtx, 2080, ti}."""
    text = re.sub(r"(\d)(ti)\b", r"\1 \2", name.lower())  # 2080Ti -> 2080 ti
    return frozenset(t for t in re.split(r"[^a-z0-9]+", text) if t and t not in _VENDOR_WORDS)


def find_gpu(name: str) -> GpuFigure | None:
    """The table row for a GPU as a user, nvidia-smi or torch names it; None when it has none."""
    tokens = gpu_tokens(name)
    # "Quadro RTX 6000" keeps its "rtx 6000" tokens; an "RTX 6000 Ada" matched the row above it.
    for row in GPUS:
        if row.tokens <= tokens:
            return row
    return None


# Training images/s at 224 px of each model on one RTX 3090, AMP, channels-last, as timm measured
# them all with one harness: huggingface/pytorch-image-models results/benchmark-train-amp-nhwc-
# pt112-cu113-rtx3090.csv (timm's implementations of the same architectures, under torchvision's
# names here). Only ratios to ResNet-50 are used: the GPU table says how fast the GPU is.
TIMM_CITE = "timm's RTX 3090 benchmark"
TIMM_SOURCE = (
    "timm, huggingface/pytorch-image-models results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv "
    "(train_samples_per_sec, RTX 3090, AMP, channels-last)"
)
MODEL_SPEED_3090: dict[str, float] = {
    "resnet18": 3481.78,
    "resnet34": 2036.51,
    "resnet50": 1218.01,
    "resnet101": 747.89,
    "mobilenet_v3_small": 8035.08,  # timm mobilenetv3_small_100
    "mobilenet_v3_large": 2732.43,  # timm mobilenetv3_large_100
    "mobilenet_v2": 2313.10,  # timm mobilenetv2_100
    "efficientnet_b0": 1751.72,
    "densenet121": 913.65,
    "convnext_tiny": 819.24,
    "swin_t": 648.69,  # timm swin_tiny_patch4_window7_224
    "vgg16": 546.06,
    "vgg16_bn": 470.30,
    "vit_b_16": 392.99,  # timm vit_base_patch16_224
}

# Forward GFLOPs per image at 224 px: torchvision 0.29's weights metadata (`_ops`, counted by
# torchvision at the weights' crop size; efficientnet_b1 (240 px), efficientnet_v2_s (384 px) and
# inception_v3 (299 px) converted to 224 px by the pixel count). Other models are read from
# torchvision when it is there (gather.py).
GFLOPS_CITE = "torchvision's FLOP counts"
GFLOPS_SOURCE = "torchvision 0.29 weights metadata (_ops: forward GFLOPs per image), at 224 px"
GFLOPS_224: dict[str, float] = {
    "resnet18": 1.814,
    "resnet34": 3.664,
    "resnet50": 4.089,
    "resnet101": 7.801,
    "resnet152": 11.514,
    "resnext50_32x4d": 4.23,
    "wide_resnet50_2": 11.398,
    "mobilenet_v3_small": 0.057,
    "mobilenet_v3_large": 0.217,
    "mobilenet_v2": 0.301,
    "efficientnet_b0": 0.386,
    "efficientnet_b1": 0.598,
    "efficientnet_v2_s": 2.847,
    "densenet121": 2.834,
    "convnext_tiny": 4.456,
    "swin_t": 4.491,
    "regnet_y_1_6gf": 1.612,
    "vgg16": 15.47,
    "vgg16_bn": 15.47,
    "vit_b_16": 17.564,
    "vit_b_32": 4.409,
    "squeezenet1_1": 0.349,
    "shufflenet_v2_x1_0": 0.145,
    "mnasnet1_0": 0.314,
    "googlenet": 1.498,
    "alexnet": 0.714,
    "inception_v3": 3.206,
}


# AWS GPU instance families: the GPU each carries (one per instance for the sizes gpu-run trains
# on) and its vCPUs (an xlarge has 4, an Nxlarge 4 x N, in every family below).
AWS_FAMILY_GPU = {
    "g4dn": "T4",
    "g5": "A10G",
    "g6": "L4",
    "g6e": "L40S",
    "p3": "V100",
    "p4d": "A100 40GB SXM4",
    "p4de": "A100 80GB SXM4",
    "p5": "H100 SXM",
}
AWS_SOURCE = "AWS instance type"


def aws_instance_facts(instance_type: str) -> tuple[str | None, int | None]:
    """(GPU, vCPUs) of an EC2 instance type such as g4dn.xlarge; None for what is not known."""
    family, _, size = (instance_type or "").partition(".")
    m = re.fullmatch(r"(\d*)xlarge", size)
    vcpus = 4 * int(m.group(1) or 1) if m else None
    return AWS_FAMILY_GPU.get(family), vcpus

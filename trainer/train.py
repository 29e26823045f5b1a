"""Fine-tune a torchvision classifier on an ImageFolder dataset.

This is the program gpu-run runs inside the training container (or as a plain process on the
`local` host when no Docker engine is there). It has the shape of torchvision's
references/classification/train.py: `train_one_epoch`, `evaluate`, and a short epoch loop in
`main`. Read it top to bottom:

  1. arguments           every knob, with a help string; the recipe's defaults from defaults.py
  2. events              one JSON object per line on stdout: the launcher's only input
  3. data                ImageFolder (rules in imagefolder.py) that skips corrupt images;
                         the augmentation recipe (standard | light | none, flip or not);
                         JPEGs decoded at reduced scale on the CPU, or on the GPU (nvjpeg)
  4. model               any torchvision classifier, new head, weights none|PATH (never downloaded)
  5. checkpoints         written to a temp file then renamed, so a kill never leaves half a file
  6. training            one step (mixed precision; CUDA out-of-memory halves the micro-batch,
                         agreed by all processes under DDP), then one epoch of them
  7. evaluation          accuracy, loss and per-sample predictions
  8. main                the epoch loop, SIGTERM handling, resume (on any number of processes)

Augmentation randomness is a pure function of (seed, epoch, sample index) and the sample order
of (seed, epoch), so a run stopped mid-epoch and resumed from last.pth ends in the same state as
one that was never stopped. Resumed on another number of processes, it trains the rest of the
stopped epoch's samples, each once. The same trainer runs on torch 2.6 (Debian's, in the offline
base image) and on current releases.
"""

import argparse
import contextlib
import csv
import datetime
import errno
import inspect
import io
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from . import defaults
from .imagefolder import class_folders, image_files, open_image

EXIT_STOPPED = 75  # stopped on request with a resumable last.pth (EX_TEMPFAIL)
EXIT_ERROR = 1
DIST_TIMEOUT_S = 600  # how long a collective waits for the other ranks (GPU_RUN_DIST_TIMEOUT_S)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_RECIPES = ("standard", "light", "none")


# ----------------------------------------------------------------------------------------------
# 1. arguments


def number(kind: type, low: float, low_inclusive: bool = True):
    """An argparse type: a finite `kind` above `low`. argparse's float takes nan and inf, and a
    zero --step-size only fails (ZeroDivisionError) after the first epoch has been paid for."""
    bound = ("a whole number" if kind is int else "a finite number") + (f" >= {low}" if low_inclusive else f" > {low}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not (value >= low if low_inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return parse


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="gpu-run trainer: fine-tune an image classifier")
    p.add_argument("--data", required=True, help="dataset root holding train/<class>/ and val/<class>/")
    p.add_argument("--out", required=True, help="output folder: checkpoints/, metrics.jsonl, predictions.csv")
    p.add_argument("--model", default=defaults.MODEL, help="torchvision classification model name")
    p.add_argument(
        "--weights",
        default="none",
        help="none, or a path to a state_dict (torchvision's ImageNet file) / checkpoint; nothing is downloaded",
    )
    p.add_argument("--epochs", type=number(int, 1), default=defaults.EPOCHS, help="number of epochs to train in total")
    p.add_argument(
        "--batch-size", type=number(int, 1), default=defaults.BATCH_SIZE, help="images per optimizer step (per process)"
    )
    p.add_argument(
        "--lr", type=number(float, 0, low_inclusive=False), default=defaults.LR, help="initial learning rate of SGD"
    )
    p.add_argument("--momentum", type=number(float, 0), default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=number(float, 0), default=1e-4, help="SGD weight decay")
    p.add_argument(
        "--step-size",
        type=number(int, 1),
        default=defaults.STEP_SIZE,
        help="multiply the lr by --gamma every this many epochs",
    )
    p.add_argument(
        "--gamma",
        type=number(float, 0, low_inclusive=False),
        default=defaults.GAMMA,
        help="lr decay factor applied every --step-size epochs",
    )
    p.add_argument(
        "--image-size",
        type=number(int, 1),
        default=defaults.IMAGE_SIZE,
        help="training crop size (eval: resize to 256/224 of it, centre crop)",
    )
    # Both default to None so that --resume can tell "not given" (keep the checkpoint's) from a choice.
    p.add_argument(
        "--augment",
        choices=AUGMENT_RECIPES,
        default=None,
        help="training augmentation: standard (random crop, flip, colour jitter), light (milder crop, "
        "flip; for a short fine-tune on a small dataset) or none (the eval transform); "
        f"default {defaults.AUGMENT}, or the resumed checkpoint's",
    )
    p.add_argument(
        "--no-flip",
        action="store_true",
        default=None,
        help="no random horizontal flip, for data whose orientation has a meaning (digits, text, "
        "X-rays with laterality); default: flip, or the resumed checkpoint's choice",
    )
    p.add_argument(
        "--workers",
        type=number(int, -1),
        default=defaults.WORKERS,
        help="data loading processes; -1 picks from the host's cores",
    )
    p.add_argument(
        "--decode",
        choices=["auto", "cpu", "gpu"],
        default=defaults.DECODE,
        help="where images are decoded: cpu (in the loader workers, big JPEGs at reduced scale), gpu "
        "(nvjpeg on the CUDA device, the workers only read files; falls back to cpu without one), "
        "or auto: gpu when a start-up measurement says it feeds images faster than the CPU workers",
    )
    p.add_argument(
        "--seed", type=int, default=defaults.SEED, help="seed for weights init, sample order and augmentation"
    )
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pth if it exists")
    p.add_argument(
        "--amp",
        default=defaults.AMP,
        choices=["auto", "off"],
        help="mixed precision on GPU (bf16 if supported, else fp16)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU only; slow first epoch)")
    p.add_argument(
        "--log-every", type=number(int, 1), default=10, help="emit a step event every this many steps (and every 2 s)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


# ----------------------------------------------------------------------------------------------
# 2. events: the launcher reads stdout line by line; anything that is not a JSON event is a log line


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def emit(event: str, **fields) -> None:
    if is_main_process():
        print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), flush=True)


def log(message: str) -> None:
    """A line for people reading the log, on stderr: stdout carries the events, and what an event
    says the launcher shows itself."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


class TrainerError(Exception):
    """A problem the user can fix; reported as one `error` event and exit code 1."""


# ----------------------------------------------------------------------------------------------
# 3. data


def load_image(path) -> Image.Image:
    """The image as RGB, upright (EXIF orientation applied), at full size: what predict shows."""
    return open_image(path)


def list_samples(split_dir: Path, classes: list) -> list:
    """(path, class index) pairs, by the ImageFolder rules the launcher checked the dataset with."""
    return [(str(path), target) for target, name in enumerate(classes) for path in image_files(split_dir / name)]


class SafeImageFolder(Dataset):
    """ImageFolder whose unreadable images come back as ("skip", path) instead of killing a worker.

    Indices are (sample index, epoch) pairs in training so that each sample's augmentation can be
    seeded from (seed, epoch, index): the same crops whether or not the run was resumed, and
    whatever the number of workers. A JPEG is decoded at a reduced scale when the transform
    needs no more than that (min_short_side, see decode_short_side). With decode "gpu" the
    workers only read files, and `batches` decodes and transforms them on the GPU.
    """

    def __init__(self, root: Path, classes: list, transform, seed: int = 0, min_short_side: int | None = None):
        self.root = root
        self.classes = classes
        self.samples = list_samples(root, classes)
        self.transform = transform
        self.seed = seed
        self.min_short_side = min_short_side
        self.decode = "cpu"  # or "gpu", set by load_data
        self.gpu_transform = on_tensors(transform) if isinstance(transform, transforms.Compose) else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[index]
        seed = None if epoch is None else (self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63)
        try:
            if self.decode == "gpu":
                return (read_for_gpu(path), seed, path), target, index
            image = open_image(path, self.min_short_side)
        except Exception:  # PIL raises many types for broken files; all mean "skip this one"
            return ("skip", path)
        if seed is not None:
            torch.manual_seed(seed)
        return self.transform(image), target, index


def collate_skipping(batch):
    """Collate the good samples; carry the paths of the unreadable ones alongside. Images still
    to decode on the GPU (of many sizes) stay a list."""
    good = [b for b in batch if not isinstance(b[0], str)]
    skipped = [b[1] for b in batch if isinstance(b[0], str)]
    if not good:
        return None, None, None, skipped
    images = [b[0] for b in good]
    targets, indices = default_collate([b[1:] for b in good])
    if isinstance(images[0], torch.Tensor):
        images = default_collate(images)
    return images, targets, indices, skipped


class EpochSampler(Sampler):
    """The sample order of one epoch, a function of (seed, epoch); sharded across processes.

    Rank r of W takes positions r, r + W, r + 2W, ... of the order, so after s steps of batch_size
    B the W ranks have trained, together, exactly the first s * B * W positions. That one number,
    `start`, says where a stopped epoch stands whatever W was: a resume on another number of
    processes shards the rest of the order across its own ranks, without loading what came before.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)  # a whole epoch's share

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Train `epoch` from position `start` of its order: the samples trained before a resume."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        rest = order[self.start :]
        # Pad with the epoch's first samples so every rank gets as many: a rank that ran out early
        # would leave the others waiting in DDP's all-reduce. (At the world size the epoch started
        # with, this is the same padding, at the same positions, as an epoch that never stopped.)
        rest += order[: len(self) * self.world - len(rest)]
        for index in rest[self.rank :: self.world]:
            yield (index, self.epoch)

    def __len__(self) -> int:
        return math.ceil(max(0, self.n - self.start) / self.world)


def build_transforms(image_size: int, augment: str = "standard", flip: bool = True):
    """(train, eval) transforms. The eval transform is the same for every recipe: torchvision's
    Resize(256)/CenterCrop(224), scaled to image_size, with ImageNet normalisation."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    resize = int(round(image_size * 256 / 224))
    evaluation = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    if augment == "none":
        # No augmentation at all: training sees exactly what evaluation sees, which is the plain
        # tutorial loop (and a baseline to measure augmentation against).
        return evaluation, evaluation
    if augment == "standard":
        # The seed recipe: crops down to 8% of the image teach a model trained for many epochs
        # to find the object anywhere, at any scale.
        steps = [transforms.RandomResizedCrop(image_size)]
    elif augment == "light":
        # A few epochs on a few hundred images, from pretrained weights: crops of 60-100% keep the
        # object in view (an 8% crop is often background alone), and without colour jitter, as in
        # torchvision's own recipe for its ImageNet ResNets: a short run has more to lose from
        # colours it never sees at test time than it gains in robustness.
        steps = [transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0))]
    else:
        raise TrainerError(f"unknown --augment {augment!r}; choose one of: {', '.join(AUGMENT_RECIPES)}")
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    if augment == "standard":
        steps.append(transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    train = transforms.Compose([*steps, transforms.ToTensor(), normalize])
    return train, evaluation


def decode_short_side(transform) -> int | None:
    """The smallest short side an image can be decoded at and give `transform` all it uses.

    Eval resizes the short side to image_size * 256/224 before its centre crop: decoding at that
    short side or more loses nothing the resize keeps.

    Training's RandomResizedCrop(size, scale=(s, 1), ratio=(3/4, 4/3)) cuts a crop of at least a
    fraction s of the image's area, with an aspect ratio r in that range, and resizes it to
    size x size. The crop's shorter side is sqrt(area * min(r, 1/r)) >= short_side * sqrt(s * 3/4),
    so decoding at a short side of size / sqrt(s * 3/4) or more gives even the smallest crop at
    least `size` pixels a side: no crop is ever enlarged from a reduced decode where the full
    image had the pixels. At 224 px: 915 for the standard recipe (s = 0.08), 334 for light
    (s = 0.6), 256 for eval. A 4032 x 3024 phone photo then decodes at 1/2 scale for standard
    training and 1/8 for light training and eval (both 504 x 378).
    """
    for step in transform.transforms:
        if isinstance(step, transforms.RandomResizedCrop):
            narrowest = min(step.ratio[0], 1 / step.ratio[1])
            return math.ceil(max(step.size) / math.sqrt(step.scale[0] * narrowest))
        if isinstance(step, transforms.Resize):
            return step.size if isinstance(step.size, int) else max(step.size)
    return None


def resolve_recipe(args, last_path: Path) -> None:
    """Fill in --augment and --no-flip when not given: from last.pth when resuming (a resumed
    run must augment as it did before it stopped), else the standard recipe with flip. The resolved values
    are what the checkpoint's args record."""
    saved = {}
    if args.resume and last_path.exists() and (args.augment is None or args.no_flip is None):
        saved = torch.load(last_path, map_location="cpu", weights_only=True).get("args", {})
    if args.augment is None:
        args.augment = saved.get("augment") or defaults.AUGMENT
    if args.no_flip is None:
        args.no_flip = bool(saved.get("no_flip", False))


def pick_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


# GPU decoding. A 12 MP photo costs a CPU core tens of milliseconds even at reduced scale, so a
# host with a few cores can starve its GPU. There the workers only read each file's bytes, and the
# GPU decodes the batch with nvjpeg and runs the same transform on it. What nvjpeg cannot take
# (PNG and other formats, CMYK JPEGs, a batch it fails on) is decoded on the CPU, as before.

EXIF_ORIENTATION = 0x0112
# PIL's exif_transpose for a CHW tensor: orientation -> (swap height and width?, then flip these dims).
ORIENTATIONS = {
    2: (False, (-1,)),
    3: (False, (-2, -1)),
    4: (False, (-2,)),
    5: (True, ()),
    6: (True, (-1,)),
    7: (True, (-2, -1)),
    8: (True, (-2,)),
}


class JpegBytes(NamedTuple):
    """A JPEG file's bytes (uint8, 1-D) for the GPU to decode, and its EXIF orientation, which
    nvjpeg does not apply."""

    data: torch.Tensor
    orientation: int


def read_for_gpu(path) -> "JpegBytes | torch.Tensor":
    """An RGB or grayscale JPEG as JpegBytes; any other image decoded here, upright, uint8 CHW."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            return JpegBytes(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), im.getexif().get(EXIF_ORIENTATION, 1)
            )
    return pil_to_tensor(open_image(io.BytesIO(data)))


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    swap, flips = ORIENTATIONS.get(orientation, (False, ()))
    image = image.transpose(-2, -1) if swap else image
    return image.flip(flips) if flips else image


def on_tensors(transform):
    """The same transform for a uint8 CHW tensor, on the GPU: torchvision's resize, crops, flip,
    colour jitter and normalisation all take tensors; ToTensor (PIL to float) becomes a dtype change."""
    return transforms.Compose(
        [
            transforms.ConvertImageDtype(torch.float32) if isinstance(t, transforms.ToTensor) else t
            for t in transform.transforms
        ]
    )


def nvjpeg(jpegs: list, device: torch.device) -> list:
    # Imported here: torchvision deprecates its decoders (for TorchCodec), and a release without
    # them must still train, on the CPU path.
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        # decode_jpeg allocates its outputs on this stream but writes them from a stream of its own
        # (and nvjpeg's hardware engine ignores stream order altogether), so the caching allocator
        # can hand it memory that the step's queued kernels are still reading. Only a host wait for
        # this stream orders the decode after them (pytorch/vision#9606).
        torch.cuda.current_stream(device).synchronize()
    # One call for the batch: nvjpeg decodes a list much faster than one image at a time.
    return decode_jpeg([j.data for j in jpegs], mode=ImageReadMode.RGB, device=device)


def decode_on(device: torch.device, items: list) -> list:
    """The images as uint8 CHW tensors on `device`, upright; None for one that cannot be decoded.

    A CUDA out-of-memory is raised, never taken for a file nvjpeg or PIL cannot read: the training
    step halves its micro-batch for it (train_step), and the images are good."""
    jpegs = [i for i, item in enumerate(items) if isinstance(item, JpegBytes)]
    try:
        decoded = dict(zip(jpegs, nvjpeg([items[i] for i in jpegs], device))) if jpegs else {}
    except torch.cuda.OutOfMemoryError:  # a RuntimeError too: caught first
        raise
    except (RuntimeError, ImportError):  # one file nvjpeg cannot take fails the whole call: the CPU decodes them
        decoded = {}
    images: list[torch.Tensor | None] = []
    for i, item in enumerate(items):
        if i in decoded:
            images.append(upright(decoded[i], item.orientation))
        elif isinstance(item, JpegBytes):
            images.append(decode_with_pil(item, device))
        else:  # decoded by a worker already
            images.append(item.to(device, non_blocking=True))
    return images


def decode_with_pil(item: JpegBytes, device: torch.device) -> torch.Tensor | None:
    """A JPEG nvjpeg could not take, decoded on the CPU and copied to `device`; None if PIL cannot
    read it either."""
    try:
        # An ndarray is a buffer; numpy's stubs say so for Python 3.12 and later only.
        image = pil_to_tensor(open_image(io.BytesIO(item.data.numpy())))  # type: ignore[arg-type]
    except Exception:  # unreadable by PIL too: skipped, as on the CPU path
        return None
    return image.to(device)  # outside the try: an out-of-memory here is the step's to handle


DECODE_CHUNK_IMAGES = 32  # images decoded at once on the GPU: 32 decoded 12 MP photos take 1.1 GB until cropped


def gpu_batch(batch, transform, device: torch.device, chunk: int = DECODE_CHUNK_IMAGES):
    """A batch whose workers only read files, decoded and transformed on `device`."""
    items, targets, indices, skipped = batch
    if items is None:
        return batch
    out, good, skipped = [], [], list(skipped)
    # A chunk at a time, so that only one chunk of full-size decoded images is held at once.
    for first in range(0, len(items), chunk):
        decoded = decode_on(device, [image for image, _seed, _path in items[first : first + chunk]])
        for i, image in enumerate(decoded, start=first):
            _, seed, path = items[i]
            if image is None:
                skipped.append(path)
                continue
            if seed is not None:  # the transform draws its randomness on the CPU: seeded as on the CPU path
                torch.default_generator.manual_seed(seed)
            out.append(transform(image))
            good.append(i)
    if not good:
        return None, None, None, skipped
    keep = torch.tensor(good)
    return torch.stack(out), targets[keep], indices[keep], skipped


class DecodeChoice(NamedTuple):
    path: str  # cpu | gpu
    note: str  # why, in a few words


def measure_decode(dataset: SafeImageFolder, device: torch.device, workers: int, n: int = 16):
    """(CPU, GPU) images/s that each path feeds, on n training images: the CPU path decodes and
    transforms in each worker; on the GPU path the workers read files while the GPU decodes and
    transforms the batch before. Only the data path is timed: GPU decoding also takes some of the
    GPU's time, but where it wins it wins by far. GPU None: nvjpeg cannot decode these images."""
    keys = [(i, 0) for i in range(0, len(dataset), max(1, len(dataset) // n))][:n]
    parallel = max(workers, 1)
    dataset.decode = "cpu"
    dataset[keys[0]]  # untimed: a first call pays for lazy imports
    start = time.perf_counter()
    for key in keys:
        dataset[key]
    cpu_rate = parallel * len(keys) / (time.perf_counter() - start)

    dataset.decode = "gpu"
    start = time.perf_counter()
    batch = collate_skipping([dataset[key] for key in keys])
    read_s = time.perf_counter() - start
    dataset.decode = "cpu"
    jpegs = [item for item, _seed, _path in (batch[0] or []) if isinstance(item, JpegBytes)]
    if not jpegs:
        return cpu_rate, None
    try:
        nvjpeg(jpegs[:1], device)  # untimed: the first call sets nvjpeg up (or fails: no GPU path)
    except (RuntimeError, ImportError):
        return cpu_rate, None
    start = time.perf_counter()
    gpu_batch(batch, dataset.gpu_transform, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU works asynchronously: wait for it before reading the clock
    gpu_s = time.perf_counter() - start
    # The workers read the next batch while the GPU decodes this one: the slower sets the pace.
    return cpu_rate, len(keys) / max(read_s / parallel, gpu_s)


def pick_decode(requested: str, device: torch.device, dataset: SafeImageFolder, workers: int) -> DecodeChoice:
    cpu = f"reduced-scale JPEG, {workers} workers"
    if requested == "cpu" or len(dataset) == 0:
        return DecodeChoice("cpu", cpu)
    if device.type != "cuda":
        return DecodeChoice(
            "cpu", cpu + ("; --decode gpu needs a CUDA device and this run has none" if requested == "gpu" else "")
        )
    cpu_rate, gpu_rate = measure_decode(dataset, device, workers)
    if gpu_rate is None:
        return DecodeChoice("cpu", f"{cpu}; nvjpeg decoded none of a sample of these images")
    rates = f"measured {gpu_rate:.0f} images/s with nvjpeg, {cpu_rate:.0f} on the CPU"
    if requested == "gpu" or gpu_rate > cpu_rate:
        return DecodeChoice("gpu", f"nvjpeg; {rates}")
    return DecodeChoice("cpu", f"{cpu}; {rates}")


def load_data(args, data: Path, classes: list, device: torch.device, rank: int, world: int):
    """(train loader, val loader, the train sampler, where images are decoded): training reads
    batches of its (seed, epoch) order, sharded across ranks; evaluation reads the val split in
    file order."""
    train_tf, eval_tf = build_transforms(args.image_size, args.augment, flip=not args.no_flip)
    train_set = SafeImageFolder(
        data / "train", classes, train_tf, seed=args.seed, min_short_side=decode_short_side(train_tf)
    )
    val_set = SafeImageFolder(data / "val", classes, eval_tf, min_short_side=decode_short_side(eval_tf))
    workers = pick_workers(args.workers)
    decode = pick_decode(args.decode, device, train_set, workers)
    train_set.decode = val_set.decode = decode.path
    loader_opts: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda" and decode.path == "cpu",  # nvjpeg copies the bytes over itself
        persistent_workers=workers > 0,
        collate_fn=collate_skipping,
    )
    sampler = EpochSampler(len(train_set), args.batch_size, args.seed, rank, world)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, **loader_opts)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, **loader_opts)
    return train_loader, val_loader, sampler, decode


class SkippedImages:
    """Unreadable images, each reported once (a skipped_image event) however often it comes up."""

    def __init__(self, data: Path):
        self.data = data
        self.paths: set[str] = set()

    def report(self, paths: list) -> None:
        for path in paths:
            if path not in self.paths:
                self.paths.add(path)
                emit("skipped_image", path=os.path.relpath(path, self.data))


class Batch:
    """One batch of the loader. Where its workers only read files (decode "gpu"), the images are
    decoded and transformed on first use (`tensors`), inside the training step: a CUDA
    out-of-memory there then halves the micro-batch, as one in the forward does (train_step),
    and a retry decodes the same images with the same seeds again."""

    def __init__(self, loaded: tuple, dataset: SafeImageFolder, device: torch.device, skipped: SkippedImages):
        self.images, self.targets, self.indices, _unreadable = loaded
        self.pending = dataset.decode == "gpu" and self.images is not None
        self.transform, self.device, self.skipped = dataset.gpu_transform, device, skipped

    def __len__(self) -> int:
        """The images read (before a GPU decode) or decoded (after it)."""
        return 0 if self.images is None else len(self.images)

    def tensors(self, chunk: int) -> tuple:
        """(images, targets, indices), decoded `chunk` images at a time first if need be; images
        None when none of them could be read."""
        if self.pending:
            images, targets, indices, undecodable = gpu_batch(
                (self.images, self.targets, self.indices, []), self.transform, self.device, chunk
            )
            # Kept only once the whole batch is decoded: an out-of-memory above leaves it to decode again.
            self.images, self.targets, self.indices, self.pending = images, targets, indices, False
            self.skipped.report(undecodable)
        return self.images, self.targets, self.indices


def decode_chunk(micro_batch: int) -> int:
    """How many images to decode at once on the GPU: no more than a micro-batch, so that halving it
    after an out-of-memory in decoding makes the decode smaller too."""
    return max(1, min(DECODE_CHUNK_IMAGES, micro_batch))


def batches(loader, skipped: SkippedImages, device: torch.device):
    """The loader's batches as Batch records (decoded on the GPU when used, if the workers only
    read files); the unreadable images met are reported."""
    for loaded in loader:
        skipped.report(loaded[3])
        yield Batch(loaded, loader.dataset, device, skipped)


# ----------------------------------------------------------------------------------------------
# 4. model


def classification_models() -> list:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer (fc, classifier[-1], heads.head, ...) for one of num_classes."""
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    if last_name is None:
        raise TrainerError(f"{type(model).__name__} has no Linear head to replace; choose another --model")
    parent_name, _, attr = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


def load_state_from_file(model: nn.Module, path: str) -> list:
    """Load weights from a state_dict or a gpu-run checkpoint; returns the keys left out."""
    if not Path(path).is_file():
        raise TrainerError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise TrainerError(f"weights file {path} cannot be read as a PyTorch state_dict: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise TrainerError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    # A head trained for another class count cannot load; everything else can.
    usable = {k: v for k, v in state.items() if k in own and hasattr(v, "shape") and own[k].shape == v.shape}
    if not usable:
        raise TrainerError(
            f"weights file {path} has no weights that fit {type(model).__name__}: was it made for another --model?"
        )
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def imagenet_file_name(name: str) -> str | None:
    """The file name of torchvision's default weights for a model (resnet18-f37072fd.pth), if any."""
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return None
    return url.rsplit("/", 1)[-1]


def is_imagenet_file(file_name: str, model: str) -> bool:
    """torchvision's file by its name, or by the <sha256>.pth name it has on an SSH host: torchvision's
    names carry the first hex digits of the file's sha256 (resnet18-f37072fd.pth)."""
    official = imagenet_file_name(model)
    if official is None:
        return False
    if file_name == official:
        return True
    prefix = re.search(r"-([0-9a-f]{6,})\.", official)
    stem = file_name.removesuffix(".pth")
    return prefix is not None and len(stem) == 64 and stem.startswith(prefix.group(1))


def build_model(name: str, weights: str, num_classes: int) -> nn.Module:
    """The model with its original head, the weights file loaded into it, then the new head.

    The trainer never downloads: `imagenet` is resolved by the launcher to torchvision's file,
    which travels with the run (many hosts cannot reach download.pytorch.org)."""
    choices = classification_models()
    if name not in choices:
        raise TrainerError(f"unknown --model {name!r}; choose one of: {', '.join(choices)}")
    if weights == "imagenet":
        raise TrainerError(
            "--weights imagenet needs the weights file: the trainer downloads nothing; the launcher "
            "passes torchvision's file as --weights PATH (gpu-run train does this)"
        )
    model = torchvision.models.get_model(name, weights=None)  # with its 1000-class head: the file's shape
    if weights != "none":
        missing = load_state_from_file(model, weights)
        source = "imagenet" if is_imagenet_file(Path(weights).name, name) else "file"
        emit("weights", source=source, file=Path(weights).name, path=weights, not_loaded=missing)
    return replace_head(model, num_classes)


# ----------------------------------------------------------------------------------------------
# 5. checkpoints


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over the target.

    os.replace is atomic on POSIX, so whoever reads `path` sees the old file or the new one,
    never a torn one, even if this process is killed in the middle of writing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the previous checkpoint is intact; say what to free
            raise TrainerError(
                f"no space left on device to write {path.name} in {path.parent}: the previous "
                f"checkpoint is intact; free space on the host and resume"
            ) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temp_files(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp-*"):
        tmp.unlink()


class Checkpoints:
    """last.pth (every epoch, and on a stop: what a resume starts from) and best.pth (the best
    val accuracy) in <out>/checkpoints. Plain dicts, as torchvision's reference saves them, and
    written by rank 0 only (its save_on_master)."""

    def __init__(self, folder: Path, raw_model, optimizer, scheduler, ctx, args, classes: list, world: int):
        self.folder, self.last = folder, folder / "last.pth"
        self.raw_model, self.optimizer, self.scheduler, self.ctx = raw_model, optimizer, scheduler, ctx
        self.args, self.classes, self.world = args, classes, world

    def save(self, name: str, epoch: int, step: int, samples_done: int, partial: dict, best_acc: float) -> None:
        if not is_main_process():
            return
        atomic_save(
            {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.scheduler.state_dict(),
                "scaler": self.ctx.scaler.state_dict(),
                "epoch": epoch,  # epochs fully trained
                "step": step,  # steps already trained in the next epoch, by world_size processes
                # What a resume starts from: that epoch's first samples_done positions (EpochSampler)
                # are trained, whatever number of processes resumes it.
                "samples_done": samples_done,
                "world_size": self.world,
                "partial": dict(partial),  # that epoch's totals so far, over all processes
                "best_val_acc": best_acc,
                "classes": self.classes,
                "model_name": self.args.model,
                "image_size": self.args.image_size,
                "micro_batch": self.ctx.micro_batch,
                "seed": self.args.seed,
                "args": vars(self.args),
                "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
            },
            self.folder / name,
        )

    def resume(self) -> "Resumed":
        """Load last.pth into the model, optimizer, schedule and scaler; where it stopped."""
        ckpt = torch.load(self.last, map_location="cpu", weights_only=True)
        if ckpt["classes"] != self.classes:
            raise TrainerError(f"last.pth was trained on classes {ckpt['classes']}, the data has {self.classes}")
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"]:  # empty when saved on CPU or with bf16; an fp16 GPU then starts a fresh scale
            self.ctx.scaler.load_state_dict(ckpt["scaler"])
        self.ctx.micro_batch = min(self.ctx.micro_batch, ckpt.get("micro_batch", self.ctx.micro_batch))
        # A checkpoint from before samples_done counted steps only, and not the processes: taken as one.
        world = ckpt.get("world_size", 1)
        batch_size = ckpt["args"].get("batch_size", self.args.batch_size)
        samples_done = ckpt.get("samples_done", ckpt["step"] * batch_size * world)
        return Resumed(ckpt["epoch"], samples_done, world, batch_size, ckpt["best_val_acc"], ckpt["partial"])


class Resumed(NamedTuple):
    """Where last.pth stopped: `epoch` epochs done, and `samples_done` samples of the next one's
    order, trained by `world_size` processes of `batch_size` images a step."""

    epoch: int
    samples_done: int
    world_size: int
    batch_size: int
    best_acc: float
    partial: dict | None


# ----------------------------------------------------------------------------------------------
# 6. training


class Faults:
    """Test seams, read from the environment once at start; all unset (None) outside tests.

    GPU_RUN_FAULT_OOM_ABOVE=N makes micro-batches larger than N fail like CUDA out of memory.
    GPU_RUN_FAULT_OOM_RANK=R makes GPU_RUN_FAULT_OOM_ABOVE apply on rank R only, as when one GPU of
    a multi-GPU job has less memory free than the others.
    GPU_RUN_FAULT_HANG_AT_STEP=N makes the trainer hang at step N, like a stuck NCCL call.
    """

    def __init__(self, environ=os.environ, rank: int = 0):
        self.oom_above = int(environ["GPU_RUN_FAULT_OOM_ABOVE"]) if environ.get("GPU_RUN_FAULT_OOM_ABOVE") else None
        self.oom_rank = int(environ["GPU_RUN_FAULT_OOM_RANK"]) if environ.get("GPU_RUN_FAULT_OOM_RANK") else None
        self.hang_at_step = (
            int(environ["GPU_RUN_FAULT_HANG_AT_STEP"]) if environ.get("GPU_RUN_FAULT_HANG_AT_STEP") else None
        )
        self.rank = rank

    def before_micro_batch(self, size: int) -> None:
        if self.oom_above is not None and size > self.oom_above and self.oom_rank in (None, self.rank):
            raise torch.cuda.OutOfMemoryError(f"injected: micro-batch {size} > {self.oom_above} on rank {self.rank}")

    def before_step(self, step: int) -> None:
        if step == self.hang_at_step:
            print(f"hanging at step {step} (GPU_RUN_FAULT_HANG_AT_STEP)", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


class StepContext:
    """What a step needs besides the batch; micro_batch shrinks when CUDA runs out of memory."""

    def __init__(self, device, amp_dtype, scaler, micro_batch: int, channels_last: bool, faults: Faults):
        self.device, self.amp_dtype, self.scaler = device, amp_dtype, scaler
        self.micro_batch, self.channels_last, self.faults = micro_batch, channels_last, faults
        # The votes' two numbers (agree_on_step), allocated once: right after an out-of-memory
        # there may be no memory left to allocate them.
        self.vote = torch.zeros(2, device=device)


class OutOfMemory(Exception):
    """Under DDP: some rank ran out of CUDA memory before this step's gradients were synced, and
    every rank raises this at the same point of the step. `here`: whether this rank was one."""

    def __init__(self, here: bool):
        super().__init__("CUDA out of memory on " + ("this rank" if here else "another rank"))
        self.here = here


def forward(model, criterion, x, y, ctx: StepContext):
    """(logits, loss) of one micro-batch, already on the device."""
    ctx.faults.before_micro_batch(len(x))
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
        logits = model(x)
        return logits, criterion(logits, y)


def agree_on_step(ctx: StepContext, ran_out: bool, cannot_train: bool = False) -> bool:
    """Under DDP, what every rank does next: raise OutOfMemory on every rank if any rank ran out
    of memory; else return whether any rank cannot train its batch, which all then skip together.

    One all-reduce of two numbers. .tolist() makes the CPU wait for it, and so for the GPU to
    finish what is queued before the CPU queues more: one short sync point each time."""
    ctx.vote[0].fill_(1.0 if ran_out else 0.0)
    ctx.vote[1].fill_(1.0 if cannot_train else 0.0)
    dist.all_reduce(ctx.vote, op=dist.ReduceOp.MAX)
    anyone_ran_out, anyone_cannot_train = ctx.vote.tolist()
    if anyone_ran_out:
        raise OutOfMemory(ran_out)
    return bool(anyone_cannot_train)


def forward_backward(model, criterion, batch: Batch, ctx: StepContext, optimizer):
    """One optimizer step over the batch: (loss sum, correct count, images), the sums as tensors
    on the device, since reading them here (.item()) would make the CPU wait for the GPU at every
    step. None when the step is skipped: a lone image cannot train BatchNorm (one value per
    channel), and a batch with fewer than two readable images is rare and harmless to drop.

    Under DDP every rank takes part in every collective of every step, whatever its batch holds,
    or the others would wait forever. So the ranks first agree (agree_on_step), after decoding
    the batch and copying it to the device and before any forward, whether any of them ran out of
    memory there or has fewer than two images: then all retry, or all skip. Before any forward,
    because the first forward after the first step (and after each retry) has a collective of
    DDP's in it, which regroups its gradient buckets. It costs a second short sync point a step
    (agree_on_step), under DDP only. The step's training is accumulate_and_step.
    """
    optimizer.zero_grad(set_to_none=True)
    distributed = dist.is_initialized()
    images, targets, ran_out = None, None, False
    try:
        images, targets, _indices = batch.tensors(decode_chunk(ctx.micro_batch))
        if images is not None:
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
    except torch.cuda.OutOfMemoryError:
        if not distributed:
            raise  # alone, train_step retries as for an out-of-memory anywhere in the step
        ran_out = True
    cannot_train = images is None or len(images) < 2
    if distributed:
        cannot_train = agree_on_step(ctx, ran_out, cannot_train)
    if cannot_train:
        return None
    return accumulate_and_step(model, criterion, images, targets, ctx, optimizer)


def accumulate_and_step(model, criterion, images, targets, ctx: StepContext, optimizer):
    """The step's ceil(batch / micro_batch) accumulated micro-batches and the optimizer step.

    Under DDP a rank that runs out of memory cannot just retry on its own: the others would wait
    forever in the gradient all-reduce, or run other numbers of micro-batches. So every rank stops
    at the same point, after its non-syncing micro-batches and the last one's forward, just before
    the backward that all-reduces the gradients, and they agree there whether any of them ran out
    (agree_on_step). A rank that ran out earlier skips its remaining micro-batches and goes
    straight there.

    What cannot be agreed: an out-of-memory past that point, in the syncing backward or the
    optimizer step, where the other ranks' all-reduce is already under way. That rank fails
    (train_step), torchrun ends the job, and the bounded collective timeout (setup_distributed)
    makes any rank left waiting fail too instead of hanging.
    """
    total = len(images)
    # float64 sums, so a long epoch's total keeps its digits (and equals a sum of Python floats).
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    chunks = list(zip(images.split(ctx.micro_batch), targets.split(ctx.micro_batch)))
    distributed = dist.is_initialized()
    ran_out = False
    try:
        for x, y in chunks[:-1]:
            # DDP all-reduces gradients on every backward; only the last micro-batch needs to.
            with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
                logits, loss = forward(model, criterion, x, y, ctx)
                ctx.scaler.scale(loss * (len(x) / total)).backward()
            loss_sum += loss.detach().double() * len(x)
            correct += (logits.argmax(1) == y).sum()
        x, y = chunks[-1]
        logits, loss = forward(model, criterion, x, y, ctx)
    except torch.cuda.OutOfMemoryError:
        if not distributed:
            raise  # alone, train_step retries as for an out-of-memory anywhere in the step
        ran_out = True
    if distributed:
        agree_on_step(ctx, ran_out)
    ctx.scaler.scale(loss * (len(x) / total)).backward()
    loss_sum += loss.detach().double() * len(x)
    correct += (logits.argmax(1) == y).sum()
    ctx.scaler.step(optimizer)
    ctx.scaler.update()
    return loss_sum, correct, total


def agreed_micro_batch(here: bool, ctx: StepContext) -> tuple[int, list]:
    """Under DDP, after an agreed out-of-memory: (the smallest micro-batch of all ranks, the ranks
    that ran out). A second collective, only on this rare path, which every rank takes together."""
    mine = torch.tensor([ctx.micro_batch, int(here)], device=ctx.device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    table = torch.stack(everyone).tolist()
    return min(size for size, _ in table), [rank for rank, (_, ran_out) in enumerate(table) if ran_out]


def forget_unscaled_gradients(scaler, optimizer) -> None:
    """After an out-of-memory inside scaler.step(optimizer), GradScaler still has this optimizer's
    gradients marked as unscaled (its stage UNSCALED, and that pass's inf check), so the retry's
    step would skip unscaling and apply gradients still multiplied by the scale. Forget that state,
    as scaler.update() does. torch 2.5 to 2.14 keep it in _per_optimizer_states, a defaultdict
    that gives a forgotten optimizer a fresh (READY) state; a disabled scaler has none."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.pop(id(optimizer), None)


def ddp_module(model) -> nn.parallel.DistributedDataParallel | None:
    """The model's DDP wrapper, found under torch.compile's wrapper too (see wrap_model)."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def train_step(model, criterion, batch: Batch, ctx: StepContext, optimizer):
    """Run a step; on CUDA out of memory (decoding the batch, in the forward, the backward or the
    optimizer step), halve the micro-batch (keeping the batch) and retry. Under DDP every rank
    retries together, at the same micro-batch (see forward_backward). Returns what
    forward_backward does."""
    while True:
        try:
            return forward_backward(model, criterion, batch, ctx, optimizer)
        except OutOfMemory as e:
            here = e.here
        except torch.cuda.OutOfMemoryError:
            if dist.is_initialized():
                raise TrainerError(
                    f"CUDA out of memory on rank {dist.get_rank()} in the backward that syncs the "
                    f"gradients, which the other ranks cannot retry with it: resume from last.pth "
                    f"with a smaller --batch-size, --model or --image-size"
                ) from None
            here = True
        # Handled here, outside the except blocks, so the traceback's tensors are freed.
        optimizer.zero_grad(set_to_none=True)
        forget_unscaled_gradients(ctx.scaler, optimizer)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        smallest, ranks = (ctx.micro_batch, None) if not dist.is_initialized() else agreed_micro_batch(here, ctx)
        ddp = ddp_module(model)
        if ddp is not None:
            # The ranks that ran the syncing forward left DDP waiting for its backward; forget that
            # on every rank alike, or the retry's first non-syncing backward would start the
            # gradient all-reduce on those ranks only.
            ddp.reducer._reset_state()
        if smallest <= 1:
            raise TrainerError("CUDA out of memory even at batch size 1: use a smaller --model or --image-size")
        ctx.micro_batch = max(1, smallest // 2)
        emit(
            "oom",
            micro_batch=ctx.micro_batch,
            accumulation_steps=math.ceil(len(batch) / ctx.micro_batch),
            **({} if ranks is None else {"ranks": ranks}),
        )


class EpochTotals:
    """The epoch so far: this process's loss sum, correct count and images (the sums on the device,
    where each step adds to them without waiting for the GPU), and the seconds spent. `carried` is
    what the epoch had before a resume, over all the processes it ran on; a checkpoint saves
    `summed()`, the totals over all processes, as `partial`."""

    def __init__(self, device: torch.device, world: int, carried: dict | None = None):
        self.carried = carried or {"loss_sum": 0.0, "correct": 0, "seen": 0, "time_s": 0.0}
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen, self.time_s, self.world = 0, self.carried["time_s"], world

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.seen += images

    def as_numbers(self) -> dict:
        """The totals so far as this process knows them, as plain numbers. .item() makes the CPU
        wait until the GPU has run every step queued so far (a CPU-GPU sync point), so this is
        called only to log."""
        return {
            "loss_sum": self.carried["loss_sum"] + self.loss_sum.item(),
            "correct": self.carried["correct"] + self.correct.item(),
            "seen": self.carried["seen"] + self.seen,
            "time_s": self.time_s,
        }

    def summed(self) -> dict:
        """The totals over all processes (under DDP an all-reduce, which every rank must call)."""
        mine = torch.stack([self.loss_sum, self.correct.double(), torch.full_like(self.loss_sum, self.seen)])
        if dist.is_initialized():
            dist.all_reduce(mine)
        loss_sum, correct, seen = mine.tolist()
        return {
            "loss_sum": self.carried["loss_sum"] + loss_sum,
            "correct": self.carried["correct"] + round(correct),
            "seen": self.carried["seen"] + round(seen),
            "time_s": self.time_s,
        }

    def images_per_s(self) -> float:
        """An estimate without a collective, for the step events: every rank as fast as this one."""
        return (self.carried["seen"] + self.seen * self.world) / max(self.time_s, 1e-9)

    def epoch_stats(self) -> dict:
        """The epoch's record (every rank must call it: see summed)."""
        done = self.summed()
        seen = max(done["seen"], 1)
        return {
            "train_loss": done["loss_sum"] / seen,
            "train_acc": done["correct"] / seen,
            "train_images": done["seen"],
            "train_images_per_s": done["seen"] / max(self.time_s, 1e-9),
            "epoch_time_s": self.time_s,
        }


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its current step, saves last.pth and exits 75."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum, _frame):
        if not self.requested:
            self.requested = True
            print(f"signal {signum}: stopping after this step and saving last.pth", file=sys.stderr, flush=True)


def agree_on_stop(flag: StopFlag, device, vote: bool = True) -> bool:
    """Whether to stop now. Alone, a process reads its flag. Under DDP every rank must stop at
    the same step, or the next all-reduce waits forever: they vote (an all-reduce, itself a sync
    point) only when `vote`, at steps all ranks reach together."""
    if not dist.is_initialized():
        return flag.requested
    if not vote:
        return False
    t = torch.tensor([1.0 if flag.requested else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_one_epoch(
    model,
    criterion,
    optimizer,
    batches,
    ctx: StepContext,
    totals: EpochTotals,
    epoch: int,
    step: int,
    steps: int,
    log_every: int,
    stop: StopFlag,
) -> tuple[int, bool]:
    """Train the rest of `epoch` from `step` on; returns (the step reached, whether to stop there)."""
    model.train()
    tick = last_event = time.perf_counter()
    for batch in batches:
        ctx.faults.before_step(step + 1)
        trained = train_step(model, criterion, batch, ctx, optimizer)  # None: skipped, on every rank
        if trained is not None:
            totals.add(*trained)
        step += 1
        log_step = step % log_every == 0 or step == steps  # the same steps on every rank
        # Every --log-every steps, and at least every 2 s so a slow run's display still moves.
        show = log_step or time.perf_counter() - last_event >= 2.0
        numbers = totals.as_numbers() if show else None  # waits for the GPU: before the clock is read
        now = time.perf_counter()
        totals.time_s += now - tick
        tick = now
        if show:
            assert numbers is not None  # read above when show
            last_event = now
            seen = max(numbers["seen"], 1)
            emit(
                "step",
                epoch=epoch + 1,
                step=step,
                steps=steps,
                loss=numbers["loss_sum"] / seen,
                acc=numbers["correct"] / seen,
                lr=optimizer.param_groups[0]["lr"],
                images_per_s=totals.images_per_s(),
            )
        if agree_on_stop(stop, ctx.device, vote=log_step) and step < steps:
            return step, True
    return step, False


# ----------------------------------------------------------------------------------------------
# 7. evaluation


@torch.no_grad()
def evaluate(model, criterion, batches, ctx: StepContext, dataset: "SafeImageFolder"):
    """Val loss and accuracy, and one (path, true, predicted, confidence) row per image."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    seen, outputs = 0, []
    start = time.perf_counter()
    for batch in batches:
        images, targets, indices = batch.tensors(decode_chunk(ctx.micro_batch))
        if images is None:
            continue
        # A micro-batch at a time: after an out-of-memory halved it in training, a whole batch may
        # not fit here either.
        for x, y, idx in zip(*(t.split(ctx.micro_batch) for t in (images, targets, indices))):
            x = x.to(ctx.device, non_blocking=True)
            y = y.to(ctx.device, non_blocking=True)
            if ctx.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
                logits = model(x)
            logits = logits.float()
            loss_sum += criterion(logits, y).double() * len(y)
            confidence, predicted = logits.softmax(1).max(1)
            correct += (predicted == y).sum()
            seen += len(y)
            outputs.append((idx, y, predicted, confidence))  # kept on the device until the end
    # One wait for the GPU, here, rather than one per batch.
    total_loss, total_correct = loss_sum.item(), correct.item()
    columns = [torch.cat(column).tolist() for column in zip(*outputs)] if outputs else [[]] * 4
    elapsed = time.perf_counter() - start
    rows = [(os.path.relpath(dataset.samples[idx][0], dataset.root.parent), t, p, c) for idx, t, p, c in zip(*columns)]
    return {
        "val_loss": total_loss / max(seen, 1),
        "val_acc": total_correct / max(seen, 1),
        "val_images": seen,
        "eval_images_per_s": seen / elapsed if elapsed > 0 else 0.0,
    }, rows


def write_predictions(path: Path, rows: list, classes: list, epoch: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", "epoch"])
        for rel, t, p, c in rows:
            w.writerow([rel, classes[t], classes[p], f"{c:.6f}", epoch])
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# 8. main


def setup_distributed(requested_device: str = "auto"):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process. NCCL
    talks between GPUs; a CPU run (--device cpu, or no GPU) uses gloo, even on a machine with GPUs.

    A collective waits at most GPU_RUN_DIST_TIMEOUT_S (default 600) seconds for the other ranks,
    then fails: ranks out of step (an out-of-memory in the backward that syncs the gradients, see
    forward_backward) end the job with an error instead of holding paid machines forever. It must
    be longer than any wait of a healthy run: at each epoch's end, the others wait while rank 0
    evaluates and saves."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    text = os.environ.get("GPU_RUN_DIST_TIMEOUT_S") or str(DIST_TIMEOUT_S)
    try:
        timeout_s = float(text)
    except ValueError:
        timeout_s = math.nan
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise TrainerError(f"GPU_RUN_DIST_TIMEOUT_S must be a number of seconds > 0, got {text!r}")
    backend = "nccl" if torch.cuda.is_available() and requested_device != "cpu" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **bound_device(backend, local_rank)
    )
    return dist.get_rank(), world, local_rank


def bound_device(backend: str, local_rank: int) -> dict:
    """init_process_group's device_id for NCCL, where this torch has it (2.3 and later): bound to
    its GPU, the process group runs every collective, barrier() included, on that GPU rather than
    guessing one, and connects when it is made instead of at the first collective."""
    if backend != "nccl" or "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return {}
    return {"device_id": torch.device("cuda", local_rank)}


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainerError("--device cuda was asked for but no CUDA GPU is visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """bf16 on a GPU that computes it natively (compute capability 8.0, Ampere, and later), else
    fp16; None: no mixed precision. Not torch.cuda.is_bf16_supported(): by default it counts
    emulation, so it says yes on a T4 or a V100, where bf16 runs far slower than fp16."""
    if device.type != "cuda" or amp == "off":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def pick_amp(device: torch.device, amp: str):
    """(autocast dtype or None, grad scaler); fp16 needs a scaler against underflow, bf16 does not."""
    dtype = autocast_dtype(device, amp)
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)


def wrap_model(model: nn.Module, world: int, device: torch.device, local_rank: int, compile_model: bool) -> nn.Module:
    """The model as the steps run it: DDP across the processes, then torch.compile over that. In
    this order, as PyTorch's DDP notes ask: compile then sees DDP's gradient buckets and splits its
    graph at them (DDPOptimizer), so each bucket's all-reduce overlaps the rest of the backward."""
    if world > 1:
        # broadcast_buffers=False: DDP would otherwise copy rank 0's BatchNorm statistics to the
        # others at each step's first forward. Rank 0's own are the same either way, and only rank
        # 0's are evaluated and saved; without that copy a forward has no collective in it (but
        # DDP's regrouping of its buckets, once), so a rank that runs out of memory in one leaves no
        # other rank waiting (see forward_backward).
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if compile_model:
        model = cast(nn.Module, torch.compile(model))  # an nn.Module in, an OptimizedModule (one too) out
    return model


def main(args) -> int:
    stop = StopFlag()
    rank, world, local_rank = setup_distributed(args.device)
    device = pick_device(args.device, local_rank)
    data, out = Path(args.data), Path(args.out)
    ckpt_dir = out / "checkpoints"
    if is_main_process():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(ckpt_dir)

    # Data.
    classes = class_folders(data / "train")
    if not classes:
        raise TrainerError(f"no class folders under {data / 'train'}")
    resolve_recipe(args, ckpt_dir / "last.pth")
    train_loader, val_loader, sampler, decode = load_data(args, data, classes, device, rank, world)
    log(f"decode: {decode.path} ({decode.note})")
    steps_per_epoch = math.ceil(sampler.per_rank / args.batch_size)  # of a whole epoch
    skipped = SkippedImages(data)

    # Model, optimizer, schedule.
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.weights, len(classes)).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    amp_dtype, scaler = pick_amp(device, args.amp)
    criterion = nn.CrossEntropyLoss()
    ctx = StepContext(device, amp_dtype, scaler, args.batch_size, channels_last, Faults(rank=rank))
    raw_model = model
    checkpoints = Checkpoints(ckpt_dir, raw_model, optimizer, scheduler, ctx, args, classes, world)

    # Resume: the checkpoint says how many epochs are done and how many samples into the next one.
    start_epoch, samples_done, best_acc, partial = 0, 0, 0.0, None
    if args.resume and checkpoints.last.exists():
        resumed = checkpoints.resume()
        start_epoch, samples_done = resumed.epoch, resumed.samples_done
        best_acc, partial = resumed.best_acc, resumed.partial
        emit(
            "resumed",
            epoch=start_epoch + 1,
            step=samples_done // (args.batch_size * world),
            samples_done=samples_done,
            world_size=world,
            saved_world_size=resumed.world_size,
        )
        if resumed.world_size != world:
            log(
                f"world size {resumed.world_size} -> {world}: the rest of epoch {start_epoch + 1} is shared among "
                f"{world} processes, and a step now trains {args.batch_size * world} images ({args.batch_size} per "
                f"process), not {resumed.batch_size * resumed.world_size}"
            )
    model = wrap_model(model, world, device, local_rank, args.compile)

    emit(
        "start",
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        world_size=world,
        classes=classes,
        train_images=len(train_loader.dataset),
        val_images=len(val_loader.dataset),
        epochs=args.epochs,
        start_epoch=start_epoch + 1,
        steps_per_epoch=steps_per_epoch,
        batch_size=args.batch_size,
        amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        workers=train_loader.num_workers,
        decode=decode.path,
        decode_note=decode.note,
        model=args.model,
        parameters=sum(p.numel() for p in raw_model.parameters()),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
    )

    # The epoch loop: train, step the schedule, evaluate and save (rank 0), stop if asked.
    totals, stopped = EpochTotals(device, world, partial), False
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, samples_done)
        # A step trains batch_size images on each of the world processes. An epoch resumed on
        # another number of processes counts on from the step that many samples are worth.
        start_step = samples_done // (args.batch_size * world)
        steps = start_step + math.ceil(len(sampler) / args.batch_size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step, stopped = train_one_epoch(
            model,
            criterion,
            optimizer,
            batches(train_loader, skipped, device),
            ctx,
            totals,
            epoch,
            start_step,
            steps,
            args.log_every,
            stop,
        )
        if stopped:
            samples_done += (step - start_step) * args.batch_size * world
            checkpoints.save("last.pth", epoch, step, samples_done, totals.summed(), best_acc)
            break
        train_stats = totals.epoch_stats()
        totals, samples_done = EpochTotals(device, world), 0
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        if is_main_process():
            val_stats, rows = evaluate(
                raw_model, criterion, batches(val_loader, skipped, device), ctx, val_loader.dataset
            )
            improved = val_stats["val_acc"] > best_acc or epoch == 0
            best_acc = max(best_acc, val_stats["val_acc"])
            record = {"epoch": epoch + 1, "lr": lr, **train_stats, **val_stats, "best": improved}
            if device.type == "cuda":
                record["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if improved:
                checkpoints.save("best.pth", epoch + 1, 0, 0, totals.as_numbers(), best_acc)
                write_predictions(out / "predictions.csv", rows, classes, epoch + 1)
            # metrics before last.pth: a kill in between repeats the epoch line, and readers keep
            # the last line per epoch, rather than losing it.
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoints.save("last.pth", epoch + 1, 0, 0, totals.as_numbers(), best_acc)
            emit("epoch", **record, epochs=args.epochs)
        if dist.is_initialized():
            dist.barrier()
        if agree_on_stop(stop, device) and epoch + 1 < args.epochs:
            stopped, step = True, 0
            break

    if stopped:
        emit("stopped", epoch=epoch + 1, step=step, resumable=True)
    else:
        emit("done", best_val_acc=best_acc, epochs=args.epochs, skipped_images=len(skipped.paths))
    return EXIT_STOPPED if stopped else 0


def run(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except TrainerError as e:
        emit("error", message=str(e))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        # Whatever ended the run, an unexpected exception included: NCCL warns of (and can hang
        # at exit on) a process group left undestroyed.
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())

"""`--cache-size N`: a resized copy of the dataset (short side N, same layout), made once.

Decoding and resizing large JPEGs is what starves a GPU on small models; a copy at training
resolution makes uploads smaller and epochs cheaper. The copy keeps an index of each source
file's size, mtime and sha256, so an unchanged image is never resized again, a touched but
unchanged one is only re-hashed, and an image removed from the source is removed from the copy.

`--cache-size auto` samples the dataset (`advise_cache`) and makes the copy only when the images
are more than twice as large as what training reads from them (`needed_short_side`), at that size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

from PIL import Image

from gpu_run.dataset import is_image_file
from gpu_run.errors import ConfigError
from gpu_run.paths import home_dir
from gpu_run.trainer import defaults
from gpu_run.trainer.imagefolder import class_folders, image_files, open_image

INDEX = ".gpu-run-cache.json"
# Bumped when resize_one changes what it writes, so copies made the old way are made again.
# 2: EXIF orientation applied (copies made before it may lie on their side).
# Not bumped for the reduced-scale JPEG decode: a copy keeps the same size and orientation and
# differs only in resampling (1.5 levels in 255 on average on phone-like photos, less than the
# copy's own quality-90 re-encoding changes, about 4), so copies made by a full decode are as good,
# and making them again would cost every user a re-resize and a re-upload for nothing.
COPY_FORMAT = 2
EXIF_ORIENTATION = 0x0112


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _upright_size_and_mode(src: str) -> tuple[str, int, int, str]:
    """(format, width, height, mode) of the image as it will stand once its EXIF orientation is
    applied; a header read, no decode."""
    with Image.open(src) as im:
        w, h = im.size
        if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # turned a quarter: sides swap
            w, h = h, w
        return im.format or "JPEG", w, h, im.mode


def resize_one(args: tuple[str, str, int]) -> str | None:
    """Resize src so its short side is `size` (never upscale); None if the image is unreadable.

    A JPEG at least twice that size is decoded at a reduced scale (open_image's draft mode, never
    below `size`): a 12 MP photo's copy is made 1.9x faster at 915 px, 4x at 256 px. The copy's width and height come from the
    full image's, so they are the same as a full decode gives."""
    src, dst, size = args
    try:
        fmt, w, h, mode = _upright_size_and_mode(src)
        # Upright pixels, and the orientation tag removed with them: the copy is saved without
        # EXIF, so nothing downstream can rotate it a second time.
        im = open_image(src, min_short_side=size)
        if mode == "L":
            im = im.convert("L")  # grey stays grey (and exactly so: R = G = B converts back losslessly)
        scale = size / min(w, h)
        target = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else (w, h)
        if im.size != target:
            im = im.resize(target, Image.Resampling.BICUBIC)
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{dst}.tmp"
        im.save(tmp, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        os.replace(tmp, dst)
        return dst
    except Exception:  # unreadable source: the trainer skips it; keep it out of the copy
        return None


def cache_root(source: Path, size: int) -> Path:
    """Where the copy of `source` at short side `size` lives on the laptop."""
    from gpu_run.dataset import dataset_id

    return home_dir() / "cache" / f"{dataset_id(Path(source).resolve())}-s{size}"


def cached_dataset(
    source: Path, size: int, progress: Callable[..., None] | None = None, workers: int | None = None
) -> Path:
    """Bring the resized copy of `source` up to date and return its root."""
    source = Path(source).resolve()
    root = cache_root(source, size)
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX
    index: dict[str, dict] = json.loads(index_path.read_text()) if index_path.is_file() else {}
    new_index: dict[str, dict] = {}
    jobs = []
    for path in sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p)):
        rel = str(path.relative_to(source))
        st = path.stat()
        old = index.get(rel)
        if old and old.get("format") != COPY_FORMAT:
            old = None
        entry: dict[str, int | str] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": COPY_FORMAT}
        if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns and (root / rel).is_file():
            new_index[rel] = old
            continue
        entry["sha256"] = file_sha256(path)
        if old and old.get("sha256") == entry["sha256"] and (root / rel).is_file():
            new_index[rel] = entry  # touched, same content: nothing to redo
            continue
        new_index[rel] = entry
        jobs.append((str(path), str(root / rel), size))
    for rel in set(index) - set(new_index):
        (root / rel).unlink(missing_ok=True)
    if jobs:
        if progress:
            progress(total=len(jobs))
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            for i, (job, result) in enumerate(zip(jobs, pool.map(resize_one, jobs, chunksize=32)), 1):
                if result is None:
                    new_index.pop(str(Path(job[0]).relative_to(source)), None)
                if progress:
                    progress(completed=i)
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(new_index))
    os.replace(tmp, index_path)
    return root


# --cache-size auto --------------------------------------------------------------------------------

AUTO: Final = "auto"
# RandomResizedCrop's smallest crop, as a fraction of the image's area, per --augment recipe
# (trainer/train.py build_transforms; tests/test_cache_auto.py checks these against the trainer's
# own decode_short_side). "none" crops nothing: it reads what evaluation reads.
CROP_SCALE = {"standard": 0.08, "light": 0.6}
CROP_NARROWEST_RATIO = 3 / 4  # RandomResizedCrop's default ratio=(3/4, 4/3)
HEADER_SAMPLE = 64  # images whose size is read (a header read each: milliseconds in all)
DECODE_SAMPLE = 24  # images decoded to time the data path, as long as the budget lasts
DECODE_BUDGET_S = 3.0


def parse_cache_size(text: str | int) -> int | Literal["auto"]:
    """--cache-size as typed: 0 (no copy), a short side in pixels, or auto."""
    value = str(text).strip().lower()
    if value == AUTO:
        return AUTO
    if value.isdigit():  # no sign, no decimals: "-1", "1.5" and "" are refused below
        return int(value)
    raise ConfigError(
        f"--cache-size must be 0 (no copy), a short side in pixels such as 256, or auto; got {str(text)!r}"
    )


def eval_short_side(image_size: int) -> int:
    """The short side evaluation resizes to before its centre crop: Resize(256) for 224 px."""
    return int(round(image_size * 256 / 224))


def needed_short_side(image_size: int, augment: str = defaults.AUGMENT) -> int:
    """The smallest short side that gives training everything it reads from an image: evaluation's
    resize, and RandomResizedCrop's smallest crop (a fraction s of the area, aspect 3/4) at least
    image_size pixels a side, so no crop is ever enlarged from the copy where the original had the
    pixels. The trainer decodes JPEGs at reduced scale by the same rule (decode_short_side). At
    224 px: 915 for --augment standard, 334 for light, 256 for none."""
    need = eval_short_side(image_size)
    scale = CROP_SCALE.get(augment)
    if scale is not None:
        need = max(need, math.ceil(image_size / math.sqrt(scale * CROP_NARROWEST_RATIO)))
    return need


def _size_text(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}" if n < 10 * div else f"{n / div:.0f} {unit}"
    return f"{n:.0f} B"


def _times(x: float) -> str:
    return f"{x:.2f}x" if x < 0.1 else f"{x:.1f}x" if x < 10 else f"{x:.0f}x"


@dataclass(frozen=True)
class CacheAdvice:
    """What a resized copy would do for this dataset, from a sample of it. Decode figures are
    seconds per image on one core of this machine through the data path the trainer runs (decode
    at reduced scale, crop, pixels out), for the originals and for the copy; None when not measured."""

    image_size: int
    augment: str
    images: int  # image files in train/ and val/
    dataset_bytes: int  # their bytes
    median_short_side: int  # px, over the sampled headers
    needed_short_side: int  # what training reads at most (needed_short_side)
    sample_bytes: int = 0  # bytes of the images decoded for timing ...
    sample_cached_bytes: int = 0  # ... and of their copies
    decode_s: float | None = None  # the original, as the trainer reads it
    cached_decode_s: float | None = None  # the copy
    make_s: float | None = None  # making the copy of one image

    @property
    def helps(self) -> bool:
        """The images are more than twice what training reads: a copy shrinks them at least 4x
        in pixels. Below that, it saves little and costs a re-encoded copy."""
        return self.median_short_side > 2 * self.needed_short_side

    @property
    def cache_size(self) -> int:
        """What --cache-size auto resolves to: the needed short side, or 0 (no copy)."""
        return self.needed_short_side if self.helps else 0

    @property
    def bytes_ratio(self) -> float | None:
        return self.sample_cached_bytes / self.sample_bytes if self.sample_bytes else None

    @property
    def cached_bytes(self) -> int | None:
        """The whole copy's bytes, estimated from the sample's."""
        ratio = self.bytes_ratio
        return None if ratio is None else round(self.dataset_bytes * ratio)

    @property
    def decode_speedup(self) -> float | None:
        if not self.decode_s or not self.cached_decode_s:
            return None
        return self.decode_s / self.cached_decode_s

    @property
    def decode_s_saved_per_epoch(self) -> float | None:
        """Core-seconds of decoding one epoch (every image read once) saves on the host."""
        if self.decode_s is None or self.cached_decode_s is None:
            return None
        return self.images * (self.decode_s - self.cached_decode_s)

    @property
    def message(self) -> str:
        side, need = self.median_short_side, self.needed_short_side
        what = f"the {need} px that {self.image_size} px training with --augment {self.augment} reads"
        if not self.helps:
            return (
                f"the images' median short side is {side} px, not over twice {what}: a resized copy "
                f"would save little, so --cache-size auto makes none"
            )
        gains = []
        if self.cached_bytes is not None:
            assert self.bytes_ratio is not None  # the copy's bytes are estimated from it
            gains.append(
                f"upload {_times(self.bytes_ratio)} the bytes ({_size_text(self.dataset_bytes)} -> "
                f"{_size_text(self.cached_bytes)})"
            )
        if self.decode_speedup is not None:
            gains.append(
                f"decode {_times(self.decode_speedup)} faster "
                f"({self.decode_s_saved_per_epoch:.0f} core-s less per epoch)"
            )
        would = (
            f": --cache-size {need} would {' and '.join(gains)}"
            if gains
            else f": --cache-size {need} would shrink them"
        )
        return (
            f"the images' median short side is {side} px, {_times(side / need)} {what}{would}; "
            f"--cache-size auto does it"
        )


def dataset_images(root: Path) -> list[Path]:
    """The images of train/ and val/ by the trainer's own ImageFolder rules, in its order."""
    out: list[Path] = []
    for split in ("train", "val"):
        folder = Path(root) / split
        if folder.is_dir():
            for name in class_folders(folder):
                out.extend(image_files(folder / name))
    return out


def spread(items: list, n: int) -> list:
    """n items spread evenly over the list (each class gets its share)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def random_resized_crop_box(
    w: int, h: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, as a PIL box (left, top, right, bottom)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    side = min(w, h)  # torchvision's fallback: a centre crop
    return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


def load_for_training(path: str | os.PathLike, image_size: int, augment: str, train: bool, rng: random.Random) -> bytes:
    """One sample through the trainer's data path without torch: open at the reduced scale the
    trainer asks for, RandomResizedCrop (train) or Resize + CentreCrop (eval) to image_size, and
    the pixels as one buffer (what ToTensor copies). The cost per image is what a loader worker pays."""
    if train and augment in CROP_SCALE:
        im = open_image(path, needed_short_side(image_size, augment))
        box = random_resized_crop_box(im.width, im.height, (CROP_SCALE[augment], 1.0), rng)
        out = im.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    else:
        side = eval_short_side(image_size)
        im = open_image(path, side)
        scale = side / min(im.size)
        w, h = round(im.width * scale), round(im.height * scale)
        left, top = (w - image_size) // 2, (h - image_size) // 2
        out = im.resize((w, h), Image.Resampling.BILINEAR).crop((left, top, left + image_size, top + image_size))
    return out.tobytes()


def _short_side(path: Path) -> int | None:
    try:
        with Image.open(path) as im:
            return min(im.size)
    except Exception:  # unreadable: the trainer skips it, so does the sample
        return None


def advise_cache(
    root: Path,
    image_size: int = defaults.IMAGE_SIZE,
    augment: str = defaults.AUGMENT,
    measure: bool = True,
    budget_s: float = DECODE_BUDGET_S,
) -> CacheAdvice:
    """Sample the dataset and say whether a resized copy pays, at what size, and what it saves.

    The decision needs only image headers (milliseconds). With `measure`, and only when a copy
    helps, up to DECODE_SAMPLE images are also decoded within `budget_s` seconds: each through the
    trainer's data path as it is, copied by resize_one, and the copy through the same path."""
    root = Path(root)
    images = dataset_images(root)
    dataset_bytes = sum(os.path.getsize(p) for p in images)
    sides = [s for s in map(_short_side, spread(images, HEADER_SAMPLE)) if s]
    advice = CacheAdvice(
        image_size=image_size,
        augment=augment,
        images=len(images),
        dataset_bytes=dataset_bytes,
        median_short_side=int(statistics.median_low(sides)) if sides else 0,
        needed_short_side=needed_short_side(image_size, augment),
    )
    if not (measure and advice.helps):
        return advice
    rng = random.Random(0)
    val_root = root / "val"
    n, sample_bytes, cached_bytes, decode_s, cached_s, make_s = 0, 0, 0, 0.0, 0.0, 0.0
    with tempfile.TemporaryDirectory(prefix="gpu-run-cache-auto-") as tmp:
        start = time.perf_counter()
        for i, path in enumerate(spread(images, DECODE_SAMPLE)):
            if n >= 3 and time.perf_counter() - start > budget_s:
                break
            train = val_root not in path.parents
            copy = Path(tmp) / f"{i}{path.suffix}"
            try:
                if i == 0:
                    load_for_training(path, image_size, augment, train, rng)  # warm up: imports, first allocations
                t0 = time.perf_counter()
                load_for_training(path, image_size, augment, train, rng)
                t1 = time.perf_counter()
                made = resize_one((str(path), str(copy), advice.needed_short_side))
                t2 = time.perf_counter()
                if made is None:
                    continue
                load_for_training(copy, image_size, augment, train, rng)
                t3 = time.perf_counter()
            except Exception:  # unreadable: skipped by the trainer, and here
                continue
            n += 1
            decode_s, make_s, cached_s = decode_s + t1 - t0, make_s + t2 - t1, cached_s + t3 - t2
            sample_bytes += os.path.getsize(path)
            cached_bytes += os.path.getsize(copy)
    if not n:
        return advice
    return replace(
        advice,
        sample_bytes=sample_bytes,
        sample_cached_bytes=cached_bytes,
        decode_s=decode_s / n,
        cached_decode_s=cached_s / n,
        make_s=make_s / n,
    )


def resolve_cache_size(
    value: int | str,
    root: Path,
    image_size: int = defaults.IMAGE_SIZE,
    augment: str = defaults.AUGMENT,
    measure: bool | None = None,
) -> tuple[int, CacheAdvice | None]:
    """--cache-size as given (a number, or "auto") -> (the size to use, 0 for no copy; the advice
    when auto decided it, for its message). The decision reads headers only; the savings are
    measured (seconds) when `measure`, or by default only while the copy does not exist yet, so a
    re-run on the same dataset pays milliseconds."""
    if value != AUTO:
        return int(value), None
    advice = advise_cache(root, image_size, augment, measure=False)
    if advice.helps and measure is not False:
        if measure or not (cache_root(root, advice.cache_size) / INDEX).is_file():
            advice = advise_cache(root, image_size, augment, measure=True)
    return advice.cache_size, advice

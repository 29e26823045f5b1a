"""Data-path benchmark: what one CPU core gets through per second, and what goes on the wire, for
phone photos read whole, read at reduced scale, and read from the --cache-size copy.

Claim: on 12 MP phone photos (4032 x 3024 JPEGs of about 4 MB), decoding at reduced scale (the
trainer's open_image(path, min_short_side)) is at least 2x as fast per core as a full decode, and
the copy `--cache-size auto` makes uploads at most 0.05x the originals' bytes.
How: generated photos (soft shapes over 1/f-like colour texture and sensor-like grain, saved at
quality 90 like a phone camera, EXIF-free; cached in build/ between runs), in ImageFolder layout.
Each image goes, in one process on one core, through what a loader worker does: open + decode,
RandomResizedCrop to 224 (torchvision's parameters), and the pixels to float32 as ToTensor does;
passes are repeated and the median is printed. The copy is made by launcher/cache.py itself
(cached_dataset, in a throwaway GPU_RUN_HOME) at the size advise_cache picks, and at the sizes the
other recipes would need, for comparison.
Run: .venv/bin/python benchmarks/bench_datapath.py [--images 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_run import cache  # noqa: E402
from gpu_run.trainer.imagefolder import open_image  # noqa: E402

W, H = 4032, 3024
IMAGE_SIZE = 224


# Phone-like photos ------------------------------------------------------------------------------


def texture_plate() -> Image.Image:
    """Colour texture with more energy at coarse scales than fine ones (as natural images have),
    down to per-pixel grain. Made once (Pillow's noise is not seeded: photos differ a little from
    one generation to the next, their sizes do not); every photo is a different view of it."""
    channels = []
    for _ in range(3):
        acc = None
        for step, sigma in ((64, 90), (16, 80), (4, 60), (2, 40), (1, 30)):
            layer = Image.effect_noise((W // step + 2, H // step + 2), sigma)
            if step > 1:
                layer = layer.resize((W + 2 * step, H + 2 * step), Image.BICUBIC)
            layer = layer.crop((0, 0, W, H))
            acc = layer if acc is None else ImageChops.add(acc, layer, scale=2.0)
        channels.append(acc)
    return Image.merge("RGB", channels)


def phone_photo(plate: Image.Image, seed: int) -> Image.Image:
    """Coloured shapes with soft edges, overlaid with a turned view of the texture plate."""
    rng = random.Random(seed)
    base = Image.new("RGB", (W, H), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(base)
    for _ in range(25):
        x, y, r = rng.randrange(W), rng.randrange(H), rng.randrange(150, 1200)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    base = base.filter(ImageFilter.BoxBlur(3))
    turn = rng.choice([Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180])
    return ImageChops.overlay(base, plate.transpose(turn))


def make_photos(root: Path, n: int) -> Path:
    """n photos: 3/4 in train/, 1/4 in val/, two classes (kept between runs)."""
    marker = root / f".done-{n}-{W}x{H}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    plate = texture_plate()
    for i in range(n):
        split = "val" if i % 4 == 3 else "train"
        folder = root / split / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        phone_photo(plate, i).save(folder / f"IMG_{i:04d}.jpg", "JPEG", quality=90)
    marker.touch()
    return root


# The data path --------------------------------------------------------------------------------


def to_tensor(im: Image.Image) -> np.ndarray:
    """ToTensor's work: HWC uint8 -> CHW float32 in [0, 1]."""
    return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


def one_sample(path: Path, min_short_side: int | None, crop_scale: float, rng: random.Random) -> np.ndarray:
    im = open_image(path, min_short_side)
    box = cache.random_resized_crop_box(*im.size, (crop_scale, 1.0), rng)
    return to_tensor(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR, box=box))


def per_core_rate(paths: list[Path], min_short_side: int | None, crop_scale: float, repeat: int) -> float:
    """Images/s in this one process (one core), the median of `repeat` passes."""
    one_sample(paths[0], min_short_side, crop_scale, random.Random(0))  # warm up
    times = []
    for rep in range(repeat):
        rng = random.Random(rep)
        t0 = time.perf_counter()
        for path in paths:
            one_sample(path, min_short_side, crop_scale, rng)
        times.append(time.perf_counter() - t0)
    return len(paths) / statistics.median(times)


def tree_bytes(root: Path) -> int:
    """What a sync sends: every file but the hidden ones (the copy's index stays on the laptop)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    started = t0 = time.perf_counter()
    data = make_photos(ROOT / "build" / "bench-datapath-data", args.images)
    made_s = time.perf_counter() - t0
    originals = cache.dataset_images(data)
    original_bytes = sum(p.stat().st_size for p in originals)
    print(f"{len(originals)} photos {W}x{H}, {original_bytes / len(originals) / 1e6:.1f} MB each on average "
          f"({made_s:.0f} s to make or find), one core, median of {args.repeat} passes")

    home = Path(tempfile.mkdtemp(prefix="gpu-run-bench-home-"))
    os.environ["GPU_RUN_HOME"] = str(home)
    try:
        t0 = time.perf_counter()
        advice = cache.advise_cache(data, IMAGE_SIZE)  # the default recipe: --augment standard
        advise_s = time.perf_counter() - t0
        print(f"advise_cache ({advise_s:.1f} s): {advice.message}")

        full = per_core_rate(originals, None, cache.CROP_SCALE["standard"], args.repeat)
        rows = [("full decode", "-", full, original_bytes)]
        copies = {}
        for recipe in ("standard", "light", "none"):
            size = cache.needed_short_side(IMAGE_SIZE, recipe)
            scale = cache.CROP_SCALE.get(recipe, 1.0)
            t0 = time.perf_counter()
            copy_root = cache.cached_dataset(data, size)
            copies[size] = time.perf_counter() - t0
            copied = cache.dataset_images(copy_root)
            reduced = per_core_rate(originals, size, scale, args.repeat)
            cached = per_core_rate(copied, size, scale, args.repeat)
            rows.append((f"reduced decode ({recipe})", size, reduced, original_bytes))
            rows.append((f"cached copy ({recipe})", size, cached, tree_bytes(copy_root)))

        print()
        print(f"{'data path (224 px crop)':<26} {'short side':>10} {'img/s/core':>11} {'x full':>7} "
              f"{'bytes':>9} {'x bytes':>8}")
        for name, size, rate, nbytes in rows:
            print(f"{name:<26} {size!s:>10} {rate:>11.1f} {rate / full:>7.2f} {nbytes / 1e6:>7.1f}MB "
                  f"{nbytes / original_bytes:>8.3f}")
        print(f"making the copies (cached_dataset, {os.cpu_count()} cores): "
              + ", ".join(f"{s} px {t:.1f} s" for s, t in copies.items()))

        auto = advice.cache_size
        by_size = {size: (rate, nbytes) for name, size, rate, nbytes in rows if name.startswith("cached")}
        reduced_std = next(rate for name, _, rate, _ in rows if name == "reduced decode (standard)")
        auto_bytes = by_size[auto][1] / original_bytes if auto in by_size else float("nan")
        print()
        print(f"{'target':<52} {'measured':>9}  verdict")
        checks = [
            ("reduced decode >= 2x full decode per core (standard)", reduced_std / full, 2.0, ">="),
            (f"cached upload <= 0.05x the originals (auto: {auto} px)", auto_bytes, 0.05, "<="),
        ]
        for recipe in ("light", "none"):
            size = cache.needed_short_side(IMAGE_SIZE, recipe)
            checks.append((f"  for comparison: at {size} px (--augment {recipe})", by_size[size][1] / original_bytes,
                           0.05, "<="))
        for name, value, target, op in checks:
            ok = value >= target if op == ">=" else value <= target
            print(f"{name:<52} {value:>9.3f}  {'PASS' if ok else 'FAIL'} ({op} {target})")
        print(f"({time.perf_counter() - started:.0f} s in all)")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()

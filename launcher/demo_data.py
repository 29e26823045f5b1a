"""A small generated ImageFolder dataset whose classes a CNN can learn in an epoch or two.

Used by `make demo` and by the tests: no download, deterministic for a seed. Each class is a
texture family (horizontal stripes, vertical stripes, dots, ...) in random colours, phases and
noise, so the model must learn shape, not one colour.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from gpu_run.errors import ConfigError

PATTERNS = ("horizontal", "vertical", "dots", "diagonal")
# A pattern's period is at least 4 px: below two periods a class is noise. Above the maximum, the
# per-pixel speckle loop takes minutes and the images are far larger than any model's input.
MIN_SIZE, MAX_SIZE = 8, 1024


def check_options(classes: int, train_per_class: int, val_per_class: int, size: int) -> None:
    """Values that cannot make a usable dataset, refused before any file is written."""
    if not 2 <= classes <= len(PATTERNS):
        raise ConfigError(f"--classes must be between 2 and {len(PATTERNS)}, got {classes}")
    for option, count in (("--train-per-class", train_per_class), ("--val-per-class", val_per_class)):
        if count < 1:
            raise ConfigError(f"{option} must be at least 1, got {count}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")


def draw_pattern(pattern: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(0, 120) for _ in range(3))
    foreground = tuple(rng.randint(135, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(im)
    period = rng.randint(max(4, size // 10), max(6, size // 4))
    width = max(1, period // 2)
    offset = rng.randint(0, period)
    if pattern == "horizontal":
        for y in range(-period + offset, size, period):
            d.rectangle([0, y, size, y + width], fill=foreground)
    elif pattern == "vertical":
        for x in range(-period + offset, size, period):
            d.rectangle([x, 0, x + width, size], fill=foreground)
    elif pattern == "diagonal":
        for k in range(-size, 2 * size, period):
            d.line([(k, 0), (k + size, size)], fill=foreground, width=width)
    else:  # dots
        r = max(1, width // 2 + 1)
        for y in range(offset % period, size, period):
            for x in range(offset % period, size, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=foreground)
    # Speckle noise so no two images are alike and JPEG sizes look like photos'.
    px = im.load()
    assert px is not None  # a new image in memory always loads
    for _ in range(size * size // 12):
        x, y = rng.randrange(size), rng.randrange(size)
        px[x, y] = tuple(rng.randint(0, 255) for _ in range(3))
    return im


def make_dataset(
    root: Path,
    classes: int = 2,
    train_per_class: int = 100,
    val_per_class: int = 30,
    size: int = 64,
    seed: int = 0,
    fmt: str = "JPEG",
) -> Path:
    """Write root/{train,val}/<pattern>/NNNN.jpg and return root."""
    check_options(classes, train_per_class, val_per_class, size)
    root = Path(root)
    rng = random.Random(seed)
    ext = ".jpg" if fmt == "JPEG" else f".{fmt.lower()}"
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for pattern in PATTERNS[:classes]:
            folder = root / split / pattern
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                im = draw_pattern(pattern, size, rng)
                im.save(folder / f"{i:05d}{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return root

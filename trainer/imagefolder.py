"""The ImageFolder rules, written once: which folders are classes, which files are images, and
how an image is opened. The launcher checks a dataset on the laptop with these rules and the
trainer reads it on the host with the same ones, so a file the laptop counted is a file the host
trains on. Torch-free (PIL only): the launcher imports it without paying for torch.

Hidden names (a leading dot) are never data: macOS writes `._x.jpg` AppleDouble files (resource
forks, not JPEGs) beside every copied photo, and `.DS_Store`, `.thumbnails/` or `.ipynb_checkpoints/`
are not classes. The sync does not send them either.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """An image by its extension, and not a dot-file (`._x.jpg` is macOS metadata, not a JPEG)."""
    name = os.path.basename(path)
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not is_hidden(name)


def class_folders(split_dir: str | os.PathLike[str]) -> list[str]:
    """The class names of a split: its folders that are not hidden, sorted (the class index order)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not is_hidden(e.name))


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The images of a class folder and its subfolders, hidden folders left out, in torchvision
    ImageFolder's order (folders sorted by path, then names), so both list the same samples in
    the same order. Symlinked folders are followed, each real folder once (no loops)."""
    found, visited = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink back to a folder already walked
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        found.append((root, sorted(n for n in names if is_image_file(n))))
    return [
        Path(root, name) for root, names in sorted(found) for name in names if os.path.isfile(os.path.join(root, name))
    ]


def open_image(path, min_short_side: int | None = None) -> Image.Image:
    """The image as RGB, upright, and no larger than needed.

    Upright: phones store pixels as the sensor saw them and say in an EXIF tag how to turn them,
    so without exif_transpose a portrait photo trains lying on its side.

    No larger than needed: with `min_short_side`, a JPEG at least twice that size is decoded at a
    reduced scale (1/2, 1/4 or 1/8, done inside the JPEG decoder, which then skips most of the
    work) whose short side is still >= min_short_side. A 12 MP phone photo decodes several times
    faster at 1/2 or 1/4 scale, and a transform that shrinks it anyway loses nothing. Other
    formats have no such mode and are decoded whole.
    """
    with Image.open(path) as im:
        if min_short_side and im.format == "JPEG":
            # Pillow picks the largest scale at which both sides stay >= the size asked for, so
            # asking for (m, m) keeps the short side >= m, whichever way the photo is turned.
            im.draft("RGB", (min_short_side, min_short_side))
        return ImageOps.exif_transpose(im).convert("RGB")

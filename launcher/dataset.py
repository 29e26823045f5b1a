"""The dataset on the laptop: ImageFolder layout checks, image readability, manifest and id.

Everything here runs before any money is spent, so every problem is one DatasetError line that
names the folder and the fix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from launcher.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
# More unreadable images than this (per split) is a broken dataset, not a few bad files.
MAX_UNREADABLE_FRACTION = 0.5


@dataclass
class DatasetInfo:
    root: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> readable images
    unreadable: list[str] = field(default_factory=list)  # relative paths

    @property
    def num_train(self) -> int:
        return sum(self.counts["train"].values())

    @property
    def num_val(self) -> int:
        return sum(self.counts["val"].values())

    @property
    def dataset_id(self) -> str:
        return dataset_id(self.root)


def dataset_id(root: Path) -> str:
    """Stable id of a dataset *location*: the same folder syncs into the same remote folder,
    so a changed file is an incremental update, not a new full copy."""
    resolved = str(root.expanduser().resolve())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(resolved).name).strip("-.") or "data"
    return f"{slug[:40]}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def is_readable_image(path: Path) -> bool:
    """Header parse plus PIL's integrity check; cheap compared to a full decode."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many exception types for a broken file
        return False


def check_layout(root: Path) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """The ImageFolder rules; returns (classes, split -> class -> image paths)."""
    if not root.exists():
        raise DatasetError(f"dataset {root} does not exist; pass --data DIR with train/ and val/ inside")
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is a file; pass the folder that holds train/ and val/")
    files: dict[str, dict[str, list[Path]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"dataset {root} has no {split}/ folder; expected {split}/<class>/<image> (ImageFolder layout)")
        classes = class_folders(split_dir)
        if not classes:
            raise DatasetError(f"{split_dir} has no class folders; put each class's images in {split}/<class>/")
        files[split] = {c: image_files(split_dir / c) for c in classes}
        for c, images in files[split].items():
            if not images:
                raise DatasetError(f"class {c!r} in {split_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
    train_classes, val_classes = list(files["train"]), list(files["val"])
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        parts = []
        if only_train:
            parts.append(f"only in train/: {', '.join(only_train)}")
        if only_val:
            parts.append(f"only in val/: {', '.join(only_val)}")
        raise DatasetError(f"train/ and val/ must have the same class folders ({'; '.join(parts)})")
    return train_classes, files


def validate_dataset(root: Path, progress: Callable[[int, int], None] | None = None) -> DatasetInfo:
    """Check layout and every image; a few unreadable files are tolerated and reported."""
    root = Path(root).expanduser()
    classes, files = check_layout(root)
    total = sum(len(v) for split in files.values() for v in split.values())
    done = 0
    counts: dict[str, dict[str, int]] = {}
    unreadable: list[str] = []
    for split in SPLITS:
        counts[split] = {}
        bad_in_split, all_in_split = 0, 0
        for c in classes:
            good = 0
            for path in files[split][c]:
                if is_readable_image(path):
                    good += 1
                else:
                    unreadable.append(str(path.relative_to(root)))
                    bad_in_split += 1
                all_in_split += 1
                done += 1
                if progress and (done % 200 == 0 or done == total):
                    progress(done, total)
            if good == 0:
                raise DatasetError(f"class {c!r} in {root / split} has no readable images; replace the corrupt files")
            counts[split][c] = good
        if bad_in_split / all_in_split > MAX_UNREADABLE_FRACTION:
            raise DatasetError(
                f"{bad_in_split} of {all_in_split} images in {root / split} are unreadable; "
                f"the dataset looks corrupt (first: {unreadable[-bad_in_split]})"
            )
    return DatasetInfo(root=root, classes=classes, counts=counts, unreadable=unreadable)

"""The dataset on the laptop: ImageFolder layout checks, image readability, manifest and id.

Everything here runs before any money is spent, so every problem is one DatasetError line that
names the folder and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from gpu_run.errors import ConfigError, DatasetError
from gpu_run.paths import home_dir

# The ImageFolder rules are the trainer's own, so the laptop counts exactly what the host trains on
# (is_image_file and image_files are also imported from here by others).
from gpu_run.trainer.imagefolder import IMAGE_EXTENSIONS, class_folders, image_files, is_hidden, is_image_file  # noqa: F401

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


def is_readable_image(path: Path) -> bool:
    """Header parse plus PIL's integrity check; cheap compared to a full decode."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many exception types for a broken file
        return False


def _shown(path: str) -> str:
    """A path fit for a message: a name that is not UTF-8 shows its bad bytes as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def check_entry(root: str, dirpath: str, name: str, is_dir: bool) -> None:
    """One file or folder the sync will send: anything it cannot send whole is refused here,
    before billing starts, not found by tar or the trainer on the host."""
    full = os.path.join(dirpath, name)
    rel = _shown(os.path.relpath(full, root))
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(f"{rel} in {_shown(root)}: the file name is not valid UTF-8; rename it") from None
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        try:
            os.stat(full)
        except OSError as e:
            what = "is a symlink loop" if e.errno == errno.ELOOP else "is a broken symlink (its target is gone)"
            raise DatasetError(f"{rel} in {_shown(root)} {what}; remove it or replace it with the real file") from None
        target, real_root = os.path.realpath(full), os.path.realpath(root)
        if os.path.commonpath([target, real_root]) != real_root:
            raise DatasetError(
                f"{rel} in {_shown(root)} is a symlink to {_shown(target)}, outside the dataset, "
                f"which the sync does not follow; replace it with a copy of the file or remove it"
            )
        if os.path.isabs(os.readlink(full)):
            raise DatasetError(
                f"{rel} in {_shown(root)} is a symlink with an absolute target, which breaks on the "
                f"host; make it relative or replace it with a copy of the file"
            )
        return
    if is_dir:
        # Inside a class folder (split/class/NAME and deeper), where images are expected.
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS and rel.count(os.sep) >= 2:
            raise DatasetError(f"{rel} in {_shown(root)} is a folder named like an image; rename or remove it")
        if not os.access(full, os.R_OK | os.X_OK):
            raise DatasetError(
                f"folder {rel} in {_shown(root)} cannot be read; fix its permissions (chmod a+rx) or remove it"
            )
        return
    if not stat.S_ISREG(st.st_mode):
        # Reading a FIFO blocks forever; sockets and devices are not data either.
        raise DatasetError(f"{rel} in {_shown(root)} is not a regular file (a FIFO, socket or device); remove it")
    try:
        os.close(os.open(full, os.O_RDONLY))
    except OSError as e:
        raise DatasetError(
            f"{rel} in {_shown(root)} cannot be read ({e.strerror}); fix its permissions (chmod a+r) or remove it"
        ) from None


def check_entries(root: Path) -> None:
    """Every file and folder the sync sends (the same walk, the same hidden-name rule as its manifest)."""
    top = str(root)
    for dirpath, dirnames, filenames in os.walk(top, onerror=_raise_walk_error):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        for name in dirnames:
            check_entry(top, dirpath, name, is_dir=True)
        for name in filenames:
            if not is_hidden(name):
                check_entry(top, dirpath, name, is_dir=False)


def _raise_walk_error(e: OSError) -> None:
    raise DatasetError(
        f"cannot read folder {_shown(e.filename or '')} ({e.strerror}); fix its permissions or remove it"
    )


def check_layout(root: Path) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """The ImageFolder rules; returns (classes, split -> class -> image paths)."""
    if not root.exists():
        raise DatasetError(f"dataset {root} does not exist; pass --data DIR with train/ and val/ inside")
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is a file; pass the folder that holds train/ and val/")
    check_entries(root)
    files: dict[str, dict[str, list[Path]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(
                f"dataset {root} has no {split}/ folder; expected {split}/<class>/<image> (ImageFolder layout)"
            )
        classes = class_folders(split_dir)
        if not classes:
            raise DatasetError(f"{split_dir} has no class folders; put each class's images in {split}/<class>/")
        files[split] = {c: image_files(split_dir / c) for c in classes}
        for c, images in files[split].items():
            if not images:
                raise DatasetError(
                    f"class {c!r} in {split_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder"
                )
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
    if len(train_classes) < 2:
        raise DatasetError(
            f"dataset {root} has one class ({train_classes[0]}); a classifier needs at least 2 classes: "
            f"add another class folder to train/ and val/"
        )
    return train_classes, files


class CheckedImages:
    """What earlier runs found about each image, by (size, mtime, ctime): a file that has not changed is
    not opened again, so a second run on a big dataset starts in a stat per file. Kept in the state
    folder per dataset location; a lost or damaged record only means checking everything again."""

    def __init__(self, root: Path):
        self.known: dict[str, list] = {}
        self.seen: dict[str, list] = {}
        try:
            self.path: Path | None = home_dir() / "dataset-checks" / f"{dataset_id(root)}.json"
            self.known = json.loads(self.path.read_text())
        except ConfigError:
            self.path = None  # no usable state folder: check every image, remember nothing
        except (OSError, ValueError):
            pass

    def readable(self, root: Path, path: Path) -> bool:
        rel = os.fsencode(path.relative_to(root)).decode("utf-8", "surrogateescape")
        st = path.stat()
        # ctime too: a file rewritten with its old size and mtime put back still changes it.
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = self.known.get(rel)
        ok = entry[3] if isinstance(entry, list) and len(entry) == 4 and entry[:3] == key else is_readable_image(path)
        self.seen[rel] = [*key, bool(ok)]
        return bool(ok)

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.seen, ensure_ascii=True))
            os.replace(tmp, self.path)
        except (OSError, UnicodeEncodeError):
            pass  # only a speed-up: the next run checks every image again


def validate_dataset(root: Path, progress: Callable[[int, int], None] | None = None) -> DatasetInfo:
    """Check layout and every image; a few unreadable files are tolerated and reported."""
    root = Path(root).expanduser()
    classes, files = check_layout(root)
    checked = CheckedImages(root)
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
                if checked.readable(root, path):
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
    checked.save()
    return DatasetInfo(root=root, classes=classes, counts=counts, unreadable=unreadable)

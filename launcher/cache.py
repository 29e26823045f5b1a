"""`--cache-size N`: a resized copy of the dataset (short side N, same layout), made once.

Decoding and resizing large JPEGs is what starves a GPU on small models; a copy at training
resolution makes uploads smaller and epochs cheaper. The copy keeps an index of each source
file's size, mtime and sha256, so an unchanged image is never resized again, a touched but
unchanged one is only re-hashed, and an image removed from the source is removed from the copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from gpu_run.dataset import is_image_file
from gpu_run.paths import home_dir

INDEX = ".gpu-run-cache.json"
# Bumped when resize_one changes what it writes, so copies made the old way are made again.
# 2: EXIF orientation applied (copies made before it may lie on their side).
COPY_FORMAT = 2


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resize_one(args: tuple[str, str, int]) -> str | None:
    """Resize src so its short side is `size` (never upscale); None if the image is unreadable."""
    src, dst, size = args
    try:
        with Image.open(src) as im:
            fmt = im.format or "JPEG"
            # Upright pixels, and the orientation tag removed with them: the copy is saved without
            # EXIF, so nothing downstream can rotate it a second time.
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
            w, h = im.size
            scale = size / min(w, h)
            if scale < 1:
                im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{dst}.tmp"
            im.save(tmp, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            os.replace(tmp, dst)
        return dst
    except Exception:  # unreadable source: the trainer skips it; keep it out of the copy
        return None


def cached_dataset(source: Path, size: int, progress: Callable[..., None] | None = None,
                   workers: int | None = None) -> Path:
    """Bring the resized copy of `source` up to date and return its root."""
    from gpu_run.dataset import dataset_id

    source = Path(source).resolve()
    root = home_dir() / "cache" / f"{dataset_id(source)}-s{size}"
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
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": COPY_FORMAT}
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

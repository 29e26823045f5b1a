"""A run's pulled outputs, read as what they are: data written by a host that may be hostile.

metrics.jsonl and predictions.csv lose their unreadable lines (counted in one warning per file,
so the figures come from the good ones); a file with no good line is one error. An image path
from predictions.csv is opened only when it is a regular file inside the run's dataset folder.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from rich.console import Console

from gpu_run.errors import GpuRunError
from gpu_run.events import read_metrics_lenient
from gpu_run.ui import UI


@dataclass
class Prediction:
    path: str
    true: str
    predicted: str
    confidence: float


def warn(message: str) -> None:
    """A warning on stderr: stdout belongs to the command's result (--json)."""
    UI(console=Console(stderr=True, highlight=False)).warn(message)


def read_summary(run_dir: Path) -> dict:
    """summary.json (the laptop writes it), or {} when there is none or it is damaged."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(errors="replace"))
    except (ValueError, RecursionError):
        warn(f"{path} is not readable JSON; the figures leave out what it holds")
        return {}
    return summary if isinstance(summary, dict) else {}


def summary_classes(summary: dict) -> list[str] | None:
    classes = summary.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
        return classes
    return None


def read_host_metrics(path: Path, numbers: tuple[str, ...]) -> list[dict]:
    """metrics.jsonl's epochs whose `numbers` are all finite numbers; raises when it has lines but
    none of them is one (an empty file is a run that has not finished an epoch yet)."""
    records, skipped = read_metrics_lenient(path.read_text(errors="replace"), numbers)
    if skipped and not records:
        raise GpuRunError(
            f"{path} has no readable epoch line ({skipped} skipped: each needs an epoch and "
            f"{', '.join(numbers)} as numbers); `gpu-run pull` the run again"
        )
    if skipped:
        warn(f"skipped {skipped} unreadable line(s) of {path}; the figures use the other {len(records)}")
    return records


def _prediction(row: dict, classes: set[str] | None) -> Prediction | None:
    values = [row.get(key) for key in ("path", "true", "predicted", "confidence")]
    if not all(isinstance(v, str) for v in values):  # a short row leaves None where a value is missing
        return None
    path, true, predicted, confidence = cast("list[str]", values)  # each a str: checked above
    try:
        score = float(confidence)
    except ValueError:
        return None
    if not 0.0 <= score <= 1.0:  # NaN fails this too
        return None
    if classes is not None and (true not in classes or predicted not in classes):
        return None
    return Prediction(path, true, predicted, score)


def read_host_predictions(path: Path, classes: list[str] | None = None) -> list[Prediction]:
    """predictions.csv's readable rows (a confidence in [0, 1], and class names among `classes`
    when they are known); raises when it has rows but none of them is readable."""
    known = set(classes) if classes is not None else None
    preds: list[Prediction] = []
    skipped = 0
    with open(path, newline="", errors="replace") as f:
        rows = csv.DictReader(f)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error:  # a field past csv's size limit: the reader goes on with the next line
                skipped += 1
                continue
            pred = _prediction(row, known)
            if pred is None:
                skipped += 1
            else:
                preds.append(pred)
    if skipped and not preds:
        raise GpuRunError(
            f"{path} has no readable prediction row ({skipped} skipped: each needs path, true, "
            f"predicted and a confidence from 0 to 1); `gpu-run pull` the run again"
        )
    if skipped:
        warn(f"skipped {skipped} unreadable row(s) of {path}; the figures use the other {len(preds)}")
    return preds


def dataset_file(root: Path, relative: str) -> Path | None:
    """The regular file `relative` names inside the dataset folder `root`, or None for anything
    else: an absolute path, ../, a symlink that leads out, a device, a FIFO, a folder, nothing."""
    try:
        top = os.path.realpath(root)
        target = os.path.realpath(os.path.join(top, relative))
        if os.path.commonpath([top, target]) != top:
            return None
        return Path(target) if stat.S_ISREG(os.stat(target).st_mode) else None
    except (OSError, ValueError):  # no such file, a name too long, a NUL byte in the path
        return None

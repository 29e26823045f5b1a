"""The trainer's side of the conversation: JSON event lines on stdout and its exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Mirrors trainer/train.py: 0 done, 75 stopped with a resumable last.pth, anything else failed.
EXIT_OK = 0
EXIT_STOPPED = 75


def parse_event(line: str) -> dict | None:
    """A trainer event, or None for an ordinary log line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # a host's line of 100,000 '[' is not an event either
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("event"), str) else None


def status_for_exit(exit_code: int | None) -> str:
    if exit_code == EXIT_OK:
        return "succeeded"
    if exit_code == EXIT_STOPPED:
        return "stopped"
    return "failed"


def status_of_run(exit_code: int | None, log_path: Path | None = None) -> str:
    """status_for_exit, except where torchrun (several processes) was asked to stop: it exits 1
    even though every process saved last.pth and exited 75. The trainer's last event says so."""
    status = status_for_exit(exit_code)
    if status != "failed" or log_path is None or not log_path.is_file():
        return status
    last = None
    for line in log_path.read_text(errors="replace").splitlines():
        last = parse_event(line) or last
    return "stopped" if last and last["event"] == "stopped" and last.get("resumable") else status


def read_metrics(text: str) -> list[dict]:
    """metrics.jsonl -> one record per epoch; a repeated epoch (after a resume) keeps its last line."""
    by_epoch: dict[int, dict] = {}
    for line in text.splitlines():
        line = line.strip()
        if line:
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


# A number from a host that no real loss, speed or time reaches; a figure's axis can still span it
# (matplotlib fails on a span near the float limit, and 10**400 is no float at all).
MAX_METRIC = 1e15


def _plottable(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and abs(value) <= MAX_METRIC
    except OverflowError:
        return False


def read_metrics_lenient(text: str, numbers: tuple[str, ...] = ()) -> tuple[list[dict], int]:
    """read_metrics for a file a host wrote: (records, lines skipped). A line is skipped unless it
    is a JSON object with a whole-number epoch and, under each key of `numbers`, a finite number
    (NaN, inf, 10**400, a string, a missing key, deep nesting and broken JSON are all skipped)."""
    by_epoch: dict[int, dict] = {}
    skipped = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # broken JSON, a huge integer, "[" * 100000
            skipped += 1
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not (
            isinstance(epoch, int)
            and _plottable(epoch)
            and epoch >= 0
            and all(_plottable(record.get(key)) for key in numbers)
        ):
            skipped += 1
            continue
        by_epoch[epoch] = record
    return [by_epoch[e] for e in sorted(by_epoch)], skipped

"""The trainer's side of the conversation: JSON event lines on stdout and its exit codes."""

from __future__ import annotations

import json

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
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("event"), str) else None


def status_for_exit(exit_code: int | None) -> str:
    if exit_code == EXIT_OK:
        return "succeeded"
    if exit_code == EXIT_STOPPED:
        return "stopped"
    return "failed"


def read_metrics(text: str) -> list[dict]:
    """metrics.jsonl -> one record per epoch; a repeated epoch (after a resume) keeps its last line."""
    by_epoch: dict[int, dict] = {}
    for line in text.splitlines():
        line = line.strip()
        if line:
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]

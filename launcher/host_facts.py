"""What `gpu-run doctor` found on a host (its GPU and CPU count), kept for `gpu-run plan`.

One small JSON file in the state folder, host name -> {gpu, gpus, vcpus, checked_at}; a newer
check of a host replaces the older one. Nothing here is needed to run: a host whose facts are
missing is only estimated less well.
"""

from __future__ import annotations

import json
import os
import time

from gpu_run.paths import home_dir

FILENAME = "host-facts.json"


def _path():
    return home_dir() / FILENAME


def load_all() -> dict[str, dict]:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load(host: str) -> dict:
    facts = load_all().get(host)
    return facts if isinstance(facts, dict) else {}


def record(host: str, gpus: list[str], vcpus: int | None, now: float | None = None) -> None:
    """Remember what a host has: its GPU names (empty: none found) and vCPUs (None: not found)."""
    data = load_all()
    data[host] = {"gpu": gpus[0] if gpus else None, "gpus": gpus, "vcpus": vcpus, "checked_at": now or time.time()}
    path = _path()
    tmp = path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)

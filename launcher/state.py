"""Where gpu-run keeps its state on the laptop: $GPU_RUN_HOME, else the platform's user data dir."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir


def home_dir() -> Path:
    env = os.environ.get("GPU_RUN_HOME")
    path = Path(env).expanduser() if env else Path(user_data_dir("gpu-run", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ledger_path() -> Path:
    return home_dir() / "runs.db"


def torch_cache_dir() -> Path:
    """Shared torchvision weights cache, mounted into containers so imagenet weights download once."""
    path = home_dir() / "torch-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def project_root() -> Path:
    """The folder holding trainer/ and docker/ (the source tree gpu-run is installed from)."""
    return Path(__file__).resolve().parent.parent

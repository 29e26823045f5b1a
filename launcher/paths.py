"""Where gpu-run keeps its state on the laptop: $GPU_RUN_HOME, else the platform's user data dir."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

from gpu_run.errors import ConfigError


def home_dir() -> Path:
    """The state folder, created private (0700): it holds the run history and cached datasets."""
    env = os.environ.get("GPU_RUN_HOME")
    path = Path(env).expanduser() if env else Path(user_data_dir("gpu-run", appauthor=False))
    where = f"GPU_RUN_HOME={env}" if env else f"the state folder {path}"
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{where} is not writable; fix its permissions or point GPU_RUN_HOME at a folder you own")
        return path
    if path.exists():
        raise ConfigError(f"{where} is not a folder; point GPU_RUN_HOME at a folder (or move the file away)")
    try:
        path.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass  # another gpu-run process made it first
    except OSError as e:
        raise ConfigError(
            f"cannot create {where}: {e.strerror}; point GPU_RUN_HOME at a folder you can write"
        ) from None
    return path


def ledger_path() -> Path:
    return home_dir() / "runs.db"


def torch_cache_dir() -> Path:
    """Shared torchvision weights cache, mounted into containers so imagenet weights download once."""
    path = home_dir() / "torch-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path

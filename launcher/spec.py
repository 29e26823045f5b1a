"""What the user asked `gpu-run train` for, and the checks that refuse what cannot work.

The recipe's defaults are the trainer's own (gpu_run.trainer.defaults), so the command line, this
spec and the trainer cannot drift apart.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gpu_run.backends.base import STOP_TIMEOUT_S
from gpu_run.errors import ConfigError
from gpu_run.model_zoo import CLASSIFICATION_MODELS
from gpu_run.trainer import defaults as recipe
from gpu_run.weights import check_weights

MAX_STOP_TIMEOUT_S = 3600  # a stop that waits longer than this is a hang, and the host bills meanwhile


# TrainSpec's fields that only the built-in trainer reads: given with a user's command (on the
# command line or to gpu_run.train) they would do nothing, so they are refused there.
TRAINER_ONLY_FIELDS = (
    "model",
    "weights",
    "epochs",
    "batch_size",
    "lr",
    "step_size",
    "gamma",
    "image_size",
    "augment",
    "no_flip",
    "workers",
    "seed",
    "amp",
    "decode",
    "compile",
)


@dataclass
class TrainSpec:
    """What the user asked `gpu-run train` for."""

    host: str
    data: Path
    model: str = recipe.MODEL
    weights: str = "imagenet"  # the seed recipe: transfer learning from torchvision's ImageNet weights
    epochs: int = recipe.EPOCHS
    batch_size: int = recipe.BATCH_SIZE
    lr: float = recipe.LR
    step_size: int = recipe.STEP_SIZE
    gamma: float = recipe.GAMMA
    image_size: int = recipe.IMAGE_SIZE
    augment: str | None = None  # standard | light | none; None: standard, or the resumed run's
    no_flip: bool = False  # True: no horizontal flip; a resumed run keeps the flip choice it had
    workers: int = recipe.WORKERS
    seed: int = recipe.SEED
    gpus: int = 1
    amp: str = recipe.AMP
    decode: str = recipe.DECODE  # auto | cpu | gpu: where the host decodes JPEGs (the trainer falls back to cpu)
    compile: bool = False
    # "auto": a copy resized to what training reads when the images are much larger (decided from
    # their headers); N > 0: a copy at short side N (made once, on the laptop); 0: the originals.
    cache_size: int | Literal["auto"] = "auto"
    detach: bool = False
    max_hours: float = 0.0  # 0: no limit; enforced by the watchdog on the host
    silence_minutes: float = 0.0  # 0: no limit; a job that logs nothing this long is stopped
    stop_timeout_s: int = STOP_TIMEOUT_S  # what the trainer gets to save last.pth when stopped
    keep_alive: bool = False
    terminate: bool = False
    budget: float = 0.0  # in the host's currency; 0: none
    epoch_time_s: float = 0.0  # a known time per epoch, for the budget estimate
    force: bool = False  # start even when the estimate is over the budget
    accept_new_host_key: bool = False
    runs_dir: Path = Path("runs")
    resume: str | None = None  # a run id whose last.pth this run continues from
    extra_env: dict = field(default_factory=dict)
    # The user's own command (everything after `--`) instead of our trainer, run in a copy of the
    # project folder on the host; None: our trainer.
    command: list[str] | None = None
    project: Path | None = None  # the folder the command runs from (the current one)
    max_pull_mb: int = 2048  # the most a command's outputs may bring back in one pull
    # torchvision models whose ImageNet weights a command finds in TORCH_HOME on the host (sent
    # from the laptop once, by sha256), so that `resnet18(weights="IMAGENET1K_V1")` needs no internet.
    hub_weights: list[str] = field(default_factory=list)

    @property
    def is_command(self) -> bool:
        return self.command is not None

    def trainer_args(self) -> list[str]:
        args = [
            "--model",
            self.model,
            "--epochs",
            str(self.epochs),
            "--batch-size",
            str(self.batch_size),
            "--lr",
            str(self.lr),
            "--step-size",
            str(self.step_size),
            "--gamma",
            str(self.gamma),
            "--image-size",
            str(self.image_size),
            "--workers",
            str(self.workers),
            "--seed",
            str(self.seed),
            "--amp",
            self.amp,
            "--decode",
            self.decode,
        ]
        # Passed only when chosen: the trainer then takes a resumed run's recipe from its last.pth.
        if self.augment:
            args += ["--augment", self.augment]
        if self.no_flip:
            args.append("--no-flip")
        if self.compile:
            args.append("--compile")
        if self.resume:
            args.append("--resume")
        return args


# Bounds past which a value is a typo, not a plan: refused here, before the machine is up, rather
# than failing there (int(1e308 * 3600) raises) or being enforced as something else.
YEAR_S = 365 * 24 * 3600
MIN_LIMIT_S = 5  # the watchdog polls every 2 s and counts whole seconds: 0.0001 hours would be int 0, no limit
MAX_BUDGET = 10**9  # in the host's currency
MAX_GPUS = 64
MAX_WORKERS = 64
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # what sh accepts as a variable name


def check_limit(option: str, value: float, unit_s: int, unit: str) -> None:
    """--max-hours or --silence-minutes: 0 (no limit), or between what the watchdog can enforce and a year."""
    if value == 0:
        return
    if value * unit_s < MIN_LIMIT_S:
        least = math.ceil(MIN_LIMIT_S / unit_s * 10_000) / 10_000  # rounded up, so that it passes
        raise ConfigError(
            f"{option} {value:g} is {value * unit_s:.2g} s, too short for the watchdog to enforce; "
            f"pass at least {least:g} ({MIN_LIMIT_S} s), or 0 for no limit"
        )
    if value * unit_s > YEAR_S:
        raise ConfigError(
            f"{option} {value:g} is more than a year; pass at most {YEAR_S // unit_s} {unit}, or 0 for no limit"
        )


def check_env(env: dict[str, str]) -> None:
    """--env pairs the trainer cannot get as one variable each. The key must be a shell name: the
    python runtime's env file is sourced by sh, so a key such as `X;cmd;Y` would run cmd on the host.
    The env file has no quoting for line breaks, and no process can get a NUL."""
    for key, value in env.items():
        if not ENV_NAME.fullmatch(key):
            raise ConfigError(
                f"--env {key!r}: not an environment variable name; use letters, digits and _, "
                f"not starting with a digit (--env MY_VAR=value)"
            )
        if "\n" in value or "\r" in value or "\0" in value:
            raise ConfigError(
                f"--env {key}=...: the value holds a line break or NUL, which cannot be passed "
                f"to the trainer; put it in a file in the dataset folder instead"
            )


def check_spec(spec: TrainSpec) -> None:
    """Command-line values that cannot work, caught before anything starts."""
    # nan passes every comparison below (nan < 0 is False), so it is refused first.
    for name, option in (
        ("lr", "--lr"),
        ("gamma", "--gamma"),
        ("max_hours", "--max-hours"),
        ("silence_minutes", "--silence-minutes"),
        ("budget", "--budget"),
        ("epoch_time_s", "--epoch-time"),
    ):
        if not math.isfinite(getattr(spec, name)):
            raise ConfigError(f"{option} must be a finite number, got {getattr(spec, name)}")
    for name in ("epochs", "batch_size", "step_size"):
        if getattr(spec, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(spec, name)}")
    if spec.gamma <= 0:
        raise ConfigError(f"--gamma must be positive (the lr is multiplied by it), got {spec.gamma}")
    if spec.budget < 0 or spec.epoch_time_s < 0:
        raise ConfigError("--budget and --epoch-time must be 0 (none) or more")
    if spec.budget > MAX_BUDGET:
        raise ConfigError(
            f"--budget {spec.budget:g} is over {MAX_BUDGET:g}; pass at most {MAX_BUDGET} "
            f"(in the host's currency), or 0 for none"
        )
    if spec.epoch_time_s > YEAR_S:
        raise ConfigError(
            f"--epoch-time {spec.epoch_time_s:g} is more than a year; pass at most {YEAR_S} seconds, "
            f"or 0 to estimate it from earlier runs"
        )
    if not 1 <= spec.stop_timeout_s <= MAX_STOP_TIMEOUT_S:
        raise ConfigError(
            f"--stop-timeout must be between 1 and {MAX_STOP_TIMEOUT_S} seconds, got {spec.stop_timeout_s}"
        )
    if spec.workers < -1:
        raise ConfigError(
            f"--workers must be -1 (from the host's cores), 0 (in the main process) or more, got {spec.workers}"
        )
    if spec.workers > MAX_WORKERS:
        raise ConfigError(
            f"--workers {spec.workers} is more than {MAX_WORKERS}; pass at most {MAX_WORKERS}, "
            f"or -1 to pick from the host's cores"
        )
    if not 0 <= spec.seed < 2**32:
        raise ConfigError(f"--seed must be between 0 and {2**32 - 1}, got {spec.seed}")
    if spec.cache_size != "auto" and spec.cache_size < 0:
        raise ConfigError(f"--cache-size must be 0 (no cache) or a size in pixels, got {spec.cache_size}")
    if spec.cache_size != "auto" and spec.cache_size and spec.cache_size < spec.image_size:
        raise ConfigError(
            f"--cache-size {spec.cache_size} is smaller than --image-size {spec.image_size}; use at least the image size"
        )
    if spec.image_size < 32:
        raise ConfigError(f"--image-size must be at least 32 pixels, got {spec.image_size}")
    if spec.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {spec.lr}")
    if spec.max_hours < 0 or spec.silence_minutes < 0:
        raise ConfigError("--max-hours and --silence-minutes must be 0 (no limit) or more")
    check_limit("--max-hours", spec.max_hours, 3600, "hours")
    check_limit("--silence-minutes", spec.silence_minutes, 60, "minutes")
    if spec.gpus < 0:
        raise ConfigError(f"--gpus must be 0 (CPU) or more, got {spec.gpus}")
    if spec.gpus > MAX_GPUS:
        raise ConfigError(
            f"--gpus {spec.gpus} is more than {MAX_GPUS}, more than one host has; "
            f"pass at most {MAX_GPUS} (the GPUs of each host)"
        )
    check_env(spec.extra_env)
    if spec.model not in CLASSIFICATION_MODELS:
        raise ConfigError(f"unknown --model {spec.model!r}; choose one of: {', '.join(CLASSIFICATION_MODELS)}")
    check_weights(spec.weights, spec.model)  # the file, or torchvision weights for the model (no network)
    check_runs_dir(spec.runs_dir)


def check_runs_dir(runs_dir: Path) -> None:
    """--runs-dir must be a folder this user can create run folders in; found out now, not after the run."""
    path = runs_dir.absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--runs-dir {runs_dir} is a file; pass a folder for the run outputs")
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--runs-dir {runs_dir} cannot be created: {existing} is not a folder; pass another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--runs-dir {runs_dir}: {existing} is not writable; pass a folder you can write")

"""gpu-run from Python (a notebook): the same launch as `gpu-run train`, returning a record of the run.

    import gpu_run
    run = gpu_run.train(host="t4-box", data="./gender_dataset",
                        command=["python", "train.py", "--epochs", "20", "--data_dir", "./gender_dataset"])
    run.status, run.cost, run.outputs

Without `command` it runs the built-in trainer, with its options as keywords (model="resnet50",
epochs=20, ...). Progress shows as it does in a terminal (Jupyter renders rich's display). Errors
the user can fix raise gpu_run.errors.GpuRunError with the one-line message the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from gpu_run import driver
from gpu_run.cache import parse_cache_size
from gpu_run.config import load_config
from gpu_run.errors import ConfigError
from gpu_run.ledger import Ledger
from gpu_run.paths import ledger_path
from gpu_run.spec import TRAINER_ONLY_FIELDS, TrainSpec
from gpu_run.ui import UI


@dataclass
class RunResult:
    """What a launch returns: the run's id, how it ended, where its outputs are, what it cost."""

    run_id: str
    status: str  # succeeded | failed | stopped | detached
    outputs: Path  # runs/<run-id>/ (a command's changed files in work/ inside it)
    cost: float | None
    currency: str | None
    machine_stopped: bool
    summary: dict  # summary.json as written (empty for a detached run)


def train(
    host: str = "local",
    data: str | Path | None = None,
    command: list[str] | None = None,
    project: str | Path | None = None,
    quiet: bool = False,
    **options,
) -> RunResult:
    """Launch a run and follow it to its end (or return at once with detach=True).

    `command` is the user's own job (run in a copy of `project`, default the current folder);
    `options` are TrainSpec's fields (epochs=20, budget=5.0, max_hours=2, env={"KEY": "v"}, ...)."""
    known = {f.name for f in fields(TrainSpec)} - {"host", "data", "command", "project", "extra_env"}
    unknown = sorted(set(options) - known - {"env"})
    if unknown:
        raise ConfigError(f"gpu_run.train() has no option {unknown[0]!r}; choose from: {', '.join(sorted(known))}")
    if command is not None:
        if isinstance(command, str):
            raise ConfigError("command must be a list of words, e.g. ['python', 'train.py', '--epochs', '20']")
        mixed = [name for name in TRAINER_ONLY_FIELDS if name in options]
        if mixed:
            raise ConfigError(
                f"{mixed[0]}= is an option of the built-in trainer and does nothing for your own "
                f"command; pass it to your script in command instead"
            )
    elif data is None:
        raise ConfigError("train() needs data= (an ImageFolder dataset) for the built-in trainer, or command=[...]")
    if "cache_size" in options:
        options["cache_size"] = parse_cache_size(str(options["cache_size"]))
    extra_env = dict(options.pop("env", {}) or {})
    for name in ("runs_dir",):
        if name in options:
            options[name] = Path(options[name])
    spec = TrainSpec(
        host=host,
        data=Path(data) if data is not None else None,
        command=list(command) if command else None,  # type: ignore[arg-type]
        project=Path(project or Path.cwd()) if command is not None else None,
        extra_env=extra_env,
        **options,
    )
    summary = driver.train(spec, load_config(), Ledger(ledger_path()), UI(quiet=quiet))
    cost = summary.get("cost") or {}
    return RunResult(
        run_id=summary["run_id"],
        status=summary["status"],
        outputs=Path(summary["run_dir"]),
        cost=cost.get("amount"),
        currency=cost.get("currency"),
        machine_stopped=bool((summary.get("stop") or {}).get("ok", summary["status"] == "detached")),
        summary=summary if "exit_code" in summary else {},
    )

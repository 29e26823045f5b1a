"""Before anything starts: a run's checks make a typed RunPlan, and the plan opens the run (its
folder under runs/, its ledger row). Every kind of run goes through here: a single run, a multi-node
run (its nodes priced as one host), and each point of a sweep; our trainer and a user's command.

Nothing here reaches a machine: what fails, fails before any money is spent.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gpu_run.cache import resolve_cache_size
from gpu_run.config import Host
from gpu_run.dataset import DatasetInfo, check_entries, validate_dataset
from gpu_run.errors import ConfigError
from gpu_run.ledger import Ledger, RunRecord
from gpu_run.model_zoo import IMAGENET_WEIGHTS
from gpu_run.money.budget import budget_limit_s, check_budget
from gpu_run.outputs import LAPTOP_WRITTEN, STATE_DIR, write_job_record
from gpu_run.project import Project, check_command, describe_command, scan_project
from gpu_run.spec import TrainSpec, check_spec
from gpu_run.trainer import defaults as recipe
from gpu_run.ui import UI
from gpu_run.weights import Weights, imagenet_weights, resolve_weights


@dataclass
class RunPlan:
    """What the checks decided. `host` prices and stops the run (for a multi-node run, its nodes as
    one host); `info` is the dataset (None for a command without --data), `project` a command's
    folder (None for our trainer)."""

    spec: TrainSpec
    host: Host
    info: DatasetInfo | None
    project: Project | None
    weights: Weights
    hub_files: list[str]
    budget_limit_s: int
    previous: RunRecord | None  # the run --resume continues

    @property
    def job_label(self) -> str:
        """What the ledger's model column shows: our trainer's model, or the command."""
        return describe_command(self.spec.command or []) if self.project is not None else self.spec.model

    def record(self, **more) -> dict:
        """What the ledger keeps of the plan (its args_json). --env values may be secrets
        (tokens): their names only."""
        spec, info = self.spec, self.info
        record = {
            "spec": {
                **asdict(spec),
                "data": str(info.root.resolve()) if info else None,
                "runs_dir": str(spec.runs_dir),
                "extra_env": sorted(spec.extra_env),
                "project": str(spec.project) if spec.project else None,
            },
            "weights": self.weights.record(),
            "classes": info.classes if info else [],
            "dataset": {"train_images": info.num_train, "val_images": info.num_val, "unreadable": len(info.unreadable)}
            if info and info.counts.get("train") is not None and self.project is None
            else {},
        }
        if self.project is not None:
            record.update(
                command=list(spec.command or []), project=str(self.project.root), data_rel=self.project.data_rel
            )
        return {**record, **more}


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


# The checks ------------------------------------------------------------------------------------


def plan_run(spec: TrainSpec, host: Host, ledger: Ledger, ui: UI, machines: list[Host] | None = None) -> RunPlan:
    """Every check a run makes before it spends money, in one place. `machines` are the hosts it
    runs on when they are not `host` itself (a multi-node run's nodes)."""
    with ui.timed("options and host checked"):
        check_spec(spec)
        for machine in machines or [host]:
            check_stop_setting(machine, spec.keep_alive, ui)
        previous = resume_source(ledger, spec) if spec.resume else None
    info, project, spec = check_inputs(spec, ledger, ui)
    with ui.timed("budget and weights"):
        if project is not None:
            limit_s = budget_limit_s(spec, host, ui) if spec.budget else 0
            if limit_s:
                ui.info(f"the budget is enforced as a runtime cap of {limit_s}s (the host's watchdog stops the job)")
            weights, hub_files = Weights("none"), hub_weight_files(spec.hub_weights, ui)
        else:
            if spec.hub_weights:
                raise ConfigError(
                    "--hub-weights is for your own command (after --); the built-in trainer takes --weights"
                )
            limit_s = check_budget(spec, host, info, ledger, ui)
            # The weights file is on the laptop (downloaded into its cache once) before anything starts.
            weights, hub_files = resolve_weights(spec.weights, spec.model, ui, resuming=bool(spec.resume)), []
    return RunPlan(
        spec=spec,
        host=host,
        info=info,
        project=project,
        weights=weights,
        hub_files=hub_files,
        budget_limit_s=limit_s,
        previous=previous,
    )


def check_inputs(spec: TrainSpec, ledger: Ledger, ui: UI) -> tuple[DatasetInfo | None, Project | None, TrainSpec]:
    """Our trainer's ImageFolder dataset (and the cache size), or a command's project and data; the
    spec with the cache size decided."""
    if spec.is_command:
        with ui.timed("command, project and data checked"):
            project, info = check_command_job(spec)
        # The script's transforms are its own: no resized copy unless asked for.
        return info, project, replace(spec, cache_size=0 if spec.cache_size == "auto" else spec.cache_size)
    with ui.timed("dataset checked"):
        info = check_dataset(spec.data, ui)
    with ui.timed("cache decided"):
        spec = decide_cache(spec, info, ui)
    return info, None, spec


def check_dataset(data: Path, ui: UI) -> DatasetInfo:
    with ui.progress("checking images", total=0) as update:
        info = validate_dataset(data, progress=lambda done, total: update(completed=done, total=total))
    if info.unreadable:
        shown = ", ".join(info.unreadable[:3]) + (" ..." if len(info.unreadable) > 3 else "")
        ui.warn(f"{len(info.unreadable)} unreadable image(s) will be skipped: {shown}")
    return info


def check_command_job(spec: TrainSpec) -> tuple[Project, DatasetInfo | None]:
    """A user's command: the command, its project folder (what would be sent), and --data (any
    folder the sync can send whole; its layout is the script's)."""
    root = (spec.project or Path.cwd()).resolve()
    check_command(spec.command or [], root)
    if spec.data is not None:
        if not spec.data.is_dir():
            raise ConfigError(f"--data {spec.data} is not a folder; pass the folder the command reads")
        check_entries(spec.data.resolve())
    project = scan_project(root, spec.data)
    info = DatasetInfo(root=spec.data.resolve(), classes=[], counts={}) if spec.data else None
    return project, info


def check_stop_setting(host: Host, keep_alive: bool, ui: UI) -> None:
    """A host gpu-run cannot stop must say so itself: never keep a paid box up by omission."""
    if host.kind == "ssh" and not host.stop_command and not keep_alive:
        raise ConfigError(
            f"host {host.name} has no stop_command, so nothing would stop it after the run; set "
            f'stop_command = "sudo shutdown -h now" (or what stops it), or stop_command = "none" if the box is yours '
            f"and never stops, in [hosts.{host.name}]"
        )
    if host.stop_command == "none" and not host.is_free:
        ui.warn(
            f"host {host.name} is never stopped (stop_command = none): it bills {host.price_per_hour} "
            f"{host.currency} an hour after this run too"
        )


def decide_cache(spec: TrainSpec, info: DatasetInfo, ui: UI) -> TrainSpec:
    """--cache-size auto: train on a copy at the size training reads when the photos are much
    larger (the upload and the host's decoding shrink with it); the spec then holds the number."""
    size, advice = resolve_cache_size(spec.cache_size, info.root, spec.image_size, spec.augment or recipe.AUGMENT)
    if advice is not None and advice.helps:
        ui.info(advice.message)
    return replace(spec, cache_size=size)


def hub_weight_files(models: list[str], ui: UI) -> list[str]:
    """--hub-weights: each model's torchvision ImageNet file on the laptop (fetched into its cache
    once, before anything starts), for TORCH_HOME on the host."""
    files = []
    for model in models:
        if not IMAGENET_WEIGHTS.get(model):
            raise ConfigError(
                f"--hub-weights {model}: torchvision has no ImageNet weights of that name; choose from "
                f"{', '.join(sorted(m for m, url in IMAGENET_WEIGHTS.items() if url))}"
            )
        files.append(str(imagenet_weights(model, ui)))
    return files


def resume_source(ledger: Ledger, spec: TrainSpec) -> RunRecord:
    """The run --resume names, refused before the new run's folder and ledger row exist: for our
    trainer one with a last.pth, for a command one of the user's own commands, pulled."""
    previous = ledger.get_run(spec.resume or "")
    if spec.is_command:
        if not previous.run_dir or not Path(previous.run_dir).is_dir() or previous.args.get("command") is None:
            raise ConfigError(
                f"run {previous.run_id} is not a run of your own command with pulled outputs; "
                f"--resume with a command continues such a run (`gpu-run pull {previous.run_id}` first)"
            )
        return previous
    if not previous.run_dir or not (Path(previous.run_dir) / "checkpoints" / "last.pth").is_file():
        raise ConfigError(
            f"run {previous.run_id} has no checkpoints/last.pth to resume from; `gpu-run pull {previous.run_id}` first"
        )
    return previous


# The run opened ---------------------------------------------------------------------------------


def open_run(plan: RunPlan, ledger: Ledger, host_name: str, run_id: str | None = None, **fields) -> RunRecord:
    """The run's folder and its ledger row, before anything starts on a machine: a resumed run's
    state is copied in first. `fields` are more ledger columns (a sweep point's), and
    `fields["plan_extra"]` more keys for the plan's record."""
    extra = fields.pop("plan_extra", {})
    run_id = run_id or new_run_id()
    run_dir = (plan.spec.runs_dir / run_id).resolve()
    run_dir.mkdir(parents=True)
    resumed_from = None
    if plan.project is not None:
        write_job_record(run_dir, plan.project.manifest, plan.spec.max_pull_mb)
        if plan.previous is not None:
            resumed_from = copy_command_resume_state(plan.previous, run_dir)
    elif plan.previous is not None:
        resumed_from = copy_resume_state(plan.previous, run_dir)
    record = plan.record(**extra)
    if resumed_from and "spec" in record:
        record["spec"]["resume"] = resumed_from
    ledger.create_run(
        run_id,
        host_name,
        model=plan.job_label,
        data_path=str(plan.info.root.resolve()) if plan.info else None,
        dataset_id=plan.info.dataset_id if plan.info else None,
        run_dir=str(run_dir),
        args_json=json.dumps(record),
        currency=plan.host.currency,
        resumed_from=resumed_from,
        **fields,
    )
    return ledger.get_run(run_id)


def seed_dir_of(plan: RunPlan, run: RunRecord) -> str | None:
    """The local folder a resumed run puts into its output folder on the machine first."""
    if not run.resumed_from:
        return None
    return str(Path(run.run_dir) / STATE_DIR / "seed-out") if plan.project is not None else run.run_dir


def copy_resume_state(previous: RunRecord, run_dir: Path) -> str:
    """Seed the new run folder with the stopped run's last.pth (and its history)."""
    source = Path(previous.run_dir)
    last = source / "checkpoints" / "last.pth"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy2(last, run_dir / "checkpoints" / "last.pth")
    for name in ("checkpoints/best.pth", "metrics.jsonl", "predictions.csv"):
        if (source / name).is_file():
            shutil.copy2(source / name, run_dir / name)
    return previous.run_id


def copy_command_resume_state(previous: RunRecord, run_dir: Path) -> str:
    """What the stopped run's command wrote, into the new run: its working directory's files go
    into the new working directory (so `--resume checkpoint.pth` finds its file), its
    GPU_RUN_OUTPUT into the new one."""
    source = Path(previous.run_dir)
    if (source / "work").is_dir():
        shutil.copytree(source / "work", run_dir / "work", dirs_exist_ok=True)
    seed = run_dir / STATE_DIR / "seed-out"
    seed.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name in LAPTOP_WRITTEN or entry.name.startswith("."):
            continue
        for target in (run_dir / entry.name, seed / entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, target, dirs_exist_ok=True)
            elif entry.is_file():
                shutil.copy2(entry, target)
    return previous.run_id

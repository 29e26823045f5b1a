"""A training run from spec to ledger: check, plan, connect, build, start, follow, pull, record.

Data flows one way: a TrainSpec and the Config become a plan (what will run where, recorded in
the ledger before anything starts), the plan's actions go through a Backend, and every outcome
lands in the Ledger and in runs/<run-id>/summary.json.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path

from gpu_run.backends import Backend, Job, RunHandle, backend_for_run, bring_up
from gpu_run.providers.base import StopResult
from gpu_run.cache import cached_dataset
from gpu_run.config import Config, Host
from gpu_run.cost import billed_seconds, budget_seconds, cost_of, format_money
from gpu_run.dataset import DatasetInfo, validate_dataset
from gpu_run.errors import BackendError, ConfigError, GpuRunError, Unreachable
from gpu_run.events import read_metrics, status_for_exit
from gpu_run.ledger import ACTIVE_STATUSES, FINAL_STATUSES, Ledger, RunRecord
from gpu_run.ui import UI, TrainingDisplay
from gpu_run.weights import check_weights, resolve_weights

STOP_TIMEOUT_S = 120  # time the trainer gets to finish its step and write last.pth
MAX_STOP_TIMEOUT_S = 3600  # a stop that waits longer than this is a hang, and the host bills meanwhile
SETUP_ESTIMATE_S = 120  # connect, sync and build, for the budget estimate
BUDGET_MARGIN_S = 10  # slack between the watchdog's deadline and the budget's


class Detached(Exception):
    """The user pressed Ctrl-C while following: the run goes on without us."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


@dataclass
class TrainSpec:
    """What the user asked `gpu-run train` for."""

    host: str
    data: Path
    model: str = "resnet18"
    weights: str = "imagenet"  # the seed recipe: transfer learning from torchvision's ImageNet weights
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    step_size: int = 5
    gamma: float = 0.5
    image_size: int = 224
    augment: str | None = None  # standard | light | none; None: standard, or the resumed run's
    no_flip: bool = False  # True: no horizontal flip; a resumed run keeps the flip choice it had
    workers: int = -1
    seed: int = 0
    gpus: int = 1
    amp: str = "auto"
    compile: bool = False
    cache_size: int = 0  # >0: train on a copy resized to this short side (made once, on the laptop)
    detach: bool = False
    max_hours: float = 0.0  # 0: no limit; enforced by the watchdog on the host
    silence_minutes: float = 0.0  # 0: no limit; a job that logs nothing this long is stopped
    stop_timeout_s: int = 120
    keep_alive: bool = False
    terminate: bool = False
    budget: float = 0.0  # in the host's currency; 0: none
    epoch_time_s: float = 0.0  # a known time per epoch, for the budget estimate
    force: bool = False  # start even when the estimate is over the budget
    accept_new_host_key: bool = False
    runs_dir: Path = Path("runs")
    resume: str | None = None  # a run id whose last.pth this run continues from
    extra_env: dict = field(default_factory=dict)

    def trainer_args(self) -> list[str]:
        args = [
            "--model", self.model, "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
            "--lr", str(self.lr), "--step-size", str(self.step_size), "--gamma", str(self.gamma),
            "--image-size", str(self.image_size), "--workers", str(self.workers), "--seed", str(self.seed),
            "--amp", self.amp,
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


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_spec(spec: TrainSpec) -> None:
    """Command-line values that cannot work, caught before anything starts."""
    # nan passes every comparison below (nan < 0 is False), so it is refused first.
    for name, option in (("lr", "--lr"), ("gamma", "--gamma"), ("max_hours", "--max-hours"),
                         ("silence_minutes", "--silence-minutes"), ("budget", "--budget"),
                         ("epoch_time_s", "--epoch-time")):
        if not math.isfinite(getattr(spec, name)):
            raise ConfigError(f"{option} must be a finite number, got {getattr(spec, name)}")
    for name in ("epochs", "batch_size", "step_size"):
        if getattr(spec, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(spec, name)}")
    if spec.gamma <= 0:
        raise ConfigError(f"--gamma must be positive (the lr is multiplied by it), got {spec.gamma}")
    if spec.budget < 0 or spec.epoch_time_s < 0:
        raise ConfigError("--budget and --epoch-time must be 0 (none) or more")
    if not 1 <= spec.stop_timeout_s <= MAX_STOP_TIMEOUT_S:
        raise ConfigError(f"--stop-timeout must be between 1 and {MAX_STOP_TIMEOUT_S} seconds, got {spec.stop_timeout_s}")
    if spec.workers < -1:
        raise ConfigError(f"--workers must be -1 (from the host's cores), 0 (in the main process) or more, got {spec.workers}")
    if not 0 <= spec.seed < 2**32:
        raise ConfigError(f"--seed must be between 0 and {2**32 - 1}, got {spec.seed}")
    if spec.cache_size < 0:
        raise ConfigError(f"--cache-size must be 0 (no cache) or a size in pixels, got {spec.cache_size}")
    if spec.cache_size and spec.cache_size < spec.image_size:
        raise ConfigError(f"--cache-size {spec.cache_size} is smaller than --image-size {spec.image_size}; use at least the image size")
    if spec.image_size < 32:
        raise ConfigError(f"--image-size must be at least 32 pixels, got {spec.image_size}")
    if spec.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {spec.lr}")
    if spec.max_hours < 0 or spec.silence_minutes < 0:
        raise ConfigError("--max-hours and --silence-minutes must be 0 (no limit) or more")
    if spec.gpus < 0:
        raise ConfigError(f"--gpus must be 0 (CPU) or more, got {spec.gpus}")
    import torchvision  # imported here: only train needs it, and it takes a second

    models = torchvision.models.list_models(module=torchvision.models)
    if spec.model not in models:
        raise ConfigError(f"unknown --model {spec.model!r}; choose one of: {', '.join(sorted(models))}")
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


def check_dataset(data: Path, ui: UI) -> DatasetInfo:
    with ui.progress("checking images", total=0) as update:
        info = validate_dataset(data, progress=lambda done, total: update(completed=done, total=total))
    if info.unreadable:
        shown = ", ".join(info.unreadable[:3]) + (" ..." if len(info.unreadable) > 3 else "")
        ui.warn(f"{len(info.unreadable)} unreadable image(s) will be skipped: {shown}")
    return info


def resume_source(ledger: Ledger, resume: str) -> RunRecord:
    """The run --resume names, refused before the new run's folder and ledger row exist."""
    previous = ledger.get_run(resume)
    if not previous.run_dir or not (Path(previous.run_dir) / "checkpoints" / "last.pth").is_file():
        raise ConfigError(f"run {previous.run_id} has no checkpoints/last.pth to resume from; `gpu-run pull {previous.run_id}` first")
    return previous


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


def measured_epoch_time(ledger: Ledger, host: str, model: str, dataset: str) -> float | None:
    """Median time per epoch of earlier runs of this model on this dataset and host."""
    times = []
    for run in ledger.list_runs(host=host, limit=20):
        if run.model == model and run.dataset_id == dataset and run.run_dir:
            path = Path(run.run_dir) / "metrics.jsonl"
            if path.is_file():
                times += [m["epoch_time_s"] for m in read_metrics(path.read_text())]
    return sorted(times)[len(times) // 2] if times else None


def check_budget(spec: TrainSpec, host: Host, info: DatasetInfo, ledger: Ledger, ui: UI) -> int:
    """Refuse, before anything starts, a run that cannot fit the budget; return its billable seconds."""
    if not spec.budget:
        return 0
    if host.is_free:
        ui.warn(f"host {host.name} costs nothing; --budget has no effect")
        return 0
    limit_s = budget_seconds(spec.budget, host.price_per_hour, host.billing, host.min_billed_s)
    needed_s = host.grace_s + spec.stop_timeout_s + BUDGET_MARGIN_S + 30
    if limit_s < needed_s:
        raise ConfigError(f"--budget {spec.budget} {host.currency} buys {limit_s}s on {host.name}, less than the "
                          f"{needed_s}s that stopping safely needs; raise the budget")
    epoch_s = spec.epoch_time_s or measured_epoch_time(ledger, host.name, spec.model, info.dataset_id)
    if epoch_s:
        estimate_s = spec.epochs * epoch_s + SETUP_ESTIMATE_S + host.grace_s
        estimate = cost_of(estimate_s, host.price_per_hour, host.billing, host.min_billed_s)
        if estimate > Decimal(str(spec.budget)) and not spec.force:
            raise ConfigError(
                f"estimated cost {format_money(estimate, host.currency)} ({spec.epochs} epochs x {epoch_s:.0f}s "
                f"+ setup and grace) is over the budget of {spec.budget} {host.currency}; raise --budget, "
                f"lower --epochs, or add --force to run until the budget stops it"
            )
        ui.info(f"estimated cost {format_money(estimate, host.currency)} of a {spec.budget} {host.currency} budget")
    else:
        ui.info(f"no time per epoch known yet for {spec.model} on this dataset and host; "
                f"the budget is enforced as a runtime cap of {limit_s}s")
    return limit_s


def watchdog_max_runtime_s(spec: TrainSpec, host: Host, budget_limit_s: int, billed_from: float | None) -> int:
    """The tighter of --max-hours and what the budget leaves once setup is paid and the end is provided for."""
    limits = [int(spec.max_hours * 3600)] if spec.max_hours else []
    if budget_limit_s:
        spent = time.time() - (billed_from or time.time())
        limits.append(max(1, int(budget_limit_s - spent - host.grace_s - spec.stop_timeout_s - BUDGET_MARGIN_S)))
    return min(limits) if limits else 0


def run_cost(host: Host, run: RunRecord, now: float | None = None) -> tuple[Decimal, int]:
    """Amount and billed seconds of a run, so far if it has not ended."""
    if run.billed_from is None:
        return Decimal("0.00"), 0
    end = run.billed_to if run.billed_to is not None else (now or time.time())
    span = max(0.0, end - run.billed_from)
    return cost_of(span, host.price_per_hour, host.billing, host.min_billed_s), billed_seconds(span, host.billing, host.min_billed_s)


def check_stop_setting(host: Host, keep_alive: bool, ui: UI) -> None:
    """A host gpu-run cannot stop must say so itself: never keep a paid box up by omission."""
    if host.kind == "ssh" and not host.stop_command and not keep_alive:
        raise ConfigError(
            f"host {host.name} has no stop_command, so nothing would stop it after the run; set "
            f'stop_command = "sudo shutdown -h now" (or what stops it), or stop_command = "none" if the box is yours '
            f"and never stops, in [hosts.{host.name}]"
        )
    if host.stop_command == "none" and not host.is_free:
        ui.warn(f"host {host.name} is never stopped (stop_command = none): it bills {host.price_per_hour} "
                f"{host.currency} an hour after this run too")


def train(spec: TrainSpec, config: Config, ledger: Ledger, ui: UI) -> dict:
    host = config.host(spec.host)
    check_spec(spec)
    check_stop_setting(host, spec.keep_alive, ui)
    previous = resume_source(ledger, spec.resume) if spec.resume else None
    info = check_dataset(spec.data, ui)
    budget_limit_s = check_budget(spec, host, info, ledger, ui)
    # The weights file is on the laptop (downloaded into its cache once) before anything starts.
    weights = resolve_weights(spec.weights, spec.model, ui, resuming=bool(spec.resume))

    run_id = new_run_id()
    run_dir = (spec.runs_dir / run_id).resolve()
    run_dir.mkdir(parents=True)
    resumed_from = copy_resume_state(previous, run_dir) if previous else None
    plan = {
        # --env values may be secrets (tokens): the ledger keeps their names only.
        "spec": {**asdict(spec), "data": str(info.root.resolve()), "runs_dir": str(spec.runs_dir),
                 "extra_env": sorted(spec.extra_env)},
        "weights": weights.record(),
        "classes": info.classes,
        "dataset": {"train_images": info.num_train, "val_images": info.num_val, "unreadable": len(info.unreadable)},
    }
    ledger.create_run(
        run_id, host.name, model=spec.model, data_path=str(info.root.resolve()), dataset_id=info.dataset_id,
        run_dir=str(run_dir), args_json=json.dumps(plan), currency=host.currency, resumed_from=resumed_from,
    )
    ui.info(f"run {run_id} on host {host.name}: {spec.model}, {len(info.classes)} classes, "
            f"{info.num_train} train / {info.num_val} val images -> {run_dir}")

    backend: Backend | None = None
    try:
        # Billing starts with the run's first action on the machine.
        billed_from = None if host.is_free else time.time()
        ledger.update_run(run_id, billed_from=billed_from)
        with ledger.phase(run_id, "connect"):
            backend = bring_up(host, ui, spec.accept_new_host_key)
            backend.check_stop(spec.keep_alive, ui)  # before the claim: nothing of ours is on the host yet
            backend.claim(run_id, spec.keep_alive)
        ledger.update_run(run_id, backend=backend.name)
        ui.info(f"backend: {backend.describe()}")
        # The image first: the S3 path fetches the dataset on the host with a helper in it.
        with ledger.phase(run_id, "build"):
            prepared = backend.prepare(ui)
        ledger.update_run(run_id, image_tag=prepared.image_tag)
        data_root, data_id = info.root.resolve(), info.dataset_id
        if spec.cache_size:
            with ui.progress(f"resizing images to a short side of {spec.cache_size} px", total=0) as update:
                data_root = cached_dataset(data_root, spec.cache_size, progress=update)
            data_id = f"{data_id}-s{spec.cache_size}"
        with ledger.phase(run_id, "sync"):
            data_dir = backend.stage_data(data_root, data_id, ui)
        job = Job(
            run_id=run_id, trainer_args=spec.trainer_args(), data_dir=data_dir,
            out_dir=backend.out_dir_for(run_id, run_dir),
            weights=str(weights.path) if weights.path else "none",
            gpus=spec.gpus, env=dict(spec.extra_env),
            max_runtime_s=watchdog_max_runtime_s(spec, host, budget_limit_s, billed_from),
            silence_s=int(spec.silence_minutes * 60),
            stop_timeout_s=spec.stop_timeout_s, keep_alive=spec.keep_alive, terminate=spec.terminate,
            seed_dir=str(run_dir) if resumed_from else None,
        )
        ledger.start_phase(run_id, "train")
        handle = backend.start(job, prepared, ui)
        handle.image_built, handle.device = prepared.image_built, prepared.device
        ledger.update_run(run_id, handle_json=handle.to_json(), status="running")
    except BaseException as e:
        # Nothing runs yet: the machine must not stay up (and bill) because setup failed.
        ledger.update_run(run_id, status="failed", ended_at=time.time())
        if isinstance(e, GpuRunError):
            ledger.end_phase(run_id, "train", "failed", str(e))
        if backend is not None:
            try:
                record_stop(ledger, run_id, backend.abort(ui, spec.keep_alive), billed_from)
            except Exception as abort_error:  # the setup's own error is the one to show
                ledger.update_run(run_id, stop_status="unconfirmed", stop_detail=str(abort_error))
                ui.error(f"NOT STOPPED: could not release {host.name} after the failed setup ({abort_error})")
        elif billed_from:
            ledger.update_run(run_id, billed_to=time.time())  # never reached: nothing of ours runs there
        raise

    if spec.detach:
        ledger.update_run(run_id, status="detached")
        ui.info(f"started detached. Follow with: gpu-run attach {run_id}")
        return {"run_id": run_id, "status": "detached", "run_dir": str(run_dir)}
    return follow_and_finish(ledger.get_run(run_id), host, backend, ledger, ui)


def follow_and_finish(run: RunRecord, host: Host, backend: Backend, ledger: Ledger, ui: UI) -> dict:
    """Show the live display until the trainer ends, then pull, record and summarise.

    Ctrl-C raises Detached: the run goes on and `gpu-run attach` picks it up again.
    """
    run_dir = Path(run.run_dir)
    handle = handle_of(run)

    def cost_line() -> str:
        if host.is_free:
            return ""
        amount, _ = run_cost(host, ledger.get_run(run.run_id))
        return format_money(amount, host.currency)

    ledger.update_run(run.run_id, status="running")
    try:
        backend.ensure_watchdog(handle, ui)
        with TrainingDisplay(ui, cost_line) as display, open(run_dir / "train.log", "w") as log:
            # Replaying from the start rewrites train.log whole, so an attach never duplicates lines.
            for line in backend.follow_logs(handle):
                log.write(line + "\n")
                log.flush()
                display.feed(line)
        exit_code = backend.wait(handle)
    except KeyboardInterrupt:
        ledger.update_run(run.run_id, status="detached")
        raise Detached(run.run_id) from None
    except GpuRunError:
        # The client lost the host, not the run: the watchdog still stops the machine.
        ledger.update_run(run.run_id, status="detached")
        raise
    return finish_run(run, host, backend, exit_code, ledger, ui)


def finish_run(run: RunRecord, host: Host, backend: Backend, exit_code: int, ledger: Ledger, ui: UI) -> dict:
    run_dir = Path(run.run_dir)
    ended = time.time()
    status = status_for_exit(exit_code)
    ledger.end_phase(run.run_id, "train", "ok" if status != "failed" else "failed", f"exit code {exit_code}", at=ended)
    with ledger.phase(run.run_id, "pull"):
        ended_info = backend.finish(handle_of(run), run_dir, ui)
    with ledger.phase(run.run_id, "stop"):
        stop_result = backend.release(handle_of(run), ui)
        record_stop(ledger, run.run_id, stop_result, run.billed_from)
    missing = [p for p in ("checkpoints/last.pth", "metrics.jsonl") if not (run_dir / p).is_file()]
    if status == "succeeded" and missing:
        status = "failed"
        ui.error(f"the trainer exited 0 but {', '.join(missing)} did not arrive in {run_dir}")
    summary = build_summary(ledger.get_run(run.run_id), host, status, exit_code, ended)
    summary.update(ended_info)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ledger.update_run(
        run.run_id, status=status, exit_code=exit_code, ended_at=ended, summary_json=json.dumps(summary),
        best_val_acc=summary["best_val_acc"], cost_amount=summary["cost"]["amount"],
    )
    return summary


def handle_of(run: RunRecord) -> RunHandle:
    """The run's handle from the ledger (an empty one for a run that never started its trainer)."""
    return RunHandle.from_json(run.handle_json) or RunHandle()


def record_stop(ledger: Ledger, run_id: str, result: StopResult, billed_from: float | None) -> None:
    """The machine's end, in the ledger: billing closes only on a confirmed stop (or when nothing
    bills); a failed or unconfirmed stop leaves it open until `gpu-run stop RUN` confirms one."""
    fields: dict = {"stop_status": result.state, "stop_detail": result.detail}
    if billed_from is not None and result.ok:
        fields["billed_to"] = result.at or time.time()
    ledger.update_run(run_id, **fields)


def build_summary(run: RunRecord, host: Host, status: str, exit_code: int, ended: float) -> dict:
    run_dir = Path(run.run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    metrics = read_metrics(metrics_path.read_text()) if metrics_path.is_file() else []
    plan = run.args
    amount, billed = run_cost(host, run, now=ended)
    handle = handle_of(run)
    return {
        "run_id": run.run_id,
        "host": run.host,
        "backend": run.backend,
        "device": handle.device or None,
        "model": run.model,
        "classes": plan.get("classes", []),
        "epochs": plan.get("spec", {}).get("epochs"),
        "epochs_completed": metrics[-1]["epoch"] if metrics else 0,
        "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
        "final_val_acc": metrics[-1]["val_acc"] if metrics else None,
        "status": status,
        "exit_code": exit_code,
        "duration_s": round(ended - run.created_at, 3),
        "image_tag": run.image_tag,
        "image_built": handle.image_built,
        "runtime": handle.runtime or None,
        "versions": handle.versions or None,
        "weights": plan.get("weights"),
        "dataset": {"path": run.data_path, "id": run.dataset_id, **plan.get("dataset", {})},
        "cost": {"amount": float(amount), "currency": host.currency, "billed_s": billed},
        "resumed_from": run.resumed_from,
        "run_dir": str(run_dir),
        "stop": {"ok": not run.stop_failed, "state": run.stop_status, "detail": run.stop_detail},
    }


# Commands on an existing run -------------------------------------------------------------------


def reconnect(run_id: str, config: Config, ledger: Ledger, ui: UI) -> tuple[RunRecord, Host, Backend | None]:
    """A run with its host and, while it is active, its backend reconnected (None once it ended)."""
    run = ledger.get_run(run_id)
    host = config.host(run.host)
    if run.status not in ACTIVE_STATUSES:
        ui.info(f"run {run.run_id} already ended ({run.status})")
        return run, host, None
    return run, host, backend_for_run(host, handle_of(run), ui)


def settle_abandoned_setup(run: RunRecord, host: Host, ledger: Ledger, ui: UI) -> dict:
    """The laptop died while preparing the run (no trainer started). The host's watchdog releases
    the machine once the laptop goes quiet; record the run as failed and confirm that stop."""
    ui.warn(f"run {run.run_id} never started: the laptop stopped during its setup")
    ledger.update_run(run.run_id, status="failed", ended_at=time.time())
    for phase in ledger.phases(run.run_id):
        if phase.ended_at is None:
            ledger.end_phase(run.run_id, phase.phase, "failed", "the laptop stopped during setup")
    try:
        result = backend_for_run(host, RunHandle(backend="" if host.is_local else "ssh"), ui).abandon(run.run_id, ui)
    except Unreachable as e:
        result = StopResult(True, "stopped", time.time(), f"{host.name} is down ({e})")
    record_stop(ledger, run.run_id, result, run.billed_from)
    return {"run_id": run.run_id, "status": "failed", "run_dir": run.run_dir, "stop": result.as_dict()}


def attach(run_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    run = ledger.get_run(run_id)
    if run.status == "created":
        return settle_abandoned_setup(run, config.host(run.host), ledger, ui)
    run, host, backend = reconnect(run_id, config, ledger, ui)
    if backend is None:
        return run.summary or {"run_id": run.run_id, "status": run.status}
    return follow_and_finish(run, host, backend, ledger, ui)


def stop(run_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    """Ask the trainer to stop (it writes last.pth), then pull and record, as at a normal end.
    A run that ended but whose machine was not confirmed stopped gets its stop tried again."""
    run = ledger.get_run(run_id)
    if run.status not in ACTIVE_STATUSES and run.stop_failed:
        return retry_stop(run, config.host(run.host), ledger, ui)
    run, host, backend = reconnect(run_id, config, ledger, ui)
    if backend is None:
        return run.summary or {"run_id": run.run_id, "status": run.status}
    with ui.spinner(f"stopping {run.run_id}: the trainer finishes its step and saves last.pth"):
        backend.stop(handle_of(run), STOP_TIMEOUT_S)
        exit_code = backend.wait(handle_of(run))
    # Keep the log as it was at the end, as a followed run would have.
    (Path(run.run_dir) / "train.log").write_text("".join(line + "\n" for line in backend.read_logs(handle_of(run))))
    return finish_run(run, host, backend, exit_code, ledger, ui)


def retry_stop(run: RunRecord, host: Host, ledger: Ledger, ui: UI) -> dict:
    """Stop the machine of an ended run whose stop failed; a confirmed stop closes its billing."""
    ui.warn(f"the machine of run {run.run_id} was not confirmed stopped ({run.stop_detail}); trying again")
    try:
        backend = backend_for_run(host, handle_of(run), ui)
    except Unreachable as e:
        # An instance the API says is not running, or a box that no longer answers.
        backend = None
        result = StopResult(True, "stopped", time.time(), f"{host.name} is down ({e})")
    if backend is not None:
        result = backend.retry_stop(handle_of(run), ui)
    record_stop(ledger, run.run_id, result, run.billed_from)
    run = ledger.get_run(run.run_id)
    summary = run.summary
    if not summary:  # a run whose setup failed has no summary: say what its machine did
        return {"run_id": run.run_id, "status": run.status, "run_dir": run.run_dir, "stop": result.as_dict()}
    fresh = build_summary(run, host, summary["status"], summary.get("exit_code"), run.ended_at or time.time())
    summary.update(cost=fresh["cost"], stop=fresh["stop"])
    (Path(run.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ledger.update_run(run.run_id, summary_json=json.dumps(summary), cost_amount=summary["cost"]["amount"])
    return summary


def pull(run_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    """Fetch what the run has produced; a run whose trainer ended is finished as at a normal end.
    When the host is gone and it synced through S3, the outputs come from S3 instead."""
    run = ledger.get_run(run_id)
    host = config.host(run.host)
    try:
        backend = backend_for_run(host, handle_of(run), ui)
    except BackendError as e:
        if host.sync != "s3":
            raise
        ui.warn(f"{e}; fetching the outputs from S3 instead")
        return pull_from_s3(run, host, ledger, ui)
    if run.status in ACTIVE_STATUSES:
        code = backend.exit_code(handle_of(run))
        if code is not None:
            return finish_run(run, host, backend, code, ledger, ui)
    backend.pull(handle_of(run), Path(run.run_dir), ui)
    return {"run_id": run.run_id, "status": run.status, "run_dir": run.run_dir}


def pull_from_s3(run: RunRecord, host: Host, ledger: Ledger, ui: UI) -> dict:
    from gpu_run.sync.s3 import S3Store

    run_dir = Path(run.run_dir)
    with ui.spinner(f"downloading {run.run_id} from S3"):
        count = S3Store(host).download_run(run.run_id, run_dir)
    ui.info(f"fetched {count} file(s) from S3 (sha256 verified)")
    if run.status in FINAL_STATUSES:
        return run.summary or {"run_id": run.run_id, "status": run.status, "run_dir": str(run_dir)}
    # The host is gone with its exit code; the checkpoint tells whether every epoch ran.
    import torch

    last = run_dir / "checkpoints" / "last.pth"
    epochs_done = torch.load(last, map_location="cpu", weights_only=True)["epoch"] if last.is_file() else 0
    status = "succeeded" if epochs_done >= run.args.get("spec", {}).get("epochs", 0) else "stopped"
    ended = time.time()
    if run.billed_from is not None and run.billed_to is None:
        ledger.update_run(run.run_id, billed_to=ended)
    summary = build_summary(ledger.get_run(run.run_id), host, status, None, ended)
    summary["pulled_from"] = "s3"
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ledger.update_run(run.run_id, status=status, ended_at=ended, summary_json=json.dumps(summary),
                      best_val_acc=summary["best_val_acc"], cost_amount=summary["cost"]["amount"])
    return summary


def live_status(run_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    run = ledger.get_run(run_id)
    state = {
        "run_id": run.run_id, "host": run.host, "backend": run.backend, "model": run.model,
        "status": run.status, "exit_code": run.exit_code, "best_val_acc": run.best_val_acc,
        "created_at": run.created_at, "ended_at": run.ended_at, "run_dir": run.run_dir,
        "stop": {"ok": not run.stop_failed, "state": run.stop_status, "detail": run.stop_detail},
        "phases": [
            {"phase": p.phase, "status": p.status, "started_at": p.started_at, "ended_at": p.ended_at,
             "duration_s": p.duration_s}
            for p in ledger.phases(run.run_id)
        ],
    }
    if run.status in ACTIVE_STATUSES and run.handle_json:
        host = config.host(run.host)
        try:
            backend = backend_for_run(host, handle_of(run), ui)
            code = backend.exit_code(handle_of(run))
            state["trainer"] = "running" if code is None else f"ended with exit code {code} (attach to pull)"
        except GpuRunError as e:
            state["trainer"] = f"unknown: {e}"
        metrics_path = Path(run.run_dir) / "metrics.jsonl"
        if metrics_path.is_file():
            metrics = read_metrics(metrics_path.read_text())
            if metrics:
                state["last_epoch"] = metrics[-1]
    return state


def log_lines(run_id: str, follow: bool, config: Config, ledger: Ledger, ui: UI):
    """The run's log: from the backend while the run is live, else the saved train.log."""
    run = ledger.get_run(run_id)
    saved = Path(run.run_dir or "") / "train.log"
    if run.status in ACTIVE_STATUSES and run.handle_json:
        backend = backend_for_run(config.host(run.host), handle_of(run), ui)
        yield from backend.follow_logs(handle_of(run)) if follow else backend.read_logs(handle_of(run))
        return
    if not saved.is_file():
        raise GpuRunError(f"run {run.run_id} has no train.log in {run.run_dir}")
    yield from saved.read_text().splitlines()

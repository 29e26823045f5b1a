"""`gpu-run train`: from a spec to a running job, then to its end.

Data flows one way: a TrainSpec and the Config become a plan (what will run where, recorded in
the ledger before anything starts), the plan's actions go through a Backend, and the end is
recorded by run_end in the Ledger and in runs/<run-id>/summary.json.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from gpu_run.backends import Backend, Job, bring_up
from gpu_run.cache import cached_dataset, resolve_cache_size
from gpu_run.config import Config, Host
from gpu_run.dataset import DatasetInfo, check_entries, validate_dataset
from gpu_run.errors import ConfigError, GpuRunError
from gpu_run.ledger import Ledger, RunRecord
from gpu_run.money.budget import budget_limit_s as budget_limit_s_of
from gpu_run.money.budget import check_budget, watchdog_max_runtime_s
from gpu_run.outputs import LAPTOP_WRITTEN, STATE_DIR, write_job_record
from gpu_run.project import Project, check_command, describe_command, scan_project
from gpu_run.run_end import follow_and_finish, record_stop
from gpu_run.spec import TrainSpec, check_spec
from gpu_run.trainer import defaults as recipe
from gpu_run.ui import UI
from gpu_run.model_zoo import IMAGENET_WEIGHTS
from gpu_run.weights import Weights, imagenet_weights, resolve_weights


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)

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

def plan_record(spec: TrainSpec, info: DatasetInfo | None, weights: Weights, **more) -> dict:
    """What the ledger keeps of a run's plan (its args_json): the spec, the weights, the dataset."""
    return {
        # --env values may be secrets (tokens): the ledger keeps their names only.
        "spec": {**asdict(spec), "data": str(info.root.resolve()) if info else None, "runs_dir": str(spec.runs_dir),
                 "extra_env": sorted(spec.extra_env), "project": str(spec.project) if spec.project else None},
        "weights": weights.record(),
        "classes": info.classes if info else [],
        "dataset": {"train_images": info.num_train, "val_images": info.num_val, "unreadable": len(info.unreadable)}
        if info else {},
        **more,
    }

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

def decide_cache(spec: TrainSpec, info: DatasetInfo, ui: UI) -> TrainSpec:
    """--cache-size auto: train on a copy at the size training reads when the photos are much
    larger (the upload and the host's decoding shrink with it); the spec then holds the number."""
    size, advice = resolve_cache_size(spec.cache_size, info.root, spec.image_size, spec.augment or recipe.AUGMENT)
    if advice is not None and advice.helps:
        ui.info(advice.message)
    return replace(spec, cache_size=size)


def check_command_job(spec: TrainSpec, host: Host, ledger: Ledger, ui: UI) -> tuple[Project, DatasetInfo | None]:
    """A user's command, checked before anything starts: the command, its project folder (what
    would be sent), and --data (any folder the sync can send whole; its layout is the script's)."""
    root = (spec.project or Path.cwd()).resolve()
    check_command(spec.command or [], root)
    if spec.data is not None:
        if not spec.data.is_dir():
            raise ConfigError(f"--data {spec.data} is not a folder; pass the folder the command reads")
        check_entries(spec.data.resolve())
    project = scan_project(root, spec.data)
    info = DatasetInfo(root=spec.data.resolve(), classes=[], counts={"train": {}, "val": {}}) if spec.data else None
    return project, info


def hub_weight_files(models: list[str], ui: UI) -> list[str]:
    """--hub-weights: each model's torchvision ImageNet file on the laptop (fetched into its cache
    once, before anything starts), for TORCH_HOME on the host."""
    files = []
    for model in models:
        if not IMAGENET_WEIGHTS.get(model):
            raise ConfigError(f"--hub-weights {model}: torchvision has no ImageNet weights of that name; choose from "
                              f"{', '.join(sorted(m for m, url in IMAGENET_WEIGHTS.items() if url))}")
        files.append(str(imagenet_weights(model, ui)))
    return files


def command_resume_source(ledger: Ledger, resume: str) -> RunRecord:
    """The run --resume names for a command: one of the user's own commands, pulled."""
    previous = ledger.get_run(resume)
    if not previous.run_dir or not Path(previous.run_dir).is_dir() or previous.args.get("command") is None:
        raise ConfigError(f"run {previous.run_id} is not a run of your own command with pulled outputs; "
                          f"--resume with a command continues such a run (`gpu-run pull {previous.run_id}` first)")
    return previous


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


def train(spec: TrainSpec, config: Config, ledger: Ledger, ui: UI) -> dict:
    group = config.group(spec.host)
    if group is not None:  # several hosts: one job over all of them, through torchrun
        if spec.is_command:
            raise ConfigError("a command of your own on several hosts (--host a,b) is not supported yet; "
                              "run it on one host, or use the built-in trainer for a multi-node job")
        from gpu_run.multinode.start import train_nodes

        return train_nodes(spec, group, config, ledger, ui)
    project: Project | None = None
    with ui.timed("options and host checked"):
        host = config.host(spec.host)
        check_spec(spec)
        check_stop_setting(host, spec.keep_alive, ui)
        if spec.is_command:
            previous = command_resume_source(ledger, spec.resume) if spec.resume else None
        else:
            previous = resume_source(ledger, spec.resume) if spec.resume else None
    if spec.is_command:
        with ui.timed("command, project and data checked"):
            project, info = check_command_job(spec, host, ledger, ui)
            # The script's transforms are its own: no resized copy unless asked for.
            spec = replace(spec, cache_size=0 if spec.cache_size == "auto" else spec.cache_size)
            budget_limit_s = budget_limit_s_of(spec, host, ui) if spec.budget else 0
            if budget_limit_s:
                ui.info(f"the budget is enforced as a runtime cap of {budget_limit_s}s (the host's watchdog stops the job)")
            weights = Weights("none")
            hub_files = hub_weight_files(spec.hub_weights, ui)
    else:
        if spec.hub_weights:
            raise ConfigError("--hub-weights is for your own command (after --); the built-in trainer takes --weights")
        hub_files = []
        with ui.timed("dataset checked"):
            info = check_dataset(spec.data, ui)
        with ui.timed("cache decided"):
            spec = decide_cache(spec, info, ui)
        with ui.timed("budget and weights"):
            budget_limit_s = check_budget(spec, host, info, ledger, ui)
            # The weights file is on the laptop (downloaded into its cache once) before anything starts.
            weights = resolve_weights(spec.weights, spec.model, ui, resuming=bool(spec.resume))

    run_id = new_run_id()
    run_dir = (spec.runs_dir / run_id).resolve()
    run_dir.mkdir(parents=True)
    if project is not None:
        write_job_record(run_dir, project.manifest, spec.max_pull_mb)
        resumed_from = copy_command_resume_state(previous, run_dir) if previous else None
        plan = plan_record(spec, info, weights, command=list(spec.command or []), project=str(project.root),
                           data_rel=project.data_rel)
        model = describe_command(spec.command or [])
    else:
        resumed_from = copy_resume_state(previous, run_dir) if previous else None
        plan = plan_record(spec, info, weights)
        model = spec.model
    ledger.create_run(
        run_id, host.name, model=model, data_path=str(info.root.resolve()) if info else None,
        dataset_id=info.dataset_id if info else None,
        run_dir=str(run_dir), args_json=json.dumps(plan), currency=host.currency, resumed_from=resumed_from,
    )
    if project is not None:
        ui.info(f"run {run_id} on host {host.name}: {model} in {project.root} ({len(project.manifest)} files, "
                f"{project.bytes / 1e6:.1f} MB of code) -> {run_dir}")
    else:
        ui.info(f"run {run_id} on host {host.name}: {spec.model}, {len(info.classes)} classes, "
                f"{info.num_train} train / {info.num_val} val images -> {run_dir}")

    backend: Backend | None = None
    try:
        # Billing starts with the run's first action on the machine.
        billed_from = None if host.is_free else time.time()
        ledger.update_run(run_id, billed_from=billed_from)
        with ledger.phase(run_id, "connect"), ui.timed("connect"):
            backend = bring_up(host, ui, spec.accept_new_host_key)
            backend.check_stop(spec.keep_alive, ui)  # before the claim: nothing of ours is on the host yet
            backend.claim(run_id, spec.keep_alive)
        ledger.update_run(run_id, backend=backend.name)
        ui.info(f"backend: {backend.describe()}")
        # The image first: the S3 path fetches the dataset on the host with a helper in it.
        with ledger.phase(run_id, "build"), ui.timed("build"):
            prepared = backend.prepare(ui)
        ledger.update_run(run_id, image_tag=prepared.image_tag)
        data_dir = ""
        if info is not None:
            data_root, data_id = info.root.resolve(), info.dataset_id
            if spec.cache_size:
                resizing = f"resizing images to a short side of {spec.cache_size} px"
                with ui.timed("cache"), ui.progress(resizing, total=0) as update:
                    data_root = cached_dataset(data_root, spec.cache_size, progress=update)
                data_id = f"{data_id}-s{spec.cache_size}"
            with ledger.phase(run_id, "sync"), ui.timed("sync"):
                data_dir = backend.stage_data(data_root, data_id, ui)
        code_dir = ""
        if project is not None:
            with ledger.phase(run_id, "code"), ui.timed("code"):
                code_dir = backend.stage_code(project, ui)
        job = Job(
            run_id=run_id, trainer_args=spec.trainer_args(), data_dir=data_dir,
            out_dir=backend.out_dir_for(run_id, run_dir),
            weights=str(weights.path) if weights.path else "none",
            gpus=spec.gpus, env=dict(spec.extra_env),
            max_runtime_s=watchdog_max_runtime_s(spec, host, budget_limit_s, billed_from),
            silence_s=int(spec.silence_minutes * 60),
            stop_timeout_s=spec.stop_timeout_s, keep_alive=spec.keep_alive, terminate=spec.terminate,
            seed_dir=(str(run_dir / STATE_DIR / "seed-out") if project is not None else str(run_dir))
            if resumed_from else None,
            command=list(spec.command) if spec.command is not None else None, code_dir=code_dir,
            work_dir=backend.work_dir_for(run_id) if project is not None else "",
            data_rel=(project.data_rel or "") if project is not None else "", hub_weights=hub_files,
            seed_work_dir=str(run_dir / "work") if project is not None and resumed_from and (run_dir / "work").is_dir()
            else None,
        )
        ledger.start_phase(run_id, "train")
        with ui.timed("trainer started"):
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

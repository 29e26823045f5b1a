"""`gpu-run train`: one run's lifecycle, the same for every kind of run and every kind of job.

    checks   run_plan.plan_run: a typed RunPlan, refused before any money is spent
    open     run_plan.open_run: runs/<run-id>/ and its ledger row
    connect  the machine reached (started first where its provider can), its stop checked, claimed
    build    the image, or the trainer's code, ready there
    sync     the dataset there (its resized copy first, when asked), once per content
    code     a user's project and its requirements.txt there (a command only)
    start    the job (our trainer or the command) started detached, under the host's watchdog
    follow, pull, stop, record    run_end: to the job's end, outputs back, the machine released
             and confirmed, the end written once

Each setup stage is a function of one machine (`connect`, `prepare`, `sync_data`, `sync_code`,
`job_for`), journaled as a ledger phase by its caller: a single run calls them for its one machine
(`train` below), a multi-node run for each of its nodes at once (multinode/start.py), a sweep once
for its shared machine and `job_for` per point (sweep/run.py). A setup that fails releases what it
claimed (`release_failed_setup` here; each node's for a multi-node run).
"""

from __future__ import annotations

import time
from pathlib import Path

from gpu_run.backends import Backend, Job, Prepared, RunHandle, bring_up
from gpu_run.cache import cached_dataset
from gpu_run.config import Config, Host
from gpu_run.errors import GpuRunError
from gpu_run.ledger import Ledger
from gpu_run.money.budget import watchdog_max_runtime_s
from gpu_run.run_end import follow_and_finish, record_stop
from gpu_run.run_plan import RunPlan, open_run, plan_run, seed_dir_of
from gpu_run.spec import TrainSpec
from gpu_run.ui import UI

# The stages, each for one machine ----------------------------------------------------------------


def connect(host: Host, spec: TrainSpec, ui: UI) -> Backend:
    """The machine reached: started first where its provider can (an EC2 instance bills from then
    on: the caller keeps the backend, so that a failure from here on stops it again)."""
    return bring_up(host, ui, spec.accept_new_host_key)


def claim(backend: Backend, spec: TrainSpec, claim_id: str, ui: UI) -> None:
    """The machine held for the run (claim_id: the run, or a sweep round's queue), its stop
    checked first, while nothing of ours is on it yet."""
    backend.check_stop(spec.keep_alive, ui)
    backend.claim(claim_id, spec.keep_alive)


def prepare(backend: Backend, ui: UI) -> Prepared:
    """The image first: the S3 path fetches the dataset on the host with a helper in it."""
    return backend.prepare(ui)


def data_source(plan: RunPlan, ui: UI, cache_size: int | str | None = None) -> tuple[Path, str] | None:
    """What the machines get as the dataset, made once on the laptop for all of them: the folder
    itself, or its resized copy (--cache-size); None for a command without --data."""
    if plan.info is None:
        return None
    data_root, data_id = plan.info.root.resolve(), plan.info.dataset_id
    size = plan.spec.cache_size if cache_size is None else cache_size
    if size:
        resizing = f"resizing images to a short side of {size} px"
        with ui.timed("cache"), ui.progress(resizing, total=0) as update:
            data_root = cached_dataset(data_root, int(size), progress=update)
        data_id = f"{data_id}-s{size}"
    return data_root, data_id


def sync_data(backend: Backend, source: tuple[Path, str] | None, ui: UI) -> str:
    """The dataset where the job reads it ("" for none); its path there."""
    if source is None:
        return ""
    return backend.stage_data(source[0], source[1], ui)


def sync_code(backend: Backend, plan: RunPlan, ui: UI) -> tuple[str, str]:
    """A command's project and its packages there: (code mirror, packages folder)."""
    if plan.project is None:
        return "", ""
    return backend.stage_code(plan.project, ui), backend.stage_packages(plan.project, ui)


def job_for(
    plan: RunPlan,
    backend: Backend,
    run_id: str,
    run_dir: Path,
    data_dir: str,
    code: tuple[str, str],
    max_runtime_s: int,
    spec: TrainSpec | None = None,
    resumed: bool = False,
    **more,
) -> Job:
    """The job the machine starts: our trainer with the spec's recipe, or the command in its own
    copy of the project. `spec` is the run's own when it is not the plan's (a sweep's point)."""
    spec = spec or plan.spec
    command = plan.project is not None
    seed_work = run_dir / "work"
    return Job(
        run_id=run_id,
        trainer_args=spec.trainer_args(),
        data_dir=data_dir,
        out_dir=backend.out_dir_for(run_id, run_dir),
        weights=str(plan.weights.path) if plan.weights.path else "none",
        gpus=spec.gpus,
        env=dict(spec.extra_env),
        max_runtime_s=max_runtime_s,
        silence_s=int(spec.silence_minutes * 60),
        stop_timeout_s=spec.stop_timeout_s,
        keep_alive=spec.keep_alive,
        terminate=spec.terminate,
        seed_dir=(str(run_dir / ".gpu-run" / "seed-out") if command else str(run_dir)) if resumed else None,
        command=list(spec.command or []) if command else None,
        code_dir=code[0],
        packages_dir=code[1],
        work_dir=backend.work_dir_for(run_id) if command else "",
        data_rel=(plan.project.data_rel or "") if plan.project is not None else "",
        seed_work_dir=str(seed_work) if command and resumed and seed_work.is_dir() else None,
        hub_weights=list(plan.hub_files),
        **more,
    )


# The exit code of a run whose machine is not confirmed stopped, whatever failed first (cli.py's too).
EXIT_NOT_STOPPED = 3


def release_failed_setup(
    backend: Backend | None,
    host: Host,
    keep_alive: bool,
    ledger: Ledger,
    run_id: str,
    billed_from: float | None,
    ui: UI,
) -> bool:
    """Nothing runs yet: the machine must not stay up (and bill) because setup failed. True when
    its stop is confirmed (or nothing bills)."""
    if backend is not None:
        try:
            result = backend.abort(ui, keep_alive)
        except Exception as abort_error:  # the setup's own error is the one to show
            ledger.update_run(run_id, stop_status="unconfirmed", stop_detail=str(abort_error))
            ui.error(
                f"NOT STOPPED: could not release {host.name} after the failed setup ({abort_error}); "
                f"`gpu-run stop {run_id}` tries again"
            )
            return False
        record_stop(ledger, run_id, result, billed_from)
        return result.ok
    if billed_from:
        ledger.update_run(run_id, billed_to=time.time())  # never reached: nothing of ours runs there
    return True


# A run on one machine ----------------------------------------------------------------------------


def train(spec: TrainSpec, config: Config, ledger: Ledger, ui: UI) -> dict:
    group = config.group(spec.host)
    if group is not None:  # several hosts: one job over all of them, through torchrun
        from gpu_run.multinode.start import train_nodes

        return train_nodes(spec, group, config, ledger, ui)
    host = config.host(spec.host)
    plan = plan_run(spec, host, ledger, ui)
    run = open_run(plan, ledger, host.name)
    run_id, run_dir = run.run_id, Path(run.run_dir)
    announce(plan, run_id, host.name, run_dir, ui)

    backend: Backend | None = None
    billed_from = None if host.is_free else time.time()  # billing starts with the run's first action there
    try:
        ledger.update_run(run_id, billed_from=billed_from)
        with ledger.phase(run_id, "connect"), ui.timed("connect"):
            backend = connect(host, plan.spec, ui)
            claim(backend, plan.spec, run_id, ui)
        ledger.update_run(run_id, backend=backend.name)
        if not host.is_local:  # held from here: `gpu-run stop RUN` after a failed setup finds it by this
            ledger.update_run(
                run_id, handle_json=RunHandle(backend=backend.name, run_dir=backend.run_dir(run_id)).to_json()
            )
        ui.info(f"backend: {backend.describe()}")
        with ledger.phase(run_id, "build"), ui.timed("build"):
            prepared = prepare(backend, ui)
        ledger.update_run(run_id, image_tag=prepared.image_tag)
        data_dir = ""
        source = data_source(plan, ui)
        if source is not None:
            with ledger.phase(run_id, "sync"), ui.timed("sync"):
                data_dir = sync_data(backend, source, ui)
        code = ("", "")
        if plan.project is not None:
            with ledger.phase(run_id, "code"), ui.timed("code"):
                code = sync_code(backend, plan, ui)
        job = job_for(
            plan,
            backend,
            run_id,
            run_dir,
            data_dir,
            code,
            watchdog_max_runtime_s(plan.spec, host, plan.budget_limit_s, billed_from),
            resumed=seed_dir_of(plan, run) is not None,
        )
        ledger.start_phase(run_id, "train")
        with ui.timed("trainer started"):
            handle = backend.start(job, prepared, ui)
        handle.image_built, handle.device = prepared.image_built, prepared.device
        ledger.update_run(run_id, handle_json=handle.to_json(), status="running")
    except BaseException as e:
        ledger.update_run(run_id, status="failed", ended_at=time.time())
        if isinstance(e, GpuRunError):
            ledger.end_phase(run_id, "train", "failed", str(e))
        stopped = release_failed_setup(backend, host, plan.spec.keep_alive, ledger, run_id, billed_from, ui)
        if not stopped and isinstance(e, GpuRunError):
            e.exit_code = EXIT_NOT_STOPPED  # the machine may be billing: that outranks what failed first
        raise

    if plan.spec.detach:
        ledger.update_run(run_id, status="detached")
        ui.info(f"started detached. Follow with: gpu-run attach {run_id}")
        return {"run_id": run_id, "status": "detached", "run_dir": str(run_dir)}
    return follow_and_finish(ledger.get_run(run_id), host, backend, ledger, ui)


def announce(plan: RunPlan, run_id: str, where: str, run_dir: Path, ui: UI) -> None:
    """The run's first line: what runs where, and where its outputs land."""
    if plan.project is not None:
        ui.info(
            f"run {run_id} on host {where}: {plan.job_label} in {plan.project.root} "
            f"({len(plan.project.manifest)} files, {plan.project.bytes / 1e6:.1f} MB of code) -> {run_dir}"
        )
    elif plan.info is not None:
        info = plan.info
        ui.info(
            f"run {run_id} on host {where}: {plan.spec.model}, {len(info.classes)} classes, "
            f"{info.num_train} train / {info.num_val} val images -> {run_dir}"
        )

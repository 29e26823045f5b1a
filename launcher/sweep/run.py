"""`gpu-run sweep`: the points of a grid as ordinary runs on one machine, set up once.

Data flows as for a single run: the spec and its points become a round (the point runs, recorded
in the ledger before anything starts), the round's actions go through the backend once (connect,
image, sync), the host's queue runs the points, and the end is recorded per point (summary.json,
the ledger) and for the sweep (the machine's stop, the cost split, the comparison).

A sweep has rounds: the first run, then one per `--resume` (the points left unfinished). Each round
is one billed span of the machine, split between its points (money/split.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from dataclasses import fields as dataclass_fields
from decimal import Decimal
from pathlib import Path

from gpu_run.backends import Backend, backend_for_run
from gpu_run.backends.base import RunHandle
from gpu_run.cache import resolve_cache_size
from gpu_run.config import Config, Host
from gpu_run.dataset import DatasetInfo
from gpu_run.deliverables.compare import run_row, write_comparison
from gpu_run.driver import claim, connect, data_source, job_for, prepare, sync_code, sync_data
from gpu_run.errors import BackendError, ConfigError, GpuRunError
from gpu_run.events import status_of_run
from gpu_run.ledger import FINAL_STATUSES, Ledger, RunRecord, SweepRecord
from gpu_run.money.budget import BUDGET_MARGIN_S, SETUP_ESTIMATE_S, budget_limit_s, measured_epoch_time
from gpu_run.money.cost import cost_of, format_money
from gpu_run.money.split import split_amount, split_seconds
from gpu_run.project import Project
from gpu_run.providers.base import StopResult
from gpu_run.run_end import Detached, follow_to_end, handle_of, is_command_run, record_end, record_stop
from gpu_run.run_plan import RunPlan, check_command_job, check_dataset, check_stop_setting, new_run_id, open_run
from gpu_run.spec import TrainSpec, check_spec
from gpu_run.sweep.grid import fill_command, label
from gpu_run.sweep.host import STOP_MARGIN_S, HostQueue, PointState, read_state, stop_queue
from gpu_run.trainer import defaults as recipe
from gpu_run.ui import UI
from gpu_run.weights import Weights, resolve_weights, stage_weights

POINT_START_S = 30  # a point's own start (the trainer's imports, the data loader), for the estimate
POLL_S = 1.5  # how often the laptop asks the machine where the queue is
NOT_RUN = ("not_started", "over_budget")  # queue outcomes of a point that never ran


def new_sweep_id() -> str:
    return "sweep-" + new_run_id()


def spec_record(spec: TrainSpec) -> dict:
    """The spec as the ledger keeps it: --env values may be secrets, so their names only."""
    return {
        **asdict(spec),
        "data": str(spec.data) if spec.data is not None else None,
        "runs_dir": str(spec.runs_dir),
        "extra_env": sorted(spec.extra_env),
        "project": str(spec.project) if spec.project else None,
    }


def spec_from_record(record: dict, env: dict[str, str]) -> TrainSpec:
    """The base spec back from the ledger (the sweep's own keys, such as parallel, left out)."""
    known = {f.name for f in dataclass_fields(TrainSpec)}
    values = {k: v for k, v in record.items() if k in known}
    return TrainSpec(
        **{
            **values,
            "data": Path(record["data"]) if record.get("data") else None,
            "runs_dir": Path(record["runs_dir"]),
            "extra_env": env,
            "project": Path(record["project"]) if record.get("project") else None,
        }
    )


def sweep_dir(spec: TrainSpec, sweep_id: str) -> Path:
    return (spec.runs_dir / "sweeps" / sweep_id).resolve()


# Before anything starts -------------------------------------------------------------------------


def point_specs(base: TrainSpec, points: list[dict]) -> list[TrainSpec]:
    """Each point's spec, checked now: a bad value in one point refuses the sweep, not its third hour."""
    specs = []
    for point in points:
        # A command's point fills its placeholders; our trainer's point sets its options.
        spec = (
            replace(base, command=fill_command(base.command, point))
            if base.command is not None
            else replace(base, **point)
        )
        try:
            check_spec(spec)
        except ConfigError as e:
            raise ConfigError(f"point {label(point)}: {e}") from None
        specs.append(spec)
    return specs


def decide_cache(specs: list[TrainSpec], info: DatasetInfo, ui: UI) -> list[TrainSpec]:
    """One copy of the dataset serves every point: sized for the largest image size asked."""
    largest = max(specs, key=lambda s: s.image_size)
    size, advice = resolve_cache_size(
        largest.cache_size, info.root, largest.image_size, largest.augment or recipe.AUGMENT
    )
    if advice is not None and advice.helps:
        ui.info(advice.message)
    return [replace(s, cache_size=size) for s in specs]


def estimates(specs: list[TrainSpec], host: Host, info: DatasetInfo | None, ledger: Ledger) -> list[int]:
    """Each point's seconds on the machine, from its --epoch-time or earlier runs (0: unknown; a
    command's points have no epochs we know of)."""
    out = []
    for spec in specs:
        if spec.is_command or info is None:
            out.append(0)
            continue
        epoch_s = spec.epoch_time_s or measured_epoch_time(ledger, host.name, spec.model, info.dataset_id)
        out.append(int(spec.epochs * epoch_s + POINT_START_S) if epoch_s else 0)
    return out


def fitting(ests: list[int], available_s: float, parallel: int) -> list[bool]:
    """Which points the budget's time can hold, dealt round-robin to the slots as the queue does;
    a point with no estimate counts as fitting (the machine's clock decides it)."""
    used = [0.0] * parallel
    fits = []
    for i, est in enumerate(ests):
        slot = i % parallel
        fits.append(est == 0 or used[slot] + est <= available_s)
        used[slot] += est if fits[-1] else 0
    return fits


def check_sweep_budget(base: TrainSpec, host: Host, ests: list[int], parallel: int, ui: UI) -> int:
    """The whole sweep's budget in billable seconds (0: none); says which points it cannot hold."""
    if not base.budget:
        return 0
    limit_s = budget_limit_s(base, host, ui)
    if not limit_s:
        return 0
    available = limit_s - SETUP_ESTIMATE_S - host.grace_s - base.stop_timeout_s - BUDGET_MARGIN_S
    fits = fitting(ests, available, parallel)
    if not all(fits):
        left_out = [str(i + 1) for i, ok in enumerate(fits) if not ok]
        if not any(fits) and not base.force:
            raise ConfigError(
                f"--budget {base.budget} {host.currency} holds none of the points by their estimates; "
                f"raise it, or add --force to start and let the budget stop the sweep"
            )
        ui.warn(
            f"by the estimates, point(s) {', '.join(left_out)} will not fit in the budget of {base.budget} "
            f"{host.currency}: the machine does not start them; `gpu-run sweep --resume` runs them later"
        )
    if not any(ests):
        ui.info(f"no time per epoch known yet for these points; the budget stops the sweep after {limit_s}s")
    return limit_s


# The sweep --------------------------------------------------------------------------------------


def sweep(base: TrainSpec, points: list[dict], parallel: int, config: Config, ledger: Ledger, ui: UI) -> dict:
    if config.group(base.host) is not None:
        raise ConfigError(
            f"--host {base.host}: a sweep runs its points on one machine; give one host "
            f"(several machines train one job with `gpu-run train --host {base.host}`)"
        )
    host = config.host(base.host)
    if parallel < 1:
        raise ConfigError(f"--parallel must be 1 or more, got {parallel}")
    specs = point_specs(base, points)
    check_stop_setting(host, base.keep_alive, ui)
    info, project, specs = check_inputs(base, specs, host, ledger, ui)
    sweep_id = new_sweep_id()
    ledger.create_sweep(
        sweep_id,
        host.name,
        spec_json=json.dumps(spec_record(base)),
        points_json=json.dumps(points),
        rounds_json="[]",
        currency=host.currency,
    )
    sweep_dir(base, sweep_id).mkdir(parents=True, exist_ok=True)
    ui.info(
        f"sweep {sweep_id}: {len(points)} points on {host.name}"
        + (f", {parallel} side by side" if parallel > 1 else ", one after another")
    )
    return run_round(
        ledger.get_sweep(sweep_id),
        base,
        host,
        [(i, s, None) for i, s in enumerate(specs)],
        parallel,
        info,
        config,
        ledger,
        ui,
        project,
    )


def check_inputs(
    base: TrainSpec, specs: list[TrainSpec], host: Host, ledger: Ledger, ui: UI
) -> tuple[DatasetInfo | None, Project | None, list[TrainSpec]]:
    """The dataset (and the cache size every point shares), or for a command its project and data,
    checked as a single run's are."""
    if base.is_command:
        project, info = check_command_job(base)
        return info, project, [replace(s, cache_size=0 if s.cache_size == "auto" else s.cache_size) for s in specs]
    info = check_dataset(base.data, ui)
    return info, None, decide_cache(specs, info, ui)


def resume(
    sweep_id: str,
    config: Config,
    ledger: Ledger,
    ui: UI,
    env: dict[str, str],
    parallel: int | None = None,
    budget: float | None = None,
    detach: bool = False,
    force: bool = False,
) -> dict:
    """Finish what the last round left (follow it, or pull what it ran), then run, in a new round,
    every point that has not succeeded: the cut one from its last.pth, the others from the start."""
    sw = ledger.get_sweep(sweep_id)
    host = config.host(sw.host)
    base = spec_from_record(sw.spec, env)
    missing_env = sorted(set(sw.spec.get("extra_env", [])) - set(env))
    if missing_env:
        ui.warn(
            f"the sweep was started with --env {', '.join(missing_env)}; their values are not kept: pass them again"
        )
    if sw.rounds and sw.rounds[-1].get("stop") is None:
        attach_round(sw, host, ledger, ui)
        sw = ledger.get_sweep(sweep_id)
    latest = latest_runs(ledger, sw)
    todo = [i for i in range(len(sw.points)) if latest.get(i) is None or latest[i].status != "succeeded"]
    if not todo:
        ui.info(f"every point of {sw.sweep_id} has finished")
        return sweep_result(ledger.get_sweep(sweep_id), host, ledger, ui)
    base = replace(base, budget=base.budget if budget is None else budget, detach=detach, force=force or base.force)
    parallel = parallel or int(sw.spec.get("parallel") or 1)
    specs = point_specs(base, [sw.points[i] for i in todo])
    info, project, specs = check_inputs(base, specs, host, ledger, ui)
    items = []
    for i, spec in zip(todo, specs):
        previous = latest.get(i)
        cut = (
            previous is not None
            and previous.status == "stopped"
            and (base.is_command or (Path(previous.run_dir) / "checkpoints" / "last.pth").is_file())
        )
        items.append((i, spec, previous if cut else None))
    resumed = [str(i + 1) for i, _, p in items if p is not None]
    ui.info(
        f"sweep {sw.sweep_id}: {len(items)} point(s) left"
        + (f", point(s) {', '.join(resumed)} from last.pth" if resumed else "")
    )
    return run_round(sw, base, host, items, parallel, info, config, ledger, ui, project)


def latest_runs(ledger: Ledger, sw: SweepRecord) -> dict[int, RunRecord]:
    latest: dict[int, RunRecord] = {}
    for run in ledger.sweep_runs(sw.sweep_id):  # oldest first: the newest run of each point wins
        latest[run.sweep_point] = run
    return latest


def save_round(ledger: Ledger, sweep_id: str, number: int, **fields) -> dict:
    rounds = ledger.get_sweep(sweep_id).rounds
    while len(rounds) < number:
        rounds.append({})
    rounds[number - 1].update(fields)
    ledger.update_sweep(sweep_id, rounds_json=json.dumps(rounds))
    return rounds[number - 1]


def run_round(
    sw: SweepRecord,
    base: TrainSpec,
    host: Host,
    items: list[tuple[int, TrainSpec, RunRecord | None]],
    parallel: int,
    info: DatasetInfo | None,
    config: Config,
    ledger: Ledger,
    ui: UI,
    project: Project | None = None,
) -> dict:
    if host.is_local:
        return run_locally(sw, host, items, config, ledger, ui)
    number = len(sw.rounds) + 1
    queue_id = f"{sw.sweep_id}-r{number}"
    specs = [spec for _, spec, _ in items]
    ests = estimates(specs, host, info, ledger)
    limit_s = check_sweep_budget(base, host, ests, parallel, ui)
    weights = [
        Weights("none")
        if project is not None
        else resolve_weights(spec.weights, spec.model, ui, resuming=previous is not None)
        for _, spec, previous in items
    ]

    # The point runs, in the ledger before anything starts: each an ordinary run with its own plan.
    plans = [
        RunPlan(
            spec=spec,
            host=host,
            info=info,
            project=project,
            weights=w,
            hub_files=[],
            budget_limit_s=limit_s,
            previous=previous,
        )
        for (_, spec, previous), w in zip(items, weights)
    ]
    runs: list[RunRecord] = []
    taken: set[str] = set()
    for (index, _spec, _previous), plan in zip(items, plans):
        run_id = new_run_id()
        while run_id in taken:
            run_id = new_run_id()
        taken.add(run_id)
        runs.append(
            open_run(
                plan,
                ledger,
                host.name,
                run_id=run_id,
                sweep_id=sw.sweep_id,
                sweep_point=index,
                status="queued",
                plan_extra={"point": sw.points[index]},
            )
        )
    billed_from = None if host.is_free else time.time()
    save_round(
        ledger,
        sw.sweep_id,
        number,
        queue_id=queue_id,
        points=[r.run_id for r in runs],
        parallel=parallel,
        billed_from=billed_from,
        billed_to=None,
        stop=None,
        handle=None,
        intervals={},
        price={"per_hour": host.price_per_hour, "billing": host.billing, "min_billed_s": host.min_billed_s},
    )
    spec_json = {**sw.spec, "parallel": parallel, "budget": base.budget}
    ledger.update_sweep(sw.sweep_id, status="running", spec_json=json.dumps(spec_json))

    backend: Backend | None = None
    try:
        # The driver's setup stages, once for every point of the round.
        with ui.timed("connect"):
            backend = connect(host, base, ui)
            claim(backend, base, queue_id, ui)  # one lease for the whole round
        ui.info(f"backend: {backend.describe()}")
        with ui.timed("build"):
            prepared = prepare(backend, ui)
        check_parallel(parallel, specs, backend, prepared.device)
        source = data_source(plans[0], ui, cache_size=specs[0].cache_size)
        with ui.timed("sync"):
            data_dir = sync_data(backend, source, ui)
        save_round(ledger, sw.sweep_id, number, sync=getattr(backend, "synced", None))
        code = sync_code(backend, plans[0], ui)  # once: each point copies the project's mirror
        queue = HostQueue(backend, queue_id)
        staged: dict[str, str] = {}
        for slot, (run, (_index, spec, _previous), plan, est) in enumerate(zip(runs, items, plans, ests)):
            job = job_for(
                plan,
                backend,
                run.run_id,
                Path(run.run_dir),
                data_dir,
                code,
                0,
                spec=replace(spec, resume=run.resumed_from),
                resumed=bool(run.resumed_from),
                devices=devices_for(slot % parallel, spec.gpus, parallel, prepared.device),
            )
            backend.remote.run(["mkdir", "-p", job.out_dir])
            from gpu_run.sync import ssh_tar

            if job.seed_dir:
                ssh_tar.push(backend.remote, Path(job.seed_dir), job.out_dir)
            if job.command is not None:  # the point's own copy of the project, made now: the queue only starts it
                backend.remote.run(backend.runtime.workdir_command(job, backend.run_dir(run.run_id)))
                if run.resumed_from and (Path(run.run_dir) / "work").is_dir():
                    ssh_tar.push(backend.remote, Path(run.run_dir) / "work", job.work_dir, delete_extra=False)
            if job.weights not in ("none", "imagenet"):
                if job.weights not in staged:
                    staged[job.weights] = stage_weights(backend.remote, backend.workdir, Path(job.weights), ui)
                job.weights = staged[job.weights]
            env_file = backend._write_env_file(job)  # private to the run's user until its start
            handle = queue.add_point(job, prepared, slot % parallel, est, env_file)
            handle.image_built = prepared.image_built
            handle.work_dir = job.work_dir
            ledger.update_run(
                run.run_id, backend=backend.name, image_tag=prepared.image_tag, handle_json=handle.to_json()
            )
        max_runtime = 0
        if limit_s:
            spent = time.time() - (billed_from or time.time())
            max_runtime = max(1, int(limit_s - spent - host.grace_s - base.stop_timeout_s - BUDGET_MARGIN_S))
        queue_budget = max(1, max_runtime - base.stop_timeout_s - STOP_MARGIN_S) if max_runtime else 0
        queue.send(parallel, queue_budget, int(base.max_hours * 3600), int(base.silence_minutes * 60))
        queue.start(max_runtime, max(s.stop_timeout_s for s in specs))
        save_round(ledger, sw.sweep_id, number, handle=queue.handle().to_json())
    except BaseException:
        # Nothing of the round runs: the machine must not stay up because the setup failed.
        for run in runs:
            ledger.update_run(run.run_id, status="failed", ended_at=time.time())
        ledger.update_sweep(sw.sweep_id, status="failed")
        if backend is not None:
            try:
                result = backend.abort(ui, base.keep_alive)
            except Exception as abort_error:
                result = StopResult(False, "unconfirmed", None, str(abort_error))
                ui.error(f"NOT STOPPED: could not release {host.name} after the failed setup ({abort_error})")
            close_round(ledger, sw.sweep_id, number, result, runs)
        elif billed_from:
            save_round(
                ledger,
                sw.sweep_id,
                number,
                billed_to=time.time(),
                stop={"ok": True, "state": "not_needed", "detail": "nothing was started"},
            )
        raise
    ui.info(
        f"the queue of {len(runs)} point(s) runs on {host.name}: the laptop may close; "
        f"`gpu-run sweep status {sw.sweep_id}` shows where it is"
    )
    if base.detach:
        return {"sweep_id": sw.sweep_id, "status": "detached", "points": [r.run_id for r in runs]}
    return follow_round(ledger.get_sweep(sw.sweep_id), number, host, backend, ledger, ui)


def check_parallel(parallel: int, specs: list[TrainSpec], backend: Backend, device: str) -> None:
    if parallel == 1 or device != "gpu":
        return
    gpus = backend.runtime.versions().get("gpus") if hasattr(backend, "runtime") else None
    need = parallel * max(max(1, s.gpus) for s in specs)
    if gpus and need > gpus:
        raise ConfigError(
            f"--parallel {parallel} with {max(s.gpus for s in specs)} GPU(s) a point needs {need} GPUs; "
            f"the host has {gpus}"
        )


def devices_for(slot: int, gpus: int, parallel: int, device: str) -> str:
    """The GPUs of a queue slot when points run side by side (slot k: GPUs k*g .. k*g+g-1)."""
    if parallel == 1 or device != "gpu" or gpus == 0:
        return ""
    g = max(1, gpus)
    return ",".join(str(slot * g + k) for k in range(g))


# Following a round --------------------------------------------------------------------------------


def reconnect(host: Host, sw: SweepRecord, number: int, ui: UI) -> Backend:
    handle = RunHandle.from_json(sw.rounds[number - 1].get("handle"))
    if handle is None:
        raise BackendError(f"round {number} of {sw.sweep_id} never started its queue on {host.name}")
    return backend_for_run(host, handle, ui)


def attach_round(sw: SweepRecord, host: Host, ledger: Ledger, ui: UI) -> dict:
    number = len(sw.rounds)
    try:
        backend = reconnect(host, sw, number, ui)
    except GpuRunError as e:
        raise GpuRunError(
            f"{e}. The last round's points are on {host.name}: start the machine again, then "
            f"`gpu-run sweep --resume {sw.sweep_id}` pulls them and runs what is left"
        ) from None
    return follow_round(sw, number, host, backend, ledger, ui)


def stop_sweep(sweep_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    """`gpu-run stop SWEEP`: the queue stops the running point(s) with last.pth and starts no more;
    then as at every end: pull, stop the machine, split the cost."""
    sw = ledger.get_sweep(sweep_id)
    host = config.host(sw.host)
    if not sw.rounds or sw.rounds[-1].get("stop") is not None:
        raise GpuRunError(f"sweep {sw.sweep_id} is not running; `gpu-run sweep status {sw.sweep_id}` shows its points")
    number = len(sw.rounds)
    backend = reconnect(host, sw, number, ui)
    if stop_queue(backend, sw.rounds[-1]["queue_id"]):
        ui.info(f"asked the queue on {host.name} to stop: the running point saves a resumable last.pth, no more start")
    return follow_round(sw, number, host, backend, ledger, ui)


def follow_round(sw: SweepRecord, number: int, host: Host, backend: Backend, ledger: Ledger, ui: UI) -> dict:
    """Each point as it runs (the live display, one at a time) and as it ends (pulled, recorded);
    then the machine's stop, confirmed, and the cost split between the points."""
    rnd = sw.rounds[number - 1]
    queue_id, run_ids, parallel = rnd["queue_id"], rnd["points"], rnd.get("parallel", 1)
    watched = RunHandle.from_json(rnd["handle"])
    position = {r: i for i, r in enumerate(run_ids)}
    hint = f"gpu-run sweep --resume {sw.sweep_id}"
    recorded = {r for r in run_ids if ledger.get_run(r).status in FINAL_STATUSES}
    shown: set[str] = set()

    def cost_so_far() -> str:
        if host.is_free or not rnd.get("billed_from"):
            return ""
        return (
            format_money(
                cost_of(time.time() - rnd["billed_from"], host.price_per_hour, host.billing, host.min_billed_s),
                host.currency,
            )
            + " (sweep)"
        )

    try:
        while True:
            state = backend._again_after_drops(lambda: read_state(backend, queue_id, run_ids, hold=True))
            for run_id in run_ids:
                point = state.points.get(run_id)
                if point is not None and point.ended and run_id not in recorded:
                    finish_point(
                        ledger.get_run(run_id), point, len(run_ids), position[run_id], host, backend, ledger, ui
                    )
                    recorded.add(run_id)
            if state.ended:
                for run_id in run_ids:  # the queue ended without reaching them (killed)
                    if run_id not in recorded:
                        finish_point(
                            ledger.get_run(run_id),
                            PointState(run_id, outcome="not_started", exit_code=-1),
                            len(run_ids),
                            position[run_id],
                            host,
                            backend,
                            ledger,
                            ui,
                        )
                        recorded.add(run_id)
                intervals = {
                    r: [p.started_at, p.ended_at or p.started_at] for r, p in state.points.items() if p.started
                }
                save_round(ledger, sw.sweep_id, number, intervals=intervals, watchdog_stop=state.stop_state)
                break
            running = [r for r in run_ids if state.points.get(r, PointState(r)).started and r not in recorded]
            for run_id in running:
                if run_id not in shown:
                    shown.add(run_id)
                    values = ledger.get_run(run_id).args.get("point", {})
                    ui.info(f"point {position[run_id] + 1}/{len(run_ids)} ({label(values)}): run {run_id} started")
            if parallel == 1 and running:
                run = ledger.get_run(running[0])
                follow_to_end(run, host, backend, ledger, ui, hint=hint, watched=watched, cost=cost_so_far)
                continue  # its end is recorded once the queue has written it
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        raise Detached(sw.sweep_id, hint) from None
    result = release(backend, watched, queue_id, ui)
    close_round(ledger, sw.sweep_id, number, result, [ledger.get_run(r) for r in run_ids])
    return sweep_result(ledger.get_sweep(sw.sweep_id), host, ledger, ui)


def finish_point(
    run: RunRecord, point: PointState, total: int, position: int, host: Host, backend: Backend, ledger: Ledger, ui: UI
) -> None:
    """A point that ended: its outputs pulled (verified) and its end recorded, as a single run's."""
    values = run.args.get("point", {})
    sweep_info = {"sweep": {"id": run.sweep_id, "point": run.sweep_point, "values": values, "outcome": point.outcome}}
    ended = point.ended_at or time.time()
    name = f"point {position + 1}/{total} ({label(values)})"
    if point.outcome in NOT_RUN:
        why = "the budget could not hold it" if point.outcome == "over_budget" else "the sweep was stopped first"
        record_end(run, host, "cancelled", None, ended, ledger, extra=sweep_info)
        ui.info(f"{name}: not started ({why})")
        return
    run_dir = Path(run.run_dir)
    extra = {**backend.finish(handle_of(run), run_dir, ui), **sweep_info}
    status = status_of_run(point.exit_code, run_dir / "train.log")
    missing = [p for p in ("checkpoints/last.pth", "metrics.jsonl") if not (run_dir / p).is_file()]
    if is_command_run(run):  # the exit code decides; a point the queue cut is resumable
        missing = []
        if point.outcome in ("stopped", "max_runtime", "silent"):
            status = "stopped"
    if status == "succeeded" and missing:
        status = "failed"
        ui.error(f"{name}: the trainer exited 0 but {', '.join(missing)} did not arrive in {run_dir}")
    summary = record_end(run, host, status, point.exit_code, ended, ledger, extra=extra)
    best = f"{summary['best_val_acc'] * 100:.1f}%" if summary.get("best_val_acc") is not None else "-"
    ui.info(f"{name}: {status} (exit code {point.exit_code}), best val acc {best}, outputs in {run_dir}")


def release(backend: Backend, watched: RunHandle, queue_id: str, ui: UI) -> StopResult:
    """Every output is here: the watchdog may stop the machine now, and the laptop confirms it."""
    try:
        backend.watchdog.hold(queue_id)
        backend.watchdog.mark_pulled(queue_id)
    except Exception:
        pass  # the host may already be going down (its grace ran out): the release confirms it
    return backend.release(watched, ui)


def close_round(ledger: Ledger, sweep_id: str, number: int, result: StopResult, runs: list[RunRecord]) -> None:
    """The round's stop in the ledger; its span closes (and is split) only on a confirmed stop."""
    rnd = ledger.get_sweep(sweep_id).rounds[number - 1]
    fields: dict = {"stop": {"ok": result.ok, "state": result.state, "detail": result.detail}}
    watchdog_stop = (rnd.get("watchdog_stop") or "").split()
    if rnd.get("billed_from") and result.ok:
        # A machine the watchdog had stopped before the laptop came back was billed until then.
        earlier = float(watchdog_stop[1]) if len(watchdog_stop) > 1 and watchdog_stop[0] == "stopped" else None
        # On the laptop's clock: never later than now, whatever the host's clock says.
        fields["billed_to"] = max(min(earlier or result.at or time.time(), time.time()), rnd["billed_from"])
    rnd = save_round(ledger, sweep_id, number, **fields)
    for run in runs:
        record_stop(ledger, run.run_id, result, None)
    apply_split(ledger, rnd)


def apply_split(ledger: Ledger, rnd: dict) -> None:
    """Each point's share of the round's billed span, in its summary.json and the ledger."""
    runs = [ledger.get_run(r) for r in rnd.get("points", [])]
    if not runs:
        return
    for run in runs:  # refresh each summary's stop (and status) first
        if run.summary:
            host_currency = run.currency or ""
            summary = {
                **run.summary,
                "stop": {"ok": not run.stop_failed, "state": run.stop_status, "detail": run.stop_detail},
            }
            summary.setdefault("cost", {"amount": 0.0, "currency": host_currency, "billed_s": 0})
            write_summary(ledger, run, summary)
    if not rnd.get("billed_from") or not rnd.get("billed_to"):
        return  # free host, or the span is still open (the stop is not confirmed)
    price = rnd.get("price")
    if price is None:
        return
    span = (rnd["billed_from"], rnd["billed_to"])
    total = cost_of(span[1] - span[0], price["per_hour"], price["billing"], price["min_billed_s"])
    intervals = rnd.get("intervals", {})
    seconds = split_seconds(span, [tuple(intervals[r.run_id]) if r.run_id in intervals else None for r in runs])
    for run, amount, share in zip(runs, split_amount(total, seconds), seconds):
        run = ledger.get_run(run.run_id)
        summary = run.summary or {}
        summary["cost"] = {
            "amount": float(amount),
            "currency": run.currency,
            "billed_s": round(share),
            "shared": f"its share of {rnd['queue_id']}: its own time on the machine, plus the setup, "
            f"gaps and stop split evenly between the points that ran",
        }
        write_summary(ledger, run, summary, cost_amount=float(amount))


def write_summary(ledger: Ledger, run: RunRecord, summary: dict, **fields) -> None:
    if run.run_dir and Path(run.run_dir).is_dir():
        (Path(run.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ledger.update_run(run.run_id, summary_json=json.dumps(summary), **fields)


# Local host: no machine to share, the points run one after another through train ------------------


def run_locally(sw: SweepRecord, host: Host, items, config: Config, ledger: Ledger, ui: UI) -> dict:
    from gpu_run import driver

    number = len(sw.rounds) + 1
    save_round(
        ledger,
        sw.sweep_id,
        number,
        queue_id=None,
        points=[],
        parallel=1,
        billed_from=None,
        billed_to=None,
        stop=None,
        handle=None,
        intervals={},
    )
    ledger.update_sweep(sw.sweep_id, status="running")
    done: list[str] = []
    for index, spec, previous in items:
        values = sw.points[index]
        ui.info(f"point {index + 1}/{len(sw.points)} ({label(values)})")
        spec = replace(spec, resume=previous.run_id if previous else None, detach=False)
        before = {r.run_id for r in ledger.list_runs(host=host.name, limit=5)}
        try:
            driver.train(spec, config, ledger, ui)
        finally:
            new = [r for r in ledger.list_runs(host=host.name, limit=5) if r.run_id not in before]
            for run in new:
                args = {**run.args, "point": values}
                ledger.update_run(run.run_id, sweep_id=sw.sweep_id, sweep_point=index, args_json=json.dumps(args))
                done.append(run.run_id)
            save_round(ledger, sw.sweep_id, number, points=done)
    save_round(ledger, sw.sweep_id, number, stop={"ok": True, "state": "not_needed", "detail": "the local host"})
    return sweep_result(ledger.get_sweep(sw.sweep_id), host, ledger, ui)


# The result ---------------------------------------------------------------------------------------


def sweep_status(sw: SweepRecord, ledger: Ledger) -> dict:
    """Each point's latest run, state and cost; the rounds and their machine's stop; the total."""
    latest = latest_runs(ledger, sw)
    points = []
    for i, values in enumerate(sw.points):
        run = latest.get(i)
        summary = run.summary if run else {}
        points.append(
            {
                "point": i + 1,
                "values": values,
                "label": label(values),
                "run_id": run.run_id if run else None,
                "status": run.status if run else "pending",
                "best_val_acc": run.best_val_acc if run else None,
                "cost": run.cost_amount if run else None,
                "run_dir": run.run_dir if run else None,
                "epochs_completed": summary.get("epochs_completed"),
            }
        )
    total = sum((Decimal(str(r.cost_amount)) for r in ledger.sweep_runs(sw.sweep_id) if r.cost_amount), Decimal("0"))
    rounds = [
        {
            "queue_id": r.get("queue_id"),
            "points": len(r.get("points", [])),
            "stop": r.get("stop"),
            "billed_s": round(r["billed_to"] - r["billed_from"])
            if r.get("billed_to") and r.get("billed_from")
            else None,
        }
        for r in sw.rounds
    ]
    open_rounds = [r for r in sw.rounds if r.get("stop") is None]
    not_stopped = [r for r in sw.rounds if r.get("stop") and not r["stop"]["ok"]]
    return {
        "sweep_id": sw.sweep_id,
        "host": sw.host,
        "status": sweep_state(points, open_rounds, not_stopped),
        "points": points,
        "rounds": rounds,
        "cost": {"amount": float(total), "currency": sw.currency},
        "stop": {"ok": not not_stopped, "detail": not_stopped[-1]["stop"]["detail"] if not_stopped else ""},
    }


def live_status(sweep_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    """sweep_status, with what the machine says of a round that runs there now."""
    sw = ledger.get_sweep(sweep_id)
    result = sweep_status(sw, ledger)
    rnd = sw.rounds[-1] if sw.rounds else {}
    if rnd.get("stop") is not None or not rnd.get("handle"):
        return result
    host = config.host(sw.host)
    try:
        backend = reconnect(host, sw, len(sw.rounds), ui)
        state = read_state(backend, rnd["queue_id"], rnd["points"])
    except (GpuRunError, OSError) as e:
        result["machine"] = f"not reachable ({e}): the states are the ledger's"
        return result
    for p in result["points"]:
        seen = state.points.get(p["run_id"] or "")
        if seen is not None and p["status"] not in FINAL_STATUSES:
            p["status"] = f"ended ({seen.outcome})" if seen.ended else "running" if seen.started else "queued"
    if rnd.get("billed_from") and not host.is_free:
        so_far = cost_of(time.time() - rnd["billed_from"], host.price_per_hour, host.billing, host.min_billed_s)
        result["cost"]["so_far"] = float(so_far)
    result["machine"] = "the queue has ended" if state.ended else "the queue runs"
    return result


def sweep_state(points: list[dict], open_rounds: list, not_stopped: list) -> str:
    if open_rounds:
        return "running"
    statuses = {p["status"] for p in points}
    if statuses == {"succeeded"}:
        return "succeeded"
    if "failed" in statuses:
        return "failed"
    return "stopped"  # cut or not started: `--resume` runs the rest


def sweep_result(sw: SweepRecord, host: Host, ledger: Ledger, ui: UI) -> dict:
    """The status, plus the comparison of every point that trained, in runs/sweeps/<id>/."""
    result = sweep_status(sw, ledger)
    rows = []
    for p in result["points"]:
        if p["run_dir"] and (Path(p["run_dir"]) / "metrics.jsonl").is_file():
            row = run_row(p["run_id"], Path(p["run_dir"]))
            row["run"] = f"{p['run_id']} ({p['label']})"
            rows.append(row)
            p["images_per_s"] = row["train_images_per_s"]
            p["epoch_time_s"] = row["epoch_time_s"]
            p["parameters"] = row["parameters"]
            p["model"] = row["model"]
    out = Path(sw.spec.get("runs_dir", "runs")).resolve() / "sweeps" / sw.sweep_id
    if rows:
        result["report"] = {k: str(v) for k, v in write_comparison(rows, out).items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["sweep_dir"] = str(out)
    return result


# A point named by its run id --------------------------------------------------------------------------


def point_command(action: str, run: RunRecord, config: Config, ledger: Ledger, ui: UI) -> dict | None:
    """attach/stop/pull on a sweep's point: its queue and its machine belong to the sweep, so a
    point never releases the machine by itself. None: the ordinary command applies (an ended point)."""
    if run.status in FINAL_STATUSES:
        return None if action == "pull" else (run.summary or {"run_id": run.run_id, "status": run.status})
    where = f"run {run.run_id} is point {(run.sweep_point or 0) + 1} of sweep {run.sweep_id}"
    if action == "attach":
        raise GpuRunError(f"{where}, which the sweep follows: `gpu-run sweep --resume {run.sweep_id}`")
    if run.status == "queued" and not run.handle_json:
        raise GpuRunError(
            f"{where} and has not been set up on its machine; `gpu-run stop {run.sweep_id}` stops the sweep"
        )
    host = config.host(run.host)
    handle = handle_of(run)
    backend = backend_for_run(host, handle, ui)
    if action == "stop":
        timeout = int(run.args.get("spec", {}).get("stop_timeout_s") or 120)
        with ui.spinner(f"stopping point {run.run_id} (it saves last.pth)"):
            backend.runtime.stop(handle, timeout)
        ui.info(
            f"{where}: stopped; the queue goes on with the next point (`gpu-run stop {run.sweep_id}` stops "
            f"them all), and the sweep's laptop pulls it: `gpu-run sweep --resume {run.sweep_id}`"
        )
        return {"run_id": run.run_id, "status": "stopped on the host", "run_dir": run.run_dir}
    backend.pull(handle, Path(run.run_dir), ui)  # what it wrote so far; its end is the sweep's to record
    return {"run_id": run.run_id, "status": run.status, "run_dir": run.run_dir}

"""The commands on a run that exists: attach, stop, pull, status, logs. Each finds the run in the
ledger, reconnects to its host while it is active, and ends it through run_end like `train` does."""

from __future__ import annotations

import time
from pathlib import Path

from gpu_run.backends import Backend, RunHandle, backend_for_run
from gpu_run.config import Config, Host
from gpu_run.errors import BackendError, GpuRunError, Unreachable
from gpu_run.events import read_metrics
from gpu_run.host_text import split_text
from gpu_run.ledger import ACTIVE_STATUSES, FINAL_STATUSES, Ledger, RunRecord
from gpu_run.multinode import is_multinode
from gpu_run.providers.base import StopResult
from gpu_run.run_end import finish_run, follow_and_finish, handle_of, record_end, record_stop
from gpu_run.spec import TrainSpec
from gpu_run.ui import UI


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


def handed_over(action: str, run: RunRecord, config: Config, ledger: Ledger, ui: UI) -> dict | None:
    """attach/stop/pull on a run that is not one machine's own: a sweep's point (its machine is
    the sweep's to release) or a multi-node run. None: the ordinary command applies."""
    if run.sweep_id:
        from gpu_run.sweep.run import point_command

        result = point_command(action, run, config, ledger, ui)
        if result is not None:
            return result
    if is_multinode(run):
        from gpu_run.multinode import commands

        by_action = {"attach": commands.attach, "stop": commands.stop, "pull": commands.pull}
        return by_action[action](run, config, ledger, ui)
    return None


def attach(run_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    run = ledger.get_run(run_id)
    handed = handed_over("attach", run, config, ledger, ui)
    if handed is not None:
        return handed
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
    handed = handed_over("stop", run, config, ledger, ui)
    if handed is not None:
        return handed
    if run.status not in ACTIVE_STATUSES and run.stop_failed:
        return retry_stop(run, config.host(run.host), ledger, ui)
    run, host, backend = reconnect(run_id, config, ledger, ui)
    if backend is None:
        return run.summary or {"run_id": run.run_id, "status": run.status}
    with ui.spinner(f"stopping {run.run_id}: the trainer finishes its step and saves last.pth"):
        backend.stop(handle_of(run), stop_timeout_of(run))
        exit_code = backend.wait(handle_of(run))
    # Keep the log as it was at the end, as a followed run would have.
    (Path(run.run_dir) / "train.log").write_text(
        "".join(line if line.endswith("\r") else line + "\n" for line in backend.read_logs(handle_of(run)))
    )
    return finish_run(run, host, backend, exit_code, ledger, ui, stop_asked=True)


def stop_timeout_of(run: RunRecord) -> int:
    """The --stop-timeout the run was started with: what its trainer was promised to save last.pth."""
    return int(run.args.get("spec", {}).get("stop_timeout_s") or TrainSpec.stop_timeout_s)


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
    return record_end(
        run, host, summary["status"], summary.get("exit_code"), run.ended_at or time.time(), ledger, extra=summary
    )


def pull(run_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    """Fetch what the run has produced; a run whose trainer ended is finished as at a normal end.
    When the host is gone and it synced through S3, the outputs come from S3 instead."""
    run = ledger.get_run(run_id)
    handed = handed_over("pull", run, config, ledger, ui)
    if handed is not None:
        return handed
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
    # The host is gone with its exit code; the metrics tell whether every epoch ran.
    metrics_path = run_dir / "metrics.jsonl"
    metrics = read_metrics(metrics_path.read_text()) if metrics_path.is_file() else []
    epochs_done = metrics[-1]["epoch"] if metrics else 0
    status = "succeeded" if epochs_done >= run.args.get("spec", {}).get("epochs", 0) else "stopped"
    ended = time.time()
    if run.billed_from is not None and run.billed_to is None:
        ledger.update_run(run.run_id, billed_to=ended)
    return record_end(run, host, status, None, ended, ledger, extra={"pulled_from": "s3"})


def live_status(run_id: str, config: Config, ledger: Ledger, ui: UI) -> dict:
    run = ledger.get_run(run_id)
    state = {
        "run_id": run.run_id,
        "host": run.host,
        "backend": run.backend,
        "model": run.model,
        "status": run.status,
        "exit_code": run.exit_code,
        "best_val_acc": run.best_val_acc,
        "created_at": run.created_at,
        "ended_at": run.ended_at,
        "run_dir": run.run_dir,
        "stop": {"ok": not run.stop_failed, "state": run.stop_status, "detail": run.stop_detail},
        "phases": [
            {
                "phase": p.phase,
                "status": p.status,
                "started_at": p.started_at,
                "ended_at": p.ended_at,
                "duration_s": p.duration_s,
            }
            for p in ledger.phases(run.run_id)
        ],
    }
    if is_multinode(run):
        from gpu_run.multinode import commands

        return commands.live_status(run, config, ledger, state)
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
    if is_multinode(run):
        from gpu_run.multinode import commands

        yield from commands.log_lines(run, follow, config, ui)
        return
    saved = Path(run.run_dir or "") / "train.log"
    if run.status in ACTIVE_STATUSES and run.handle_json:
        backend = backend_for_run(config.host(run.host), handle_of(run), ui)
        yield from backend.follow_logs(handle_of(run)) if follow else backend.read_logs(handle_of(run))
        return
    if not saved.is_file():
        raise GpuRunError(f"run {run.run_id} has no train.log in {run.run_dir}")
    yield from split_text(saved.read_bytes().decode("utf-8", "replace"))  # read_text would turn each \r into a line

"""How a run ends, one way for every path: follow the trainer to its end, pull the outputs, let the
machine stop and confirm it, then record the end (summary.json and the ledger) once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from gpu_run.backends import Backend, RunHandle
from gpu_run.config import Host
from gpu_run.errors import GpuRunError
from gpu_run.events import read_metrics, status_of_run
from gpu_run.ledger import Ledger, RunRecord
from gpu_run.money.budget import run_cost
from gpu_run.money.cost import format_money
from gpu_run.project import describe_command
from gpu_run.providers.base import StopResult
from gpu_run.ui import UI, TrainingDisplay


class Detached(Exception):
    """The user pressed Ctrl-C while following: the run goes on without us."""

    def __init__(self, run_id: str, hint: str | None = None):
        super().__init__(run_id)
        self.run_id = run_id
        self.hint = hint or f"gpu-run attach {run_id}"  # how to come back


def follow_and_finish(run: RunRecord, host: Host, backend: Backend, ledger: Ledger, ui: UI) -> dict:
    """Show the live display until the trainer ends, then pull, record and summarise.

    Ctrl-C raises Detached: the run goes on and `gpu-run attach` picks it up again.
    """
    exit_code = follow_to_end(run, host, backend, ledger, ui)
    return finish_run(run, host, backend, exit_code, ledger, ui)


def follow_to_end(
    run: RunRecord,
    host: Host,
    backend: Backend,
    ledger: Ledger,
    ui: UI,
    hint: str | None = None,
    watched: RunHandle | None = None,
    cost: Callable[[], str] | None = None,
) -> int:
    """The live display (train.log kept in the run folder) until the trainer ends; its exit code.
    A sweep's point passes its queue's handle as `watched` (the watchdog there holds the machine)
    and the sweep's cost so far as `cost`."""
    run_dir = Path(run.run_dir)
    handle = handle_of(run)

    def cost_line() -> str:
        if cost is not None:
            return cost()
        if host.is_free:
            return ""
        amount, _ = run_cost(host, ledger.get_run(run.run_id))
        return format_money(amount, host.currency)

    ledger.update_run(run.run_id, status="running")
    try:
        backend.ensure_watchdog(watched or handle, ui)
        command = run.args.get("command")
        display = TrainingDisplay(ui, cost_line, command=describe_command(command) if command else None)
        with ui.timed("training (the trainer's own time)"), display, open(run_dir / "train.log", "w") as log:
            # Replaying from the start rewrites train.log whole, so an attach never duplicates lines.
            for line in backend.follow_logs(handle):
                log.write(line if line.endswith("\r") else line + "\n")  # a progress bar's redraws stay redraws
                log.flush()
                display.feed(line)
        return backend.wait(handle)
    except KeyboardInterrupt:
        ledger.update_run(run.run_id, status="detached")
        raise Detached(run.run_id, hint) from None
    except GpuRunError:
        # The client lost the host, not the run: the watchdog still stops the machine.
        ledger.update_run(run.run_id, status="detached")
        raise


def is_command_run(run: RunRecord) -> bool:
    """A run of the user's own command (not our trainer)."""
    return run.args.get("command") is not None


def finish_run(
    run: RunRecord, host: Host, backend: Backend, exit_code: int, ledger: Ledger, ui: UI, stop_asked: bool = False
) -> dict:
    """`stop_asked`: `gpu-run stop` ended the job, so a user's command that exits on the SIGTERM
    counts as stopped (resumable with --resume), whatever exit code its signal handling gives."""
    run_dir = Path(run.run_dir)
    ended = time.time()
    status = status_of_run(exit_code, run_dir / "train.log")
    ledger.end_phase(run.run_id, "train", "ok" if status != "failed" else "failed", f"exit code {exit_code}", at=ended)
    with ledger.phase(run.run_id, "pull"), ui.timed("pull"):
        ended_info = backend.finish(handle_of(run), run_dir, ui)
    with ledger.phase(run.run_id, "stop"), ui.timed("stop"):
        stop_result = backend.release(handle_of(run), ui)
        record_stop(ledger, run.run_id, stop_result, run.billed_from)
    if is_command_run(run):
        cut_by_watchdog = (ended_info.get("watchdog") or {}).get("outcome") in ("max_runtime", "silent")
        if stop_asked or cut_by_watchdog:  # cut short, whatever its SIGTERM handler exits with: resumable
            status = "stopped"
        return record_end(run, host, status, exit_code, ended, ledger, extra=ended_info)
    missing = [p for p in ("checkpoints/last.pth", "metrics.jsonl") if not (run_dir / p).is_file()]
    if status == "succeeded" and missing:
        status = "failed"
        ui.error(f"the trainer exited 0 but {', '.join(missing)} did not arrive in {run_dir}")
    return record_end(run, host, status, exit_code, ended, ledger, extra=ended_info)


def record_end(
    run: RunRecord,
    host: Host,
    status: str,
    exit_code: int | None,
    ended: float,
    ledger: Ledger,
    extra: dict | None = None,
    override: dict | None = None,
) -> dict:
    """Write a run's end: summary.json in its folder and the ledger's row, from the ledger as it is
    now. Called again when something about an ended run changes (a stop confirmed later); `extra`
    carries what only the end knew (the watchdog's record, where the outputs came from), and
    `override` what a multi-node run counts its own way (its nodes, the cost summed over them)."""
    summary = {
        **(extra or {}),
        **build_summary(ledger.get_run(run.run_id), host, status, exit_code, ended),
        **(override or {}),
    }
    (Path(run.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ledger.update_run(
        run.run_id,
        status=status,
        exit_code=exit_code,
        ended_at=ended,
        summary_json=json.dumps(summary),
        best_val_acc=summary["best_val_acc"],
        cost_amount=summary["cost"]["amount"],
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
        fields["billed_to"] = billed_end(ledger, run_id, result.at, billed_from)
    ledger.update_run(run_id, **fields)


def billed_end(ledger: Ledger, run_id: str, host_said: float | None, billed_from: float) -> float:
    """When the bill ends, on the laptop's clock: the stop time the host reported, but never later
    than now (when the laptop learned of the stop: a host clock two hours ahead would otherwise
    bill two hours), nor before the job's end as the laptop saw it (a clock behind)."""
    now = time.time()
    at = min(host_said, now) if host_said is not None else now
    train_end = max((p.ended_at for p in ledger.phases(run_id) if p.phase == "train" and p.ended_at), default=None)
    return max(at, train_end or billed_from, billed_from)


def build_summary(run: RunRecord, host: Host, status: str, exit_code: int | None, ended: float) -> dict:
    run_dir = Path(run.run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    try:
        metrics = read_metrics(metrics_path.read_text(errors="replace")) if metrics_path.is_file() else []
        best = max((float(m["val_acc"]) for m in metrics), default=None)
        final = float(metrics[-1]["val_acc"]) if metrics else None
        completed = int(metrics[-1]["epoch"]) if metrics else 0
    except (ValueError, KeyError, TypeError, RecursionError):
        # metrics.jsonl came from the host (a user's script, or a hostile host): a file we cannot
        # read leaves the figures out, never the run without its end record.
        metrics, best, final, completed = [], None, None, 0
    plan = run.args
    amount, billed = run_cost(host, run, now=ended)
    handle = handle_of(run)
    command = plan.get("command")
    return {
        "run_id": run.run_id,
        "host": run.host,
        "backend": run.backend,
        "device": handle.device or None,
        "job": {"kind": "command", "command": command} if command is not None else {"kind": "trainer"},
        "model": run.model,
        "classes": plan.get("classes", []),
        "epochs": None if command is not None else plan.get("spec", {}).get("epochs"),
        "epochs_completed": completed,
        "best_val_acc": best,
        "final_val_acc": final,
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

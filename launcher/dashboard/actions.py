"""The page's buttons (stop, pull, retry a failed stop, make the report), each run in a background
thread so the server never waits on a host; the page polls for the result.

Each action calls the same function its CLI command does, with a ledger of its own (SQLite
connections belong to one thread) and a UI that writes into the action's record instead of a
terminal. One action at a time per run: a second click while a stop is under way is refused.
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from rich.console import Console

from gpu_run.config import load_config
from gpu_run.errors import GpuRunError
from gpu_run.host_text import safe
from gpu_run.ledger import ACTIVE_STATUSES, Ledger
from gpu_run.paths import ledger_path
from gpu_run.ui import UI

KINDS = ("stop", "pull", "retry-stop", "report")
MAX_OUTPUT_LINES = 200

REPORT_TIMEOUT_S = 600


class CapturedUI(UI):
    """A UI whose every line (errors too, which UI prints to stderr) lands in one buffer."""

    def __init__(self):
        self.buffer = io.StringIO()
        super().__init__(console=Console(file=self.buffer, width=100, highlight=False, color_system=None))

    def error(self, message: str) -> None:
        self.console.print(f"error: {message}", markup=False, soft_wrap=True)

    def lines(self) -> list[str]:
        return [safe(line) for line in self.buffer.getvalue().splitlines() if line.strip()][-MAX_OUTPUT_LINES:]


@dataclass
class Action:
    action_id: str
    kind: str
    run_id: str
    state: str = "running"  # running | done | failed
    message: str = ""
    ok: bool | None = None  # done, and the machine (for a stop) confirmed stopped
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    output: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"action": self.action_id, "kind": self.kind, "run_id": self.run_id, "state": self.state,
                "message": self.message, "ok": self.ok, "output": self.output}


class Busy(GpuRunError):
    """The run has an action under way."""


def stop_message(result: dict) -> tuple[str, bool]:
    stop = result.get("stop") or {}
    status = result.get("status", "?")
    if stop and not stop.get("ok", True):
        return f"run {status}; its machine is NOT confirmed stopped: {stop.get('detail')}", False
    state = f"; machine {stop.get('state')} ({stop.get('detail')})" if stop.get("state") else ""
    return f"run {status}{state}", True


def do_stop(run_id: str, ledger: Ledger, ui: UI) -> tuple[str, bool]:
    from gpu_run import run_commands

    return stop_message(run_commands.stop(run_id, load_config(), ledger, ui))


def do_retry_stop(run_id: str, ledger: Ledger, ui: UI) -> tuple[str, bool]:
    from gpu_run import run_commands

    run = ledger.get_run(run_id)
    if not run.stop_failed or run.status in ACTIVE_STATUSES:
        raise GpuRunError(f"run {run.run_id} has no failed stop to retry (machine: {run.stop_status or 'up'})")
    return stop_message(run_commands.stop(run.run_id, load_config(), ledger, ui))


def do_pull(run_id: str, ledger: Ledger, ui: UI) -> tuple[str, bool]:
    from gpu_run import run_commands

    result = run_commands.pull(run_id, load_config(), ledger, ui)
    message, ok = stop_message(result) if "stop" in result else (f"outputs in {result.get('run_dir')}", True)
    return message, ok


def do_report(run_id: str, ledger: Ledger, ui: UI) -> tuple[str, bool]:
    """`gpu-run report RUN` in a process of its own: its 300 dpi figures would take the dashboard
    past its memory budget, and pyplot's global state is not made for threads."""
    run = ledger.get_run(run_id)
    argv = [sys.executable, "-m", "gpu_run.cli", "report", run.run_id, "--json"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=REPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise GpuRunError(f"the report of {run.run_id} took over {REPORT_TIMEOUT_S} s; try `gpu-run report "
                          f"{run.run_id}`") from None
    for line in proc.stderr.splitlines():
        if line.startswith(("warning:", "error:")):  # what gpu-run says; not matplotlib's font logging
            ui.info(line)
    if proc.returncode != 0:
        said = [line for line in proc.stderr.splitlines() if line.strip()]
        raise GpuRunError(said[-1].removeprefix("error: ") if said else f"gpu-run report exited {proc.returncode}")
    return f"report written to {json.loads(proc.stdout)['report_dir']}", True


WORK: dict[str, Callable[[str, Ledger, UI], tuple[str, bool]]] = {
    "stop": do_stop, "pull": do_pull, "retry-stop": do_retry_stop, "report": do_report,
}


class Actions:
    """The actions started since the dashboard began, by id."""

    def __init__(self, work: dict[str, Callable[[str, Ledger, UI], tuple[str, bool]]] | None = None):
        self.work = work or WORK
        self._actions: dict[str, Action] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, run_id: str) -> Action:
        if kind not in self.work:
            raise GpuRunError(f"unknown action {kind!r}")
        with self._lock:
            busy = [a for a in self._actions.values() if a.run_id == run_id and a.state == "running"]
            if busy:
                raise Busy(f"run {run_id}: {busy[0].kind} is under way; wait for its result")
            action = Action(secrets.token_hex(8), kind, run_id)
            self._actions[action.action_id] = action
        threading.Thread(target=self._run, args=(action,), name=f"dashboard-{kind}-{run_id}", daemon=True).start()
        return action

    def _run(self, action: Action) -> None:
        ui = CapturedUI()
        ledger = None
        try:
            ledger = Ledger(ledger_path())
            message, ok = self.work[action.kind](action.run_id, ledger, ui)
            action.message, action.ok, action.state = message, ok, "done"
        except GpuRunError as e:
            action.message, action.ok, action.state = str(e), False, "failed"
        except Exception as e:  # shown on the page: the server goes on whatever one action hit
            action.message, action.ok, action.state = f"{type(e).__name__}: {e}", False, "failed"
        finally:
            if ledger is not None:
                ledger.close()
            action.message = safe(action.message)
            action.output = ui.lines()
            action.ended_at = time.time()

    def get(self, action_id: str) -> Action | None:
        return self._actions.get(action_id)

    def running(self) -> list[Action]:
        return [a for a in list(self._actions.values()) if a.state == "running"]

    def wait(self, timeout_s: float | None = None) -> None:
        """Until every action has ended (or the timeout): the server's Ctrl-C lets a stop finish."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.running() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)

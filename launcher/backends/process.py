"""Backend: the trainer as a plain local process, for a laptop with no Docker engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from launcher.backends.base import Backend, Job, Prepared, launcher_argv, trainer_argv
from launcher.errors import BackendError
from launcher.state import home_dir, torch_cache_dir
from launcher.ui import UI

POLL_S = 0.2


def process_identity(pid: int) -> dict | None:
    """What tells this process apart from a later one that reuses its PID: its start time (in
    clock ticks since boot, /proc/PID/stat field 22) and command line. None when there is no such
    process; a zombie has no command line. Elsewhere than Linux, `ps` gives the same two facts."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        return _ps_identity(pid)
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or parentheses.
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    return {"state": fields[0], "started": fields[19], "cmdline": cmdline}


def _ps_identity(pid: int) -> dict | None:
    out = subprocess.run(["ps", "-p", str(pid), "-o", "stat=,lstart=,command="], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"})  # lstart's layout depends on the locale
    line = out.stdout.strip()
    if out.returncode != 0 or not line:
        return None
    state, rest = line.split(None, 1)
    started, command = rest[:24], rest[24:].strip()  # lstart is fixed-width: "Mon Jan  1 00:00:00 2024"
    return {"state": state[0], "started": started, "cmdline": command.split()}


def _same_process(handle: dict) -> bool:
    """Whether the handle's PID is still the process the run started. A handle recorded before
    identities were (or where none could be read) is taken at its PID, as it always was."""
    pid = handle["pid"]
    if handle.get("started") is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie child of ours still answers kill(0)
            done, _ = os.waitpid(pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:
            return True
    now = process_identity(pid)
    if now is None or now["started"] != handle["started"]:
        return False  # gone, or its PID now belongs to another process: never ours to signal
    if now["state"] == "Z":  # ended, not yet reaped
        return False
    return now["cmdline"] == handle["cmdline"]


def _alive(handle: dict) -> bool:
    if not _same_process(handle):
        _reap(handle)
        return False
    return True


def _reap(handle: dict) -> None:
    """A zombie child of this very process (the run was started here) answers like a live one
    until it is reaped; reap it only when its start time says it is the run's own."""
    now = process_identity(handle["pid"])
    if now is not None and now["state"] == "Z" and now["started"] == handle.get("started"):
        try:
            os.waitpid(handle["pid"], os.WNOHANG)
        except ChildProcessError:
            pass


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable
        self.state_dir = home_dir() / "processes"
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"local process ({self.python})"

    def prepare(self, ui: UI) -> Prepared:
        try:
            import torch  # only this backend needs torch in the launcher's own environment
        except ImportError:
            raise BackendError("no Docker engine and no torch in this Python: start Docker or `pip install torch torchvision`") from None
        gpus = torch.cuda.device_count()
        return Prepared(image_tag=None, image_built=False, device="gpu" if gpus else "cpu")

    def start(self, job: Job, prepared: Prepared, ui: UI) -> dict:
        log_path = self.state_dir / f"{job.run_id}.log"
        exit_path = self.state_dir / f"{job.run_id}.exit"
        exit_path.unlink(missing_ok=True)
        nproc = max(1, job.gpus) if prepared.device == "gpu" or job.gpus > 1 else 1
        command = launcher_argv(self.python, nproc) + trainer_argv(job, job.data_dir, job.out_dir, job.weights)
        if prepared.device == "cpu" or job.gpus == 0:
            command += ["--device", "cpu"]
        env = {**os.environ, "TORCH_HOME": str(torch_cache_dir() / "torch"), "PYTHONUNBUFFERED": "1", **job.env}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [self.python, "-m", "launcher.backends.process_runner", str(exit_path), "--", *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal must not reach the trainer
            )
        # Recorded now, while it is surely our child: a PID alone would later name whatever
        # process the system gave it to after the run ended.
        identity = process_identity(proc.pid) or {}
        if prepared.device == "cpu":
            ui.info("running on the CPU of this machine")
        return {"backend": self.name, "pid": proc.pid, "started": identity.get("started"),
                "cmdline": identity.get("cmdline"), "log": str(log_path), "exit_file": str(exit_path)}

    def exit_code(self, handle: dict) -> int | None:
        path = Path(handle["exit_file"])
        if path.exists():
            return int(path.read_text().strip())
        if not _alive(handle):
            # Killed before it could record anything (SIGKILL, reboot): a failure.
            return -9
        return None

    def is_running(self, handle: dict) -> bool:
        return self.exit_code(handle) is None

    def follow_logs(self, handle: dict) -> Iterator[str]:
        path = Path(handle["log"])
        if not path.exists():
            return
        with open(path, "rb") as f:
            pending = b""
            while True:
                chunk = f.read(65536)
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        yield line.decode("utf-8", "replace")
                    continue
                if not self.is_running(handle):
                    rest = f.read()
                    pending += rest
                    if not rest:
                        break
                    continue
                time.sleep(POLL_S)
            if pending:
                yield pending.decode("utf-8", "replace")

    def read_logs(self, handle: dict) -> list[str]:
        path = Path(handle["log"])
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def wait(self, handle: dict) -> int:
        while (code := self.exit_code(handle)) is None:
            time.sleep(POLL_S)
        return code

    def stop(self, handle: dict, timeout_s: int = 120) -> None:
        # is_running checks the process's identity right before each signal: a PID that now
        # belongs to another process (the run ended, the PID was reused) is never signalled.
        if not self.is_running(handle):
            return
        try:
            os.killpg(handle["pid"], signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not self.is_running(handle):
                return
            time.sleep(POLL_S)
        if not self.is_running(handle):
            return
        try:
            os.killpg(handle["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, handle: dict, out_dir: Path, ui: UI) -> dict:
        for key in ("log", "exit_file"):
            Path(handle[key]).unlink(missing_ok=True)
        return {}

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


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
        if prepared.device == "cpu":
            ui.info("running on the CPU of this machine")
        return {"backend": self.name, "pid": proc.pid, "log": str(log_path), "exit_file": str(exit_path)}

    def exit_code(self, handle: dict) -> int | None:
        path = Path(handle["exit_file"])
        if path.exists():
            return int(path.read_text().strip())
        if not _alive(handle["pid"]):
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
        try:
            os.killpg(handle["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, handle: dict, out_dir: Path, ui: UI) -> dict:
        for key in ("log", "exit_file"):
            Path(handle[key]).unlink(missing_ok=True)
        return {}

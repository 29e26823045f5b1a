"""Backend: this machine (the built-in host `local`). The runtimes are the ones a rented host
uses, driven through a local shell instead of SSH: the local Docker engine when it answers, else
this Python as a plain process (a laptop without Docker). Nothing to sync (the trainer reads the
dataset where it is), nothing to pull (it writes into the run folder), nothing to stop or bill.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

from gpu_run.backends.base import Backend, Job, Prepared, RunHandle
from gpu_run.config import Host
from gpu_run.errors import BackendError
from gpu_run.local_shell import LocalShell
from gpu_run.runtimes.base import Runtime
from gpu_run.runtimes.docker import DockerRuntime, docker_version
from gpu_run.runtimes.python import PythonRuntime, find_python
from gpu_run.paths import home_dir
from gpu_run.ui import UI

POLL_S = 0.5


def local_runtime(host: Host, shell: LocalShell, workdir: str, ui: UI, handle: RunHandle | None = None) -> Runtime:
    wanted = handle.runtime if handle is not None else ""
    if wanted != "python":
        version, why_not = docker_version(shell)
        if version is not None:
            return DockerRuntime(host, shell, workdir, version)
        if wanted == "docker":
            raise BackendError(f"the run's Docker engine is not reachable ({why_not}); start Docker and try again")
        if handle is None:
            ui.info("No Docker engine reachable: the local host runs the trainer as a plain local process instead.")
    found = (handle.versions if handle is not None else None) or find_python(shell, host.python or sys.executable)
    if found is None:
        raise BackendError(f"{host.python or sys.executable} cannot import torch and torchvision; "
                           f"install them (pip install torch torchvision) or start Docker")
    return PythonRuntime(host, shell, workdir, found, "no Docker engine reachable")


class LocalBackend(Backend):
    def __init__(self, host: Host, ui: UI, handle: RunHandle | None = None):
        self.host = host
        self.shell = LocalShell()
        self.workdir = str(home_dir())
        self.runtime = local_runtime(host, self.shell, self.workdir, ui, handle)
        # The summary says which: the local engine, or a plain process.
        self.name = "docker" if self.runtime.name == "docker" else "process"

    def describe(self) -> str:
        return f"local {self.runtime.describe()}"

    def prepare(self, ui: UI) -> Prepared:
        return self.runtime.prepare(ui)

    def _state_dir(self, run_id: str) -> str:
        """Where the runtime keeps the job's pid, log and exit code (the run folder stays the user's)."""
        return f"{self.workdir}/local-runs/{run_id}"

    def start(self, job: Job, prepared: Prepared, ui: UI) -> RunHandle:
        state_dir = self._state_dir(job.run_id)
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        Path(f"{self.workdir}/cache").mkdir(parents=True, exist_ok=True)
        env_file = None
        if job.env:
            env_file = f"{state_dir}/trainer.env"
            self.shell.run(f"umask 077 && cat > '{env_file}'", input=self.runtime.env_file_bytes(job.env))
        try:
            fields = self.runtime.start(job, state_dir, prepared, env_file, ui)
        finally:
            if env_file:
                Path(env_file).unlink(missing_ok=True)
        if prepared.device == "cpu":
            ui.info("running on the CPU (no usable NVIDIA GPU here)")
        return RunHandle(backend=self.name, runtime=self.runtime.name, run_dir=state_dir, out_dir=job.out_dir,
                         versions=self.runtime.versions(), **fields)

    def follow_logs(self, handle: RunHandle) -> Iterator[str]:
        stream = self.shell.open(self.runtime.log_command(handle, follow=True))
        try:
            for raw in stream.makefile("rb"):
                yield raw.decode("utf-8", "replace").rstrip("\n")
        finally:
            stream.close()

    def read_logs(self, handle: RunHandle) -> list[str]:
        return self.shell.run(self.runtime.log_command(handle, follow=False), check=False).stdout.splitlines()

    def exit_code(self, handle: RunHandle) -> int | None:
        return self.runtime.exit_code(handle)

    def is_running(self, handle: RunHandle) -> bool:
        return self.exit_code(handle) is None

    def wait(self, handle: RunHandle) -> int:
        while (code := self.exit_code(handle)) is None:
            time.sleep(POLL_S)
        return code

    def stop(self, handle: RunHandle, timeout_s: int) -> None:
        self.runtime.stop(handle, timeout_s)

    def finish(self, handle: RunHandle, out_dir: Path, ui: UI) -> dict:
        # The outputs are in the run folder already; only the container (if any) remains.
        if handle.container:
            self.shell.run(["docker", "rm", "-f", handle.container], check=False)
        return {}

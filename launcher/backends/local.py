"""Backend: this machine (the built-in host `local`). The runtimes are the ones a rented host
uses, driven through a local shell instead of SSH: the local Docker engine when it answers, else
this Python as a plain process (a laptop without Docker). Nothing to sync (the trainer reads the
dataset where it is), nothing to pull (it writes into the run folder), nothing to stop or bill.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gpu_run.backends.base import Backend, Job, Prepared, RunHandle
from gpu_run.config import Host
from gpu_run.errors import BackendError
from gpu_run.host_text import split_output, split_text
from gpu_run.local_shell import LocalShell
from gpu_run.outputs import CommandOutputs
from gpu_run.packages import stage_packages
from gpu_run.paths import home_dir
from gpu_run.project import Project
from gpu_run.runtimes.base import Runtime
from gpu_run.runtimes.docker import DockerRuntime, docker_version
from gpu_run.runtimes.python import PythonRuntime, find_python
from gpu_run.sync.ssh_tar import SyncStats, diff_manifests, local_manifest
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
        raise BackendError(
            f"{host.python or sys.executable} cannot import torch and torchvision; "
            f"install them (pip install torch torchvision) or start Docker"
        )
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

    def stage_code(self, project: Project, ui: UI) -> str:
        """A mirror of the project's files that gpu-run owns (each run's working directory is a
        hard-linked copy of it: links into the user's own folder would let a run edit their code)."""
        mirror = Path(self.workdir) / "code" / project.project_id
        have = local_manifest(mirror)
        sent = 0
        changed, removed = diff_manifests(project.manifest, have)
        for rel in changed:
            target = mirror / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)  # a link shared with an earlier run's copy stays as it was
            shutil.copy2(project.root / rel, target)
            sent += 1
        for rel in removed:
            (mirror / rel).unlink(missing_ok=True)
        ui.info(f"project copied: {sent} file(s) changed since the last run")
        return str(mirror)

    def stage_packages(self, project: Project, ui: UI) -> str:
        return stage_packages(
            self.shell,
            self.workdir,
            self.runtime,
            project.root,
            lambda local, there: shutil.copytree(local, there, dirs_exist_ok=True),
            ui,
        )

    def work_dir_for(self, run_id: str) -> str:
        return f"{self._state_dir(run_id)}/work"

    def run_dir(self, run_id: str) -> str:
        return self._state_dir(run_id)

    def _state_dir(self, run_id: str) -> str:
        """Where the runtime keeps the job's pid, log and exit code (the run folder stays the user's)."""
        return f"{self.workdir}/local-runs/{run_id}"

    def start(self, job: Job, prepared: Prepared, ui: UI) -> RunHandle:
        state_dir = self._state_dir(job.run_id)
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        Path(f"{self.workdir}/cache").mkdir(parents=True, exist_ok=True)
        for file in job.hub_weights:  # where torch.hub looks: the cache both runtimes give the job
            place = Path(self.workdir) / "cache" / "torch" / "hub" / "checkpoints" / Path(file).name
            if not place.is_file() or place.stat().st_size != Path(file).stat().st_size:
                place.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, place)
        if job.command is not None:
            self.shell.run(self.runtime.workdir_command(job, state_dir))
            if job.seed_work_dir:  # what the stopped run's command wrote, where it looks for it
                shutil.copytree(job.seed_work_dir, job.work_dir, dirs_exist_ok=True, symlinks=True)
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
        return RunHandle(
            backend=self.name,
            runtime=self.runtime.name,
            run_dir=state_dir,
            out_dir=job.out_dir,
            versions=self.runtime.versions(),
            work_dir=job.work_dir if job.command is not None else "",
            **fields,
        )

    def follow_logs(self, handle: RunHandle) -> Iterator[str]:
        stream = self.shell.open(self.runtime.log_command(handle, follow=True))
        try:
            yield from split_output(stream.makefile("rb").read1)
        finally:
            stream.close()

    def read_logs(self, handle: RunHandle) -> list[str]:
        return split_text(self.shell.run(self.runtime.log_command(handle, follow=False), check=False).stdout)

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

    def pull(self, handle: RunHandle, out_dir: Path, ui: UI) -> None:
        if handle.work_dir:  # a user's command: what it changed in its working copy comes into work/
            outputs = CommandOutputs(out_dir)
            outputs.report(SyncStats(), outputs.copy_local(out_dir, Path(handle.work_dir)), ui)

    def finish(self, handle: RunHandle, out_dir: Path, ui: UI) -> dict:
        # The outputs are in the run folder already; only the container (if any) remains.
        self.pull(handle, out_dir, ui)
        if handle.container:
            self.shell.run(["docker", "rm", "-f", handle.container], check=False)
        return {}

"""Backend: a machine reached over SSH (a rented box, a container instance, a cloud instance).

It owns what every SSH host shares: the dataset sync (tar over SSH, or S3), the watchdog that stops
the machine, the verified pull, and the confirmed stop. How the trainer runs there is its runtime's
business (launcher/runtimes/): our image on the host's Docker engine, or the host's own Python.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from gpu_run.backends.base import Backend, Job, Prepared, RunHandle, StopResult
from gpu_run.config import Host
from gpu_run.errors import BackendError
from gpu_run.host_text import split_output, split_text
from gpu_run.outputs import CommandOutputs
from gpu_run.packages import stage_packages
from gpu_run.project import Project
from gpu_run.remote import Remote, quote
from gpu_run.runtimes.base import Runtime
from gpu_run.runtimes.docker import DockerRuntime, docker_version
from gpu_run.runtimes.python import PythonRuntime, find_python
from gpu_run.sync import ssh_tar
from gpu_run.sync.s3 import S3Store
from gpu_run.ui import UI
from gpu_run.watchdog.host import POLL_S as WATCHDOG_POLL_S
from gpu_run.watchdog.host import HostWatchdog, stop_command_problem

RECONNECT_FOR_S = 600  # how long a lost connection is retried before the client gives up (the run goes on)
_DROPPED = (paramiko.SSHException, OSError, EOFError)
_DROPPED_ANY = (BackendError, *_DROPPED)


def choose_runtime(host: Host, remote: Remote, workdir: str, handle: RunHandle | None = None) -> Runtime:
    """runtime = docker | python | auto (Docker when the engine answers, else the host's Python).
    A run's handle says which runtime it was started with: that one, without probing again."""
    if handle is not None and handle.runtime == "python" and handle.versions:
        return PythonRuntime(host, remote, workdir, handle.versions, "as the run was started")
    version, why_not = (
        (None, 'runtime = "python" in the host\'s table') if host.runtime == "python" else docker_version(remote)
    )
    if version is not None:
        return DockerRuntime(host, remote, workdir, version)
    if host.runtime == "docker":
        raise BackendError(
            f"host {host.name} has no working Docker engine ({why_not}); install Docker there and let "
            f'{remote.target.user} use it, or set runtime = "python" to use the host\'s own Python'
        )
    found = find_python(remote, host.python)
    if found is None:
        where = f"python = {host.python!r}" if host.python else "no interpreter on the host (PATH, conda, /usr/bin)"
        raise BackendError(
            f"host {host.name} has no Docker engine ({why_not}) and {where} imports torch and "
            f'torchvision; set python = "/path/to/python" in [hosts.{host.name}], or install Docker'
        )
    why = "runtime = python" if host.runtime == "python" else f"no Docker engine there: {why_not}"
    return PythonRuntime(host, remote, workdir, found, why)


class SshHostBackend(Backend):
    name = "ssh"

    def __init__(
        self,
        host: Host,
        remote: Remote,
        ui: UI,
        store: S3Store | None = None,
        provider=None,
        handle: RunHandle | None = None,
    ):
        self.host = host
        self.remote = remote
        self.store = store
        self.provider = provider  # a cloud instance to stop through its API at the end, if any
        home = remote.home()
        self.workdir = remote.expand(host.workdir, home).rstrip("/") or "/"
        self.watchdog = HostWatchdog(remote, self.workdir, host.name)
        self.runtime = choose_runtime(host, remote, self.workdir, handle)

    def describe(self) -> str:
        return f"{self.host.name} over SSH ({self.remote.target.display}), runtime {self.runtime.name}: {self.runtime.describe()}"

    # Data and the trainer -----------------------------------------------------------------------

    def stage_data(self, local_root: Path, dataset_id: str, ui: UI) -> str:
        remote_root = f"{self.workdir}/data/{dataset_id}"
        if self.store is not None:
            return self._stage_via_s3(local_root, dataset_id, remote_root, ui)
        with ui.progress("syncing dataset", total=0, unit="bytes") as update:
            stats = ssh_tar.push(self.remote, local_root, remote_root, progress=update)
        self.synced = {"files": stats.files_sent, "bytes": stats.bytes_sent}  # a sweep records what its one sync sent
        ui.info(
            f"dataset synced: {stats.files_sent} file(s), {stats.bytes_sent / 1e6:.1f} MB sent, "
            f"{stats.deleted} deleted on the host"
        )
        return remote_root

    def stage_code(self, project: Project, ui: UI) -> str:
        """A user's project into its mirror on the host (incremental, as the dataset); each run
        then works in a copy of it."""
        code_dir = f"{self.workdir}/code/{project.project_id}"
        with ui.progress("syncing the project", total=0, unit="bytes") as update:
            stats = ssh_tar.push(self.remote, project.root, code_dir, progress=update, manifest=project.manifest)
        ui.info(
            f"project synced: {stats.files_sent} file(s), {stats.bytes_sent / 1e6:.1f} MB sent, "
            f"{stats.deleted} deleted on the host"
        )
        return code_dir

    def stage_packages(self, project: Project, ui: UI) -> str:
        return stage_packages(
            self.remote,
            self.workdir,
            self.runtime,
            project.root,
            lambda local, there: ssh_tar.push(self.remote, local, there),
            ui,
        )

    def _s3sync(self, action: str, uri: str, host_dir: str) -> str:
        assert self.store is not None  # asked only of a host whose data path is S3
        return self.runtime.s3sync_command(
            action, uri, host_dir, self.store.endpoint_url, list(self.store.host_credentials_env())
        )

    def _stage_via_s3(self, local_root: Path, dataset_id: str, remote_root: str, ui: UI) -> str:
        assert self.store is not None  # asked only of a host whose data path is S3
        with ui.progress("uploading dataset to S3", total=0, unit="bytes") as update:
            stats = self.store.upload_dataset(local_root, dataset_id, progress=update)
        uri = self.store.uri(self.store.dataset_prefix(dataset_id))
        ui.info(
            f"dataset in {uri}: {stats.uploaded} file(s) uploaded, {stats.bytes / 1e6:.1f} MB, {stats.deleted} deleted"
        )
        self.remote.run(["mkdir", "-p", remote_root])
        with ui.spinner(f"{self.host.name} fetches the dataset from S3"):
            result = self.remote.run_with_env(
                self._s3sync("download", uri, remote_root),
                self.store.host_credentials_env(),
                check=False,
                timeout_s=3600,
            )
        if result.code != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise BackendError(f"{self.host.name} could not fetch the dataset from S3: {last[0]}")
        fetched = json.loads(result.stdout.strip().splitlines()[-1])
        ui.info(f"{self.host.name} fetched {fetched['fetched']} of {fetched['objects']} object(s) from S3")
        return remote_root

    def prepare(self, ui: UI) -> Prepared:
        return self.runtime.prepare(ui)

    # The run ----------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> str:
        return f"{self.workdir}/runs/{run_id}"

    def out_dir_for(self, run_id: str, local_run_dir: Path) -> str:
        return f"{self.run_dir(run_id)}/out"

    def work_dir_for(self, run_id: str) -> str:
        return f"{self.run_dir(run_id)}/work"

    def _write_env_file(self, job: Job) -> str | None:
        """The --env values, in a file only the run's user can read: `-e KEY=VALUE` on a command
        line would show them to anyone running `ps` on the host. The runtime removes it once read."""
        if not job.env:
            return None
        path = f"{self.run_dir(job.run_id)}/trainer.env"
        # umask before the file exists: it is never readable by others, not even briefly.
        self.remote.run(f"umask 077 && cat > {quote([path])}", input=self.runtime.env_file_bytes(job.env))
        return path

    def claim(self, run_id: str, keep_alive: bool) -> None:
        self.run_id = run_id
        self.keep_alive = keep_alive
        if self.store is not None:
            self.watchdog.secrets_env = self.store.host_credentials_env()
        self.watchdog.claim(run_id, self.stop_command, keep_alive, self.host.grace_s)

    def check_stop(self, keep_alive: bool, ui: UI) -> None:
        """Refuse, before any money is spent, a host whose stop command cannot work."""
        if keep_alive or self.stop_command == "none":
            return
        problem = stop_command_problem(self.remote, self.stop_command)
        if problem is None:
            return
        if self.provider is not None:  # the EC2 API stops it; the command on the host is a second line
            ui.warn(
                f"the stop command of {self.host.name} cannot work: {problem}; the instance is stopped through the EC2 API"
            )
            return
        raise BackendError(
            f"host {self.host.name}: {problem}, so the machine would never stop; fix stop_command "
            f"(`gpu-run doctor {self.host.name}` checks it) or pass --keep-alive"
        )

    @property
    def stop_command(self) -> str:
        return self.host.stop_command or "none"

    def start(self, job: Job, prepared: Prepared, ui: UI) -> RunHandle:
        run_dir = self.run_dir(job.run_id)
        self.remote.run(["mkdir", "-p", job.out_dir, f"{self.workdir}/cache"])
        if job.seed_dir:  # a resumed run continues from the last.pth it brought along
            ssh_tar.push(self.remote, Path(job.seed_dir), job.out_dir)
        if job.hub_weights:
            self._stage_hub_weights(job.hub_weights, ui)
        if job.command is not None:
            self.remote.run(self.runtime.workdir_command(job, run_dir))
            if job.seed_work_dir:  # what the stopped run's command wrote, where it looks for it
                ssh_tar.push(self.remote, Path(job.seed_work_dir), job.work_dir, delete_extra=False)
        if job.weights not in ("none", "imagenet"):
            from gpu_run.weights import stage_weights

            job.weights = stage_weights(self.remote, self.workdir, Path(job.weights), ui)  # once per host, by sha256
        # The watchdog has held the host since claim(); from here it watches for this job, so there
        # is no moment in which a trainer runs unwatched.
        self.watchdog.start_job(job.run_id, self._watchdog_settings(run_dir, job))
        env_file = self._write_env_file(job)
        try:
            fields = self.runtime.start(job, run_dir, prepared, env_file, ui)
        finally:
            if env_file:
                self.remote.run(["rm", "-f", env_file], check=False)
        if prepared.device == "cpu":
            ui.warn(
                f"{self.host.name} has no usable NVIDIA GPU: training runs on its CPU, which is slow and costs the same per hour"
            )
        return RunHandle(
            backend=self.name,
            runtime=self.runtime.name,
            run_dir=run_dir,
            out_dir=job.out_dir,
            keep_alive=job.keep_alive,
            terminate=job.terminate,
            versions=self.runtime.versions(),
            work_dir=job.work_dir if job.command is not None else "",
            **fields,
        )

    def _stage_hub_weights(self, files: list[str], ui: UI) -> None:
        """torchvision's weights files where torch.hub looks ($TORCH_HOME/hub/checkpoints, under the
        host's cache that both runtimes give the job), each sent once by sha256 and hard-linked
        into place (a symlink would point outside a container's mounts)."""
        from gpu_run.weights import stage_weights

        checkpoints = f"{self.workdir}/cache/torch/hub/checkpoints"
        for file in files:
            stored = stage_weights(self.remote, self.workdir, Path(file), ui)
            place = f"{checkpoints}/{Path(file).name}"
            self.remote.run(
                f"mkdir -p {quote([checkpoints])} && {{ ln -f {quote([stored, place])} 2>/dev/null || "
                f"cp {quote([stored, place])}; }}"
            )

    def _watchdog_settings(self, run_dir: str, job: Job) -> dict[str, str]:
        return {
            **self.runtime.watch_settings(job),
            "MAX_S": str(job.max_runtime_s),
            "SILENCE_S": str(job.silence_s),
            "STOP_TIMEOUT_S": str(job.stop_timeout_s),
            "POLL_S": str(WATCHDOG_POLL_S),
            "UPLOAD_COMMAND": self._s3sync(
                "upload", self.store.uri(self.store.run_prefix(job.run_id)), f"{run_dir}/out"
            )
            if self.store
            else "",
        }

    # Logs, with reconnects --------------------------------------------------------------------

    def _reconnecting(self):
        return Retrying(
            retry=retry_if_exception_type(_DROPPED),
            stop=stop_after_delay(RECONNECT_FOR_S),
            wait=wait_exponential(multiplier=0.5, max=15),
            reraise=True,
            before_sleep=lambda _state: self.remote.close(),
        )

    def follow_logs(self, handle: RunHandle) -> Iterator[str]:
        """All lines from the start; after a dropped connection, reconnect and skip what was shown."""
        shown = 0
        try:
            for attempt in self._reconnecting():
                with attempt:
                    channel = self.remote.open(self.runtime.log_command(handle, follow=True), timeout_s=None)
                    seen = 0
                    for line in split_output(channel.recv):
                        seen += 1
                        if seen > shown:
                            shown = seen
                            yield line
                    if channel.recv_exit_status() != 0 and self.exit_code(handle) is None:
                        raise EOFError("log stream ended while the trainer runs")
        except _DROPPED as e:
            raise BackendError(
                f"lost the connection to {self.host.name} ({e}); the run goes on: `gpu-run attach` when it is back"
            ) from None

    def read_logs(self, handle: RunHandle) -> list[str]:
        return split_text(self.remote.run(self.runtime.log_command(handle, follow=False), check=False).stdout)

    def exit_code(self, handle: RunHandle) -> int | None:
        code = self.runtime.exit_code(handle)
        if code == -1:  # ended without a code of its own (removed, killed): what the watchdog saw,
            status = self.watchdog_status(handle)  # which it records within a poll or two
            from gpu_run.watchdog.host import whole_number

            # The host wrote that file: a value that is no number ("abc", none) is not known yet.
            return whole_number(status.get("exit_code")) if status else None
        return code

    def is_running(self, handle: RunHandle) -> bool:
        return self.exit_code(handle) is None

    def wait(self, handle: RunHandle) -> int:
        for attempt in self._reconnecting():
            with attempt:
                while (code := self.exit_code(handle)) is None:
                    time.sleep(1)
                return code
        raise AssertionError("unreachable")

    def stop(self, handle: RunHandle, timeout_s: int) -> None:
        self.watchdog.attach(handle.run_id)  # this laptop pulls right after: keep the host up for it
        self.runtime.stop(handle, timeout_s)

    def watchdog_status(self, handle: RunHandle) -> dict | None:
        return self.watchdog.status(handle.run_id)

    def ensure_watchdog(self, handle: RunHandle, ui: UI) -> None:
        """The watchdog running (started again if it was killed), and this laptop's hold on the
        stop from now until its pull: the job may end at any moment, the grace may be short."""
        self.watchdog.ensure(handle.run_id, ui)
        self.watchdog.attach(handle.run_id)

    # Outputs and the end ----------------------------------------------------------------------

    def pull(self, handle: RunHandle, out_dir: Path, ui: UI) -> ssh_tar.SyncStats:
        if handle.work_dir:
            return self._pull_command_outputs(handle, out_dir, ui)
        with ui.spinner(f"pulling outputs from {self.host.name}"):
            stats = ssh_tar.pull(
                self.remote, handle.out_dir, out_dir, verify=["checkpoints/best.pth", "checkpoints/last.pth"]
            )
        ui.info(f"pulled {stats.files_sent} file(s), {stats.bytes_sent / 1e6:.1f} MB; checkpoints verified (sha256)")
        return stats

    def _pull_command_outputs(self, handle: RunHandle, run_dir: Path, ui: UI) -> ssh_tar.SyncStats:
        """A user's command: all of GPU_RUN_OUTPUT into the run folder (never over a file the
        laptop writes there), and what it created or changed in its working directory into work/,
        within the run's pull cap."""
        outputs = CommandOutputs(run_dir)
        with ui.spinner(f"pulling outputs from {self.host.name}"):
            out = ssh_tar.pull(
                self.remote, handle.out_dir, run_dir, keep=outputs.keep_output, max_bytes=outputs.cap_bytes
            )
            work = ssh_tar.pull(
                self.remote,
                handle.work_dir,
                outputs.work_dir,
                keep=outputs.keep_work,
                max_bytes=max(0, outputs.cap_bytes - out.bytes_sent),
            )
        return outputs.report(out, work, ui)

    def _again_after_drops(self, step):
        """A short step on the host, repeated over reconnects (they are all idempotent)."""
        try:
            for attempt in self._reconnecting():
                with attempt:
                    return step()
        except _DROPPED as e:
            raise BackendError(
                f"lost the connection to {self.host.name} ({e}); the run goes on: `gpu-run attach` when it is back"
            ) from None

    def finish(self, handle: RunHandle, out_dir: Path, ui: UI) -> dict:
        run_id = handle.run_id
        self._again_after_drops(lambda: self.watchdog.attach(run_id))
        self.pull(handle, out_dir, ui)
        # Read what the watchdog recorded first: once it hears the outputs are safe, it may take
        # the machine down at once. (The container stays for the watchdog to see end and remove.)
        status = self._again_after_drops(lambda: self.watchdog_status(handle)) or {}
        try:
            self.watchdog.mark_pulled(run_id)
        except _DROPPED_ANY:
            pass  # the host went down as the marker landed: the release below confirms it
        if status.get("outcome") in ("max_runtime", "silent"):
            why = (
                "it reached --max-hours"
                if status["outcome"] == "max_runtime"
                else "it logged nothing for --silence-minutes"
            )
            ui.warn(f"the watchdog stopped the job because {why}")
        return {"watchdog": status} if status else {}

    def abort(self, ui: UI, keep_alive: bool = False) -> StopResult:
        self.watchdog.detach()
        run_id = getattr(self, "run_id", None)
        if run_id is not None:
            try:
                self.watchdog.abort(run_id)  # ends the run's watchers, then releases (or keeps) the host
            except _DROPPED_ANY:
                pass  # the wait below finds out what became of the host
        if keep_alive:
            return self._report(
                StopResult(True, "kept_alive", None, f"{self.host.name} is left running (--keep-alive)"), ui
            )
        if self.provider is not None:
            return self._stop_instance(run_id, terminate=False, ui=ui)
        if run_id is None or self.stop_command == "none":
            return StopResult(True, "not_needed", None, f"nothing was started on {self.host.name}")
        return self._report(self.watchdog.wait_for_release(run_id, 0, ui), ui)

    def abandon(self, run_id: str, ui: UI) -> StopResult:
        self.run_id = run_id
        return self.abort(ui)

    def release(self, handle: RunHandle, ui: UI) -> StopResult:
        """Follow the watchdog's release of the host and confirm the stop (a cloud instance is
        stopped through its API, which says when it is)."""
        run_id = handle.run_id
        self.watchdog.detach()  # whatever happened: the laptop no longer holds the stop
        if self.provider is not None:
            if handle.keep_alive:
                return StopResult(
                    True, "kept_alive", None, f"instance {self.provider.instance_id} is left running (--keep-alive)"
                )
            return self._stop_instance(run_id, terminate=handle.terminate, ui=ui)
        try:
            earlier = self.watchdog.stop_state(run_id)
            if earlier is not None and earlier.kind == "stopped":
                # The watchdog stopped the machine while no laptop was there, and it answers now:
                # someone started it again (to fetch these outputs). Stop it again.
                ui.info(f"the watchdog stopped {self.host.name} earlier and it is up again: stopping it once more")
                return self.retry_stop(handle, ui)
            self.watchdog.ensure(run_id, ui)
        except _DROPPED_ANY:
            pass  # the host may already be going down; the wait below tells
        return self._report(self.watchdog.wait_for_release(run_id, self.host.grace_s, ui), ui)

    def retry_stop(self, handle: RunHandle, ui: UI) -> StopResult:
        """Run the stop command from here (the watchdog's attempts failed or were not confirmed)."""
        run_id = handle.run_id
        if self.provider is not None:
            return self._stop_instance(run_id, terminate=handle.terminate, ui=ui)
        others = self.watchdog.others(run_id)
        if others:
            return StopResult(True, "handed_over", time.time(), f"run {others[0]} still uses {self.host.name}")
        try:
            r = self.remote.run(["sh", "-c", self.stop_command], check=False, timeout_s=120)
        except _DROPPED_ANY:
            return self._report(self.watchdog.confirm_down(None), ui)  # a shutdown takes the connection with it
        if r.code != 0 and r.code != -1:
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [f"exit code {r.code}"]
            return self._report(
                StopResult(False, "failed", None, f"the stop command failed on {self.host.name}: {last[0]}"), ui
            )
        return self._report(self.watchdog.confirm_down(None), ui)

    def _stop_instance(self, run_id: str | None, terminate: bool, ui: UI) -> StopResult:
        others = []
        if run_id is not None:
            try:
                others = self.watchdog.others(run_id)
            except _DROPPED_ANY:
                others = []  # the host does not answer: nothing there holds it
        if others:
            return self._report(
                StopResult(
                    True, "handed_over", time.time(), f"run {others[0]} still uses instance {self.provider.instance_id}"
                ),
                ui,
            )
        try:
            result = self.provider.stop(terminate=terminate)
        except BackendError as e:
            result = StopResult(False, "failed", None, str(e))
        return self._report(result, ui)

    def _report(self, result: StopResult, ui: UI) -> StopResult:
        if result.ok:
            ui.info(result.detail)
        else:
            ui.error(f"NOT STOPPED: {result.detail}")
        return result

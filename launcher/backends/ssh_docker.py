"""Backend: the trainer in a container on a rented host's Docker engine, driven over SSH.

The engine is driven with the `docker` CLI on the host through one SSH connection (every command
quoted by Remote): that needs nothing but sshd and Docker there, reuses a single connection, and
keeps working when the laptop's SSH config is unusual. The watchdog shipped next to the run makes
the host stop itself when the job ends, whether or not the laptop is still there.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Iterator

import paramiko
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from launcher.backends.base import Backend, Job, Prepared, StopResult, launcher_argv, trainer_argv
from launcher.config import Host
from launcher.errors import BackendError, ConfigError
from launcher.image import CPU_BASE_IMAGE, choose_base_image, context_files, context_tar, image_tag
from launcher.remote import Remote, quote
from launcher.state import project_root
from launcher.sync import ssh_tar
from launcher.sync.s3 import S3Store
from launcher.ui import UI
from launcher.watchdog.host import POLL_S as WATCHDOG_POLL_S
from launcher.watchdog.host import HostWatchdog, stop_command_problem

RUN_LABEL = "gpu-run.run-id"
NO_GPU_DRIVER = "could not select device driver"
RECONNECT_FOR_S = 600  # how long a lost connection is retried before the client gives up (the run goes on)
_DROPPED = (paramiko.SSHException, OSError, EOFError)
_DROPPED_ANY = (BackendError, *_DROPPED)



def env_file_text(env: dict[str, str]) -> bytes:
    """`docker run --env-file` lines; the format has no quoting, so a line break cannot be passed."""
    for key, value in env.items():
        if "\n" in value or "\r" in value or "\0" in value:
            raise ConfigError(f"--env {key}=...: the value holds a line break or NUL, which cannot be passed "
                              f"to the container; put it in a file in the dataset folder instead")
    return "".join(f"{key}={value}\n" for key, value in env.items()).encode()


class SshDockerBackend(Backend):
    name = "ssh"

    def __init__(self, host: Host, remote: Remote, ui: UI, store: S3Store | None = None, provider=None):
        self.host = host
        self.remote = remote
        self.store = store
        self.provider = provider  # a cloud instance to stop through its API at the end, if any
        self.image_tag: str | None = None
        home = remote.home()
        self.workdir = remote.expand(host.workdir, home).rstrip("/") or "/"
        self.watchdog = HostWatchdog(remote, self.workdir, host.name)
        version = remote.run(["docker", "version", "--format", "{{.Server.Version}}"], check=False)
        if version.code != 0:
            reason = (version.stderr.strip() or version.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise BackendError(f"host {host.name} has no working Docker engine ({reason[0]}); install Docker there and let {remote.target.user} use it")
        self.engine_version = version.stdout.strip()
        runtimes = remote.run(["docker", "info", "--format", "{{json .Runtimes}}"], check=False).stdout
        self.has_nvidia = "nvidia" in runtimes

    def describe(self) -> str:
        gpu = "NVIDIA runtime" if self.has_nvidia else "no NVIDIA runtime"
        return f"{self.host.name} over SSH ({self.remote.target.display}), Docker {self.engine_version} ({gpu})"

    def _docker(self, *args: str, check: bool = True, timeout_s: float | None = 300):
        return self.remote.run(["docker", *args], check=check, timeout_s=timeout_s)

    # Data and image ---------------------------------------------------------------------------

    @functools.cached_property
    def uid_gid(self) -> str:
        """The SSH user's uid:gid, so containers write files that user owns."""
        return self.remote.run(["sh", "-c", 'printf %s:%s "$(id -u)" "$(id -g)"']).stdout

    def _helper(self, mounts: list[str], args: list[str]) -> str:
        """A `docker run` of trainer/s3sync.py in the trainer image; credentials come from the
        caller's environment by name (-e NAME), so their values appear on no command line."""
        env_args = [a for key in self.store.host_credentials_env() for a in ("-e", key)]
        volumes = [a for m in mounts for a in ("-v", m)]
        endpoint = ["--endpoint-url", self.store.endpoint_url] if self.store.endpoint_url else []
        return quote(["docker", "run", "--rm", "--network", "host", "--user", self.uid_gid, *env_args, *volumes,
                      "--entrypoint", "python3", self.image_tag, "-m", "trainer.s3sync", *args, *endpoint])

    def stage_data(self, local_root: Path, dataset_id: str, ui: UI) -> str:
        remote_root = f"{self.workdir}/data/{dataset_id}"
        if self.store is not None:
            return self._stage_via_s3(local_root, dataset_id, remote_root, ui)
        with ui.progress("syncing dataset", total=0, unit="bytes") as update:
            stats = ssh_tar.push(self.remote, local_root, remote_root, progress=update)
        ui.info(f"dataset synced: {stats.files_sent} file(s), {stats.bytes_sent / 1e6:.1f} MB sent, "
                f"{stats.deleted} deleted on the host")
        return remote_root

    def _stage_via_s3(self, local_root: Path, dataset_id: str, remote_root: str, ui: UI) -> str:
        with ui.progress("uploading dataset to S3", total=0, unit="bytes") as update:
            stats = self.store.upload_dataset(local_root, dataset_id, progress=update)
        uri = self.store.uri(self.store.dataset_prefix(dataset_id))
        ui.info(f"dataset in {uri}: {stats.uploaded} file(s) uploaded, {stats.bytes / 1e6:.1f} MB, {stats.deleted} deleted")
        self.remote.run(["mkdir", "-p", remote_root])
        with ui.spinner(f"{self.host.name} fetches the dataset from S3"):
            result = self.remote.run_with_env(
                self._helper([f"{remote_root}:/data"], ["download", uri, "/data"]),
                self.store.host_credentials_env(), check=False, timeout_s=3600,
            )
        if result.code != 0:
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise BackendError(f"{self.host.name} could not fetch the dataset from S3: {last[0]}")
        fetched = json.loads(result.stdout.strip().splitlines()[-1])
        ui.info(f"{self.host.name} fetched {fetched['fetched']} of {fetched['objects']} object(s) from S3")
        return remote_root

    def _image_exists(self, ref: str) -> bool:
        return self._docker("image", "inspect", ref, check=False).code == 0

    def _ensure_base(self, base: str, ui: UI) -> None:
        if self._image_exists(base):
            return
        if base == CPU_BASE_IMAGE:
            script = (project_root() / "docker" / "build-base-cpu.sh").read_bytes()
            with ui.spinner(f"building {CPU_BASE_IMAGE} on {self.host.name} (debootstrap, about 2 minutes)"):
                self.remote.run(["bash", "-s", CPU_BASE_IMAGE], input=script, timeout_s=1800)
            return
        with ui.spinner(f"pulling {base} on {self.host.name}"):
            self._docker("pull", base, timeout_s=3600)

    def prepare(self, ui: UI) -> Prepared:
        base = choose_base_image(self.host.base_image, self.has_nvidia)
        files = context_files()
        tag = image_tag(files, base)
        if self._image_exists(tag):
            ui.info(f"image {tag} is up to date on {self.host.name} (no build needed)")
            self.image_tag = tag
            return Prepared(image_tag=tag, image_built=False, device="gpu" if self.has_nvidia else "cpu")
        self._ensure_base(base, ui)
        with ui.spinner(f"building {tag} on {self.host.name}"):
            self.remote.run(
                ["docker", "build", "-q", "--build-arg", f"BASE_IMAGE={base}", "--label", "gpu-run=trainer", "-t", tag, "-"],
                input=context_tar(files).getvalue(), timeout_s=3600,
            )
        ui.info(f"built image {tag} on {self.host.name}")
        self.image_tag = tag
        return Prepared(image_tag=tag, image_built=True, device="gpu" if self.has_nvidia else "cpu")

    # The run ----------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> str:
        return f"{self.workdir}/runs/{run_id}"

    def _run_args(self, job: Job, prepared: Prepared, gpu: bool) -> list[str]:
        weights = job.weights
        args = [
            "run", "-d", "--name", f"gpu-run-{job.run_id}", "--label", f"{RUN_LABEL}={job.run_id}",
            "-v", f"{job.data_dir}:/data:ro", "-v", f"{job.out_dir}:/out",
            "-v", f"{self.workdir}/cache:/cache", "-e", "TORCH_HOME=/cache/torch", "-e", "HOME=/tmp",
            "--shm-size", "2g", "--user", self.uid_gid,
        ]
        if weights not in ("none", "imagenet"):
            args += ["-v", f"{weights}:/weights/{Path(weights).name}:ro"]
            weights = f"/weights/{Path(weights).name}"
        if job.env:  # the values travel in a file (see _write_env_file), never on this command line
            args += ["--env-file", self._env_file(job)]
        if gpu:
            args += ["--gpus", str(max(1, job.gpus))]
        argv = launcher_argv("python3", max(1, job.gpus)) + trainer_argv(job, "/data", "/out", weights)
        return args + ["--entrypoint", argv[0], prepared.image_tag, *argv[1:]]

    def _env_file(self, job: Job) -> str:
        return f"{self.run_dir(job.run_id)}/trainer.env"

    def _write_env_file(self, job: Job) -> None:
        """The --env values, in a file only the run's user can read, for `docker run --env-file`:
        `-e KEY=VALUE` would show them to anyone running `ps` on the host. The docker CLI reads it
        when it creates the container; _drop_env_file removes it right after. (`docker inspect`
        still shows them in the container's config to whoever may use the engine: that is where
        Docker keeps a container's environment.)"""
        if job.env:
            # umask before the file exists: it is never readable by others, not even briefly.
            self.remote.run(f"umask 077 && cat > {quote([self._env_file(job)])}", input=env_file_text(job.env))

    def _drop_env_file(self, job: Job) -> None:
        if job.env:
            self.remote.run(["rm", "-f", self._env_file(job)], check=False)

    def out_dir_for(self, run_id: str, local_run_dir: Path) -> str:
        return f"{self.run_dir(run_id)}/out"

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
            ui.warn(f"the stop command of {self.host.name} cannot work: {problem}; the instance is stopped through the EC2 API")
            return
        raise BackendError(f"host {self.host.name}: {problem}, so the machine would never stop; fix stop_command "
                           f"(`gpu-run doctor {self.host.name}` checks it) or pass --keep-alive")

    @property
    def stop_command(self) -> str:
        return self.host.stop_command or "none"

    def start(self, job: Job, prepared: Prepared, ui: UI) -> dict:
        run_dir = self.run_dir(job.run_id)
        self.remote.run(["mkdir", "-p", job.out_dir, f"{self.workdir}/cache"])
        if job.seed_dir:  # a resumed run continues from the last.pth it brought along
            ssh_tar.push(self.remote, Path(job.seed_dir), job.out_dir)
        if job.weights not in ("none", "imagenet"):
            remote_weights = f"{run_dir}/weights/{Path(job.weights).name}"
            self.remote.run(["mkdir", "-p", f"{run_dir}/weights"])
            self.remote.run(f"cat > {quote([remote_weights])}", input=Path(job.weights).read_bytes(), timeout_s=3600)
            job.weights = remote_weights
        self.image_tag = prepared.image_tag
        container = f"gpu-run-{job.run_id}"
        # The watchdog has held the host since claim(); from here it watches for this container,
        # so there is no moment in which a trainer runs unwatched.
        self.watchdog.start_job(job.run_id, self._watchdog_settings(run_dir, container, job))
        use_gpu = prepared.device == "gpu" and job.gpus != 0
        self._write_env_file(job)
        result = self._docker(*self._run_args(job, prepared, use_gpu), check=False)
        if result.code != 0 and use_gpu and NO_GPU_DRIVER in result.stderr:
            self._docker("rm", "-f", container, check=False)
            prepared.device = "cpu"
            result = self._docker(*self._run_args(job, prepared, False), check=False)
        self._drop_env_file(job)
        if result.code != 0:
            raise BackendError(f"could not start the trainer on {self.host.name}: {result.stderr.strip().splitlines()[-1:]}")
        if prepared.device == "cpu":
            ui.warn(f"{self.host.name} has no usable NVIDIA GPU: training runs on its CPU, which is slow and costs the same per hour")
        return {"backend": self.name, "container": container, "run_dir": run_dir, "out_dir": job.out_dir,
                "keep_alive": job.keep_alive, "terminate": job.terminate}

    def _watchdog_settings(self, run_dir: str, container: str, job: Job) -> dict[str, str]:
        return {
            "CONTAINER": container, "MAX_S": str(job.max_runtime_s), "SILENCE_S": str(job.silence_s),
            "STOP_TIMEOUT_S": str(job.stop_timeout_s), "POLL_S": str(WATCHDOG_POLL_S),
            "UPLOAD_COMMAND": self._helper([f"{run_dir}/out:/out:ro"],
                                           ["upload", "/out", self.store.uri(self.store.run_prefix(job.run_id))])
            if self.store else "",
        }

    # Logs, with reconnects --------------------------------------------------------------------

    def _reconnecting(self):
        return Retrying(retry=retry_if_exception_type(_DROPPED), stop=stop_after_delay(RECONNECT_FOR_S),
                        wait=wait_exponential(multiplier=0.5, max=15), reraise=True,
                        before_sleep=lambda _state: self.remote.close())

    def follow_logs(self, handle: dict) -> Iterator[str]:
        """All lines from the start; after a dropped connection, reconnect and skip what was shown."""
        shown = 0
        try:
            for attempt in self._reconnecting():
                with attempt:
                    channel = self.remote.open(["docker", "logs", "-f", handle["container"]], timeout_s=None)
                    # stdout and stderr interleave as the trainer wrote them.
                    channel.set_combine_stderr(True)
                    seen = 0
                    for raw in channel.makefile("rb"):
                        seen += 1
                        if seen > shown:
                            shown = seen
                            yield raw.decode("utf-8", "replace").rstrip("\n")
                    if channel.recv_exit_status() != 0 and self.exit_code(handle) is None:
                        raise EOFError("log stream ended while the container runs")
        except _DROPPED as e:
            raise BackendError(f"lost the connection to {self.host.name} ({e}); the run goes on: `gpu-run attach` when it is back") from None

    def read_logs(self, handle: dict) -> list[str]:
        r = self.remote.run(f"docker logs {quote([handle['container']])} 2>&1", check=False)
        return r.stdout.splitlines()

    def exit_code(self, handle: dict) -> int | None:
        r = self._docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", handle["container"], check=False)
        if r.code != 0:
            status = self.watchdog_status(handle)
            return int(status["exit_code"]) if status else None
        state, code = r.stdout.split()
        return None if state in ("created", "running", "restarting") else int(code)

    def is_running(self, handle: dict) -> bool:
        return self.exit_code(handle) is None

    def wait(self, handle: dict) -> int:
        for attempt in self._reconnecting():
            with attempt:
                while (code := self.exit_code(handle)) is None:
                    time.sleep(1)
                return code
        raise AssertionError("unreachable")

    def stop(self, handle: dict, timeout_s: int = 120) -> None:
        self.watchdog.hold(run_id_of(handle))  # this laptop pulls right after: keep the host up for it
        self._docker("stop", "-t", str(timeout_s), handle["container"], check=False, timeout_s=timeout_s + 60)

    def watchdog_status(self, handle: dict) -> dict | None:
        return self.watchdog.status(run_id_of(handle))

    def ensure_watchdog(self, handle: dict, ui: UI) -> None:
        self.watchdog.ensure(run_id_of(handle), ui)

    # Outputs and the end ----------------------------------------------------------------------

    def pull(self, handle: dict, out_dir: Path, ui: UI) -> ssh_tar.SyncStats:
        with ui.spinner(f"pulling outputs from {self.host.name}"):
            stats = ssh_tar.pull(self.remote, handle["out_dir"], out_dir,
                                 verify=["checkpoints/best.pth", "checkpoints/last.pth"])
        ui.info(f"pulled {stats.files_sent} file(s), {stats.bytes_sent / 1e6:.1f} MB; checkpoints verified (sha256)")
        return stats

    def _again_after_drops(self, step):
        """A short step on the host, repeated over reconnects (they are all idempotent)."""
        try:
            for attempt in self._reconnecting():
                with attempt:
                    return step()
        except _DROPPED as e:
            raise BackendError(f"lost the connection to {self.host.name} ({e}); the run goes on: "
                               f"`gpu-run attach` when it is back") from None

    def finish(self, handle: dict, out_dir: Path, ui: UI) -> dict:
        run_id = run_id_of(handle)
        self._again_after_drops(lambda: self.watchdog.hold(run_id))
        self.pull(handle, out_dir, ui)
        # The outputs are safe: the watchdog may release the host now instead of after the grace.
        # The container stays for the watchdog to see end and to remove itself.
        self._again_after_drops(lambda: self.watchdog.mark_pulled(run_id))
        status = self._again_after_drops(lambda: self.watchdog_status(handle)) or {}
        if status.get("outcome") in ("max_runtime", "silent"):
            why = "it reached --max-hours" if status["outcome"] == "max_runtime" else "it logged nothing for --silence-minutes"
            ui.warn(f"the watchdog stopped the job because {why}")
        return {"watchdog": status} if status else {}

    def abort(self, ui: UI, keep_alive: bool = False) -> StopResult:
        run_id = getattr(self, "run_id", None)
        if run_id is not None:
            try:
                self.watchdog.abort(run_id)  # ends the run's watchers, then releases (or keeps) the host
            except _DROPPED_ANY:
                pass  # the wait below finds out what became of the host
        if keep_alive:
            return self._report(StopResult(True, "kept_alive", None, f"{self.host.name} is left running (--keep-alive)"), ui)
        if self.provider is not None:
            return self._stop_instance(run_id, terminate=False, ui=ui)
        if run_id is None or self.stop_command == "none":
            return StopResult(True, "not_needed", None, f"nothing was started on {self.host.name}")
        return self._report(self.watchdog.wait_for_release(run_id, 0, ui), ui)

    def abandon(self, run_id: str, ui: UI) -> StopResult:
        self.run_id = run_id
        return self.abort(ui)

    def release(self, handle: dict, ui: UI) -> StopResult:
        """Follow the watchdog's release of the host and confirm the stop (a cloud instance is
        stopped through its API, which says when it is)."""
        run_id = run_id_of(handle)
        if self.provider is not None:
            if handle.get("keep_alive"):
                return StopResult(True, "kept_alive", None, f"instance {self.provider.instance_id} is left running (--keep-alive)")
            return self._stop_instance(run_id, terminate=handle.get("terminate", False), ui=ui)
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

    def retry_stop(self, handle: dict, ui: UI) -> StopResult:
        """Run the stop command from here (the watchdog's attempts failed or were not confirmed)."""
        run_id = run_id_of(handle)
        if self.provider is not None:
            return self._stop_instance(run_id, terminate=handle.get("terminate", False), ui=ui)
        others = self.watchdog.others(run_id)
        if others:
            return StopResult(True, "handed_over", time.time(), f"run {others[0]} still uses {self.host.name}")
        try:
            r = self.remote.run(["sh", "-c", self.stop_command], check=False, timeout_s=120)
        except _DROPPED_ANY:
            return self._report(self.watchdog.confirm_down(None), ui)  # a shutdown takes the connection with it
        if r.code != 0 and r.code != -1:
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [f"exit code {r.code}"]
            return self._report(StopResult(False, "failed", None, f"the stop command failed on {self.host.name}: {last[0]}"), ui)
        return self._report(self.watchdog.confirm_down(None), ui)

    def _stop_instance(self, run_id: str | None, terminate: bool, ui: UI) -> StopResult:
        others = []
        if run_id is not None:
            try:
                others = self.watchdog.others(run_id)
            except _DROPPED_ANY:
                others = []  # the host does not answer: nothing there holds it
        if others:
            return self._report(StopResult(True, "handed_over", time.time(),
                                           f"run {others[0]} still uses instance {self.provider.instance_id}"), ui)
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


def run_id_of(handle: dict) -> str:
    return handle["run_dir"].rstrip("/").rsplit("/", 1)[-1]

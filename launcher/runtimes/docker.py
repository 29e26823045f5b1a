"""Runtime: the trainer in our image on the host's Docker engine, driven with the `docker` CLI.

The CLI over the one SSH connection needs nothing but sshd and Docker on the host and keeps
working whatever the laptop's SSH config (the Docker SDK's ssh:// transport ignores keys and ports
from it, and opens one SSH session per HTTP connection).
"""

from __future__ import annotations

import functools
from pathlib import Path

from gpu_run.backends.base import Job, Prepared, RunHandle, command_argv, job_env, launcher_argv, trainer_argv
from gpu_run.config import Host
from gpu_run.errors import BackendError
from gpu_run.image import CPU_BASE_IMAGE, choose_base_image, context_files, context_tar, image_tag
from gpu_run.packages import INSTALL
from gpu_run.remote import Remote, quote
from gpu_run.runtimes.base import PYTHON_TAGS, Runtime
from gpu_run.shipped import base_image_script
from gpu_run.ui import UI

RUN_LABEL = "gpu-run.run-id"
PACKAGES_IN_CONTAINER = "/opt/gpu-run-pydeps"
NO_GPU_DRIVER = "could not select device driver"


def docker_version(remote: Remote) -> tuple[str | None, str]:
    """The engine's version, or None and why not (for choosing the runtime and for doctor)."""
    r = remote.run(["docker", "version", "--format", "{{.Server.Version}}"], check=False)
    if r.code == 0:
        return r.stdout.strip(), ""
    return None, ((r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"])[0]


class DockerRuntime(Runtime):
    name = "docker"
    sees_host_paths = False

    def __init__(self, host: Host, remote: Remote, workdir: str, engine_version: str):
        super().__init__(host, remote, workdir)
        self.engine_version = engine_version
        runtimes = remote.run(["docker", "info", "--format", "{{json .Runtimes}}"], check=False).stdout
        self.has_nvidia = "nvidia" in runtimes
        self.image_tag: str | None = None

    def describe(self) -> str:
        gpu = "NVIDIA runtime" if self.has_nvidia else "no NVIDIA runtime"
        return f"Docker {self.engine_version} ({gpu})"

    def _docker(self, *args: str, check: bool = True, timeout_s: float | None = 300):
        return self.remote.run(["docker", *args], check=check, timeout_s=timeout_s)

    @functools.cached_property
    def uid_gid(self) -> str:
        """The SSH user's uid:gid, so containers write files that user owns."""
        return self.remote.run(["sh", "-c", 'printf %s:%s "$(id -u)" "$(id -g)"']).stdout

    # The image ----------------------------------------------------------------------------------

    def _image_exists(self, ref: str) -> bool:
        return self._docker("image", "inspect", ref, check=False).code == 0

    def _ensure_base(self, base: str, ui: UI) -> None:
        if self._image_exists(base):
            return
        if base == CPU_BASE_IMAGE:
            script = base_image_script()
            with ui.spinner(f"building {CPU_BASE_IMAGE} on {self.host.name} (debootstrap, about 2 minutes)"):
                self.remote.run(["bash", "-s", CPU_BASE_IMAGE], input=script, timeout_s=1800)
            return
        with ui.spinner(f"pulling {base} on {self.host.name}"):
            self._docker("pull", base, timeout_s=3600)

    def prepare(self, ui: UI) -> Prepared:
        base = choose_base_image(self.host.base_image, self.has_nvidia)
        files = context_files()
        tag = image_tag(files, base)
        device = "gpu" if self.has_nvidia else "cpu"
        if self._image_exists(tag):
            ui.info(f"image {tag} is up to date on {self.host.name} (no build needed)")
            self.image_tag = tag
            return Prepared(image_tag=tag, image_built=False, device=device)
        self._ensure_base(base, ui)
        with ui.spinner(f"building {tag} on {self.host.name}"):
            self.remote.run(
                [
                    "docker",
                    "build",
                    "-q",
                    "--build-arg",
                    f"BASE_IMAGE={base}",
                    "--label",
                    "gpu-run=trainer",
                    "-t",
                    tag,
                    "-",
                ],
                input=context_tar(files).getvalue(),
                timeout_s=3600,
            )
        ui.info(f"built image {tag} on {self.host.name}")
        self.image_tag = tag
        return Prepared(image_tag=tag, image_built=True, device=device)

    # The run --------------------------------------------------------------------------------------

    def _run_args(self, job: Job, prepared: Prepared, gpu: bool, env_file: str | None) -> list[str]:
        args = [
            "run",
            "-d",
            "--name",
            f"gpu-run-{job.run_id}",
            "--label",
            f"{RUN_LABEL}={job.run_id}",
            "-v",
            f"{job.out_dir}:/out",
            "-v",
            f"{self.workdir}/cache:/cache",
            "-e",
            "TORCH_HOME=/cache/torch",
            "-e",
            "HOME=/tmp",
            "--shm-size",
            "2g",
            "--user",
            self.uid_gid,
        ]
        if job.command is None:
            mounts, argv = self._trainer_mounts_and_argv(job)
        else:
            mounts, argv = self._command_mounts_and_argv(job)
        args += mounts
        if env_file:
            # The values travel in a file only the run's user can read, never on this command
            # line (`ps`). `docker inspect` still shows them to whoever may use the engine: that is
            # where Docker keeps a container's environment.
            args += ["--env-file", env_file]
        if job.nnodes > 1:  # the rendezvous and gloo/NCCL talk to the other machines directly
            args += ["--network", "host"]
        if gpu:
            # A sweep running points side by side gives each its own GPUs ("device=0,1", quoted
            # for the engine's CSV parser).
            args += ["--gpus", f'"device={job.devices}"' if job.devices else str(max(1, job.gpus))]
        return args + ["--entrypoint", argv[0], prepared.image_tag, *argv[1:]]

    def _trainer_mounts_and_argv(self, job: Job) -> tuple[list[str], list[str]]:
        weights = job.weights
        mounts = ["-v", f"{job.data_dir}:/data:ro", "-e", f"GPU_RUN_RUN_ID={job.run_id}"]
        if weights not in ("none", "imagenet"):
            mounts += ["-v", f"{weights}:/weights/{Path(weights).name}:ro"]
            weights = f"/weights/{Path(weights).name}"
        return mounts, launcher_argv("python3", max(1, job.gpus), job) + trainer_argv(job, "/data", "/out", weights)

    def _command_mounts_and_argv(self, job: Job) -> tuple[list[str], list[str]]:
        """A user's command: its working directory at /work, the dataset read-only at /data and at
        its place inside the project, and an init process, so that the command is not PID 1 (which
        ignores a SIGTERM it has no handler for) and `docker stop` reaches it as a signal."""
        data_seen = f"/work/{job.data_rel}" if job.data_rel else ("/data" if job.data_dir else "")
        mounts = ["--init", "-v", f"{job.work_dir}:/work", "-w", "/work"]
        if job.data_dir:
            mounts += ["-v", f"{job.data_dir}:/data:ro"]
            if job.data_rel:
                mounts += ["-v", f"{job.data_dir}:/work/{job.data_rel}:ro"]
        env = job_env(job, data_seen, "/out")
        if job.packages_dir:  # requirements.txt's packages, read-only, first on the path
            mounts += ["-v", f"{job.packages_dir}:{PACKAGES_IN_CONTAINER}:ro"]
            env["PYTHONPATH"] = PACKAGES_IN_CONTAINER
        for key, value in env.items():
            mounts += ["-e", f"{key}={value}"]
        return mounts, command_argv("python3", job)

    def python_tags(self) -> tuple[str, str]:
        out = self._docker("run", "--rm", "--entrypoint", "python3", self.image_tag or "", "-c", PYTHON_TAGS).stdout
        version, platform = out.split()[-2:]
        return version, platform

    def install_packages_command(self, wheels_dir: str, site_dir: str) -> str:
        parent, name = site_dir.rsplit("/", 1)
        return quote(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "none",
                "--user",
                self.uid_gid,
                "-v",
                f"{wheels_dir}:/wheels:ro",
                "-v",
                f"{parent}:/pydeps",
                "--entrypoint",
                "python3",
                self.image_tag or "",
                "-c",
                INSTALL,
                "/wheels",
                f"/pydeps/{name}",
            ]
        )

    def start(self, job: Job, run_dir: str, prepared: Prepared, env_file: str | None, ui: UI) -> dict:
        self.image_tag = prepared.image_tag
        container = f"gpu-run-{job.run_id}"
        use_gpu = prepared.device == "gpu" and job.gpus != 0
        result = self._docker(*self._run_args(job, prepared, use_gpu, env_file), check=False)
        if result.code != 0 and use_gpu and NO_GPU_DRIVER in result.stderr:
            # An engine that lists the runtime may still lack a working driver: the container is
            # left Created; remove it and run the CPU variant.
            self._docker("rm", "-f", container, check=False)
            prepared.device = "cpu"
            result = self._docker(*self._run_args(job, prepared, False, env_file), check=False)
        if result.code != 0:
            raise BackendError(
                f"could not start the trainer on {self.host.name}: {result.stderr.strip().splitlines()[-1:]}"
            )
        return {"container": container}

    def start_command(self, job: Job, run_dir: str, prepared: Prepared, env_file: str | None) -> str:
        """start() in one shell command (a sweep's queue runs it later): the same CPU fallback
        when the engine has no working GPU driver, and the env file removed once read."""
        container = quote([f"gpu-run-{job.run_id}"])
        use_gpu = prepared.device == "gpu" and job.gpus != 0
        cpu_run = quote(["docker", *self._run_args(job, prepared, False, env_file)])
        command = f"docker rm -f {container} >/dev/null 2>&1; "
        if use_gpu:
            gpu_run = quote(["docker", *self._run_args(job, prepared, True, env_file)])
            command += (
                f'out=$({gpu_run} 2>&1); rc=$?; if [ $rc -ne 0 ]; then case "$out" in '
                f"*{quote([NO_GPU_DRIVER])}*) docker rm -f {container} >/dev/null 2>&1; {cpu_run} >/dev/null; rc=$? ;; "
                f"*) printf '%s\\n' \"$out\" >&2 ;; esac; fi; "
            )
        else:
            command += f"{cpu_run} >/dev/null; rc=$?; "
        if env_file:
            command += f"rm -f {quote([env_file])}; "
        return command + "exit $rc"

    def state_command(self, handle: RunHandle) -> str:
        # An engine that does not answer (restarting) is not the job's end: that reads as running.
        return (
            f"s=$(docker inspect -f '{{{{.State.Status}}}} {{{{.State.ExitCode}}}}' {quote([handle.container])} 2>&1) "
            f"|| {{ case \"$s\" in *'o such'*) echo gone ;; *) echo running ;; esac; exit 0; }}; "
            'set -- $s; case "$1" in created|running|restarting|paused) echo running ;; *) echo "$2" ;; esac'
        )

    def stop_command(self, handle: RunHandle, timeout_s: int) -> str:
        return quote(["docker", "stop", "-t", str(timeout_s), handle.container]) + " >/dev/null 2>&1; true"

    def logs_command(self, handle: RunHandle) -> str | None:
        return quote(["docker", "logs", "-f", handle.container])

    def remove_command(self, handle: RunHandle) -> str | None:
        return quote(["docker", "rm", "-f", handle.container]) + " >/dev/null 2>&1; true"

    def watch_settings(self, job: Job) -> dict[str, str]:
        return {"WATCH": "container", "CONTAINER": f"gpu-run-{job.run_id}"}

    def log_command(self, handle: RunHandle, follow: bool) -> str:
        return quote(["docker", "logs", *(["-f"] if follow else []), handle.container]) + " 2>&1"

    def exit_code(self, handle: RunHandle) -> int | None:
        r = self._docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", handle.container, check=False)
        if r.code != 0:
            if "no such" in (r.stderr + r.stdout).lower():
                return -1  # removed (by the watchdog, after the end): the caller asks the watchdog
            return None  # the engine does not answer (restarting): that is not the job's end
        words = r.stdout.split()
        # The host answers: "running" alone, "exited abc" or 10**400 is no news of the job's end,
        # just as silence is not. An exit status fits in 32 bits (and so in the ledger).
        if len(words) != 2 or words[0] in ("created", "running", "restarting"):
            return None
        try:
            value = int(words[1])
        except ValueError:
            return None
        return value if -(2**31) <= value < 2**31 else None

    def stop(self, handle: RunHandle, timeout_s: int) -> None:
        self._docker("stop", "-t", str(timeout_s), handle.container, check=False, timeout_s=timeout_s + 60)

    def s3sync_command(
        self, action: str, uri: str, host_dir: str, endpoint_url: str | None, credential_names: list[str]
    ) -> str:
        """A `docker run` of trainer/s3sync.py in the trainer image; credentials by name (-e NAME),
        so their values appear on no command line."""
        inside = "/data" if action == "download" else "/out"
        mount = f"{host_dir}:{inside}" + (":ro" if action == "upload" else "")
        paths = [uri, inside] if action == "download" else [inside, uri]
        endpoint = ["--endpoint-url", endpoint_url] if endpoint_url else []
        env_args = [a for key in credential_names for a in ("-e", key)]
        return quote(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "host",
                "--user",
                self.uid_gid,
                *env_args,
                "-v",
                mount,
                "--entrypoint",
                "python3",
                self.image_tag,
                "-m",
                "trainer.s3sync",
                action,
                *paths,
                *endpoint,
            ]
        )

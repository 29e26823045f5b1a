"""What a runtime offers the SSH host backend: prepare, start, read the log, exit code, stop."""

from __future__ import annotations

from abc import ABC, abstractmethod

from gpu_run.backends.base import Job, Prepared, RunHandle
from gpu_run.config import Host
from gpu_run.remote import Remote, quote
from gpu_run.ui import UI

# What reads the job's interpreter's wheel tags.
PYTHON_TAGS = "import sys, sysconfig; print('%d.%d' % sys.version_info[:2], sysconfig.get_platform())"


def env_file_text(env: dict[str, str]) -> bytes:
    """KEY=VALUE lines (`docker run --env-file`, or sourced by the process wrapper); the format
    has no quoting, so a line break cannot be passed. check_spec refused these already; checked
    again here, the last step before a file that sh sources, whatever path the env came by."""
    from gpu_run.spec import check_env  # the one spelling of a valid --env, beside the other option checks

    check_env(env)
    return "".join(f"{key}={value}\n" for key, value in env.items()).encode()


class Runtime(ABC):
    """The trainer on one host: everything here runs through `remote`, quoted."""

    name: str

    def __init__(self, host: Host, remote: Remote, workdir: str):
        self.host, self.remote, self.workdir = host, remote, workdir

    def env_file_bytes(self, env: dict[str, str]) -> bytes:
        """The --env values as the runtime reads them from a file."""
        return env_file_text(env)

    # Whether the job sees the host's paths (a process) or its own (a container's mounts).
    sees_host_paths = True

    def workdir_command(self, job: Job, run_dir: str) -> str:
        """A user's command: the shell command that makes its working directory, a copy of the
        project's mirror in hard links (one run's outputs never appear in another's), with the
        dataset at its place inside the project, and `python`/`pip` on its PATH meaning the
        runtime's interpreter. Run once, before the job starts."""
        work = job.work_dir
        steps = [f"rm -rf {quote([work])}", f"mkdir -p {quote([work])}"]
        if job.code_dir:
            steps.append(f"cp -al {quote([job.code_dir + '/.'])} {quote([work + '/'])}")
        if job.data_rel and job.data_dir:
            place = f"{work}/{job.data_rel}"
            if self.sees_host_paths:
                steps += [
                    f"mkdir -p {quote([place.rsplit('/', 1)[0]])}",
                    f"ln -s {quote([job.data_dir])} {quote([place])}",
                ]
            else:  # the container mounts the dataset there; the folder is its mount point
                steps.append(f"mkdir -p {quote([place])}")
        python = getattr(self, "python", None)
        if python and self.sees_host_paths:
            bin_dir = f"{run_dir}/bin"
            pip = f'#!/bin/sh\nexec {quote([python])} -m pip "$@"\n'
            steps += [
                f"mkdir -p {quote([bin_dir])}",
                f"ln -sf {quote([python])} {quote([bin_dir + '/python'])}",
                f"ln -sf {quote([python])} {quote([bin_dir + '/python3'])}",
                f"printf {quote([pip])} > {quote([bin_dir + '/pip'])}",
                f"chmod +x {quote([bin_dir + '/pip'])}",
            ]
        return " && ".join(steps)

    @abstractmethod
    def python_tags(self) -> tuple[str, str]:
        """(Python X.Y, sysconfig platform) of the interpreter the job runs in, for its wheels."""

    @abstractmethod
    def install_packages_command(self, wheels_dir: str, site_dir: str) -> str:
        """A shell command unpacking the wheels in wheels_dir into site_dir with the job's interpreter."""

    @abstractmethod
    def describe(self) -> str:
        """What runs the trainer there, in a few words, for the user."""

    @abstractmethod
    def prepare(self, ui: UI) -> Prepared:
        """Make sure the trainer can start: the image built, or the code shipped and Python checked."""

    def versions(self) -> dict:
        """Torch, torchvision and CUDA as the trainer will see them (for the run's summary)."""
        return {}

    @abstractmethod
    def start(self, job: Job, run_dir: str, prepared: Prepared, env_file: str | None, ui: UI) -> dict:
        """Start the trainer detached; the RunHandle fields that find it again."""

    @abstractmethod
    def start_command(self, job: Job, run_dir: str, prepared: Prepared, env_file: str | None) -> str:
        """The shell command start() runs, for a sweep's queue to run on the host later: it starts
        the trainer detached, removes env_file once read, and exits non-zero when it could not."""

    @abstractmethod
    def state_command(self, handle: RunHandle) -> str:
        """A shell command printing `running`, the trainer's exit code once it ended, or `gone`."""

    @abstractmethod
    def stop_command(self, handle: RunHandle, timeout_s: int) -> str:
        """A shell command: SIGTERM (the trainer saves last.pth at its next step), killed after timeout_s."""

    def logs_command(self, handle: RunHandle) -> str | None:
        """For a trainer whose output is not a file on the host already: a command following it."""
        return None

    def remove_command(self, handle: RunHandle) -> str | None:
        """What removes an ended trainer's leftovers (a container), if anything."""
        return None

    @abstractmethod
    def watch_settings(self, job: Job) -> dict[str, str]:
        """What the watchdog needs to watch this job (watchdog.env)."""

    @abstractmethod
    def log_command(self, handle: RunHandle, follow: bool) -> str:
        """A shell command printing the trainer's output from the start (and on, with follow,
        until the trainer ends)."""

    @abstractmethod
    def exit_code(self, handle: RunHandle) -> int | None:
        """None while the trainer runs; its exit code after; -1 when it ended without one."""

    @abstractmethod
    def stop(self, handle: RunHandle, timeout_s: int) -> None:
        """SIGTERM (the trainer saves last.pth at its next step), killed after timeout_s."""

    @abstractmethod
    def s3sync_command(
        self, action: str, uri: str, host_dir: str, endpoint_url: str | None, credential_names: list[str]
    ) -> str:
        """A shell command running trainer/s3sync.py on the host (credentials from the caller's
        environment, by name)."""

"""Backend: the trainer in a container on a Docker engine (the local one, or a host's over SSH)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import docker
import docker.errors
from docker.types import DeviceRequest

from launcher.backends.base import Backend, Job, Prepared, launcher_argv, trainer_argv
from launcher.errors import BackendError
from launcher.image import choose_base_image, ensure_trainer_image
from launcher.state import torch_cache_dir
from launcher.ui import UI

RUN_LABEL = "gpu-run.run-id"
NO_GPU_DRIVER = "could not select device driver"


def connect(base_url: str | None = None, timeout_s: int = 10) -> docker.DockerClient | None:
    """A client whose engine answered a ping, or None when there is no engine to talk to."""
    try:
        client = docker.DockerClient(base_url=base_url, timeout=timeout_s) if base_url else docker.from_env(timeout=timeout_s)
        client.ping()
        return client
    except (docker.errors.DockerException, OSError):
        return None


def split_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Docker streams arbitrary byte chunks; the display wants whole lines."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, client: docker.DockerClient, base_image: str | None = None,
                 docker_host: str | None = None, cache_dir: str | None = None, label: str = "local Docker engine"):
        self.client = client
        self.base_image = base_image
        self.docker_host = docker_host
        self.cache_dir = cache_dir or str(torch_cache_dir())
        self.label = label
        info = client.info()
        self.engine_version = client.version().get("Version", "?")
        self.has_nvidia = "nvidia" in (info.get("Runtimes") or {})

    def describe(self) -> str:
        gpu = "NVIDIA runtime" if self.has_nvidia else "no NVIDIA runtime"
        return f"{self.label} {self.engine_version} ({gpu})"

    def prepare(self, ui: UI) -> Prepared:
        base = choose_base_image(self.base_image, self.has_nvidia)
        tag, built = ensure_trainer_image(self.client, base, ui, self.docker_host)
        return Prepared(image_tag=tag, image_built=built, device="gpu" if self.has_nvidia else "cpu")

    # The container ----------------------------------------------------------------------------

    def _create(self, job: Job, prepared: Prepared, gpu: bool):
        mounts = {
            job.data_dir: {"bind": "/data", "mode": "ro"},
            job.out_dir: {"bind": "/out", "mode": "rw"},
            self.cache_dir: {"bind": "/cache", "mode": "rw"},
        }
        weights = job.weights
        if weights not in ("none", "imagenet"):
            mounts[weights] = {"bind": f"/weights/{Path(weights).name}", "mode": "ro"}
            weights = f"/weights/{Path(weights).name}"
        argv = launcher_argv("python3", max(1, job.gpus)) + trainer_argv(job, "/data", "/out", weights)
        kwargs = dict(
            image=prepared.image_tag,
            entrypoint=argv[:1],
            command=argv[1:],
            name=f"gpu-run-{job.run_id}",
            labels={RUN_LABEL: job.run_id},
            volumes=mounts,
            environment={"TORCH_HOME": "/cache/torch", "HOME": "/tmp", **job.env},
            # DataLoader workers pass batches through /dev/shm; Docker's 64 MB default is too small.
            shm_size="2g",
            detach=True,
        )
        if os.name == "posix" and self.docker_host is None:
            kwargs["user"] = f"{os.getuid()}:{os.getgid()}"  # outputs owned by the user, not root
        if gpu:
            kwargs["device_requests"] = [DeviceRequest(count=max(1, job.gpus), capabilities=[["gpu"]])]
        return self.client.containers.create(**kwargs)

    def start(self, job: Job, prepared: Prepared, ui: UI) -> dict:
        use_gpu = prepared.device == "gpu" and job.gpus != 0
        container = self._create(job, prepared, use_gpu)
        try:
            container.start()
        except docker.errors.APIError as e:
            # An engine that lists the runtime may still lack a working driver: the container is
            # left Created, so remove it and run the CPU variant.
            if not (use_gpu and NO_GPU_DRIVER in str(e)):
                container.remove(force=True)
                raise BackendError(f"could not start the trainer container: {e.explanation or e}") from None
            container.remove(force=True)
            ui.warn("the engine could not give the container a GPU (no NVIDIA driver); running on the CPU")
            prepared.device = "cpu"
            container = self._create(job, prepared, gpu=False)
            container.start()
        if prepared.device == "cpu":
            ui.info("running on the CPU (this engine has no usable NVIDIA GPU)")
        return {"backend": self.name, "container_id": container.id, "container_name": container.name}

    def _container(self, handle: dict):
        try:
            return self.client.containers.get(handle["container_id"])
        except docker.errors.NotFound:
            return None

    def follow_logs(self, handle: dict) -> Iterator[str]:
        container = self._container(handle)
        if container is None:
            return
        yield from split_lines(container.logs(stream=True, follow=True, stdout=True, stderr=True))

    def read_logs(self, handle: dict) -> list[str]:
        container = self._container(handle)
        if container is None:
            return []
        return container.logs(stdout=True, stderr=True).decode("utf-8", "replace").splitlines()

    def wait(self, handle: dict) -> int:
        container = self._container(handle)
        if container is None:
            raise BackendError(f"container {handle.get('container_name')} is gone; its exit code is unknown")
        return int(container.wait()["StatusCode"])

    def is_running(self, handle: dict) -> bool:
        container = self._container(handle)
        if container is None:
            return False
        container.reload()
        return container.status in ("created", "running", "restarting")

    def stop(self, handle: dict, timeout_s: int = 120) -> None:
        container = self._container(handle)
        if container is not None and self.is_running(handle):
            container.stop(timeout=timeout_s)

    def finish(self, handle: dict, out_dir: Path, ui: UI) -> dict:
        # Outputs were written straight into the mounted run folder; only the container remains.
        container = self._container(handle)
        if container is not None:
            container.remove(force=True)
        return {}

    def exit_code(self, handle: dict) -> int | None:
        container = self._container(handle)
        if container is None:
            return None
        container.reload()
        if container.status in ("created", "running", "restarting"):
            return None
        return int(container.attrs["State"]["ExitCode"])


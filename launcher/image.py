"""The trainer image: build context, content-hashed tag, base image choice, the offline CPU base.

The tag is a hash of everything that goes into the image (Dockerfile, trainer code, base image
name), so an unchanged trainer is never rebuilt on an engine that already has it.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile

import docker
import docker.errors

from gpu_run.errors import BackendError
from gpu_run.shipped import base_image_script, dockerfile, trainer_files
from gpu_run.ui import UI

IMAGE_REPO = "gpu-run-trainer"
CPU_BASE_IMAGE = "gpu-run-base:cpu"
# An official PyTorch CUDA runtime image; any image with python3, torch and torchvision works.
CUDA_BASE_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"


def context_files() -> list[tuple[str, bytes]]:
    """(path in the build context, content), sorted, so the hash is stable across machines."""
    return [("Dockerfile", dockerfile()), *trainer_files()]


def image_tag(files: list[tuple[str, bytes]], base_image: str) -> str:
    h = hashlib.sha256()
    h.update(f"base={base_image}\n".encode())
    for name, content in files:
        h.update(f"{name}\n{len(content)}\n".encode())
        h.update(content)
    return f"{IMAGE_REPO}:{h.hexdigest()[:12]}"


def context_tar(files: list[tuple[str, bytes]]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 0  # the layer cache keys on file content and metadata: keep it fixed
            tar.addfile(info, io.BytesIO(content))
    buf.seek(0)
    return buf


def choose_base_image(configured: str | None, has_nvidia_runtime: bool) -> str:
    if configured:
        return configured
    return CUDA_BASE_IMAGE if has_nvidia_runtime else CPU_BASE_IMAGE


def image_exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def build_cpu_base(ui: UI, docker_host: str | None = None) -> None:
    """Run launcher/docker/build-base-cpu.sh (debootstrap + docker import) against an engine."""
    env = dict(os.environ)
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    with ui.spinner(f"building the offline CPU base image {CPU_BASE_IMAGE} (debootstrap, about 2 minutes)"):
        proc = subprocess.run(
            ["bash", "-s", CPU_BASE_IMAGE], input=base_image_script().decode(), env=env, capture_output=True, text=True
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise BackendError(
            f"could not build {CPU_BASE_IMAGE}: {last[0]}; run `sudo gpu-run image build-base` "
            f"or set base_image in the host's config"
        )
    ui.info(f"built base image {CPU_BASE_IMAGE}")


def connect(base_url: str | None = None, timeout_s: int = 10) -> docker.DockerClient | None:
    """A Docker SDK client whose engine answered a ping, or None when there is no engine (used to
    build the offline base image; runs drive the engine with its CLI, as on a rented host)."""
    try:
        client = (
            docker.DockerClient(base_url=base_url, timeout=timeout_s)
            if base_url
            else docker.from_env(timeout=timeout_s)
        )
        client.ping()
        return client
    except (docker.errors.DockerException, OSError):
        return None

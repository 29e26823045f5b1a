"""What gpu-run sends to a host or an engine, read from the installed package (importlib.resources),
so a wheel works as well as a source tree: the trainer's code and the image's recipe."""

from __future__ import annotations

from importlib import resources


def trainer_files() -> list[tuple[str, bytes]]:
    """The trainer package as it ships: (path, content), sorted so a hash of it is stable."""
    code = resources.files("gpu_run.trainer")
    entries = sorted((e for e in code.iterdir() if e.name.endswith(".py")), key=lambda e: e.name)
    return [(f"trainer/{e.name}", e.read_bytes()) for e in entries]


def dockerfile() -> bytes:
    return (resources.files("gpu_run") / "docker" / "Dockerfile").read_bytes()


def base_image_script() -> bytes:
    """launcher/docker/build-base-cpu.sh: debootstrap + docker import, run with `bash -s TAG` on its stdin."""
    return (resources.files("gpu_run") / "docker" / "build-base-cpu.sh").read_bytes()

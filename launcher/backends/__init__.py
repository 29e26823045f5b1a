"""Where a trainer runs: pick the backend for a host, or find the one a past run used."""

from __future__ import annotations

from launcher.backends.base import Backend, Job, Prepared
from launcher.backends.docker_engine import DockerBackend, connect
from launcher.backends.process import ProcessBackend
from launcher.config import Host
from launcher.errors import BackendError
from launcher.ui import UI

__all__ = ["Backend", "Job", "Prepared", "backend_for_host", "backend_for_run"]


def local_backend(host: Host, ui: UI) -> Backend:
    client = connect()
    if client is None:
        ui.info("No Docker engine reachable: the local host runs the trainer as a plain local process instead.")
        return ProcessBackend()
    return DockerBackend(client, base_image=host.base_image)


def backend_for_host(host: Host, ui: UI) -> Backend:
    if host.is_local:
        return local_backend(host, ui)
    raise BackendError(f"host {host.name!r} is a {host.kind} host, which this version of gpu-run cannot run on yet")


def backend_for_run(host: Host, handle: dict, ui: UI) -> Backend:
    """The backend a recorded run was started on, reconnected."""
    kind = handle.get("backend")
    if kind == "process":
        return ProcessBackend()
    if kind == "docker" and host.is_local:
        client = connect()
        if client is None:
            raise BackendError("the run's Docker engine is not reachable; start Docker and try again")
        return DockerBackend(client, base_image=host.base_image)
    raise BackendError(f"the run has no backend handle to reconnect to (backend {kind!r})")

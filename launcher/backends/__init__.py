"""Where a trainer runs: pick the backend for a host, or find the one a past run used."""

from __future__ import annotations

from launcher.backends.base import Backend, Job, Prepared
from launcher.backends.docker_engine import DockerBackend, connect
from launcher.backends.process import ProcessBackend
from launcher.backends.ssh_docker import SshDockerBackend
from launcher.config import Host
from launcher.errors import BackendError
from launcher.remote import Remote, resolve_target
from launcher.ui import UI

__all__ = ["Backend", "Job", "Prepared", "backend_for_host", "backend_for_run", "remote_for_host"]


def local_backend(host: Host, ui: UI) -> Backend:
    client = connect()
    if client is None:
        ui.info("No Docker engine reachable: the local host runs the trainer as a plain local process instead.")
        return ProcessBackend()
    return DockerBackend(client, base_image=host.base_image)


def remote_for_host(host: Host, accept_new_host_key: bool = False) -> Remote:
    if not host.ssh:
        raise BackendError(f"host {host.name!r} has no ssh address; set ssh = \"alias\" or \"user@host:port\"")
    return Remote(resolve_target(host.ssh, host.ssh_user, host.ssh_key), accept_new_host_key)


def backend_for_host(host: Host, ui: UI, accept_new_host_key: bool = False) -> Backend:
    if host.is_local:
        return local_backend(host, ui)
    if host.kind == "ssh":
        return SshDockerBackend(host, remote_for_host(host, accept_new_host_key), ui)
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
    if kind == "ssh":
        return SshDockerBackend(host, remote_for_host(host), ui)
    raise BackendError(f"the run has no backend handle to reconnect to (backend {kind!r})")

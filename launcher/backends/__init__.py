"""Where a trainer runs: pick the backend for a host, or find the one a past run used."""

from __future__ import annotations

import time

from launcher.backends.base import Backend, Job, Prepared
from launcher.backends.docker_engine import DockerBackend, connect
from launcher.backends.process import ProcessBackend
from launcher.backends.ssh_docker import SshDockerBackend
from launcher.config import Host
from launcher.errors import BackendError, Unreachable
from launcher.providers.aws import AwsInstance
from launcher.remote import Remote, resolve_target
from launcher.sync.s3 import S3Store
from launcher.ui import UI

SSH_WAIT_S = 300  # a freshly started instance takes a minute or two to answer SSH

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


def store_for_host(host: Host) -> S3Store | None:
    return S3Store(host) if host.sync == "s3" else None


def remote_for_instance(host: Host, instance: AwsInstance, accept_new_host_key: bool = False) -> Remote:
    """An ssh alias in the config (bastion, VPN, tests) wins over the instance's public address."""
    if host.ssh:
        return remote_for_host(host, accept_new_host_key)
    target = resolve_target(f"{host.ssh_user or 'ubuntu'}@{instance.address()}", key_file=host.ssh_key)
    return Remote(target, accept_new_host_key)


def wait_for_ssh(remote: Remote, ui: UI, timeout_s: float = SSH_WAIT_S) -> None:
    deadline = time.time() + timeout_s
    with ui.spinner(f"waiting for SSH on {remote.target.display}"):
        while True:
            try:
                remote.connect()
                return
            except Unreachable:
                if time.time() >= deadline:
                    raise
                time.sleep(3)


def backend_for_host(host: Host, ui: UI, accept_new_host_key: bool = False) -> Backend:
    if host.is_local:
        return local_backend(host, ui)
    if host.kind == "ssh":
        return SshDockerBackend(host, remote_for_host(host, accept_new_host_key), ui, store_for_host(host))
    if host.kind == "aws":
        instance = AwsInstance(host)
        instance.start(ui)
        try:
            remote = remote_for_instance(host, instance, accept_new_host_key)
            wait_for_ssh(remote, ui)
            return SshDockerBackend(host, remote, ui, store_for_host(host), provider=instance)
        except BaseException:
            instance.stop()  # started for this run and unusable: never leave it billing
            ui.warn(f"instance {host.instance_id} stopped again")
            raise
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
    if kind == "ssh" and host.kind == "aws":
        instance = AwsInstance(host)
        if instance.state() != "running":
            raise Unreachable(f"instance {host.instance_id} of host {host.name} is {instance.state()}")
        return SshDockerBackend(host, remote_for_instance(host, instance), ui, store_for_host(host), provider=instance)
    if kind == "ssh":
        return SshDockerBackend(host, remote_for_host(host), ui, store_for_host(host))
    raise BackendError(f"the run has no backend handle to reconnect to (backend {kind!r})")

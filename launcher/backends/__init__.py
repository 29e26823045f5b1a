"""Where a trainer runs: pick the backend for a host, or find the one a past run used."""

from __future__ import annotations

import time

from gpu_run.backends.base import Backend, Job, Prepared, RunHandle
from gpu_run.backends.local import LocalBackend
from gpu_run.backends.ssh_host import SshHostBackend
from gpu_run.config import Host
from gpu_run.errors import BackendError, Unreachable
from gpu_run.providers.aws import AwsInstance
from gpu_run.remote import Remote, resolve_target
from gpu_run.sync.s3 import S3Store
from gpu_run.ui import UI

SSH_WAIT_S = 300  # a freshly started instance takes a minute or two to answer SSH

__all__ = ["Backend", "Job", "Prepared", "RunHandle", "bring_up", "backend_for_run", "remote_for_host"]


def remote_for_host(host: Host, accept_new_host_key: bool = False) -> Remote:
    if not host.ssh:
        raise BackendError(f'host {host.name!r} has no ssh address; set ssh = "alias" or "user@host:port"')
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


def bring_up(host: Host, ui: UI, accept_new_host_key: bool = False) -> Backend:
    """The machine ready for a run: started first where its provider can (an EC2 instance, which
    bills from then on, so a failure here stops it again), then reached over SSH."""
    if host.is_local:
        return LocalBackend(host, ui)
    if host.kind == "ssh":
        return SshHostBackend(host, remote_for_host(host, accept_new_host_key), ui, store_for_host(host))
    if host.kind == "aws":
        instance = AwsInstance(host)
        instance.start(ui)
        try:
            remote = remote_for_instance(host, instance, accept_new_host_key)
            wait_for_ssh(remote, ui)
            return SshHostBackend(host, remote, ui, store_for_host(host), provider=instance)
        except BaseException:
            instance.stop()  # started for this run and unusable: never leave it billing
            ui.warn(f"instance {host.instance_id} stopped again")
            raise
    raise BackendError(f"host {host.name!r} is a {host.kind} host, which this version of gpu-run cannot run on yet")


def backend_for_run(host: Host, handle: RunHandle, ui: UI) -> Backend:
    """The backend a recorded run was started on, reconnected."""
    kind = handle.backend
    if host.is_local:
        if not handle.runtime and kind:
            raise BackendError("this run was started by an older gpu-run on the local host; it cannot be reattached")
        return LocalBackend(host, ui, handle)
    if kind == "ssh" and host.kind == "aws":
        instance = AwsInstance(host)
        if instance.state() != "running":
            raise Unreachable(f"instance {host.instance_id} of host {host.name} is {instance.state()}")
        return SshHostBackend(
            host, remote_for_instance(host, instance), ui, store_for_host(host), provider=instance, handle=handle
        )
    if kind == "ssh":
        return SshHostBackend(host, remote_for_host(host), ui, store_for_host(host), handle=handle)
    raise BackendError(f"the run has no backend handle to reconnect to (backend {kind!r})")

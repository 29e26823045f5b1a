"""An SSH connection to a host: address resolution, host-key checks, and quoted remote commands.

Every remote command goes through `Remote.run` / `Remote.open` with an argument list that is
quoted here (shlex.join), so paths and names from the user can never break out of it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from gpu_run.errors import BackendError, Unreachable

CONNECT_TIMEOUT_S = 15
KEEPALIVE_S = 15


def quote(args: list[str]) -> str:
    return shlex.join(str(a) for a in args)


@dataclass(frozen=True)
class SshTarget:
    alias: str  # what the user wrote
    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...]
    known_hosts: str

    @property
    def display(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH and paramiko name this host in known_hosts."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


_USER_HOST_PORT = re.compile(r"^(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:]+)(?::(?P<port>\d+))?$")


def resolve_target(
    spec: str, user: str | None = None, key_file: str | None = None, ssh_config_path: Path | None = None
) -> SshTarget:
    """An ~/.ssh/config alias, or user@host[:port]; explicit user/key override ssh_config."""
    config_path = ssh_config_path or Path.home() / ".ssh" / "config"
    config = paramiko.SSHConfig()
    if config_path.is_file():
        config = paramiko.SSHConfig.from_path(str(config_path))
    m = _USER_HOST_PORT.match(spec)
    if not m:
        raise BackendError(f"cannot read the SSH address {spec!r}; use an ~/.ssh/config alias or user@host:port")
    entry = config.lookup(m.group("host").strip("[]"))
    hostname = entry.get("hostname", m.group("host").strip("[]"))
    port_text = str(m.group("port") or entry.get("port", 22))
    # Out of range, socket.connect raises OverflowError, not an error a user can read.
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise BackendError(
            f"SSH address {spec!r} has port {port_text}; a port is 1 to 65535 (check ssh = or ~/.ssh/config)"
        )
    port = int(port_text)
    login = user or m.group("user") or entry.get("user") or os.environ.get("USER") or "root"
    keys = [key_file] if key_file else entry.get("identityfile", [])
    known = entry.get("userknownhostsfile", "~/.ssh/known_hosts").split()[0]
    return SshTarget(
        alias=spec,
        hostname=hostname,
        port=port,
        user=login,
        key_files=tuple(os.path.expanduser(k) for k in keys),
        known_hosts=os.path.expanduser(known),
    )


class UnknownHostKey(Exception):
    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(hostname)
        self.hostname, self.key = hostname, key


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(hostname, key)


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """OpenSSH's accept-new: remember a key never seen before; a changed key is still refused."""

    def __init__(self, known_hosts: str):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        path = Path(self.known_hosts)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


def fingerprint(key: paramiko.PKey) -> str:
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class Remote:
    """One SSH connection, reopened on demand after a drop."""

    def __init__(self, target: SshTarget, accept_new_host_key: bool = False):
        self.target = target
        self.accept_new_host_key = accept_new_host_key
        self._client: paramiko.SSHClient | None = None

    # Connection -------------------------------------------------------------------------------

    def connect(self) -> paramiko.SSHClient:
        if self._client is not None:
            transport = self._client.get_transport()
            if transport is not None and transport.is_active():
                return self._client
            self.close()
        t = self.target
        client = paramiko.SSHClient()
        if os.path.exists(t.known_hosts):
            client.load_host_keys(t.known_hosts)
        client.set_missing_host_key_policy(_AcceptNew(t.known_hosts) if self.accept_new_host_key else _RefuseUnknown())
        try:
            client.connect(
                t.hostname,
                port=t.port,
                username=t.user,
                key_filename=list(t.key_files) or None,  # type: ignore[arg-type]  # paramiko takes a list too
                timeout=CONNECT_TIMEOUT_S,
                banner_timeout=CONNECT_TIMEOUT_S,
                auth_timeout=CONNECT_TIMEOUT_S,
                allow_agent=not t.key_files,
                look_for_keys=not t.key_files,
            )
        except UnknownHostKey as e:
            client.close()
            raise BackendError(
                f"the host key of {e.hostname} ({e.key.get_name()} {fingerprint(e.key)}) is not in {t.known_hosts}; "
                f"if that fingerprint is the machine's, re-run with --accept-new-host-key"
            ) from None
        except paramiko.BadHostKeyException as e:
            client.close()
            raise BackendError(
                f"the host key of {t.known_hosts_name} has CHANGED (now {fingerprint(e.key)}); refusing to connect. "
                f"If the machine was reinstalled, remove its line from {t.known_hosts} and connect again"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            keys = ", ".join(t.key_files) or "your default keys and agent"
            raise BackendError(
                f"SSH login to {t.display} was refused for {keys}; check the user and ssh_key / IdentityFile"
            ) from None
        except (TimeoutError, OSError, paramiko.SSHException) as e:
            client.close()
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise Unreachable(
                f"cannot reach {t.alias} ({t.display}): {reason}; check the address and that the machine is running"
            ) from None
        transport = client.get_transport()
        assert transport is not None  # connect() returned: it has one
        transport.set_keepalive(KEEPALIVE_S)
        self._client = client
        return client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # Commands ---------------------------------------------------------------------------------

    def open(self, command: list[str] | str, timeout_s: float | None = None) -> paramiko.Channel:
        """Start a command; a list is quoted, a string is a shell script built from quote() pieces."""
        cmd = command if isinstance(command, str) else quote(command)
        transport = self.connect().get_transport()
        assert transport is not None  # connect() returns a client whose transport is active
        channel = transport.open_session(timeout=CONNECT_TIMEOUT_S)
        channel.settimeout(timeout_s)
        channel.exec_command(cmd)
        return channel

    def run(
        self, command: list[str] | str, input: bytes | None = None, check: bool = True, timeout_s: float | None = 300
    ) -> Result:
        channel = self.open(command, timeout_s)
        if input is not None:
            channel.sendall(input)
        channel.shutdown_write()
        stdout = channel.makefile("rb").read().decode("utf-8", "replace")
        stderr = channel.makefile_stderr("rb").read().decode("utf-8", "replace")
        code = channel.recv_exit_status()
        channel.close()
        if code == -1 and not self._still_connected():
            # No exit status because the connection went, not because the command failed: say so
            # as a dropped connection, which the callers that reconnect know how to retry.
            self.close()
            raise ConnectionResetError(f"the connection to {self.target.alias} dropped")
        if check and code != 0:
            shown = command if isinstance(command, str) else quote(command)
            last = (stderr.strip() or stdout.strip()).splitlines()[-1:] or [f"exit code {code}"]
            raise BackendError(f"on {self.target.alias}: `{shown[:120]}` failed: {last[0]}")
        return Result(code, stdout, stderr)

    def _still_connected(self) -> bool:
        transport = self._client.get_transport() if self._client is not None else None
        for _ in range(5):  # the transport's reader thread notices a closed socket a moment later
            if transport is None or not transport.is_active():
                return False
            time.sleep(0.05)
        return True

    def run_with_env(self, command: str, env: dict[str, str], **kwargs) -> Result:
        """Run with secrets in the environment, passed on stdin: never on a command line (ps,
        logs) or in a file on the host."""
        for key in env:
            if not key.replace("_", "").isalnum():
                raise ValueError(f"bad environment variable name {key!r}")
        prelude = "".join(f"IFS= read -r {key}; export {key}; " for key in env)
        data = "".join(f"{value}\n" for value in env.values()).encode()
        return self.run(prelude + command, input=data, **kwargs)

    def openssh_argv(self) -> list[str] | None:
        """The OpenSSH client command for this target, for bulk streams (it moves bytes about twice
        as fast as paramiko); None when there is no `ssh` binary. Host keys were checked (or
        accepted) by connect() against the same known_hosts file, and are checked again here."""
        ssh = shutil.which("ssh")
        if ssh is None:
            return None
        t = self.target
        argv = [
            ssh,
            "-p",
            str(t.port),
            "-l",
            t.user,
            "-o",
            f"UserKnownHostsFile={t.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            "-o",
            f"ServerAliveInterval={KEEPALIVE_S}",
        ]
        for key in t.key_files:
            argv += ["-i", key, "-o", "IdentitiesOnly=yes"]
        return argv + [t.hostname]

    def home(self) -> str:
        return self.run(["sh", "-c", 'printf %s "$HOME"']).stdout

    def expand(self, path: str, home: str) -> str:
        """~ in a configured path means the remote user's home (quoting stops the shell doing it)."""
        if path == "~" or path.startswith("~/"):
            return home + path[1:]
        return path

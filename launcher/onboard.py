"""`gpu-run hosts add`: from the SSH command a rental console prints to a host gpu-run can use.

The flow, in the order that keeps the password safe and leaves nothing half-written:
  1. read the command, the name and the settings, and check the new [hosts.NAME] table against
     gpu-run.toml before anything touches the network;
  2. fetch the host key and compare it with ~/.ssh/known_hosts: a changed key is refused, a new one
     is shown and must be agreed to *before* the password is sent (a man in the middle would get it);
  3. log in with the laptop's key if it already works (vast.ai and RunPod register keys in the
     account), else with the password, and append the laptop's public key to authorized_keys;
  4. record the host key, prove that a login with the key alone works, then append the table.
The password lives in one variable that only reaches paramiko's auth call: it is never written,
logged, put in a message or on a command line.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Ubuntu 22.04's python3): the same parser, from PyPI
    import tomli as tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import paramiko

from gpu_run.config import _HOST_NAME, CONFIG_FILENAME, LOCAL_HOST, load_config, parse_hosts
from gpu_run.errors import BackendError, ConfigError, Unreachable
from gpu_run.platforms import PRESETS
from gpu_run.remote import CONNECT_TIMEOUT_S, Remote, SshTarget, fingerprint
from gpu_run.ui import UI

DEFAULT_KEY = "~/.ssh/id_ed25519"
# Options of the OpenSSH client that take a value; the consoles print some of them (vast.ai adds
# port forwards for Jupyter). Only -p, -l and -i matter to us, the rest are skipped with their value.
_OPTIONS_WITH_VALUE = set("BbcDEeFIiJLlmOoPpQRSWw")
_FLAGS = set("46AaCfGgKkMNnqsTtVvXxYy")


@dataclass(frozen=True)
class SshCommand:
    """What a console's `ssh ...` line says: who logs in where, and with which key file if any."""

    user: str
    host: str
    port: int
    key_file: str | None = None

    @property
    def ssh(self) -> str:
        """The `ssh = "user@host:port"` value of gpu-run.toml (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_ssh_command(text: str) -> SshCommand:
    """`ssh -p PORT user@host` in the forms AutoDL, vast.ai and RunPod print; one ConfigError line
    naming the fix for anything else."""
    hint = 'paste the console\'s SSH command, e.g. --ssh-command "ssh -p 38921 root@connect.westb.seetacloud.com"'
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"cannot read --ssh-command ({e}); {hint}") from None
    if not words or os.path.basename(words[0]) != "ssh":
        raise ConfigError(f"--ssh-command must start with ssh, got {text.strip()[:60]!r}; {hint}")
    port_text, user, key_file, destination = None, None, None, None
    i = 1
    while i < len(words):
        word = words[i]
        if word == "--":
            i += 1
            if i < len(words) and destination is None:
                destination = words[i]
                i += 1
            break
        if word.startswith("-") and len(word) > 1:
            # Grouped flags (-tt, -NT) and an option's value glued on (-p22, -oUser=x) are both legal.
            j = 1
            while j < len(word):
                letter = word[j]
                if letter in _OPTIONS_WITH_VALUE:
                    value = word[j + 1 :]
                    if not value:
                        i += 1
                        if i >= len(words):
                            raise ConfigError(f"--ssh-command: -{letter} needs a value; {hint}")
                        value = words[i]
                    if letter == "p":
                        port_text = value
                    elif letter == "l":
                        user = value
                    elif letter == "i":
                        key_file = value
                    break
                if letter not in _FLAGS:
                    raise ConfigError(f"--ssh-command: unknown ssh option -{letter}; {hint}")
                j += 1
            i += 1
            continue
        if destination is not None:
            # `ssh host command...`: a remote command is not part of an address.
            raise ConfigError(f"--ssh-command has more than an address ({word!r} after {destination!r}); {hint}")
        destination = word
        i += 1
    if destination is None:
        raise ConfigError(f"--ssh-command has no user@host; {hint}")
    if destination.startswith("ssh://"):
        # The URL form (`ssh ssh://user@host:port`) may carry the port in the address.
        m = re.match(r"^(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>\d+))?/?$", destination[6:])
        if not m:
            raise ConfigError(f"--ssh-command: cannot read the address {destination!r}; {hint}")
        port_text = port_text or m.group("port")  # -p wins, as in OpenSSH
        destination = f"{m.group('user')}@{m.group('host')}" if m.group("user") else m.group("host")
    login, _, host = destination.rpartition("@")
    user = user or login  # -l wins, as in OpenSSH
    host = host.strip("[]")
    if not host or any(c in host for c in "@/ "):
        raise ConfigError(f"--ssh-command: {destination!r} is not user@host; {hint}")
    if not user:
        # The consoles always say who logs in; guessing the laptop's user name would fail later.
        raise ConfigError(f"--ssh-command: say who logs in (user@{host}, or -l USER); {hint}")
    port_text = port_text or "22"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(
            f"--ssh-command: port {port_text!r} is not a port (1 to 65535); copy -p PORT from the console"
        )
    return SshCommand(user=user, host=host, port=int(port_text), key_file=key_file)


# gpu-run.toml --------------------------------------------------------------------------------------


def config_path() -> Path:
    """Where `hosts add` writes: $GPU_RUN_CONFIG (created when missing), else ./gpu-run.toml."""
    env = os.environ.get("GPU_RUN_CONFIG")
    return Path(env).expanduser() if env else Path.cwd() / CONFIG_FILENAME


def check_host_name(name: str) -> None:
    if not _HOST_NAME.match(name):
        raise ConfigError(
            f"host name {name!r}: use letters, digits, '-', '_' and '.' only (and start with a letter or digit)"
        )
    if name == LOCAL_HOST:
        raise ConfigError(f"{LOCAL_HOST!r} is the built-in local host; give the rented machine another name")


def _toml_key(name: str) -> str:
    # A dot in a bare key would make [hosts.a.b] a nested table: such names are quoted.
    return name if "." not in name else json.dumps(name)


def host_table(name: str, ssh: str, key: str, preset: str | None, price_per_hour: float | None) -> str:
    """The [hosts.NAME] text appended to gpu-run.toml (JSON strings are valid TOML basic strings)."""
    lines = [f"[hosts.{_toml_key(name)}]", f"ssh = {json.dumps(ssh)}", f"ssh_key = {json.dumps(key)}"]
    if preset is not None:
        lines.append(f"preset = {json.dumps(preset)}")
    if price_per_hour is not None:
        lines.append(f"price_per_hour = {price_per_hour!r}")
    return "\n".join(lines) + "\n"


def _read_config_text(path: Path) -> str:
    if not path.exists():
        return ""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text (UTF-16?); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}; check that it is a file you can read") from None


def _joined(existing: str, table: str) -> str:
    sep = "" if not existing or existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    return existing + sep + table


def check_new_host(path: Path, name: str, table: str) -> None:
    """Refuse before any login: a NAME already in the file, or a file that would not parse with the
    new table in it (a bad price, a broken file)."""
    existing = _read_config_text(path)
    try:
        document = tomllib.loads(existing)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}; fix it before adding a host") from None
    hosts = document.get("hosts")
    if isinstance(hosts, dict) and name in hosts:
        raise ConfigError(f"host {name!r} is already in {path}; pick another name or remove its [hosts.{name}] table")
    try:
        parse_hosts(tomllib.loads(_joined(existing, table)))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} would not be valid TOML with the new host ({e}); fix the file first") from None


def append_host(path: Path, table: str) -> None:
    """Append the table (after a blank line), then read the file back as every command will."""
    existing = _read_config_text(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(_joined(existing, table)[len(existing) :])
    load_config()


def preset_summary(preset: str) -> str:
    values = PRESETS[preset]
    shown = [
        f"{label} {values[key]}"
        for key, label in (
            ("workdir", "workdir"),
            ("stop_command", "stop command"),
            ("billing", "billing"),
            ("currency", "currency"),
        )
        if key in values
    ]
    return f"preset {preset} fills: " + ", ".join(shown)


# The laptop's key ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaptopKey:
    path: Path  # the private key
    config_value: str  # as written in gpu-run.toml (~/... when under HOME)
    exists: bool


def _config_value(path: Path) -> str:
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def laptop_key(key_file: str | None) -> LaptopKey:
    """The key named by -i in the console's command, else ~/.ssh/id_ed25519 (which may not exist yet)."""
    if key_file is None:
        path = Path(DEFAULT_KEY).expanduser()
        if not path.exists() and Path(f"{path}.pub").exists():
            # Creating the key would mean overwriting that .pub: never.
            raise ConfigError(
                f"{path}.pub exists without its private key {path}; move it away, or pass your key with -i"
            )
        return LaptopKey(path, DEFAULT_KEY, path.exists())
    path = Path(key_file).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(
            f"--ssh-command names the key {key_file}, which is not a file; give the path of the private key with -i"
        )
    return LaptopKey(path, _config_value(path), True)


def public_key_line(path: Path) -> str:
    """The `type base64 comment` line for a private key: its .pub file, else derived from the key.
    A key with a passphrase is refused: a run cannot type it (and gpu-run does not use an agent)."""
    try:
        key = paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise ConfigError(
            f"{path} has a passphrase, which gpu-run cannot type during a run; make a key without one "
            f"(ssh-keygen -t ed25519 -N '' -f ~/.ssh/gpu-run_ed25519) and pass it with -i in --ssh-command"
        ) from None
    except (OSError, ValueError, paramiko.SSHException) as e:
        raise ConfigError(f"cannot read the private key {path}: {e}; give an OpenSSH private key with -i") from None
    pub = Path(f"{path}.pub")
    if pub.is_file():
        fields = pub.read_text().split()
        if len(fields) >= 2 and fields[1] == key.get_base64():
            return " ".join(fields[:3])
    return f"{key.get_name()} {key.get_base64()}"


def create_laptop_key(path: Path) -> str:
    """A new ed25519 key without passphrase (0600, ~/.ssh 0700) and its .pub; returns the .pub line.
    O_EXCL: an existing key file is never overwritten, even one that appeared a moment ago."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = Path(f"{path}.pub")
    if pub.exists():
        raise ConfigError(f"{pub} exists without its private key {path}; move it away, or pass your key with -i")
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
        path.parent.chmod(0o700)  # whatever the umask said
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    line = f"{public} gpu-run@{socket.gethostname()}"
    for target, data, mode in ((path, private, 0o600), (pub, (line + "\n").encode(), 0o644)):
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return line


# Host keys -----------------------------------------------------------------------------------------


def known_hosts_path() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def known_host_keys(known_hosts: Path, name: str) -> dict[str, paramiko.PKey]:
    """The keys known_hosts has for `name` (`[host]:port` off port 22), by type; hashed lines too."""
    if not known_hosts.is_file():
        return {}
    found = paramiko.HostKeys(str(known_hosts)).lookup(name)
    return dict(found) if found else {}


def probe_host_key(target: SshTarget, known: dict[str, paramiko.PKey]) -> paramiko.PKey:
    """The host key, from a key exchange without any login (nothing is sent but the handshake).
    The types known_hosts has go first, as OpenSSH does, so a host with several keys shows the one
    we can compare."""
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise Unreachable(
            f"cannot reach {target.display}: {e.strerror or e}; check the address and that the "
            f"instance is running in the console"
        ) from None
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = CONNECT_TIMEOUT_S
        options = transport.get_security_options()
        offered = list(options.key_types)
        wanted = []
        for kind in known:
            if kind == "ssh-rsa":
                kind = next((k for k in ("rsa-sha2-512", "rsa-sha2-256") if k in offered), kind)
            if kind in offered and kind not in wanted:
                wanted.append(kind)
        options.key_types = wanted + [k for k in offered if k not in wanted]
        transport.start_client(timeout=CONNECT_TIMEOUT_S)
        return transport.get_remote_server_key()
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise Unreachable(
            f"no SSH server answered on {target.display} ({str(e) or type(e).__name__}); check the "
            f"port in the console's SSH command"
        ) from None
    finally:
        transport.close()


def host_key_is_new(target: SshTarget, key: paramiko.PKey, known: dict[str, paramiko.PKey]) -> bool:
    """False when known_hosts has this very key; True when it has none; a DIFFERENT key is refused."""
    if not known:
        return True
    ours = known.get(key.get_name())
    if ours is not None and ours.asbytes() == key.asbytes():
        return False
    raise BackendError(
        f"the host key of {target.known_hosts_name} has CHANGED (now {key.get_name()} {fingerprint(key)}); refusing "
        f"to connect. If the instance was re-created, remove its line from {target.known_hosts} and run hosts add again"
    )


def record_host_key(known_hosts: Path, name: str, key: paramiko.PKey) -> None:
    """Append `name type base64` as OpenSSH writes it (the file and ~/.ssh created private)."""
    if not known_hosts.parent.exists():
        known_hosts.parent.mkdir(mode=0o700, parents=True)
    text = known_hosts.read_text() if known_hosts.exists() else ""
    sep = "\n" if text and not text.endswith("\n") else ""
    fd = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{sep}{name} {key.get_name()} {key.get_base64()}\n")


# Logins --------------------------------------------------------------------------------------------


def login(
    target: SshTarget, host_key: paramiko.PKey, password: str | None = None, key_file: Path | None = None
) -> paramiko.SSHClient:
    """One login with exactly the password or the key given (no agent, no ~/.ssh guessing), to the
    host whose key was agreed to: another key now is refused (BadHostKeyException)."""
    client = paramiko.SSHClient()
    client.get_host_keys().add(target.known_hosts_name, host_key.get_name(), host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            target.hostname,
            port=target.port,
            username=target.user,
            password=password,
            key_filename=str(key_file) if key_file else None,
            look_for_keys=False,
            allow_agent=False,
            timeout=CONNECT_TIMEOUT_S,
            banner_timeout=CONNECT_TIMEOUT_S,
            auth_timeout=CONNECT_TIMEOUT_S,
        )
    except BaseException:
        client.close()
        raise
    return client


def try_key_login(target: SshTarget, host_key: paramiko.PKey, key_file: Path) -> paramiko.SSHClient | None:
    """A login with the key alone, or None when the host does not take it (yet)."""
    try:
        return login(target, host_key, key_file=key_file)
    except (paramiko.AuthenticationException, paramiko.SSHException, OSError):
        return None


def password_login(target: SshTarget, host_key: paramiko.PKey, password: str) -> paramiko.SSHClient:
    """The console's password login; the messages never hold the password."""
    try:
        return login(target, host_key, password=password)
    except paramiko.BadAuthenticationType as e:
        raise BackendError(
            f"{target.display} does not take passwords (it offers {', '.join(e.allowed_types) or 'nothing'}); add "
            f"your public key in the platform's console and pass the key with -i in --ssh-command"
        ) from None
    except paramiko.AuthenticationException:
        raise BackendError(
            f"the password was refused by {target.display}; copy it again from the console "
            f"(and check the user in --ssh-command)"
        ) from None
    except paramiko.BadHostKeyException as e:
        raise BackendError(
            f"the host key of {target.known_hosts_name} changed between two connections (now "
            f"{fingerprint(e.key)}); refusing to send the password"
        ) from None
    except (OSError, paramiko.SSHException) as e:
        raise Unreachable(
            f"cannot log in to {target.display}: {getattr(e, 'strerror', None) or e}; check that "
            f"the instance is running"
        ) from None


def install_key_script(public_line: str) -> str:
    """Append the key to authorized_keys once, with the modes sshd insists on. A file whose last line
    has no newline gets one first, or our key would be glued onto that line."""
    key = shlex.quote(public_line)
    script = (
        "umask 077; mkdir -p ~/.ssh; touch ~/.ssh/authorized_keys; chmod 700 ~/.ssh; "
        "chmod 600 ~/.ssh/authorized_keys; "
        'if [ -s ~/.ssh/authorized_keys ] && [ -n "$(tail -c 1 ~/.ssh/authorized_keys)" ]; then '
        "echo >> ~/.ssh/authorized_keys; fi; "
        f"grep -qxF {key} ~/.ssh/authorized_keys || printf '%s\\n' {key} >> ~/.ssh/authorized_keys"
    )
    # Through sh, whatever the login shell is (the script is POSIX).
    return f"sh -c {shlex.quote(script)}"


def install_key(client: paramiko.SSHClient, target: SshTarget, public_line: str) -> None:
    _stdin, stdout, stderr = client.exec_command(install_key_script(public_line), timeout=CONNECT_TIMEOUT_S * 4)
    code = stdout.channel.recv_exit_status()
    if code != 0:
        last = (stderr.read().decode("utf-8", "replace").strip().splitlines() or [f"exit code {code}"])[-1]
        raise BackendError(f"could not add the key to ~/.ssh/authorized_keys on {target.display}: {last}")


def verify_key_login(target: SshTarget) -> None:
    """Log in exactly as every later command will (Remote, known_hosts, the key alone) and run `true`."""
    remote = Remote(target)
    try:
        remote.run(["true"], timeout_s=CONNECT_TIMEOUT_S * 2)
    except BackendError as e:
        raise BackendError(
            f"the key was installed but a login with {target.key_files[0]} alone failed on {target.display} "
            f"({e}); the host may not allow key logins: check PubkeyAuthentication in its sshd_config"
        ) from None
    finally:
        remote.close()


# The whole command ---------------------------------------------------------------------------------


def password_source(from_stdin: bool) -> Callable[[str], str]:
    """How add_host gets the password. --password-stdin reads its line now, before anything else
    reads stdin (a host-key answer comes on the next line); otherwise a hidden prompt, asked only
    when the key does not already log in."""
    if not from_stdin:
        return lambda where: click.prompt(f"password of {where} (from the console)", hide_input=True, err=True)
    password = sys.stdin.readline().rstrip("\r\n")

    def given(_where: str) -> str:
        # Asked for only when the key does not log in by itself: then an empty stdin is an error.
        if not password:
            raise ConfigError(
                "--password-stdin: no password on stdin; pipe the console's password into gpu-run hosts add"
            )
        return password

    return given


def confirm_on_terminal(shown: str) -> bool:
    """Show the fingerprint (on stderr: --json keeps stdout for the result) and ask; no answer is no."""
    click.echo(shown, err=True)
    try:
        return click.confirm("Is this the machine's key? (compare with the console)", default=False, err=True)
    except click.Abort:
        return False


def add_host(
    name: str,
    ssh_command: str,
    *,
    preset: str | None,
    price_per_hour: float | None,
    accept_new_host_key: bool,
    get_password: Callable[[str], str],
    confirm_host_key: Callable[[str], bool],
    ui: UI,
) -> dict:
    """Onboard one host (see the module docstring); returns what --json prints."""
    check_host_name(name)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    if price_per_hour is not None and (not math.isfinite(price_per_hour) or price_per_hour < 0):
        raise ConfigError(f"--price-per-hour must be a number >= 0, got {price_per_hour}")
    command = parse_ssh_command(ssh_command)
    key = laptop_key(command.key_file)
    path = config_path()
    table = host_table(name, command.ssh, key.config_value, preset, price_per_hour)
    check_new_host(path, name, table)
    public_line = public_key_line(key.path) if key.exists else None

    known_hosts = known_hosts_path()
    target = SshTarget(
        alias=name,
        hostname=command.host,
        port=command.port,
        user=command.user,
        key_files=(str(key.path),),
        known_hosts=str(known_hosts),
    )
    known = known_host_keys(known_hosts, target.known_hosts_name)
    host_key = probe_host_key(target, known)
    new_key = host_key_is_new(target, host_key, known)
    shown = f"host key of {command.host}:{command.port} is {host_key.get_name()} {fingerprint(host_key)}"
    if new_key:
        if accept_new_host_key:
            ui.info(f"{shown} (accepted: --accept-new-host-key)")
        elif not confirm_host_key(shown):
            raise ConfigError(
                f"host key of {command.host}:{command.port} not accepted; nothing was written. "
                f"Compare the fingerprint with the console and run hosts add again"
            )
    else:
        ui.info(f"{shown} (already in {known_hosts})")

    client = try_key_login(target, host_key, key.path) if key.exists else None
    if client is not None:
        ui.info(f"{key.config_value} already logs in to {target.display}; no password needed")
        client.close()
    else:
        password = get_password(target.display)
        client = password_login(target, host_key, password)
        del password  # nothing after the login needs it
        try:
            if public_line is None:
                public_line = create_laptop_key(key.path)
                ui.info(f"created the key {key.config_value} (ed25519, no passphrase) and its .pub")
            install_key(client, target, public_line)
        finally:
            client.close()
        ui.info(f"installed {key.config_value}.pub in {command.user}'s ~/.ssh/authorized_keys on the host")

    if new_key:
        record_host_key(known_hosts, target.known_hosts_name, host_key)
        ui.info(f"recorded the host key in {known_hosts}")
    verify_key_login(target)
    ui.info(f"a login with the key alone works on {target.display}")

    append_host(path, table)
    ui.info(f"added [hosts.{name}] to {path}")
    if preset is not None:
        ui.info(preset_summary(preset) + f" (set any of them in [hosts.{name}] to override)")
    if price_per_hour is None:
        ui.info(f"no price_per_hour: runs on {name} are costed at 0; add price_per_hour = ... to [hosts.{name}]")
    ui.info(f"next: gpu-run doctor {name}")
    return {
        "host": name,
        "ssh": command.ssh,
        "key": key.config_value,
        "fingerprint": fingerprint(host_key),
        "config": str(path),
    }

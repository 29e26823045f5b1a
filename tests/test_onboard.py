"""`gpu-run hosts add`: the console's SSH command parsed, and onboarding against a real
password-enabled container instance (the test bed's AutoDL look-alike)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Ubuntu 22.04's python3): the same parser, from PyPI
    import tomli as tomllib
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gpu_run.config import parse_hosts
from gpu_run.errors import ConfigError
from gpu_run.onboard import (
    SshCommand,
    check_new_host,
    create_laptop_key,
    host_table,
    parse_ssh_command,
)
from gpu_run.remote import fingerprint
from tests.conftest import CLI, ROOT, missing_test_bed

INSTANCE_SH = ROOT / "tests" / "bed" / "instance.sh"
INSTANCE_IMAGE = os.environ.get("GPU_RUN_TEST_INSTANCE_IMAGE", "gpu-run-testbed:instance")


# (d) The parser, on the forms the consoles print -------------------------------------------------

@pytest.mark.parametrize("command, expected", [
    # AutoDL's console.
    ("ssh -p 38921 root@connect.westb.seetacloud.com", SshCommand("root", "connect.westb.seetacloud.com", 38921)),
    # vast.ai, with the Jupyter port forward it adds.
    ("ssh -p 41234 root@ssh4.vast.ai -L 8080:localhost:8080", SshCommand("root", "ssh4.vast.ai", 41234)),
    # RunPod's "SSH over exposed TCP": port after the address, and the account's key.
    ("ssh root@69.30.85.5 -p 22116 -i ~/.ssh/id_ed25519", SshCommand("root", "69.30.85.5", 22116, "~/.ssh/id_ed25519")),
    ("ssh root@host.example -p 2222", SshCommand("root", "host.example", 2222)),
    ("ssh -l ubuntu -p2222 -o StrictHostKeyChecking=no 10.0.0.7", SshCommand("ubuntu", "10.0.0.7", 2222)),
    ("ssh -N -L 6006:127.0.0.1:6006 -p 10022 root@region-1.autodl.com", SshCommand("root", "region-1.autodl.com", 10022)),
    ("  ssh   root@box.example  ", SshCommand("root", "box.example", 22)),
    ("ssh -oPort=1 -4 -p 2200 root@[2001:db8::1]", SshCommand("root", "2001:db8::1", 2200)),
])
def test_parse_ssh_command(command, expected):
    assert parse_ssh_command(command) == expected


def test_ssh_value_brackets_an_ipv6_address():
    assert parse_ssh_command("ssh -p 2200 root@[2001:db8::1]").ssh == "root@[2001:db8::1]:2200"
    assert parse_ssh_command("ssh -p 38921 root@connect.westb.seetacloud.com").ssh == "root@connect.westb.seetacloud.com:38921"


@pytest.mark.parametrize("command, says", [
    ("", "must start with ssh"),
    ("scp -P 22 root@box:/x .", "must start with ssh"),
    ("root@box -p 22", "must start with ssh"),
    ("ssh", "no user@host"),
    ("ssh -p 22", "no user@host"),
    ("ssh -p", "-p needs a value"),
    ("ssh -p 99999 root@box", "1 to 65535"),
    ("ssh -p 0 root@box", "1 to 65535"),
    ("ssh -p twenty root@box", "not a port"),
    ("ssh box.example", "who logs in"),
    ("ssh root@box nvidia-smi", "more than an address"),
    ("ssh 'root@box", "cannot read"),
    ("ssh -Z root@box", "unknown ssh option -Z"),
])
def test_parse_ssh_command_refuses_in_one_line(command, says):
    with pytest.raises(ConfigError) as e:
        parse_ssh_command(command)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_host_table_parses_and_quotes_a_dotted_name(tmp_path):
    table = host_table("a100.autodl", "root@h:1", "~/.ssh/id_ed25519", "autodl", 1.2)
    hosts = parse_hosts(tomllib.loads(table))
    host = hosts["a100.autodl"]
    assert (host.ssh, host.ssh_key, host.preset, host.price_per_hour) == ("root@h:1", "~/.ssh/id_ed25519", "autodl", 1.2)
    assert (host.workdir, host.stop_command, host.currency) == ("/root/autodl-tmp/gpu-run", "shutdown", "CNY")


def test_check_new_host_refuses_a_name_in_the_file(tmp_path):
    path = tmp_path / "gpu-run.toml"
    path.write_text('[hosts.box]\nssh = "root@h:1"\n')
    with pytest.raises(ConfigError, match="already in"):
        check_new_host(path, "box", host_table("box", "root@h:2", "~/.ssh/id_ed25519", None, None))
    check_new_host(path, "box2", host_table("box2", "root@h:2", "~/.ssh/id_ed25519", None, None))
    with pytest.raises(ConfigError, match="unknown preset"):
        check_new_host(path, "box3", host_table("box3", "root@h:2", "~/.ssh/id_ed25519", "nope", None))


def test_created_key_is_private_loadable_and_never_overwritten(tmp_path):
    key = tmp_path / "home" / ".ssh" / "id_ed25519"
    line = create_laptop_key(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    loaded = paramiko.Ed25519Key.from_private_key_file(str(key))  # no passphrase
    assert line.split()[:2] == [loaded.get_name(), loaded.get_base64()]
    assert line.split()[2].startswith("gpu-run@")
    assert Path(f"{key}.pub").read_text().strip() == line
    before = key.read_bytes()
    Path(f"{key}.pub").unlink()
    with pytest.raises(FileExistsError):
        create_laptop_key(key)
    assert key.read_bytes() == before


# Integration: a container instance with a password ------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    def __init__(self, name: str, port: int, password: str):
        self.name, self.port, self.password = name, port, password

    @property
    def ssh_command(self) -> str:
        return f"ssh -p {self.port} root@127.0.0.1"

    def host_key(self) -> paramiko.PKey:
        out = subprocess.run(["bash", str(INSTANCE_SH), "host-key", self.name], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return paramiko.Ed25519Key(data=base64.b64decode(out[1]))


@pytest.fixture
def instance(cleanup) -> Instance:
    if shutil.which("docker") is None:
        missing_test_bed("no docker CLI")
    if subprocess.run(["docker", "image", "inspect", INSTANCE_IMAGE], capture_output=True, timeout=60).returncode != 0:
        missing_test_bed(f"image {INSTANCE_IMAGE} is missing")
    name = f"gpu-run-testbed-onboard-{secrets.token_hex(4)}"
    password = f"pw-{secrets.token_urlsafe(12)}"
    cleanup.container(name)  # before it starts: a start that fails half way leaves nothing either
    for _ in range(3):  # another test may take the free port between our check and sshd's bind
        port = free_port()
        proc = subprocess.run(["bash", str(INSTANCE_SH), "start", name, str(port), "--password", password],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return Instance(name, port, password)
    raise AssertionError(f"the instance did not start: {proc.stderr}")


@pytest.fixture
def laptop(tmp_path, gpu_run_home) -> CLI:
    """A laptop whose HOME has no ~/.ssh at all: the key and known_hosts are made by hosts add."""
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_RUN_CONFIG", "SSH_AUTH_SOCK")}
    env.update({"GPU_RUN_HOME": str(gpu_run_home), "HOME": str(home), "COLUMNS": "200"})
    cli = CLI(work, env)
    cli.home = home
    return cli


def hosts_add(cli: CLI, *args: str, input: str = "") -> subprocess.CompletedProcess:
    """`gpu-run hosts add ...` with stdin (CLI.__call__ has none)."""
    return subprocess.run([sys.executable, "-m", "gpu_run.cli", "hosts", "add", *args], cwd=cli.cwd, env=cli.env,
                          input=input, capture_output=True, text=True, timeout=120)


def files_holding(secret: str, *roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                found.append(path)
    return found


def nothing_written(cli: CLI) -> None:
    assert not (cli.cwd / "gpu-run.toml").exists()
    assert not (cli.home / ".ssh" / "known_hosts").exists()
    assert not (cli.home / ".ssh" / "id_ed25519").exists()


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


@pytest.mark.integration
def test_hosts_add_installs_the_key_records_the_host_and_keeps_no_password(instance, laptop, gpu_run_home):
    proc = hosts_add(laptop, "box", "--ssh-command", instance.ssh_command, "--password-stdin",
                     "--accept-new-host-key", "--preset", "autodl", "--json", input=instance.password + "\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    host_key = instance.host_key()
    assert result == {"host": "box", "ssh": f"root@127.0.0.1:{instance.port}", "key": "~/.ssh/id_ed25519",
                      "fingerprint": fingerprint(host_key), "config": str(laptop.cwd / "gpu-run.toml")}

    # The key was made, private, in a private ~/.ssh.
    key = laptop.home / ".ssh" / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    public = Path(f"{key}.pub").read_text().strip()
    assert public.startswith("ssh-ed25519 ")

    # known_hosts names the host as OpenSSH does, with the instance's own key.
    known = (laptop.home / ".ssh" / "known_hosts").read_text().splitlines()
    assert known == [f"[127.0.0.1]:{instance.port} ssh-ed25519 {host_key.get_base64()}"]

    # A login with the key alone (no password, no agent), checked against that known_hosts.
    client = paramiko.SSHClient()
    client.load_host_keys(str(laptop.home / ".ssh" / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=instance.port, username="root", key_filename=str(key),
                   look_for_keys=False, allow_agent=False, timeout=15)
    try:
        _, out, _ = client.exec_command("cat ~/.ssh/authorized_keys; stat -c %a ~/.ssh ~/.ssh/authorized_keys")
        lines = out.read().decode().splitlines()
    finally:
        client.close()
    assert lines.count(public) == 1
    assert lines[-2:] == ["700", "600"]

    # gpu-run.toml has the host, with the preset, and every command reads it.
    table = tomllib.loads((laptop.cwd / "gpu-run.toml").read_text())["hosts"]["box"]
    assert table == {"ssh": f"root@127.0.0.1:{instance.port}", "ssh_key": "~/.ssh/id_ed25519", "preset": "autodl"}
    listed = {h["name"]: h for h in laptop.json("hosts")}
    assert listed["box"]["address"] == f"root@127.0.0.1:{instance.port}"
    assert (listed["box"]["stop_command"], listed["box"]["currency"]) == ("shutdown", "CNY")

    # The same name again is refused before any login; another name needs no password now.
    again = hosts_add(laptop, "box", "--ssh-command", instance.ssh_command, "--password-stdin",
                      input=instance.password + "\n")
    assert "already in" in one_line_error(again)
    second = hosts_add(laptop, "box2", "--ssh-command", instance.ssh_command)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "no password needed" in second.stdout
    assert "password of" not in second.stdout + second.stderr  # never prompted
    assert set(tomllib.loads((laptop.cwd / "gpu-run.toml").read_text())["hosts"]) == {"box", "box2"}

    # The password is in no file and no output.
    for p in (proc, again, second):
        assert instance.password not in p.stdout + p.stderr
    assert files_holding(instance.password, laptop.home, laptop.cwd, gpu_run_home) == []


@pytest.mark.integration
def test_hosts_add_with_a_wrong_password_writes_nothing(instance, laptop, gpu_run_home):
    wrong = f"wrong-{secrets.token_hex(6)}"
    proc = hosts_add(laptop, "box", "--ssh-command", instance.ssh_command, "--password-stdin",
                     "--accept-new-host-key", input=wrong + "\n")
    line = one_line_error(proc)
    assert "password was refused" in line and f"root@127.0.0.1:{instance.port}" in line
    assert wrong not in proc.stdout + proc.stderr
    nothing_written(laptop)
    assert files_holding(wrong, laptop.home, laptop.cwd, gpu_run_home) == []


@pytest.mark.integration
def test_hosts_add_refuses_a_host_key_the_user_declines(instance, laptop):
    proc = hosts_add(laptop, "box", "--ssh-command", instance.ssh_command, "--password-stdin",
                     input=f"{instance.password}\nn\n")
    assert proc.returncode != 0
    assert f"host key of 127.0.0.1:{instance.port} is ssh-ed25519 {fingerprint(instance.host_key())}" in proc.stderr
    assert "not accepted" in proc.stderr.splitlines()[-1]
    nothing_written(laptop)


@pytest.mark.integration
def test_hosts_add_refuses_a_changed_host_key(instance, laptop):
    ssh_dir = laptop.home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    # known_hosts remembers another key for this [host]:port: the machine is not the one we met.
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    stale = f"[127.0.0.1]:{instance.port} {other}\n"
    (ssh_dir / "known_hosts").write_text(stale)
    proc = hosts_add(laptop, "box", "--ssh-command", instance.ssh_command, "--password-stdin",
                     "--accept-new-host-key", input=instance.password + "\n")
    assert "CHANGED" in one_line_error(proc)
    assert (ssh_dir / "known_hosts").read_text() == stale
    assert not (laptop.cwd / "gpu-run.toml").exists()
    assert not (ssh_dir / "id_ed25519").exists()

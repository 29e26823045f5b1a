"""Shared fixtures: an isolated GPU_RUN_HOME, generated datasets, the CLI as a user runs it, and
the test bed (Docker engine, sshd, moto), which must be there when GPU_RUN_REQUIRE_INTEGRATION=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.demo_data import make_dataset

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_INTEGRATION = os.environ.get("GPU_RUN_REQUIRE_INTEGRATION") == "1"


def missing_test_bed(what: str) -> None:
    """Fail in CI, skip on a laptop without the bed (run `make testbed` to get it)."""
    message = f"test bed: {what} (run `make testbed`)"
    if REQUIRE_INTEGRATION:
        pytest.fail(message)
    pytest.skip(message)


def testbed_env() -> dict[str, str]:
    path = ROOT / ".testbed" / "env"
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture
def gpu_run_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "gpu-run-home"
    monkeypatch.setenv("GPU_RUN_HOME", str(home))
    monkeypatch.delenv("GPU_RUN_CONFIG", raising=False)
    return home


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """2 classes, 40 train + 12 val each, 48 px: learnable in a couple of epochs at image size 32."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", classes=2, train_per_class=40,
                        val_per_class=12, size=48, seed=1)


@pytest.fixture
def docker_client():
    from launcher.backends.docker_engine import connect

    client = connect()
    if client is None:
        missing_test_bed("no Docker engine reachable")
    try:
        client.images.get("gpu-run-base:cpu")
    except Exception:
        missing_test_bed("image gpu-run-base:cpu is missing")
    return client


class CLI:
    """Runs `gpu-run` in a subprocess, in a working directory, as a user would."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, env

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 600, check: bool = False):
        proc = subprocess.run(
            [sys.executable, "-m", "launcher.cli", *args],
            cwd=self.cwd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"gpu-run {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str, **kwargs):
        proc = self(*args, "--json", check=True, **kwargs)
        return json.loads(proc.stdout)


@pytest.fixture
def cli(tmp_path, gpu_run_home) -> CLI:
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "GPU_RUN_HOME": str(gpu_run_home), "COLUMNS": "200"}
    return CLI(work, env)


def trainer(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def events(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


class SshHost:
    """The test bed's sshd as a rented host `t4-box`, seen from a laptop whose HOME is a temp folder."""

    def __init__(self, tmp_path: Path, gpu_run_home: Path, grace_s: int = 3):
        bed = testbed_env()
        if not bed:
            missing_test_bed("no .testbed/env (sshd not set up)")
        self.port = int(bed["GPU_RUN_TEST_SSH_PORT"])
        self.key = bed["GPU_RUN_TEST_SSH_KEY"]
        self.host_key = Path(bed["GPU_RUN_TEST_SSH_HOST_KEY"]).read_text().split()[:2]
        self.home = tmp_path / "home"
        (self.home / ".ssh").mkdir(parents=True)
        self.known_hosts = self.home / ".ssh" / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(self.host_key)}\n")
        self.write_ssh_config(user=bed["GPU_RUN_TEST_SSH_USER"], key=self.key)
        self.workdir = tmp_path / "remote-workdir"
        self.stop_marker = tmp_path / "host-stopped"
        self.work = tmp_path / "work"
        self.work.mkdir(exist_ok=True)
        self.write_config(grace_s=grace_s)
        env = {**os.environ, "GPU_RUN_HOME": str(gpu_run_home), "HOME": str(self.home), "COLUMNS": "200"}
        self.cli = CLI(self.work, env)
        import socket

        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex(("127.0.0.1", self.port)) != 0:
                missing_test_bed(f"no sshd on 127.0.0.1:{self.port}")

    def write_ssh_config(self, user: str, key: str, port: int | None = None) -> None:
        (self.home / ".ssh" / "config").write_text(
            f"Host t4-box\n  HostName 127.0.0.1\n  Port {port or self.port}\n  User {user}\n  IdentityFile {key}\n"
        )

    def write_config(self, grace_s: int = 3, extra: str = "") -> None:
        (self.work / "gpu-run.toml").write_text(
            "[hosts.t4-box]\n"
            'ssh = "t4-box"\n'
            "price_per_hour = 0.8\n"
            'currency = "CNY"\n'
            'billing = "per_second"\n'
            f'stop_command = "date +%s > {self.stop_marker}"\n'
            f'workdir = "{self.workdir}"\n'
            f"grace_s = {grace_s}\n" + extra
        )

    def remote_run_dir(self, run_id: str) -> Path:
        return self.workdir / "runs" / run_id


def cut_ssh_connections() -> int:
    """Kill every per-connection sshd process of the test bed: all client connections drop at once."""
    pid = int((ROOT / ".testbed" / "ssh" / "sshd.pid").read_text())
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        subprocess.run(["kill", "-9", child])
    return len(children)


@pytest.fixture
def ssh_host(tmp_path, gpu_run_home, docker_client) -> SshHost:
    return SshHost(tmp_path, gpu_run_home)

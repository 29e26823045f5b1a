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

"""A container instance (AutoDL look-alike) as the rented host: no Docker inside, the interpreter at
a conda path that a non-interactive login does not have on its PATH, and a `shutdown` that ends the
container, after which its SSH port refuses connections (tests/bed/instance.sh). gpu-run picks the
python runtime on its own and keeps every promise it keeps on a Docker host."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.conftest import CLI, ROOT, missing_test_bed, wait_for
from tests.conftest import testbed_env as bed_env

pytestmark = pytest.mark.integration
FAST = ["--host", "autodl", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none"]
REMOTE_RUNS = "/root/autodl-tmp/gpu-run/runs"


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): the instance's sshd binds it again
    after each restart, and a port in that range can meanwhile be taken by an outgoing connection
    (even a connection to itself, when a client dials a port with no listener)."""
    import random

    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port between 20000 and 32000")


class Instance:
    """One container instance and a laptop (HOME, gpu-run.toml) that knows it as host `autodl`."""

    def __init__(self, tmp_path: Path, gpu_run_home: Path):
        bed = bed_env()
        if not bed:
            missing_test_bed("no .testbed/env")
        if subprocess.run(["docker", "image", "inspect", "gpu-run-testbed:instance"], capture_output=True).returncode:
            missing_test_bed("image gpu-run-testbed:instance is missing")
        self.name = f"gpu-run-testbed-instance-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.script = ROOT / "tests" / "bed" / "instance.sh"
        self.home = tmp_path / "home"
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".ssh" / "config").write_text(
            f"Host autodl\n  HostName 127.0.0.1\n  Port {self.port}\n  User root\n  IdentityFile {bed['GPU_RUN_TEST_SSH_KEY']}\n")
        self.work = tmp_path / "work"
        self.work.mkdir()
        (self.work / "gpu-run.toml").write_text(
            '[hosts.autodl]\nssh = "autodl"\npreset = "autodl"\nprice_per_hour = 1.2\ngrace_s = 3\n')
        self.cli = CLI(self.work, {**os.environ, "GPU_RUN_HOME": str(gpu_run_home), "HOME": str(self.home),
                                   "COLUMNS": "200", "GPU_RUN_STOP_CONFIRM_S": "10"})

    def start(self) -> None:
        """A fresh container; the laptop learns its host key."""
        subprocess.run(["bash", str(self.script), "start", self.name, str(self.port)], check=True, capture_output=True)
        host_key = subprocess.run(["bash", str(self.script), "host-key", self.name], capture_output=True, text=True,
                                  check=True).stdout.split()[:2]
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_key)}\n")

    def running(self) -> bool:
        return subprocess.run(["bash", str(self.script), "is-running", self.name]).returncode == 0

    def start_again(self) -> None:
        """The user starts the stopped instance from the console."""
        subprocess.run(["docker", "start", self.name], check=True, capture_output=True)

        def answers() -> bool:
            with socket.socket() as s:
                s.settimeout(2)
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return False
                return s.recv(64).startswith(b"SSH-")

        wait_for(answers, 30, "sshd in the instance")
        time.sleep(1)
        assert self.running(), subprocess.run(["docker", "logs", "-t", self.name], capture_output=True, text=True)

    def read(self, path: str) -> bytes:
        """A file from the instance's disk, whether it runs or not (docker cp reads a stopped one)."""
        out = subprocess.run(["docker", "cp", f"{self.name}:{path}", "-"], capture_output=True, check=True).stdout
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(out)) as tar:
            return tar.extractfile(tar.getmembers()[0]).read()

    def exists(self, path: str) -> bool:
        return subprocess.run(["docker", "cp", f"{self.name}:{path}", "-"], capture_output=True).returncode == 0



@pytest.fixture
def instance(tmp_path, gpu_run_home, cleanup):
    inst = Instance(tmp_path, gpu_run_home)
    cleanup.container(inst.name)  # before it starts: a start that fails half way leaves nothing either
    inst.start()
    return inst


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_train_on_a_container_instance_end_to_end(instance, dataset, fault_row):
    doctor = instance.cli.json("doctor", "autodl")
    runtime = next(r for r in doctor if r["check"] == "runtime")
    assert runtime["ok"] and runtime["result"].startswith("python /root/miniconda3/bin/python") and "no Docker" in runtime["result"]
    summary = instance.cli.json("train", *FAST, "--epochs", "2", "--data", str(dataset))
    assert summary["status"] == "succeeded" and summary["runtime"] == "python"
    assert summary["versions"]["python"].startswith("/root/miniconda3/bin/python")  # conda's, off the login PATH
    assert summary["versions"]["torch"].startswith("2.")
    # The checkpoint came back identical to the host's copy, and loads.
    run_dir = Path(summary["run_dir"])
    host_last = instance.read(f"{REMOTE_RUNS}/{summary['run_id']}/out/checkpoints/last.pth")
    assert sha((run_dir / "checkpoints" / "last.pth").read_bytes()) == sha(host_last)
    assert torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 2
    # `shutdown` inside the instance ended it: the laptop saw the port go and recorded the stop.
    assert not instance.running()
    assert summary["stop"]["ok"] and summary["stop"]["state"] == "stopped"
    assert summary["cost"]["currency"] == "CNY" and summary["cost"]["billed_s"] >= 1
    assert instance.exists("/root/autodl-tmp/gpu-run/data")  # the data disk, as the preset says
    # Again: the trainer code and the dataset are already there; nothing is sent.
    instance.start_again()
    again = instance.cli("train", *FAST, "--epochs", "1", "--data", str(dataset), check=True)
    assert "trainer code is up to date" in again.stdout and "dataset synced: 0 file(s)" in again.stdout
    assert not instance.running()


def test_client_killed_the_instance_still_stops(instance, dataset, gpu_run_home, fault_row):
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "train", *FAST, "--image-size", "64", "--epochs", "3",
                             "--data", str(dataset)], cwd=instance.work, env=instance.cli.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = instance.work / "runs"
    run_id = wait_for(lambda: next((p.name for p in runs.glob("*")), None), 120, "the run")
    wait_for(lambda: instance.exists(f"{REMOTE_RUNS}/{run_id}/out/metrics.jsonl"), 180, "the first epoch")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The watchdog in the instance ends the job's wait and runs `shutdown` after the grace.
    wait_for(lambda: not instance.running(), 240, "the instance to shut itself down")
    status = dict(kv.split("=") for kv in instance.read(f"{REMOTE_RUNS}/{run_id}/status").decode().split())
    assert status["outcome"] == "finished" and status["exit_code"] == "0"
    log = instance.read(f"{REMOTE_RUNS}/{run_id}/watchdog.log").decode()
    assert "grace period over" in log and "running stop command (attempt 1): shutdown" in log
    # Started again, attach pulls everything and shuts it down once more.
    instance.start_again()
    summary = instance.cli.json("attach", run_id)
    assert summary["status"] == "succeeded" and summary["epochs_completed"] == 3 and summary["stop"]["ok"]
    assert not instance.running()
    fault_row("container instance: client SIGKILL during tail", 0, int(instance.running()), None, summary["stop"]["ok"])


def test_stop_then_resume_on_the_instance(instance, dataset):
    started = instance.cli.json("train", *FAST, "--image-size", "64", "--epochs", "40", "--detach", "--data", str(dataset))
    run_id = started["run_id"]
    wait_for(lambda: instance.exists(f"{REMOTE_RUNS}/{run_id}/out/metrics.jsonl"), 180, "the first epoch")
    stopped = instance.cli.json("stop", run_id)
    assert stopped["status"] == "stopped" and stopped["exit_code"] == 75 and stopped["stop"]["ok"]
    assert not instance.running()
    last = torch.load(Path(stopped["run_dir"]) / "checkpoints" / "last.pth", weights_only=True)
    instance.start_again()
    proc = instance.cli("train", "--resume", run_id, *FAST, "--image-size", "64", "--epochs", str(last["epoch"] + 1), "--json")
    logs = subprocess.run(["docker", "logs", "-t", instance.name], capture_output=True, text=True)
    state = subprocess.run(["docker", "inspect", "-f", "{{json .State}}", instance.name], capture_output=True, text=True).stdout
    assert proc.returncode == 0, (proc.stderr, logs.stdout[-3000:], logs.stderr[-3000:], state)
    resumed = json.loads(proc.stdout)
    assert resumed["status"] == "succeeded" and resumed["resumed_from"] == run_id
    assert '"event": "resumed", ' in (Path(resumed["run_dir"]) / "train.log").read_text()
    assert not instance.running()


def in_instance(instance, script: str) -> str:
    return subprocess.run(["docker", "exec", instance.name, "sh", "-c", script], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("victim", ["watchdog", "trainer"])
def test_killed_watchdog_or_trainer_on_the_instance(victim, instance, dataset, fault_row):
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "train", *FAST, "--image-size", "64", "--epochs", "3",
                             "--data", str(dataset), "--json"], cwd=instance.work, env=instance.cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = instance.work / "runs"
    run_id = wait_for(lambda: next((p.name for p in runs.glob("*")), None), 120, "the run")
    remote = f"{REMOTE_RUNS}/{run_id}"
    wait_for(lambda: instance.exists(f"{remote}/out/checkpoints/last.pth"), 180, "the first checkpoint")
    pid_file = "watchdog.pid" if victim == "watchdog" else "job.pid"
    in_instance(instance, f"kill -9 $(cat {remote}/{pid_file})")
    out, err = proc.communicate(timeout=300)
    summary = json.loads(out)
    if victim == "watchdog":
        # The backstop started it again; the run ended as if nothing happened.
        assert summary["status"] == "succeeded", err
        assert "the watchdog is gone: starting it again" in instance.read(f"{remote}/watchdog.log").decode()
    else:
        # The trainer died mid-epoch: the run failed, and the checkpoint from before came back whole.
        assert summary["status"] == "failed" and summary["exit_code"] == 137, err
        last = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.pth", weights_only=True)
        assert last["epoch"] >= 1
    assert summary["stop"]["ok"] and summary["stop"]["state"] == "stopped" and not instance.running()
    fault_row(f"container instance: {victim} SIGKILL mid-run", 0, int(instance.running()), None, summary["stop"]["ok"])

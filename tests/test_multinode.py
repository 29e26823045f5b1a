"""Two container instances (tests/bed/instance.sh) as the nodes of one multi-node job: two machines
that share the host's network, so the rendezvous on 127.0.0.1 reaches across, and whose `shutdown`
really ends them. torchrun's c10d rendezvous and gloo on CPU, one process per node (world size 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from gpu_run.ledger import Ledger
from gpu_run.money.cost import cost_of
from tests.conftest import CLI, testbed_env, wait_for
from tests.test_instance import REMOTE_RUNS, Instance, free_port

pytestmark = pytest.mark.integration
PRICES = {"node-a": 36.0, "node-b": 72.0}  # CNY an hour: a cent every second or half second
FAST = ["--host", "pair", "--gpus", "1", "--image-size", "32", "--batch-size", "8", "--workers", "0",
        "--weights", "none"]


class Pair:
    """Two instances, and a laptop that knows them as hosts node-a and node-b, grouped as `pair`."""

    def __init__(self, tmp_path: Path, gpu_run_home: Path, cleanup):
        self.nodes = {name: Instance(tmp_path / name, gpu_run_home) for name in PRICES}
        for inst in self.nodes.values():
            cleanup.container(inst.name)  # before it starts: a half-started one goes too
        for inst in self.nodes.values():
            inst.start()
        home = tmp_path / "laptop"
        (home / ".ssh").mkdir(parents=True)
        identity = testbed_env()["GPU_RUN_TEST_SSH_KEY"]
        (home / ".ssh" / "config").write_text("".join(
            f"Host {name}\n  HostName 127.0.0.1\n  Port {inst.port}\n  User root\n  IdentityFile {identity}\n"
            for name, inst in self.nodes.items()))
        (home / ".ssh" / "known_hosts").write_text("".join(
            (inst.home / ".ssh" / "known_hosts").read_text() for inst in self.nodes.values()))
        self.work = tmp_path / "laptop-work"
        self.work.mkdir()
        self.port = free_port()
        (self.work / "gpu-run.toml").write_text("".join(
            f'[hosts.{name}]\nssh = "{name}"\npreset = "autodl"\nprice_per_hour = {price}\ngrace_s = 5\n\n'
            for name, price in PRICES.items()) + f'[groups.pair]\nhosts = ["node-a", "node-b"]\nrendezvous_port = {self.port}\n')
        env = {**next(iter(self.nodes.values())).cli.env, "HOME": str(home)}
        self.cli = CLI(self.work, env)
        self.gpu_run_home = gpu_run_home

    def running(self) -> dict[str, bool]:
        return {name: inst.running() for name, inst in self.nodes.items()}


@pytest.fixture
def pair(tmp_path, gpu_run_home, cleanup) -> Pair:
    return Pair(tmp_path, gpu_run_home, cleanup)


def test_two_nodes_train_one_job_and_both_machines_stop(pair, dataset):
    doctor = {r["check"]: r for r in pair.cli.json("doctor", "pair")}
    assert doctor["torch versions"]["ok"] and "on every node" in doctor["torch versions"]["result"]
    assert doctor["rendezvous port"]["ok"] and f"127.0.0.1:{pair.port}" in doctor["rendezvous port"]["result"]
    assert doctor["network interface"]["result"].startswith("lo: the rendezvous address 127.0.0.1 is loopback")

    summary = pair.cli.json("train", *FAST, "--epochs", "1", "--data", str(dataset))
    assert summary["status"] == "succeeded", summary
    assert summary["nodes"] == ["node-a", "node-b"] and summary["world_size"] == 2
    run_dir = Path(summary["run_dir"])
    start = next(json.loads(line) for line in (run_dir / "train.log").read_text().splitlines()
                 if line.startswith('{"event": "start"'))
    assert start["world_size"] == 2  # one trainer, two processes on two machines
    # Rank 0 wrote the checkpoints on its machine, and they came back whole.
    for name in ("best.pth", "last.pth"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert checkpoint["epoch"] == 1 and "fc.weight" in checkpoint["model"]
    assert sum(r["rank0"] for r in summary["node_results"]) == 1
    # Each machine's own `shutdown` ended it, and the laptop confirmed both.
    assert pair.running() == {"node-a": False, "node-b": False}
    assert summary["stop"]["ok"] and all(r["stop"]["state"] == "stopped" for r in summary["node_results"])
    # The cost is each node's billed span at its own price, summed.
    run = Ledger(pair.gpu_run_home / "runs.db").get_run(summary["run_id"])
    nodes = json.loads(run.handle_json)["nodes"]
    expected = sum((cost_of(n["billed_to"] - n["billed_from"], PRICES[n["host"]], "per_second") for n in nodes),
                   Decimal("0.00"))
    assert expected > 0 and Decimal(str(run.cost_amount)) == expected == Decimal(str(summary["cost"]["amount"]))
    listed = pair.cli.json("runs")[0]
    assert listed["host"] == "pair" and Decimal(str(listed["cost"])) == expected


def test_a_node_killed_mid_run_stops_the_job_and_both_machines(pair, dataset):
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "train", *FAST, "--image-size", "64", "--epochs", "8",
                             "--data", str(dataset), "--json"], cwd=pair.work, env=pair.cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = wait_for(lambda: next((p.name for p in (pair.work / "runs").glob("*")), None), 120, "the run")
        remote = {"node-a": f"{REMOTE_RUNS}/{run_id}", "node-b": f"{REMOTE_RUNS}/{run_id}-n1"}
        # Rank 0's machine writes the epoch's metrics; the other one is the victim, a machine dying.
        rank0 = wait_for(lambda: next((n for n, inst in pair.nodes.items()
                                       if inst.exists(f"{remote[n]}/out/metrics.jsonl")), None), 180, "the first epoch")
        victim = next(n for n in pair.nodes if n != rank0)
        subprocess.run(["docker", "kill", pair.nodes[victim].name], check=True, capture_output=True)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "Traceback" not in err, err
    summary = json.loads(out)
    assert summary["status"] == "failed" and summary["epochs_completed"] < 8
    assert f"{victim} (node {list(PRICES).index(victim)}) stopped answering: its machine is down" in err, err
    # The survivor's trainer ended too, its machine stopped, and the dead one counts as stopped.
    assert pair.running() == {"node-a": False, "node-b": False}
    assert summary["stop"]["ok"] and all(r["stop"]["state"] == "stopped" for r in summary["node_results"])
    # Rank 0's last checkpoint (from the epoch before the kill) came back and loads.
    assert torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.pth", weights_only=True)["epoch"] >= 1

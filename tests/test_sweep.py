"""`gpu-run sweep` on the test bed: four points on the SSH test host (Docker) and on a container
instance (the host's own Python), one sync and one stop for all of them, the queue on the host
going on without the laptop, and --resume running only what is unfinished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from gpu_run.money.cost import cost_of
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none", "--epochs", "1"]
GRID = ["--lr", "0.001,0.01", "--seed", "1,2"]  # four points


PRICE = 36.0  # an hour, so that a minute's sweep costs cents enough to split


def count_stops(ssh_host) -> Path:
    """The host's stop command also appends a line to a file: how often it ran, not just whether."""
    counter = ssh_host.work.parent / "stops"
    text = (ssh_host.work / "gpu-run.toml").read_text().replace("price_per_hour = 0.8", f"price_per_hour = {PRICE}")
    marker = f'stop_command = "date +%s > {ssh_host.stop_marker}"'
    assert marker in text
    (ssh_host.work / "gpu-run.toml").write_text(
        text.replace(marker, f'stop_command = "echo stop >> {counter}; date +%s > {ssh_host.stop_marker}"'))
    return counter


def stops(counter: Path) -> int:
    return len(counter.read_text().split()) if counter.exists() else 0


def billed_span_cost(home: Path, sweep_id: str) -> Decimal:
    """What the machine's billed spans (every round of the sweep) cost, from the ledger."""
    import sqlite3

    rounds = json.loads(sqlite3.connect(home / "runs.db").execute(
        "SELECT rounds_json FROM sweeps WHERE sweep_id = ?", [sweep_id]).fetchone()[0])
    return sum((cost_of(r["billed_to"] - r["billed_from"], PRICE, "per_second") for r in rounds), Decimal("0"))


def test_four_points_one_sync_one_stop_costs_add_up(ssh_host, dataset, gpu_run_home):
    counter = count_stops(ssh_host)
    result = ssh_host.cli.json("sweep", "--host", "t4-box", *FAST, *GRID, "--data", str(dataset), timeout=900)
    assert result["status"] == "succeeded", result
    points = result["points"]
    assert [p["label"] for p in points] == ["lr=0.001 seed=1", "lr=0.001 seed=2", "lr=0.01 seed=1", "lr=0.01 seed=2"]
    # Every point is an ordinary run: its own folder, checkpoints that load, a summary linked to the sweep.
    for p in points:
        run_dir = Path(p["run_dir"])
        ckpt = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)
        assert ckpt["epoch"] == 1 and ckpt["args"]["lr"] == p["values"]["lr"] and ckpt["seed"] == p["values"]["seed"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["sweep"]["id"] == result["sweep_id"] and summary["status"] == "succeeded"
        assert summary["stop"]["state"] == "stopped"
    # One sync: the dataset went up once (one data folder on the host), one image, one stop.
    assert len(list((ssh_host.workdir / "data").iterdir())) == 1
    assert stops(counter) == 1
    # The stop came after the last point ended.
    stopped_at = int(ssh_host.stop_marker.read_text())
    last_end = max(int(dict(i.split("=", 1) for i in (ssh_host.remote_run_dir(p["run_id"]) / "status").read_text().split())["ended_at"])
                   for p in points)
    assert stopped_at >= last_end
    # Each point's cost is its share; together they are what the machine's billed span cost, to the cent.
    amounts = [Decimal(str(p["cost"])) for p in points]
    assert all(a >= Decimal("0.05") for a in amounts), amounts
    assert sum(amounts) == billed_span_cost(gpu_run_home, result["sweep_id"]) == Decimal(str(result["cost"]["amount"]))
    # The comparison is in runs/sweeps/<id>/.
    sweep_dir = Path(result["sweep_dir"])
    assert (sweep_dir / "accuracy_vs_speed.png").stat().st_size > 1000
    table = (sweep_dir / "compare.md").read_text()
    assert all(p["run_id"] in table for p in points)
    # `sweep status` tells the same story.
    status = ssh_host.cli.json("sweep", "status", result["sweep_id"])
    assert [p["status"] for p in status["points"]] == ["succeeded"] * 4
    assert status["cost"]["amount"] == result["cost"]["amount"]


def test_killed_client_the_host_finishes_the_sweep_and_stops_once(ssh_host, dataset, gpu_run_home):
    counter = count_stops(ssh_host)
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "sweep", "--host", "t4-box", *FAST, *GRID,
                             "--data", str(dataset)], cwd=ssh_host.work,
                            # The laptop's hold on the stop (while it pulls) lapses 10 s after it dies.
                            env={**ssh_host.cli.env, "GPU_RUN_HOLD_S": "10"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = ssh_host.workdir / "runs"
    wait_for(lambda: next(runs.glob("*/started_at"), None), 180, "the first point to start on the host")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # With no laptop, the queue runs the other points and the watchdog stops the machine once.
    wait_for(lambda: ssh_host.stop_marker.exists(), 300, "the machine to be stopped after the last point")
    statuses = sorted(runs.glob("*/status"))
    queue_dirs = [d for d in runs.iterdir() if (d / "queue.sh").exists()]
    points = [d for d in runs.iterdir() if (d / "start.sh").exists()]
    assert len(queue_dirs) == 1 and len(points) == 4
    assert all("outcome=finished exit_code=0" in (d / "status").read_text() for d in points), statuses
    assert stops(counter) == 1
    # The user starts the machine again; --resume pulls what ran, runs nothing, and stops it again.
    ssh_host.start_machine()
    sweep_id = queue_dirs[0].name.rsplit("-r", 1)[0]
    result = ssh_host.cli.json("sweep", "--resume", sweep_id, timeout=600)
    assert result["status"] == "succeeded"
    for p in result["points"]:
        assert torch.load(Path(p["run_dir"]) / "checkpoints" / "best.pth", weights_only=True)["epoch"] == 1
    assert len([d for d in runs.iterdir() if (d / "start.sh").exists()]) == 4  # nothing ran twice
    assert stops(counter) == 2  # the restarted machine was stopped again
    # Billing closed when the watchdog stopped the machine, not at the second stop.
    assert sum(Decimal(str(p["cost"])) for p in result["points"]) == billed_span_cost(gpu_run_home, sweep_id)


def test_on_a_container_instance_stopped_by_hand_then_resumed(tmp_path, gpu_run_home, cleanup, dataset):
    from tests.test_instance import REMOTE_RUNS, Instance

    instance = Instance(tmp_path, gpu_run_home)
    toml = instance.work / "gpu-run.toml"
    toml.write_text(toml.read_text().replace("price_per_hour = 1.2", f"price_per_hour = {PRICE}"))
    cleanup.container(instance.name)
    instance.start()
    # Points: (lr 0.001, 1 epoch), (0.001, 4 epochs), (0.01, 1), (0.01, 4).
    started = instance.cli.json("sweep", "--host", "autodl", *FAST, "--lr", "0.001,0.01", "--epochs", "1,4",
                                "--detach", "--data", str(dataset), timeout=600)
    sweep_id, runs = started["sweep_id"], started["points"]
    assert started["status"] == "detached" and len(runs) == 4
    # The laptop is gone; the queue runs the first point, then the second, which is stopped by hand
    # once it has trained an epoch.
    wait_for(lambda: instance.exists(f"{REMOTE_RUNS}/{runs[1]}/out/metrics.jsonl"), 240, "the second point's first epoch")
    stopped = instance.cli.json("stop", sweep_id, timeout=600)
    assert [p["status"] for p in stopped["points"]] == ["succeeded", "stopped", "cancelled", "cancelled"], stopped
    assert stopped["stop"]["ok"] and not instance.running()  # the machine stopped, once, after the cut
    cut = torch.load(Path(stopped["points"][1]["run_dir"]) / "checkpoints" / "last.pth", weights_only=True)
    assert 1 <= cut["epoch"] < 4
    status = instance.cli.json("sweep", "status", sweep_id)
    assert status["status"] == "stopped" and status["points"][0]["cost"] > 0

    # --resume runs only the three unfinished points; the cut one continues from its last.pth.
    instance.start_again()
    result = instance.cli.json("sweep", "--resume", sweep_id, timeout=900)
    assert result["status"] == "succeeded", result
    assert result["points"][0]["run_id"] == runs[0]  # the finished point did not run again
    resumed = result["points"][1]
    assert resumed["run_id"] != runs[1] and resumed["epochs_completed"] == 4
    summary = json.loads((Path(resumed["run_dir"]) / "summary.json").read_text())
    assert summary["resumed_from"] == runs[1]
    assert '"event": "resumed", ' in (Path(resumed["run_dir"]) / "train.log").read_text()
    assert not instance.running()
    # Every point's cost, over both rounds, adds up to the machine's two billed spans.
    rounds = json.loads(__import__("sqlite3").connect(gpu_run_home / "runs.db").execute(
        "SELECT rounds_json FROM sweeps WHERE sweep_id = ?", [sweep_id]).fetchone()[0])
    assert len(rounds) == 2
    billed = sum((cost_of(r["billed_to"] - r["billed_from"], PRICE, "per_second") for r in rounds), Decimal("0"))
    assert Decimal(str(result["cost"]["amount"])) == billed

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


def rounds_of(home: Path, sweep_id: str) -> list[dict]:
    import sqlite3

    return json.loads(sqlite3.connect(home / "runs.db").execute(
        "SELECT rounds_json FROM sweeps WHERE sweep_id = ?", [sweep_id]).fetchone()[0])


def test_four_points_on_the_ssh_host_without_the_laptop(ssh_host, dataset, gpu_run_home):
    """Two points at a time. The laptop is killed as the first point starts: the host's queue runs
    all four, the machine stops once after the last; --resume later pulls them, runs nothing again,
    and the costs (shared where points overlapped) add up."""
    counter = count_stops(ssh_host)
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "sweep", "--host", "t4-box", *FAST, *GRID,
                             "--parallel", "2", "--data", str(dataset)], cwd=ssh_host.work,
                            # The laptop's hold on the stop (while it pulls) lapses 10 s after it dies.
                            env={**ssh_host.cli.env, "GPU_RUN_HOLD_S": "10"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = ssh_host.workdir / "runs"
    wait_for(lambda: next(runs.glob("*/started_at"), None), 180, "the first point to start on the host")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # With no laptop, the queue runs the other points and the watchdog stops the machine once.
    wait_for(lambda: ssh_host.stop_marker.exists(), 300, "the machine to be stopped after the last point")
    queue_dirs = [d for d in runs.iterdir() if (d / "queue.sh").exists()]
    point_dirs = [d for d in runs.iterdir() if (d / "start.sh").exists()]
    assert len(queue_dirs) == 1 and len(point_dirs) == 4
    ends = [dict(i.split("=", 1) for i in (d / "status").read_text().split()) for d in point_dirs]
    assert all(e["outcome"] == "finished" and e["exit_code"] == "0" for e in ends), ends
    starts = sorted(int((d / "started_at").read_text()) for d in point_dirs)
    assert starts[1] < min(int(e["ended_at"]) for e in ends)  # two ran side by side
    assert stops(counter) == 1
    first_stop = int(ssh_host.stop_marker.read_text())
    assert first_stop >= max(int(e["ended_at"]) for e in ends)  # after the last point
    # One sync for the four points: the dataset's files went up once, whole.
    sweep_id = queue_dirs[0].name.rsplit("-r", 1)[0]
    (first,) = rounds_of(gpu_run_home, sweep_id)
    files = [p for p in dataset.rglob("*") if p.is_file()]
    assert first["sync"]["files"] == len(files) and first["sync"]["bytes"] >= sum(p.stat().st_size for p in files)
    assert len(list((ssh_host.workdir / "data").iterdir())) == 1

    # The user starts the machine again; --resume pulls what ran, runs nothing, and stops it again.
    ssh_host.start_machine()
    result = ssh_host.cli.json("sweep", "--resume", sweep_id, timeout=600)
    assert result["status"] == "succeeded", result
    assert len([d for d in runs.iterdir() if (d / "start.sh").exists()]) == 4  # nothing ran twice
    assert stops(counter) == 2  # the restarted machine was stopped again
    points = result["points"]
    assert [p["label"] for p in points] == ["lr=0.001 seed=1", "lr=0.001 seed=2", "lr=0.01 seed=1", "lr=0.01 seed=2"]
    # Every point is an ordinary run: its own folder, checkpoints that load, a summary linked to the sweep.
    for p in points:
        run_dir = Path(p["run_dir"])
        ckpt = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)
        assert ckpt["epoch"] == 1 and ckpt["args"]["lr"] == p["values"]["lr"] and ckpt["seed"] == p["values"]["seed"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["sweep"]["id"] == sweep_id and summary["status"] == "succeeded"
        assert summary["stop"]["ok"]
    # Each point's cost is its share of the machine's billed span, which closed when the watchdog
    # stopped the machine (not at the second stop); together they are that span's cost, to the cent.
    amounts = [Decimal(str(p["cost"])) for p in points]
    assert all(a >= Decimal("0.05") for a in amounts), amounts
    (closed,) = rounds_of(gpu_run_home, sweep_id)
    assert abs(closed["billed_to"] - first_stop) <= 1
    billed = cost_of(closed["billed_to"] - closed["billed_from"], PRICE, "per_second")
    assert sum(amounts) == billed == Decimal(str(result["cost"]["amount"]))
    # The comparison is in runs/sweeps/<id>/, and `sweep status` tells the same story.
    sweep_dir = Path(result["sweep_dir"])
    assert (sweep_dir / "accuracy_vs_speed.png").stat().st_size > 1000
    assert all(p["run_id"] in (sweep_dir / "compare.md").read_text() for p in points)
    status = ssh_host.cli.json("sweep", "status", sweep_id)
    assert [p["status"] for p in status["points"]] == ["succeeded"] * 4
    assert status["cost"]["amount"] == result["cost"]["amount"]


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


def test_the_budget_cuts_the_running_point_resumably_and_starts_no_more(ssh_host, dataset, gpu_run_home):
    # 3600 CNY an hour is 1 CNY a second: 70 CNY buys 70 s, of which the watchdog keeps the stop's
    # share (grace, stop timeout, margin); the first point wants far longer than the rest.
    counter = count_stops(ssh_host)
    toml = ssh_host.work / "gpu-run.toml"
    toml.write_text(toml.read_text().replace(f"price_per_hour = {PRICE}", "price_per_hour = 3600"))
    proc = ssh_host.cli("sweep", "--host", "t4-box", *FAST, "--image-size", "64", "--epochs", "200",
                        "--lr", "0.001,0.01", "--budget", "70", "--stop-timeout", "5", "--data", str(dataset),
                        "--json", timeout=600)
    assert proc.stdout.startswith("{"), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    first, second = result["points"]
    assert first["status"] == "stopped" and second["status"] == "cancelled", (result, proc.stderr[-2000:])
    summary = json.loads((Path(first["run_dir"]) / "summary.json").read_text())
    assert summary["exit_code"] == 75 and summary["sweep"]["outcome"] == "stopped"
    last = torch.load(Path(first["run_dir"]) / "checkpoints" / "last.pth", weights_only=True)
    assert last["epoch"] + (last["step"] > 0) >= 1  # progress to resume from
    assert not (ssh_host.remote_run_dir(second["run_id"]) / "started_at").exists()
    assert "outcome=max_runtime" in next((ssh_host.workdir / "runs").glob("sweep-*/status")).read_text()
    assert result["stop"]["ok"] and stops(counter) == 1 and not ssh_host.power.up
    assert result["cost"]["amount"] <= 70

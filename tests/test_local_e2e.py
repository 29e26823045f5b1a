"""The whole pipeline on the built-in local host: real Docker engine, real torch, real files."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import docker.errors
import pytest
import torch
import torchvision

from gpu_run.image import CPU_BASE_IMAGE, context_files, image_tag

TRAIN = ["train", "--host", "local", "--epochs", "2", "--image-size", "32", "--batch-size", "16",
         "--weights", "none", "--workers", "0"]
SUMMARY_KEYS = {"run_id", "host", "backend", "device", "model", "classes", "epochs", "epochs_completed",
                "best_val_acc", "status", "exit_code", "duration_s", "image_tag", "image_built", "dataset", "cost"}


def assert_run_outputs(run_dir: Path, dataset: Path, classes: list[str]) -> None:
    for name in ("best.pth", "last.pth"):
        ckpt = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        model = torchvision.models.resnet18(num_classes=len(classes))
        model.load_state_dict(ckpt["model"])  # strict: every key and shape must match
        assert ckpt["classes"] == classes
        assert ckpt["epoch"] == 2 or name == "best.pth"
        assert set(ckpt) >= {"optimizer", "lr_scheduler", "epoch", "classes"}
    with open(run_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    val_images = sorted(str(p.relative_to(dataset)) for p in (dataset / "val").rglob("*.jpg"))
    assert sorted(r["path"] for r in rows) == val_images
    assert {r["true"] for r in rows} == set(classes)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def ledger_row(home: Path, run_id: str) -> dict:
    db = sqlite3.connect(home / "runs.db")
    db.row_factory = sqlite3.Row
    return dict(db.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]).fetchone())


@pytest.mark.integration
def test_train_on_local_docker_end_to_end(cli, dataset, docker_client, gpu_run_home):
    tag = image_tag(context_files(), CPU_BASE_IMAGE)
    try:
        docker_client.images.remove(tag, force=True)  # so this run must build it
    except docker.errors.ImageNotFound:
        pass

    first = cli(*TRAIN, "--data", str(dataset), check=True)
    assert "built image " + tag in first.stdout
    assert "running on the CPU" in first.stdout
    assert "cost: 0.00 USD" in first.stdout
    summary_path = next((cli.cwd / "runs").glob("*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "succeeded" and summary["exit_code"] == 0
    assert summary["backend"] == "docker" and summary["image_tag"] == tag and summary["image_built"] is True
    assert summary["classes"] == sorted(p.name for p in (dataset / "train").iterdir())  # ImageFolder's order
    assert summary["epochs_completed"] == 2
    assert summary["cost"] == {"amount": 0.0, "currency": "USD", "billed_s": 0}
    run_dir = Path(summary["run_dir"])
    assert_run_outputs(run_dir, dataset, summary["classes"])
    assert '"event": "done"' in (run_dir / "train.log").read_text()

    row = ledger_row(gpu_run_home, summary["run_id"])
    assert row["status"] == "succeeded" and row["exit_code"] == 0 and row["image_tag"] == tag
    image_id = docker_client.images.get(tag).id
    # The finished container is removed: nothing left running or lying around.
    assert not docker_client.containers.list(all=True, filters={"label": f"gpu-run.run-id={summary['run_id']}"})

    second = cli.json(*TRAIN, "--data", str(dataset))
    assert second["status"] == "succeeded"
    assert second["image_built"] is False
    assert docker_client.images.get(tag).id == image_id


@pytest.mark.slow
def test_process_fallback_when_no_engine(cli, dataset, gpu_run_home):
    proc = cli(*TRAIN, "--data", str(dataset), env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, check=True)
    assert "No Docker engine reachable" in proc.stdout
    summary = json.loads(next((cli.cwd / "runs").glob("*/summary.json")).read_text())
    assert summary["backend"] == "process" and summary["status"] == "succeeded"
    assert summary["image_tag"] is None
    assert_run_outputs(Path(summary["run_dir"]), dataset, summary["classes"])
    assert ledger_row(gpu_run_home, summary["run_id"])["status"] == "succeeded"


@pytest.mark.slow
def test_runs_status_logs_commands(cli, dataset):
    env = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    summary = cli.json(*TRAIN, "--epochs", "1", "--data", str(dataset), env=env)
    run_id = summary["run_id"]
    listed = cli.json("runs")
    assert [r["run_id"] for r in listed] == [run_id]
    assert listed[0]["status"] == "succeeded"
    state = cli.json("status", run_id[:15])  # a unique prefix is enough
    assert state["run_id"] == run_id
    assert [p["phase"] for p in state["phases"]] == ["connect", "build", "sync", "train", "pull", "stop"]
    assert all(p["status"] == "ok" and p["ended_at"] >= p["started_at"] for p in state["phases"])
    logs = cli("logs", run_id, check=True)
    assert '"event": "done"' in logs.stdout
    missing = cli("status", "no-such-run")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == ["error: run 'no-such-run': no such run; `gpu-run runs` lists the run ids"]
    hosts = cli.json("hosts")
    assert [h["name"] for h in hosts] == ["local"]

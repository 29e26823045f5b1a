"""What the student hands in: report figures, comparisons, predictions and exported models; plus
the launcher's stop/resume, cache and multi-process paths. Runs on the process backend (no engine
needed) so the figures are tested on every machine."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import CLI, wait_for

pytestmark = pytest.mark.slow  # trains models: `make test`, not `make test-unit`

NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
FAST = ["--host", "local", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, dataset):
    """A working folder with two finished runs of different models."""
    tmp = tmp_path_factory.mktemp("deliverables")
    (tmp / "work").mkdir()
    cli = CLI(tmp / "work", {**os.environ, "GPU_RUN_HOME": str(tmp / "home"), "COLUMNS": "200", **NO_ENGINE})
    first = cli.json("train", *FAST, "--epochs", "4", "--data", str(dataset))
    second = cli.json("train", *FAST, "--epochs", "2", "--model", "mobilenet_v3_small", "--data", str(dataset))
    return cli, first, second


def pixels(path: Path) -> Image.Image:
    im = Image.open(path)
    im.verify()
    return Image.open(path).convert("RGB")


def rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im).reshape(-1, 3)


def distinct_colours(im: Image.Image) -> int:
    return len(np.unique(rgb(im.resize((200, 200))), axis=0))


def test_report_draws_every_figure(bench):
    cli, run, _ = bench
    out = cli.json("report", run["run_id"])
    report_dir = Path(out["report_dir"])
    sizes = {"curves.png": (2400, 960), "per_class.png": (1800, None), "confusion_matrix.png": (None, 960)}
    for name, (w, h) in sizes.items():
        im = pixels(report_dir / name)
        assert (w is None or im.width == w) and (h is None or im.height == h), (name, im.size)
        assert distinct_colours(im) > 20, f"{name} looks blank"
    # The confusion matrix has dark cells (a model that learned has a heavy diagonal).
    cm = pixels(report_dir / "confusion_matrix.png")
    px = rgb(cm).astype(int)
    assert ((px[:, 0] < 40) & (px[:, 1] < 80) & (px[:, 2] > 90)).any()
    mistakes = report_dir / "misclassified.png"
    preds = list(csv.DictReader(open(Path(run["run_dir"]) / "predictions.csv")))
    assert mistakes.exists() == any(p["true"] != p["predicted"] for p in preds)

    # per_class.csv agrees with predictions.csv.
    scores = {r["class"]: r for r in csv.DictReader(open(report_dir / "per_class.csv"))}
    for cls in run["classes"]:
        tp = sum(1 for p in preds if p["true"] == cls and p["predicted"] == cls)
        support = sum(1 for p in preds if p["true"] == cls)
        assert int(scores[cls]["support"]) == support
        assert abs(float(scores[cls]["recall"]) - tp / support) < 1e-9

    md = (report_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"curves.png", "confusion_matrix.png", "per_class.png"} <= set(links)
    assert all((report_dir / link).is_file() for link in links)
    assert run["model"] in md and "0.00 USD" in md


def test_compare_tabulates_runs_and_draws_accuracy_vs_speed(bench, tmp_path):
    cli, a, b = bench
    out = cli.json("compare", a["run_id"], b["run_id"], "--out", str(tmp_path / "cmp"))
    rows = {r["run"]: r for r in out["rows"]}
    assert rows[a["run_id"]]["model"] == "resnet18" and rows[b["run_id"]]["model"] == "mobilenet_v3_small"
    assert rows[a["run_id"]]["parameters"] == 11_177_538  # resnet18 with a 2-class head
    assert rows[b["run_id"]]["parameters"] < rows[a["run_id"]]["parameters"] / 5
    assert rows[a["run_id"]]["best_val_acc"] == pytest.approx(a["best_val_acc"])
    with open(out["files"]["csv"]) as f:
        assert [r["run"] for r in csv.DictReader(f)] == [a["run_id"], b["run_id"]]
    im = pixels(Path(out["files"]["figure"]))
    assert im.size == (1500, 1080) and distinct_colours(im) > 20


def test_predict_matches_the_trainer_and_exports(bench, dataset):
    cli, run, _ = bench
    run_dir = Path(run["run_dir"])
    preds = {p["path"]: p for p in csv.DictReader(open(run_dir / "predictions.csv"))}
    sample = sorted(preds)[::4]
    out = cli.json("predict", run["run_id"], *[str(dataset / p) for p in sample])
    right = 0
    for path, result in zip(sample, out["predictions"]):
        top = result["top"][0]
        assert top["class"] == preds[path]["predicted"]
        assert top["probability"] == pytest.approx(float(preds[path]["confidence"]), abs=1e-4)
        right += top["class"] == preds[path]["true"]
    assert right / len(sample) >= 0.75  # the model learned the dataset

    script = cli.json("predict", run["run_id"], "--export", "torchscript")["exported"]
    model = torch.jit.load(script)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    onnx_path = cli.json("predict", run["run_id"], "--export", "onnx")["exported"]
    import onnx

    onnx.checker.check_model(onnx.load(onnx_path))
    assert (Path(onnx_path).parent / "classes.txt").read_text().split() == run["classes"]


def test_stop_then_resume_on_the_launcher(cli, dataset):
    env = NO_ENGINE
    started = cli.json("train", *FAST, "--epochs", "30", "--detach", "--data", str(dataset), env=env)
    run_id = started["run_id"]
    run_dir = Path(started["run_dir"])
    wait_for((run_dir / "metrics.jsonl").exists, 120, "the first epoch")
    stopped = cli.json("stop", run_id, env=env)
    assert stopped["status"] == "stopped" and stopped["exit_code"] == 75
    last = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)
    assert 1 <= last["epoch"] < 30
    assert '"event": "stopped"' in (run_dir / "train.log").read_text()

    resumed = cli.json("train", "--resume", run_id, *FAST, "--epochs", str(last["epoch"] + 1), env=env)
    assert resumed["status"] == "succeeded" and resumed["resumed_from"] == run_id
    metrics = [json.loads(x)["epoch"] for x in (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1] == last["epoch"] + 1 and sorted(set(metrics)) == list(range(1, last["epoch"] + 2))
    log = (Path(resumed["run_dir"]) / "train.log").read_text()
    assert '"event": "resumed", ' in log


def test_cache_size_resizes_once(cli, dataset, gpu_run_home):
    first = cli.json("train", *FAST, "--epochs", "1", "--cache-size", "36", "--data", str(dataset), env=NO_ENGINE)
    assert first["status"] == "succeeded"
    [cache] = list((gpu_run_home / "cache").iterdir())
    images = sorted(cache.rglob("*.jpg"))
    assert len(images) == len(list(dataset.rglob("*.jpg")))
    assert all(min(Image.open(p).size) == 36 for p in images[:10])
    mtimes = {p: p.stat().st_mtime_ns for p in images}
    os.utime(next(dataset.rglob("*.jpg")))  # touched, same content
    second = cli.json("train", *FAST, "--epochs", "1", "--cache-size", "36", "--data", str(dataset), env=NO_ENGINE)
    assert second["status"] == "succeeded"
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes  # nothing was resized again


def test_two_processes_through_the_launcher(cli, dataset):
    summary = cli.json("train", *FAST, "--epochs", "1", "--gpus", "2", "--data", str(dataset),
                       env={**NO_ENGINE, "OMP_NUM_THREADS": "1"})
    assert summary["status"] == "succeeded"
    log = (Path(summary["run_dir"]) / "train.log").read_text()
    start = next(json.loads(x) for x in log.splitlines() if x.startswith('{"event": "start"'))
    assert start["world_size"] == 2


@pytest.mark.integration
def test_report_renders_cjk_class_names(tmp_path):
    """Class names in Chinese must not come out as empty boxes (needs a CJK font: the test bed installs one)."""
    import warnings

    from gpu_run.deliverables.report import write_report

    if not Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc").exists():
        from tests.conftest import missing_test_bed

        missing_test_bed("no CJK font (fonts-wqy-zenhei)")
    run = tmp_path / "run"
    run.mkdir()
    classes = ["男性", "女性"]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.1 / e,
                    "val_acc": 0.5 + e / 12, "train_images_per_s": 100.0, "epoch_time_s": 2.0}) + "\n"
        for e in (1, 2, 3)))
    with open(run / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", "epoch"])
        for i in range(10):
            w.writerow([f"val/{classes[i % 2]}/{i}.jpg", classes[i % 2], classes[(i // 3) % 2], 0.9, 3])
    (run / "summary.json").write_text(json.dumps({"run_id": "r1", "classes": classes, "model": "resnet18"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = write_report(run)
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not missing, missing[:2]
    assert "| 男性 |" in (out / "report.md").read_text()
    assert pixels(out / "confusion_matrix.png").size[1] == 960

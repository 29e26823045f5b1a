"""What a rented host sends back is data written by a possible attacker: metrics.jsonl,
predictions.csv, the watchdog's files and its answers to commands. Each test here plays one
hostile answer and checks that the laptop neither opens what the host names, nor renders its
markup, nor dies with a traceback. Unit tests: no Docker engine, no sshd."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from gpu_run.backends.base import RunHandle
from gpu_run.backends.ssh_host import SshHostBackend
from gpu_run.deliverables.compare import comparison_table
from gpu_run.deliverables.host_files import dataset_file
from gpu_run.doctor import clock_row
from gpu_run.events import read_metrics_lenient
from gpu_run.ledger import Ledger
from gpu_run.remote import Result
from gpu_run.runtimes.docker import DockerRuntime
from gpu_run.watchdog.host import HostWatchdog, parse_stop_state

RUN_ID = "20260101-000000-host"
CLASSES = ["cat", "dog"]
MAGENTA, GREEN = (255, 0, 255), (0, 255, 0)  # colours no figure draws by itself
GOOD_EPOCHS = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.1 / e,
                "val_acc": 0.5 + e / 12, "train_images_per_s": 100.0 + e, "epoch_time_s": 2.0} for e in (1, 2, 3)]


def epoch_line(epoch: str, val_acc: str) -> str:
    """A metrics.jsonl line written as the host chose, its other numbers ordinary."""
    return (f'{{"epoch": {epoch}, "train_loss": 1, "train_acc": 0.5, "val_loss": 1, "val_acc": {val_acc}, '
            f'"train_images_per_s": 1, "epoch_time_s": 1}}')


# metrics.jsonl lines that are not an epoch anyone can plot.
BAD_METRIC_LINES = [
    epoch_line("4", "NaN"), epoch_line("5", "Infinity"), epoch_line("6", "-Infinity"), epoch_line("7", "1e400"),
    epoch_line("8", "9" * 400),  # an int no float holds
    epoch_line("9", '"0.99"'), epoch_line("10", "null"), epoch_line("11", "true"), epoch_line("12", "[0.99]"),
    '{"epoch": 13, "val_acc": 0.99}',  # keys missing
    epoch_line('"14"', "0.99"), epoch_line("true", "0.99"), epoch_line("1.5", "0.99"), epoch_line("-1", "0.99"),
    epoch_line("9" * 400, "0.99"),
    '{"epoch": ' + "9" * 5000 + "}",  # past Python's digits limit for int()
    "[" * 100000,
    '{"epoch": 1, "val_acc": ' + "[" * 100000,
    "[1, 2, 3]",
    '{"epoch": 15, "train_loss": 1',  # cut off
    "not json at all",
]


def png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def has_colour(path: Path, colour: tuple[int, int, int]) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return bool((pixels == colour).all(axis=1).any())


def write_predictions(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", "epoch"])
        w.writerows(rows)


def hostile_run(tmp_path: Path, gpu_run_home: Path, metrics: list[str], predictions: list[list[str]],
                classes: list[str] | None = CLASSES, train_log: str = "") -> tuple[Path, Path]:
    """A finished run in the ledger whose outputs the host wrote: (run folder, dataset folder)."""
    data = tmp_path / "data"
    png(data / "val" / "cat" / "0.png", MAGENTA)
    png(data / "val" / "dog" / "0.png", MAGENTA)
    run_dir = tmp_path / "runs" / RUN_ID
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    write_predictions(run_dir / "predictions.csv", predictions)
    summary = {"run_id": RUN_ID, "model": "resnet18", "dataset": {"path": str(data)}}
    if classes is not None:
        summary["classes"] = classes
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if train_log:
        (run_dir / "train.log").write_text(train_log)
    ledger = Ledger(gpu_run_home / "runs.db")
    ledger.create_run(RUN_ID, "box", status="succeeded", model="resnet18", run_dir=str(run_dir), data_path=str(data))
    ledger.close()
    return run_dir, data


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def good_metrics() -> list[str]:
    return [json.dumps(m) for m in GOOD_EPOCHS]


GOOD_PREDICTIONS = [["val/cat/0.png", "cat", "cat", "0.9", "3"], ["val/dog/0.png", "dog", "cat", "0.8", "3"]]


# 1. report opens only files of the dataset -------------------------------------------------------


def test_report_opens_no_file_the_host_names_outside_the_dataset(cli, tmp_path, gpu_run_home):
    # Outside the dataset: a FIFO (opening it for reading blocks until a writer comes, so a report
    # that opened it would hang past the timeout) and a laptop image that must not be drawn.
    fifo = tmp_path / "secret.fifo"
    os.mkfifo(fifo)
    laptop_photo = png(tmp_path / "laptop-photo.png", GREEN)
    hostile = ["/etc/passwd", "~/.ssh/id_ed25519", "/dev/zero", "/dev/tty", "../../x.jpg", str(fifo), "../secret.fifo",
               str(laptop_photo), "../laptop-photo.png", "val/../../laptop-photo.png", "val/cat/link.png", "val",
               "val/cat/missing.png"]
    rows = [[path, "cat", "dog", "0.99", "3"] for path in hostile]
    rows.append(["val/dog/0.png", "dog", "cat", "0.5", "3"])  # a real mistake: its image is drawn
    _, data = hostile_run(tmp_path, gpu_run_home, good_metrics(), rows)
    os.symlink(fifo, data / "val" / "cat" / "link.png")  # inside the dataset, leading out of it

    proc = cli("report", RUN_ID, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    figure = Path(tmp_path / "runs" / RUN_ID / "report" / "misclassified.png")
    assert figure.is_file()
    assert has_colour(figure, MAGENTA), "the dataset's own image is drawn"
    assert not has_colour(figure, GREEN), "an image from outside the dataset was embedded"
    warned = warnings_in(proc.stderr)
    assert len(warned) == 1, proc.stderr
    assert f"{len(hostile)} of the {len(rows)}" in warned[0], warned


def test_dataset_file_accepts_only_regular_files_inside(tmp_path):
    data = tmp_path / "data"
    inside = png(data / "val" / "cat" / "0.png", MAGENTA)
    outside = png(tmp_path / "x.png", GREEN)
    os.symlink(outside, data / "val" / "cat" / "out.png")
    os.symlink(inside, data / "val" / "cat" / "in.png")
    os.mkfifo(data / "val" / "cat" / "pipe.png")
    assert dataset_file(data, "val/cat/0.png") == inside.resolve()
    assert dataset_file(data, "val/cat/in.png") == inside.resolve()  # a link that stays inside is fine
    for path in ["/etc/passwd", "/dev/zero", "/dev/tty", "../x.png", str(outside), "val/cat/out.png",
                 "val/cat/pipe.png", "val", "", "~/.ssh/id_ed25519", "val/cat/\0.png", "a" * 5000]:
        assert dataset_file(data, path) is None, path


# 2. broken host data: bad lines skipped with one warning, a file with none good is one error ---


def test_report_skips_broken_lines_with_one_warning_per_file(cli, tmp_path, gpu_run_home):
    bad_rows = [["val/cat/0.png", "cat", "dog", "abc", "3"], ["val/cat/0.png", "cat", "dog", "nan", "3"],
                ["val/cat/0.png", "cat", "dog", "inf", "3"], ["val/cat/0.png", "cat", "dog", "1e400", "3"],
                ["val/cat/0.png", "cat", "dog", "-0.5", "3"], ["val/cat/0.png", "cat"],  # short row
                ["val/cat/0.png", "zebra", "dog", "0.7", "3"],  # a class the run never had
                ["val/cat/0.png", "cat", "x" * 200_000, "0.7", "3"]]  # past csv's field limit
    metrics = [*good_metrics()[:2], *BAD_METRIC_LINES, good_metrics()[2]]
    run_dir, _ = hostile_run(tmp_path, gpu_run_home, metrics, [*GOOD_PREDICTIONS, *bad_rows])

    proc = cli("report", RUN_ID, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warned = warnings_in(proc.stderr)
    assert len(warned) == 2, proc.stderr
    assert f"skipped {len(BAD_METRIC_LINES)} unreadable line(s)" in warned[0] and "metrics.jsonl" in warned[0]
    assert f"skipped {len(bad_rows)} unreadable row(s)" in warned[1] and "predictions.csv" in warned[1]
    for name in ("curves.png", "confusion_matrix.png", "per_class.png", "misclassified.png"):
        assert (run_dir / "report" / name).is_file(), name
    md = (run_dir / "report" / "report.md").read_text()
    assert "75.00% (epoch 3)" in md  # the best of the good epochs, none of the hostile ones
    assert " / 2 validation images |" in md


def test_compare_skips_broken_lines_and_host_numbers(cli, tmp_path, gpu_run_home):
    log = "\n".join(['{"event": "start", "parameters": ' + "[" * 100000,
                     '{"event": "start", "parameters": "abc"}', "plain log line"]) + "\n"
    hostile_run(tmp_path, gpu_run_home, [*BAD_METRIC_LINES, *good_metrics()], GOOD_PREDICTIONS, train_log=log)

    proc = cli("compare", RUN_ID, "--out", str(tmp_path / "cmp"), timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warned = warnings_in(proc.stderr)
    assert len(warned) == 1 and f"skipped {len(BAD_METRIC_LINES)} unreadable line(s)" in warned[0], proc.stderr
    row = next(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert float(row["best_val_acc"]) == pytest.approx(0.75)
    assert float(row["train_images_per_s"]) == pytest.approx(102.0)
    assert row["parameters"] == ""  # "abc" is no parameter count
    assert (tmp_path / "cmp" / "accuracy_vs_speed.png").is_file()


@pytest.mark.parametrize("command", ["report", "compare"])
def test_metrics_with_no_good_line_is_one_error_line(cli, tmp_path, gpu_run_home, command):
    hostile_run(tmp_path, gpu_run_home, BAD_METRIC_LINES, GOOD_PREDICTIONS)
    args = ["--out", str(tmp_path / "cmp")] if command == "compare" else []

    proc = cli(command, RUN_ID, *args, timeout=60)

    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no readable epoch line" in lines[0], proc.stderr


def test_predictions_with_no_good_row_is_one_error_line(cli, tmp_path, gpu_run_home):
    hostile_run(tmp_path, gpu_run_home, good_metrics(), [["val/cat/0.png", "cat", "dog", "NaN", "3"], ["x"]])

    proc = cli("report", RUN_ID, timeout=60)

    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no readable prediction row" in lines[0], proc.stderr


def test_report_draws_class_names_with_dollars_and_brackets(cli, tmp_path, gpu_run_home):
    # No classes in summary.json: the names come from predictions.csv, as the host wrote them.
    names = ["$\\frac{$", "[bold red]x"]
    rows = [["val/cat/0.png", names[0], names[1], "0.9", "3"], ["val/dog/0.png", names[1], names[1], "0.9", "3"]]
    run_dir, _ = hostile_run(tmp_path, gpu_run_home, good_metrics(), rows, classes=None)

    proc = cli("report", RUN_ID, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "report" / "confusion_matrix.png").is_file()


def test_read_metrics_lenient_counts_what_it_skips():
    text = "\n".join([*good_metrics(), *BAD_METRIC_LINES, "", json.dumps({**GOOD_EPOCHS[0], "val_acc": 0.9})])
    records, skipped = read_metrics_lenient(text, ("val_acc", "train_loss", "train_acc"))
    assert skipped == len(BAD_METRIC_LINES)
    assert [m["epoch"] for m in records] == [1, 2, 3]
    assert records[0]["val_acc"] == 0.9  # a repeated epoch (after a resume) keeps its last line


# 3. compare shows host text literally --------------------------------------------------------------


def test_compare_table_shows_markup_literally():
    row = {"run": "r1 [blink]", "model": "[bold red]evil[/bold red]", "parameters": None, "best_val_acc": 0.5,
           "train_images_per_s": 1.0, "epoch_time_s": 2.0, "cost": 0.1, "currency": "[/]\x1b]52;c;AAAA\x07"}
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(comparison_table([row]))
    shown = console.export_text()
    assert "[bold red]evil[/bold red]" in shown
    assert "r1 [blink]" in shown
    assert "[/]" in shown and "\x1b" not in shown


# 4. host answers that used to end in a traceback ---------------------------------------------------


class CannedRemote:
    """Remote.run's contract, answered from `answer(command)`: the host's side of one exchange."""

    class target:
        alias = user = "box"

    def __init__(self, answer):
        self.answer = answer
        self.commands: list = []

    def run(self, command, input=None, check=True, timeout_s=None) -> Result:
        self.commands.append(command)
        return self.answer(command)


@pytest.mark.parametrize("answer, expected", [
    ("running", None), ("exited abc", None), ("", None), ("exited", None), ("exited 1 2", None),
    ("exited " + "9" * 30, None), ("exited ²", None), ("running 0", None), ("exited 3", 3), ("dead 137", 137),
])
def test_docker_exit_code_reads_an_unreadable_answer_as_unknown(answer, expected):
    def docker(command) -> Result:
        return Result(0, answer + "\n", "") if "inspect" in command else Result(0, "{}", "")

    runtime = DockerRuntime(SimpleNamespace(name="box"), CannedRemote(docker), "/w", "27.0")
    assert runtime.exit_code(RunHandle(container="gpu-run-x")) == expected


@pytest.mark.parametrize("status, expected", [
    ("outcome=done exit_code=abc ended_at=1", None), ("outcome=done ended_at=1", None),
    ("outcome=done exit_code= ended_at=1", None), ("outcome=done exit_code=" + "9" * 5000, None),
    ("outcome=done exit_code=1.5", None), ("outcome=done exit_code=75 ended_at=1", 75),
])
def test_watchdog_exit_code_reads_a_non_number_as_unknown(status, expected):
    def host(command) -> Result:
        return Result(0, status, "") if command[0] == "cat" else Result(1, "", "")

    backend = SshHostBackend.__new__(SshHostBackend)  # no connection: only the parsing is under test
    backend.runtime = SimpleNamespace(exit_code=lambda handle: -1)  # the container is gone
    backend.watchdog = HostWatchdog(CannedRemote(host), "/w", "box")
    assert backend.exit_code(RunHandle(run_dir="/w/runs/r1")) == expected


@pytest.mark.parametrize("text, attempt, at", [
    ("stop_failed 1700000000 attempt=x", 0, 1700000000.0), ("stop_failed 1700000000 attempt=", 0, 1700000000.0),
    ("stop_failed nan attempt=3 rc=1", 3, None), ("stop_failed inf attempt=" + "9" * 5000, 0, None),
    ("stop_failed 1e400 attempt=²", 0, None),
])
def test_stop_state_reads_a_non_number_as_unknown(text, attempt, at):
    state = parse_stop_state(text)
    assert (state.attempt, state.at) == (attempt, at)


@pytest.mark.parametrize("answer, code", [("abc", 0), ("nan", 0), ("inf", 0), ("1e400", 0), ("", 0),
                                          ("1700000000.5", 1)])
def test_doctor_says_the_host_clock_could_not_be_read(answer, code):
    row = clock_row(CannedRemote(lambda command: Result(code, answer + "\n", "")))
    assert row["check"] == "clock offset" and row["ok"] is False and row["required"] is False
    assert row["result"] == "the host's clock could not be read (`date +%s.%N` gave no number of seconds)"
    assert "\n" not in row["result"]


def test_doctor_clock_offset_of_a_readable_answer():
    row = clock_row(CannedRemote(lambda command: Result(0, f"{time.time() + 100:.3f}\n", "")))
    assert row["ok"] is False and abs(float(row["result"].split()[0]) - 100) < 5
    row = clock_row(CannedRemote(lambda command: Result(0, f"{int(time.time())}.N\n", "")))  # BusyBox date
    assert row["ok"] is True


# The host's checkpoint: its fields size a model and name its classes -------------------------------


def checkpoint(tmp_path: Path, contents) -> Path:
    import torch

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(contents, run_dir / "checkpoints" / "best.pth")
    return run_dir


FIELDS = {"model_name": "resnet18", "classes": ["cat", "dog"], "image_size": 32, "versions": {}, "model": {}}


@pytest.mark.parametrize("contents, said", [
    ([1, 2, 3], "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "model_name": None}, "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "classes": "cat,dog"}, "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "classes": []}, "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "classes": [1, 2]}, "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "image_size": 10**6}, "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "image_size": True}, "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "image_size": "32"}, "is not a checkpoint the trainer wrote"),
    ({**FIELDS, "model_name": "evil\x1b[31m", "versions": {"torch": "\x1b]52;c;AAAA\x07"}}, "has no model 'evil\\x1b[31m'"),
    (FIELDS, "holds weights that do not fit resnet18 with 2 classes"),  # no weights at all
    ({k: v for k, v in FIELDS.items() if k != "model"}, "holds weights that do not fit"),
    ({**FIELDS, "model": [1, 2]}, "holds weights that do not fit"),
])
def test_predict_refuses_a_hostile_checkpoint_in_one_line(tmp_path, contents, said):
    from gpu_run.deliverables.predict import load_model
    from gpu_run.errors import GpuRunError

    with pytest.raises(GpuRunError) as e:
        load_model(checkpoint(tmp_path, contents))
    assert said in str(e.value) and "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_predict_shows_no_escape_sequence_from_class_names(tmp_path):
    import torchvision

    from gpu_run.deliverables.predict import predict
    from gpu_run.trainer.train import replace_head

    model = replace_head(torchvision.models.get_model("resnet18", weights=None), 2)
    run_dir = checkpoint(tmp_path, {**FIELDS, "classes": ["\x1b]52;c;AAAA\x07cat", "\x1b[2Jdog"],
                                    "model": model.state_dict()})
    results = predict(run_dir, [png(tmp_path / "x.png", MAGENTA)], top=2)
    assert sorted(t["class"] for t in results[0]["top"]) == ["cat", "dog"]

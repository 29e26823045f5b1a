"""Sweeps without a machine: the grid, the cost split, the budget's fit, and the host's queue script
run for real on points whose "trainer" is a shell sleep (no torch, no SSH)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from decimal import Decimal
from importlib import resources
from pathlib import Path

import pytest

from gpu_run.errors import ConfigError
from gpu_run.money.cost import cost_of
from gpu_run.money.split import split_amount, split_seconds
from gpu_run.sweep.grid import build_points, expand, label, load_grid_file, parse_list
from gpu_run.sweep.run import devices_for, fitting
from tests.conftest import wait_for

# The grid ------------------------------------------------------------------------------------------


def test_comma_lists_make_every_combination_in_a_stable_order():
    shared, points = build_points({"model": "resnet18,resnet50", "lr": "1e-3,1e-2", "epochs": "20", "seed": None})
    assert shared == {"epochs": 20}
    assert points == [{"model": "resnet18", "lr": 0.001}, {"model": "resnet18", "lr": 0.01},
                      {"model": "resnet50", "lr": 0.001}, {"model": "resnet50", "lr": 0.01}]
    assert label(points[1]) == "model=resnet18 lr=0.01"
    assert expand({"lr": [1.0], "model": ["a", "b"]}) == [{"model": "a", "lr": 1.0}, {"model": "b", "lr": 1.0}]


@pytest.mark.parametrize("given, message", [
    ({"lr": "1e-3,,1e-2"}, "empty item"),
    ({"lr": "1e-3,fast"}, "not a valid number"),
    ({"epochs": "2,2.5"}, "not a valid number"),
    ({"lr": "0.1,0.10"}, "twice"),
    ({"augment": "light,heavy"}, "not one of"),
    ({"lr": "0.1"}, "at least two points"),
])
def test_bad_lists_are_refused_with_one_line(given, message):
    with pytest.raises(ConfigError, match=message):
        build_points(given)


def test_grid_file_lists_points_and_grids(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[grid]\nmodel = ["resnet18", "mobilenet_v3_small"]\n\n'
                    '[[points]]\nmodel = "resnet50"\nlr = 0.01\nbatch_size = 16\n')
    assert load_grid_file(path) == [{"model": "resnet18"}, {"model": "mobilenet_v3_small"},
                                    {"model": "resnet50", "lr": 0.01, "batch_size": 16}]
    # A comma list on the command line crosses the file's points; one option in both places is refused.
    _, points = build_points({"seed": "1,2"}, path)
    assert len(points) == 6 and points[0] == {"model": "resnet18", "seed": 1}
    with pytest.raises(ConfigError, match="--model given on the command line and in --grid"):
        build_points({"model": "resnet18"}, path)
    path.write_text('[[points]]\nmodel = "resnet18"\nmomentum = 0.8\n')
    with pytest.raises(ConfigError, match="'momentum' is not an option a sweep can vary"):
        load_grid_file(path)
    path.write_text("[grid\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_grid_file(path)


def test_parse_list_types():
    assert parse_list("batch_size", "16, 32") == [16, 32]
    assert parse_list("model", "resnet18") == ["resnet18"]


# The cost split -----------------------------------------------------------------------------------


def test_points_one_after_another_pay_their_time_plus_an_even_share_of_the_rest():
    # A 100 s span: setup 0-10, points 10-30, 30-60, 60-70, stop 70-100; the fourth never ran.
    seconds = split_seconds((0, 100), [(10, 30), (30, 60), (60, 70), None])
    assert seconds == pytest.approx([20 + 40 / 3, 30 + 40 / 3, 10 + 40 / 3, 0])
    assert sum(seconds) == pytest.approx(100)


def test_points_side_by_side_share_the_stretches_they_overlap():
    seconds = split_seconds((0, 100), [(10, 50), (10, 30), (30, 60)])
    # 10-30: two run (10 s each); 30-50: two run (10 s each); 50-60: one; the 50 s no point ran split by three.
    assert seconds == pytest.approx([20 + 50 / 3, 10 + 50 / 3, 20 + 50 / 3])


def test_amounts_add_up_to_the_machines_bill_to_the_cent():
    for span_s, price, n in ((3601, 0.8, 3), (97, 2.37, 7), (12345, 11.11, 4), (1, 0.01, 5)):
        total = cost_of(span_s, price, "per_second")
        weights = split_seconds((0, span_s), [(i * span_s / n, (i + 1) * span_s / n) for i in range(n)])
        parts = split_amount(total, weights)
        assert sum(parts) == total, (span_s, price, n)
        assert all(p >= 0 for p in parts)
        assert max(parts) - min(parts) <= Decimal("0.01")  # equal shares differ by a cent at most
    assert split_amount(Decimal("1.00"), [1, 1, 1]) == [Decimal("0.34"), Decimal("0.33"), Decimal("0.33")]
    assert split_amount(Decimal("0.10"), [0, 0]) == [Decimal("0.05"), Decimal("0.05")]


def test_budget_fit_and_gpu_slots():
    assert fitting([100, 100, 100, 0], 250, 1) == [True, True, False, True]
    assert fitting([100, 100, 100, 100], 250, 2) == [True, True, True, True]
    assert fitting([0, 0], -10, 1) == [True, True]  # no estimate: the machine's clock decides
    assert devices_for(1, 2, 2, "gpu") == "2,3"
    assert devices_for(0, 1, 1, "gpu") == "" and devices_for(1, 1, 2, "cpu") == ""


# The queue on the host, run for real --------------------------------------------------------------

QUEUE = resources.files("gpu_run.sweep").joinpath("queue.sh")


def fake_point(root: Path, name: str, seconds: float, code: int) -> Path:
    """A point whose trainer sleeps, then exits with `code`; SIGTERM makes it exit 75, as ours does."""
    d = root / "runs" / name
    d.mkdir(parents=True)
    trainer = f"trap 'exit 75' TERM; sleep {seconds} & wait $!; exit {code}"
    (d / "start.sh").write_text(
        f"rm -f {d}/exit_code; (sh -c \"{trainer}\"; echo $? > {d}/exit_code) >> {d}/train.log 2>&1 &\n"
        f"echo $! > {d}/pid\n")
    (d / "state.sh").write_text(f"if [ -f {d}/exit_code ]; then cat {d}/exit_code; else echo running; fi\n")
    (d / "stop.sh").write_text(f"pkill -TERM -f 'sleep {seconds}' ; true\n")
    return d


def start_queue(root: Path, points: list[tuple[Path, int, int]], parallel: int = 1, budget_s: int = 0) -> subprocess.Popen:
    q = root / "runs" / "sweep-q"
    q.mkdir(parents=True, exist_ok=True)
    (q / "queue.env").write_text(f"PARALLEL={parallel}\nBUDGET_S={budget_s}\nPOINT_MAX_S=0\nSILENCE_S=0\nPOLL_S=0.2\n")
    (q / "points").write_text("".join(f"{d} {slot} {est}\n" for d, slot, est in points))
    return subprocess.Popen(["sh", str(QUEUE), str(q), "run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def status(d: Path) -> dict:
    return dict(item.split("=", 1) for item in (d / "status").read_text().split())


def test_queue_runs_points_in_order_and_records_each_end(tmp_path):
    a, b, c = (fake_point(tmp_path, n, 0.3, code) for n, code in (("a", 0), ("b", 3), ("c", 0)))
    proc = start_queue(tmp_path, [(a, 0, 0), (b, 0, 0), (c, 0, 0)])
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert [status(d)["exit_code"] for d in (a, b, c)] == ["0", "3", "0"]
    assert all(status(d)["outcome"] == "finished" for d in (a, b, c))
    started = [int((d / "started_at").read_text()) for d in (a, b, c)]
    assert started == sorted(started)
    assert int(status(a)["ended_at"]) <= started[1]  # one after another


def test_queue_side_by_side_runs_both_slots_at_once(tmp_path):
    a, b = fake_point(tmp_path, "a", 1.5, 0), fake_point(tmp_path, "b", 1.5, 0)
    t0 = time.monotonic()
    proc = start_queue(tmp_path, [(a, 0, 0), (b, 1, 0)], parallel=2)
    proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 2.9  # together, not 3 s one after the other
    assert status(a)["exit_code"] == status(b)["exit_code"] == "0"


def test_queue_skips_what_the_budget_cannot_hold(tmp_path):
    a, b, c = fake_point(tmp_path, "a", 0.2, 0), fake_point(tmp_path, "b", 0.2, 0), fake_point(tmp_path, "c", 0.2, 0)
    (b / "trainer.env").write_text("HF_TOKEN=secret\n")
    proc = start_queue(tmp_path, [(a, 0, 5), (b, 0, 500), (c, 0, 0)], budget_s=100)
    proc.communicate(timeout=30)
    assert status(a)["outcome"] == "finished"
    assert status(b)["outcome"] == "over_budget" and not (b / "started_at").exists()
    assert not (b / "trainer.env").exists()
    assert status(c)["outcome"] == "finished"  # no estimate: the machine's clock decides


def test_sigterm_stops_the_running_point_and_starts_no_more(tmp_path):
    a, b, c = fake_point(tmp_path, "a", 0.2, 0), fake_point(tmp_path, "b", 60, 0), fake_point(tmp_path, "c", 0.2, 0)
    (c / "trainer.env").write_text("HF_TOKEN=secret\n")
    proc = start_queue(tmp_path, [(a, 0, 0), (b, 0, 0), (c, 0, 0)])
    try:
        wait_for(lambda: (b / "started_at").exists() and (b / "pid").exists(), 15, "the second point to start")
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out
    assert status(a)["outcome"] == "finished"
    assert status(b) == {**status(b), "outcome": "stopped", "exit_code": "75"}
    assert status(c)["outcome"] == "not_started" and not (c / "started_at").exists()
    assert not (c / "trainer.env").exists()  # its --env values did not stay on the host


def test_a_stopped_torchrun_job_counts_as_stopped_not_failed(tmp_path):
    from gpu_run.events import status_of_run

    log = tmp_path / "train.log"
    log.write_text('{"event": "start", "world_size": 2}\nsignal 15: stopping\n'
                   '{"event": "stopped", "epoch": 2, "step": 3, "resumable": true}\n'
                   'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ...\n')
    assert status_of_run(1, log) == "stopped"  # torchrun's own exit code after its processes exited 75
    assert status_of_run(75, log) == "stopped" and status_of_run(0, log) == "succeeded"
    log.write_text('{"event": "error", "message": "CUDA out of memory even at batch size 1"}\n')
    assert status_of_run(1, log) == "failed" and status_of_run(1, tmp_path / "missing.log") == "failed"

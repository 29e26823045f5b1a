"""The trainer on its own, on the CPU: resume, atomic checkpoints, SIGTERM, OOM, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import events, trainer, wait_for

pytestmark = pytest.mark.slow  # trains models: `make test`, not `make test-unit`

FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none", "--log-every", "1"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_continues_at_the_next_epoch(dataset, tmp_path):
    out = tmp_path / "out"
    first = trainer("--data", str(dataset), "--out", str(out), "--epochs", "1", *FAST)
    assert first.returncode == 0, first.stderr
    assert load(out / "checkpoints" / "last.pth")["epoch"] == 1

    second = trainer("--data", str(dataset), "--out", str(out), "--epochs", "2", "--resume", *FAST)
    assert second.returncode == 0, second.stderr
    evs = events(second.stdout)
    assert {"event": "resumed", "epoch": 2, "step": 0}.items() <= evs[0].items()
    assert [e["epoch"] for e in evs if e["event"] == "epoch"] == [2]  # epoch 1 was not trained again
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    ckpt = load(out / "checkpoints" / "last.pth")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0
    assert ckpt["versions"]["torch"] == str(torch.__version__) and ckpt["seed"] == 0


SAVER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from gpu_run.trainer.train import atomic_save
    path = Path(sys.argv[1])
    i = 0
    while True:
        i += 1
        atomic_save({"i": i, "w": torch.full((25_000_000,), float(i))}, path)  # 100 MB each
        print(i, flush=True)
""")


def kill_mid_write(path: Path) -> list[str]:
    """Start the saver, SIGKILL it while a temp file is part-written; the temp files left behind."""
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # one complete save exists

    def half_written() -> bool:  # the next save is half way through
        try:
            return any(0 < p.stat().st_size < 50_000_000 for p in path.parent.glob(".last.pth.tmp-*"))
        except FileNotFoundError:  # renamed into place between the glob and the stat
            return False

    wait_for(half_written, 30, "the saver half way through writing a checkpoint", poll_s=0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return [p.name for p in path.parent.iterdir() if p.name != "last.pth"]


def test_a_kill_during_a_checkpoint_write_never_replaces_the_good_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.pth"
    for _ in range(5):  # the kill can land just after a rename; then try again
        leftovers = kill_mid_write(path)
        if leftovers:
            break
    assert leftovers, "never managed to kill the saver in the middle of a write"
    ckpt = load(path)
    assert (ckpt["w"] == float(ckpt["i"])).all()  # a whole, consistent checkpoint
    # The trainer clears such leftovers when it starts again.
    from gpu_run.trainer.train import remove_stale_temp_files

    remove_stale_temp_files(path.parent)
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]


def test_sigterm_mid_epoch_resumes_to_the_same_weights(dataset, tmp_path):
    common = ["--data", str(dataset), "--epochs", "2", "--seed", "7", *FAST]
    straight = trainer("--out", str(tmp_path / "straight"), *common)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.trainer.train", "--out", str(out), *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        e = json.loads(line)
        if e["event"] == "step" and e["epoch"] == 2 and e["step"] == 3:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait() == 75, proc.stderr.read()
    stopped = [e for e in events(rest) if e["event"] == "stopped"]
    assert stopped and stopped[0]["resumable"] and stopped[0]["epoch"] == 2
    mid = load(out / "checkpoints" / "last.pth")
    assert mid["epoch"] == 1 and mid["step"] >= 3

    resumed = trainer("--out", str(out), "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr
    a = load(tmp_path / "straight" / "checkpoints" / "last.pth")
    b = load(out / "checkpoints" / "last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        assert torch.allclose(tensor.float(), b["model"][key].float(), atol=1e-5), key
    ma = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(m["val_acc"], 6) for m in ma] == [round(m["val_acc"], 6) for m in mb]
    assert abs(ma[-1]["train_loss"] - mb[-1]["train_loss"]) < 1e-5


def test_out_of_memory_halves_the_batch_and_carries_on(dataset, tmp_path):
    proc = trainer("--data", str(dataset), "--out", str(tmp_path / "out"), "--epochs", "1",
                   *FAST[:2], "--batch-size", "16", *FAST[4:], env={"GPU_RUN_FAULT_OOM_ABOVE": "4"})
    assert proc.returncode == 0, proc.stderr
    evs = events(proc.stdout)
    ooms = [e for e in evs if e["event"] == "oom"]
    assert [(e["micro_batch"], e["accumulation_steps"]) for e in ooms] == [(8, 2), (4, 4)]
    assert evs[-1]["event"] == "done"
    steps = [e for e in evs if e["event"] == "step"]
    assert steps[-1]["step"] == steps[-1]["steps"]  # every step of the epoch ran
    assert load(tmp_path / "out" / "checkpoints" / "last.pth")["micro_batch"] == 4


def test_out_of_memory_at_batch_size_one_fails_in_one_line(dataset, tmp_path):
    proc = trainer("--data", str(dataset), "--out", str(tmp_path / "out"), "--epochs", "1", *FAST,
                   env={"GPU_RUN_FAULT_OOM_ABOVE": "0"})
    assert proc.returncode == 1
    error = [e for e in events(proc.stdout) if e["event"] == "error"]
    assert error and "out of memory even at batch size 1" in error[0]["message"]


def test_ddp_with_two_cpu_processes_writes_one_checkpoint(dataset, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "gpu_run.trainer.train", "--data", str(dataset), "--out", str(out), "--epochs", "1", "--device", "cpu", *FAST],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evs = events(proc.stdout)
    assert [e["event"] for e in evs].count("done") == 1  # only rank 0 speaks
    start = next(e for e in evs if e["event"] == "start")
    assert start["world_size"] == 2
    assert start["steps_per_epoch"] == 5  # 80 images / 2 ranks / batch 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pth", "last.pth"]
    ckpt = load(out / "checkpoints" / "last.pth")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

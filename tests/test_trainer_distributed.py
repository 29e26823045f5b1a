"""The trainer on several processes (DDP over gloo, on the CPU): an out-of-memory that every rank
agrees on, and a run stopped on 2 processes and resumed on 1 (or 1 on 3)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from gpu_run.demo_data import make_dataset
from gpu_run.trainer.train import EpochSampler
from tests.conftest import events, trainer

# The smallest classifier torchvision has with a Linear head, on 32 px crops: the processes'
# start-up, not the training, is most of each run's time.
FAST = ["--model", "shufflenet_v2_x0_5", "--image-size", "32", "--workers", "0", "--weights", "none",
        "--log-every", "1", "--device", "cpu"]
# A collective that waits for a rank that fell out of step fails after this, and the test with it.
DIST_ENV = {"OMP_NUM_THREADS": "1", "GPU_RUN_DIST_TIMEOUT_S": "60"}
TIMEOUT_S = 240


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Torchrun:
    """`torchrun --standalone --nproc_per_node=N -m gpu_run.trainer.train ...` in a process group of
    its own, killed whole after timeout_s so that no hung rank outlives the test."""

    def __init__(self, nproc: int, *args: str, env: dict | None = None, timeout_s: float = TIMEOUT_S):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "-m", "gpu_run.trainer.train", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, **DIST_ENV, **(env or {})},
        )
        self.timed_out = False
        self._deadline = threading.Timer(timeout_s, self._expire)
        self._deadline.start()
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def _expire(self) -> None:
        self.timed_out = True
        self.signal(signal.SIGKILL)

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def lines(self):
        """stdout line by line, left open when the caller stops reading (a generator's `yield from`
        would close it)."""
        return self.proc.stdout

    def finish(self) -> tuple[int, str, str]:
        """(exit code, the rest of stdout, all of stderr)."""
        rest = self.proc.stdout.read()
        code = self.proc.wait()
        self._deadline.cancel()
        self._reader.join(10)
        assert not self.timed_out, f"torchrun still ran after {TIMEOUT_S}s (a hung rank?):\n{''.join(self._stderr)[-3000:]}"
        return code, rest, "".join(self._stderr)


# ----------------------------------------------------------------------------------------------
# Where a stopped epoch stands, whatever the number of processes


def shards(n: int, batch_size: int, world: int, start: int = 0, epoch: int = 1) -> list[list[int]]:
    """Each rank's sample indices for the epoch, from position `start` of its order."""
    out = []
    for rank in range(world):
        sampler = EpochSampler(n, batch_size, seed=7, rank=rank, world=world)
        sampler.set_epoch(epoch, start)
        out.append([index for index, _epoch in sampler])
        assert len(out[-1]) == len(sampler)
    return out


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3), (3, 2)])
def test_an_epoch_stopped_on_one_world_size_and_resumed_on_another_trains_each_sample_once(before, after):
    n, batch_size = 53, 4  # an odd count: the ranks need padding
    steps = math.ceil(math.ceil(n / before) / batch_size)
    for stopped_at in range(1, steps):
        # What the `before` ranks trained in their first stopped_at steps, and what the trainer
        # saves for it: the first stopped_at * batch_size * before positions of the order.
        trained = [i for rank in shards(n, batch_size, before) for i in rank[: stopped_at * batch_size]]
        rest = [i for rank in shards(n, batch_size, after, start=stopped_at * batch_size * before) for i in rank]
        seen = Counter(trained + rest)
        assert len(set(trained)) == len(trained), "a sample trained twice before the stop"
        assert sorted(seen) == list(range(n)), f"samples never trained: {sorted(set(range(n)) - set(seen))}"
        # Beyond the epoch's samples, only the padding that gives each of `after` ranks as many.
        assert sum(seen.values()) - n < after
        assert len({len(rank) for rank in shards(n, batch_size, after, start=stopped_at * batch_size * before)}) == 1


def test_resuming_on_the_same_world_size_continues_the_very_same_shards():
    n, batch_size, world = 53, 4, 2
    whole = shards(n, batch_size, world)
    for stopped_at in range(1, 7):
        rest = shards(n, batch_size, world, start=stopped_at * batch_size * world)
        assert rest == [rank[stopped_at * batch_size :] for rank in whole]


# ----------------------------------------------------------------------------------------------
# The runs


@pytest.mark.slow
def test_an_out_of_memory_on_one_rank_halves_the_micro_batch_on_every_rank(dataset, tmp_path):
    """Rank 1 alone runs out of memory above 4 images: both ranks go to 4 and the job finishes."""
    out = tmp_path / "out"
    run = Torchrun(2, "--data", str(dataset), "--out", str(out), "--epochs", "1", "--batch-size", "8", *FAST,
                   env={"GPU_RUN_FAULT_OOM_ABOVE": "4", "GPU_RUN_FAULT_OOM_RANK": "1"})
    code, stdout, stderr = run.finish()
    assert code == 0, stderr[-3000:]
    evs = events(stdout)
    # One agreed halving, reported by rank 0, which did not run out itself. Had rank 1 stayed at 8
    # it would run out again, and a second oom event would follow.
    assert [(e["micro_batch"], e["accumulation_steps"], e["ranks"]) for e in evs if e["event"] == "oom"] == [(4, 2, [1])]
    steps = [e for e in evs if e["event"] == "step"]
    assert steps[-1]["step"] == steps[-1]["steps"] == 5  # 80 images / 2 ranks / batch 8: every step ran
    assert evs[-1]["event"] == "done"
    ckpt = load(out / "checkpoints" / "last.pth")
    assert ckpt["micro_batch"] == 4 and ckpt["world_size"] == 2 and ckpt["epoch"] == 1


@pytest.mark.slow
def test_a_run_stopped_on_two_processes_resumes_on_one_and_trains_the_rest_of_the_epoch(tmp_path):
    # 120 images in batches of 3: 20 steps an epoch on 2 processes, so a stop lands mid-epoch,
    # and the rest divides into whole batches of 3 on one (no lone image is dropped).
    data = make_dataset(tmp_path / "data", classes=3, train_per_class=40, val_per_class=2, size=36, seed=5)
    out = tmp_path / "out"
    common = ["--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "3", *FAST]

    run = Torchrun(2, *common)
    for line in run.lines():
        if line.startswith("{") and json.loads(line)["event"] == "step":
            run.signal(signal.SIGTERM)  # to torchrun and both ranks, as a stopping container does
            break
    _code, stdout, stderr = run.finish()
    stopped = [e for e in events(stdout) if e["event"] == "stopped"]
    assert stopped and stopped[0]["resumable"], stderr[-3000:]
    mid = load(out / "checkpoints" / "last.pth")
    assert mid["epoch"] == 0 and 1 <= mid["step"] < 20, f"the stop did not land mid-epoch: step {mid['step']}"
    assert mid["world_size"] == 2 and mid["samples_done"] == mid["step"] * 3 * 2

    resumed = trainer(*common, "--resume", env={"OMP_NUM_THREADS": "1"}, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    evs = events(resumed.stdout)
    start = next(e for e in evs if e["event"] == "resumed")
    assert (start["samples_done"], start["world_size"], start["saved_world_size"]) == (mid["samples_done"], 1, 2)
    assert "world size 2 -> 1:" in resumed.stderr  # the global batch changed: said once
    # One process counts on from the step those samples are worth, to the end of the epoch.
    steps = [e for e in evs if e["event"] == "step"]
    assert steps[0]["step"] == mid["samples_done"] // 3 + 1 and steps[-1]["step"] == steps[-1]["steps"] == 40
    # The epoch trained its 120 images, each once: the ones before the stop and the rest after it.
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["train_images"]) for m in metrics] == [(1, 120)]
    end = load(out / "checkpoints" / "last.pth")
    assert (end["epoch"], end["step"], end["samples_done"], end["world_size"]) == (1, 0, 0, 1)

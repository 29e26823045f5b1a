"""The trainer on several processes (DDP over gloo, on the CPU): an out-of-memory that every rank
agrees on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import events

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
    assert ckpt["micro_batch"] == 4 and ckpt["epoch"] == 1

"""The launcher's own cost: `gpu-run train --host local` against a bare `docker run` of the same
trainer image on the same job (warm image, same dataset, same trainer arguments).

Prints the median wall time of each, the difference (what gpu-run adds: checks, ledger, image
check, the watchdog, following the log, the pull and the record), and the launcher process's
peak memory (the trainer runs in the container, so its memory is not in the CLI's).
Targets (issue: a lighter command line): <= 1 s and <= 200 MiB beyond the trainer's start.

    .venv/bin/python benchmarks/bench_overhead.py [--repeats 3]
Needs a Docker engine and the CPU base image (tests/bed/up.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_run.demo_data import make_dataset

TRAINER_ARGS = ["--model", "resnet18", "--epochs", "1", "--batch-size", "16", "--image-size", "32",
                "--workers", "0", "--seed", "0", "--amp", "auto"]
GPU_RUN_ARGS = ["--epochs", "1", "--batch-size", "16", "--image-size", "32", "--workers", "0", "--weights", "none"]


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and the peak RSS (MiB) of the command's own process tree as waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        make_dataset(data, classes=2, train_per_class=40, val_per_class=10, size=48, seed=0)
        env = {**os.environ, "GPU_RUN_HOME": str(tmp / "home")}
        gpu_run = [sys.executable, "-m", "gpu_run.cli", "train", "--host", "local", "--data", str(data),
                   "--runs-dir", str(tmp / "runs"), *GPU_RUN_ARGS]
        # Warms the image (built once) and the dataset check; the bare run uses the image it ran.
        warm = subprocess.run([*gpu_run, "--json"], env=env, capture_output=True, text=True)
        if warm.returncode != 0:
            sys.exit(f"gpu-run train failed:\n{warm.stderr[-2000:]}")
        tag = json.loads(warm.stdout)["image_tag"]
        launcher_s, launcher_mib, bare_s = [], 0.0, []
        for i in range(args.repeats):
            out = tmp / f"bare-{i}"
            out.mkdir()
            bare = ["docker", "run", "--rm", "-v", f"{data.resolve()}:/data:ro", "-v", f"{out}:/out",
                    "--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp", "--shm-size", "2g",
                    "--entrypoint", "python3", tag, "-m", "trainer.train", "--data", "/data", "--out", "/out",
                    "--weights", "none", *TRAINER_ARGS]
            bare_s.append(timed(bare, env)[0])
            wall, _ = timed(gpu_run, env)
            launcher_s.append(wall)
        # The CLI's own peak, measured alone (RUSAGE_CHILDREN keeps the largest child seen).
        probe = subprocess.run(["/usr/bin/time", "-f", "%M", *gpu_run], env=env, capture_output=True, text=True)
        launcher_mib = int(probe.stderr.strip().splitlines()[-1]) / 1024

    g, b = statistics.median(launcher_s), statistics.median(bare_s)
    print(f"{'':28}{'seconds':>10}")
    print(f"{'bare docker run':28}{b:10.2f}")
    print(f"{'gpu-run train --host local':28}{g:10.2f}")
    print(f"{'launcher overhead':28}{g - b:10.2f}   target <= 1.00 s   {'PASS' if g - b <= 1.0 else 'FAIL'}")
    print(f"{'launcher peak memory (MiB)':28}{launcher_mib:10.0f}   target <= 200 MiB  {'PASS' if launcher_mib <= 200 else 'FAIL'}")


if __name__ == "__main__":
    main()

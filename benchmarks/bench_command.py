"""Your own command through gpu-run against the same command over plain ssh, on the test bed's SSH
host (Docker on 127.0.0.1), warm: the image built, the project and dataset already there.

The figure is the time from typing the command to the script's first line of output: what gpu-run
adds to `ssh host 'cd DIR && python train.py'` (the checks, one connection, the sync that finds
nothing to send, the run's folder and copy, the watchdog, the container's start). Target: at most
2 s more. Median of N runs each, printed side by side.

    .venv/bin/python benchmarks/bench_command.py [--runs 5]
Needs the test bed (tests/bed/up.sh).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sweep import bed, laptop  # noqa: E402  (the test bed's laptop, shared with that benchmark)
from machine import machine_line  # noqa: E402

from gpu_run.demo_data import make_dataset  # noqa: E402

MARKER = "first line of the script"
SCRIPT = f"import sys\nprint({MARKER!r}, flush=True)\nprint(len(sys.argv))\n"


def time_to_marker(argv: list[str], env: dict, cwd: Path) -> float:
    """Seconds from the start of argv to the line holding MARKER on its output; the process is
    then left to finish (its end, the pull and the stop are not what this measures)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = None
    for line in proc.stdout:
        if seen is None and MARKER in line:
            seen = time.perf_counter() - start
    code = proc.wait()
    if seen is None or code != 0:
        sys.exit(f"{argv[:6]} ... exited {code} without the script's first line")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env, work = laptop(tmp)
        (work / "train.py").write_text(SCRIPT)
        make_dataset(work / "dataset", classes=2, train_per_class=20, val_per_class=5, size=32, seed=1)
        gpu_run = [sys.executable, "-m", "gpu_run.cli", "train", "--host", "box", "--data", "./dataset",
                   "--", "python", "train.py", "--data_dir", "./dataset"]
        # Warm: the image, the dataset and the project are on the host after this one.
        time_to_marker(gpu_run, env, work)
        remote_dir = tmp / "plain"
        subprocess.run(["cp", "-r", str(work), str(remote_dir)], check=True)
        port, user, key = bed()["GPU_RUN_TEST_SSH_PORT"], bed()["GPU_RUN_TEST_SSH_USER"], bed()["GPU_RUN_TEST_SSH_KEY"]
        ssh = ["ssh", "-F", str(Path(env["HOME"]) / ".ssh" / "config"), "-o", "BatchMode=yes",
               "-o", f"UserKnownHostsFile={Path(env['HOME']) / '.ssh' / 'known_hosts'}", "box",
               f"cd {remote_dir} && python3 train.py --data_dir ./dataset"]
        del port, user, key
        ours = [time_to_marker(gpu_run, env, work) for _ in range(args.runs)]
        plain = [time_to_marker(ssh, env, work) for _ in range(args.runs)]
    a, b = statistics.median(ours), statistics.median(plain)
    print(f"\ntime to the script's first line, warm host, median of {args.runs}")
    print(f"{'':32} {'seconds':>8}")
    print(f"{'gpu-run train -- python train.py':32} {a:8.2f}")
    print(f"{'ssh host cd DIR && python ...':32} {b:8.2f}")
    print(f"{'ratio':32} {a / b:8.2f}")
    print(f"{'difference':32} {a - b:8.2f}   target <= 2.00: {'PASS' if a - b <= 2.0 else 'FAIL'}")


if __name__ == "__main__":
    main()

"""A 4-point sweep against four separate `gpu-run train` runs of the same points, on the test bed's
SSH host (Docker on 127.0.0.1), side by side: the machine time each way pays for.

The sweep connects, checks the image and syncs once, and the machine is released once; four trains
do each of those four times. On a rented machine every separate train also pays a stop and a start
of the machine (boot, SSH back, often a minute or two each) that the test bed cannot show: its
"stop" costs nothing. So the ratio printed is the least a sweep saves.

    .venv/bin/python benchmarks/bench_sweep.py [--epochs 1]
Needs the test bed (tests/bed/up.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_run.demo_data import make_dataset

ROOT = Path(__file__).resolve().parent.parent
POINTS = [("0.001", "1"), ("0.001", "2"), ("0.01", "1"), ("0.01", "2")]  # (lr, seed)


def bed() -> dict[str, str]:
    path = ROOT / ".testbed" / "env"
    if not path.is_file():
        sys.exit("no test bed: run `bash tests/bed/up.sh` first")
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def laptop(tmp: Path) -> tuple[dict, Path]:
    """A laptop (HOME, gpu-run.toml) that knows the test bed's sshd as host `box`."""
    env_bed = bed()
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    host_key = Path(env_bed["GPU_RUN_TEST_SSH_HOST_KEY"]).read_text().split()[:2]
    port = env_bed["GPU_RUN_TEST_SSH_PORT"]
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    (home / ".ssh" / "config").write_text(f"Host box\n  HostName 127.0.0.1\n  Port {port}\n  User "
                                          f"{env_bed['GPU_RUN_TEST_SSH_USER']}\n  IdentityFile {env_bed['GPU_RUN_TEST_SSH_KEY']}\n")
    work = tmp / "work"
    work.mkdir()
    (work / "gpu-run.toml").write_text(f'[hosts.box]\nssh = "box"\nprice_per_hour = 3.6\ncurrency = "USD"\n'
                                       f'stop_command = "none"\nworkdir = "{tmp / "remote"}"\ngrace_s = 1\n')
    env = {**os.environ, "HOME": str(home), "GPU_RUN_HOME": str(tmp / "gpu-run-home")}
    return env, work


def run(cmd: list[str], env: dict, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "gpu_run.cli", *cmd, "--json"], env=env, cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"gpu-run {' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def billed_s(env: dict, sql: str, args: list) -> float:
    db = sqlite3.connect(Path(env["GPU_RUN_HOME"]) / "runs.db")
    return sum(row[0] or 0 for row in db.execute(sql, args).fetchall())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--restart-s", type=float, default=90,
                        help="a rented machine's stop and start again between two trains (boot, SSH back)")
    args = parser.parse_args()
    fast = ["--host", "box", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none",
            "--epochs", args.epochs]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env, work = laptop(tmp)
        data = tmp / "data"
        make_dataset(data, classes=2, train_per_class=24, val_per_class=8, size=48, seed=0)
        # Warm: the image on the host and the dataset there, so both sides start from the same state.
        run(["train", *fast, "--data", str(data)], env, work)

        t0 = time.monotonic()
        for lr, seed in POINTS:
            run(["train", *fast, "--lr", lr, "--seed", seed, "--data", str(data)], env, work)
        trains_wall = time.monotonic() - t0
        trains_billed = billed_s(env, "SELECT billed_to - billed_from FROM runs WHERE sweep_id IS NULL "
                                      "ORDER BY created_at DESC LIMIT 4", [])

        t0 = time.monotonic()
        result = run(["sweep", *fast, "--lr", "0.001,0.01", "--seed", "1,2", "--data", str(data)], env, work)
        sweep_wall = time.monotonic() - t0
        rounds = json.loads(sqlite3.connect(Path(env["GPU_RUN_HOME"]) / "runs.db").execute(
            "SELECT rounds_json FROM sweeps WHERE sweep_id = ?", [result["sweep_id"]]).fetchone()[0])
        sweep_billed = sum(r["billed_to"] - r["billed_from"] for r in rounds)

    print(f"4 points of resnet18, {args.epochs} epoch(s) each, image size 32, on the test bed's SSH host (Docker)")
    print(f"{'':28}{'billed s':>10}{'wall s':>10}")
    print(f"{'4 x gpu-run train':28}{trains_billed:>10.1f}{trains_wall:>10.1f}")
    print(f"{'1 x gpu-run sweep':28}{sweep_billed:>10.1f}{sweep_wall:>10.1f}")
    print(f"sweep / trains, billed time, measured: {sweep_billed / trains_billed:.2f}")
    restarts = 3 * args.restart_s  # four trains in a row: the machine stopped and started three times between them
    print(f"with a {args.restart_s:.0f} s stop and start between trains (not on the test bed, whose stop is free): "
          f"{sweep_billed:.0f} s against {trains_billed + restarts:.0f} s, ratio {sweep_billed / (trains_billed + restarts):.2f}")


if __name__ == "__main__":
    main()

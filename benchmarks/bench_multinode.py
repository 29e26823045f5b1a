"""Two-node training against one node: `gpu-run train --host a` and `--host a,b` on the same job,
with the trainer's own images/s (metrics.jsonl, the last epoch, over all processes).

The nodes are the test bed's container instances (tests/bed/instance.sh): each is a machine
reached over SSH with its own Python, and both share this host's CPUs and network (torchrun's c10d
rendezvous and gloo talk over loopback). So the figures say that the multi-node path works and what
it costs here, not how fast two real machines are: on one CPU, two nodes share the same cores.

    .venv/bin/python benchmarks/bench_multinode.py [--epochs 2] [--image-size 64]
Needs the test bed (tests/bed/up.sh: the Docker engine, the instance image, the SSH key).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_run.demo_data import make_dataset

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = ROOT / "tests" / "bed" / "instance.sh"
NODES = ("bench-a", "bench-b")


def free_port() -> int:
    """Below Linux's ephemeral range, so that the instance's sshd gets it again on a fresh start."""
    for _ in range(100):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    sys.exit("no free port between 20000 and 32000")


def start_instance(name: str, port: int) -> str:
    """A fresh instance (the last run's `shutdown` ended the old one); its host key line."""
    subprocess.run(["bash", str(INSTANCE), "start", name, str(port)], check=True, capture_output=True)
    key = subprocess.run(["bash", str(INSTANCE), "host-key", name], check=True, capture_output=True,
                         text=True).stdout.split()[:2]
    return f"[127.0.0.1]:{port} {' '.join(key)}\n"


def laptop(tmp: Path, ports: dict[str, int], key: str) -> tuple[Path, dict]:
    """A HOME and a working folder that know the instances as hosts bench-a and bench-b."""
    home, work = tmp / "home", tmp / "work"
    (home / ".ssh").mkdir(parents=True)
    work.mkdir()
    (home / ".ssh" / "config").write_text("".join(
        f"Host {n}\n  HostName 127.0.0.1\n  Port {p}\n  User root\n  IdentityFile {key}\n" for n, p in ports.items()))
    (work / "gpu-run.toml").write_text("".join(
        f'[hosts.{n}]\nssh = "{n}"\npreset = "autodl"\nprice_per_hour = 0\ngrace_s = 10\n\n' for n in ports)
        + f'[groups.bench]\nhosts = {json.dumps(list(ports))}\nrendezvous_port = {free_port()}\n')
    env = {**os.environ, "HOME": str(home), "GPU_RUN_HOME": str(tmp / "state"), "GPU_RUN_STOP_CONFIRM_S": "10"}
    return work, env


def train(host: str, nodes: list[str], containers: dict[str, str], ports: dict[str, int], home: Path, work: Path,
          env: dict, data: Path, args, gpus: int = 1, extra: tuple[str, ...] = ()) -> dict:
    """One `gpu-run train` on fresh instances: its trainer's images/s in the last epoch, and its wall time."""
    (home / ".ssh" / "known_hosts").write_text("".join(start_instance(containers[n], ports[n]) for n in nodes))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpu_run.cli", "train", "--host", host, "--data", str(data),
                           "--gpus", str(gpus), "--epochs", str(args.epochs), "--image-size", str(args.image_size),
                           "--batch-size", str(args.batch_size), "--workers", "0", "--weights", "none",
                           "--cache-size", "0", *extra, "--json"], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        logs = "".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(work.glob("runs/*/nodes/*.log")))
        train_logs = "".join(p.read_text()[-3000:] for p in work.glob("runs/*/train.log"))
        sys.exit(f"gpu-run train --host {host} failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}\n"
                 f"{logs}{train_logs}")
    summary = json.loads(proc.stdout)
    metrics = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"world": summary.get("world_size") or gpus, "images_per_s": metrics[-1]["train_images_per_s"],
            "epoch_s": metrics[-1]["epoch_time_s"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch is measured (the first warms up)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=96)
    args = parser.parse_args()
    env_file = ROOT / ".testbed" / "env"
    if not env_file.is_file():
        sys.exit("no test bed: run tests/bed/up.sh first")
    key = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)["GPU_RUN_TEST_SSH_KEY"]
    names = {n: f"gpu-run-testbed-instance-{n}-{os.getpid()}" for n in NODES}
    ports = {n: free_port() for n in NODES}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = make_dataset(tmp / "data", classes=2, train_per_class=args.train_per_class, val_per_class=16,
                                size=96, seed=0)
            work, env = laptop(tmp, ports, key)
            one = train(NODES[0], [NODES[0]], names, ports, tmp / "home", work, env, data, args)
            # Two processes on one machine: what DDP costs here without a second node.
            ddp = train(NODES[0], [NODES[0]], names, ports, tmp / "home", work, env, data, args, gpus=2)
            # Both nodes share this machine's cores: each gets its half, as a real node has its own
            # (with all of them each, the two trainers' threads fight over the same cores).
            threads = max(1, (os.cpu_count() or 2) // len(NODES))
            two = train("bench", list(NODES), names, ports, tmp / "home", work, env, data, args,
                        extra=("--env", f"OMP_NUM_THREADS={threads}"))
    finally:
        subprocess.run(["docker", "rm", "-f", *names.values()], capture_output=True)
    print(f"resnet18, {2 * args.train_per_class} train images at {args.image_size} px, batch {args.batch_size} per "
          f"process, gloo on CPU; epoch {args.epochs} of {args.epochs}")
    print(f"{'':<40}{'world':>6}{'images/s':>10}{'epoch s':>9}{'run s':>8}")
    rows = ((f"one node ({NODES[0]})", one), (f"one node, 2 processes ({NODES[0]})", ddp),
            (f"two nodes ({','.join(NODES)}), {threads} thr each", two))
    for label, r in rows:
        print(f"{label:<40}{r['world']:>6}{r['images_per_s']:>10.1f}{r['epoch_s']:>9.1f}{r['wall_s']:>8.1f}")
    print(f"two nodes / one node: {two['images_per_s'] / one['images_per_s']:.2f}x images/s "
          f"(two processes on one node: {ddp['images_per_s'] / one['images_per_s']:.2f}x)")
    print(f"caveat: both nodes are containers on this one machine ({os.cpu_count()} cores), sharing its CPU cores and "
          "talking gloo over loopback; this measures that multi-node training runs correctly, not how fast it is.")


if __name__ == "__main__":
    main()

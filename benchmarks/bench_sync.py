"""Sync benchmark: gpu-run's tar-over-one-SSH-channel sync against rsync, over the same sshd.

Claim: on 10,000 JPEGs of about 20 KB, our first sync takes at most 1.2x rsync's time, a re-sync
with no change at most half of rsync's (one SSH exec: the host answers `same` to the laptop's
manifest digest), and a re-sync with 1% of files changed is no slower than rsync's.
How: the test bed's sshd on 127.0.0.1 (`make testbed`); both tools run side by side in one
process, alternating which goes first, each case repeated; the median is printed with the ratio. The destination is a tmpfs (/dev/shm) by default: on this
machine's disk, writeback of 200 MB of small files swings either tool's time by 2-4x from run to
run, which measures the disk, not the tool (`--dest DIR` to measure a disk anyway; dirty pages are
flushed before each timed step so one tool's writeback is not billed to the other).
Run: .venv/bin/python benchmarks/bench_sync.py [--files 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_run.remote import Remote, SshTarget  # noqa: E402
from gpu_run.sync import ssh_tar  # noqa: E402


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n noisy 180x180 JPEGs of about 20 KB in ImageFolder layout (cached between runs)."""
    marker = root / f".done-{n}-180px"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    for i in range(n):
        folder = root / "train" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.frombytes("RGB", (180, 180), rng.randbytes(180 * 180 * 3))
        im.save(folder / f"{i:05d}.jpg", quality=70)
    marker.touch()
    return root


def change_one_percent(root: Path, rng: random.Random) -> None:
    files = sorted(p for p in root.rglob("*.jpg"))
    for p in rng.sample(files, max(1, len(files) // 100)):
        data = bytearray(p.read_bytes())
        data[-3] ^= 0xFF  # same size: only the mtime and content tell
        p.write_bytes(bytes(data))
        t = time.time() + 2
        os.utime(p, (t, t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    default_dest = "/dev/shm/gpu-run-bench-sync" if Path("/dev/shm").is_dir() else str(ROOT / "build" / "bench-sync-dest")
    parser.add_argument("--dest", default=default_dest, help="destination folder on the 'host' (default: a tmpfs)")
    args = parser.parse_args()

    env = dict(line.split("=", 1) for line in (ROOT / ".testbed" / "env").read_text().splitlines())
    port, key, user = int(env["GPU_RUN_TEST_SSH_PORT"]), env["GPU_RUN_TEST_SSH_KEY"], env["GPU_RUN_TEST_SSH_USER"]
    known = ROOT / "build" / "bench-known_hosts"
    known.parent.mkdir(exist_ok=True)
    host_key = Path(env["GPU_RUN_TEST_SSH_HOST_KEY"]).read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    remote = Remote(SshTarget("bench", "127.0.0.1", port, user, (key,), str(known)))
    ssh = f"ssh -p {port} -i {key} -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -o BatchMode=yes"

    data = make_jpegs(ROOT / "build" / "bench-sync-data", args.files)
    total_mb = sum(p.stat().st_size for p in data.rglob("*.jpg")) / 1e6
    dest = Path(args.dest)
    print(f"{args.files} files, {total_mb:.0f} MB, sshd on 127.0.0.1:{port}, into {dest}, median of {args.repeat}")

    def ours(target: Path) -> None:
        ssh_tar.push(remote, data, str(target))

    def rsync(target: Path) -> None:
        subprocess.run(["rsync", "-a", "--delete", "-e", ssh, f"{data}/", f"{user}@127.0.0.1:{target}/"], check=True)

    tools = {"gpu-run": ours, "rsync": rsync}
    times: dict[str, dict[str, list[float]]] = {c: {t: [] for t in tools} for c in ("first", "no change", "1% changed")}
    rng = random.Random(1)
    for rep in range(args.repeat):
        order = list(tools) if rep % 2 == 0 else list(reversed(tools))
        for name in order:
            shutil.rmtree(dest / name, ignore_errors=True)
        for case in times:
            if case == "1% changed":
                change_one_percent(data, rng)
            for name in order:
                # Flush the previous step's writes first: disk writeback would bill the next tool.
                os.sync()
                t0 = time.perf_counter()
                tools[name](dest / name)
                times[case][name].append(time.perf_counter() - t0)
    targets = {"first": 1.2, "no change": 0.5, "1% changed": 1.0}
    print(f"{'case':<12} {'gpu-run s':>10} {'rsync s':>10} {'ratio':>7}  target")
    for case, per_tool in times.items():
        a, b = statistics.median(per_tool["gpu-run"]), statistics.median(per_tool["rsync"])
        verdict = "ok" if a / b <= targets[case] else "MISSED"
        print(f"{case:<12} {a:>10.3f} {b:>10.3f} {a / b:>7.2f}  <= {targets[case]} {verdict}")
    remote.close()
    shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`gpu-run dashboard` with 1,000 runs in the ledger: how long the runs page takes to load in
headless chromium, and how much memory the dashboard process holds.

The ledger is generated: 1,000 runs (20 sweeps of 5 points among them, a few machines NOT stopped),
each with a run folder holding 20 epochs of metrics.jsonl, a train.log and five phases. The load
time is the browser's own navigation timing (request start to the load event), median of N loads
after one warm-up, for the runs page as it opens (the newest 200 runs) and with all 1,000 on one
page (?all=1). Memory is the dashboard's resident set (VmRSS) after each step and its peak
(VmHWM), read from /proc; the last step has the dashboard make a report (a `gpu-run report`
process of its own draws the figures).
Targets: the runs page under 1 s, the process under 150 MiB, torch never loaded.

    .venv/bin/python benchmarks/bench_dashboard.py [--runs 1000] [--loads 5]
Needs Debian's chromium and chromium-driver (tests/bed/up.sh installs them) and selenium.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_line  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1400")
CONFIG = 'ssh = "t4-box"\nprice_per_hour = 0.8\ncurrency = "CNY"\nbilling = "per_second"\nstop_command = "true"\n'


def make_ledger(home: Path, work: Path, count: int) -> list[str]:
    """`count` runs as `gpu-run train` leaves them; returns their ids, newest first."""
    os.environ["GPU_RUN_HOME"] = str(home)
    from gpu_run.ledger import Ledger
    from gpu_run.paths import ledger_path

    ledger = Ledger(ledger_path())
    (work / "gpu-run.toml").write_text("[hosts.t4-box]\n" + CONFIG)
    start = time.time() - count * 600
    ids = []
    for i in range(count):
        run_id = f"20260101-{i:06d}-{i % 65536:04x}"
        run_dir = work / "runs" / run_id
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 50, "val_loss": 1.1 / e, "val_acc": 0.45 + e / 50,
             "lr": 0.001, "epoch_time_s": 30.0, "train_images_per_s": 400.0}) + "\n" for e in range(1, 21)))
        (run_dir / "train.log").write_text("".join(f"epoch {e}: loss {1 / e:.3f}\n" for e in range(1, 21)))
        created = start + i * 600
        sweep = i // 5 if i < 100 else None
        ledger.create_run(
            run_id, "t4-box" if i % 3 else "local", model="resnet18" if i % 4 else "python train.py --epochs 20",
            status=("failed", "succeeded", "succeeded", "stopped")[i % 4], created_at=created, ended_at=created + 500,
            run_dir=str(run_dir), best_val_acc=0.85, billed_from=created + 5, billed_to=created + 520,
            cost_amount=0.11, currency="CNY", stop_status="failed" if i % 250 == 7 else "stopped",
            stop_detail="stop command exited 1" if i % 250 == 7 else "confirmed", sweep_id=f"sweep-{sweep}" if sweep is not None else None,
            sweep_point=i % 5 if sweep is not None else None, args_json=json.dumps({"spec": {"budget": 2.0, "epochs": 20}}))
        for k, phase in enumerate(("setup", "sync", "train", "pull", "stop")):
            ledger.start_phase(run_id, phase, at=created + k * 100)
            ledger.end_phase(run_id, phase, at=created + k * 100 + 90)
        ids.append(run_id)
    ledger.close()
    return ids[::-1]


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def load_time_s(driver, url: str) -> tuple[float, float]:
    """(request start to the load event, request start to the last byte of the page), in s."""
    driver.get(url)
    return tuple(driver.execute_script("const n = performance.getEntriesByType('navigation')[0]; "
                                       "return [(n.loadEventEnd - n.startTime) / 1000, (n.responseEnd - n.startTime) / 1000];"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="Runs in the generated ledger.")
    parser.add_argument("--loads", type=int, default=5, help="Timed loads of each page (after one warm-up).")
    args = parser.parse_args()
    print(machine_line(with_torch=False), flush=True)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.test_dashboard import Dashboard

    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        tmp_path = Path(tmp)
        work = tmp_path / "work"
        work.mkdir()
        made = time.perf_counter()
        ids = make_ledger(tmp_path / "home", work, args.runs)
        print(f"ledger: {len(ids)} runs written in {time.perf_counter() - made:.1f} s", flush=True)
        board = Dashboard(work)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        rows = [("started", None, None, *memory_mib(board.proc.pid))]
        try:
            driver.get(board.url)  # the token becomes a cookie
            pages = [("runs page", "/"), ("runs page, all on one", "/?all=1"), ("run page", f"/runs/{ids[0]}"),
                     ("costs page", "/costs"),
                     ("compare, 5 runs", "/compare?runs=" + ",".join(ids[:5]))]
            for name, path in pages:
                load_time_s(driver, board.base + path)  # warm-up: first imports, the browser's caches
                times = [load_time_s(driver, board.base + path) for _ in range(args.loads)]
                rows.append((name, statistics.median(t[0] for t in times), statistics.median(t[1] for t in times),
                             *memory_mib(board.proc.pid)))
            driver.get(board.base + "/")
            shown = len(driver.find_elements("css selector", "#runs-table tbody tr[data-run]"))
            driver.get(board.base + "/?all=1")
            shown_all = len(driver.find_elements("css selector", "#runs-table tbody tr[data-run]"))
            # A report drawn in the dashboard: matplotlib's figures are the biggest thing it holds.
            run_dir = work / "runs" / ids[0]
            (run_dir / "predictions.csv").write_text("path,true,predicted,confidence\n" + "".join(
                f"val/{c}/{i}.jpg,{c},{c if i % 5 else 'b' if c == 'a' else 'a'},0.9\n" for c in "ab" for i in range(50)))
            (run_dir / "summary.json").write_text(json.dumps({"run_id": ids[0], "model": "resnet18", "classes": ["a", "b"]}))
            status, _, body = board.post(f"/runs/{ids[0]}/report")
            action = json.loads(body)["action"]
            started = time.perf_counter()
            while json.loads(board.request("GET", f"/api/actions/{action}")[2])["state"] == "running":
                time.sleep(0.2)
            rows.append((f"report drawn ({time.perf_counter() - started:.1f} s)", None, None, *memory_mib(board.proc.pid)))
            torch = torch_loaded(board.proc.pid)
        finally:
            driver.quit()
            board.stop()

    print(f"\n{'step':<28}{'load s':>9}{'served s':>10}{'RSS MiB':>10}{'peak MiB':>10}")
    for name, seconds, served, rss, peak in rows:
        print(f"{name:<28}{'-' if seconds is None else f'{seconds:.3f}':>9}{'-' if served is None else f'{served:.3f}':>10}"
              f"{rss:>10.1f}{peak:>10.1f}")
    peak = max(r[4] for r in rows)
    print(f"\nruns page with {args.runs} runs in the ledger: {rows[1][1]:.3f} s for its first page ({shown} rows), "
          f"{rows[2][1]:.3f} s for all {shown_all} on one page (target < 1 s); peak memory {peak:.1f} MiB "
          f"(target < 150); torch loaded: {'yes' if torch else 'no'}")


if __name__ == "__main__":
    main()

"""The fault matrix as a table: every injected fault and what it cost the user.

Claim: whatever the fault (client killed, connection cut, trainer or watchdog killed, engine
restarted, a stop command that fails, a full disk, two runs on one host, the budget running out,
a host answering with a crafted archive), no checkpoint is lost, no machine is left running
silently, and the ledger records billing as ended only when the stop was confirmed.
How: runs the fault tests (tests/test_faults.py and the rows that live beside the features they
break) on the real test bed (`make testbed`); each test asserts its outcomes and records a row.
"billed idle" is the time from the job's end to the stop command, as the host's clock saw it.
Run: make faults   (or .venv/bin/python benchmarks/faults.py [-k EXPR])
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_faults.py",
    "tests/test_ssh_host.py::test_client_killed_mid_training_host_still_stops",
    "tests/test_ssh_host.py::test_connection_cut_during_tailing_reconnects_without_duplicates",
    "tests/test_cloud.py::test_tiny_budget_is_stopped_by_the_watchdog_with_a_resumable_checkpoint",
    "tests/test_hostile_host.py::test_hostile_host_cannot_write_outside_the_run_folder",
    "tests/test_instance.py::test_client_killed_the_instance_still_stops",
    "tests/test_instance.py::test_killed_watchdog_or_trainer_on_the_instance",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="only the faults whose test names match (pytest -k)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table_file = Path(tmp) / "rows.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        if args.k:
            cmd += ["-k", args.k]
        result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "GPU_RUN_FAULT_TABLE": str(table_file)})
        rows = [json.loads(line) for line in table_file.read_text().splitlines()] if table_file.exists() else []
    table = Table(title="fault matrix")
    for column in ("fault", "checkpoints lost", "machine left up", "billed idle after job", "ledger ok"):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for r in rows:
        idle = "-" if r["billed_idle_s"] is None else f"{r['billed_idle_s']:.0f} s"
        left = str(r["machine_left_up"]) + (" (loud)" if r["machine_left_up"] and "red" in r["fault"] else "")
        table.add_row(r["fault"], str(r["checkpoints_lost"]), left, idle, "yes" if r["ledger_ok"] else "NO")
    Console().print(table)
    if result.returncode != 0:
        Console(stderr=True).print("[red]some fault tests failed: the table lists only the rows that passed[/red]")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

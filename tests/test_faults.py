"""The fault matrix: each fault injected into a real run on the test bed (sshd + Docker engine as
the rented machine, HostPower as its power switch), and the three outcomes that matter checked:
no checkpoint lost, no machine left running, and a ledger that says what happened (billing closed
only on a confirmed stop). `make faults` prints the rows as a table.

Some rows live beside the feature they break (the tail and budget rows in test_ssh_host.py and
test_cloud.py, the crafted archives in test_hostile_host.py) and record themselves the same way.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpu_run.dataset import dataset_id
from tests.conftest import ROOT, cut_ssh_connections, wait_for

FAST = ["--host", "t4-box", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none"]
QUICK_ENV = {"GPU_RUN_SETUP_IDLE_S": "6", "GPU_RUN_HOLD_S": "5", "GPU_RUN_STOP_CONFIRM_S": "10"}

pytestmark = pytest.mark.integration


# What a fault left behind -----------------------------------------------------------------------


def start(ssh_host, *args: str) -> subprocess.Popen:
    """`gpu-run train` in the background, as a user's terminal would run it."""
    stem = ssh_host.work / f"train-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "train", *FAST, *args], cwd=ssh_host.work,
                            env={**ssh_host.cli.env, **QUICK_ENV}, stdout=open(f"{stem}.out", "w"),
                            stderr=open(f"{stem}.err", "w"))
    proc.stem = stem
    return proc


def finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of a run started with start()."""
    proc.wait(timeout=timeout_s)
    return proc.returncode, Path(f"{proc.stem}.out").read_text(), Path(f"{proc.stem}.err").read_text()


def cli(ssh_host, *args: str, check: bool = True):
    return ssh_host.cli(*args, env=QUICK_ENV, check=check)


def only_run(ssh_host) -> str:
    return wait_for(lambda: next((p.name for p in (ssh_host.workdir / "runs").glob("*")), None), 120, "the run to claim the host")


def ledger_row(home: Path, run_id: str) -> dict:
    db = sqlite3.connect(home / "runs.db")
    db.row_factory = sqlite3.Row
    return dict(db.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]).fetchone())


def phase_running(home: Path, phase: str) -> str | None:
    """The run whose `phase` has started and not ended, if any (read from the laptop's ledger)."""
    path = home / "runs.db"
    if not path.exists():
        return None
    try:
        row = sqlite3.connect(path, timeout=1).execute(
            "SELECT run_id FROM phases WHERE phase = ? AND ended_at IS NULL", [phase]).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def host_file(ssh_host, run_id: str, name: str) -> dict:
    path = ssh_host.remote_run_dir(run_id) / name
    return dict(kv.split("=", 1) for kv in path.read_text().split()) if path.exists() else {}


def billed_idle_s(ssh_host, run_id: str) -> float:
    """From the job's end (the watchdog's status) to the stop command: what the user paid for idle."""
    ended = int(host_file(ssh_host, run_id, "status")["ended_at"])
    return int(ssh_host.stop_marker.read_text().split()[0]) - ended


def ledger_consistent(home: Path, run_id: str, stopped: bool) -> bool:
    """Billing is closed exactly when the machine is confirmed down (or handed to another run)."""
    row = ledger_row(home, run_id)
    if stopped:
        return row["billed_to"] is not None and row["stop_status"] in ("stopped", "handed_over")
    return row["billed_to"] is None and row["stop_status"] in ("failed", "unconfirmed")


def epochs_on_host(ssh_host, run_id: str) -> int:
    path = ssh_host.remote_run_dir(run_id) / "out" / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def checkpoints_lost(run_dir: Path, completed_epochs: int) -> int:
    """Completed epochs whose progress is not in a last.pth on the laptop that loads."""
    last = run_dir / "checkpoints" / "last.pth"
    if not last.is_file():
        return completed_epochs
    saved = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    return max(0, completed_epochs - saved)


def machine_left_up(ssh_host, run_id: str, within_s: float = 30) -> int:
    """1 if the machine still answers after the watchdog and laptop had their chance to stop it."""
    try:
        wait_for(lambda: not ssh_host.power.up, within_s, "the machine to stop")
    except AssertionError:
        return 1
    return 0


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# Client killed -----------------------------------------------------------------------------------


def test_client_killed_during_sync(ssh_host, big_dataset, gpu_run_home, fault_row):
    proc = start(ssh_host, "--epochs", "1", "--data", str(big_dataset))
    remote_data = ssh_host.workdir / "data" / dataset_id(big_dataset)
    wait_for(lambda: remote_data.exists() and next(remote_data.rglob("*.jpg"), None), 120, "the sync to begin", 0.01)
    proc.kill()
    proc.wait()
    killed_at = time.time()
    run_id = only_run(ssh_host)
    # No trainer started; the watchdog held the host while the laptop renewed its lease, and
    # releases it once the laptop has been quiet for GPU_RUN_SETUP_IDLE_S.
    left_up = machine_left_up(ssh_host, run_id, within_s=40)
    assert left_up == 0
    assert not (ssh_host.remote_run_dir(run_id) / "out").exists()
    assert host_file(ssh_host, run_id, "status")["outcome"] == "setup_abandoned"
    stopped_after = int(ssh_host.stop_marker.read_text()) - killed_at
    # The laptop comes back: the run is recorded as never started, and the stop as confirmed.
    row = ledger_row(gpu_run_home, run_id)
    assert row["status"] == "created" and row["billed_to"] is None
    settled = cli(ssh_host, "attach", run_id, "--json").stdout
    assert json.loads(settled)["stop"]["ok"]
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True) and ledger_row(gpu_run_home, run_id)["status"] == "failed"
    assert ok
    fault_row("client SIGKILL during sync", 0, left_up, round(stopped_after, 1), ok)


def test_client_killed_during_pull(ssh_host, dataset, gpu_run_home, fault_row):
    proc = start(ssh_host, "--epochs", "2", "--data", str(dataset))
    wait_for(lambda: phase_running(gpu_run_home, "pull"), 300, "the pull to begin", 0.01)
    proc.kill()
    proc.wait()
    run_id = only_run(ssh_host)
    run_dir = ssh_host.work / "runs" / run_id
    # Nothing half-written is visible in the run folder: a file is either whole or absent.
    remote_out = ssh_host.remote_run_dir(run_id) / "out"
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.name.startswith(".") and (remote_out / path.relative_to(run_dir)).is_file():
            assert path.stat().st_size == (remote_out / path.relative_to(run_dir)).stat().st_size, path
    # The watchdog waits out the grace (and the pull's short hold), then stops the machine.
    assert machine_left_up(ssh_host, run_id, within_s=60) == 0
    idle = billed_idle_s(ssh_host, run_id)
    # The user starts it again and pulls: everything arrives verified, and it is stopped again.
    ssh_host.start_machine()
    summary = json.loads(cli(ssh_host, "pull", run_id, "--json").stdout)
    assert summary["status"] == "succeeded" and summary["stop"]["ok"]
    for name in ("best.pth", "last.pth"):
        assert sha(run_dir / "checkpoints" / name) == sha(remote_out / "checkpoints" / name)
    lost = checkpoints_lost(run_dir, epochs_on_host(ssh_host, run_id))
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert lost == 0 and left_up == 0 and ok
    fault_row("client SIGKILL during pull", lost, left_up, idle, ok)


# Connection cut ------------------------------------------------------------------------------------


def test_connection_cut_during_sync(ssh_host, big_dataset, gpu_run_home, fault_row):
    proc = start(ssh_host, "--epochs", "1", "--data", str(big_dataset), "--json")
    remote_data = ssh_host.workdir / "data" / dataset_id(big_dataset)
    wait_for(lambda: remote_data.exists() and next(remote_data.rglob("*.jpg"), None), 120, "the sync to begin", 0.01)
    assert cut_ssh_connections() > 0
    code, out, err = finish(proc)
    assert code == 0, err
    summary = json.loads(out)
    run_id = summary["run_id"]
    assert summary["status"] == "succeeded" and summary["stop"]["ok"]
    lost = checkpoints_lost(Path(summary["run_dir"]), epochs_on_host(ssh_host, run_id))
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert lost == 0 and left_up == 0 and ok
    fault_row("SSH cut during sync", lost, left_up, billed_idle_s(ssh_host, run_id), ok)


def test_connection_cut_during_pull(ssh_host, dataset, gpu_run_home, fault_row):
    ssh_host.write_config(grace_s=30)  # the cut must not race the grace
    proc = start(ssh_host, "--epochs", "2", "--data", str(dataset), "--json")
    wait_for(lambda: phase_running(gpu_run_home, "pull"), 300, "the pull to begin", 0.01)
    assert cut_ssh_connections() > 0
    code, out, err = finish(proc)
    assert code == 0, err
    summary = json.loads(out)
    run_id, run_dir = summary["run_id"], Path(summary["run_dir"])
    remote_out = ssh_host.remote_run_dir(run_id) / "out"
    for name in ("best.pth", "last.pth"):
        assert sha(run_dir / "checkpoints" / name) == sha(remote_out / "checkpoints" / name)
    lost = checkpoints_lost(run_dir, epochs_on_host(ssh_host, run_id))
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert summary["stop"]["ok"] and lost == 0 and left_up == 0 and ok
    fault_row("SSH cut during pull", lost, left_up, billed_idle_s(ssh_host, run_id), ok)


# The trainer, the watchdog and the engine ------------------------------------------------------------


def test_trainer_killed_during_a_checkpoint_write(ssh_host, dataset, gpu_run_home, fault_row):
    proc = start(ssh_host, "--epochs", "4", "--image-size", "64", "--data", str(dataset), "--json")
    run_id = only_run(ssh_host)
    ckpt = ssh_host.remote_run_dir(run_id) / "out" / "checkpoints"
    wait_for(lambda: (ckpt / "last.pth").exists(), 180, "the first checkpoint")
    # The next save is in its temp file: SIGKILL the container right then.
    wait_for(lambda: next(ckpt.glob(".*.tmp-*"), None), 180, "a checkpoint write (a temp file in checkpoints/)", 0.005)
    completed = epochs_on_host(ssh_host, run_id)
    subprocess.run(["docker", "kill", f"gpu-run-{run_id}"], capture_output=True, check=True)
    code, out, err = finish(proc)
    summary = json.loads(out)
    assert code == 1 and summary["status"] == "failed" and summary["exit_code"] == 137, out
    run_dir = Path(summary["run_dir"])
    # The good checkpoint from before the kill survived, whole, and came back.
    assert sha(run_dir / "checkpoints" / "last.pth") == sha(ckpt / "last.pth")
    lost = checkpoints_lost(run_dir, completed - 1)  # the save in flight is the one the kill took
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert lost == 0 and left_up == 0 and ok and summary["stop"]["ok"]
    fault_row("trainer SIGKILL during a checkpoint write", lost, left_up, billed_idle_s(ssh_host, run_id), ok)


@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_watchdog_killed(sig, ssh_host, dataset, gpu_run_home, fault_row):
    proc = start(ssh_host, "--epochs", "3", "--image-size", "64", "--data", str(dataset), "--json")
    run_id = only_run(ssh_host)
    run_dir_remote = ssh_host.remote_run_dir(run_id)
    wait_for(lambda: epochs_on_host(ssh_host, run_id) >= 1, 180, "the first epoch")
    pid = int((run_dir_remote / "watchdog.pid").read_text())
    os.kill(pid, getattr(signal, f"SIG{sig}"))
    code, out, err = finish(proc)
    assert out.strip(), f"train printed no summary (exit {code}):\n{err[-3000:]}"
    summary = json.loads(out)
    log = (run_dir_remote / "watchdog.log").read_text()
    if sig == "KILL":
        # No trap runs on SIGKILL: the backstop starts the watchdog again, and the run ends normally.
        assert "the watchdog is gone: starting it again" in log
        assert code == 0 and summary["status"] == "succeeded", out
    else:
        # TERM goes through the stop path: the trainer saves last.pth and the machine stops.
        assert "leaving early" in log
        assert summary["status"] in ("stopped", "succeeded") and summary["watchdog"]["outcome"] in ("watchdog_exit", "finished"), out
    run_dir = Path(summary["run_dir"])
    lost = checkpoints_lost(run_dir, epochs_on_host(ssh_host, run_id))
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert lost == 0 and left_up == 0 and ok and summary["stop"]["ok"]
    fault_row(f"watchdog killed (SIG{sig})", lost, left_up, billed_idle_s(ssh_host, run_id), ok)


@pytest.fixture
def restartable_dockerd():
    """Restarts the test bed's dockerd on request, and makes sure it is up again afterwards."""

    def engine_up() -> bool:
        return subprocess.run(["docker", "info"], capture_output=True).returncode == 0

    def restart() -> None:
        pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
        assert pids, "the test bed's dockerd is not running"
        for pid in pids:
            os.kill(int(pid), signal.SIGTERM)
        wait_for(lambda: not subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).stdout, 60, "dockerd to exit")
        launch()

    def launch() -> None:
        log = open(ROOT / ".testbed" / "dockerd.log", "a")
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(engine_up, 60, "dockerd to answer again", 0.5)

    yield restart
    if not engine_up() and not subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).stdout:
        launch()


def test_docker_daemon_restarted_mid_run(ssh_host, dataset, gpu_run_home, fault_row, restartable_dockerd):
    proc = start(ssh_host, "--epochs", "20", "--image-size", "64", "--data", str(dataset), "--json")
    run_id = only_run(ssh_host)
    wait_for(lambda: epochs_on_host(ssh_host, run_id) >= 1, 180, "the first epoch")
    completed = epochs_on_host(ssh_host, run_id)
    restartable_dockerd()
    code, out, err = finish(proc)
    summary = json.loads(out)
    # The engine's shutdown sent the trainer SIGTERM: it saved a resumable last.pth and stopped.
    # The watchdog counted the engine's absence as an error, not as the job's end: the end it
    # recorded is the trainer's own (finished, exit 75), not engine_down or never_started.
    assert summary["status"] == "stopped" and summary["exit_code"] == 75, out
    status = host_file(ssh_host, run_id, "status")
    assert (status["outcome"], status["exit_code"]) == ("finished", "75"), status
    lost = checkpoints_lost(Path(summary["run_dir"]), completed)
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert lost == 0 and left_up == 0 and ok and summary["stop"]["ok"]
    fault_row("docker daemon restarted mid-run", lost, left_up, billed_idle_s(ssh_host, run_id), ok)


# The stop itself -------------------------------------------------------------------------------------


def test_stop_command_fails_then_works_on_retry(ssh_host, dataset, gpu_run_home, fault_row):
    tries = ssh_host.work / "stop-tries"
    script = ssh_host.work / "flaky-shutdown.sh"
    script.write_text(f'if [ -e {tries} ]; then date +%s > {ssh_host.stop_marker}; else touch {tries}; '
                      f'echo "shutdown: Permission denied" >&2; exit 1; fi\n')
    text = (ssh_host.work / "gpu-run.toml").read_text()
    (ssh_host.work / "gpu-run.toml").write_text(
        "\n".join(f'stop_command = "sh {script}"' if line.startswith("stop_command") else line for line in text.splitlines()) + "\n")
    code, out, err = finish(start(ssh_host, "--epochs", "1", "--data", str(dataset), "--json"))
    assert code == 0, err
    summary = json.loads(out)
    run_id = summary["run_id"]
    log = (ssh_host.remote_run_dir(run_id) / "watchdog.log").read_text()
    assert log.count("STOP FAILED") == 1 and "Permission denied" in log
    assert summary["stop"] == {"ok": True, "state": "stopped", "detail": summary["stop"]["detail"]}
    idle = billed_idle_s(ssh_host, run_id)
    assert idle <= 3 + 5 + 5  # grace, then the first retry after 5 s
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert left_up == 0 and ok
    fault_row("stop command fails, then works on retry", 0, left_up, idle, ok)


def test_stop_command_that_never_works_is_loud_and_keeps_billing_open(ssh_host, dataset, gpu_run_home, fault_row,
                                                                      cleanup):
    text = (ssh_host.work / "gpu-run.toml").read_text()
    broken = "\n".join(
        """stop_command = "sh -c 'echo shutdown: Permission denied >&2; exit 1'\"""" if line.startswith("stop_command") else line
        for line in text.splitlines()) + "\n"
    (ssh_host.work / "gpu-run.toml").write_text(broken)
    # The watchdog goes on retrying the old command on a machine that the test only plays as
    # stopped: the test ends it, however it ends.
    cleanup.processes_naming(str(ssh_host.workdir / "runs"))
    code, out, err = finish(start(ssh_host, "--epochs", "1", "--data", str(dataset)))
    run_id = only_run(ssh_host)
    # Training succeeded, the machine did not stop: exit 3, said in red, never recorded as stopped.
    assert code == 3, out + err
    assert "NOT STOPPED" in err and "Permission denied" in err
    row = ledger_row(gpu_run_home, run_id)
    assert row["status"] == "succeeded" and row["stop_status"] == "failed" and row["billed_to"] is None
    summary = json.loads((ssh_host.work / "runs" / run_id / "summary.json").read_text())
    assert summary["stop"]["ok"] is False and "Permission denied" in summary["stop"]["detail"]
    assert ssh_host.power.up  # it really is still running
    listing = cli(ssh_host, "runs", check=False)
    assert "NOT STOPPED" in listing.stdout + listing.stderr
    costs = json.loads(cli(ssh_host, "cost", "--json").stdout)
    assert costs["runs"][0]["so_far"] and costs["runs"][0]["stop_failed"]
    ledger_ok = ledger_consistent(gpu_run_home, run_id, stopped=False)
    # The user fixes the stop command; `gpu-run stop RUN` stops the machine and closes the billing.
    ssh_host.write_config(grace_s=3)
    fixed = json.loads(cli(ssh_host, "stop", run_id, "--json").stdout)
    assert fixed["stop"]["ok"] and not ssh_host.power.up
    assert ledger_consistent(gpu_run_home, run_id, stopped=True)
    fault_row("stop command never works (said in red, exit 3)", 0, 1, None, ledger_ok)


# Disks ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(ssh_host):
    """The host's workdir on a small filesystem of its own (a tmpfs), unmounted afterwards."""
    mounts = []

    def mount(size: str) -> Path:
        ssh_host.workdir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(ssh_host.workdir)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"the test bed cannot mount a tmpfs: {result.stderr.strip()}")
        mounts.append(ssh_host.workdir)
        return ssh_host.workdir

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_during_sync(ssh_host, big_dataset, gpu_run_home, fault_row, small_disk):
    small_disk("4m")
    code, out, err = finish(start(ssh_host, "--epochs", "1", "--data", str(big_dataset)))
    run_id = only_run(ssh_host)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "no space left" in errors[0].lower(), out + err
    assert "Traceback" not in out + err
    left_up = machine_left_up(ssh_host, run_id)
    row = ledger_row(gpu_run_home, run_id)
    ok = row["status"] == "failed" and ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert left_up == 0 and ok
    fault_row("host disk full during sync", 0, left_up, None, ok)


def test_disk_full_during_a_checkpoint(ssh_host, dataset, gpu_run_home, fault_row, small_disk):
    disk = small_disk("300m")
    proc = start(ssh_host, "--model", "mobilenet_v3_small", "--epochs", "4", "--image-size", "64",
                 "--data", str(dataset), "--json")
    run_id = only_run(ssh_host)
    wait_for(lambda: epochs_on_host(ssh_host, run_id) >= 1, 180, "the first epoch")
    completed = epochs_on_host(ssh_host, run_id)
    # Fill the disk, leaving room for the watchdog's small files but not for a checkpoint.
    fill = disk / "fill"
    with open(fill, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    os.truncate(fill, max(0, fill.stat().st_size - 256 * 1024))
    code, out, err = finish(proc)
    summary = json.loads(out)
    assert code == 1 and summary["status"] == "failed", out
    train_log = (Path(summary["run_dir"]) / "train.log").read_text()
    assert "No space left" in train_log
    lost = checkpoints_lost(Path(summary["run_dir"]), completed)
    left_up = machine_left_up(ssh_host, run_id)
    ok = ledger_consistent(gpu_run_home, run_id, stopped=True)
    assert lost == 0 and left_up == 0 and ok and summary["stop"]["ok"]
    fault_row("host disk full during a checkpoint", lost, left_up, billed_idle_s(ssh_host, run_id), ok)


# Two runs on one host -----------------------------------------------------------------------------------


def test_two_runs_on_one_host_the_first_ends_early(ssh_host, dataset, gpu_run_home, fault_row):
    long = json.loads(cli(ssh_host, "train", *FAST, "--epochs", "50", "--image-size", "64", "--detach",
                          "--data", str(dataset), "--json").stdout)
    code, out, err = finish(start(ssh_host, "--epochs", "1", "--data", str(dataset), "--json"))
    assert code == 0, err
    short = json.loads(out)
    # The short run ended while the long one trains: the host stays up for it.
    assert short["stop"]["ok"] and short["stop"]["state"] == "handed_over", short["stop"]
    assert not ssh_host.stop_marker.exists() and ssh_host.power.up
    done = json.loads(cli(ssh_host, "stop", long["run_id"], "--json").stdout)
    assert done["status"] == "stopped" and done["stop"]["ok"] and done["stop"]["state"] == "stopped"
    # Stopped once, after the last run ended.
    assert int(ssh_host.stop_marker.read_text()) >= int(host_file(ssh_host, long["run_id"], "status")["ended_at"])
    left_up = machine_left_up(ssh_host, long["run_id"])
    ok = all(ledger_consistent(gpu_run_home, r, stopped=True) for r in (short["run_id"], long["run_id"]))
    assert left_up == 0 and ok
    fault_row("two runs on one host, the first ends early", 0, left_up, billed_idle_s(ssh_host, long["run_id"]), ok)


def test_a_failed_setup_never_stops_the_host_under_another_run(ssh_host, dataset, tmp_path, gpu_run_home, fault_row):
    running = json.loads(cli(ssh_host, "train", *FAST, "--epochs", "50", "--image-size", "64", "--detach",
                             "--data", str(dataset), "--json").stdout)
    wait_for(lambda: epochs_on_host(ssh_host, running["run_id"]) >= 1, 180, "the first run to train")
    # A second run whose setup fails after it reached the host: its dataset folder there is taken
    # by a file, so its sync fails and it releases the host, which the first run still holds.
    data_dir = ssh_host.workdir / "data"
    blocker = data_dir / dataset_id(dataset)
    other = tmp_path / "other-data"
    from gpu_run.demo_data import make_dataset

    make_dataset(other, classes=2, train_per_class=4, val_per_class=2, size=32, seed=5)
    (data_dir / dataset_id(other)).write_text("a file where the dataset folder should go\n")
    failed = cli(ssh_host, "train", *FAST, "--epochs", "1", "--data", str(other), check=False)
    assert failed.returncode != 0 and "error:" in failed.stderr
    assert not ssh_host.stop_marker.exists() and ssh_host.power.up, "the failed setup stopped the host under the running run"
    assert blocker.is_dir()
    done = json.loads(cli(ssh_host, "stop", running["run_id"], "--json").stdout)
    assert done["status"] == "stopped" and done["stop"]["ok"] and done["stop"]["state"] == "stopped"
    left_up = machine_left_up(ssh_host, running["run_id"])
    ok = ledger_consistent(gpu_run_home, running["run_id"], stopped=True)
    assert left_up == 0 and ok
    fault_row("a second run's setup fails while the first trains", 0, left_up,
              billed_idle_s(ssh_host, running["run_id"]), ok)


def test_a_failed_setup_whose_machine_does_not_stop_exits_3_and_stop_stops_it(ssh_host, dataset, gpu_run_home,
                                                                             fault_row, cleanup):
    """The attack: the setup fails after the claim (the dataset's folder on the host is taken by a
    file) on a host whose stop command fails. train must say NOT STOPPED and exit 3 whatever failed
    first, and the advised `gpu-run stop RUN` must find the machine (its handle is in the ledger
    from the claim on) and stop it."""
    text = (ssh_host.work / "gpu-run.toml").read_text()
    (ssh_host.work / "gpu-run.toml").write_text("\n".join(
        """stop_command = "sh -c 'echo no space left >&2; exit 1'\"""" if line.startswith("stop_command") else line
        for line in text.splitlines()) + "\n")
    cleanup.processes_naming(str(ssh_host.workdir / "runs"))  # the watchdog retries the broken stop forever
    (ssh_host.workdir / "data").mkdir(parents=True)
    (ssh_host.workdir / "data" / dataset_id(dataset)).write_text("a file where the dataset folder should go\n")
    failed = cli(ssh_host, "train", *FAST, "--epochs", "1", "--data", str(dataset), check=False)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "NOT STOPPED" in failed.stderr and ssh_host.power.up
    run_id = only_run(ssh_host)
    row = ledger_row(gpu_run_home, run_id)
    assert row["status"] == "failed" and row["billed_to"] is None and row["handle_json"]
    ssh_host.write_config(grace_s=3)  # the user fixes the stop command
    fixed = json.loads(cli(ssh_host, "stop", run_id, "--json").stdout)
    assert fixed["stop"]["ok"] and not ssh_host.power.up
    assert ledger_row(gpu_run_home, run_id)["billed_to"] is not None
    fault_row("setup fails and the stop fails (exit 3, then gpu-run stop)", 0, 0, None, True)

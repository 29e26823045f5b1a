"""A rented host over SSH: the test bed's real sshd on 127.0.0.1 with the real Docker engine behind it."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest
import torch

from gpu_run.dataset import dataset_id
from gpu_run.remote import Remote, resolve_target
from gpu_run.sync import ssh_tar
from tests.conftest import cut_ssh_connections, wait_for

FAST = ["--host", "t4-box", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none"]

pytestmark = pytest.mark.integration


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def phases(home: Path, run_id: str) -> dict[str, str]:
    db = sqlite3.connect(home / "runs.db")
    return dict(db.execute("SELECT phase, status FROM phases WHERE run_id = ?", [run_id]).fetchall())


def test_train_on_ssh_host_end_to_end(ssh_host, dataset, gpu_run_home):
    ssh_host.write_config(grace_s=30)  # long enough that only the client's pull can end it early
    summary = ssh_host.cli.json("train", *FAST, "--epochs", "2", "--data", str(dataset))
    assert summary["status"] == "succeeded" and summary["backend"] == "ssh"
    # The dataset arrived byte-identical.
    remote_data = ssh_host.workdir / "data" / dataset_id(dataset)
    assert tree_hashes(remote_data) == tree_hashes(dataset)
    # Checkpoints came back identical to the host's copies, and load.
    run_dir = Path(summary["run_dir"])
    remote_out = ssh_host.remote_run_dir(summary["run_id"]) / "out"
    for name in ("best.pth", "last.pth"):
        assert sha(run_dir / "checkpoints" / name) == sha(remote_out / "checkpoints" / name)
    assert torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 2
    assert (run_dir / "predictions.csv").read_text() == (remote_out / "predictions.csv").read_text()
    # The watchdog ran the stop command, and the client's pull let it do so at once.
    assert ssh_host.stop_marker.exists()
    log = (ssh_host.remote_run_dir(summary["run_id"]) / "watchdog.log").read_text()
    assert "outputs pulled by the client" in log
    assert "grace period over" not in log
    assert phases(gpu_run_home, summary["run_id"]) == {p: "ok" for p in ("connect", "sync", "build", "train", "pull", "stop")}
    assert summary["cost"]["currency"] == "CNY" and summary["cost"]["billed_s"] >= 1
    assert summary["watchdog"]["outcome"] == "finished"

    # A second run with the dataset unchanged sends nothing.
    ssh_host.start_machine()
    again = ssh_host.cli("train", *FAST, "--epochs", "1", "--data", str(dataset), check=True)
    assert "dataset synced: 0 file(s), 0.0 MB sent" in again.stdout
    assert "(no build needed)" in again.stdout


def test_client_killed_mid_training_host_still_stops(ssh_host, dataset, gpu_run_home, fault_row):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_run.cli", "train", *FAST, "--image-size", "64", "--epochs", "4",
         "--data", str(dataset)],
        cwd=ssh_host.work, env=ssh_host.cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    runs = ssh_host.workdir / "runs"
    metrics = wait_for(lambda: next(runs.glob("*/out/metrics.jsonl"), None), 120, "the first epoch on the host")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_id = metrics.parent.parent.name

    status_file = runs / run_id / "status"
    wait_for(status_file.exists, 180, "the container to end")
    wait_for(ssh_host.stop_marker.exists, 30, "the stop command")
    ended_at = int(dict(kv.split("=") for kv in status_file.read_text().split())["ended_at"])
    stopped_at = int(ssh_host.stop_marker.read_text())
    grace_s = 3
    assert grace_s <= stopped_at - ended_at <= grace_s + 5  # billed idle: the grace period, no more
    assert "grace period over" in (runs / run_id / "watchdog.log").read_text()

    # The outputs stay on the stopped machine: the user starts it again and attaches, which pulls
    # them and stops the machine once more.
    wait_for(lambda: not ssh_host.power.up, 5, "the machine to go down")
    ssh_host.start_machine()
    summary = ssh_host.cli.json("attach", run_id)
    assert summary["status"] == "succeeded" and summary["epochs_completed"] == 4
    assert summary["stop"]["ok"] and summary["stop"]["state"] == "stopped" and ssh_host.stop_marker.exists()
    run_dir = Path(summary["run_dir"])
    assert sha(run_dir / "checkpoints" / "last.pth") == sha(runs / run_id / "out" / "checkpoints" / "last.pth")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    fault_row("client SIGKILL during tail", 0, int(ssh_host.power.up), stopped_at - ended_at,
              summary["stop"]["ok"] and summary["cost"]["billed_s"] > 0)


@pytest.mark.parametrize("client", ["paramiko", "openssh"])
def test_connection_cut_during_sync_resumes_without_resending(client, ssh_host, tmp_path, monkeypatch):
    from gpu_run.demo_data import make_dataset

    # Small streams go over the open paramiko connection, big ones through the OpenSSH client.
    monkeypatch.setattr(ssh_tar, "OPENSSH_FROM_BYTES", 0 if client == "openssh" else 1 << 40)
    data = make_dataset(tmp_path / "big", classes=2, train_per_class=300, val_per_class=10, size=128)
    target = resolve_target("t4-box", ssh_config_path=ssh_host.home / ".ssh" / "config")
    target = target.__class__(**{**target.__dict__, "known_hosts": str(ssh_host.known_hosts)})
    remote = Remote(target)
    cuts = []

    def progress(completed=None, total=None, **_):
        # Cut once 3 MiB went out, so the first of them have surely been unpacked there.
        if completed and completed >= 3 << 20 and not cuts:
            cuts.append(cut_ssh_connections())

    remote_root = str(ssh_host.workdir / "data" / "big")
    stats = ssh_tar.push(remote, data, remote_root, progress=progress)
    assert cuts and cuts[0] >= 1
    assert stats.attempts == 2
    n_files = len(list(data.rglob("*.jpg")))
    assert 0 < stats.files_sent < n_files  # the retry sent only what had not arrived
    assert tree_hashes(Path(remote_root)) == tree_hashes(data)
    # Removing a file locally removes it on the host; a no-change sync sends nothing.
    (data / "train" / "vertical" / "00000.jpg").unlink()
    again = ssh_tar.push(remote, data, remote_root)
    assert (again.files_sent, again.deleted) == (0, 1)
    assert tree_hashes(Path(remote_root)) == tree_hashes(data)
    remote.close()


def test_connection_cut_during_tailing_reconnects_without_duplicates(ssh_host, dataset, fault_row):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_run.cli", "train", *FAST, "--image-size", "64", "--epochs", "3",
         "--data", str(dataset)],
        cwd=ssh_host.work, env=ssh_host.cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for(lambda: next((ssh_host.workdir / "runs").glob("*/out/metrics.jsonl"), None), 120, "the first epoch")
    assert cut_ssh_connections() >= 1
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads(next((ssh_host.work / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "succeeded" and summary["epochs_completed"] == 3
    log = (Path(summary["run_dir"]) / "train.log").read_text().splitlines()
    events = [json.loads(line) for line in log if line.startswith("{")]
    steps = [(e["epoch"], e["step"]) for e in events if e["event"] == "step"]
    assert len(steps) == len(set(steps))  # no line twice
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]  # and none lost
    assert summary["stop"]["ok"] and not ssh_host.power.up
    status = dict(kv.split("=") for kv in (ssh_host.remote_run_dir(summary["run_id"]) / "status").read_text().split())
    fault_row("SSH cut during tail", 0, 0, int(ssh_host.stop_marker.read_text()) - int(status["ended_at"]), True)


def test_max_hours_stops_a_hung_job_and_the_host(ssh_host, dataset):
    proc = ssh_host.cli("train", *FAST, "--epochs", "2", "--data", str(dataset), "--max-hours", "0.003",
                        "--stop-timeout", "2", "--env", "GPU_RUN_FAULT_HANG_AT_STEP=2")
    assert proc.returncode == 1  # the run failed: it never finished
    summary = json.loads(next((ssh_host.work / "runs").glob("*/summary.json")).read_text())
    assert summary["watchdog"]["outcome"] == "max_runtime"
    assert "it reached --max-hours" in proc.stdout
    assert ssh_host.stop_marker.exists()


def test_log_silence_stops_a_hung_job_and_the_host(ssh_host, dataset):
    proc = ssh_host.cli("train", *FAST, "--epochs", "2", "--data", str(dataset), "--silence-minutes", "0.1",
                        "--stop-timeout", "2", "--env", "GPU_RUN_FAULT_HANG_AT_STEP=3")
    assert proc.returncode == 1
    summary = json.loads(next((ssh_host.work / "runs").glob("*/summary.json")).read_text())
    assert summary["watchdog"]["outcome"] == "silent"
    assert ssh_host.stop_marker.exists()


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_host_keys_unknown_changed_and_accept_new(ssh_host, dataset):
    ssh_host.known_hosts.write_text("")
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset)))
    assert "is not in" in line and "--accept-new-host-key" in line
    assert not (ssh_host.work / "runs").exists() or not any((ssh_host.work / "runs").glob("*/summary.json"))

    other = paramiko.Ed25519Key.from_private_key_file(ssh_host.key)  # any key that is not the host's
    ssh_host.known_hosts.write_text(f"[127.0.0.1]:{ssh_host.port} ssh-ed25519 {other.get_base64()}\n")
    # A changed key is refused even with --accept-new-host-key.
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset), "--accept-new-host-key"))
    assert "has CHANGED" in line and "refusing to connect" in line
    doctor = ssh_host.cli("doctor", "t4-box", "--json")
    assert doctor.returncode == 1 and "has CHANGED" in json.loads(doctor.stdout)[0]["result"]

    ssh_host.known_hosts.write_text("")
    ok = ssh_host.cli.json("doctor", "t4-box", "--accept-new-host-key")
    assert ok[0]["check"] == "ssh login" and ok[0]["ok"]
    assert f"[127.0.0.1]:{ssh_host.port} {' '.join(ssh_host.host_key)}" in ssh_host.known_hosts.read_text()
    again = ssh_host.cli.json("doctor", "t4-box")  # now known, no flag needed
    assert again[0]["ok"] and any(c["check"] == "runtime" and c["result"].startswith("docker") and c["ok"] for c in again)


def test_host_without_docker_wrong_key_or_unreachable(ssh_host, dataset, tmp_path):
    ssh_host.write_ssh_config(user="gpurun-nodocker", key=ssh_host.key)
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset)))
    # No Docker, and no Python there with torch: said, with both fixes.
    assert line.startswith("error: host t4-box has no Docker engine") and "imports torch" in line
    toml = ssh_host.work / "gpu-run.toml"
    toml.write_text(toml.read_text() + 'runtime = "docker"\n')
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset)))
    assert line.startswith("error: host t4-box has no working Docker engine")
    ssh_host.write_config()

    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    ssh_host.write_ssh_config(user="root", key=str(wrong))
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset)))
    assert "SSH login to root@127.0.0.1" in line and "was refused" in line

    ssh_host.write_ssh_config(user="root", key=ssh_host.key, port=1)
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset)))
    assert line.startswith("error: cannot reach t4-box (root@127.0.0.1:1)")


def test_stop_on_the_host_then_resume_there(ssh_host, dataset):
    started = ssh_host.cli.json("train", *FAST, "--image-size", "64", "--epochs", "40", "--detach", "--data", str(dataset))
    run_id = started["run_id"]
    wait_for(lambda: (ssh_host.remote_run_dir(run_id) / "out" / "metrics.jsonl").exists(), 120, "the first epoch")
    stopped = ssh_host.cli.json("stop", run_id)
    assert stopped["status"] == "stopped" and stopped["exit_code"] == 75
    assert ssh_host.stop_marker.exists()  # the pull let the watchdog stop the host at once
    last = torch.load(Path(stopped["run_dir"]) / "checkpoints" / "last.pth", weights_only=True)
    ssh_host.start_machine()
    resumed = ssh_host.cli.json("train", "--resume", run_id, *FAST, "--image-size", "64",
                                "--epochs", str(last["epoch"] + 1))
    assert resumed["status"] == "succeeded" and resumed["resumed_from"] == run_id
    log = (Path(resumed["run_dir"]) / "train.log").read_text()
    assert '"event": "resumed", ' in log
    epochs = [json.loads(x)["epoch"] for x in (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1] == last["epoch"] + 1 and 1 in epochs  # the history came along


def test_a_host_that_cannot_be_stopped_is_refused_before_anything_runs(ssh_host, dataset):
    toml = ssh_host.work / "gpu-run.toml"
    lines = [line for line in toml.read_text().splitlines() if not line.startswith("stop_command")]
    # No stop_command: said, with the fix, instead of silently keeping the box up.
    toml.write_text("\n".join(lines) + "\n")
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset)))
    assert "has no stop_command" in line and 'stop_command = "none"' in line
    assert not ssh_host.workdir.exists()
    # A stop command that cannot work there (the test host has no sudo): refused, and nothing of
    # ours is left on the host (no watchdog retrying it).
    toml.write_text("\n".join(lines) + '\nstop_command = "sudo shutdown -h now"\n')
    doctor = ssh_host.cli("doctor", "t4-box", "--json")
    row = next(r for r in json.loads(doctor.stdout) if r["check"] == "stop command")
    assert doctor.returncode == 1 and not row["ok"] and "sudo" in row["result"]
    line = one_line_error(ssh_host.cli("train", *FAST, "--data", str(dataset)))
    assert "uses sudo, which the host does not have" in line and "--keep-alive" in line
    assert not (ssh_host.workdir / "runs").exists() or not any((ssh_host.workdir / "runs").iterdir())
    # stop_command = "none": the box is the user's; it runs, with a warning, and is never stopped.
    toml.write_text("\n".join(lines) + '\nstop_command = "none"\n')
    proc = ssh_host.cli("train", *FAST, "--epochs", "1", "--data", str(dataset))
    assert proc.returncode == 0, proc.stderr
    assert "is never stopped (stop_command = none)" in proc.stdout
    assert ssh_host.power.up and not ssh_host.stop_marker.exists()

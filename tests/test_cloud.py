"""S3 data path, EC2 instances, budget and secrets: moto's server on 127.0.0.1 through boto3, and the
test bed's sshd + Docker engine as the machine."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
import torch

from tests.conftest import missing_test_bed, wait_for
from tests.conftest import testbed_env as bed_env

FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none"]
SECRET = "gpuRunTestSecret-8c1f0e4d9b7a"

pytestmark = pytest.mark.integration


@pytest.fixture
def moto(ssh_host, monkeypatch):
    url = bed_env().get("GPU_RUN_TEST_MOTO_URL")
    if not url:
        missing_test_bed("no moto server in .testbed/env")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=5)
    except OSError as e:
        missing_test_bed(f"moto server at {url} does not answer ({e})")
    creds = {"AWS_ACCESS_KEY_ID": "AKIATESTGPURUN", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    ssh_host.cli.env.update(creds)
    return url


def s3(url):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


def use_s3(ssh_host, url, grace_s=8):
    """S3 as the data path. The grace leaves time to look at the watchdog after its upload (a read
    of /proc, within a second); a longer one only makes the test wait for it to end."""
    s3(url).create_bucket(Bucket="thesis")
    ssh_host.write_config(grace_s=grace_s, extra=f'sync = "s3"\nbucket = "thesis"\nprefix = "gpu-run"\ns3_endpoint_url = "{url}"\n')


def test_s3_path_end_to_end_and_no_secret_left_anywhere(ssh_host, moto, dataset, gpu_run_home, docker_client):
    use_s3(ssh_host, moto)
    first = ssh_host.cli("train", "--host", "t4-box", *FAST, "--epochs", "1", "--data", str(dataset), "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["status"] == "succeeded"
    n = len(list(dataset.rglob("*.jpg")))
    keys = [o["Key"] for o in s3(moto).list_objects_v2(Bucket="thesis", Prefix="gpu-run/datasets/")["Contents"]]
    assert len([k for k in keys if k.endswith(".jpg")]) == n
    # The watchdog uploaded the outputs before stopping the host.
    run_keys = {o["Key"] for o in s3(moto).list_objects_v2(Bucket="thesis", Prefix=f"gpu-run/runs/{summary['run_id']}/")["Contents"]}
    assert f"gpu-run/runs/{summary['run_id']}/checkpoints/last.pth" in run_keys
    assert ssh_host.stop_marker.exists()

    # Unchanged dataset: nothing goes up, and the host fetches nothing.
    ssh_host.start_machine()
    again = ssh_host.cli("train", "--host", "t4-box", *FAST, "--epochs", "1", "--data", str(dataset), "--detach")
    assert again.returncode == 0, again.stderr
    assert "0 file(s) uploaded" in again.stdout and "fetched 0 of" in again.stdout
    run_id = again.stdout.split("gpu-run attach ")[-1].split()[0]
    remote_out = ssh_host.remote_run_dir(run_id)
    # Wait until the watchdog has uploaded, then make the host unreachable: pull comes from S3.
    wait_for((remote_out / "uploaded").exists, 180, "the watchdog's upload")
    # The host got short-lived keys from STS, never the laptop's: look at what its processes hold.
    host_envs = host_process_environments(remote_out)
    assert host_envs, "no process of the run (the watchdog) on the host"
    for env in host_envs:
        assert SECRET not in "\0".join(env.values())
    given = [env for env in host_envs if "AWS_ACCESS_KEY_ID" in env]
    assert given and all(env["AWS_ACCESS_KEY_ID"] != "AKIATESTGPURUN" and env.get("AWS_SESSION_TOKEN") for env in given)
    ssh_host.write_ssh_config(user="root", key=ssh_host.key, port=1)
    pulled = ssh_host.cli("pull", run_id, "--json")
    assert pulled.returncode == 0, pulled.stderr
    result = json.loads(pulled.stdout)
    assert result["status"] == "succeeded" and result["pulled_from"] == "s3"
    local = Path(result["run_dir"])
    assert (local / "checkpoints" / "last.pth").read_bytes() == (remote_out / "out" / "checkpoints" / "last.pth").read_bytes()
    assert torch.load(local / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1

    # The secret key is in no image history, container log, ledger row or file on the host.
    secret = SECRET.encode()
    for tag in {summary["image_tag"]}:
        history = subprocess.run(["docker", "history", "--no-trunc", tag], capture_output=True).stdout
        inspect = subprocess.run(["docker", "image", "inspect", tag], capture_output=True).stdout
        assert secret not in history and secret not in inspect
    for path in [*ssh_host.workdir.rglob("*"), *gpu_run_home.rglob("*"), *(ssh_host.work / "runs").rglob("*")]:
        if path.is_file():
            assert secret not in path.read_bytes(), path
    db = sqlite3.connect(gpu_run_home / "runs.db")
    rows = db.execute("SELECT * FROM runs").fetchall() + db.execute("SELECT * FROM phases").fetchall()
    assert rows and SECRET not in repr(rows)
    assert SECRET not in first.stdout + first.stderr + again.stdout + again.stderr


def host_process_environments(run_dir: Path) -> list[dict[str, str]]:
    """The environment of every process on the host (this machine) whose command line names the run's folder."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or str(run_dir).encode() not in (proc / "cmdline").read_bytes():
                continue
            raw = (proc / "environ").read_bytes()
        except OSError:
            continue
        out.append(dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item))
    return out


def make_instance(url: str) -> str:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    iid = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="g4dn.xlarge")["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[iid])
    return iid


def instance_state(url: str, iid: str) -> str:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1")
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]


def use_ec2(ssh_host, url: str, iid: str) -> None:
    ssh_host.write_config(extra=(
        f'\n[hosts.g4]\nprovider = "aws"\ninstance_id = "{iid}"\nregion = "us-east-1"\ninstance_type = "g4dn.xlarge"\n'
        f'endpoint_url = "{url}"\nssh = "t4-box"\nworkdir = "{ssh_host.workdir}"\ngrace_s = 3\n'
        f'stop_command = "date +%s > {ssh_host.stop_marker}"\n'
    ))


def test_ec2_instance_started_used_and_stopped(ssh_host, moto, dataset):
    iid = make_instance(moto)
    use_ec2(ssh_host, moto, iid)
    proc = ssh_host.cli("train", "--host", "g4", *FAST, "--epochs", "1", "--data", str(dataset), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "succeeded"
    assert instance_state(moto, iid) == "stopped"
    # A short run bills EC2's 60 s minimum: 0.526 USD/h x 60 s = 0.00877 -> 0.01.
    assert summary["cost"] == {"amount": 0.01, "currency": "USD", "billed_s": 60}
    costs = ssh_host.cli.json("cost")
    assert [r["run_id"] for r in costs["runs"]] == [summary["run_id"]]
    assert costs["per_host"] == [{"host": "g4", "currency": "USD", "runs": 1, "amount": 0.01}]
    assert costs["runs"][0]["idle_after_job_s"] >= 0 and costs["runs"][0]["cloud"]


def test_ec2_client_killed_then_stop_host(ssh_host, moto, dataset, cleanup):
    iid = make_instance(moto)
    use_ec2(ssh_host, moto, iid)
    # moto's stop cannot end the test bed's container: the test removes it, however it ends.
    runs = ssh_host.workdir / "runs"
    cleanup.container(lambda: [f"gpu-run-{p.name}" for p in runs.iterdir()] if runs.is_dir() else [])
    proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "train", "--host", "g4", *FAST, "--image-size", "64",
                             "--epochs", "30", "--data", str(dataset)],
                            cwd=ssh_host.work, env=ssh_host.cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: list((ssh_host.workdir / "runs").glob("*/out/metrics.jsonl")), 120, "the first epoch")
    assert instance_state(moto, iid) == "running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = ssh_host.cli.json("stop", "g4")
    assert out["state"] == "stopped" and instance_state(moto, iid) == "stopped"


def test_tiny_budget_is_stopped_by_the_watchdog_with_a_resumable_checkpoint(ssh_host, dataset, fault_row):
    # 3600 CNY an hour = 1 CNY a second: a 50 CNY budget buys 50 s, just over the 48 s that
    # stopping safely needs here (grace 3 + stop timeout 5 + margin 10 + 30), and the job wants far more.
    budget = 50
    ssh_host.write_config(grace_s=3, extra="")
    text = (ssh_host.work / "gpu-run.toml").read_text().replace("price_per_hour = 0.8", "price_per_hour = 3600")
    (ssh_host.work / "gpu-run.toml").write_text(text)
    proc = ssh_host.cli("train", "--host", "t4-box", *FAST, "--image-size", "64", "--epochs", "200",
                        "--budget", str(budget), "--stop-timeout", "5", "--data", str(dataset), "--json")
    summary = json.loads(proc.stdout)
    assert summary["status"] == "stopped" and summary["exit_code"] == 75, proc.stderr
    assert summary["watchdog"]["outcome"] == "max_runtime"
    assert summary["cost"]["amount"] <= budget and summary["cost"]["currency"] == "CNY"
    last = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.pth", weights_only=True)
    assert last["epoch"] + (last["step"] > 0) >= 1  # there is progress to resume from
    assert ssh_host.stop_marker.exists()
    assert summary["stop"]["ok"] and not ssh_host.power.up
    status = dict(kv.split("=") for kv in (ssh_host.remote_run_dir(summary["run_id"]) / "status").read_text().split())
    fault_row("budget reached mid-epoch", 0, 0, int(ssh_host.stop_marker.read_text()) - int(status["ended_at"]),
              summary["cost"]["amount"] <= budget)


def test_over_budget_estimate_is_refused_before_anything_starts(ssh_host, dataset):
    proc = ssh_host.cli("train", "--host", "t4-box", *FAST, "--epochs", "10", "--epoch-time", "600",
                        "--budget", "1", "--data", str(dataset))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is over the budget of 1.0 CNY" in lines[0] and "--force" in lines[0]
    assert not ssh_host.workdir.exists() and not (ssh_host.work / "runs").exists()


def test_setup_failure_never_leaves_the_instance_running(ssh_host, moto, dataset):
    iid = make_instance(moto)
    use_ec2(ssh_host, moto, iid)
    toml = ssh_host.work / "gpu-run.toml"
    # S3 data path to a bucket that does not exist: the sync fails after the instance started.
    toml.write_text(toml.read_text() + f'sync = "s3"\nbucket = "no-such-bucket"\ns3_endpoint_url = "{moto}"\n')
    proc = ssh_host.cli("train", "--host", "g4", *FAST, "--epochs", "1", "--data", str(dataset))
    assert proc.returncode != 0
    assert "NoSuchBucket" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "instance " + iid + " stopped" in proc.stdout
    assert instance_state(moto, iid) == "stopped"
    runs = ssh_host.cli.json("runs")
    assert runs[0]["status"] == "failed"

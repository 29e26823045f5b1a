"""--weights imagenet without the internet on the host: the laptop finds (or fetches once) torchvision's
file, the trainer loads it before the new head, and an SSH host gets it once, content-addressed.

The tests cannot download: a fake weights file, made with torchvision's own resnet18 and given the
exact name torchvision's URL has, is placed in the laptop's cache (GPU_RUN_HOME is per test)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

from gpu_run import weights as W
from gpu_run.errors import BackendError, ConfigError
from gpu_run.remote import Result
from tests.conftest import events, trainer

FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1"]
NO_ENGINE = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
RESNET18 = "resnet18-f37072fd.pth"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """The user's own torch hub cache, empty: only what a test puts in gpu-run's cache is there."""
    path = tmp_path / "user-torch-home"
    path.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(path))
    return path


@pytest.fixture
def fake_imagenet(gpu_run_home, empty_torch_home) -> Path:
    """A full resnet18 state_dict (1000-class head) where gpu-run's cache keeps torchvision's file."""
    path = W.cache_file(RESNET18)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(123)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def weights_events(log: str) -> list[dict]:
    return [e for e in events(log) if e["event"] == "weights"]


# Resolution on the laptop ------------------------------------------------------------------------


@pytest.mark.parametrize("model, name", [("resnet18", RESNET18), ("mobilenet_v3_small", "mobilenet_v3_small-047dcff4.pth")])
def test_imagenet_file_name_is_torchvisions(model, name):
    assert W.imagenet_file_name(model) == name
    assert W.imagenet_url(model) == torchvision.models.get_model_weights(model).DEFAULT.url


def test_cache_lookup_ours_then_the_users_hub(gpu_run_home, empty_torch_home):
    ours = W.cache_file(RESNET18)
    assert ours == gpu_run_home / "torch-cache" / "hub" / "checkpoints" / RESNET18
    users = empty_torch_home / "hub" / "checkpoints" / RESNET18
    users.parent.mkdir(parents=True)
    users.write_bytes(b"the user's copy")
    assert W.imagenet_weights("resnet18") == users  # an existing file in torch.hub.get_dir() is used as is
    ours.parent.mkdir(parents=True, exist_ok=True)
    ours.write_bytes(b"gpu-run's copy")
    found = W.resolve_weights("imagenet", "resnet18")
    assert found.path == ours and found.source == "imagenet" and found.sha256 == sha(ours)
    assert found.record()["file"] == RESNET18
    assert W.resolve_weights("none", "resnet18").path is None
    assert W.resolve_weights("imagenet", "resnet18", resuming=True).path is None  # last.pth decides


def test_model_without_torchvision_weights_is_one_line(monkeypatch):
    from gpu_run.model_zoo import IMAGENET_WEIGHTS

    monkeypatch.setitem(IMAGENET_WEIGHTS, "resnet18", None)  # as for a model torchvision ships no weights of
    with pytest.raises(ConfigError) as e:
        W.check_weights("imagenet", "resnet18")
    assert str(e.value) == ("--weights imagenet: torchvision has no pretrained weights for resnet18; "
                            "use --weights none or a .pth file")
    W.check_weights("none", "resnet18")  # none never needs them


def test_failed_download_is_one_line_and_leaves_nothing(tmp_path):
    dest = tmp_path / "hub" / "checkpoints" / RESNET18
    with pytest.raises(ConfigError) as e:
        W.download("http://127.0.0.1:9/models/" + RESNET18, dest)  # nothing listens on port 9
    message = str(e.value)
    assert message.startswith(f"cannot download http://127.0.0.1:9/models/{RESNET18} (")
    assert message.endswith(f"; place the file at {dest} or use --weights none") and "\n" not in message
    assert list(dest.parent.iterdir()) == []  # no partial file under any name


# Staging on a host (a shell on this machine stands in for the SSH one) ---------------------------


class ShellRemote:
    """Remote.run's contract, run by a local shell; cut_uploads sends only half of each upload."""

    class target:
        alias = "box"

    def __init__(self):
        self.uploads = 0
        self.cut_uploads = False

    def run(self, command, input=None, check=True, timeout_s=None):
        if input is not None:
            self.uploads += 1
            if self.cut_uploads:
                input = input[: len(input) // 2]
        proc = subprocess.run(command, input=input or b"", capture_output=True, timeout=timeout_s)
        result = Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        if check and result.code:
            raise BackendError(result.stderr)
        return result


class Notes:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)

    def spinner(self, message):
        self.lines.append(message)
        from contextlib import nullcontext

        return nullcontext()


def test_stage_weights_once_by_content_and_never_half(tmp_path):
    local = tmp_path / RESNET18
    local.write_bytes(b"weights" * 100_000)
    workdir = tmp_path / "host-workdir"
    remote, ui = ShellRemote(), Notes()

    path = W.stage_weights(remote, str(workdir), local, ui)
    assert path == f"{workdir}/weights/{sha(local)}.pth"
    assert sha(Path(path)) == sha(local) and remote.uploads == 1
    again = W.stage_weights(remote, str(workdir), local, ui)
    assert again == path and remote.uploads == 1  # nothing sent the second time
    assert ui.lines[-1] == f"weights already on box ({RESNET18})"

    # A damaged copy on the host (same size, other bytes) is replaced, not trusted.
    Path(path).write_bytes(b"x" * local.stat().st_size)
    assert W.stage_weights(remote, str(workdir), local) == path and sha(Path(path)) == sha(local)

    # An upload cut short leaves neither the file nor its temp name behind.
    other = tmp_path / "other.pth"
    other.write_bytes(b"other" * 100_000)
    remote.cut_uploads = True
    with pytest.raises(BackendError, match="could not put the weights file other.pth on box"):
        W.stage_weights(remote, str(workdir), other)
    assert sorted(p.name for p in (workdir / "weights").iterdir()) == [f"{sha(local)}.pth"]


# The trainer ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_never_downloads_imagenet(dataset, tmp_path):
    proc = trainer("--data", str(dataset), "--out", str(tmp_path / "out"), "--weights", "imagenet", *FAST)
    assert proc.returncode != 0
    [error] = [e for e in events(proc.stdout) if e["event"] == "error"]
    assert "--weights imagenet needs the weights file" in error["message"] and "--weights PATH" in error["message"]
    assert not list((tmp_path / "out").rglob("*.pth"))  # nothing trained, nothing fetched


@pytest.mark.slow
def test_trainer_refuses_a_file_for_another_model(dataset, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), wrong)
    proc = trainer("--data", str(dataset), "--out", str(tmp_path / "out"), "--weights", str(wrong), *FAST)
    [error] = [e for e in events(proc.stdout) if e["event"] == "error"]
    assert proc.returncode != 0 and "has no weights that fit ResNet" in error["message"]


# End to end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", [pytest.param("docker", marks=pytest.mark.integration),
                                    pytest.param("process", marks=pytest.mark.slow)])
def test_imagenet_is_the_default_and_loads_on_the_local_host(engine, cli, dataset, fake_imagenet, empty_torch_home):
    env = {"TORCH_HOME": str(empty_torch_home), **(NO_ENGINE if engine == "process" else {})}
    proc = cli("train", "--host", "local", *FAST, "--data", str(dataset), env=env, check=True)  # no --weights
    summary = json.loads(next((cli.cwd / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "succeeded" and summary["backend"] == engine
    assert summary["weights"]["source"] == "imagenet" and summary["weights"]["file"] == RESNET18
    assert summary["weights"]["sha256"] == sha(fake_imagenet)
    assert f"weights: imagenet ({fake_imagenet})" in proc.stdout
    run_dir = Path(summary["run_dir"])
    [event] = weights_events((run_dir / "train.log").read_text())
    assert event["source"] == "imagenet" and event["file"] == RESNET18 and event["not_loaded"] == []
    # The backbone started from the file (one short epoch moves it only a little), the head is new.
    fake = torch.load(fake_imagenet, weights_only=True)
    trained = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["model"]
    torch.manual_seed(0)
    fresh = torchvision.models.resnet18(weights=None).state_dict()
    to_file = (trained["conv1.weight"] - fake["conv1.weight"]).abs().mean()
    to_fresh_init = (trained["conv1.weight"] - fresh["conv1.weight"]).abs().mean()
    assert to_file < 0.5 * to_fresh_init, (to_file, to_fresh_init)
    assert trained["fc.weight"].shape == (len(summary["classes"]), 512)


@pytest.mark.integration
def test_imagenet_weights_go_to_an_ssh_host_once(ssh_host, dataset, fake_imagenet, empty_torch_home):
    env = {"TORCH_HOME": str(empty_torch_home)}
    digest = sha(fake_imagenet)
    remote_file = ssh_host.workdir / "weights" / f"{digest}.pth"

    first = ssh_host.cli("train", "--host", "t4-box", *FAST, "--data", str(dataset), env=env, check=True)
    assert f"uploaded weights {RESNET18} to t4-box" in first.stdout
    assert sha(remote_file) == digest
    summary = json.loads(next(ssh_host.work.glob("runs/*/summary.json")).read_text())
    assert summary["status"] == "succeeded" and summary["weights"]["file"] == RESNET18
    [event] = weights_events((Path(summary["run_dir"]) / "train.log").read_text())
    assert event["file"] == f"{digest}.pth" and event["not_loaded"] == []
    stamp = remote_file.stat().st_mtime_ns

    ssh_host.start_machine()  # the first run's end stopped it
    second = ssh_host.cli("train", "--host", "t4-box", *FAST, "--data", str(dataset), env=env, check=True)
    out = second.stdout + second.stderr
    assert f"weights already on t4-box ({RESNET18})" in out and "uploaded weights" not in out
    assert remote_file.stat().st_mtime_ns == stamp
    assert [p.name for p in remote_file.parent.iterdir()] == [remote_file.name]  # no temp names left
    runs = sorted(ssh_host.work.glob("runs/*/train.log"))
    assert len(runs) == 2 and all(weights_events(p.read_text())[0]["file"] == f"{digest}.pth" for p in runs)


def test_no_cached_file_and_no_network_fails_before_anything_starts(cli, dataset, gpu_run_home, empty_torch_home):
    # No internet in the test bed; the proxy makes that certain even where there is some.
    env = {"TORCH_HOME": str(empty_torch_home), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = cli("train", "--host", "local", *FAST, "--data", str(dataset), env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    dest = gpu_run_home / "torch-cache" / "hub" / "checkpoints" / RESNET18
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot download https://download.pytorch.org/models/{RESNET18}")
    assert lines[0].endswith(f"place the file at {dest} or use --weights none")
    assert not (cli.cwd / "runs").exists()
    db = gpu_run_home / "runs.db"
    assert not db.exists() or sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0

"""The user's own command as the job (`gpu-run train --host H --data D -- python train.py ...`), on
the real test bed: the SSH host with Docker, a container instance (its own Python), and `local`.
The script is written the way a tutorial writes one; it runs unchanged on each runtime, what it
writes comes back, the machine stops once, and the run is costed."""

from __future__ import annotations

import json
import subprocess
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from tests.conftest import wait_for
from tests.test_instance import REMOTE_RUNS, Instance

TUTORIAL = textwrap.dedent('''
    import argparse, os
    import torch
    from torch import nn
    from torchvision import datasets, models, transforms

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data_dir", default="./gender_dataset")
    args = parser.parse_args()

    tf = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    train_set = datasets.ImageFolder(os.path.join(args.data_dir, "train"), tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    model = models.resnet18(weights=None, num_classes=len(train_set.classes))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for epoch in range(args.epochs):
        for images, labels in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1} loss {loss.item():.4f}", flush=True)
    torch.save(model.state_dict(), "gender_model.pth")
    print("saved", len(train_set), "images", os.environ["GPU_RUN_DATA"], flush=True)
''')

# Trains "epochs" that take a second each, saves checkpoint.pth on SIGTERM, resumes from it.
RESUMABLE = textwrap.dedent('''
    import argparse, os, signal, sys, time
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--resume", default="")
    args = parser.parse_args()
    start = 0
    if args.resume:
        start = torch.load(args.resume)["epoch"]
        print("resumed at epoch", start, flush=True)
    stopping = False
    def on_term(signum, frame):
        global stopping
        stopping = True
    signal.signal(signal.SIGTERM, on_term)
    for epoch in range(start, args.epochs):
        time.sleep(1)
        torch.save({"epoch": epoch + 1}, "checkpoint.pth")
        print("epoch", epoch + 1, flush=True)
        if stopping:
            print("stopping on SIGTERM", flush=True)
            sys.exit(0)
    print("finished at epoch", args.epochs, flush=True)
''')


@pytest.fixture
def autodl(tmp_path, gpu_run_home, cleanup) -> Instance:
    """A container instance (the AutoDL look-alike of tests/test_instance.py) as host `autodl`."""
    inst = Instance(tmp_path, gpu_run_home)
    cleanup.container(inst.name)
    inst.start()
    return inst


def make_project(work: Path, dataset: Path, script: str = TUTORIAL) -> None:
    """A student's folder: train.py, a README, a .gitignore, and the dataset inside it."""
    (work / "train.py").write_text(script)
    (work / "README.md").write_text("my thesis\n")
    (work / ".gitignore").write_text("scratch/\n")
    (work / "scratch").mkdir()
    (work / "scratch" / "big.bin").write_bytes(b"\0" * 1000)
    if not (work / "gender_dataset").exists():
        subprocess.run(["cp", "-r", str(dataset), str(work / "gender_dataset")], check=True)


def train_json(cli, *args: str) -> dict:
    """`gpu-run train ... --json -- COMMAND`: --json must come before the `--` (after it, it is
    the command's own argument)."""
    cut = args.index("--")
    proc = cli("train", *args[:cut], "--json", *args[cut:])
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def tutorial_command(epochs: int = 1) -> list[str]:
    return ["--data", "./gender_dataset", "--", "python", "train.py", "--batch_size", "16", "--epochs", str(epochs),
            "--data_dir", "./gender_dataset"]


@pytest.mark.integration
def test_tutorial_script_on_the_ssh_host(ssh_host, dataset, gpu_run_home):
    make_project(ssh_host.work, dataset)
    proc = ssh_host.cli("train", "--host", "t4-box", "--json", *tutorial_command())
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "succeeded" and summary["job"] == {"kind": "command", "command": [
        "python", "train.py", "--batch_size", "16", "--epochs", "1", "--data_dir", "./gender_dataset"]}
    run_dir = Path(summary["run_dir"])
    # The state_dict the script saved in its working directory came back, identical, and loads.
    remote_work = ssh_host.remote_run_dir(summary["run_id"]) / "work"
    pulled = run_dir / "work" / "gender_model.pth"
    assert pulled.read_bytes() == (remote_work / "gender_model.pth").read_bytes()
    state = torch.load(pulled, weights_only=True)
    assert state["fc.weight"].shape == (2, 512)
    # Only what the job wrote came back: not the code that was sent, not the ignored folder.
    assert sorted(p.name for p in (run_dir / "work").iterdir()) == ["gender_model.pth"]
    assert not (remote_work / "scratch").exists()
    log = (run_dir / "train.log").read_text()
    assert "epoch 1 loss" in log and "saved 80 images /work/gender_dataset" in log
    # The dataset is on the host once, under the data folder, and not again as code.
    assert len(list((ssh_host.workdir / "data").iterdir())) == 1
    assert not any((ssh_host.workdir / "code").glob("*/gender_dataset"))
    # The machine stopped once, and the run is costed in the ledger.
    assert summary["stop"]["ok"] and summary["stop"]["state"] == "stopped"
    assert len(ssh_host.stop_marker.read_text().split()) == 1
    assert summary["cost"]["currency"] == "CNY" and summary["cost"]["billed_s"] >= 1
    listed = ssh_host.cli.json("runs")
    assert any(r["run_id"] == summary["run_id"] and r["status"] == "succeeded" for r in listed)
    # A second run with nothing changed sends no data and no code.
    ssh_host.start_machine()
    again = ssh_host.cli("train", "--host", "t4-box", *tutorial_command(), check=True)
    assert "dataset synced: 0 file(s)" in again.stdout and "project synced: 0 file(s)" in again.stdout
    # Each run worked in its own copy: the first run's model is not in the second's directory.
    second = json.loads(ssh_host.cli("runs", "--json", check=True).stdout)[0]["run_id"]
    assert second != summary["run_id"]


@pytest.mark.integration
def test_stop_and_resume_a_script_on_the_instance(autodl, dataset):
    instance = autodl
    make_project(instance.work, dataset, RESUMABLE)
    command = ["--", "python", "train.py", "--epochs", "60"]
    started = train_json(instance.cli, "--host", "autodl", "--detach", *command)
    run_id = started["run_id"]
    wait_for(lambda: instance.exists(f"{REMOTE_RUNS}/{run_id}/work/checkpoint.pth"), 120, "the first epoch")
    stopped = instance.cli.json("stop", run_id)
    assert stopped["status"] == "stopped" and stopped["stop"]["ok"]
    assert not instance.running()
    saved = torch.load(Path(stopped["run_dir"]) / "work" / "checkpoint.pth", weights_only=True)["epoch"]
    assert 1 <= saved < 60
    assert "stopping on SIGTERM" in (Path(stopped["run_dir"]) / "train.log").read_text()
    # --resume puts the stopped run's files into the new working directory, where the script looks.
    instance.start_again()
    resumed = train_json(instance.cli, "--host", "autodl", "--resume", run_id, "--", "python", "train.py",
                         "--epochs", str(saved + 2), "--resume", "checkpoint.pth")
    assert resumed["status"] == "succeeded" and resumed["resumed_from"] == run_id
    log = (Path(resumed["run_dir"]) / "train.log").read_text()
    assert f"resumed at epoch {saved}" in log and f"finished at epoch {saved + 2}" in log
    again = torch.load(Path(resumed["run_dir"]) / "work" / "checkpoint.pth", weights_only=True)
    assert again["epoch"] == saved + 2
    assert not instance.running() and resumed["stop"]["ok"]


PROGRESS_BAR = textwrap.dedent('''
    import os, sys, time
    for i in range(0, 101, 5):
        sys.stderr.write(f"\\rtraining {i}%|" + "#" * (i // 10))
        sys.stderr.flush()
        time.sleep(0.01)
    sys.stderr.write("\\n")
    # A hostile host's bytes: clipboard write, title, hyperlink, clear screen.
    print("\\x1b]52;c;cHduZWQ=\\x07\\x1b]0;owned\\x07\\x1b]8;;http://evil\\x1b\\\\link\\x1b]8;;\\x1b\\\\\\x1b[2Jdone", flush=True)
    open(os.path.join(os.environ["GPU_RUN_OUTPUT"], "note.txt"), "w").write("from the output folder")
    open(os.path.join(os.environ["GPU_RUN_OUTPUT"], "summary.json"), "w").write("{}")
''')


@pytest.mark.integration
def test_progress_bar_and_escape_sequences_on_local(cli, docker_client, dataset):
    (cli.cwd / "bar.py").write_text(PROGRESS_BAR)
    proc = cli("train", "--host", "local", "--", "python", "bar.py")
    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "\x1b]" not in stream and "\x1b[2J" not in stream and "\x07" not in stream
    run_id = json.loads(cli("runs", "--json", check=True).stdout)[0]["run_id"]
    run_dir = cli.cwd / "runs" / run_id
    assert (run_dir / "note.txt").read_text() == "from the output folder"
    # The laptop's own summary.json, never the job's.
    assert json.loads((run_dir / "summary.json").read_text())["run_id"] == run_id
    logs = cli("logs", run_id, check=True).stdout
    assert "\x1b" not in logs and "\x07" not in logs
    bar_lines = [line for line in logs.splitlines() if "training" in line]
    assert bar_lines == ["training 100%|##########"]  # one line, as a terminal shows the finished bar
    assert "linkdone" in logs


@pytest.mark.integration
def test_failing_script_is_failed_and_the_machine_still_stops(ssh_host):
    (ssh_host.work / "train.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    proc = ssh_host.cli("train", "--host", "t4-box", "--json", "--", "python", "train.py")
    assert proc.returncode == 1
    summary = json.loads(proc.stdout)
    assert summary["status"] == "failed" and summary["exit_code"] == 3
    assert summary["stop"]["ok"] and ssh_host.stop_marker.exists()


# Bad input: one line, before anything starts, nothing left behind ------------------------------

@pytest.mark.parametrize("args, message", [
    (["--"], "nothing after --"),
    (["--model", "resnet50", "--", "python", "train.py"], "--model is an option of the built-in trainer"),
    (["--epochs", "3", "--", "python", "train.py"], "--epochs is an option of the built-in trainer"),
    (["--", "python", "missing.py"], "missing.py is not in the project folder"),
    (["--data", ".", "--", "python", "train.py"], "is the project folder itself"),
    (["python", "train.py"], "put your own command after --"),
])
def test_bad_command_is_refused_in_one_line(cli, args, message):
    (cli.cwd / "train.py").write_text("print('hi')\n")
    proc = cli("train", "--host", "local", *args)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (cli.cwd / "runs").exists()


def test_dataset_with_a_symlink_loop_is_refused_before_the_run(cli, tmp_path):
    (cli.cwd / "train.py").write_text("print('hi')\n")
    data = tmp_path / "loopy"
    data.mkdir()
    (data / "loop").symlink_to(data / "loop")
    proc = cli("train", "--host", "local", "--data", str(data), "--", "python", "train.py")
    assert proc.returncode != 0 and "symlink loop" in proc.stderr and "Traceback" not in proc.stderr
    assert not (cli.cwd / "runs").exists()


def test_a_project_too_big_names_its_biggest_folders(cli):
    (cli.cwd / "train.py").write_text("print('hi')\n")
    images = cli.cwd / "photos"
    images.mkdir()
    with open(images / "all.bin", "wb") as f:
        f.truncate(301 * 1000 * 1000)  # sparse: no disk used
    proc = cli("train", "--host", "local", "--", "python", "train.py")
    assert proc.returncode != 0 and "did you mean --data?" in proc.stderr and "photos/ 301 MB" in proc.stderr
    assert not (cli.cwd / "runs").exists()


def test_the_command_runs_through_the_python_api_signature():
    """gpu_run's command line parses `--` the way a shell passes it (no shell in between)."""
    from gpu_run.backends.base import Job, command_argv

    job = Job(run_id="r", trainer_args=[], data_dir="", out_dir="", command=["python3", "train.py", "--x", "1"])
    assert command_argv("/opt/conda/bin/python", job) == ["/opt/conda/bin/python", "train.py", "--x", "1"]
    job.gpus = 2
    argv = command_argv("/opt/conda/bin/python", job)
    assert argv[:2] == ["/opt/conda/bin/python", "-c"] and argv[3:] == ["--standalone", "--nproc_per_node=2",
                                                                        "train.py", "--x", "1"]
    job.command = ["bash", "run.sh"]
    assert command_argv("/opt/conda/bin/python", job) == ["bash", "run.sh"]


@pytest.mark.integration
def test_python_api_as_a_notebook_calls_it(tmp_path, gpu_run_home, docker_client, monkeypatch):
    import gpu_run

    project = tmp_path / "thesis"
    project.mkdir()
    (project / "train.py").write_text("import os\nopen('model.txt', 'w').write(os.environ['GPU_RUN_RUN_ID'])\n")
    monkeypatch.chdir(project)
    run = gpu_run.train(host="local", command=["python", "train.py"], quiet=True)
    assert run.status == "succeeded" and run.machine_stopped and run.cost == 0.0
    assert (run.outputs / "work" / "model.txt").read_text() == run.run_id
    assert run.summary["job"]["kind"] == "command"


def test_python_api_refuses_what_the_cli_refuses(gpu_run_home):
    import gpu_run
    from gpu_run.errors import GpuRunError

    with pytest.raises(GpuRunError, match="epochs= is an option of the built-in trainer"):
        gpu_run.train(command=["python", "train.py"], epochs=3)
    with pytest.raises(GpuRunError, match="no option 'epoch'"):
        gpu_run.train(data="x", epoch=3)
    with pytest.raises(GpuRunError, match="list of words"):
        gpu_run.train(command="python train.py")


HUB_SCRIPT = textwrap.dedent('''
    import torch
    from torchvision import models
    model = models.resnet18(weights="IMAGENET1K_V1")  # torch.hub's cache, no internet on the host
    torch.save(model.fc.bias.detach().clone(), "fc_bias.pt")
''')


@pytest.mark.integration
def test_hub_weights_are_in_torch_home_on_a_host_without_internet(ssh_host, gpu_run_home):
    from torchvision import models

    # The laptop's cache holds the file (as if downloaded once); a recognisable bias proves which.
    weights = models.resnet18(weights=None).state_dict()
    weights["fc.bias"] = torch.arange(1000, dtype=torch.float32)
    cached = gpu_run_home / "torch-cache" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(weights, cached)
    (ssh_host.work / "train.py").write_text(HUB_SCRIPT)
    summary = train_json(ssh_host.cli, "--host", "t4-box", "--hub-weights", "resnet18", "--", "python", "train.py")
    assert summary["status"] == "succeeded", (Path(summary["run_dir"]) / "train.log").read_text()
    bias = torch.load(Path(summary["run_dir"]) / "work" / "fc_bias.pt", weights_only=True)
    assert torch.equal(bias, torch.arange(1000, dtype=torch.float32))


def test_unknown_hub_weights_are_refused(cli):
    (cli.cwd / "train.py").write_text("print('hi')\n")
    proc = cli("train", "--host", "local", "--hub-weights", "resnet19", "--", "python", "train.py")
    assert proc.returncode != 0 and "--hub-weights resnet19" in proc.stderr and "Traceback" not in proc.stderr
    assert not (cli.cwd / "runs").exists()


SWEEP_SCRIPT = textwrap.dedent('''
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float)
    parser.add_argument("--tag")
    args = parser.parse_args()
    open("result.txt", "w").write(f"{args.lr} {args.tag}")
    print("trained with lr", args.lr, flush=True)
''')


@pytest.mark.integration
def test_sweep_of_a_script_fills_its_placeholders_on_one_machine(ssh_host, dataset, gpu_run_home):
    from tests.test_sweep import count_stops, stops

    counter = count_stops(ssh_host)
    make_project(ssh_host.work, dataset, SWEEP_SCRIPT)
    proc = ssh_host.cli("sweep", "--host", "t4-box", "--data", "./gender_dataset", "--set", "lr=0.1,0.2",
                        "--set", "tag=a,b", "--json", "--", "python", "train.py", "--lr", "{lr}", "--tag", "{tag}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [p["status"] for p in result["points"]] == ["succeeded"] * 4
    wrote = sorted((Path(ssh_host.cli.cwd) / "runs" / p["run_id"] / "work" / "result.txt").read_text()
                   for p in result["points"])
    assert wrote == ["0.1 a", "0.1 b", "0.2 a", "0.2 b"]
    # One sync of the data and the code for the four points, and one stop after the last.
    assert len(list((ssh_host.workdir / "data").iterdir())) == 1 and len(list((ssh_host.workdir / "code").iterdir())) == 1
    assert stops(counter) == 1 and result["stop"]["ok"]
    shares = sum(Decimal(str(p["cost"])) for p in result["points"])
    assert shares == Decimal(str(result["cost"]["amount"]))


@pytest.mark.parametrize("args, message", [
    (["--set", "lr=1,2", "--", "python", "train.py", "--lr", "1"], "the command has no {lr} to fill"),
    (["--set", "lr=1,2", "--", "python", "train.py", "--lr", "{lr}", "--bs", "{bs}"], "{bs} has no value"),
    (["--set", "lr=1,1", "--", "python", "train.py", "--lr", "{lr}"], "names a value twice"),
    (["--lr", "1,2", "--set", "lr=1,2", "--", "python", "train.py", "--lr", "{lr}"], "--lr is an option of the built-in"),
])
def test_bad_command_sweep_is_refused_in_one_line(cli, args, message):
    (cli.cwd / "train.py").write_text("print('hi')\n")
    proc = cli("sweep", "--host", "local", *args)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (cli.cwd / "runs").exists()


def make_wheel(folder: Path, name: str = "gpurunprobe", version: str = "0.1") -> Path:
    """A pure-Python wheel made here (no index, no build backend): what a student's
    requirements.txt names, as the laptop's package index would serve it."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


PACKAGES_SCRIPT = "import gpurunprobe, torch\nprint('probe', gpurunprobe.VERSION, 'torch', torch.__version__, flush=True)\n"


def laptop_index(tmp_path: Path) -> dict:
    """The laptop's package index: a folder with the wheel, and nothing from the internet."""
    make_wheel(tmp_path / "index")
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "index")}


@pytest.mark.integration
def test_requirements_are_installed_once_on_a_docker_host_without_internet(ssh_host, tmp_path):
    (ssh_host.work / "train.py").write_text(PACKAGES_SCRIPT)
    (ssh_host.work / "requirements.txt").write_text("torch>=2\ngpurunprobe==0.1\n")
    env = laptop_index(tmp_path)
    cut = ["--host", "t4-box", "--json", "--", "python", "train.py"]
    first = ssh_host.cli("train", *cut, env=env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert "probe 0.1 torch" in (Path(summary["run_dir"]) / "train.log").read_text()
    ssh_host.start_machine()
    again = ssh_host.cli("train", *cut[:-4], "--", "python", "train.py", env=env, check=True)
    assert "installed there already (nothing sent)" in again.stdout and "torch left out" in again.stdout


@pytest.mark.integration
def test_requirements_are_installed_once_on_a_container_instance(autodl, tmp_path):
    instance = autodl
    (instance.work / "train.py").write_text(PACKAGES_SCRIPT)
    (instance.work / "requirements.txt").write_text("gpurunprobe\n")
    env = laptop_index(tmp_path)
    first = instance.cli("train", "--host", "autodl", "--json", "--", "python", "train.py", env=env)
    assert first.returncode == 0, first.stderr
    assert "probe 0.1" in (Path(json.loads(first.stdout)["run_dir"]) / "train.log").read_text()
    instance.start_again()
    again = instance.cli("train", "--host", "autodl", "--", "python", "train.py", env=env, check=True)
    assert "installed there already (nothing sent)" in again.stdout


def test_requirements_the_laptop_cannot_resolve_are_one_line(cli, tmp_path, monkeypatch):
    from gpu_run.errors import ConfigError
    from gpu_run.packages import Requirements, download_wheels

    monkeypatch.setenv("GPU_RUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ConfigError, match="requirements.txt cannot be installed on the host .*no-such-package"):
        download_wheels(Requirements(["no-such-package==9"], []), "3.13", "linux-x86_64", tmp_path)


def test_requirements_leave_the_hosts_torch_alone(tmp_path):
    from gpu_run.packages import read_requirements

    (tmp_path / "requirements.txt").write_text("torch==2.5.1  # the CUDA build\ntorchvision\nnumpy>=1.24\n\n-f ./wheels\n")
    req = read_requirements(tmp_path)
    assert req is not None and req.lines == ["numpy>=1.24", "-f ./wheels"] and req.left_out == ["torch", "torchvision"]
    assert req.key("3.13", "linux-x86_64") != req.key("3.11", "linux-x86_64")


DDP_SCRIPT = textwrap.dedent('''
    import os
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR...
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    print(f"rank {rank} of {world}: sum {total.item():g}", flush=True)
    if rank == 0:
        with open(os.path.join(os.environ["GPU_RUN_OUTPUT"], "ddp.txt"), "w") as f:
            f.write(f"{world} {total.item():g}")
    dist.destroy_process_group()
''')


@pytest.mark.integration
def test_a_ddp_script_on_two_instances_through_torchrun(tmp_path, gpu_run_home, cleanup):
    from tests.test_multinode import Pair

    pair = Pair(tmp_path, gpu_run_home, cleanup)
    (pair.work / "ddp.py").write_text(DDP_SCRIPT)
    summary = train_json(pair.cli, "--host", "pair", "--", "python", "ddp.py")
    assert summary["status"] == "succeeded", summary
    assert (Path(summary["run_dir"]) / "ddp.txt").read_text() == "2 3"  # both ranks took part: 1 + 2
    assert summary["stop"]["ok"] and not any(pair.running().values())


def test_a_command_on_several_hosts_must_be_a_python_script(cli):
    (cli.cwd / "gpu-run.toml").write_text(
        '[hosts.a]\nssh = "a"\nstop_command = "none"\n[hosts.b]\nssh = "b"\nstop_command = "none"\n'
        '[groups.ab]\nhosts = ["a", "b"]\n')
    proc = cli("train", "--host", "ab", "--", "bash", "run.sh")
    assert proc.returncode != 0 and "must be `python SCRIPT ...`" in proc.stderr and "Traceback" not in proc.stderr


def test_every_node_is_given_the_address_the_others_reach_it_by():
    from gpu_run.multinode.network import Route
    from gpu_run.multinode.start import local_addr

    first = Route(address="10.0.0.5", interface="eth0", source="10.0.0.5")
    other = Route(address="10.0.0.5", interface="eth0", source="10.0.0.7")
    assert local_addr("box-a.example", 0, first) == "10.0.0.5"
    assert local_addr("box-a.example", 1, other) == "10.0.0.7"
    assert local_addr("127.0.0.1", 1, other) == "127.0.0.2"  # nodes on one machine: loopback of their own

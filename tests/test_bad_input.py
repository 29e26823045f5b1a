"""Bad input is refused before anything starts: one line naming the problem and the fix, a non-zero
exit, no traceback, and nothing left behind (no run folder, no ledger row). None of these needs
Docker or sshd: every refusal comes before a backend is touched."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import pytest
from rich.console import Console

from gpu_run.config import parse_hosts
from gpu_run.dataset import validate_dataset
from gpu_run.demo_data import make_dataset
from gpu_run.errors import BackendError, ConfigError, DatasetError
from gpu_run.ledger import Ledger, LedgerError, like_prefix
from gpu_run.remote import resolve_target
from gpu_run.ui import UI

AS_ROOT = os.geteuid() == 0


def refused(proc, *words: str) -> str:
    """The one stderr line of a clean refusal, after checking it has every word asked for."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def nothing_left(cli) -> None:
    assert not (cli.cwd / "runs").exists()
    assert cli.json("runs") == []


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ok", classes=2, train_per_class=3, val_per_class=2, size=16)


# 1-3. gpu-run.toml ----------------------------------------------------------------------------


@pytest.mark.parametrize("document, words", [
    ({"hosts": 1}, ["hosts", "[hosts.NAME]"]),
    ({"hosts": {"box": {"ssh": "b", "price_per_hour": float("nan")}}}, ["price_per_hour", "nan"]),
    ({"hosts": {"box": {"ssh": "b", "price_per_hour": float("inf")}}}, ["price_per_hour", "inf"]),
    ({"hosts": {"box": {"ssh": "b", "price_per_hour": True}}}, ["price_per_hour", "True"]),
    ({"hosts": {"box": {"ssh": "b", "grace_s": True}}}, ["grace_s", "True"]),
    ({"hosts": {"box": {"ssh": "b", "min_billed_s": False}}}, ["min_billed_s", "False"]),
    ({"hosts": {"box": {"ssh": "me@b:99999"}}}, ["port 99999", "1 to 65535"]),
    ({"hosts": {"box": {"ssh": "me@b:0"}}}, ["port 0"]),
    ({"hosts": {"box": {"ssh": "[::1]:70000"}}}, ["port 70000"]),
    ({"hosts": {"box": {"ssh": " "}}}, ["ssh is empty"]),
    ({"hosts": {"[/x]": {"ssh": "b"}}}, ["host name '[/x]'", "letters, digits"]),
])
def test_config_values_that_cannot_work_are_refused(document, words):
    with pytest.raises(ConfigError) as e:
        parse_hosts(document)
    for word in words:
        assert word in str(e.value)


def test_config_values_that_work_still_parse():
    hosts = parse_hosts({"hosts": {"box": {"ssh": "me@b:2222", "grace_s": 0, "price_per_hour": 1}}})
    assert (hosts["box"].ssh, hosts["box"].grace_s, hosts["box"].price_per_hour) == ("me@b:2222", 0, 1.0)
    assert parse_hosts({"hosts": {"alias": {"ssh": "t4-box"}}})["alias"].kind == "ssh"


def test_ssh_port_out_of_range_is_refused_when_resolving(tmp_path):
    with pytest.raises(BackendError, match="port 99999"):
        resolve_target("me@box:99999", ssh_config_path=tmp_path / "none")
    (tmp_path / "config").write_text("Host box\n  HostName 127.0.0.1\n  Port 70000\n")
    with pytest.raises(BackendError, match="port 70000"):
        resolve_target("box", ssh_config_path=tmp_path / "config")
    assert resolve_target("me@box:65535", ssh_config_path=tmp_path / "none").port == 65535


CONFIGS = {
    "hosts-not-a-table": (b"hosts = 1\n", ["hosts", "[hosts.NAME]"]),
    "utf-16": ('[hosts.box]\nssh = "b"\n'.encode("utf-16"), ["not UTF-8", "save it as UTF-8"]),
    "price-nan": (b'[hosts.box]\nssh = "b"\nprice_per_hour = nan\n', ["price_per_hour", "nan"]),
    "price-inf": (b'[hosts.box]\nssh = "b"\nprice_per_hour = inf\n', ["price_per_hour", "inf"]),
    "grace-bool": (b'[hosts.box]\nssh = "b"\ngrace_s = true\n', ["grace_s", "True"]),
    "port": (b'[hosts.box]\nssh = "me@b:99999"\n', ["port 99999"]),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_file_is_one_line(case, cli, small_data):
    content, words = CONFIGS[case]
    (cli.cwd / "gpu-run.toml").write_bytes(content)
    refused(cli("train", "--weights", "none", "--host", "box", "--data", str(small_data)), *words)
    (cli.cwd / "gpu-run.toml").unlink()
    nothing_left(cli)


def test_config_with_a_byte_order_mark_is_read(cli):
    (cli.cwd / "gpu-run.toml").write_bytes('[hosts.box]\nssh = "b"\n'.encode("utf-8-sig"))
    assert [h["name"] for h in cli.json("hosts")] == ["local", "box"]


# 2, 3, 6, 11. train's command-line values -----------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--budget", "nan"], ["--budget", "finite"]),
    (["--budget", "-1"], ["--budget", "0 (none) or more"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--max-hours", "nan"], ["--max-hours", "finite"]),
    (["--silence-minutes", "nan"], ["--silence-minutes", "finite"]),
    (["--gamma", "nan"], ["--gamma", "finite"]),
    (["--gamma", "0"], ["--gamma must be positive"]),
    (["--gamma", "-0.5"], ["--gamma must be positive"]),
    (["--step-size", "0"], ["--step-size must be at least 1"]),
    (["--epoch-time", "-3"], ["--epoch-time", "0 (none) or more"]),
    (["--epoch-time", "nan"], ["--epoch-time", "finite"]),
    (["--stop-timeout", "-5"], ["--stop-timeout must be between 1 and"]),
    (["--stop-timeout", "0"], ["--stop-timeout must be between 1 and"]),
    (["--workers", "-2"], ["--workers must be -1"]),
    (["--seed", "-1"], ["--seed must be between 0"]),
    (["--cache-size", "-1"], ["--cache-size must be 0"]),
])
def test_bad_train_values_are_refused(args, words, cli, small_data):
    refused(cli("train", "--weights", "none", "--data", str(small_data), *args), *words)
    nothing_left(cli)


def test_runs_dir_that_is_a_file_is_refused(cli, small_data):
    (cli.cwd / "afile").write_text("x")
    refused(cli("train", "--weights", "none", "--data", str(small_data), "--runs-dir", "afile"), "--runs-dir afile is a file")
    refused(cli("train", "--weights", "none", "--data", str(small_data), "--runs-dir", "afile/sub"), "afile is not a folder")
    assert cli.json("runs") == []


def locked_folder(path, request):
    """A folder nobody may write into: mode 0500, or for root (who writes anyway) a read-only mount."""
    path.mkdir(mode=0o500)
    if AS_ROOT:
        import subprocess

        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True)
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(path)]))
    return path


def test_runs_dir_that_is_not_writable_is_refused(cli, small_data, request):
    locked_folder(cli.cwd / "locked", request)
    refused(cli("train", "--weights", "none", "--data", str(small_data), "--runs-dir", "locked/runs"), "is not writable")
    nothing_left(cli)


def test_trainer_refuses_values_that_would_fail_mid_run():
    from gpu_run.trainer.train import get_args_parser

    parser = get_args_parser()
    base = ["--data", "d", "--out", "o"]
    for args in (["--step-size", "0"], ["--gamma", "nan"], ["--gamma", "0"], ["--gamma", "-1"], ["--lr", "inf"],
                 ["--lr", "0"], ["--epochs", "0"], ["--workers", "-2"], ["--log-every", "0"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(base + args)
        assert e.value.code == 2, args
    args = parser.parse_args(base + ["--gamma", "2", "--step-size", "1", "--workers", "-1"])
    assert (args.gamma, args.step_size, args.workers) == (2.0, 1, -1)


# 4. rich markup in user text ------------------------------------------------------------------


def test_brackets_in_a_host_name_are_printed_not_parsed(cli, small_data):
    line = refused(cli("train", "--weights", "none", "--host", "[/x]", "--data", str(small_data)), "unknown host '[/x]'", "[hosts.[/x]]")
    assert "MarkupError" not in line
    line = refused(cli("train", "--weights", "none", "--host", "t4-box", "--data", str(small_data)))
    assert "add [hosts.t4-box]" in line  # was eaten as a style tag
    nothing_left(cli)


def test_ui_warn_and_error_escape_markup(capsys):
    buffer = io.StringIO()
    ui = UI(console=Console(file=buffer, highlight=False, width=200))
    ui.warn("host [/x] and [bold]text[/bold]")
    assert buffer.getvalue().strip() == "warning: host [/x] and [bold]text[/bold]"
    ui.error("bad [hosts.a] [/red]")
    assert capsys.readouterr().err.strip() == "error: bad [hosts.a] [/red]"
    with ui.spinner("building on [/x]") as status:
        status.update("step [internal] [/y]")  # a docker build log line
    with ui.progress("checking [/z]", total=1) as update:
        update(completed=1)
    assert "checking [/z]" in buffer.getvalue()


def test_status_prints_brackets_in_ledger_text(cli, gpu_run_home):
    ledger = Ledger(gpu_run_home / "runs.db")
    ledger.create_run("20260101-000000-aaaa", "[/x]", status="failed", backend="[bold]", run_dir="/tmp/[red]")
    ledger.close()
    proc = cli("status", "20260101-000000-aaaa")
    assert proc.returncode == 0, proc.stderr
    assert "on [/x] [[bold]]: failed" in proc.stdout
    assert "outputs: /tmp/[red]" in proc.stdout


# 5. state folder and ledger -------------------------------------------------------------------


def test_corrupt_ledger_is_one_line(cli, gpu_run_home, small_data):
    gpu_run_home.mkdir(parents=True)
    (gpu_run_home / "runs.db").write_bytes(os.urandom(8192))
    for args in (["runs"], ["train", "--weights", "none", "--data", str(small_data)]):
        refused(cli(*args), "ledger", "unreadable", "move it aside")
    assert not (cli.cwd / "runs").exists()


def test_gpu_run_home_that_is_a_file_is_one_line(cli, tmp_path):
    home = tmp_path / "home-file"
    home.write_text("x")
    refused(cli("runs", env={"GPU_RUN_HOME": str(home)}), "GPU_RUN_HOME", "is not a folder")
    refused(cli("runs", env={"GPU_RUN_HOME": str(home / "sub")}), "GPU_RUN_HOME", "cannot create")


def test_gpu_run_home_not_writable_is_one_line(cli, tmp_path, request):
    home = locked_folder(tmp_path / "locked", request)
    refused(cli("runs", env={"GPU_RUN_HOME": str(home)}), "GPU_RUN_HOME", "not writable")


def test_state_folder_and_ledger_are_private(cli, gpu_run_home):
    assert cli.json("runs") == []
    assert stat.S_IMODE(gpu_run_home.stat().st_mode) == 0o700
    assert stat.S_IMODE((gpu_run_home / "runs.db").stat().st_mode) == 0o600


def test_ledger_error_is_ours(tmp_path):
    (tmp_path / "runs.db").write_bytes(b"\x01" * 4096)
    with pytest.raises(LedgerError, match="move it aside"):
        Ledger(tmp_path / "runs.db")


# 7. predict and demo-data ---------------------------------------------------------------------


@pytest.mark.parametrize("top", ["0", "-1"])
def test_predict_top_below_one_is_refused(top, cli, tmp_path):
    refused(cli("predict", "somerun", str(tmp_path / "x.jpg"), "--top", top), "--top must be at least 1")


@pytest.mark.parametrize("args, words", [
    (["--size", "0"], ["--size must be between"]),
    (["--size", "4"], ["--size must be between"]),
    (["--size", "-3"], ["--size must be between"]),
    (["--train-per-class", "0"], ["--train-per-class must be at least 1"]),
    (["--val-per-class", "-1"], ["--val-per-class must be at least 1"]),
    (["--classes", "1"], ["--classes must be between 2"]),
])
def test_demo_data_values_that_cannot_draw_are_refused(args, words, cli):
    refused(cli("demo-data", "out", *args), *words)
    assert not (cli.cwd / "out").exists()


def test_demo_data_into_a_file_is_refused(cli):
    (cli.cwd / "out").write_text("x")
    refused(cli("demo-data", "out"), "out is a file")


# 8. run-id prefixes ---------------------------------------------------------------------------


def test_like_wildcards_in_a_prefix_are_literal(tmp_path):
    assert like_prefix("a_b%c\\") == "a\\_b\\%c\\\\%"
    ledger = Ledger(tmp_path / "runs.db")
    ledger.create_run("20260101-000000-aaaa", "local", created_at=1.0)
    ledger.create_run("20260101-000000-bbbb", "local", created_at=2.0)
    ledger.create_run("x_y", "local", created_at=3.0)
    for prefix in ("_", "%", "2026010_", "%aaaa", ""):
        with pytest.raises(Exception, match="no such run|empty"):
            ledger.get_run(prefix)
    assert ledger.get_run("x_").run_id == "x_y"
    assert ledger.get_run("20260101-000000-a").run_id == "20260101-000000-aaaa"
    with pytest.raises(Exception, match="ambiguous: 2 runs match .20260101-000000-aaaa, 20260101-000000-bbbb"):
        ledger.get_run("2026")


def test_wildcard_prefix_on_the_command_line(cli, gpu_run_home):
    ledger = Ledger(gpu_run_home / "runs.db")
    ledger.create_run("20260101-000000-aaaa", "local", status="failed", created_at=1.0)
    ledger.create_run("20260101-000000-bbbb", "local", status="failed", created_at=2.0)
    ledger.close()
    for prefix in ("_", "%"):
        refused(cli("status", prefix), "no such run")
    refused(cli("status", "2026"), "ambiguous", "20260101-000000-aaaa", "20260101-000000-bbbb")


# 9. dataset entries the sync cannot send ------------------------------------------------------


def _bad_dataset(tmp_path, case: str):
    root = make_dataset(tmp_path / "data", classes=2, train_per_class=3, val_per_class=2, size=16)
    cls = root / "train" / "horizontal"
    if case == "symlink-loop":
        os.symlink("loop.jpg", cls / "loop.jpg")
    elif case == "dangling-symlink":
        os.symlink("gone.jpg", cls / "link.jpg")
    elif case == "fifo":
        os.mkfifo(cls / "pipe.jpg")
    elif case == "folder-named-like-image":
        (cls / "folder.jpg").mkdir()
    elif case == "non-utf8-name":
        os.close(os.open(os.fsencode(cls) + b"/\xff.jpg", os.O_WRONLY | os.O_CREAT, 0o644))
    elif case == "symlink-outside":
        (tmp_path / "elsewhere.jpg").write_bytes((cls / "00000.jpg").read_bytes())
        os.symlink(tmp_path / "elsewhere.jpg", cls / "outside.jpg")
    elif case == "symlink-absolute":
        os.symlink(cls / "00000.jpg", cls / "absolute.jpg")
    elif case == "unreadable":
        (cls / "00001.jpg").chmod(0)
    elif case == "one-class":
        for split in ("train", "val"):
            for p in (root / split / "vertical").iterdir():
                p.unlink()
            (root / split / "vertical").rmdir()
    return root


DATASETS = {
    "symlink-loop": "train/horizontal/loop.jpg in",
    "dangling-symlink": "train/horizontal/link.jpg in",
    "fifo": "train/horizontal/pipe.jpg in",
    "folder-named-like-image": "train/horizontal/folder.jpg in",
    "non-utf8-name": "train/horizontal/\ufffd.jpg in",
    "symlink-outside": "train/horizontal/outside.jpg in",
    "symlink-absolute": "train/horizontal/absolute.jpg in",
    "unreadable": "train/horizontal/00001.jpg in",
    "one-class": "at least 2 classes",
}
FIXES = {
    "symlink-loop": "symlink loop; remove it",
    "dangling-symlink": "broken symlink",
    "fifo": "not a regular file",
    "folder-named-like-image": "rename or remove it",
    "non-utf8-name": "not valid UTF-8; rename it",
    "symlink-outside": "outside the dataset",
    "symlink-absolute": "make it relative",
    "unreadable": "cannot be read",
    "one-class": "add another class folder",
}


@pytest.mark.parametrize("case", sorted(DATASETS))
def test_dataset_checker_refuses_what_the_sync_cannot_send(case, tmp_path):
    root = _bad_dataset(tmp_path, case)
    if case == "unreadable" and AS_ROOT:
        # Root reads a chmod 000 file: check in a process without the capabilities that let it,
        # as any other user would run it.
        check = ("import sys; from gpu_run.dataset import validate_dataset; from gpu_run.errors import DatasetError\n"
                 "try:\n    validate_dataset(sys.argv[1])\nexcept DatasetError as e:\n    print(e)\n")
        proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", check,
                               str(root)], capture_output=True, text=True, timeout=120)
        message = proc.stdout.strip()
        assert proc.returncode == 0 and message, proc.stderr
    else:
        with pytest.raises(DatasetError) as e:
            validate_dataset(root)
        message = str(e.value)
    assert DATASETS[case] in message and FIXES[case] in message, message


def test_dataset_checker_accepts_relative_links_inside_and_hidden_litter(tmp_path):
    root = make_dataset(tmp_path / "data", classes=2, train_per_class=3, val_per_class=2, size=16)
    cls = root / "train" / "horizontal"
    os.symlink("00000.jpg", cls / "again.jpg")
    os.mkfifo(cls / ".hidden-pipe")
    info = validate_dataset(root)
    assert info.counts["train"]["horizontal"] == 4


@pytest.mark.parametrize("case", ["fifo", "non-utf8-name", "one-class"])
def test_bad_dataset_entries_are_refused_on_the_command_line(case, cli, tmp_path):
    root = _bad_dataset(tmp_path, case)
    refused(cli("train", "--weights", "none", "--data", str(root), "--epochs", "1"), DATASETS[case], FIXES[case])
    nothing_left(cli)


# 10. --resume of a run that cannot resume -----------------------------------------------------


def test_resume_that_cannot_resume_leaves_nothing(cli, gpu_run_home, small_data, tmp_path):
    refused(cli("train", "--weights", "none", "--data", str(small_data), "--resume", "nope"), "no such run")
    nothing_left(cli)
    ledger = Ledger(gpu_run_home / "runs.db")
    ledger.create_run("20260101-000000-aaaa", "local", status="stopped", run_dir=str(tmp_path / "old-run"),
                      data_path=str(small_data))
    ledger.close()
    for args in ([], ["--data", str(small_data)]):
        refused(cli("train", "--weights", "none", "--resume", "20260101", *args), "no checkpoints/last.pth to resume from")
    assert not (cli.cwd / "runs").exists()
    assert [r["run_id"] for r in cli.json("runs")] == ["20260101-000000-aaaa"]


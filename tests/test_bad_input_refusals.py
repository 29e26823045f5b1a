"""Values that used to pass the checks and cost money before failing (or, for --env, ran a command
on the host) are refused by check_spec, before anything starts: one line naming the problem and the
fix. Unit tests: check_spec on a TrainSpec, and the CLI, which refuses before Docker or SSH is
touched (check_spec is pipeline.train's first step), leaving no run folder and no ledger row."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gpu_run import weights as W
from gpu_run.config import parse_hosts
from gpu_run.errors import ConfigError
from gpu_run.money.budget import watchdog_max_runtime_s
from gpu_run.runtimes.base import env_file_text
from gpu_run.spec import MIN_LIMIT_S, YEAR_S, TrainSpec, check_spec
from gpu_run.sweep.run import point_specs
from gpu_run.trainer.train import TrainerError, load_state_from_file
from tests.test_bad_input import nothing_left, refused

SHELL_INJECTION = "X;touch${IFS}/tmp/pwn;Y"  # the key of --env 'X;touch${IFS}/tmp/pwn;Y=1'


def spec(**values) -> TrainSpec:
    return TrainSpec(host="local", data=Path("d"), weights="none", **values)


def refusal(**values) -> str:
    with pytest.raises(ConfigError) as e:
        check_spec(spec(**values))
    message = str(e.value)
    assert "\n" not in message, message
    return message


# 1. Upper bounds: 1e308 passed and crashed after connect, claim and sync ---------------------------


@pytest.mark.parametrize("values, message", [
    ({"max_hours": 1e308}, "--max-hours 1e+308 is more than a year; pass at most 8760 hours, or 0 for no limit"),
    ({"silence_minutes": 1e308},
     "--silence-minutes 1e+308 is more than a year; pass at most 525600 minutes, or 0 for no limit"),
    ({"max_hours": 8761}, "--max-hours 8761 is more than a year; pass at most 8760 hours, or 0 for no limit"),
    ({"budget": 1e308}, "--budget 1e+308 is over 1e+09; pass at most 1000000000 (in the host's currency), or 0 for none"),
    ({"epoch_time_s": 1e308},
     "--epoch-time 1e+308 is more than a year; pass at most 31536000 seconds, or 0 to estimate it from earlier runs"),
])
def test_huge_values_are_refused(values, message):
    assert refusal(**values) == message


def test_the_bounds_themselves_pass():
    check_spec(spec(max_hours=8760, silence_minutes=YEAR_S // 60, budget=1e9, epoch_time_s=YEAR_S))


# 2. Limits too short to enforce: --max-hours 0.0001 was int(0.36) = 0 seconds, no limit at all ----


@pytest.mark.parametrize("values, message", [
    ({"max_hours": 0.0001}, "--max-hours 0.0001 is 0.36 s, too short for the watchdog to enforce; "
                            "pass at least 0.0014 (5 s), or 0 for no limit"),
    ({"max_hours": 1e-300}, "too short for the watchdog to enforce"),
    ({"silence_minutes": 0.05}, "--silence-minutes 0.05 is 3 s, too short for the watchdog to enforce; "
                                "pass at least 0.0834 (5 s), or 0 for no limit"),
])
def test_limits_too_short_to_enforce_are_refused(values, message):
    assert message in refusal(**values)


def test_the_shortest_limit_offered_passes_and_is_enforced():
    host = parse_hosts({"hosts": {"box": {"ssh": "b"}}})["box"]
    shortest = spec(max_hours=0.0014, silence_minutes=0.0834)  # what the refusals above offer
    check_spec(shortest)
    assert watchdog_max_runtime_s(shortest, host, 0, None) >= MIN_LIMIT_S  # a limit, not 0 (none)
    assert int(shortest.silence_minutes * 60) >= MIN_LIMIT_S
    check_spec(spec(max_hours=0, silence_minutes=0))  # 0 is still no limit
    # The watchdog's own integration tests (tests/test_ssh_host.py) stop hung jobs after 10.8 s and 6 s.
    check_spec(spec(max_hours=0.003, silence_minutes=0.1))


# 3. --env keys that are not shell names, and values with a line break or NUL -----------------------


@pytest.mark.parametrize("key", [SHELL_INJECTION, "1A", "A-B", "A B", "A.B", "$(id)", "A\nB", "Ä"])
def test_env_keys_that_are_not_shell_names_are_refused(key):
    message = refusal(extra_env={key: "1"})
    assert message == (f"--env {key!r}: not an environment variable name; use letters, digits and _, "
                       f"not starting with a digit (--env MY_VAR=value)")


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b"])
def test_env_values_with_a_line_break_or_nul_are_refused(value):
    assert refusal(extra_env={"TOKEN": value}) == (
        "--env TOKEN=...: the value holds a line break or NUL, which cannot be passed to the trainer; "
        "put it in a file in the dataset folder instead")


def test_env_names_and_values_that_work_pass():
    check_spec(spec(extra_env={"MY_VAR": "x y;$(z) 'q'", "_A1": "", "a": "=="}))


@pytest.mark.parametrize("env", [{SHELL_INJECTION: "1"}, {"1A": "x"}, {"OK": "a\nb"}])
def test_env_file_refuses_the_same_as_the_spec_check(env):
    """The last line of defence, before a file that sh sources: the same refusal, whatever path the env came by."""
    with pytest.raises(ConfigError) as at_file:
        env_file_text(env)
    with pytest.raises(ConfigError) as at_spec:
        check_spec(spec(extra_env=env))
    assert str(at_file.value) == str(at_spec.value)
    assert env_file_text({"MY_VAR": "x y", "_B": ""}) == b"MY_VAR=x y\n_B=\n"


# 5. --gpus and --workers -------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"gpus": 65}, "--gpus 65 is more than 64, more than one host has; pass at most 64 (the GPUs of each host)"),
    ({"gpus": 10**9}, "--gpus 1000000000 is more than 64"),
    ({"workers": 65}, "--workers 65 is more than 64; pass at most 64, or -1 to pick from the host's cores"),
])
def test_gpus_and_workers_have_an_upper_bound(values, message):
    assert message in refusal(**values)


def test_gpus_and_workers_at_the_bound_pass():
    check_spec(spec(gpus=64, workers=64))
    check_spec(spec(gpus=0, workers=-1))


# The sweep checks every point with check_spec ------------------------------------------------------


def test_a_sweep_is_refused_by_the_same_checks():
    with pytest.raises(ConfigError, match=r"^point lr=0.1 workers=65: --workers 65 is more than 64"):
        point_specs(spec(), [{"lr": 0.01}, {"lr": 0.1, "workers": 65}])
    with pytest.raises(ConfigError, match=r"^point lr=0.01: --env 'X;touch"):
        point_specs(spec(extra_env={SHELL_INJECTION: "1"}), [{"lr": 0.01}])
    with pytest.raises(ConfigError, match=r"^point lr=0.01: --max-hours 1e\+308 is more than a year"):
        point_specs(spec(max_hours=1e308), [{"lr": 0.01}])


# 4. --weights FILE that the trainer cannot load ------------------------------------------------------


def tiny_state() -> dict:
    torch.manual_seed(0)
    return nn.Linear(2, 2).state_dict()


def write_weights(path: Path, case: str) -> Path:
    """A file as users have them: what the trainer loads, and what it does not."""
    if case == "state_dict":
        torch.save(tiny_state(), path)
    elif case == "legacy-format":
        torch.save(tiny_state(), path, _use_new_zipfile_serialization=False)
    elif case == "gpu-run-checkpoint":
        torch.save({"model": tiny_state(), "epoch": 3, "args": {"lr": 0.1}}, path)
    elif case == "whole-model":
        torch.save(nn.Linear(2, 2), path)
    elif case == "state_dict-wrapper":
        torch.save({"state_dict": tiny_state()}, path)
    elif case == "list":
        torch.save([torch.zeros(2)], path)
    elif case == "no-tensors":
        torch.save({"epoch": 3}, path)
    elif case == "not-torch":
        path.write_bytes(b"this is a text file, not a checkpoint\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "cut-short":
        torch.save(tiny_state(), path)
        path.write_bytes(path.read_bytes()[:200])
    return path


LOADS = ["state_dict", "legacy-format", "gpu-run-checkpoint"]
REFUSED = {
    "whole-model": "holds more than tensors (a whole model, saved with torch.save(model)?)",
    "state_dict-wrapper": "only a dict under 'state_dict', which the trainer does not look in; save that dict "
                          "alone: torch.save(checkpoint['state_dict'], PATH)",
    "list": "holds a list, not a state_dict; pass a file saved with torch.save(model.state_dict(), PATH)",
    "no-tensors": "holds no tensors; pass a file saved with torch.save(model.state_dict(), PATH)",
    "not-torch": "is not a PyTorch state_dict file, or is cut short",
    "empty": "is not a PyTorch state_dict file, or is cut short",
    "cut-short": "is not a PyTorch state_dict file, or is cut short",
}


@pytest.mark.parametrize("case", LOADS)
def test_weights_files_the_trainer_loads_pass(case, tmp_path):
    path = write_weights(tmp_path / "w.pth", case)
    W.check_weights(str(path), "resnet18")
    assert load_state_from_file(nn.Linear(2, 2), str(path)) == []  # and the trainer does load them


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_weights_files_the_trainer_cannot_load_are_refused(case, tmp_path):
    path = write_weights(tmp_path / "w.pth", case)
    with pytest.raises(ConfigError) as e:
        W.check_weights(str(path), "resnet18")
    message = str(e.value)
    assert message.startswith(f"--weights {path}: ") and REFUSED[case] in message, message
    assert "\n" not in message and "\x1b" not in message, message  # not torch's pages of text
    with pytest.raises(TrainerError):  # what the host would have said, after the upload
        load_state_from_file(nn.Linear(2, 2), str(path))


def test_weights_file_is_loaded_once_until_it_changes(tmp_path, monkeypatch):
    """check_spec and resolve_weights both check it, and a sweep checks it per point: one load."""
    W.check_state_dict_file.cache_clear()
    path = write_weights(tmp_path / "w.pth", "state_dict")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    for _ in range(3):
        W.check_weights(str(path), "resnet18")
    W.resolve_weights(str(path), "resnet18")
    assert len(loads) == 1
    write_weights(path, "whole-model")  # replaced by a file that cannot load: found out, not remembered
    with pytest.raises(ConfigError, match="holds more than tensors"):
        W.check_weights(str(path), "resnet18")


# The CLI: one line, a non-zero exit, no traceback, nothing left behind ---------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from gpu_run.demo_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "ok", classes=2, train_per_class=3, val_per_class=2, size=16)


@pytest.mark.parametrize("args, words", [
    (["--max-hours", "1e308"], ["--max-hours 1e+308 is more than a year", "at most 8760 hours"]),
    (["--max-hours", "0.0001"], ["--max-hours 0.0001 is 0.36 s, too short", "at least 0.0014"]),
    (["--silence-minutes", "1e308"], ["--silence-minutes 1e+308 is more than a year", "at most 525600 minutes"]),
    (["--budget", "1e308"], ["--budget 1e+308 is over", "at most 1000000000"]),
    (["--epoch-time", "1e308"], ["--epoch-time 1e+308 is more than a year", "at most 31536000 seconds"]),
    (["--gpus", "65"], ["--gpus 65 is more than 64"]),
    (["--workers", "65"], ["--workers 65 is more than 64"]),
    (["--env", "A=line\nbreak"], ["--env A=...: the value holds a line break"]),
])
def test_bad_values_are_refused_on_the_command_line(args, words, cli, small_data):
    refused(cli("train", "--weights", "none", "--data", str(small_data), *args), *words)
    nothing_left(cli)


def test_env_key_that_would_run_a_command_is_refused_on_the_command_line(cli, small_data, tmp_path):
    marker = tmp_path / "pwn"
    key = f"X;touch${{IFS}}{marker};Y"
    for host in ([], ["--host", "local"]):  # local would start Docker: the refusal comes first
        line = refused(cli("train", *host, "--weights", "none", "--data", str(small_data), "--env", f"{key}=1"),
                       f"--env {key!r}: not an environment variable name", "(--env MY_VAR=value)")
        assert "Docker" not in line
    nothing_left(cli)
    assert not marker.exists()


def test_weights_file_that_cannot_load_is_refused_on_the_command_line(cli, small_data, tmp_path):
    path = write_weights(tmp_path / "model.pth", "whole-model")
    refused(cli("train", "--host", "local", "--weights", str(path), "--data", str(small_data)),
            f"--weights {path}: holds more than tensors", "torch.save(model.state_dict(), PATH)")
    nothing_left(cli)

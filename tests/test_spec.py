"""The train recipe's defaults live in one place, and a stop keeps the promise the run was started
with. Pure: no test bed."""

from __future__ import annotations

import json
from pathlib import Path

from gpu_run.cli import train as train_command
from gpu_run.ledger import RunRecord
from gpu_run.run_commands import stop_timeout_of
from gpu_run.spec import TrainSpec
from gpu_run.trainer.train import get_args_parser

# Options whose default the CLI, TrainSpec and the trainer share (the trainer's --weights is
# deliberately "none": the launcher resolves "imagenet" to a file before the trainer sees it).
SHARED = ("model", "epochs", "batch_size", "lr", "step_size", "gamma", "image_size", "workers", "seed", "amp", "decode")


def test_cli_spec_and_trainer_agree_on_every_default() -> None:
    cli_defaults = {p.name: p.default for p in train_command.params}
    trainer_defaults = vars(get_args_parser().parse_args(["--data", "d", "--out", "o"]))
    spec = TrainSpec(host="local", data=Path("d"))
    for name in SHARED:
        assert cli_defaults[name] == getattr(spec, name) == trainer_defaults[name], name
    assert cli_defaults["stop_timeout"] == spec.stop_timeout_s
    assert cli_defaults["weights"] == spec.weights


def record(args: dict) -> RunRecord:
    return RunRecord(run_id="r", host="h", backend="ssh", model="resnet18", data_path=None, dataset_id=None,
                     image_tag=None, status="running", exit_code=None, created_at=0.0, ended_at=None, run_dir=None,
                     args_json=json.dumps(args), handle_json=None, summary_json=None, best_val_acc=None,
                     billed_from=None, billed_to=None, cost_amount=None, currency="USD", resumed_from=None)


def test_stop_gives_the_trainer_the_runs_own_stop_timeout() -> None:
    assert stop_timeout_of(record({"spec": {"stop_timeout_s": 900}})) == 900
    # A run recorded before the option existed gets the default.
    assert stop_timeout_of(record({})) == TrainSpec.stop_timeout_s


def test_the_model_table_matches_the_installed_torchvision() -> None:
    """The launcher checks --model and finds imagenet weights without importing torchvision; the
    table it uses must be what torchvision itself says."""
    import torchvision

    from gpu_run.model_zoo import IMAGENET_WEIGHTS

    names = torchvision.models.list_models(module=torchvision.models)
    assert sorted(IMAGENET_WEIGHTS) == sorted(names)
    for name in names:
        assert IMAGENET_WEIGHTS[name] == torchvision.models.get_model_weights(name).DEFAULT.url, name


def test_the_launcher_finds_the_users_torch_hub_as_torch_does(monkeypatch, tmp_path) -> None:
    import torch.hub

    from gpu_run.weights import user_torch_hub

    for env in ({}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"TORCH_HOME": str(tmp_path / "th")}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert user_torch_hub() == Path(torch.hub.get_dir()), env

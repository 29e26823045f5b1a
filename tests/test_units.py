"""Pure logic: cost arithmetic, config parsing, the ledger, event parsing, image tags."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gpu_run.config import parse_hosts
from gpu_run.errors import BackendError, ConfigError, RunNotFound
from gpu_run.events import parse_event, read_metrics, status_for_exit
from gpu_run.image import image_tag
from gpu_run.ledger import Ledger
from gpu_run.money.cost import BILLING_UNIT_S, billed_seconds, budget_seconds, cost_of
from gpu_run.money.report import totals
from gpu_run.providers.aws import wait_for_state


@pytest.mark.parametrize("duration, rule, minimum, billed", [
    (0, "per_second", 60, 0),
    (1.2, "per_second", 0, 2),
    (30, "per_second", 60, 60),
    (61.0000001, "per_second", 60, 61),  # float noise is not a second more
    (61.2, "per_second", 60, 62),
    (60.0000001, "per_minute", 0, 60),
    (60.5, "per_minute", 0, 120),
    (3600, "per_hour", 0, 3600),
    (3601, "per_hour", 0, 7200),
])
def test_billed_seconds(duration, rule, minimum, billed):
    assert billed_seconds(duration, rule, minimum) == billed


def test_cost_is_exact_to_the_cent():
    assert cost_of(3600, 0.526, "per_second") == Decimal("0.53")  # g4dn.xlarge, one hour
    assert cost_of(30, 0.526, "per_second", 60) == Decimal("0.01")  # the 60 s minimum: 0.00877 -> 0.01
    assert cost_of(1, 0.8, "per_hour") == Decimal("0.80")
    assert cost_of(5400, 3.0, "per_minute") == Decimal("4.50")
    assert cost_of(7 * 3600 + 1, 1.5, "per_second") == Decimal("10.50")  # 10.5004 rounds half-up to 10.50


def test_config_parses_hosts_and_keeps_local():
    hosts = parse_hosts({"hosts": {"t4-box": {"ssh": "t4-box", "price_per_hour": 0.8, "currency": "CNY",
                                              "billing": "per_minute", "stop_command": "sudo shutdown -h now"}}})
    assert set(hosts) == {"local", "t4-box"}
    box = hosts["t4-box"]
    assert (box.kind, box.price_per_hour, box.currency, box.billing) == ("ssh", 0.8, "CNY", "per_minute")
    assert hosts["local"].is_local and hosts["local"].is_free


@pytest.mark.parametrize("table, message", [
    ({"ssh": "x", "prise_per_hour": 1}, "unknown setting 'prise_per_hour'"),
    ({"ssh": "x", "billing": "per_day"}, "billing must be one of per_second, per_minute, per_hour"),
    ({"ssh": "x", "price_per_hour": -1}, "price_per_hour must be a number >= 0"),
    ({"price_per_hour": 1}, "say how to reach it"),
    ({"provider": "aws", "region": "us-east-1"}, "needs instance_id"),
    ({"provider": "gcp"}, "provider 'gcp' is not supported"),
    ({"ssh": "x", "sync": "s3"}, "needs bucket"),
])
def test_config_errors_name_the_problem(table, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_hosts({"hosts": {"box": table}})


def test_aws_hosts_bill_at_least_a_minute_at_the_shipped_price():
    host = parse_hosts({"hosts": {"g4": {"provider": "aws", "instance_id": "i-1", "region": "us-east-1",
                                         "instance_type": "g4dn.xlarge"}}})["g4"]
    assert host.kind == "aws" and host.min_billed_s == 60
    assert (host.price_per_hour, host.currency) == (0.526, "USD")
    assert host.stop_command == "sudo shutdown -h now"
    eu = parse_hosts({"hosts": {"g5": {"provider": "aws", "instance_id": "i-2", "region": "eu-west-1",
                                       "instance_type": "g5.xlarge", "price_per_hour": 1.5}}})["g5"]
    assert eu.price_per_hour == 1.5  # the config overrides the table
    with pytest.raises(ConfigError, match="no shipped price for instance_type 'x9.huge'"):
        parse_hosts({"hosts": {"g": {"provider": "aws", "instance_id": "i", "region": "us-east-1", "instance_type": "x9.huge"}}})


def test_budget_seconds_never_exceed_the_budget():
    assert budget_seconds(1.0, 3600, "per_second") == 1
    assert budget_seconds(20, 0.8, "per_second") == 90_000  # 25 hours
    assert budget_seconds(20, 0.8, "per_hour") == 25 * 3600
    assert budget_seconds(1.0, 0.8, "per_hour") == 3600
    assert budget_seconds(0.5, 0.8, "per_hour") == 0  # not even one billed hour fits
    assert budget_seconds(0.01, 0.526, "per_second", 60) == 68  # 68 s cost 0.00994, rounded 0.01
    assert budget_seconds(0.004, 0.526, "per_second", 60) == 0  # below the 60 s minimum
    for budget, price, rule in [(3.33, 0.526, "per_second"), (7, 1.212, "per_minute"), (0.05, 3.06, "per_second")]:
        s = budget_seconds(budget, price, rule)
        assert cost_of(s, price, rule) <= Decimal(str(budget))
        # One more billing unit would cost more than the budget before rounding.
        assert Decimal(str(price)) * (s + BILLING_UNIT_S[rule]) / 3600 > Decimal(str(budget))


def test_wait_for_state_polls_until_running_or_times_out():
    states = iter(["stopped", "pending", "pending", "running"])
    clock = iter(range(100))
    slept = []
    assert wait_for_state(lambda: next(states), "running", 60, poll_s=3, sleep=slept.append,
                          clock=lambda: next(clock)) == "running"
    assert slept == [3, 3, 3]
    with pytest.raises(BackendError, match="still pending after 5s"):
        t = iter(range(0, 100, 2))
        wait_for_state(lambda: "pending", "running", 5, sleep=lambda s: None, clock=lambda: next(t))
    with pytest.raises(BackendError, match="is terminated"):
        wait_for_state(lambda: "terminated", "running", 5, sleep=lambda s: None)


def test_cost_totals_keep_currencies_apart():
    rows = [{"host": "a", "month": "2026-11", "currency": "CNY", "amount": 1.25},
            {"host": "a", "month": "2026-11", "currency": "CNY", "amount": 0.10},
            {"host": "b", "month": "2026-12", "currency": "USD", "amount": 0.53}]
    assert totals(rows, "host") == [{"host": "a", "currency": "CNY", "runs": 2, "amount": 1.35},
                                    {"host": "b", "currency": "USD", "runs": 1, "amount": 0.53}]
    assert [t["month"] for t in totals(rows, "month")] == ["2026-11", "2026-12"]


def test_ledger_records_runs_and_phases(tmp_path):
    ledger = Ledger(tmp_path / "runs.db")
    ledger.create_run("20260101-000000-abcd", "local", model="resnet18", created_at=100.0)
    ledger.start_phase("20260101-000000-abcd", "build", at=101.0)
    ledger.end_phase("20260101-000000-abcd", "build", at=103.5)
    ledger.update_run("20260101-000000-abcd", status="succeeded", exit_code=0)
    run = ledger.get_run("20260101")  # unique prefix
    assert (run.status, run.exit_code, run.model) == ("succeeded", 0, "resnet18")
    [phase] = ledger.phases(run.run_id)
    assert (phase.phase, phase.status, phase.duration_s) == ("build", "ok", 2.5)
    with pytest.raises(RunNotFound):
        ledger.get_run("nope")
    with pytest.raises(ValueError):
        ledger.update_run(run.run_id, colour="red")


def test_events_and_metrics():
    assert parse_event('{"event": "epoch", "epoch": 1}') == {"event": "epoch", "epoch": 1}
    assert parse_event("Downloading weights...") is None
    assert parse_event("{not json") is None
    assert parse_event('{"no_event": 1}') is None
    assert [status_for_exit(c) for c in (0, 75, 1, 137)] == ["succeeded", "stopped", "failed", "failed"]
    text = '{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_acc": 0.6}\n{"epoch": 2, "val_acc": 0.7}\n'
    assert [m["val_acc"] for m in read_metrics(text)] == [0.5, 0.7]


def test_image_tag_follows_content_and_base():
    files = [("Dockerfile", b"FROM x"), ("trainer/train.py", b"print(1)")]
    tag = image_tag(files, "gpu-run-base:cpu")
    assert tag.startswith("gpu-run-trainer:") and len(tag.split(":")[1]) == 12
    assert image_tag(list(files), "gpu-run-base:cpu") == tag
    assert image_tag(files, "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime") != tag
    assert image_tag([files[0], ("trainer/train.py", b"print(2)")], "gpu-run-base:cpu") != tag


def test_the_hosts_clock_never_sets_the_bill(tmp_path):
    """A host whose clock runs two hours ahead reports its stop two hours late: the bill ends when
    the laptop learned of the stop; a clock behind cannot end it before the job's end."""
    import time

    from gpu_run.ledger import Ledger
    from gpu_run.providers.base import StopResult
    from gpu_run.run_end import record_stop

    ledger = Ledger(tmp_path / "runs.db")
    start = time.time() - 20
    for run_id, host_at in (("ahead", time.time() + 7200), ("behind", start - 3600)):
        ledger.create_run(run_id, "box", billed_from=start)
        ledger.start_phase(run_id, "train")
        ledger.end_phase(run_id, "train", "ok")
        record_stop(ledger, run_id, StopResult(True, "stopped", host_at, "stopped"), start)
    ahead, behind = ledger.get_run("ahead"), ledger.get_run("behind")
    assert start < ahead.billed_to <= time.time() and ahead.billed_to - start < 60
    train_end = ledger.phases("behind")[0].ended_at
    assert behind.billed_to == train_end


def test_every_command_ends_its_help_with_an_example():
    import click

    from gpu_run.cli import cli

    def walk(group: click.Group, prefix: str = "gpu-run"):
        assert group.epilog and group.epilog.startswith("Example: gpu-run"), prefix
        for name, command in group.commands.items():
            assert command.epilog and command.epilog.startswith("Example: gpu-run"), f"{prefix} {name}"
            if isinstance(command, click.Group):
                walk(command, f"{prefix} {name}")

    walk(cli)

"""Every listing fits an 80-column terminal without cutting what identifies a row: the run id,
the model and the status (NOT STOPPED included) appear whole. No test bed: a ledger in a temp dir."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from gpu_run.cli import cli
from gpu_run.ledger import Ledger
from gpu_run.paths import ledger_path

RUNS = [  # run id, host, model, status, stop failed
    ("20261129-231132-5f13", "autodl-4090-westb", "mobilenet_v3_large", "succeeded", False),
    ("20261129-231500-a0b1", "t4-box", "efficientnet_b0", "failed", True),
    ("20261129-232000-c2d3", "local", "resnet18", "stopped", False),
]


@pytest.fixture
def ledger(gpu_run_home) -> Ledger:
    ledger = Ledger(ledger_path())
    for run_id, host, model, status, stop_failed in RUNS:
        ledger.create_run(run_id, host, model=model, currency="CNY", run_dir=f"/tmp/{run_id}")
        ledger.update_run(run_id, status=status, best_val_acc=0.9375, cost_amount=123.45, billed_from=time.time() - 3600,
                          **({"stop_status": "failed", "stop_detail": "sudo: a password is required"}
                             if stop_failed else {"billed_to": time.time()}))
    return ledger


@pytest.mark.parametrize("command", [["runs"], ["cost"]])
def test_listings_fit_80_columns_and_keep_what_identifies_a_row(ledger, command, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no gpu-run.toml: the hosts are unknown, their recorded amounts are shown
    result = CliRunner().invoke(cli, command, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    table_lines = [line for line in result.output.splitlines() if not line.startswith("error:")]
    too_wide = [line for line in table_lines if len(line) > 80]
    assert not too_wide, too_wide
    for run_id, _host, model, status, stop_failed in RUNS:
        at = next(i for i, line in enumerate(table_lines) if line.startswith(run_id))  # whole, first in its row
        if command == ["runs"]:
            assert model in table_lines[at] and status in table_lines[at]
            if stop_failed:  # on the status's second line, in the same column
                column = table_lines[at].index(status)
                assert table_lines[at + 1][column:].startswith("NOT STOPPED")


def test_wider_terminals_show_the_start_time(ledger) -> None:
    narrow = CliRunner().invoke(cli, ["runs"], env={"COLUMNS": "80"})
    wide = CliRunner().invoke(cli, ["runs"], env={"COLUMNS": "140"})
    assert "started" not in narrow.output and "started" in wide.output

"""The budget, before and during a run: refuse a run that cannot fit, turn what is left into the
watchdog's deadline, and what a run has cost so far."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

from gpu_run.config import Host
from gpu_run.dataset import DatasetInfo
from gpu_run.errors import ConfigError
from gpu_run.events import read_metrics
from gpu_run.ledger import Ledger, RunRecord
from gpu_run.money.cost import billed_seconds, budget_seconds, cost_of, format_money
from gpu_run.spec import TrainSpec
from gpu_run.ui import UI

SETUP_ESTIMATE_S = 120  # connect, sync and build, for the budget estimate
BUDGET_MARGIN_S = 10  # slack between the watchdog's deadline and the budget's


def measured_epoch_time(ledger: Ledger, host: str, model: str, dataset: str) -> float | None:
    """Median time per epoch of earlier runs of this model on this dataset and host."""
    times = []
    for run in ledger.list_runs(host=host, limit=20):
        if run.model == model and run.dataset_id == dataset and run.run_dir:
            path = Path(run.run_dir) / "metrics.jsonl"
            if path.is_file():
                times += [m["epoch_time_s"] for m in read_metrics(path.read_text())]
    return sorted(times)[len(times) // 2] if times else None


def budget_limit_s(spec: TrainSpec, host: Host, ui: UI) -> int:
    """The billable seconds --budget buys on the host (0: no budget, or a free host), refused when
    it cannot even pay for a safe stop."""
    if host.is_free:
        ui.warn(f"host {host.name} costs nothing; --budget has no effect")
        return 0
    limit_s = budget_seconds(spec.budget, host.price_per_hour, host.billing, host.min_billed_s)
    needed_s = host.grace_s + spec.stop_timeout_s + BUDGET_MARGIN_S + 30
    if limit_s < needed_s:
        raise ConfigError(
            f"--budget {spec.budget} {host.currency} buys {limit_s}s on {host.name}, less than the "
            f"{needed_s}s that stopping safely needs; raise the budget"
        )
    return limit_s


def check_budget(spec: TrainSpec, host: Host, info: DatasetInfo, ledger: Ledger, ui: UI) -> int:
    """Refuse, before anything starts, a run that cannot fit the budget; return its billable seconds."""
    if not spec.budget:
        return 0
    limit_s = budget_limit_s(spec, host, ui)
    if not limit_s:
        return 0
    epoch_s = spec.epoch_time_s or measured_epoch_time(ledger, host.name, spec.model, info.dataset_id)
    if epoch_s:
        estimate_s = spec.epochs * epoch_s + SETUP_ESTIMATE_S + host.grace_s
        estimate = cost_of(estimate_s, host.price_per_hour, host.billing, host.min_billed_s)
        if estimate > Decimal(str(spec.budget)) and not spec.force:
            raise ConfigError(
                f"estimated cost {format_money(estimate, host.currency)} ({spec.epochs} epochs x {epoch_s:.0f}s "
                f"+ setup and grace) is over the budget of {spec.budget} {host.currency}; raise --budget, "
                f"lower --epochs, or add --force to run until the budget stops it"
            )
        ui.info(f"estimated cost {format_money(estimate, host.currency)} of a {spec.budget} {host.currency} budget")
    else:
        ui.info(
            f"no time per epoch known yet for {spec.model} on this dataset and host; "
            f"the budget is enforced as a runtime cap of {limit_s}s"
        )
    return limit_s


def watchdog_max_runtime_s(spec: TrainSpec, host: Host, budget_limit_s: int, billed_from: float | None) -> int:
    """The tighter of --max-hours and what the budget leaves once setup is paid and the end is provided for."""
    limits = [int(spec.max_hours * 3600)] if spec.max_hours else []
    if budget_limit_s:
        spent = time.time() - (billed_from or time.time())
        limits.append(max(1, int(budget_limit_s - spent - host.grace_s - spec.stop_timeout_s - BUDGET_MARGIN_S)))
    return min(limits) if limits else 0


def run_cost(host: Host, run: RunRecord, now: float | None = None) -> tuple[Decimal, int]:
    """Amount and billed seconds of a run, so far if it has not ended."""
    if run.billed_from is None:
        return Decimal("0.00"), 0
    end = run.billed_to if run.billed_to is not None else (now or time.time())
    span = max(0.0, end - run.billed_from)
    return cost_of(span, host.price_per_hour, host.billing, host.min_billed_s), billed_seconds(
        span, host.billing, host.min_billed_s
    )

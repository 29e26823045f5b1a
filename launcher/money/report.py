"""`gpu-run cost`: every run's billed time and amount from the ledger, with totals per host and month."""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from decimal import Decimal

from gpu_run.config import Config
from gpu_run.ledger import Ledger
from gpu_run.money.cost import billed_seconds, cost_of


def cost_rows(ledger: Ledger, config: Config, now: float | None = None) -> list[dict]:
    now = now or time.time()
    rows = []
    for run in ledger.list_runs():
        host = config.hosts.get(run.host)
        if run.billed_from is None or host is None:
            amount = Decimal(str(run.cost_amount or 0)).quantize(Decimal("0.01"))
            billed, idle = 0, 0.0
        else:
            end = run.billed_to if run.billed_to is not None else now
            span = max(0.0, end - run.billed_from)
            billed = billed_seconds(span, host.billing, host.min_billed_s)
            amount = cost_of(span, host.price_per_hour, host.billing, host.min_billed_s)
            train = next((p for p in ledger.phases(run.run_id) if p.phase == "train"), None)
            idle = max(0.0, end - train.ended_at) if train and train.ended_at else 0.0
        rows.append(
            {
                "run_id": run.run_id,
                "host": run.host,
                "started": dt.datetime.fromtimestamp(run.created_at).strftime("%Y-%m-%d %H:%M"),
                "month": dt.datetime.fromtimestamp(run.created_at).strftime("%Y-%m"),
                "status": run.status,
                "billed_s": billed,
                "idle_after_job_s": round(idle, 1),
                "amount": float(amount),
                "currency": run.currency or (host.currency if host else ""),
                "so_far": run.billed_to is None and run.billed_from is not None,
                "stop_failed": run.stop_failed,
                "cloud": bool(host and host.kind == "aws"),
            }
        )
    return rows


def totals(rows: list[dict], key: str) -> list[dict]:
    """Sum per (key, currency); amounts in different currencies are never added together."""
    sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        k = (r[key], r["currency"])
        sums[k] += Decimal(str(r["amount"]))
        counts[k] += 1
    return [{key: k[0], "currency": k[1], "runs": counts[k], "amount": float(v)} for k, v in sorted(sums.items())]

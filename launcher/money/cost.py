"""Billing rules and money arithmetic: pure functions, no I/O, exact to the cent (Decimal)."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal

BILLING_UNIT_S = {"per_second": 1, "per_minute": 60, "per_hour": 3600}


def billed_seconds(duration_s: float, billing: str, min_billed_s: int = 0) -> int:
    """Seconds the provider charges for: rounded up to the billing unit, at least the minimum."""
    if billing not in BILLING_UNIT_S:
        raise ValueError(f"unknown billing rule {billing!r}")
    if duration_s <= 0:
        return 0
    unit = BILLING_UNIT_S[billing]
    # A float duration like 60.0000001 s must not become a second minute: round to the ms first.
    units = math.ceil(round(duration_s, 3) / unit)
    return max(units * unit, min_billed_s)


def cost_of(duration_s: float, price_per_hour: float, billing: str, min_billed_s: int = 0) -> Decimal:
    """The amount for one billed span, rounded half-up to the cent."""
    seconds = billed_seconds(duration_s, billing, min_billed_s)
    amount = Decimal(str(price_per_hour)) * Decimal(seconds) / Decimal(3600)
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def format_money(amount: Decimal | float, currency: str) -> str:
    return f"{Decimal(str(amount)).quantize(Decimal('0.01'))} {currency}"


def budget_seconds(budget: float, price_per_hour: float, billing: str, min_billed_s: int = 0) -> int:
    """The longest billed span whose cost stays within the budget (0 if not even the minimum fits)."""
    if price_per_hour <= 0:
        raise ValueError("a free host has no budget limit")
    unit = BILLING_UNIT_S[billing]
    affordable = Decimal(str(budget)) / Decimal(str(price_per_hour)) * 3600
    seconds = int(affordable // unit) * unit
    # Rounding to the cent may allow a little more; never allow a span that costs over the budget.
    while seconds > 0 and cost_of(seconds, price_per_hour, billing, min_billed_s) > Decimal(str(budget)):
        seconds -= unit
    return seconds if seconds >= min_billed_s else 0

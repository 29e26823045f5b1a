"""A shared machine's bill, split between the runs that used it: pure arithmetic, exact to the cent.

A sweep's points share one billed span. Each point pays for the machine time it ran (a stretch
where k points run side by side costs each of them 1/k of it); everything else in the span (connect,
sync, image build, the gaps between points, the grace and the stop) is overhead, split evenly
between the points that ran. The shares are then rounded to cents so that they add up exactly to
the amount the span cost.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal


def split_seconds(span: tuple[float, float], intervals: list[tuple[float, float] | None]) -> list[float]:
    """Each point's share of the span in seconds; None marks a point that never ran (it pays
    nothing, unless no point ran: then the setup is split between all of them)."""
    start, end = span
    total = max(0.0, end - start)
    clipped = [None if iv is None else (max(start, min(iv)), min(end, max(iv))) for iv in intervals]
    shares = [0.0] * len(intervals)
    cuts = sorted({start, end, *(t for iv in clipped if iv for t in iv)})
    busy = 0.0
    for a, b in zip(cuts, cuts[1:]):
        running = [i for i, iv in enumerate(clipped) if iv and iv[0] <= a and b <= iv[1] and iv[0] < iv[1]]
        for i in running:
            shares[i] += (b - a) / len(running)
        if running:
            busy += b - a
    ran = [i for i, iv in enumerate(clipped) if iv is not None] or list(range(len(intervals)))
    for i in ran:
        shares[i] += (total - busy) / len(ran)
    return shares


def split_amount(total: Decimal, weights: list[float]) -> list[Decimal]:
    """`total` (in cents) in proportion to `weights`; the cents left by rounding down go to the
    largest remainders, so the parts add up to `total` exactly."""
    if not weights:
        return []
    cents = int((total * 100).to_integral_value())
    weight_sum = sum(weights)
    if weight_sum <= 0:
        weights, weight_sum = [1.0] * len(weights), float(len(weights))
    exact = [Decimal(cents) * Decimal(repr(w)) / Decimal(repr(weight_sum)) for w in weights]
    parts = [int(e.to_integral_value(rounding=ROUND_FLOOR)) for e in exact]
    left = cents - sum(parts)
    for i in sorted(range(len(weights)), key=lambda i: (parts[i] - exact[i], i))[:left]:
        parts[i] += 1
    return [(Decimal(p) / 100).quantize(Decimal("0.01")) for p in parts]

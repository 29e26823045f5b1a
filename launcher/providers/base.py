"""What every way of stopping a machine reports: whether it is confirmed stopped, and since when."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopResult:
    """How the machine ended after a run: money is only recorded as saved when `ok` says so."""

    ok: bool  # confirmed stopped, or nothing to stop; False: it may still be billing
    state: str  # stopped | kept_alive | not_needed | handed_over | failed | unconfirmed
    at: float | None  # when its billing ended; None while it may still bill
    detail: str

    def as_dict(self) -> dict:
        return {"ok": self.ok, "state": self.state, "detail": self.detail}

"""On-demand Linux prices of common AWS GPU instances, USD per hour, per region.

The EC2 Pricing API is not something a run should wait on (and not every endpoint offers it),
so the table ships with the tool. Prices change: a host's price_per_hour overrides the table.
"""

from __future__ import annotations

PRICES_TAKEN = "2026-11 (AWS published on-demand Linux prices; check yours and set price_per_hour to override)"

# instance type -> USD/hour in us-east-1; other regions are a multiple of it (below).
US_EAST_1 = {
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.4xlarge": 1.204,
    "g4dn.8xlarge": 2.176,
    "g4dn.12xlarge": 3.912,
    "g4dn.16xlarge": 4.352,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288,
    "g6.xlarge": 0.8048,
    "g6.2xlarge": 0.9776,
    "g6.4xlarge": 1.3232,
    "g6.12xlarge": 4.6016,
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,
    "p3.16xlarge": 24.48,
    "p4d.24xlarge": 32.7726,
}
REGION_FACTOR = {
    "us-east-1": 1.0,
    "us-east-2": 1.0,
    "us-west-2": 1.0,
    "eu-west-1": 1.116,
    "eu-central-1": 1.25,
    "ap-northeast-1": 1.35,
    "ap-southeast-1": 1.27,
}


def hourly_price(instance_type: str, region: str) -> float | None:
    base = US_EAST_1.get(instance_type)
    factor = REGION_FACTOR.get(region)
    if base is None or factor is None:
        return None
    return round(base * factor, 4)

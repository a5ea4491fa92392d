"""The list prices behind `invoke train --dry-run`, `invoke doctor` and the README's cost table: dated, sourced, and
covering every machine an overlay is sized for in every region the table lists."""

from __future__ import annotations

import datetime

import pytest

from k8s_tasks.prices import DEFAULT_REGION, PRICES, PRICES_DATE, PRICES_SOURCE, estimate
from k8s_tasks.sizing import CPU_MACHINE, OVERLAY_MACHINES


def test_the_table_says_when_and_where_its_prices_come_from() -> None:
    assert datetime.date.fromisoformat(PRICES_DATE) <= datetime.date.today()
    assert "https://cloud.google.com/compute/vm-instance-pricing" in PRICES_SOURCE
    assert "https://cloud.google.com/spot-vms/pricing" in PRICES_SOURCE


@pytest.mark.parametrize("region", sorted(PRICES))
def test_every_machine_the_overlays_use_is_priced_and_spot_is_cheaper(region: str) -> None:
    machines = {m for machines in OVERLAY_MACHINES.values() for m in machines} | {CPU_MACHINE}
    assert machines <= set(PRICES[region])
    for machine, price in PRICES[region].items():
        assert 0 < price.spot < price.on_demand, machine


def test_an_estimate_names_its_region_and_falls_back_to_the_default_one() -> None:
    assert estimate("g2-standard-24", 1, "europe-west4").describe() == (
        "about $2.10/h on-demand, $1.10/h Spot for 1 x g2-standard-24 (europe-west4 list prices of 2026-07-30)")
    elsewhere = estimate("a3-highgpu-8g", 2, "asia-southeast1")
    assert elsewhere.region == DEFAULT_REGION and elsewhere.on_demand == pytest.approx(2 * 88.49)
    assert elsewhere.describe(spot=True).startswith("about $101.22/h Spot (this pool), $176.98/h on-demand")
    assert estimate("n1-standard-4") is None

"""What the overlays cost per hour: list prices of the GKE machines they are sized for, kept here with their date.

A snapshot, on purpose: `invoke train --dry-run`, `invoke doctor` and the README quote it without any network
lookup (planning never needs Google's billing API or credentials). Prices change: on-demand rarely, Spot prices
as often as daily, so every estimate names the date and region of the price it uses. Refresh the table from the
source below and run `invoke generate` (the README's cost table is generated from it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from k8s_tasks.overlays import one
from k8s_tasks.sizing import CPU_MACHINE, OVERLAY_MACHINES, PodShape, job_shape, training_machines, webui_machine

PRICES_DATE = "2026-07-30"
PRICES_SOURCE = (
    "Google Cloud Billing Catalog list prices in USD (the SKUs behind https://cloud.google.com/compute/vm-instance-"
    "pricing and https://cloud.google.com/spot-vms/pricing), as compiled per machine type into pricing.yml of "
    "https://github.com/Cyclenerd/google-cloud-pricing-cost-calculator"
)
# GKE's management fee per cluster and hour (https://cloud.google.com/kubernetes-engine/pricing); the free tier's
# monthly credit covers one zonal (or Autopilot) cluster per billing account.
CLUSTER_FEE = 0.10
DEFAULT_REGION = "us-central1"


@dataclasses.dataclass(frozen=True)
class Price:
    """USD per hour of one machine, GPUs included."""

    on_demand: float
    spot: float


# The machines of k8s_tasks.sizing.SHAPES, in the quickstart's region and in the README's example region.
PRICES: dict[str, dict[str, Price]] = {
    "us-central1": {
        "g2-standard-8": Price(0.8536, 0.4799),
        "g2-standard-24": Price(2.0008, 1.1248),
        "a2-highgpu-1g": Price(3.6734, 1.9280),
        "a3-highgpu-8g": Price(88.4900, 50.6095),
        "e2-standard-8": Price(0.2680, 0.1608),
    },
    "europe-west4": {
        "g2-standard-8": Price(0.8972, 0.4708),
        "g2-standard-24": Price(2.1030, 1.1036),
        "a2-highgpu-1g": Price(3.7480, 1.6928),
        "a3-highgpu-8g": Price(112.5405, 44.1188),
        "e2-standard-8": Price(0.2951, 0.1411),
    },
}


def money(amount: float) -> str:
    return f"${amount:,.2f}"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The hourly price of the nodes a Job holds: `nodes` machines of one type in one region."""

    machine: str
    nodes: int
    region: str
    price: Price

    @property
    def on_demand(self) -> float:
        return self.nodes * self.price.on_demand

    @property
    def spot(self) -> float:
        return self.nodes * self.price.spot

    def describe(self, spot: bool | None = None) -> str:
        """`about $2.00/h on-demand, $1.12/h Spot for 1 x g2-standard-24 (us-central1 list prices of <date>)`;
        with `spot` known (a node pool's kind), that price comes first and is marked as the one that applies."""
        machines = f"{self.nodes} x {self.machine}"
        prices = [f"{money(self.on_demand)}/h on-demand", f"{money(self.spot)}/h Spot"]
        if spot is not None:
            prices = [f"{prices[1 if spot else 0]} (this pool)", prices[0 if spot else 1]]
        return f"about {', '.join(prices)} for {machines} ({self.region} list prices of {PRICES_DATE})"


def estimate(machine: str, nodes: int = 1, region: str | None = None) -> Estimate | None:
    """The price of `nodes` machines in `region` (the default region when the table has no price there), or None
    for a machine the table does not price."""
    region = region if region in PRICES else DEFAULT_REGION
    price = PRICES[region].get(machine)
    return Estimate(machine, nodes, region, price) if price is not None else None


def job_estimate(env: str, job: dict[str, Any], region: str | None = None) -> tuple[PodShape, Estimate | None]:
    """The training Job's shape and the price of the machines it is sized for (the overlay's first): one machine
    per pod, as each overlay's training pod fills (or, multi-node, is) one node."""
    shape = job_shape(job)
    return shape, estimate(training_machines(env)[0], shape.pods, region)


def costs_markdown(renders: dict[str, list[dict[str, Any]]]) -> str:
    """The README's table: per overlay, the training Job's hourly price and what stays up while it is deployed.

    `renders`: each overlay's rendered objects (the training Job's pod count, NNODES in multinode, and the WebUI's
    replicas come from there).
    """
    rows = [
        "| Overlay | Training Job runs on | On-demand | Spot | While deployed, between Jobs |",
        "|---|---|---|---|---|",
    ]
    for env, docs in renders.items():
        shape, training = job_estimate(env, one(docs, "Job", "train"))
        assert training is not None, f"no price for {training_machines(env)[0]}: add it to PRICES"
        machine = webui_machine(env)
        webui = estimate(machine)
        assert webui is not None, f"no price for {machine}: add it to PRICES"
        if one(docs, "Deployment", "webui")["spec"].get("replicas", 1):
            shared = any({"train", "webui"} <= set(group) for group in OVERLAY_MACHINES[env][machine])
            idle = (f"the WebUI's `{machine}`" + (" (training's node: no extra one)" if shared else "")
                    + f": {money(webui.on_demand)}/h")
        else:
            idle = f"nothing (the WebUI has 0 replicas; started, its `{machine}` costs {money(webui.on_demand)}/h)"
        rows.append(f"| {env} | {training.nodes} x `{training.machine}` ({shape.describe()}) | "
                    f"{money(training.on_demand)}/h | {money(training.spot)}/h | {idle} |")
    cpu = PRICES[DEFAULT_REGION][CPU_MACHINE]
    rows += [
        "",
        f"{DEFAULT_REGION} list prices of {PRICES_DATE}, GPUs included (`k8s_tasks/prices.py`: {PRICES_SOURCE}; "
        "europe-west4 is in the table too). Spot prices change as often as daily. Not included: the CPU node of "
        f"the quickstart (`{CPU_MACHINE}`, {money(cpu.on_demand)}/h), the cluster fee ({money(CLUSTER_FEE)}/h; the "
        "free tier covers one zonal cluster per billing account), disks, and the storage (Filestore, or your NFS "
        "server).",
    ]
    return "\n".join(rows)

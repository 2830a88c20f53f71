"""Seeded fault injection on the wire, with every injected fault kept as ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge.errors import shown

from .errors import SimError

KINDS = (
    "drop",
    "duplicate",
    "reorder",
    "delay",
    "disconnect",
    "nan",
    "garbage",
    "wrong_features",
    "skew",
    "reboot",
)
# What the runtime cannot answer: these messages are expected to produce an error, not a
# prediction. ("drop" is never delivered at all.)
INVALID = ("nan", "garbage", "wrong_features")
# A reboot changes the device's boot id, restarts its seq at 1 and loses its store-and-forward
# buffer; a message that was in it is never delivered and carries this mark.
LOST_IN_REBOOT = "lost_in_reboot"


@dataclass(frozen=True)
class FaultPlan:
    rates: dict[str, float] = field(default_factory=dict)
    reorder_window: int = 3  # messages a reordered one is held back by
    delay_s: float = 0.3  # length of a delay spike
    disconnect_s: float = 1.0  # how long a device stays offline
    skew_s: float = 5.0  # clock skew of a device's timestamps

    @staticmethod
    def parse(text: str | None) -> FaultPlan:
        """``drop=0.01,duplicate=0.02`` or ``all=0.01`` (every kind at that rate)."""
        rates: dict[str, float] = {}
        named: set[str] = set()
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            name, sep, value = part.partition("=")
            if name in named:  # which rate is meant cannot be told (all=, then one kind: its own)
                raise SimError(f"--faults {shown(text)}: {shown(name)} is given twice")
            named.add(name)
            try:
                rate = float(value) if sep else float("nan")
            except ValueError:
                rate = float("nan")
            if not 0 <= rate <= 1:
                raise SimError(f"--faults {shown(part)}: expected NAME=RATE with RATE in [0, 1]")
            if name == "all":
                rates.update({k: rate for k in KINDS})
            elif name in KINDS:
                rates[name] = rate
            else:
                raise SimError(f"--faults {shown(name)} is not one of all, {', '.join(KINDS)}")
        return FaultPlan(rates)


class Injector:
    """Decides, per message, which faults hit it (at most one of the payload faults)."""

    def __init__(self, plan: FaultPlan, rng: np.random.Generator) -> None:
        self.plan = plan
        self.rng = rng

    def roll(self, kind: str) -> bool:
        rate = self.plan.rates.get(kind, 0.0)
        return rate > 0 and bool(self.rng.random() < rate)

    def payload_fault(self) -> str | None:
        for kind in ("drop", *INVALID):
            if self.roll(kind):
                return kind
        return None

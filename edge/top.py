"""``edge-lstm top``: a live view of running services from their stats and status topics.

Pure logic: ``TopView.update`` takes each stats or status message as it arrives and
``render`` draws the table; the command line does the MQTT and the screen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

COLUMNS = (
    ("runtime", 22),
    ("state", 9),
    ("streams", 8),
    ("msg/s", 8),
    ("pred/s", 8),
    ("err/s", 7),
    ("queue", 6),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("snap s", 7),
    ("top errors", 0),
)
CODE_WIDTH = 32  # an error code as shown (the service's are shorter)


@dataclass
class Runtime:
    state: str = "?"
    stats: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)
    updates: int = 0

    def seconds(self) -> float | None:
        """Seconds between the last two stats messages: by the service's uptime, on a clock
        NTP does not step (a gateway without a real-time clock has its wall clock stepped by
        hours or months after it boots), else (an older service) by their ``ts``."""
        for key in ("uptime_seconds", "ts"):
            try:
                return float(self.stats[key]) - float(self.previous[key])
            except (KeyError, TypeError, ValueError, OverflowError):
                continue
        return None

    def rate(self, key: str) -> float | None:
        """Per second between the last two stats messages (None until there are two, and
        when the counter went down: the service restarted and counts from 0 again)."""
        now, before = self.stats, self.previous
        dt = self.seconds()
        try:
            grown = float(now[key]) - float(before[key])
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        return grown / dt if dt is not None and dt > 0 and grown >= 0 else None

    def error_rate(self) -> float | None:
        now, before = _errors(self.stats), _errors(self.previous)
        dt = self.seconds()
        if dt is None:
            return None
        if any(now.get(code, 0) < n for code, n in before.items()):
            return None  # a count went down: the service restarted and counts from 0 again
        grown = sum(now.values()) - sum(before.values())
        return grown / dt if dt > 0 else None


def _errors(stats: dict[str, Any]) -> dict[str, int]:
    """The error counts of a stats message; anyone may publish one, so a count that is no
    finite number (``Infinity`` in the JSON, a string) is left out."""
    errs = stats.get("errors")
    if not isinstance(errs, dict):
        return {}
    return {str(k): int(v) for k, v in errs.items() if _finite(v)}


def _finite(value: Any) -> bool:
    """A number that ``float()`` takes and that is finite (JSON has Infinity, NaN and ints
    of any length)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) < 2**63


class TopView:
    def __init__(self, stats_prefix: str, status_prefix: str) -> None:
        """``stats_prefix``/``status_prefix``: the topic templates with ``{runtime_id}``
        removed, e.g. ``edge/stats/``: the rest of a topic is the runtime's id."""
        self.stats_prefix = stats_prefix
        self.status_prefix = status_prefix
        self.runtimes: dict[str, Runtime] = {}
        self.ignored = 0  # messages that were not JSON objects

    def update(self, topic: str, payload: bytes) -> str | None:
        """Take one message; returns the runtime id it was about (None when ignored)."""
        kind = next(
            (
                k
                for prefix, k in ((self.stats_prefix, "stats"), (self.status_prefix, "status"))
                if topic.startswith(prefix) and len(topic) > len(prefix)
            ),
            None,
        )
        if kind is None:
            return None
        rid = topic[len(self.stats_prefix if kind == "stats" else self.status_prefix) :]
        try:
            doc = json.loads(payload) if payload else {}
        except (ValueError, UnicodeDecodeError, RecursionError):  # anyone may publish here
            doc = None
        if not isinstance(doc, dict):
            self.ignored += 1
            return None
        rt = self.runtimes.setdefault(rid, Runtime())
        if kind == "status":
            rt.state = str(doc.get("state", "?")) if doc else "gone"
        else:
            rt.previous, rt.stats = rt.stats, doc
            rt.updates += 1
            if rt.state == "?":
                rt.state = "degraded" if doc.get("degraded") else "online"
        return rid

    def render(self) -> str:
        head = "".join(f"{name:<{w}}" if w else name for name, w in COLUMNS)
        lines = [head]
        for rid in sorted(self.runtimes):
            rt = self.runtimes[rid]
            s = rt.stats
            errs = sorted(_errors(s).items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            cells = [
                _shown(rid, 21),
                _shown(rt.state, 8),
                _num(s.get("active_streams")),
                _num(rt.rate("messages_in")),
                _num(rt.rate("predictions_out")),
                _num(rt.error_rate()),
                _num(s.get("queue_depth")),
                _num(s.get("e2e_latency_p50_ms")),
                _num(s.get("e2e_latency_p99_ms")),
                _num(s.get("snapshot_age_seconds")),
                ", ".join(f"{_shown(code, CODE_WIDTH)} {n}" for code, n in errs) or "-",
            ]
            lines.append(
                "".join(f"{c:<{w}}" if w else c for c, (_, w) in zip(cells, COLUMNS, strict=True))
            )
        if not self.runtimes:
            lines.append("(waiting for stats; is edge-lstm serve running with stats_interval > 0?)")
        return "\n".join(lines)


def _shown(text: str, width: int) -> str:
    """``text`` cut to ``width`` with every character a terminal would act on (escape
    sequences, newlines, C1 controls) shown as ``?``: anyone may publish on these topics."""
    return "".join(c if c.isprintable() else "?" for c in text[:width])


def _num(value: Any) -> str:
    if not _finite(value):
        return "-"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"

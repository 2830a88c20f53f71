"""``edge-lstm top``: a live view of running services from their stats and status topics.

Pure logic: ``TopView.update`` takes each stats or status message as it arrives and
``render`` draws the table; the command line does the MQTT and the screen.
"""

from __future__ import annotations

import json
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


@dataclass
class Runtime:
    state: str = "?"
    stats: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)
    updates: int = 0

    def rate(self, key: str) -> float | None:
        """Per second between the last two stats messages (None until there are two)."""
        now, before = self.stats, self.previous
        try:
            dt = float(now["ts"]) - float(before["ts"])
            return (float(now[key]) - float(before[key])) / dt if dt > 0 else None
        except (KeyError, TypeError, ValueError):
            return None

    def error_rate(self) -> float | None:
        total = sum(_errors(self.stats).values())
        before = sum(_errors(self.previous).values())
        try:
            dt = float(self.stats["ts"]) - float(self.previous["ts"])
        except (KeyError, TypeError, ValueError):
            return None
        return (total - before) / dt if dt > 0 else None


def _errors(stats: dict[str, Any]) -> dict[str, int]:
    errs = stats.get("errors")
    if not isinstance(errs, dict):
        return {}
    return {str(k): int(v) for k, v in errs.items() if isinstance(v, (int, float))}


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
                rid[:21],
                rt.state[:8],
                _num(s.get("active_streams")),
                _num(rt.rate("messages_in")),
                _num(rt.rate("predictions_out")),
                _num(rt.error_rate()),
                _num(s.get("queue_depth")),
                _num(s.get("e2e_latency_p50_ms")),
                _num(s.get("e2e_latency_p99_ms")),
                _num(s.get("snapshot_age_seconds")),
                ", ".join(f"{code} {n}" for code, n in errs) or "-",
            ]
            lines.append(
                "".join(f"{c:<{w}}" if w else c for c, (_, w) in zip(cells, COLUMNS, strict=True))
            )
        if not self.runtimes:
            lines.append("(waiting for stats; is edge-lstm serve running with stats_interval > 0?)")
        return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"

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
MAX_PAYLOAD = 1 << 20  # a stats message is a few kB; anyone may publish 10 MB on the topic
MAX_RUNTIMES = 200  # rows kept; the ids past this many (fakes, most likely) are skipped
MAX_COUNT = 2**53  # a count or measurement at or past this is nonsense, shown as "-"
MAX_INSTANCES = 16  # processes remembered per runtime id (each restart is a new one)


@dataclass
class Runtime:
    state: str = "?"
    stats: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)
    updates: int = 0
    # the last stats of each process (``instance``) that published under this id, so that
    # rates are taken between two messages of one process: two runtimes given one
    # runtime_id take turns on its topic, and their counters mixed made nonsense rates
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    twins: set[str] = field(default_factory=set)  # instances seen speaking in turn

    def take(self, doc: dict[str, Any]) -> None:
        """One stats message. An instance that speaks again after another one did is a twin,
        not a restart (a restarted service never comes back as the process it was)."""
        instance = doc.get("instance")
        key = instance if isinstance(instance, str) else ""  # an older service says none
        spoke = next(reversed(self.last), None)
        if key in self.last and key != spoke and spoke is not None:
            self.twins |= {key, spoke}
        self.previous = self.last.pop(key, {})
        self.last[key] = self.stats = doc  # the latest speaker last
        while len(self.last) > MAX_INSTANCES:
            self.last.pop(next(iter(self.last)))
        self.updates += 1

    def seconds(self) -> float | None:
        """Seconds between the last two stats messages: by the service's uptime, on a clock
        NTP does not step (a gateway without a real-time clock has its wall clock stepped by
        hours or months after it boots), else (an older service) by their ``ts``."""
        for key in ("uptime_seconds", "ts"):
            now: Any = self.stats.get(key)
            before: Any = self.previous.get(key)
            if _finite(now) and _finite(before):  # not "1e400" (infinite), a string, ...
                return float(now) - float(before)
        return None

    def rate(self, key: str) -> float | None:
        """Per second between the last two stats messages (None until there are two, and
        when the counter went down: the service restarted and counts from 0 again)."""
        now, before = self.stats, self.previous
        dt = self.seconds()
        a, b = _count(now.get(key)), _count(before.get(key))
        if a is None or b is None:
            return None
        grown = a - b
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
    whole number from 0 to 2**53 (``Infinity`` in the JSON, a string, -5, 1e300) is left out."""
    errs = stats.get("errors")
    if not isinstance(errs, dict):
        return {}
    counts = ((str(k), _count(v)) for k, v in errs.items())
    return {k: n for k, n in counts if n is not None}


def _count(value: Any) -> int | None:
    """``value`` as a count: a whole number from 0 to below 2**53, else None."""
    if not _finite(value) or not 0 <= value < MAX_COUNT or not float(value).is_integer():
        return None
    return int(value)


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
        self.skipped: dict[str, int] = {}  # why -> how many messages were skipped
        self.ignored = 0  # messages skipped, all reasons

    def skip(self, why: str) -> None:
        """Count one message left out (shown under the table: anyone may publish here)."""
        self.skipped[why] = self.skipped.get(why, 0) + 1
        self.ignored += 1

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
        if len(payload) > MAX_PAYLOAD:
            self.skip(f"over {MAX_PAYLOAD >> 20} MiB")
            return None
        try:
            doc = json.loads(payload) if payload else {}
        except (ValueError, UnicodeDecodeError, RecursionError):  # anyone may publish here
            doc = None
        if not isinstance(doc, dict):
            self.skip("not a JSON object")
            return None
        state = doc.get("state", "?") if kind == "status" and doc else "gone"
        if not isinstance(state, str):
            self.skip("a state that is no text")
            return None
        if rid not in self.runtimes and len(self.runtimes) >= MAX_RUNTIMES:
            self.skip(f"past {MAX_RUNTIMES} runtimes")
            return None
        rt = self.runtimes.setdefault(rid, Runtime())
        if kind == "status":
            rt.state = state
        else:
            rt.take(doc)
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
            lines.append(  # a cell as wide as its column or wider (1,000,000 streams) still
                # ends in a space: else it ran into the next one's number
                "".join(
                    f"{c:<{w - 1}} " if w else c for c, (_, w) in zip(cells, COLUMNS, strict=True)
                )
            )
        if not self.runtimes:
            lines.append("(waiting for stats; is edge-lstm serve running with stats_interval > 0?)")
        for rid in sorted(r for r, rt in self.runtimes.items() if rt.twins):
            lines.append(
                f"(runtime {_shown(rid, 40)}: {len(self.runtimes[rid].twins)} processes have"
                " published under this id, and its row shows whichever spoke last; give every"
                " serve a runtime_id of its own)"
            )
        if self.skipped:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            lines.append(f"(skipped messages: {why})")
        return "\n".join(lines)


def fit(frame: str, columns: int, lines: int) -> str:
    """``frame`` cut to a terminal of ``columns`` x ``lines``: a longer line wraps and more
    lines scroll, either way the header goes off the screen and each redraw leaves the
    previous one's lines above it. The last line left says how many were cut."""
    rows = frame.split("\n")
    if len(rows) > lines:
        keep = max(lines - 1, 1)
        cut = f"({len(rows) - keep} more lines: a taller terminal shows them, or --runtime-id ID)"
        rows = [*rows[:keep], cut]
    return "\n".join(row[: max(columns - 1, 1)] for row in rows)


def _shown(text: str, width: int) -> str:
    """``text`` cut to ``width`` with every character a terminal would act on (escape
    sequences, newlines, C1 controls) shown as ``?``: anyone may publish on these topics."""
    return "".join(c if c.isprintable() else "?" for c in text[:width])


def _num(value: Any) -> str:
    """A count, rate or measurement; "-" when there is none or it is nonsense (negative,
    2**53 or more: anyone may publish on the stats topics)."""
    if not _finite(value) or not 0 <= value < MAX_COUNT:
        return "-"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"

"""One micro-batch of MQTT messages in, messages out: decode, log, order, step, answer.

No paho here: the MQTT loop (``edge.mqtt_loop``) feeds ``Inbound`` records and publishes the
``Outbound`` ones, then acknowledges the batch. Everything that must survive a crash is in the
write-ahead log before ``process`` returns.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import payloads
from .config import ServiceConfig
from .engine import Chunk, Engine
from .metrics import Metrics
from .reorder import GapMemory, Reorderer
from .sequencing import U32
from .topics import Template
from .wal import Record, WriteAheadLog

log = logging.getLogger("edge.service")
INVALID_STREAM = "_invalid"


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 1
    content_type: str | None = None
    received: float = 0.0  # wall clock, for end-to-end latency against the device's ts


@dataclass(frozen=True)
class Outbound:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class RateLimitedLog:
    """The first ``burst`` errors of each code per minute at WARNING, the rest at DEBUG."""

    def __init__(self, burst: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.clock = burst, clock
        self.window: dict[str, tuple[float, int]] = {}

    def __call__(self, code: str, msg: str) -> None:
        now = self.clock()
        start, n = self.window.get(code, (now, 0))
        if now - start > 60:
            start, n = now, 0
        self.window[code] = (start, n + 1)
        level = logging.WARNING if n < self.burst else logging.DEBUG
        log.log(
            level,
            "%s: %s%s",
            code,
            msg,
            " (further ones at debug level)" if n + 1 == self.burst else "",
        )


class Processor:
    def __init__(
        self,
        engine: Engine,
        cfg: ServiceConfig,
        wal: WriteAheadLog,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.wal = wal
        self.metrics = metrics
        self.wall = wall
        self.data = Template(cfg.data_topic)
        self.control = Template(cfg.control_topic)
        self.predictions = Template(cfg.prediction_topic)
        self.errors = Template(cfg.error_topic)
        self.runtime_control = cfg.runtime_control_topic.replace("{runtime_id}", cfg.runtime_id)
        self.reorder = Reorderer(cfg.reorder_ms / 1000.0, clock)
        self.gaps = GapMemory()
        self._voids: list[tuple[str, int]] = []
        self.requests: set[str] = set()
        self._log_error = RateLimitedLog(clock=clock)

    # -- batches ----------------------------------------------------------------------------

    def process(self, batch: Iterable[Inbound]) -> list[Outbound]:
        out: list[Outbound] = []
        records: list[Record] = []
        for msg in batch:
            self.metrics.inc("messages_in")
            rec = self._decode(msg, out)
            if rec is not None:
                records.append(rec)
        self.wal.append(records)
        self.metrics.inc("wal_records", len(records))
        return out + self._apply(records)

    def replay(self) -> list[Outbound]:
        """Re-apply the log after a restart; the engine's seq check skips what the snapshot
        already holds, so only the lost tail is stepped (and its predictions re-published)."""
        records = list(self.wal.replay())
        outs = self._apply(records)
        log.info("replayed %d logged messages (%d answers)", len(records), len(outs))
        return outs

    def tick(self) -> list[Outbound]:
        """Release messages held for reordering whose wait is over."""
        return self._step(self.reorder.expire()) if len(self.reorder) else []

    def checkpoint(self, path: Path) -> None:
        """Snapshot the engine, then restart the log with what the snapshot lacks."""
        self.engine.snapshot(path)
        self.wal.rotate(keep=self.reorder.pending())
        self.metrics.inc("snapshots")

    # -- steps ------------------------------------------------------------------------------

    def _decode(self, msg: Inbound, out: list[Outbound]) -> Record | None:
        stream = self.data.stream(msg.topic)
        if stream is None:
            return self._non_data(msg, out)
        if len(msg.payload) > self.cfg.max_payload_bytes:
            detail = f"payload of {len(msg.payload)} bytes exceeds max_payload_bytes {self.cfg.max_payload_bytes}"
            self._error(out, stream, "too_large", detail)
            return None
        try:
            s = payloads.decode(msg.payload, self.engine.manifest.feature_names, msg.content_type)
        except payloads.PayloadError as exc:
            self._error(out, stream, exc.code, exc.detail, exc.seq)
            if exc.seq is not None:
                self._voids.append((stream, exc.seq))
            return None
        if s.seq is None:
            self._error(out, stream, "missing_seq", "every sample message needs a 'seq'")
            return None
        if len(s.values) > self.cfg.max_samples_per_message:
            detail = f"{len(s.values)} samples in one message; max_samples_per_message is {self.cfg.max_samples_per_message}"
            self._error(out, stream, "too_many_samples", detail, s.seq)
            return None
        self.metrics.inc("samples_in", len(s.values))
        return Record(stream, s.seq, s.ts, s.values)

    def _non_data(self, msg: Inbound, out: list[Outbound]) -> Record | None:
        stream = self.control.stream(msg.topic)
        try:
            cmd = json.loads(msg.payload).get("cmd")
        except (ValueError, AttributeError, UnicodeDecodeError):
            cmd = None
        if stream is not None:
            self.metrics.inc("control")
            if cmd == "reset":
                return Record(stream, 0, None, np.empty((0, self.engine.manifest.features)))
            else:
                self._error(
                    out,
                    stream,
                    "unknown_command",
                    f'control {msg.payload[:80]!r}: expected {{"cmd": "reset"}}',
                )
        elif msg.topic == self.runtime_control:
            self.metrics.inc("control")
            if cmd in ("reload", "snapshot"):
                self.requests.add(cmd)
            else:
                self._error(
                    out,
                    INVALID_STREAM,
                    "unknown_command",
                    f"runtime control {msg.payload[:80]!r}: expected reload or snapshot",
                )
        else:
            self._error(
                out,
                INVALID_STREAM,
                "bad_topic",
                f"topic {msg.topic[:200]!r} does not match {self.data.template!r}",
            )
        return None

    def _apply(self, records: list[Record]) -> list[Outbound]:
        out: list[Outbound] = []
        ready: list[Record] = []
        for stream, seq in self._voids:  # refused messages: no need to wait for their seq
            ready += self.reorder.void(stream, seq, self.engine.last_seq(stream))
        self._voids.clear()
        for rec in records:
            if rec.is_reset:  # in order: everything before it steps first
                out += self._step(ready)
                ready = []
                self.engine.reset(rec.stream)
                log.info("stream %s reset by control message", rec.stream)
            else:
                ready += self.reorder.push(rec, self.engine.last_seq(rec.stream))
        ready += self.reorder.expire()
        return out + self._step(ready)

    def _step(self, records: list[Record]) -> list[Outbound]:
        if not records:
            return []
        new = {r.stream for r in records if self.engine.last_seq(r.stream) is None}
        t0 = time.perf_counter()
        outcomes = self.engine.step_many([Chunk(r.stream, r.values, r.seq) for r in records])
        self.metrics.step_latency.observe(time.perf_counter() - t0)
        out: list[Outbound] = []
        now = self.wall()
        labels = (
            self.engine.manifest.labels if self.engine.manifest.output_kind == "classifier" else ()
        )
        model = self.engine.manifest.model_id
        for rec, oc in zip(records, outcomes):
            if oc.duplicates:
                late = self.gaps.late(rec.stream, rec.seq, oc.duplicates)
                if late:
                    detail = f"{late} sample(s) arrived after later ones were applied; dropped (reorder_ms is {self.cfg.reorder_ms:g})"
                    self._error(out, rec.stream, "late", detail, rec.seq)
            if oc.error is not None:
                self._error(out, rec.stream, oc.error.code, str(oc.error), rec.seq)
                continue
            if oc.gap and oc.seq is not None:
                self.gaps.note(rec.stream, (oc.seq - oc.gap) % U32, oc.gap)
            if not len(oc.y):
                continue
            if rec.stream in new and oc.seq is not None:  # it starts here: earlier seqs are late
                new.discard(rec.stream)
                self.gaps.note_start(rec.stream, oc.seq)
            body = payloads.prediction(
                oc.seq, rec.ts, oc.y, model, labels, single=len(rec.values) == 1, gap=oc.gap
            )
            out.append(Outbound(self.predictions.topic(rec.stream), body))
            self.metrics.inc("predictions_out", len(oc.y))
            if rec.ts is not None:
                self.metrics.e2e_latency.observe(max(0.0, now - rec.ts))
        return out

    def _error(
        self, out: list[Outbound], stream: str, code: str, detail: str, seq: int | None = None
    ) -> None:
        self.metrics.error(code)
        self._log_error(code, f"stream {stream} seq {seq}: {detail}")
        out.append(Outbound(self.errors.topic(stream), payloads.error(code, detail, seq)))

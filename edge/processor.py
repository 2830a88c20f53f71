"""The one path every message takes: decode, log, order, step, answer.

No paho here: a transport (``edge.mqtt_loop``) hands in ``Inbound`` batches, publishes what
the ``Outbox`` gives it, reports broker acknowledgements to the outbox, and acknowledges a batch
to the broker once ``handle`` has returned True. Everything a restart needs is in the journal
before ``handle`` returns True; when the journal cannot be written (disk full, read-only),
``handle`` and ``tick`` return False with nothing changed: the transport offers the batch
again, and a later ``tick`` releases what was due for release then.

Any exception while handling one message is contained: that message is answered with error
``internal`` (carrying an id that finds the log line with the traceback), counted, and the rest
of the batch goes on.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import payloads, wal
from .config import ServiceConfig
from .engine import Chunk, Engine, Outcome
from .errors import (
    ConfigError,
    NewerFormat,
    SnapshotError,
    StaleSample,
    StateMismatch,
    shown,
)
from .journal import Journal, Recovery
from .metrics import Metrics
from .outbox import Outbound, Outbox
from .reorder import VOIDS_KEPT, Reorderer
from .restart_flags import RestartFlags
from .sequencing import GAP_POLICIES, HALF, U32, admit, earlier_boot
from .state_store import BOOT_HISTORY, GAP_SLOTS, NO_BOOT, NO_SEQ
from .topics import Template
from .wal import Entry, Evict, Mark, Output, Record, Release, Void

log = logging.getLogger("edge.service")
INVALID_STREAM = "~invalid"  # outside the stream id alphabet: no device can share it
MAX_LATENCY = 3600.0
RETAINED_DETAIL = (
    "a retained message is the broker's stored copy of an earlier one, sent again at every "
    "subscribe: not stepped; publish samples and commands without the retain flag"
)

__all__ = ["Inbound", "Outbound", "Processor"]


@dataclass(slots=True)  # made per message: not frozen, whose __init__ costs 5x
class Inbound:
    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 1
    content_type: str | None = None
    received: float = 0.0  # when it arrived, on the monotonic clock (not stepped by NTP)
    redelivered: bool = False  # the broker's DUP flag
    retained: bool = False  # the broker's stored copy, sent again at each subscribe


@dataclass
class _Round:
    """One batch (or one reorder expiry): what to log first, then what to apply."""

    entries: list[Entry] = field(default_factory=list)
    items: list[Record | Void] = field(default_factory=list)  # in message order
    released: list[Record] = field(default_factory=list)
    evict: list[str] = field(default_factory=list)  # idle streams forgotten before applying
    outs: list[Outbound] = field(default_factory=list)
    lsn: int = 0  # the processor's lsn after this round
    samples: int = 0  # in the messages decoded, counted once per round
    # Counted once the round is logged: a batch the log cannot take is offered again, and
    # counted again as it is read.
    counts: list[tuple[str, int]] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)  # of the refusals decided as it was read
    requests: set[str] = field(default_factory=set)  # runtime commands, asked once it is logged


class RateLimitedLog:
    """The first ``burst`` lines of each code per window at their level (errors at WARNING),
    the rest at DEBUG: a device can send as many as it likes, the log stays readable. The
    window is a minute and doubles, up to an hour, while a code keeps filling it: a fault that
    lasts for months is ~10 lines an hour, not 14,400 a day. Each window that sent lines to
    DEBUG is summed up at the code's next line."""

    MINUTE, HOUR = 60.0, 3600.0

    def __init__(self, burst: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.clock = burst, clock
        self.window: dict[str, tuple[float, float, int]] = {}  # code: start, span, lines

    def __call__(self, code: str, msg: str, level: int = logging.WARNING) -> None:
        now = self.clock()
        start, span, n = self.window.get(code, (now, self.MINUTE, 0))
        if not 0 <= now - start < span:  # over (or the clock stepped back)
            if n > self.burst:
                log.log(
                    level,
                    "%s: %d more in the last %s (at debug level)",
                    code,
                    n - self.burst,
                    _duration(now - start if now > start else span),
                )
            # Filled, and the fault goes on: the next window is twice as long; else a minute.
            going_on = n > self.burst and now - start < 2 * span
            span = min(span * 2, self.HOUR) if going_on else self.MINUTE
            start, n = now, 0
        self.window[code] = (start, span, n + 1)
        log.log(
            level if n < self.burst else logging.DEBUG,
            "%s: %s%s",
            code,
            msg,
            f" (further ones at debug level for up to {_duration(span)})"
            if n + 1 == self.burst
            else "",
        )


def loud(n: int) -> bool:
    """Whether the ``n``-th of a run of like events is logged at its level: the first three,
    the 10th and every 100th; the rest go to debug level. A broker away for a day is
    otherwise a line every ``reconnect_max`` seconds (2,880 a day at 30 s) on the gateway's
    SD card."""
    return n <= 3 or n == 10 or n % 100 == 0


class InARow:
    """A failure that repeats (a server away: the client tries again every half second),
    logged as ``loud`` says; another failure's text is logged at once."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self.said, self.n = "", 0

    def __call__(self, said: str, what: str | None = None, *, note: str | None = None) -> None:
        self.n = self.n + 1 if said == self.said else 1
        self.said = said
        note = note or "while it goes on, more at the 10th and every 100th"
        self.logger.log(
            logging.WARNING if loud(self.n) else logging.DEBUG,
            "%s: %s%s",
            what or self.what,
            said,
            f" ({note})" if self.n == 3 else "",
        )

    def over(self) -> None:
        """It works again: the next failure is the first of a new run."""
        self.said, self.n = "", 0


def _duration(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:.0f} h"


def storage_fault(what: str, exc: BaseException, state_dir: str) -> str:
    """The reason a degraded status gives for a storage error: what failed, why, the errno's
    name and the directory (``state_dir not writable: Read-only file system (EROFS) in
    /var/lib/edge-lstm``); the text of the error alone named neither of the last two."""
    why = getattr(exc, "strerror", None) or str(exc)
    code = errno.errorcode.get(getattr(exc, "errno", None) or 0)
    return f"{what}: {why}{f' ({code})' if code else ''} in {state_dir}"


def _u32(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < U32


class Processor:
    def __init__(
        self,
        engine: Engine,
        cfg: ServiceConfig,
        journal: Journal,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        lsn_from_mid: bool = False,
    ) -> None:
        self.cfg = cfg
        # A message's lsn is its transport id (a stream sequence, increasing) when that is the
        # same for every process that may handle it: answers are then named after it alike.
        self.lsn_from_mid = lsn_from_mid
        self.journal = journal
        self.metrics = metrics
        self.wall = wall
        self.data = Template(cfg.data_topic)
        self.control = Template(cfg.control_topic)
        self.predictions = Template(cfg.prediction_topic)
        self.errors = Template(cfg.error_topic)
        self.replies = Template(cfg.reply_topic)
        self.runtime_control = cfg.runtime_control_topic.replace("{runtime_id}", cfg.runtime_id)
        self.reorder = Reorderer(cfg.reorder_ms / 1000.0, clock, cfg.restart_gap)
        # The configured replay settings (``_replay_settings``) while the log is still written
        # with those it was recovered with (changed before the restart): a checkpoint switches.
        self._switch: dict[str, Any] | None = None
        self.idle_timeout = cfg.idle_timeout  # applied here, not in the engine: it is logged
        self.outbox = Outbox(cfg.max_unacked)
        self.requests: set[str] = set()
        self._asked: set[str] = set()  # the requests the checkpoint in flight answers
        self.done_requests: set[str] = set()  # answered by a durable checkpoint, until told
        self.lsn = 0  # of the last message taken in
        self.mark = 0  # the last ack mark logged
        self.degraded: str | None = None  # why the journal cannot be written, while it cannot
        self._restarted = RestartFlags()  # streams whose next answer says "restart"
        self._kept_restarted: set[str] = set()  # the same, of streams whose state was kept
        # After a loss whose streams are not known (a log damaged or missing before the oldest
        # snapshot kept, a replay that could not reach back far enough), every stream new to
        # the engine may be one whose state went: its first answer says restart.
        self._unknown_lost = False
        # Of the batch being stepped, the streams the engine did not hold: only their answers
        # take a restart flag (the first after they lost their state).
        self._fresh: set[str] = set()
        self._replaying = False  # the log is being replayed (``recover``)
        # The lsn up to which another process published the answers already (a worker's
        # predecessor on a partition, whose messages this one steps again after a takeover).
        self.sent_before = 0
        self._log_note = RateLimitedLog(clock=clock)
        # Control resets applied, by the broker's packet id of their message: (stream, seq,
        # boot, rebase, the next seq they left, lsn). The broker sends a message again (DUP)
        # when our acknowledgement did not reach it, and the messages after it too. A reset
        # applied again as it came zeroed the state the samples after it built, and their
        # copies were duplicates then; it is applied again with the numbering its first copy
        # left, so that they are stepped again. An id is forgotten when the broker gives it to
        # a new message: it had our acknowledgement by then.
        self._resets: dict[int, tuple[str, int, int | None, bool, int | None, int]] = {}
        self._voids_counted = 0  # the reorder buffer's refused seqs let go, counted so far
        self.engine = engine
        journal.checkpoint_estimate = self._checkpoint_estimate

    @property
    def engine(self) -> Engine:
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        if self._switch is not None:  # the log is written with the recovered settings still
            engine.gap_policy, engine.restart_gap = self.engine.gap_policy, self.engine.restart_gap
        old = getattr(self, "_engine", None)
        if old is not None and old.store.paused_at is not None and engine.store.paused_at is None:
            engine.store.pause()  # a reload while cut off: idle time still stands still
        self._engine = engine
        engine.store.on_evict = self._forget
        # A stream's bytes in a snapshot: state tensors, seq, boot ids, gaps, room for its id
        # and its idle seconds.
        layout = engine.manifest.state_layout()
        state = sum(width * np.dtype(dtype).itemsize for _, width, dtype, _, _ in layout)
        self._stream_bytes = state + 8 * (1 + BOOT_HISTORY + 2 * GAP_SLOTS) + 60

    def _checkpoint_estimate(self) -> tuple[int, int]:
        """Bytes a checkpoint now would write: a snapshot of the streams held, and the entries
        carried over (answers not yet acknowledged, messages held). Asked at every append."""
        snapshot = len(self.engine.store) * self._stream_bytes
        held = len(self.reorder) * (8 * self.engine.manifest.features + 96)
        return snapshot, self.outbox.open_bytes + 48 * len(self.outbox) + held

    def pause(self) -> None:
        """Nothing can arrive from now on (the transport stops reading: starting, or cut off
        from its broker, which keeps the devices' messages meanwhile): reordering waits and
        idle time stand still."""
        self.reorder.pause()
        self.engine.store.pause()

    def resume(self) -> None:
        """Messages can arrive again: waits and idle time go on from where they stood."""
        self.reorder.resume()
        self.engine.store.resume()

    def restarted(self, streams: Iterable[str]) -> None:
        """These streams lost their state: their next answers say ``restart``."""
        for stream in streams:
            self._restarted.set(stream)

    def _forget(self, streams: list[str]) -> None:
        """Streams evicted (least recently used beyond ``capacity``, or idle): they start
        again from the zero state, and their next answers say so."""
        self.reorder.forget(streams)
        self._kept_restarted.difference_update(streams)
        self.restarted(streams)

    # -- start-up ---------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Restore the newest intact snapshot and replay the log on top of it. Answers the
        broker had not acknowledged go to the outbox again; the rest are not repeated."""
        try:
            rec = self.journal.recover(lambda p: self.engine.restore(p, other_model_ok=True))
        except NewerFormat as exc:
            raise ConfigError(
                f"state_dir {self.cfg.state_dir} was written by a later edge-lstm ({exc}); serve "
                "it with that version, or give another (or an empty) state_dir"
            ) from None
        except StateMismatch as exc:
            raise self._foreign(str(exc)) from None
        if shed := self.engine.store.stats.evicted_lru:  # a snapshot beyond this capacity
            log.warning(
                "the snapshot holds %d streams, capacity is %d: the %d least recently used "
                "were evicted (their next predictions say restart)",
                len(self.engine.store) + shed,
                self.engine.store.capacity,
                shed,
            )
        features = self.engine.manifest.features
        for entry in rec.entries:
            if isinstance(entry, Record) and entry.values.shape[-1] != features:
                raise self._foreign(
                    f"its log holds samples of {entry.values.shape[-1]} features "
                    f"(stream {entry.stream}), this model takes {features}"
                )
        for problem in rec.damaged_snapshots:
            log.error("snapshot unusable, falling back to an older generation: %s", problem)
            self.metrics.inc("snapshots_damaged")
        for line in rec.damage:
            log.error("write-ahead log: %s", line)
            self.metrics.inc("wal_damaged")
        self.lsn = self.mark = rec.last_lsn
        self._recovered_settings(rec.extra.get("replay"))
        self._load_reorder(rec.extra)
        self._load_flags(rec.extra.get("restart") or {})
        self._load_resets(rec.extra.get("resets"))
        outs: list[Outbound] = []
        r = _Round()
        # Answers computed again, not samples answered now: their age is the time since the
        # crash (a power cut, a reboot), which would read as end-to-end latency (``_step_one``).
        self._replaying = True
        try:
            for i, entry in enumerate(rec.entries):
                if isinstance(entry, Output):
                    outs.append(Outbound(entry.topic, entry.payload, lsn=entry.lsn))
                elif isinstance(entry, (Record, Void)):
                    r.items.append(entry)
                elif isinstance(entry, Release):
                    r.released += self.reorder.force(entry.stream, entry.seq)
                elif isinstance(entry, Evict):  # logged first in its round: forgotten before it
                    self.engine.store.evict([entry.stream])
                if i not in rec.joined:  # the end of a round: stepped whole, as the run stepped it
                    outs += self._apply(r)
                    r = _Round()
        finally:
            self._replaying = False
        # The broker holds at most 65535 messages unacknowledged: older resets are not resent.
        self._resets = {
            pid: was for pid, was in self._resets.items() if was[5] > self.lsn - (1 << 16)
        }
        again = [o for o in outs if o.lsn > rec.acked]
        if not rec.exact or rec.lost:
            self.assume_lost(
                "the log was damaged (see above): acknowledged samples may be missing from "
                "the streams' state"
                if rec.exact
                else "no usable snapshot and the log does not reach back to the start"
            )
            # Computed again on that state, the answers not yet acknowledged may differ from
            # what went out before the crash: they say so.
            again = [self._restart_flagged(o) for o in again]
        self.outbox.put(again)
        self.mark = rec.acked
        log.info(
            "recovered generation %d: %d log entries replayed, %d answers published again "
            "(%d already acknowledged)",
            rec.generation,
            len(rec.entries),
            len(again),
            len(outs) - len(again),
        )
        self.metrics.inc("republished", len(again))
        if rec.damage or rec.damaged_snapshots:
            self.requests.add("checkpoint")  # retire the damaged files soon (not a command)
        return rec

    def _replay_settings(self) -> dict[str, Any]:
        """The settings that decide what a logged sample does to its stream when the log is
        replayed: a snapshot records those its log goes on with."""
        engine = self.engine
        return {
            "reorder_hold": self.reorder.hold,
            "gap_policy": engine.gap_policy,
            "restart_gap": engine.restart_gap,
        }

    def _put_settings(self, settings: dict[str, Any]) -> None:
        self.reorder.hold = settings["reorder_hold"]
        self.reorder.restart_gap = self.engine.restart_gap = settings["restart_gap"]
        self.engine.gap_policy = settings["gap_policy"]

    def _recovered_settings(self, logged: Any) -> None:
        """Replay the log with the settings it was written with, and go on with them until a
        checkpoint (asked for now) starts a log written with the configured ones."""
        now = self._replay_settings()
        if not isinstance(logged, dict):
            return  # a snapshot of an earlier version: the configured ones
        was = {**now, **{k: v for k, v in logged.items() if k in now}}
        hold, policy, gap = was["reorder_hold"], was["gap_policy"], was["restart_gap"]
        if not (
            type(hold) in (int, float)
            and hold >= 0
            and policy in GAP_POLICIES
            and type(gap) is int
            and 0 <= gap < HALF
        ):
            log.error("replay settings in the snapshot unreadable (%s); the configured ones", was)
            return
        if was != now:
            log.warning(
                "the log was written with %s, the configuration says %s: replayed with the "
                "former, the latter from the next snapshot on (taken at once)",
                was,
                now,
            )
            self._switch = now
            self._put_settings({**was, "reorder_hold": float(hold)})
            self.requests.add("checkpoint")

    def assume_lost(self, why: str) -> None:
        """Samples of unknown streams may be missing from the state: the streams held go on
        from what they have, and every stream's next answer says restart, also the answer of
        a stream the engine holds no state for (it may be one whose state went)."""
        self._kept_restarted.update(self.engine.store.streams)
        self._unknown_lost = True
        log.error("%s: every stream goes on from there; their next predictions say restart", why)

    def _flags(self) -> dict[str, Any]:
        """The restart flags not yet taken, for a snapshot: a restart of the runtime must not
        take them with it."""
        doc: dict[str, Any] = {}
        if self._unknown_lost:
            doc["unknown"] = True
        if self._kept_restarted:
            doc["kept"] = sorted(self._kept_restarted & set(self.engine.store.streams))
        if (evicted := self._restarted.export()) is not None:
            doc["evicted"] = evicted
        return doc

    def _load_flags(self, doc: dict[str, Any]) -> None:
        try:
            self._unknown_lost = bool(doc.get("unknown"))
            kept = (str(s) for s in doc.get("kept") or ())
            self._kept_restarted = {s for s in kept if s in self.engine.store}
            self._restarted.load(doc.get("evicted"))  # beside those of streams evicted by it
        except (TypeError, ValueError, AttributeError, zlib.error) as exc:  # a later version's
            log.error(
                "restart flags in the snapshot unreadable (%s): every stream's next "
                "prediction says restart",
                exc,
            )
            self._restarted = RestartFlags()
            self._unknown_lost = True

    def _load_resets(self, saved: Any) -> None:
        try:
            for pid, stream, seq, boot, rebase, nxt, lsn in saved or ():
                boot, nxt = (None if v is None else int(v) for v in (boot, nxt))
                self._resets[int(pid)] = (str(stream), int(seq), boot, bool(rebase), nxt, int(lsn))
        except (TypeError, ValueError, OverflowError) as exc:  # a header of a later version
            log.error("resets in the snapshot unreadable (%s): redeliveries reset anew", exc)

    def _load_reorder(self, extra: dict[str, Any]) -> None:
        """What the reorder buffer expected of each stream. Unreadable (a header of another
        writer: a traceback at start until it was caught), it expects what the engine says."""
        for load, key in (
            (self.reorder.load, "reorder"),
            (self.reorder.load_boots, "reorder_boots"),
            (self.reorder.load_fresh, "reorder_fresh"),
        ):
            try:
                load(extra.get(key) or {})
            except (TypeError, ValueError, AttributeError, OverflowError) as exc:
                log.error(
                    "%s in the snapshot unreadable (%s): the engine's last seq is expected",
                    key,
                    exc,
                )

    def _packet_id(self, msg: Inbound) -> int:
        """The broker's packet id of a message (0: none, or not an MQTT broker's)."""
        return 0 if self.lsn_from_mid or not msg.qos else msg.mid & 0xFFFF

    def unsendable(self, o: Outbound, limit: str) -> Outbound:
        """In place of an answer larger than the transport carries (``limit`` says what it
        exceeds; the prediction of a message of many samples): a report that says so. Sent,
        it was refused and sent again without end, and every later answer waited behind it."""
        stream = self.predictions.stream(o.topic) or self.errors.stream(o.topic)
        try:
            seq = json.loads(o.payload).get("seq")
        except (ValueError, AttributeError, RecursionError):
            seq = None
        detail = (
            f"answer of {len(o.payload)} bytes exceeds {limit}; not sent: send fewer samples "
            "per message"
        )
        self._log_note("answer_too_large", f"stream {stream} seq {seq}: {detail}", logging.ERROR)
        self.metrics.error("answer_too_large")
        body = payloads.error("answer_too_large", detail, seq if isinstance(seq, int) else None)
        return Outbound(self.errors.topic(stream or INVALID_STREAM), body, o.qos, lsn=o.lsn)

    def _restart_flagged(self, o: Outbound) -> Outbound:
        if self.predictions.stream(o.topic) is None:
            return o
        doc = json.loads(o.payload)
        doc["restart"] = True
        return dataclasses.replace(o, payload=payloads.dumps(doc))

    def _foreign(self, problem: str) -> ConfigError:
        """The state directory belongs to another model: replaying it into this one would
        answer wrongly, and the next checkpoint would delete it. Nothing is touched."""
        return ConfigError(
            f"state_dir {self.cfg.state_dir} holds the state of another model ({problem}); "
            "serve it with the bundle that wrote it, or give another (or an empty) state_dir"
        )

    # -- batches ----------------------------------------------------------------------------

    def handle(self, batch: Sequence[Inbound], dropped: Sequence[Inbound] = ()) -> bool:
        """Take a batch in (and report ``dropped`` messages as dropped). False: the journal
        cannot be written; nothing was changed and the batch must not be acknowledged."""
        r = _Round(lsn=self.lsn)
        for msg in (*dropped, *batch):
            if self._resets and not msg.redelivered and (pid := self._packet_id(msg)):
                self._resets.pop(pid, None)  # a new message with the id: the reset was acked
        for msg in dropped:
            r.lsn += 1
            self._drop(msg, r)
        r.counts.append(("messages_in", len(batch)))
        for msg in batch:
            r.lsn = max(r.lsn + 1, msg.mid) if self.lsn_from_mid else r.lsn + 1
            try:
                self._decode(msg, r)
            except Exception as exc:  # one message must never stop the service
                o = self._internal(self.data.stream(msg.topic) or INVALID_STREAM, exc, r.lsn, r=r)
                r.outs.append(o)
                r.entries.append(Output(o.lsn, o.topic, o.payload))
        r.counts.append(("samples_in", r.samples))
        came = [m.received for m in batch if m.received]  # 0: not stamped
        self._idle(r, min(came) if came else None)
        return self._run(r)

    def answered(self, released: Sequence[Record] = ()) -> int:
        """The lsn up to which every message's answers were acknowledged: messages held, or
        ``released`` by a round not yet applied, are yet to be answered."""
        held = [rec.lsn for rec in (*self.reorder.pending(), *released)]
        return self.outbox.watermark(self.lsn, min(held) if held else None)

    def tick(
        self, *, settle: bool = True, release_all: bool = False, horizon: float | None = None
    ) -> bool:
        """Release reorder-held messages whose wait is over (``release_all``: every one, now);
        forget streams idle past ``idle_timeout``; log how far answers are acked.
        ``settle=False``: a degraded state stays (a batch is still waiting for room).
        ``horizon``: when the oldest message received and not yet handed in arrived, on the
        processor's clock (``Reorderer.expire``). False: the journal cannot be written;
        nothing was changed (what was due for release is held as before, and released by a
        later round)."""
        held = len(self.reorder)
        idle = bool(self.idle_timeout) and bool(
            self.engine.store.idle(self.idle_timeout, horizon=horizon)
        )
        if (
            not held
            and not idle
            and self.degraded is None
            and self.outbox.watermark(self.lsn) <= self.mark
        ):
            return True  # nothing to release or forget, nothing newly acknowledged: no log
        r = _Round(lsn=self.lsn)
        saved = self.reorder.save() if held else None
        if held:
            r.released = self.reorder.expire(force=release_all, horizon=horizon)
            r.entries += [Release(s, q) for s, q in self.reorder.forced]
            self.reorder.forced.clear()
        self._idle(r, horizon)
        if self._run(r, settle=settle):
            return True
        # Neither logged nor applied, the released records wait again, held as before: a
        # checkpoint carries them so, and a later round releases, logs and applies them as a
        # replay then does (kept released instead, a checkpoint carried them with the buffer's
        # expectation past them, and a replay stepped them ahead of the round's evictions).
        if saved is not None:
            self.reorder.restore(saved)
        return False

    def _idle(self, r: _Round, horizon: float | None = None) -> None:
        """Streams idle past ``idle_timeout`` are forgotten before this round applies; logged
        first, so a replay forgets them at the same point. Also in a round that takes nothing
        in: a gateway that hears from nobody any more forgets its streams all the same.
        ``horizon``: when the oldest message not yet worked off arrived; idle time counts up
        to there, as a stream whose message waits in a backlog was heard when it came."""
        if self.idle_timeout:
            r.evict = self.engine.store.idle(self.idle_timeout, horizon=horizon)
            if r.evict and (r.released or len(self.reorder)):
                # A message held for reordering (released now, or still waiting) came when its
                # stream was not idle (else the stream was forgotten then): it is not now.
                heard = {rec.stream for rec in r.released}
                r.evict = [s for s in r.evict if s not in heard and not self.reorder.holds(s)]
            r.entries[:0] = [Evict(s) for s in r.evict]

    def _run(self, r: _Round, *, settle: bool = True) -> bool:
        """Log the round, then apply it. When the log cannot be written, nothing is applied:
        the transport offers a batch again, a reorder expiry is decided again by a later tick."""
        mark = self.answered(r.released)
        if mark > self.mark:
            r.entries.append(Mark(mark))
        if r.entries:
            try:
                # a round of no new messages only shrinks what the next checkpoint carries
                self.journal.append(r.entries, keep_reserve=bool(r.items))
            except OSError as exc:
                if self.degraded is None:
                    log.error(
                        "cannot write the log in %s: %s; not acknowledging", self.cfg.state_dir, exc
                    )
                    self.metrics.inc("storage_errors")
                self.degraded = storage_fault("state_dir not writable", exc, self.cfg.state_dir)
                return False
            if self.journal.crowded():
                self.requests.add("checkpoint")
        if settle and r.entries:  # a round that wrote nothing says nothing of the directory
            self._writable_again()
        self.mark = max(self.mark, mark)
        self.lsn = r.lsn
        for name, n in r.counts:
            self.metrics.inc(name, n)
        for code in r.codes:
            self.metrics.error(code)
        self.requests |= r.requests
        if r.evict:
            self.engine.store.evict(r.evict)
        if r.items:
            self.metrics.inc("wal_records", sum(isinstance(i, Record) for i in r.items))
        self.outbox.put(r.outs + self._apply(r))
        return True

    def _writable_again(self) -> None:
        if self.degraded is not None:
            log.warning("the log in %s is writable again; resuming", self.cfg.state_dir)
            self.degraded = None

    def checkpoint(self, if_changed: bool = False, *, background: bool = False) -> bool:
        """Snapshot the engine into a new generation; False (and degraded) when it cannot.
        ``if_changed``: not when nothing was logged since the last one (an idle device would
        write the same snapshot every ``snapshot_interval``, wearing its SD card out).
        Messages held for reordering are carried into the new segment, held, for a replay
        to hold them as this does; a release the log could not take left them held (a full
        disk, or a directory whose files were removed, gets its space and files back from
        the checkpoint before that release has to be logged).
        ``background``: the state is copied now and written by a thread while messages are
        answered on (the write of 10,000 streams held every answer for tens of ms);
        ``checkpoint_done`` tells when it is durable. A checkpoint that switches the replay
        settings or mends a lost segment is written before this returns: the log after it
        must not be replayed on the snapshot before. Without ``background`` a checkpoint in
        flight is waited for first."""
        if self.journal.checkpointing:
            if background:
                return True  # one at a time: asked again once this one is done
            if not self.checkpoint_done(wait=True):
                return False
        switch = self._switch
        if if_changed and switch is None and not self.journal.changed:
            self.metrics.saved()
            return True
        # What waits was taken with the settings recovered: released (and logged) with them.
        if switch is not None and not self.tick(release_all=True):
            return False
        lost = self.journal.lost
        background = background and switch is None and lost is None
        carry: list[Entry] = [
            dataclasses.replace(rec, carried=True) for rec in self.reorder.pending()
        ]
        carry += [
            Output(o.lsn, o.topic, o.payload, carried=True)
            for o in self.outbox.unacknowledged()
            if o.qos and o.lsn
        ]
        carry.append(Mark(self.mark))
        try:
            extra = {
                "lsn": self.lsn,
                "reorder": self.reorder.export(self.engine.last_seq),
                "reorder_boots": self.reorder.export_boots(self._held_boots),
                "reorder_fresh": self.reorder.export_fresh(),
                "replay": self._replay_settings() if switch is None else switch,
                "restart": self._flags(),
                "resets": [[pid, *was] for pid, was in self._resets.items()],
            }
            self.journal.start_checkpoint(
                self.engine.take_snapshot, carry, extra, background=background
            )
        except (OSError, SnapshotError) as exc:  # the engine names the file in a SnapshotError
            self._snapshot_failed(exc)
            return False
        self._asked = self.requests & {"snapshot", "checkpoint"}
        if background:
            return True
        if not self.checkpoint_done(wait=True):
            return False
        self._writable_again()  # a new generation written whole
        if switch is not None:
            log.info("the configured %s in effect from this snapshot on", switch)
            self._put_settings(switch)
            self._switch = None
        if lost:
            log.warning("%s: the state written out again in a new generation", lost)
        return True

    def checkpoint_done(self, *, wait: bool = False) -> bool:
        """Whether the checkpoint begun last is durable now (False: still being written, none
        in flight, or failed, which degrades). The requests it was begun for are then
        answered: taken out of ``requests`` into ``done_requests``."""
        if not self.journal.checkpointing or not (wait or self.journal.pending_done()):
            return False
        try:
            self.journal.finish()
        except (OSError, SnapshotError) as exc:
            self._snapshot_failed(exc)
            return False
        self.metrics.inc("snapshots")
        self.requests -= self._asked
        self.done_requests |= self._asked
        self._asked = set()
        return True

    def _snapshot_failed(self, exc: OSError | SnapshotError) -> None:
        if self.degraded is None:
            log.error("snapshot failed in %s: %s; retrying later", self.cfg.state_dir, exc)
            self.metrics.inc("storage_errors")
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        named = cause if cause is not None and getattr(cause, "strerror", None) else exc
        self.degraded = storage_fault("snapshot failed", named, self.cfg.state_dir)

    # -- decoding ---------------------------------------------------------------------------

    def _decode(self, msg: Inbound, r: _Round) -> None:
        stream = self.data.stream(msg.topic)
        if msg.retained:
            # Not a new sample or command: the broker sends its stored copy at every
            # subscribe, so stepping it would count an old sample again (and a retained
            # reset would reset the stream at every reconnect).
            where = stream or self.control.stream(msg.topic) or INVALID_STREAM
            self._error(r, where, "retained", RETAINED_DETAIL)
            return
        if stream is None:
            self._non_data(msg, r)
            return
        if len(msg.payload) > self.cfg.max_payload_bytes:
            detail = f"payload of {len(msg.payload)} bytes exceeds max_payload_bytes {self.cfg.max_payload_bytes}"
            self._error(r, stream, "too_large", detail)
            return
        try:
            s = payloads.decode(msg.payload, self.engine.manifest.feature_names, msg.content_type)
        except payloads.PayloadError as exc:
            self._error(r, stream, exc.code, exc.detail, exc.seq)
            if exc.seq is not None:
                self._take(r, Void(stream, exc.seq))
            return
        if s.seq is None:
            self._error(r, stream, "missing_seq", "every sample message needs a 'seq'")
            return
        if len(s.values) > self.cfg.max_samples_per_message:
            detail = f"{len(s.values)} samples in one message; max_samples_per_message is {self.cfg.max_samples_per_message}"
            self._error(r, stream, "too_many_samples", detail, s.seq)
            self._take(r, Void(stream, s.seq))
            return
        k, f = s.values.shape
        if (size := wal.sample_record_size(stream, k, f)) > wal.MAX_BODY:
            detail = f"{k} samples of {f} features make a log record of {size} bytes; the log holds at most {wal.MAX_BODY}"
            self._error(r, stream, "too_many_samples", detail, s.seq)
            self._take(r, Void(stream, s.seq))
            return
        r.samples += k
        self._take(
            r, Record(stream, s.seq, s.ts, s.values, s.boot, r.lsn, redelivered=msg.redelivered)
        )

    def _non_data(self, msg: Inbound, r: _Round) -> None:
        stream = self.control.stream(msg.topic)
        if stream is None and msg.topic != self.runtime_control:
            detail = f"topic {shown(msg.topic, 200)} does not match {shown(self.data.template)}"
            self._error(r, INVALID_STREAM, "bad_topic", detail)
            return
        r.counts.append(("control", 1))
        where = stream or INVALID_STREAM
        if len(msg.payload) > self.cfg.max_payload_bytes:
            detail = f"control payload of {len(msg.payload)} bytes exceeds max_payload_bytes"
            self._error(r, where, "too_large", detail)
            return
        try:
            doc = payloads.parse_control(msg.payload)
        except payloads.PayloadError as exc:
            self._error(r, where, exc.code, f"control message: {exc.detail}")
            return
        cmd = doc.get("cmd") if isinstance(doc, dict) else None
        if stream is None:
            if cmd in ("reload", "snapshot"):
                r.requests.add(cmd)
            else:
                detail = f"runtime control {shown(msg.payload)}: expected reload or snapshot"
                self._error(r, where, "unknown_command", detail)
            return
        if cmd != "reset":
            detail = f'control {shown(msg.payload)}: expected {{"cmd": "reset"}}'
            self._error(r, stream, "unknown_command", detail)
            return
        assert isinstance(doc, dict)
        seq, boot = doc.get("seq"), doc.get("boot")
        for name, value in (("seq", seq), ("boot", boot)):
            if value is not None and not _u32(value):
                detail = f"reset {name} {shown(value)} is not an unsigned 32-bit integer"
                self._error(r, stream, f"bad_{name}", detail)
                return
        empty = np.empty((0, self.engine.manifest.features))
        rebase = seq is not None
        pid = self._packet_id(msg)
        rec = Record(stream, seq or 0, None, empty, boot, r.lsn, rebase=rebase, mid=pid)
        rec.redelivered = msg.redelivered
        self._take(r, rec)

    @staticmethod
    def _take(r: _Round, item: Record | Void) -> None:
        """Take a sample message (or the seq of a refused one) in: applied and logged in order."""
        r.items.append(item)
        r.entries.append(item)

    def _drop(self, msg: Inbound, r: _Round) -> None:
        """A message given up on under overload: answered as dropped, never silently."""
        stream = self.data.stream(msg.topic) or self.control.stream(msg.topic) or INVALID_STREAM
        seq: int | None = None
        count: int | None = None
        try:
            s = payloads.decode(msg.payload, self.engine.manifest.feature_names, msg.content_type)
            seq, count = s.seq, len(s.values)
            if seq is not None and count and self._applied(stream, seq, count, s.boot):
                # A redelivery of samples applied (and predicted) already: not dropped.
                if not msg.redelivered:
                    detail = f"{count} sample(s) from seq {seq} were applied already; dropped"
                    self._error(r, stream, "duplicate", detail, seq, {"count": count})
                return
            if (
                msg.redelivered
                and s.boot is not None
                and earlier_boot(s.boot, *self.engine.boots(stream))
            ):
                return  # a copy of a boot the device has left since: answered already
        except payloads.PayloadError as exc:
            seq = exc.seq
        except Exception:  # the drop is reported without its seq then
            log.debug("could not decode a dropped message", exc_info=True)
        r.counts.append(("dropped_overload", 1))
        detail = f"{count or 'the'} sample(s) dropped: the runtime is overloaded (overload = drop-oldest)"
        self._error(r, stream, "dropped", detail, seq)
        if seq is not None and self.data.stream(msg.topic) is not None:
            # Reported: its stream's next samples do not wait reorder_ms for it.
            self._take(r, Void(stream, seq))

    def _held_boots(self, stream: str) -> tuple[int | None, list[int]]:
        """The boot ids of a stream the engine holds, none of an evicted one: it keeps only
        its current boot, the reorder buffer's (saved in a snapshot) names earlier ones."""
        return self.engine.boots(stream) if stream in self.engine.store else (None, [])

    def _last_seq(self, stream: str) -> int | None:
        """The stream's last applied seq, also of a stream evicted since (it keeps it)."""
        last = self.engine.last_seq(stream)
        if last is None and stream not in self.engine.store:
            kept = self.engine.store.departed.peek(stream)
            last = None if kept is None or kept[0] == NO_SEQ else kept[0]
        return last

    def _applied(self, stream: str, seq: int, count: int, boot: int | None) -> bool:
        """Whether every sample of a message was applied already (same boot, seq behind),
        also by a stream evicted since (it keeps its last seq and boot)."""
        last = self._last_seq(stream)
        current, _ = self.engine.boots(stream)
        if last is None or (boot is not None and boot != current):
            return False
        return admit(last, seq, count).duplicates == count

    # -- stepping ---------------------------------------------------------------------------

    def _apply(self, r: _Round) -> list[Outbound]:
        out: list[Outbound] = []
        ready: list[Record] = []
        stepped: list[Record] = []
        for item in r.items:  # in message order, as the log has them for a replay
            if isinstance(item, Void):  # a refused message: no need to wait for its seq
                ready += self.reorder.void(item.stream, item.seq, self.engine.last_seq(item.stream))
            elif item.is_reset:  # in order: everything before it steps first, held or not
                ready += self.reorder.end(item.stream)
                out += self._step(ready)
                stepped += ready
                ready = []
                out += self._reset(item)
            else:
                ready += self.reorder.push(item, self.engine.last_seq, self.engine.boots)
        stepped += ready + r.released
        out += self._step(ready + r.released)
        # A stream the engine refused every sample of holds no state: what the reorder buffer
        # learnt of it goes too (else each such id ever heard is kept, and snapshotted).
        store = self.engine.store
        self.reorder.forget({rec.stream for rec in stepped if rec.stream not in store})
        if self.reorder.voids_forgotten != self._voids_counted:
            self._voids_let_go()
        return out

    def _voids_let_go(self) -> None:
        """Refused seqs the reorder buffer let go (``VOIDS_KEPT``): counted, said once."""
        gone = self.reorder.voids_forgotten - self._voids_counted
        first = not self._voids_counted
        self._voids_counted = self.reorder.voids_forgotten
        self.metrics.inc("reorder_voids_forgotten", gone)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "reorder_voids_forgotten: %d refused seqs past open gaps let go, of streams whose "
            "gap has stayed open while their messages are refused (kept at most %d in all, "
            "the farthest ahead let go first; counted in reorder_voids_forgotten): a sample "
            "behind one of them waits reorder_ms for it%s",
            gone,
            VOIDS_KEPT,
            " (said once)" if first else "",
        )

    def _reset(self, rec: Record) -> list[Outbound]:
        next_seq = rec.seq if rec.rebase else None
        was = self._resets.get(rec.mid) if rec.mid else None
        again = (
            rec.redelivered
            and was is not None
            and was[:4] == (rec.stream, rec.seq, rec.boot, rec.rebase)
        )
        if again and was is not None and was[4] is not None:
            next_seq = was[4]  # the samples after the first copy come again: stepped again
        try:
            self.engine.reset(rec.stream, next_seq=next_seq, boot=rec.boot)
        except StaleSample as exc:  # a copy the broker sends again was answered already
            if rec.redelivered:
                return []
            seq = rec.seq if rec.rebase else None
            return [self._error_msg(rec.stream, exc.code, str(exc), seq, rec.lsn)]
        except Exception as exc:
            return [self._internal(rec.stream, exc, rec.lsn)]
        store = self.engine.store
        row = store.peek(rec.stream) if again and was is not None and was[4] is None else None
        if row is not None:
            store.last_seq[row] = NO_SEQ  # the first copy left no numbering: none again
        if rec.mid and not again:
            after = self.engine.last_seq(rec.stream)
            nxt = None if after is None else (after + 1) % U32
            self._resets[rec.mid] = (rec.stream, rec.seq, rec.boot, rec.rebase, nxt, rec.lsn)
        self._log_note("reset", f"stream {rec.stream} reset by control message", logging.INFO)
        last = self._last_seq(rec.stream)
        body = {
            "cmd": "reset",
            "ok": True,
            "next_seq": None if last is None else (last + 1) % U32,
            "boot": rec.boot,
        }
        reply = json.dumps(body, allow_nan=False).encode()
        return [Outbound(self.replies.topic(rec.stream), reply, lsn=rec.lsn)]

    def _step(self, records: list[Record]) -> list[Outbound]:
        if not records:
            return []
        cap = self.engine.store.capacity
        if len(records) > cap and len({r.stream for r in records}) > cap:
            # Held messages released into a full batch can bring more streams than the state
            # holds at once (the engine refuses such a batch): step it in parts, in order.
            done: list[Outbound] = []
            part: list[Record] = []
            streams: set[str] = set()
            for rec in records:
                if rec.stream not in streams and len(streams) == cap:
                    done += self._step(part)
                    part, streams = [], set()
                part.append(rec)
                streams.add(rec.stream)
            return done + self._step(part)
        n = len(records)
        self._note_fresh(records)
        t0 = time.perf_counter()
        try:  # the whole batch as arrays: no per-message objects on the way into the engine
            values = np.concatenate([r.values for r in records])
            counts = np.fromiter((len(r.values) for r in records), np.int64, n)
            batch = self.engine.step_batch(
                [r.stream for r in records],
                values,
                counts=None if (counts == 1).all() else counts,  # one each: the steady path
                seqs=np.fromiter((r.seq for r in records), np.int64, n),
                boots=np.fromiter(
                    (NO_BOOT if r.boot is None else r.boot for r in records), np.int64, n
                ),
            )
        except Exception:  # find the one that fails, answer the rest
            log.exception("a batch failed to step; stepping its messages one by one")
            out: list[Outbound] = []
            for rec in records:
                out += self._step_one(rec)
            return out
        self.metrics.step_latency.observe(time.perf_counter() - t0)
        ys, at = payloads.Outputs.of(batch.y), batch.offsets.tolist()
        out = []
        for i, rec in enumerate(records):
            try:
                out += self._answer(rec, batch.outcome(i), ys.part(at[i], at[i + 1]))
            except Exception as exc:
                out.append(self._internal(rec.stream, exc, rec.lsn, rec.seq))
        return out

    def _note_fresh(self, records: Sequence[Record]) -> None:
        store = self.engine.store
        self._fresh = (
            {r.stream for r in records if r.stream not in store}
            if self._restarted.pending or self._unknown_lost
            else set()
        )

    def _step_one(self, rec: Record) -> list[Outbound]:
        self._note_fresh([rec])
        try:
            (oc,) = self.engine.step_many([Chunk(rec.stream, rec.values, rec.seq, rec.boot)])
            return self._answer(rec, oc)
        except Exception as exc:
            return [self._internal(rec.stream, exc, rec.lsn, rec.seq)]

    def _answer(
        self, rec: Record, oc: Outcome, ys: payloads.Outputs | None = None
    ) -> list[Outbound]:
        """Answers to one message: its errors, then its prediction (``ys``: its outputs
        ready for JSON, when the batch's were made at once)."""
        out: list[Outbound] = []

        def err(code: str, detail: str, **extra: Any) -> None:
            if rec.boot is not None:
                extra["boot"] = rec.boot  # which life of the device the answer is about
            out.append(self._error_msg(rec.stream, code, detail, rec.seq, rec.lsn, extra))

        if oc.late:
            err(
                "late",
                f"{oc.late} sample(s) arrived after later ones were applied; dropped (reorder_ms is {self.cfg.reorder_ms:g})",
                count=oc.late,
            )
        if oc.duplicates > oc.late and not rec.redelivered:
            n = oc.duplicates - oc.late
            err(
                "duplicate",
                f"{n} sample(s) from seq {rec.seq} were applied already; dropped",
                count=n,
            )
        if oc.error is not None:
            # A broker's redelivery of a boot the device has left since: a copy of samples
            # answered already (their prediction went out), no more news than a duplicate.
            if not (rec.redelivered and oc.error.code == "stale"):
                err(oc.error.code, str(oc.error), count=len(rec.values))
            return out
        if oc.restart:
            what = f"stream {rec.stream} restarted (boot {rec.boot}, seq {oc.seq})"
            self._log_note("restart", what, logging.INFO)
        if not len(oc.y):
            return out
        restart = oc.restart or oc.reset  # a reset at a gap (gap_policy "reset") too
        # (a stream evicted and given its row back by a duplicate is not fresh, but restarts)
        fresh = rec.stream in self._fresh or restart
        if fresh and (self._restarted.pop(rec.stream) or self._unknown_lost):
            self._fresh.discard(rec.stream)  # its later answers in this batch go on from it
            restart = True
        elif self._kept_restarted and rec.stream in self._kept_restarted:
            self._kept_restarted.discard(rec.stream)
            restart = True
        m = self.engine.manifest
        body = payloads.prediction(
            oc.seq,
            rec.ts,
            oc.y if ys is None else ys,
            m.model_id,
            m.labels if m.output_kind == "classifier" else (),
            single=len(rec.values) == 1,
            gap=oc.gap,
            restart=restart,
            boot=rec.boot,
        )
        out.append(Outbound(self.predictions.topic(rec.stream), body, lsn=rec.lsn))
        self.metrics.inc("predictions_out", len(oc.y))
        if (
            rec.ts is not None
            and not self._replaying
            and rec.lsn > self.sent_before
            and 0 <= (age := self.wall() - rec.ts) < MAX_LATENCY
        ):
            self.metrics.e2e_latency.observe(age)  # else a device clock that is off, not latency
        return out

    # -- answers ----------------------------------------------------------------------------

    def _error_msg(
        self,
        stream: str,
        code: str,
        detail: str,
        seq: int | None,
        lsn: int,
        extra: dict[str, Any] | None = None,
        r: _Round | None = None,
    ) -> Outbound:
        """``r``: the round of a refusal decided as a message is read, which counts it once it
        is logged."""
        if r is None:
            self.metrics.error(code)
        else:
            r.codes.append(code)
        self._log_note(code, f"stream {stream} seq {seq}: {detail}")
        body = payloads.error(code, detail, seq, extra=extra)
        return Outbound(self.errors.topic(stream), body, lsn=lsn)

    def _error(
        self,
        r: _Round,
        stream: str,
        code: str,
        detail: str,
        seq: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """An answer decided at decode time: logged, since replay does not decode again."""
        o = self._error_msg(stream, code, detail, seq, r.lsn, extra, r)
        r.outs.append(o)
        r.entries.append(Output(o.lsn, o.topic, o.payload))

    def _internal(
        self,
        stream: str,
        exc: BaseException,
        lsn: int,
        seq: int | None = None,
        *,
        r: _Round | None = None,
    ) -> Outbound:
        """The answer to a message whose handling failed unexpectedly; its id finds the
        traceback in the log."""
        incident = secrets.token_hex(4)
        log.error("internal error %s on stream %s:", incident, stream, exc_info=exc)
        detail = f"unexpected {type(exc).__name__}; see log id {incident}"
        return self._error_msg(stream, "internal", detail, seq, lsn, {"id": incident}, r)

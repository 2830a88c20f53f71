"""Hold messages that arrive ahead of a gap for a short while, so a sample that was merely
overtaken (reordered in flight) is applied in order instead of being dropped as a duplicate.

A stream's first message here, and the first of each new life of its device (a new ``boot``
id, or with ``restart_gap`` a seq far behind), is held too: nothing says it is the lowest of
its life, and an overtaken predecessor would otherwise be dropped as late. What is held of
an old life is released first, in order, and the new life's seq numbering starts afresh.
Messages of an earlier boot pass straight through (the engine answers them ``stale``), or
wait behind a new life's first record while it waits. A reset ends its stream's wait: what
is held goes first, and the reset's numbering holds after.

Pure logic: the clock is injected, the engine's last applied seq and boot ids are asked for
through functions passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .sequencing import HALF, U32, earlier_boot
from .wal import Record

# Refused seqs remembered per stream ahead of the one awaited. A sensor that fails after a
# lost sample sends refused messages past a gap that never fills: each was remembered, for
# months, and written into every snapshot. Past this many the farthest are let go: a record
# beyond them waits for them as for any gap, at most the hold time.
MAX_VOIDS = 1024
# Refused seqs remembered in all. A fleet whose sensors fail after a lost sample kept up to
# MAX_VOIDS for each stream, as long as its gap stayed open: without bound, in memory and in
# every snapshot. Past this many the farthest ahead of their streams are let go (down to
# half, so that the sort that picks them is rare), counted in ``voids_forgotten``.
VOIDS_KEPT = 16384
# ``seq - expect`` (mod 2**32) below this: at or ahead of the expected seq. One less than HALF,
# as ``expect`` is the last applied seq + 1 and a seq 2**31 from that one is admitted behind.
AHEAD = HALF - 1


@dataclass(eq=False)  # removed by identity: records held at one clock reading are distinct
class _Held:
    since: float
    record: Record


@dataclass(frozen=True)
class Saved:
    """What ``expire`` may change, as it was (``Reorderer.save``): per stream holding records,
    (held, the seq expected, seqs void, a new life, records behind); and ``forced``'s length."""

    streams: dict[str, tuple[list[_Held], int | None, set[int] | None, bool, list[Record]]]
    forced: int


class Reorderer:
    def __init__(
        self, hold_seconds: float, clock: Callable[[], float], restart_gap: int = 0
    ) -> None:
        self.hold = hold_seconds
        self.restart_gap = restart_gap
        self._clock = clock
        self._boots: dict[str, tuple[int, list[int]]] = {}  # current boot, earlier ones
        self._held: dict[str, list[_Held]] = {}
        # Streams whose held records are in seq order from the expected one on, as a sort
        # left them, none held since: the next release of one needs no sort (a backlog out of
        # order with many gaps re-sorted all it held at each gap, for minutes).
        self._in_order: set[str] = set()
        self._next: dict[str, int] = {}  # the seq each stream expects next
        self._void: dict[str, set[int]] = {}  # seqs that arrived unusable: do not wait for them
        self._voids = 0  # how many ``_void`` holds in all
        self.voids_forgotten = 0  # let go to stay within VOIDS_KEPT
        self._fresh: set[str] = set()  # new lives: no expectation yet, not even the engine's
        # Records of an earlier boot heard while the new life waits to begin: they follow its
        # first record, so that the engine, then in the new boot, answers them stale.
        self._behind: dict[str, list[Record]] = {}
        # (stream, seq) of every record released by ``expire`` since the caller last took them:
        # a decision that depends on the clock, which the caller logs so a replay repeats it.
        self.forced: list[tuple[str, int]] = []
        # Since when nothing can arrive (the transport is not reading: starting, or cut off
        # from its broker), None while it reads. A wait counts only the time messages can
        # arrive in: what a record waits for may be next in line at the broker meanwhile.
        self.paused_at: float | None = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values()) + sum(map(len, self._behind.values()))

    def holds(self, stream: str) -> bool:
        """Whether records of ``stream`` are held (it was heard from, if not applied yet)."""
        return stream in self._held or stream in self._behind

    def pending(self) -> list[Record]:
        """Everything held, in an order that, pushed again, holds it the same way."""
        out = []
        for stream, items in self._held.items():
            out += [h.record for h in items]
            out += self._behind.get(stream, [])
        return out

    def forget(self, streams: Iterable[str]) -> None:
        """Drop what is kept about streams that are gone (evicted), unless records are held."""
        for stream in streams:
            if stream not in self._held:
                self._next.pop(stream, None)
                self._drop_voids(stream)
                self._boots.pop(stream, None)
                self._fresh.discard(stream)

    def export(self, last_applied: Callable[[str], int | None]) -> dict[str, list[Any]]:
        """What a snapshot must keep: expectations that differ from "the engine's last seq + 1"
        (refused seqs skipped, or records held), so a replay waits for exactly what this did."""
        out: dict[str, list[Any]] = {}
        for stream, nxt in self._next.items():
            last = last_applied(stream)
            voids = sorted(self._void.get(stream, ()))
            if voids or stream in self._held or last is None or nxt != (last + 1) % U32:
                out[stream] = [nxt, voids]
        return out

    def load(self, saved: dict[str, list[Any]]) -> None:
        """``export``'s records; all or, on a malformed one (ValueError, TypeError,
        AttributeError, OverflowError), none of them."""
        loaded = {
            str(stream): (int(nxt), {int(v) for v in voids or ()})
            for stream, (nxt, voids) in saved.items()
        }
        for stream, (nxt, voids) in loaded.items():
            self._next[stream] = nxt
            if voids:
                self._set_voids(stream, voids)
        self._bound_voids()

    def export_boots(
        self, boots: Callable[[str], tuple[int | None, list[int]]]
    ) -> dict[str, list[Any]]:
        """The boot ids a snapshot must keep: of streams this has in another boot than the
        engine (a new boot's first message refused by the engine), so that after a restart
        the boot's next message goes on as here instead of beginning a new life again. Not of
        a new life still waiting to begin (``export_fresh``)."""
        return {
            stream: [cur, old]
            for stream, (cur, old) in self._boots.items()
            if stream not in self._fresh and cur != boots(stream)[0]
        }

    def load_boots(self, saved: dict[str, list[Any]]) -> None:
        """``export_boots``'s records; all or, on a malformed one, none of them (as ``load``)."""
        self._boots.update(
            {str(stream): (int(cur), [int(b) for b in old]) for stream, (cur, old) in saved.items()}
        )

    def export_fresh(self) -> dict[str, list[Any]]:
        """The new lives of new boots still waiting to begin, with their boot ids, for a
        snapshot: a replay pushes their held records again, but a record of that life began
        it only when the engine still had the boot before it, which an eviction of the stream
        forgets. Without the mark a message of the earlier boot held behind the new life's
        first went to the engine at once on the replay (which took the stream up again in
        that boot) instead of after it, to be answered stale."""
        return {
            stream: [cur, old]
            for stream, (cur, old) in self._boots.items()
            if stream in self._fresh and stream in self._held
        }

    def load_fresh(self, saved: dict[str, list[Any]]) -> None:
        """``export_fresh``'s records; all or, on a malformed one, none of them (as ``load``)."""
        lives = {
            str(stream): (int(cur), [int(b) for b in old]) for stream, (cur, old) in saved.items()
        }
        self._boots.update(lives)
        self._fresh.update(lives)

    def force(self, stream: str, seq: int) -> list[Record]:
        """Release the held record ``seq`` of ``stream`` as ``expire`` once did (log replay)."""
        items = self._held.get(stream, [])
        for h in items:
            if h.record.seq == seq:
                items.remove(h)
                self._advance(h.record)
                return [h.record, *self._release_contiguous(stream), *self._behind.pop(stream, [])]
        return []

    def push(
        self,
        rec: Record,
        last_applied: Callable[[str], int | None],
        boots: Callable[[str], tuple[int | None, list[int]]] = lambda _: (None, []),
    ) -> list[Record]:
        """Records ready to apply, in order; ``rec`` itself may be held back. The engine's
        last applied seq and (current, earlier) boot ids of a stream are asked for only when
        this has no expectation of its own (a stream's first message here)."""
        if self.hold <= 0:
            return [rec]
        stream = rec.stream
        cur: int | None = None
        old: list[int] = []
        if rec.boot is not None:  # boot ids matter only to a message that carries one
            known = self._boots.get(stream)
            cur, old = boots(stream) if known is None else known
        expect = self._next.get(stream)
        if expect is None and stream not in self._fresh:
            last = last_applied(stream)
            if last is not None:
                expect = (last + 1) % U32
        if rec.boot is not None and cur is not None and rec.boot != cur:
            if not earlier_boot(rec.boot, cur, old):
                return self._start_over(rec, [cur, *old])
            if stream in self._fresh:
                self._behind.setdefault(stream, []).append(rec)
                return []
            return [rec]  # an earlier boot: the engine answers it stale
        if rec.boot is not None:
            self._boots[stream] = (rec.boot, old)
        behind = None if expect is None else (expect - 1 - rec.seq) % U32
        if self.restart_gap and behind is not None and self.restart_gap < behind <= HALF:
            return self._start_over(rec, old)
        if expect is None:  # the first here (of its life): an earlier one may still come
            self._hold(rec)
            return []
        # The expectation is explicit from here on: a record behind it (a duplicate) must
        # never set it back, also when only the engine's last seq implied it (a restart).
        self._next.setdefault(stream, expect)
        if 0 < (rec.seq - expect) % U32 < AHEAD:
            self._hold(rec)
            return []
        self._advance(rec)
        return [rec, *self._release_contiguous(stream)]

    def _hold(self, rec: Record) -> None:
        self._held.setdefault(rec.stream, []).append(_Held(self._clock(), rec))
        self._in_order.discard(rec.stream)

    def _sorted(self, stream: str, items: list[_Held], expect: int) -> bool:
        """Whether ``items``, held by ``stream``, are in the order a sort from ``expect``
        gives: kept in order since a sort from an earlier expectation (which only moves
        forward), and the first of them not behind ``expect`` (none is then)."""
        return stream in self._in_order and 0 <= (items[0].record.seq - expect) % U32 < AHEAD

    def _start_over(self, rec: Record, old: list[int]) -> list[Record]:
        """``rec`` begins a new life of its stream: the old life's held records go first, and
        ``rec`` waits like a new stream's first record."""
        stream = rec.stream
        held: list[Record] = []
        while stream in self._held:
            held += self._release_first(stream)
        self._next.pop(stream, None)
        self._drop_voids(stream)
        if rec.boot is not None:
            self._boots[stream] = (rec.boot, old[:3])
        self._fresh.add(stream)
        self._hold(rec)
        return held

    def end(self, stream: str) -> list[Record]:
        """A reset of ``stream``: what it holds, in order, without waiting (the caller applies
        it before the reset); after the reset the engine's numbering is the expectation."""
        out: list[Record] = []
        while stream in self._held:
            out += self._release_first(stream)
        self._next.pop(stream, None)
        self._drop_voids(stream)
        self._boots.pop(stream, None)
        self._fresh.discard(stream)
        return out

    def void(self, stream: str, seq: int, last_applied: int | None) -> list[Record]:
        """A message took ``seq`` but carried nothing usable (it was answered with an error):
        stop waiting for it. Returns the held records this releases."""
        if self.hold <= 0:
            return []
        expect = self._next.get(stream)
        if expect is None and last_applied is not None and stream not in self._fresh:
            # (not in a new life: the engine's last seq is the life before's, and counted
            # from it, the new life's records past it went first, the ones before it late)
            expect = (last_applied + 1) % U32
        if expect is None:  # a new life's: not waited for once its first record is out
            if stream in self._held:
                self._add_void(stream, seq, self._held[stream][0].record.seq)
            return []
        if not 0 <= (seq - expect) % U32 < AHEAD:
            return []
        self._next.setdefault(stream, expect)
        self._add_void(stream, seq, expect)
        return self._release_contiguous(stream)

    def _add_void(self, stream: str, seq: int, near: int) -> None:
        voids = self._void.setdefault(stream, set())
        if seq in voids:
            return
        voids.add(seq)
        self._voids += 1
        if len(voids) > MAX_VOIDS:  # keep the half nearest to ``near``
            keep = sorted(voids, key=lambda v: (v - near) % U32)[: MAX_VOIDS // 2]
            self._set_voids(stream, set(keep))
        self._bound_voids()

    def _set_voids(self, stream: str, voids: set[int]) -> None:
        self._drop_voids(stream)
        self._void[stream] = voids
        self._voids += len(voids)

    def _drop_voids(self, stream: str) -> None:
        self._voids -= len(self._void.pop(stream, ()))

    def _bound_voids(self) -> None:
        """Past VOIDS_KEPT in all, keep the half nearest to what their streams expect (or to
        their first record held, in a new life): decided by what is kept alone, so that a
        replay of the log decides alike."""
        if self._voids <= VOIDS_KEPT:
            return
        ranked = []
        for stream, voids in self._void.items():
            near = self._next.get(stream)
            if near is None:
                held = self._held.get(stream)
                near = held[0].record.seq if held else 0
            ranked += [((v - near) % U32, stream, v) for v in voids]
        ranked.sort()
        kept: dict[str, set[int]] = {}
        for _, stream, v in ranked[: VOIDS_KEPT // 2]:
            kept.setdefault(stream, set()).add(v)
        self.voids_forgotten += self._voids - VOIDS_KEPT // 2
        self._void, self._voids = kept, VOIDS_KEPT // 2

    def save(self) -> Saved:
        """What ``expire`` may change: ``restore`` puts it back (a release the caller could
        not log is decided again later, as if this one had not been). Costs the streams that
        hold records, as ``expire`` does."""
        streams = {
            stream: (
                list(items),
                self._next.get(stream),
                set(self._void[stream]) if stream in self._void else None,
                stream in self._fresh,
                list(self._behind.get(stream, ())),
            )
            for stream, items in self._held.items()
        }
        return Saved(streams, len(self.forced))

    def restore(self, saved: Saved) -> None:
        """Back to ``saved``, taken before the ``expire`` calls to undo (nothing else since)."""
        for stream, (held, nxt, voids, fresh, behind) in saved.streams.items():
            self._held[stream] = list(held)
            self._in_order.discard(stream)
            if nxt is None:
                self._next.pop(stream, None)
            else:
                self._next[stream] = nxt
            if voids is None:
                self._drop_voids(stream)
            else:
                self._set_voids(stream, set(voids))
            if behind:
                self._behind[stream] = list(behind)
            else:
                self._behind.pop(stream, None)
            if fresh:
                self._fresh.add(stream)
            else:
                self._fresh.discard(stream)
        del self.forced[saved.forced :]

    def pause(self) -> None:
        """Nothing can arrive from now on (the transport stops reading): waits stand still."""
        if self.paused_at is None:
            self.paused_at = self._clock()

    def resume(self) -> None:
        """Messages can arrive again: each held record waits what it had left when the pause
        began (one held since then, as a record held at a restart: its whole time)."""
        if self.paused_at is None:
            return
        now, was = self._clock(), self.paused_at
        self.paused_at = None
        for items in self._held.values():
            for h in items:
                h.since += now - max(was, h.since)

    def expire(self, force: bool = False, horizon: float | None = None) -> list[Record]:
        """Give up waiting for gaps older than the hold time (or all, with ``force``); while
        paused, only with ``force``. ``horizon``: when the oldest message received and not
        yet pushed arrived (on this clock): a record waits until every message that arrived
        within its hold time was pushed, since one of them may be what it waits for."""
        if self.paused_at is not None and not force:
            return []
        limit = self._clock() - self.hold
        if horizon is not None:
            limit = min(limit, horizon - self.hold)
        out: list[Record] = []
        for stream in list(self._held):
            # Released while one held since before ``limit`` is (nothing is held meanwhile)
            due = {id(h.record) for h in self._held[stream] if force or h.since <= limit}
            while stream in self._held and due:
                released = self._release_first(stream)
                self.forced.append((stream, released[0].seq))
                out += released
                due.difference_update(map(id, released))
        return out

    def _release_first(self, stream: str) -> list[Record]:
        """The earliest held record of ``stream`` and what then follows it in order."""
        items = self._held[stream]
        expect = self._next.get(stream)
        if expect is None:  # a new life: the lowest seq, counted around the first one heard
            base = (items[0].record.seq - HALF) % U32
            first = min(items, key=lambda h: (h.record.seq - base) % U32)
        elif self._sorted(stream, items, expect):
            first = items[0]
        else:
            first = min(items, key=lambda h: (h.record.seq - expect) % U32)
        items.remove(first)
        self._advance(first.record)
        return [first.record, *self._release_contiguous(stream), *self._behind.pop(stream, [])]

    def _advance(self, rec: Record) -> None:
        self._fresh.discard(rec.stream)
        last = (rec.seq + len(rec.values) - 1) % U32
        prev = self._next.get(rec.stream)
        nxt = (last + 1) % U32
        if prev is None or 0 < (nxt - prev) % U32 < HALF:
            self._next[rec.stream] = nxt

    def _release_contiguous(self, stream: str) -> list[Record]:
        """Held records of ``stream`` now in order, and those behind it (duplicates, for the
        engine to answer), in order: one sort and one walk, however many are held."""
        self._skip_voids(stream)
        items = self._held.pop(stream, [])
        expect = self._next[stream]
        presorted = bool(items) and self._sorted(stream, items, expect)
        self._in_order.discard(stream)
        if not presorted:
            items.sort(key=lambda h: (h.record.seq - expect) % U32)
        out: list[Record] = []
        for i, h in enumerate(items):
            self._skip_voids(stream)
            ahead = (h.record.seq - self._next[stream]) % U32
            if 0 < ahead < AHEAD:  # a gap: the rest waits, but what is behind goes on
                if presorted:  # all ahead of the first that waits: none behind
                    kept = items[i:]
                else:
                    kept = []
                    for h2 in items[i:]:
                        if (h2.record.seq - self._next[stream]) % U32 >= AHEAD:
                            out.append(h2.record)
                        else:
                            kept.append(h2)
                if kept:
                    self._held[stream] = kept
                    self._in_order.add(stream)
                return out
            out.append(h.record)
            self._advance(h.record)
        return out

    def _skip_voids(self, stream: str) -> None:
        voids = self._void.get(stream)
        if not voids:
            return
        was = len(voids)
        while self._next[stream] in voids:
            voids.discard(self._next[stream])
            self._next[stream] = (self._next[stream] + 1) % U32
        voids -= {v for v in voids if (v - self._next[stream]) % U32 >= HALF}  # passed
        self._voids -= was - len(voids)
        if not voids:
            del self._void[stream]

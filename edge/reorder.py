"""Hold messages that arrive ahead of a gap for a short while, so a sample that was merely
overtaken (reordered in flight) is applied in order instead of being dropped as a duplicate.

A stream starts a new life when its device restarts (a new ``boot`` id, or with
``restart_gap`` a seq far behind): what is held of the old life is released first, in order,
and the new life's seq numbering starts afresh. Messages of an earlier boot pass straight
through (the engine answers them ``stale``).

Pure logic: the clock is injected, the engine's last applied seq and boot ids are asked for
through functions passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .sequencing import HALF, U32, earlier_boot
from .wal import Record


@dataclass(eq=False)  # removed by identity: records held at one clock reading are distinct
class _Held:
    since: float
    record: Record


class Reorderer:
    def __init__(
        self, hold_seconds: float, clock: Callable[[], float], restart_gap: int = 0
    ) -> None:
        self.hold = hold_seconds
        self.restart_gap = restart_gap
        self._clock = clock
        self._boots: dict[str, tuple[int, list[int]]] = {}  # current boot, earlier ones
        self._held: dict[str, list[_Held]] = {}
        self._next: dict[str, int] = {}  # the seq each stream expects next
        self._void: dict[str, set[int]] = {}  # seqs that arrived unusable: do not wait for them
        # (stream, seq) of every record released by ``expire`` since the caller last took them:
        # a decision that depends on the clock, which the caller logs so a replay repeats it.
        self.forced: list[tuple[str, int]] = []

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values())

    def pending(self) -> list[Record]:
        return [h.record for items in self._held.values() for h in items]

    def forget(self, streams: Iterable[str]) -> None:
        """Drop what is kept about streams that are gone (evicted), unless records are held."""
        for stream in streams:
            if stream not in self._held:
                self._next.pop(stream, None)
                self._void.pop(stream, None)
                self._boots.pop(stream, None)

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
        for stream, (nxt, voids) in saved.items():
            self._next[stream] = int(nxt)
            if voids:
                self._void[stream] = {int(v) for v in voids}

    def force(self, stream: str, seq: int) -> list[Record]:
        """Release the held record ``seq`` of ``stream`` as ``expire`` once did (log replay)."""
        items = self._held.get(stream, [])
        for h in items:
            if h.record.seq == seq:
                items.remove(h)
                self._advance(h.record)
                return [h.record, *self._release_contiguous(stream)]
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
        if expect is None:
            last = last_applied(stream)
            if last is not None:
                expect = (last + 1) % U32
        if rec.boot is not None and cur is not None and rec.boot != cur:
            if earlier_boot(rec.boot, cur, old):
                return [rec]  # an earlier boot: stale
            return self._start_over(rec, [cur, *old])
        if rec.boot is not None:
            self._boots[stream] = (rec.boot, old)
        behind = None if expect is None else (expect - 1 - rec.seq) % U32
        if self.restart_gap and behind is not None and self.restart_gap < behind < HALF:
            return self._start_over(rec, old)
        if expect is not None:
            # The expectation is explicit from here on: a record behind it (a duplicate) must
            # never set it back, also when only the engine's last seq implied it (a restart).
            self._next.setdefault(stream, expect)
            if 0 < (rec.seq - expect) % U32 < HALF:
                self._held.setdefault(stream, []).append(_Held(self._clock(), rec))
                return []
        self._advance(rec)
        return [rec, *self._release_contiguous(stream)]

    def _start_over(self, rec: Record, old: list[int]) -> list[Record]:
        """``rec`` begins a new life of its stream: the old life's held records go first."""
        stream = rec.stream
        held = sorted((h.record for h in self._held.pop(stream, [])), key=lambda r: r.lsn)
        self._next.pop(stream, None)
        self._void.pop(stream, None)
        if rec.boot is not None:
            self._boots[stream] = (rec.boot, old[:3])
        self._advance(rec)
        return [*held, rec]

    def void(self, stream: str, seq: int, last_applied: int | None) -> list[Record]:
        """A message took ``seq`` but carried nothing usable (it was answered with an error):
        stop waiting for it. Returns the held records this releases."""
        if self.hold <= 0:
            return []
        expect = self._next.get(stream)
        if expect is None and last_applied is not None:
            expect = (last_applied + 1) % U32
        if expect is None or not 0 <= (seq - expect) % U32 < HALF:
            return []
        self._next.setdefault(stream, expect)
        self._void.setdefault(stream, set()).add(seq)
        return self._release_contiguous(stream)

    def expire(self, force: bool = False) -> list[Record]:
        """Give up waiting for gaps older than the hold time (or all, with ``force``)."""
        limit = self._clock() - self.hold
        out: list[Record] = []
        for stream in list(self._held):
            while stream in self._held and (
                force or min(h.since for h in self._held[stream]) <= limit
            ):
                items, expect = self._held[stream], self._next[stream]
                first = min(items, key=lambda h: (h.record.seq - expect) % U32)
                items.remove(first)
                out.append(first.record)
                self.forced.append((stream, first.record.seq))
                self._advance(first.record)
                out += self._release_contiguous(stream)
        return out

    def _advance(self, rec: Record) -> None:
        last = (rec.seq + len(rec.values) - 1) % U32
        prev = self._next.get(rec.stream)
        nxt = (last + 1) % U32
        if prev is None or 0 < (nxt - prev) % U32 < HALF:
            self._next[rec.stream] = nxt

    def _release_contiguous(self, stream: str) -> list[Record]:
        out = []
        items = self._held.get(stream, [])
        progress = True
        while progress:
            progress = False
            voids = self._void.get(stream)
            if voids:
                while self._next[stream] in voids:
                    voids.discard(self._next[stream])
                    self._next[stream] = (self._next[stream] + 1) % U32
                voids -= {v for v in voids if (v - self._next[stream]) % U32 >= HALF}  # passed
                if not voids:
                    del self._void[stream]
            expect = self._next[stream]
            for h in list(items):
                ahead = (h.record.seq - expect) % U32
                if ahead == 0 or ahead >= HALF:  # now in order (or an old duplicate)
                    items.remove(h)
                    out.append(h.record)
                    self._advance(h.record)
                    progress = True
                    break
        if not items:
            self._held.pop(stream, None)
        return out

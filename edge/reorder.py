"""Hold messages that arrive ahead of a gap for a short while, so a sample that was merely
overtaken (reordered in flight) is applied in order instead of being dropped as a duplicate.

Pure logic: the clock is injected, the engine's last applied seq is passed in.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .sequencing import HALF, U32
from .wal import Record


@dataclass(order=True)
class _Held:
    since: float
    record: Record = field(compare=False)


class Reorderer:
    def __init__(self, hold_seconds: float, clock: Callable[[], float]) -> None:
        self.hold = hold_seconds
        self._clock = clock
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

    def force(self, stream: str, seq: int) -> list[Record]:
        """Release the held record ``seq`` of ``stream`` as ``expire`` once did (log replay)."""
        items = self._held.get(stream, [])
        for h in items:
            if h.record.seq == seq:
                items.remove(h)
                self._advance(h.record)
                return [h.record, *self._release_contiguous(stream)]
        return []

    def push(self, rec: Record, last_applied: int | None) -> list[Record]:
        """Records ready to apply, in order; ``rec`` itself may be held back."""
        if self.hold <= 0:
            return [rec]
        expect = self._next.get(rec.stream)
        if expect is None and last_applied is not None:
            expect = (last_applied + 1) % U32
        ahead = None if expect is None else (rec.seq - expect) % U32
        if ahead is not None and 0 < ahead < HALF:
            self._held.setdefault(rec.stream, []).append(_Held(self._clock(), rec))
            return []
        ready = [rec]
        self._advance(rec)
        ready += self._release_contiguous(rec.stream)
        return ready

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


class GapMemory:
    """Which seqs each stream skipped over (a gap the engine stepped across, or everything
    before the sample that started the stream), so that a sample arriving after it was given
    up on is reported as late, not as a plain duplicate."""

    def __init__(self, per_stream: int = 8, streams: int = 100_000) -> None:
        self._gaps: OrderedDict[str, deque[tuple[int, int]]] = OrderedDict()
        self._per_stream = per_stream
        self._streams = streams  # most streams remembered, least recently noted go first

    def __len__(self) -> int:
        return len(self._gaps)

    def note_start(self, stream: str, first_seq: int) -> None:
        self.forget([stream])  # a (re)start: earlier gaps belong to a previous life
        self.note(stream, (first_seq - HALF + 1) % U32, HALF - 1)

    def note(self, stream: str, first_skipped: int, count: int) -> None:
        gaps = self._gaps.get(stream)
        if gaps is None:
            gaps = self._gaps[stream] = deque(maxlen=self._per_stream)
            if len(self._gaps) > self._streams:
                self._gaps.popitem(last=False)
        else:
            self._gaps.move_to_end(stream)
        gaps.append((first_skipped, count))

    def forget(self, streams: Iterable[str]) -> None:
        for stream in streams:
            self._gaps.pop(stream, None)

    def late(self, stream: str, seq: int, count: int) -> int:
        """How many of the samples ``seq .. seq+count-1`` fall in a remembered gap."""
        gaps = self._gaps.get(stream)
        if not gaps:
            return 0
        return sum(any((s - first) % U32 < n for first, n in gaps) for s in range(seq, seq + count))

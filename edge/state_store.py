"""Per-stream LSTM state in preallocated arenas.

Each state tensor (``h`` and ``C`` of every layer) is one 2-D array with a row per stream, in
the encoding the model's state *inputs* use (int8 bytes for int8 models), so a step gathers
rows, invokes, and scatters rows back with no conversion. Arenas grow in chunks up to
``capacity``; past it the least recently used stream is evicted. Evicted and idle streams come
back at the zero state, numbered on from where they were (``Departed``). Besides the state,
each row keeps the stream's last applied ``seq`` and its boot ids (the current one first, then
up to ``BOOT_HISTORY - 1`` earlier ones), so that messages of an earlier boot of a device can
be told from those of a new one.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from .errors import ConfigError, shown

NO_SEQ = -1
NO_BOOT = -1
BOOT_HISTORY = 4
GAP_SLOTS = 4  # the last gaps remembered per stream, to tell a late sample from a duplicate
U32 = 1 << 32


def as_records(a: np.ndarray) -> np.ndarray:
    """A C-contiguous ``[rows, width]`` array as a 1-D array of one opaque item per row (the
    same memory): NumPy gathers and scatters whole rows of it several times faster."""
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).reshape(-1)


class Departed:
    """The last seq and current boot of evicted streams, in a fixed table of hashed slots
    (made at the first eviction). A stream that comes back is numbered on from there: a sample
    it had applied before its eviction is still a duplicate, not the start of a new stream
    stepped a second time. A slot keeps the newest stream evicted into it; one pushed out
    comes back as a new stream, its old samples admitted again."""

    SLOTS = 1 << 16

    def __init__(self) -> None:
        self._key: np.ndarray | None = None  # 64-bit fingerprint of the id, 0: empty
        self._seq = self._boot = np.empty(0, np.int64)

    def __bool__(self) -> bool:
        return self._key is not None

    def _where(self, stream: str) -> tuple[int, int]:
        digest = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=8)
        h = int.from_bytes(digest.digest(), "little")
        return h & (self.SLOTS - 1), h | 1  # a key is never 0

    def _make(self) -> np.ndarray:
        self._key = np.zeros(self.SLOTS, np.uint64)
        self._seq = np.full(self.SLOTS, NO_SEQ, np.int64)
        self._boot = np.full(self.SLOTS, NO_BOOT, np.int64)
        return self._key

    def put(self, stream: str, seq: int, boot: int) -> None:
        keys = self._make() if self._key is None else self._key
        slot, key = self._where(stream)
        keys[slot], self._seq[slot], self._boot[slot] = key, seq, boot

    def peek(self, stream: str) -> tuple[int, int] | None:
        """(last seq, boot) of an evicted stream, kept here; None if not remembered."""
        if self._key is None:
            return None
        slot, key = self._where(stream)
        if int(self._key[slot]) != key:
            return None
        return int(self._seq[slot]), int(self._boot[slot])

    def take(self, stream: str) -> tuple[int, int] | None:
        """(last seq, boot) of an evicted stream, forgotten here; None if not remembered."""
        was = self.peek(stream)
        if was is not None and self._key is not None:
            self._key[self._where(stream)[0]] = 0
        return was

    def export(self) -> str | None:
        """The occupied slots for a snapshot (slot, key, seq, boot as i64), None if none."""
        if self._key is None or not self._key.any():
            return None
        used = np.flatnonzero(self._key)
        table = np.stack([used, self._key[used].view(np.int64), self._seq[used], self._boot[used]])
        return base64.b64encode(zlib.compress(table.astype("<i8").tobytes(), 1)).decode()

    def load(self, text: str | None) -> None:
        self._key = None
        if not text:
            return
        flat = np.frombuffer(zlib.decompress(base64.b64decode(text)), "<i8")
        if len(flat) % 4:
            raise ValueError(f"a table of {len(flat)} numbers, not rows of 4")
        slot, key, seq, boot = flat.reshape(4, -1)
        if len(slot) and not (slot.min() >= 0 and slot.max() < self.SLOTS):
            raise ValueError("a slot out of range")
        self._make()[slot] = key.view(np.uint64)
        self._seq[slot], self._boot[slot] = seq, boot


@dataclass
class StoreStats:
    evicted_lru: int = 0
    evicted_idle: int = 0


def whole_number(value: Any) -> bool:
    """An integer, not a bool (True would be 1 without a word)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _real(value: Any) -> bool:
    """A real number, not a bool; NaN is one (callers compare it)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


class StateStore:
    def __init__(
        self,
        zero_rows: Sequence[np.ndarray],
        *,
        capacity: int = 1_000_000,
        chunk: int = 1024,
        idle_timeout: float | None = None,
        clock: Callable[[], float],
    ) -> None:
        for name, value in (("capacity", capacity), ("chunk", chunk)):
            if not whole_number(value) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {shown(value)}")
        # NaN too: no stream's last sample is ever more recent than now - NaN, so every
        # stream would be forgotten (and stepped from the zero state) at every call.
        if idle_timeout is not None and not (_real(idle_timeout) and idle_timeout > 0):
            raise ConfigError(
                f"idle_timeout must be a number of seconds > 0, got {shown(idle_timeout)}"
            )
        self._zero = [np.asarray(z).reshape(1, -1) for z in zero_rows]
        self.capacity = capacity
        self.chunk = chunk
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._rows: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._free: list[int] = []
        self.arrays = [np.empty((0, z.shape[1]), z.dtype) for z in self._zero]
        # Counts every change to which streams hold rows and to their LRU order: equal counts,
        # the same streams in the same rows and order.
        self.moves = 0
        self.last_seq = np.empty(0, np.int64)
        self.last_seen = np.empty(0, np.float64)
        self.boots = np.empty((0, BOOT_HISTORY), np.int64)
        self.gaps = np.zeros((0, GAP_SLOTS, 2), np.int64)  # (first skipped seq, count)
        self.stats = StoreStats()
        # Told the ids of evicted streams, so that per-stream memory elsewhere stays bounded too.
        self.on_evict: Callable[[list[str]], None] | None = None
        self.departed = Departed()
        self.recalled: set[str] = set()  # given their rows back, nothing applied since
        # (stream, last seq, boot) of loaded streams beyond capacity, until ``depart_shed``
        self.shed: list[tuple[str, int, int]] = []
        # Since when no message can arrive (the transport is not reading: starting, cut off
        # from its broker), None while it reads. Idle time counts only the time a stream's
        # messages could arrive in: a broker keeps them for us meanwhile.
        self.paused_at: float | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, stream: object) -> bool:
        return stream in self._rows

    @property
    def streams(self) -> list[str]:
        return list(self._rows)

    @property
    def arrays(self) -> list[np.ndarray]:
        return self._arrays

    @arrays.setter
    def arrays(self, value: list[np.ndarray]) -> None:
        self._arrays = value
        self.records: list[np.ndarray] = [as_records(a) for a in value]  # a row per item

    @property
    def zero_row(self) -> list[np.ndarray]:
        """The zero state of one row, per state tensor."""
        return [z[0] for z in self._zero]

    @property
    def allocated(self) -> int:
        return len(self.last_seq)

    def nbytes(self) -> int:
        meta = self.last_seq.nbytes + self.last_seen.nbytes + self.boots.nbytes + self.gaps.nbytes
        return sum(a.nbytes for a in self.arrays) + meta

    def _grow(self) -> None:
        old = self.allocated
        new = min(self.capacity, old + max(self.chunk, old // 2))
        self.arrays = [
            np.concatenate([a, np.repeat(z, new - old, 0)]) for a, z in zip(self.arrays, self._zero)
        ]
        self.last_seq = np.concatenate([self.last_seq, np.full(new - old, NO_SEQ, np.int64)])
        self.last_seen = np.concatenate([self.last_seen, np.zeros(new - old)])
        self.boots = np.concatenate([self.boots, np.full((new - old, BOOT_HISTORY), NO_BOOT)])
        self.gaps = np.concatenate([self.gaps, np.zeros((new - old, GAP_SLOTS, 2), np.int64)])
        self._free.extend(range(new - 1, old - 1, -1))

    def _clear(self, row: int) -> None:
        self.zero_rows(np.asarray([row]))
        self.last_seq[row] = NO_SEQ
        self.boots[row] = NO_BOOT
        self.gaps[row] = 0

    def peek(self, stream: str) -> int | None:
        return self._rows.get(stream)

    def lookup(self, streams: Sequence[str]) -> np.ndarray:
        """Rows of these streams, -1 for unknown ones; nothing is changed."""
        get = self._rows.get
        return np.fromiter((get(s, -1) for s in streams), np.intp, len(streams))

    def acquire(self, streams: Iterable[str], rows: np.ndarray | None = None) -> np.ndarray:
        """Rows for these (distinct) streams, new ones at zero state, all marked as just used.

        ``rows``: their ``lookup``, when the caller has it already. Known streams are marked
        before new ones get rows, so that making room never evicts a stream of this call."""
        streams = list(streams)
        out = self.lookup(streams) if rows is None else rows.astype(np.intp, copy=True)
        move = self._rows.move_to_end
        self.moves += 1
        if not len(out) or out.min() >= 0:
            new = []
            for stream in streams:
                move(stream)
        else:
            new = np.flatnonzero(out < 0).tolist()
            for stream, row in zip(streams, out.tolist()):
                if row >= 0:
                    move(stream)
        for i in new:
            if not self._free and self.allocated < self.capacity:
                self._grow()
            if not self._free:
                self._evict_lru()
            row = self._free.pop()
            self._clear(row)
            self._rows[streams[i]] = row
            out[i] = row
        self.last_seen[out] = self._clock()
        return out

    def rows_of(self, streams: Sequence[str]) -> np.ndarray | None:
        """Rows of these streams when every one is known, else None; nothing is changed."""
        try:
            found = itemgetter(*streams)(self._rows)
        except (KeyError, TypeError):
            return None
        return np.array(found if len(streams) > 1 else (found,), np.intp)

    def touch_many(self, streams: Sequence[str], rows: np.ndarray) -> None:
        """Mark known streams (and their rows) as just used, in this order."""
        deque(map(self._rows.move_to_end, streams), maxlen=0)
        self.moves += 1
        self.last_seen[rows] = self._clock()

    def stamp(self, rows: np.ndarray) -> None:
        """Mark rows as just used whose streams are the most recently used already."""
        self.last_seen[rows] = self._clock()

    def touch(self, stream: str, row: int) -> None:
        """Mark one known stream as just used."""
        self._rows.move_to_end(stream)
        self.moves += 1
        self.last_seen[row] = self._clock()

    def _depart(self, stream: str, row: int) -> None:
        self.moves += 1
        self.recalled.discard(stream)
        seq, boot = int(self.last_seq[row]), int(self.boots[row, 0])
        if seq != NO_SEQ or boot != NO_BOOT:
            self.departed.put(stream, seq, boot)
        self._free.append(row)

    def recall(self, streams: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """``rows`` (their ``lookup``) again, with evicted streams among ``streams`` given
        rows back: zero state, numbered on from their last seq and boot. Streams known
        already are marked first, so that making room evicts none of them."""
        unknown = np.flatnonzero(rows < 0).tolist()
        if not self.departed or not unknown:
            return rows
        back = {}
        for i in unknown:
            stream = streams[i]
            if type(stream) is str and stream not in back:
                was = self.departed.take(stream)
                if was is not None:
                    back[stream] = was
        if not back:
            return rows
        known = list(dict.fromkeys(s for s, r in zip(streams, rows.tolist()) if r >= 0))
        got = self.acquire([*known, *back])[len(known) :].tolist()
        for (seq, boot), row in zip(back.values(), got):
            self.last_seq[row] = seq
            self.boots[row, 0] = boot
        self.recalled.update(back)
        given = dict(zip(back, got))
        rows = rows.copy()
        for i in unknown:
            rows[i] = given.get(streams[i], -1) if type(streams[i]) is str else -1
        return rows

    def _evict_lru(self) -> None:
        stream, row = self._rows.popitem(last=False)
        self._depart(stream, row)
        self.stats.evicted_lru += 1
        if self.on_evict is not None:
            self.on_evict([stream])

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Drop streams not seen for ``idle_timeout`` seconds; they restart from zero."""
        if self.idle_timeout is None:
            return []
        gone = self.idle(self.idle_timeout, now)
        self.evict(gone)
        return gone

    def seen_as(self, other: StateStore) -> None:
        """Each stream carried over from ``other`` (``load`` of its export) last used when
        it was there, and paused as it is: a reload does not make idle streams fresh."""
        streams = self.streams
        mine, theirs = self.lookup(streams), other.lookup(streams)
        known = theirs >= 0
        self.last_seen[mine[known]] = other.last_seen[theirs[known]]
        if other.paused_at is not None:
            self.paused_at = other.paused_at

    def _now(self) -> float:
        """The time idle time counts to: standing still while paused."""
        return self._clock() if self.paused_at is None else self.paused_at

    def idle_seconds(self) -> np.ndarray:
        """How long each stream has been idle, in ``export`` order: a snapshot keeps the
        duration, since the clock it counts on does not survive a reboot."""
        rows = np.fromiter(self._rows.values(), dtype=np.intp, count=len(self._rows))
        return np.maximum(self._now() - self.last_seen[rows], 0.0)

    def pause(self) -> None:
        """Nothing can arrive from now on: idle time stands still."""
        if self.paused_at is None:
            self.paused_at = self._clock()

    def resume(self) -> None:
        """Messages can arrive again: each stream has been idle what it had been when the
        pause began (one applied since then: none)."""
        if self.paused_at is None:
            return
        now, was = self._clock(), self.paused_at
        self.paused_at = None
        self.last_seen += now - np.maximum(was, self.last_seen)  # keeps the LRU order

    def idle(
        self, timeout: float, now: float | None = None, *, horizon: float | None = None
    ) -> list[str]:
        """Streams not seen for ``timeout`` seconds (of those messages could arrive in),
        oldest first (nothing is changed). ``horizon``: when the oldest message not yet
        applied arrived; idle time counts to there at most."""
        if now is None:
            now = self._now()
        if horizon is not None:
            now = min(now, horizon)
        limit = now - timeout
        out = []
        for stream, row in self._rows.items():  # oldest first: stop at the first fresh one
            if self.last_seen[row] > limit:
                break
            out.append(stream)
        return out

    def evict(self, streams: Iterable[str]) -> None:
        """Forget these streams as idle ones (unknown ids are ignored)."""
        gone = [s for s in streams if s in self._rows]
        for stream in gone:
            self._depart(stream, self._rows.pop(stream))
        self.stats.evicted_idle += len(gone)
        if gone and self.on_evict is not None:
            self.on_evict(gone)

    def reset(self, stream: str) -> None:
        """Zero state; the last seq is kept so a reset never re-admits old samples."""
        row = self._rows.get(stream)
        if row is not None:
            self.zero_rows(np.asarray([row]))

    def remove(self, stream: str) -> None:
        """Forget a stream for good, its numbering too (an evicted one's as well)."""
        self.recalled.discard(stream)
        self.departed.take(stream)
        row = self._rows.pop(stream, None)
        if row is not None:
            self.moves += 1
            self._free.append(row)

    def depart_shed(self) -> list[str]:
        """Evict the streams ``load`` set aside (least recently used beyond ``capacity``):
        remembered as departed, with their last seq and boot. Returns their ids."""
        gone = [stream for stream, _, _ in self.shed]
        for stream, seq, boot in self.shed:
            if seq != NO_SEQ or boot != NO_BOOT:
                self.departed.put(stream, seq, boot)
        self.shed = []
        self.stats.evicted_lru += len(gone)
        if gone and self.on_evict is not None:
            self.on_evict(gone)
        return gone

    def gather(self, rows: np.ndarray) -> list[np.ndarray]:
        return [a[rows] for a in self.arrays]

    def scatter(self, rows: np.ndarray, values: Sequence[np.ndarray]) -> None:
        for a, v in zip(self.arrays, values):
            a[rows] = v

    def zero_rows(self, rows: np.ndarray) -> None:
        for a, z in zip(self.arrays, self._zero):
            a[rows] = z[0]

    def boot_of(self, row: int) -> tuple[int | None, list[int]]:
        """(current boot id or None, earlier boot ids) of a row."""
        cur, *old = (int(b) for b in self.boots[row])
        return (None if cur == NO_BOOT else cur), [b for b in old if b != NO_BOOT]

    def set_boot(self, row: int, boot: int) -> None:
        """Make ``boot`` the current boot id, remembering the previous ones."""
        cur = self.boots[row]
        if cur[0] != boot:
            self.boots[row] = np.concatenate([[boot], cur[cur != boot][: BOOT_HISTORY - 1]])

    def note_gap(self, row: int, first: int, count: int, *, fresh: bool = False) -> None:
        """Remember that ``count`` seqs from ``first`` on were skipped (``fresh``: forget the
        earlier ones, the stream starts over)."""
        g = self.gaps[row]
        if fresh:
            g[:] = 0
        g[1:] = g[:-1].copy()
        g[0] = (first, count)

    def export(self) -> tuple[list[str], np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
        """(streams in LRU order, last seq, state arrays, boots, gaps): a snapshot's content."""
        rows = np.fromiter(self._rows.values(), dtype=np.intp, count=len(self._rows))
        return (
            list(self._rows),
            self.last_seq[rows],
            [a[rows] for a in self.arrays],
            self.boots[rows],
            self.gaps[rows],
        )

    def load(
        self,
        streams: list[str],
        last_seq: np.ndarray,
        arrays: Sequence[np.ndarray],
        boots: np.ndarray | None = None,
        gaps: np.ndarray | None = None,
        idle: np.ndarray | None = None,
    ) -> None:
        """Replace everything with exported content (same layout, checked by the caller).
        Content of more streams than ``capacity`` (a smaller one than it was taken with) keeps
        the most recently used; the others are set aside in ``shed`` for ``depart_shed``.
        ``idle``: how long each stream had been idle (``idle_seconds``), counted on from
        there; without it every stream is just seen."""
        self.departed = Departed()
        self.recalled = set()
        over = len(streams) - self.capacity
        self.shed = []
        if over > 0:  # exported oldest first
            current = np.full(over, NO_BOOT) if boots is None or not len(boots) else boots[:over, 0]
            self.shed = list(zip(streams[:over], last_seq[:over].tolist(), current.tolist()))
            streams, last_seq, arrays = streams[over:], last_seq[over:], [a[over:] for a in arrays]
            boots = None if boots is None else boots[over:]
            gaps = None if gaps is None else gaps[over:]
            idle = None if idle is None else idle[over:]
        self._rows.clear()
        self.moves += 1
        self._free.clear()
        self.arrays = [np.empty((0, z.shape[1]), z.dtype) for z in self._zero]
        self.last_seq = np.empty(0, np.int64)
        self.last_seen = np.empty(0, np.float64)
        self.boots = np.empty((0, BOOT_HISTORY), np.int64)
        self.gaps = np.zeros((0, GAP_SLOTS, 2), np.int64)
        rows = self.acquire(streams)
        self.last_seq[rows] = last_seq
        if boots is not None and len(boots):
            w = min(BOOT_HISTORY, boots.shape[1])
            self.boots[rows, :w] = boots[:, :w]
        if gaps is not None and len(gaps):
            w = min(GAP_SLOTS, gaps.shape[1])
            self.gaps[rows, :w] = gaps[:, :w]
        if idle is not None and len(idle):
            self.last_seen[rows] = self._now() - idle
        self.scatter(rows, arrays)

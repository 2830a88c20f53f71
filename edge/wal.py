"""Write-ahead log entries and their on-disk framing (format 2).

The service appends, before it acknowledges a message to the broker, everything a restart needs
to answer exactly as the first run would have: the accepted sample messages and control resets
(``Record``), the decisions that depend on time or on messages that were not logged
(``Release``, ``Void``, ``Evict``), answers that replay cannot recompute (``Output``) and how
far the broker has acknowledged our answers (``Mark``).

Every entry is one frame (little-endian)::

    4  magic b"\\x8eEW2"
    4  u32 body length
    4  u32 crc32(body)
    .  body: u8 kind | u8 flags | u64 lsn | kind-specific fields (see ``encode``)

The magic lets a reader find the next intact frame after a damaged one, so one flipped byte
costs one entry, not the rest of the log; every skipped span is reported (``Damage``).

Flag ``_MORE`` (32, any kind) says that the next frame was written with this one, in the same
round: a replay steps a round's messages together, as the run did (stepped one by one they
may leave the streams in another order of use, and at capacity another stream is evicted).
Entries without it end their round (each is one of its own in a log of an earlier version).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"\x8eEW2"
_FRAME = struct.Struct("<4sII")
_BODY = struct.Struct("<cBQ")
_SAMPLE = struct.Struct("<IIdHH")  # seq, boot, ts, k, F
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
MAX_BODY = 64 << 20  # larger lengths are damage, not a record

# flags
_BOOT, _CARRIED, _REBASE, _REDELIVERED, _MID, _MORE = 1, 2, 4, 8, 16, 32


@dataclass(slots=True)  # made per message: not frozen, whose __init__ costs 5x
class Record:
    """An accepted sample message, or (k == 0) a control reset of its stream.

    ``lsn`` numbers every logged message in arrival order across restarts. ``carried`` marks a
    copy written into a new log segment at a checkpoint (held back by the reorder buffer).
    A reset with ``rebase`` makes ``seq`` the next expected seq of the stream.
    """

    stream: str
    seq: int
    ts: float | None
    values: np.ndarray  # [k, F] float64
    boot: int | None = None
    lsn: int = 0
    carried: bool = False
    rebase: bool = False
    redelivered: bool = False  # the broker marked the message as a redelivery (DUP)
    # Of a control reset: the broker's packet id of its message (0: none), for telling a
    # redelivery of it from a new reset (logged in the place of the timestamp a reset lacks).
    mid: int = 0

    @property
    def is_reset(self) -> bool:
        return len(self.values) == 0


@dataclass(frozen=True, slots=True)
class Output:
    """A message to publish that replay cannot recompute (or a carried unacknowledged one)."""

    lsn: int
    topic: str
    payload: bytes
    carried: bool = False


@dataclass(frozen=True, slots=True)
class Mark:
    """Every answer to messages with lsn <= ``acked`` was acknowledged by the broker."""

    acked: int


@dataclass(frozen=True, slots=True)
class Release:
    """The reorder buffer stopped waiting and released ``stream``'s held message ``seq``."""

    stream: str
    seq: int


@dataclass(slots=True)  # made per message: not frozen, whose __init__ costs 5x
class Void:
    """A message took ``seq`` but was refused: the reorder buffer stops waiting for it."""

    stream: str
    seq: int


@dataclass(frozen=True, slots=True)
class Evict:
    """``stream`` was idle past ``idle_timeout`` and forgotten before the entries after this.
    Logged because the decision depends on the clock, which a replay must not consult."""

    stream: str


Entry = Record | Output | Mark | Release | Void | Evict


@dataclass(frozen=True)
class Joined:
    """Read after an entry written in one round with the next frame."""


@dataclass(frozen=True)
class Damage:
    """A span of a log file that held no intact frame."""

    offset: int
    length: int
    at_end: bool  # a torn tail: the last write did not complete


def _text(s: str) -> bytes:
    b = s.encode()
    return _U16.pack(len(b)) + b


def encode(entry: Entry, *, more: bool = False) -> bytes:
    """One frame; ``more``: the next frame is of the same round."""
    joined = _MORE if more else 0
    if isinstance(entry, Record):
        flags = (
            joined
            | (_BOOT if entry.boot is not None else 0)
            | (_CARRIED if entry.carried else 0)
            | (_REBASE if entry.rebase else 0)
            | (_REDELIVERED if entry.redelivered else 0)
        )
        k, f = entry.values.shape
        ts = math.nan if entry.ts is None else entry.ts
        if entry.mid and not k:
            flags, ts = flags | _MID, float(entry.mid)
        body = (
            _BODY.pack(b"S", flags, entry.lsn) + _text(entry.stream)
            + _SAMPLE.pack(entry.seq, entry.boot or 0, ts, k, f)
            + np.ascontiguousarray(entry.values, "<f8").tobytes()
        )  # fmt: skip
    elif isinstance(entry, Output):
        body = (
            _BODY.pack(b"O", joined | (_CARRIED if entry.carried else 0), entry.lsn)
            + _text(entry.topic) + _U32.pack(len(entry.payload)) + entry.payload
        )  # fmt: skip
    elif isinstance(entry, Mark):
        body = _BODY.pack(b"A", joined, entry.acked)
    elif isinstance(entry, Evict):
        body = _BODY.pack(b"E", joined, 0) + _text(entry.stream)
    else:
        kind = b"X" if isinstance(entry, Release) else b"V"
        body = _BODY.pack(kind, joined, 0) + _text(entry.stream) + _U32.pack(entry.seq)
    return _FRAME.pack(MAGIC, len(body), zlib.crc32(body)) + body


def sample_record_size(stream: str, samples: int, features: int) -> int:
    """Body bytes of the ``Record`` of a sample message: past ``MAX_BODY`` it could be written
    but would be read back as damage."""
    return _BODY.size + 2 + len(stream.encode()) + _SAMPLE.size + 8 * samples * features


def _read_text(body: bytes, off: int) -> tuple[str, int]:
    (n,) = _U16.unpack_from(body, off)
    end = off + 2 + n
    if end > len(body):
        raise ValueError("text runs past the record")
    return body[off + 2 : end].decode(), end


def decode(body: bytes) -> Entry:
    kind, flags, lsn = _BODY.unpack_from(body)
    off = _BODY.size
    if kind == b"S":
        stream, off = _read_text(body, off)
        seq, boot, ts, k, f = _SAMPLE.unpack_from(body, off)
        off += _SAMPLE.size
        if off + 8 * k * f != len(body):
            raise ValueError("sample record length does not match k x F")
        values = np.frombuffer(body, "<f8", k * f, off).reshape(k, f).astype(np.float64)
        mid = int(ts) if flags & _MID and not k and 0 < ts < 1 << 16 else 0
        return Record(
            stream,
            seq,
            None if mid or math.isnan(ts) else ts,
            values,
            boot if flags & _BOOT else None,
            lsn,
            bool(flags & _CARRIED),
            bool(flags & _REBASE),
            bool(flags & _REDELIVERED),
            mid,
        )
    if kind == b"O":
        topic, off = _read_text(body, off)
        (n,) = _U32.unpack_from(body, off)
        if off + 4 + n != len(body):
            raise ValueError("output record length mismatch")
        return Output(lsn, topic, body[off + 4 :], bool(flags & _CARRIED))
    if kind == b"A":
        return Mark(lsn)
    if kind == b"E":
        stream, off = _read_text(body, off)
        if off != len(body):
            raise ValueError("evict record length mismatch")
        return Evict(stream)
    if kind in (b"X", b"V"):
        stream, off = _read_text(body, off)
        (seq,) = _U32.unpack_from(body, off)
        return Release(stream, seq) if kind == b"X" else Void(stream, seq)
    raise ValueError(f"unknown entry kind {kind!r}")


def encode_round(entries: Sequence[Entry]) -> bytes:
    """The frames of entries written in one round (see ``_MORE``)."""
    last = len(entries) - 1
    return b"".join(encode(e, more=i < last) for i, e in enumerate(entries))


def scan(data: bytes) -> Iterator[Entry | Damage | Joined]:
    """Every intact entry in order, each written in one round with the next frame followed by
    ``Joined``; a ``Damage`` for every span in between that is not one."""
    off, size = 0, len(data)
    while off < size:
        entry: Entry | None = None
        end = off
        if data.startswith(MAGIC, off) and off + _FRAME.size <= size:
            _, length, crc = _FRAME.unpack_from(data, off)
            end = off + _FRAME.size + length
            if length <= MAX_BODY and end <= size:
                body = data[off + _FRAME.size : end]
                if zlib.crc32(body) == crc:
                    try:
                        entry = decode(body)
                    except (ValueError, UnicodeDecodeError, struct.error):
                        entry = None
        if entry is not None:
            yield entry
            if body[1] & _MORE:
                yield Joined()
            off = end
            continue
        nxt = data.find(MAGIC, off + 1)
        stop = size if nxt < 0 else nxt
        yield Damage(off, stop - off, at_end=nxt < 0 and _torn(data, off))
        off = stop


def _torn(data: bytes, off: int) -> bool:
    """Whether the span from ``off`` to the end is a frame whose write did not finish: cut
    short, or with zeros in place of its last bytes (a power cut can leave a file's new
    length on disk without the blocks written last)."""
    tail = data[off:].rstrip(b"\0")
    if not tail:
        return True
    if len(tail) < _FRAME.size:
        return bool(MAGIC.startswith(tail[:4]))
    if not tail.startswith(MAGIC):
        return False
    _, length, _ = _FRAME.unpack_from(tail)
    return bool(_FRAME.size + length > len(tail))

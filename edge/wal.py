"""Write-ahead log of accepted sample messages, so that a message can be acknowledged to the
broker before its effect reaches a snapshot.

Record layout (little-endian)::

    u32 body length | u32 crc32(body) | body
    body: u16 stream length | stream UTF-8 | u32 seq | f64 ts (NaN = none) | u16 k | u16 F
          | k*F f64 values

A record with k = 0 samples is a control reset of its stream, logged in order with the
samples so that a replay resets at the same point.

A torn tail (crash mid-write) fails its length or CRC check and is cut off on replay; such a
record was never acknowledged, so the broker redelivers it.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<IdHH")


@dataclass(frozen=True)
class Record:
    stream: str
    seq: int
    ts: float | None
    values: np.ndarray  # [k, F] float64; k == 0 marks a reset

    @property
    def is_reset(self) -> bool:
        return len(self.values) == 0


def encode(rec: Record) -> bytes:
    sid = rec.stream.encode()
    k, f = rec.values.shape
    ts = math.nan if rec.ts is None else rec.ts
    body = (
        struct.pack("<H", len(sid)) + sid + _HEAD.pack(rec.seq, ts, k, f)
        + np.ascontiguousarray(rec.values, "<f8").tobytes()
    )  # fmt: skip
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes) -> Record:
    (n,) = struct.unpack_from("<H", body)
    stream = body[2 : 2 + n].decode()
    seq, ts, k, f = _HEAD.unpack_from(body, 2 + n)
    off = 2 + n + _HEAD.size
    values = np.frombuffer(body, "<f8", k * f, off).reshape(k, f).astype(np.float64)
    return Record(stream, seq, None if math.isnan(ts) else ts, values)


class WriteAheadLog:
    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the service's life
        self.records = 0

    def append(self, records: Sequence[Record]) -> None:
        """One write for the whole batch; on return the records survive a crash of this
        process (and, with ``fsync``, a power cut)."""
        if not records:
            return
        self._file.write(b"".join(encode(r) for r in records))
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self.records += len(records)

    def replay(self) -> Iterator[Record]:
        """Every intact record, in order; a torn tail is truncated away."""
        data = self.path.read_bytes() if self.path.exists() else b""
        off = good = 0
        while off + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, off)
            body = data[off + _FRAME.size : off + _FRAME.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                break
            try:
                rec = _decode_body(body)
            except (ValueError, UnicodeDecodeError, struct.error):
                break
            off += _FRAME.size + length
            good = off
            yield rec
        if good != len(data):
            self._file.close()
            with open(self.path, "r+b") as f:
                f.truncate(good)
            self._file = open(self.path, "ab")  # noqa: SIM115

    def rotate(self, keep: Sequence[Record] = ()) -> None:
        """Start over after a snapshot, keeping the records the snapshot does not cover."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(encode(r) for r in keep))
            f.flush()
            os.fsync(f.fileno())
        self._file.close()
        os.replace(tmp, self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115
        self.records = len(keep)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

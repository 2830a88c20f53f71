"""The ``restart`` flags of evicted streams, in a table of fixed size.

A stream evicted (least recently used beyond ``capacity``, or idle) comes back from the zero
state, and its first answer must say ``restart``. Streams evicted for good must not pile up,
and a bounded list of ids is no answer: a fleet larger than ``capacity`` churns through it,
each returning stream evicting another whose id pushes out the flags of the streams about to
return. So the flags live in a fixed table of 2^17 buckets of 8 slots (4.5 MiB, made when
the first stream is flagged), each slot a 30-bit fingerprint of a stream id, each id with two
buckets and its flag put into the emptier one (which keeps the fullest bucket far below 8).

A stream new to the runtime takes a flag only if its fingerprint is in one of its buckets
(one chance in 2^29 for each flag they hold), so it no longer takes the flag of an evicted
stream that merely shares its slot, as counting per slot did (95 of 20,000 random evicted
ids lost their flags to 20,000 new ones: ``bench.restart_flags``). Where both buckets are
full, the first gives its oldest flag up to a count that any stream of that bucket whose
fingerprint is not found takes (a ``restart`` it may not need); a flag is lost only if a new
stream takes it so.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zlib
from array import array

import numpy as np

__all__ = ["RestartFlags"]

WAYS = 8
LEGACY_SLOTS = 1 << 22  # of the table of counts per slot that snapshots held before


class RestartFlags:
    BUCKETS = 1 << 17

    def __init__(self) -> None:
        self._fp: array[int] | None = None  # BUCKETS rows of WAYS fingerprints, 0: empty
        self._over: array[int] | None = None  # per bucket: flags it gave up, full
        self._legacy: bytearray | None = None  # counts per crc32 slot, of a snapshot before
        self.pending = 0  # flags set and not yet taken (including those never to be)

    def _where(self, stream: str) -> tuple[int, int, int]:
        """The stream's two buckets and its fingerprint (never 0)."""
        digest = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=8)
        h = int.from_bytes(digest.digest(), "little")
        mask = self.BUCKETS - 1
        return h & mask, (h >> 17) & mask, (h >> 34) | 1

    def _tables(self) -> tuple[array[int], array[int]]:
        if self._fp is None or self._over is None:
            self._fp = array("I", bytes(4 * self.BUCKETS * WAYS))
            self._over = array("I", bytes(4 * self.BUCKETS))
        return self._fp, self._over

    def set(self, stream: str) -> None:
        if self._add(*self._where(stream)):
            self.pending += 1

    def _add(self, b1: int, b2: int, key: int) -> bool:
        """Put a fingerprint into the emptier of its two buckets (which keeps the fullest
        bucket far below ``WAYS``); False if it is there already (once is enough: the
        stream's first answer takes it). Both full: the first gives its oldest flag up to
        its count, which any of its streams takes."""
        fp, over = self._tables()
        rows = fp[b1 * WAYS : b1 * WAYS + WAYS], fp[b2 * WAYS : b2 * WAYS + WAYS]
        if key in rows[0] or key in rows[1]:
            return False
        free = [row.count(0) for row in rows]
        b, row = (b1, rows[0]) if free[0] >= free[1] else (b2, rows[1])
        at = b * WAYS
        if row[-1] == 0:
            fp[at + row.index(0)] = key
        else:
            over[b] += 1
            fp[at : at + WAYS] = row[1:] + array("I", (key,))
        return True

    def pop(self, stream: str) -> bool:
        """Whether the stream was flagged; its flag is taken."""
        if self._fp is not None and self._over is not None:
            fp, over = self._fp, self._over
            b1, b2, key = self._where(stream)
            for b in (b1, b2):
                row = fp[b * WAYS : b * WAYS + WAYS]
                if key in row:
                    i = row.index(key)
                    fp[b * WAYS + i : b * WAYS + WAYS] = row[i + 1 :] + array("I", (0,))
                    return self._taken()
            for b in (b1, b2):
                if over[b]:
                    over[b] -= 1
                    return self._taken()
        if self._legacy is not None:
            i = zlib.crc32(stream.encode("utf-8", "surrogatepass")) & (LEGACY_SLOTS - 1)
            if self._legacy[i]:
                self._legacy[i] -= 1
                return self._taken()
        return False

    def _taken(self) -> bool:
        self.pending = max(self.pending - 1, 0)
        return True

    def export(self) -> dict[str, str] | None:
        """The tables for a snapshot (compressed: mostly empty), None when nothing is flagged."""
        if not self.pending:
            return None
        doc = {}
        if self._fp is not None and self._over is not None:
            raw = self._fp.tobytes() + self._over.tobytes()
            if sys.byteorder == "big":  # little-endian in the file
                raw = np.frombuffer(raw, np.uint32).astype("<u4").tobytes()
            doc["buckets"] = base64.b64encode(zlib.compress(raw, 1)).decode()
        if self._legacy is not None and any(self._legacy):
            doc["slots"] = base64.b64encode(zlib.compress(bytes(self._legacy), 1)).decode()
        return doc

    def load(self, doc: object) -> None:
        """Add the flags of ``export`` (or of a snapshot's older table of counts per slot, a
        string, still taken as it was: by any stream of a slot) to those set here."""
        if not doc:
            return
        if isinstance(doc, str):
            doc = {"slots": doc}
        if not isinstance(doc, dict):
            raise ValueError(f"restart flags of type {type(doc).__name__}")
        if text := doc.get("buckets"):
            raw = np.frombuffer(zlib.decompress(base64.b64decode(text)), "<u4")
            n = self.BUCKETS
            if len(raw) != n * (WAYS + 1):
                raise ValueError(f"a table of {len(raw)} numbers, not {n * (WAYS + 1)}")
            fp, over = self._tables()
            if not self.pending:
                fp[:] = array("I", raw[: n * WAYS].astype(np.uint32).tobytes())
                self.pending += int(np.count_nonzero(raw[: n * WAYS]))
            else:  # beside flags set here (streams evicted by the restore): one at a time
                for i in np.flatnonzero(raw[: n * WAYS]):
                    b = int(i) // WAYS
                    self.pending += self._add(b, b, int(raw[i]))
            for k in np.flatnonzero(raw[n * WAYS :]):
                over[int(k)] += int(raw[n * WAYS + k])
            self.pending += int(raw[n * WAYS :].sum())
        if text := doc.get("slots"):
            table = zlib.decompress(base64.b64decode(text))
            if len(table) != LEGACY_SLOTS:
                raise ValueError(f"a table of {len(table)} slots, not {LEGACY_SLOTS}")
            if self._legacy is not None:
                both = np.frombuffer(table, np.uint8) + np.frombuffer(self._legacy, np.uint8)
                table = np.minimum(both.astype(int), 255).astype(np.uint8).tobytes()
            self.pending += sum(table) - (sum(self._legacy) if self._legacy else 0)
            self._legacy = bytearray(table)

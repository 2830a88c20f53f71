"""Snapshot file format, version 2 (little-endian, no pickle).

::

    offset  size  content
    0       8     magic b"ELSTMSNP"
    8       2     u16 format version (1)
    10      2     u16 reserved (0)
    12      4     u32 header length N
    16      N     header, UTF-8 JSON: model_sha256, state_layout, streams, created, extra,
                  and idle_seconds (optional: how long each stream had been idle)
    16+N    8*S   i64 last seq per stream (-1 = none yet), S = len(streams)
    ...     8*S*B i64 boot ids per stream, current first (-1 = none), B = header "boot_history"
    ...     16*S*G i64 (first skipped seq, count) of each stream's last gaps, G = "gap_slots"
    ...           each state tensor in state_layout order: S rows x width, its dtype
    end-32  32    sha256 of every byte before it

Written to a temp file in the same directory, fsynced, then renamed over the target, so a
crash leaves either the old snapshot or the new one, never a torn file. Version 1 (no boot
ids) is still read. A header key added later (``idle_seconds``) is optional, so the version
stays: a snapshot without it reads as one of streams just seen, and an edge-lstm that does not
know it ignores it (a rollback still reads the snapshot).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NewerFormat, SnapshotError
from .outfile import KINDS

MAGIC = b"ELSTMSNP"
VERSION = 2
READABLE = (1, 2)
_HEAD = struct.Struct("<8sHHI")
DTYPES = {"int8": "<i1", "int16": "<i2", "float32": "<f4"}


@dataclass
class Snapshot:
    model_sha256: str
    state_layout: list[list[Any]]  # [name, width, dtype, scale, zero_point]
    streams: list[str]
    last_seq: np.ndarray
    arrays: list[np.ndarray]
    extra: dict[str, Any] = field(default_factory=dict)
    boots: np.ndarray | None = None  # [S, B] i64; None reads as "no boot ids known"
    gaps: np.ndarray | None = None  # [S, G, 2] i64; None reads as "no gaps remembered"
    # [S] seconds each stream had been idle when taken: a duration, for neither the monotonic
    # clock (a reboot) nor the wall clock (a device without RTC) carries over; None: not said
    idle: np.ndarray | None = None


def encode(snap: Snapshot) -> bytes:
    return b"".join(chunks(snap))


def chunks(snap: Snapshot) -> Iterator[bytes | memoryview]:
    """The file's bytes in pieces, digest last: written piece by piece, a snapshot of many
    streams costs no second copy of the state in memory."""
    n = len(snap.streams)
    boots = np.full((n, 1), -1, np.int64) if snap.boots is None else snap.boots
    gaps = np.zeros((n, 1, 2), np.int64) if snap.gaps is None else snap.gaps
    fields: dict[str, Any] = {
        "model_sha256": snap.model_sha256,
        "state_layout": snap.state_layout,
        "streams": snap.streams,
        "created": time.time(),
        "extra": snap.extra,
        "boot_history": int(boots.shape[1]),
        "gap_slots": int(gaps.shape[1]),
    }
    if snap.idle is not None:  # milliseconds are plenty for a timeout
        fields["idle_seconds"] = np.round(snap.idle.astype(np.float64), 3).tolist()
    header = _dumps(fields).encode()
    arrays = [(snap.last_seq, "<i8"), (boots, "<i8"), (gaps, "<i8")]
    arrays += [(a, DTYPES[layout[2]]) for layout, a in zip(snap.state_layout, snap.arrays)]
    digest = hashlib.sha256()
    for part in (_HEAD.pack(MAGIC, VERSION, 0, len(header)), header):
        digest.update(part)
        yield part
    for arr, dtype in arrays:
        view = np.ascontiguousarray(arr, dtype).reshape(-1).view(np.uint8).data
        digest.update(view)
        yield view
    yield digest.digest()


SLICE = 500  # list items encoded per json.dumps call (``_dumps``)


def _dumps(doc: dict[str, Any]) -> str:
    """``json.dumps(doc)``, its long lists encoded in slices with the GIL let go between them.
    A snapshot is written in a thread beside the one answering samples, and one call encoding
    10,000 streams' ids and idle times held that one for ~6 ms."""
    out = []
    for key, value in doc.items():
        if isinstance(value, list) and len(value) > SLICE:
            parts = []
            for i in range(0, len(value), SLICE):
                parts.append(json.dumps(value[i : i + SLICE], allow_nan=False)[1:-1])
                time.sleep(0)
            text = "[" + ", ".join(parts) + "]"
        else:
            text = json.dumps(value, allow_nan=False)
        out.append(f"{json.dumps(key)}: {text}")
    return "{" + ", ".join(out) + "}"


def _check_header(header: Any, version: int, size: int) -> None:
    """The header's fields of the types decode reads them as, else ValueError naming the bad
    value. The digest only says the file is as written: a header of another writer (or edited
    and signed again) crashed the restore with a KeyError or TypeError, a count of streams'
    state past the file's size with an OverflowError, and a stream listed twice or a number
    for a name was taken, one stream's state silently lost."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is {type(header).__name__}, not a JSON object")
    if not isinstance(header.get("model_sha256"), str):
        raise ValueError(f"model_sha256 {header.get('model_sha256')!r:.40} is not a string")
    streams = header.get("streams")
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        raise ValueError(f"streams {streams!r:.60} is not a list of stream ids")
    seen: set[str] = set()
    for s in streams:
        if s in seen:
            raise ValueError(f"stream {s!r:.60} is listed twice")
        seen.add(s)
    if not isinstance(header.get("extra", {}) or {}, dict):
        raise ValueError(f"extra {header['extra']!r:.40} is not a JSON object")
    layout = header.get("state_layout")
    if not isinstance(layout, list) or not all(isinstance(x, list) and len(x) > 2 for x in layout):
        raise ValueError(f"state_layout {layout!r:.60} is not a list of tensor descriptions")
    counts = [(f"state_layout {x[0]!r:.40} width", x[1]) for x in layout]
    if version >= 2:
        counts += [(k, header.get(k)) for k in ("boot_history", "gap_slots")]
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= size:
            raise ValueError(f"{name} {value!r:.40} is not a whole number the file can hold")


def _check_numbering(boots: np.ndarray, gaps: np.ndarray) -> None:
    """Boot ids are -1 (none) or unsigned 32-bit, gaps (first skipped seq, count) unsigned
    32-bit: a file signed with others (an int64 minimum, a negative count) was restored."""
    for name, arr, low in (("boot id", boots, -1), ("gap", gaps, 0)):
        bad = arr[(arr < low) | (arr >= 2**32)]
        if bad.size:
            raise ValueError(f"{name} {int(bad[0])} is outside {low}..{2**32 - 1}")


def decode(data: bytes, where: str = "snapshot") -> Snapshot:
    if len(data) < _HEAD.size + 32 or data[:8] != MAGIC:
        raise SnapshotError(f"{where}: not an edge-lstm snapshot (bad magic or too short)")
    _, version, _, hlen = _HEAD.unpack_from(data)
    if version not in READABLE:
        problem = f"{where}: snapshot format version {version}, this runtime reads {READABLE}"
        if version > VERSION and hashlib.sha256(data[:-32]).digest() == data[-32:]:
            # Intact (a damaged version field fails the digest): a later edge-lstm's, whose
            # state an older one run on the directory (a rollback) would drop as damage.
            raise NewerFormat(problem)
        raise SnapshotError(problem)
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{where}: checksum mismatch, the file is corrupt or truncated")
    try:
        header = json.loads(body[_HEAD.size : _HEAD.size + hlen])
        _check_header(header, version, len(body))
        streams = [str(s) for s in header["streams"]]
        layout = header["state_layout"]
        n = len(streams)
        off = _HEAD.size + hlen
        last_seq = np.frombuffer(body, "<i8", n, off).astype(np.int64)
        off += 8 * n
        boots = gaps = None
        if version >= 2:
            width = int(header["boot_history"])
            boots = np.frombuffer(body, "<i8", n * width, off).reshape(n, width).astype(np.int64)
            off += 8 * n * width
            slots = int(header["gap_slots"])
            gaps = np.frombuffer(body, "<i8", n * slots * 2, off).reshape(n, slots, 2).copy()
            off += 16 * n * slots
            _check_numbering(boots, gaps)
        arrays = []
        for _, width, dtype, *_ in layout:
            count = n * int(width)
            arr = np.frombuffer(body, DTYPES[dtype], count, off).reshape(n, int(width))
            arrays.append(arr.astype(DTYPES[dtype]).copy())
            off += arr.nbytes
        idle = _idle_seconds(header.get("idle_seconds"), n)
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise SnapshotError(f"{where}: malformed snapshot content: {exc}") from exc
    if off != len(body):
        raise SnapshotError(f"{where}: {len(body) - off} unexpected bytes after the state arrays")
    return Snapshot(
        header["model_sha256"],
        layout,
        streams,
        last_seq,
        arrays,
        dict(header.get("extra") or {}),
        boots,
        gaps,
        idle,
    )


def _idle_seconds(value: Any, n: int) -> np.ndarray | None:
    """The header's ``idle_seconds``: ``n`` numbers >= 0 (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        raise ValueError(f"idle_seconds is not a list of {n} numbers")
    idle = np.asarray(value, np.float64)  # ValueError or TypeError for a non-number
    if not np.isfinite(idle).all() or (idle < 0).any():
        raise ValueError("idle_seconds holds a negative or non-finite number")
    return idle


def write_atomic(path: str | Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write (``data`` whole or in pieces), fsync, rename, fsync the directory: all or nothing."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in [data] if isinstance(data, bytes) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(target.parent or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read(path: str | Path) -> Snapshot:
    """Read a snapshot file whole. Only a regular file: a FIFO blocked the read forever and a
    device such as ``/dev/zero`` was read until memory ran out. The open never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read snapshot: {exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise SnapshotError(f"{str(path)!r}: cannot read snapshot: {exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise SnapshotError(f"{path}: cannot read snapshot: it is {kind}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        try:
            size, planned = os.fstat(f.fileno()).st_size, _planned_size(f)
            if planned == 0:  # a file of zeros (or anything else) no longer than its head
                raise SnapshotError(f"{path}: not an edge-lstm snapshot (bad magic or too short)")
            if planned is not None and planned != size:
                # Read whole, a file grown past what it holds (a sparse file of gigabytes of
                # zeros) stopped the start with a MemoryError instead of falling back.
                raise SnapshotError(
                    f"{path}: {size} bytes, where its header describes {planned}: the file is "
                    "corrupt or truncated"
                )
            f.seek(0)
            data = f.read()
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot read snapshot: {exc}") from exc
    return decode(data, str(path))


def _planned_size(f: Any) -> int | None:
    """The size of the snapshot file ``f`` as its head and header describe it, read without
    its state: 0 for a file that is no snapshot, None where they describe none (``decode``
    names what is wrong then)."""
    head = f.read(_HEAD.size)
    if len(head) < _HEAD.size or head[:8] != MAGIC:
        return 0
    _, version, _, hlen = _HEAD.unpack(head)
    size = os.fstat(f.fileno()).st_size
    if version not in READABLE or _HEAD.size + hlen + 32 > size:
        return None
    try:
        header = json.loads(f.read(hlen))
        _check_header(header, version, size)
        n = len(header["streams"])
        planned = _HEAD.size + hlen + 8 * n + 32
        if version >= 2:
            planned += 8 * n * int(header["boot_history"]) + 16 * n * int(header["gap_slots"])
        for _, width, dtype, *_ in header["state_layout"]:
            planned += n * int(width) * np.dtype(DTYPES[dtype]).itemsize
    except (KeyError, ValueError, TypeError, RecursionError):
        return None
    return int(planned)

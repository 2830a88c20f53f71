"""Snapshot file format, version 2 (little-endian, no pickle).

::

    offset  size  content
    0       8     magic b"ELSTMSNP"
    8       2     u16 format version (1)
    10      2     u16 reserved (0)
    12      4     u32 header length N
    16      N     header, UTF-8 JSON: model_sha256, state_layout, streams, created, extra
    16+N    8*S   i64 last seq per stream (-1 = none yet), S = len(streams)
    ...     8*S*B i64 boot ids per stream, current first (-1 = none), B = header "boot_history"
    ...     16*S*G i64 (first skipped seq, count) of each stream's last gaps, G = "gap_slots"
    ...           each state tensor in state_layout order: S rows x width, its dtype
    end-32  32    sha256 of every byte before it

Written to a temp file in the same directory, fsynced, then renamed over the target, so a
crash leaves either the old snapshot or the new one, never a torn file. Version 1 (no boot
ids) is still read.
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


def encode(snap: Snapshot) -> bytes:
    return b"".join(chunks(snap))


def chunks(snap: Snapshot) -> Iterator[bytes | memoryview]:
    """The file's bytes in pieces, digest last: written piece by piece, a snapshot of many
    streams costs no second copy of the state in memory."""
    n = len(snap.streams)
    boots = np.full((n, 1), -1, np.int64) if snap.boots is None else snap.boots
    gaps = np.zeros((n, 1, 2), np.int64) if snap.gaps is None else snap.gaps
    header = json.dumps(
        {
            "model_sha256": snap.model_sha256,
            "state_layout": snap.state_layout,
            "streams": snap.streams,
            "created": time.time(),
            "extra": snap.extra,
            "boot_history": int(boots.shape[1]),
            "gap_slots": int(gaps.shape[1]),
        },
        allow_nan=False,
    ).encode()
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
        arrays = []
        for _, width, dtype, *_ in layout:
            count = n * int(width)
            arr = np.frombuffer(body, DTYPES[dtype], count, off).reshape(n, int(width))
            arrays.append(arr.astype(DTYPES[dtype]).copy())
            off += arr.nbytes
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
    )


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
            data = f.read()
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot read snapshot: {exc}") from exc
    return decode(data, str(path))

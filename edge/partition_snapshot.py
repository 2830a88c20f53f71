"""A partition's snapshot as one JetStream object: the files a ``Journal`` checkpoint leaves
(the engine snapshot and the log segment it starts, holding what a snapshot cannot: messages
held for reordering, answers not yet acknowledged) plus the stream sequence they cover.

::

    8  magic b"EDGEPS1\\n"
    4  u32 header length, header (JSON: partition, generation, covered, sizes, stream, twins,
       partitions)
    .  snapshot bytes, log segment bytes
    4  u32 crc32 of everything before it

Two slots per partition (generation % 2), so a damaged newest leaves the one before it.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SnapshotError, shown

MAGIC = b"EDGEPS1\n"
_U32 = struct.Struct("<I")


def object_name(partition: int, slot: int) -> str:
    return f"p{partition}.{slot}"


@dataclass(frozen=True)
class PartitionSnapshot:
    partition: int
    generation: int
    covered: int  # the last stream sequence whose message the state includes
    snapshot: bytes
    segment: bytes
    stream: str = ""  # when the stream was created: its sequences count in that incarnation
    twins: list[list[Any]] = field(default_factory=list)  # ``Twins.export()`` at ``covered``
    partitions: int = 0  # the group's partition count (0: written before it was recorded)

    def pack(self) -> bytes:
        head = json.dumps(
            {
                "partition": self.partition,
                "generation": self.generation,
                "covered": self.covered,
                "snapshot": len(self.snapshot),
                "segment": len(self.segment),
                "stream": self.stream,
                "twins": self.twins,
                "partitions": self.partitions,
            }
        ).encode()
        body = MAGIC + _U32.pack(len(head)) + head + self.snapshot + self.segment
        return body + _U32.pack(zlib.crc32(body))

    def write_into(self, directory: Path) -> None:
        """As generation 1 of a fresh journal directory, for ``Processor.recover``."""
        (directory / "snap-00000001.bin").write_bytes(self.snapshot)
        (directory / "wal-00000001.log").write_bytes(self.segment)


def _count(value: Any) -> bool:
    """Whether ``value`` is a whole number a sequence or count of JetStream can be (unsigned
    64-bit): a generation of 4,000 digits passed, and was logged in full wherever named."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _check_head(head: Any) -> None:
    """The header's fields of the types ``unpack`` reads them as, else ValueError naming the bad
    value. The crc only tells damage: a header of another writer had ``int()`` raise
    OverflowError on Infinity, truncate 1.5, take a negative size (the log segment then began
    inside the header), ``str()`` read a null stream id as "None", and twins that are not
    [hex key, count] pairs failed the restore later with a TypeError."""
    if not isinstance(head, dict):
        raise ValueError(f"the header is {type(head).__name__}, not a JSON object")
    counts = ["partition", "generation", "covered", "snapshot", "segment"]
    for key in counts + ["partitions"] * ("partitions" in head):
        value = head.get(key)
        if not _count(value):
            raise ValueError(f"{key} {shown(value, 40)} is not a whole number >= 0 and < 2**64")
    if not isinstance(head.get("stream", ""), str):
        raise ValueError(f"stream {shown(head['stream'], 40)} is not a string")
    twins = head.get("twins", [])
    if not isinstance(twins, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], int)
        and not isinstance(pair[1], bool)
        for pair in twins
    ):
        raise ValueError(f"twins {shown(twins, 60)} is not a list of [key, count] pairs")
    for key, _ in twins:
        bytes.fromhex(key)  # its ValueError names the bad character


def unpack(blob: bytes) -> PartitionSnapshot:
    if len(blob) < len(MAGIC) + 8 or not blob.startswith(MAGIC):
        raise SnapshotError("not a partition snapshot (bad magic)")
    body, (crc,) = blob[:-4], _U32.unpack(blob[-4:])
    if zlib.crc32(body) != crc:
        raise SnapshotError("partition snapshot checksum mismatch (damaged)")
    at = len(MAGIC)
    (n,) = _U32.unpack_from(body, at)
    at += 4
    try:
        head = json.loads(body[at : at + n])
        _check_head(head)
        at += n
        snap_len, seg_len = int(head["snapshot"]), int(head["segment"])
        if at + snap_len + seg_len != len(body):
            raise ValueError("sizes do not add up")
        return PartitionSnapshot(
            int(head["partition"]),
            int(head["generation"]),
            int(head["covered"]),
            body[at : at + snap_len],
            body[at + snap_len :],
            str(head.get("stream", "")),
            list(head.get("twins", [])),
            int(head.get("partitions", 0)),
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SnapshotError(f"partition snapshot header unreadable: {exc}") from exc

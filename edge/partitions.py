"""Partitions of the stream id space, and which live worker should own each: pure logic.

NATS does the partitioning itself: the JetStream stream's subject transform
``sensors.*.*`` -> ``in.{{partition(P,1)}}.{{wildcard(1)}}.{{wildcard(2)}}`` stores every
message under its partition number (FNV-1a 32 of the stream token, modulo P), so a worker reads
one partition through a consumer filtered on ``in.{p}.>``. ``partition`` below is the same
function, for tools and tests that need to know where a stream lands.

Ownership is rendezvous hashing over the live workers: every worker computes the same preferred
owner for every partition from the same member list, a worker joining or leaving moves only
the partitions it gains or loses, and no coordinator is needed. Leases in a key-value bucket
(see ``edge.nats_worker``) make sure that at most one worker acts on a partition at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .errors import ConfigError

SENSOR_SUBJECTS = ("sensors.*.data", "sensors.*.control")
STORED_PREFIX = "in"
MAX_PARTITIONS = 1024
_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193


def fnv1a32(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition(token: str, partitions: int) -> int:
    """The partition nats-server's ``{{partition(P,1)}}`` gives a subject token."""
    return fnv1a32(token.encode()) % partitions


def check_partitions(partitions: int) -> int:
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ConfigError(f"partitions = {partitions!r} must be in 1..{MAX_PARTITIONS}")
    return partitions


def transform_dest(partitions: int) -> str:
    """Where the stream stores ``sensors.{token}.{kind}``."""
    return (
        f"{STORED_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
    )


def filter_subject(p: int) -> str:
    return f"{STORED_PREFIX}.{p}.>"


# NATS's MQTT listener maps an MQTT topic level to a subject token: '.' becomes '//' (and '/'
# separates levels). A stream id is one level, so its token holds no '/' but may hold '//'.
def token_to_stream(token: str) -> str:
    return token.replace("//", ".")


def stream_to_token(stream: str) -> str:
    return stream.replace(".", "//")


def stored_to_topic(subject: str) -> str | None:
    """``in.{p}.{token}.{kind}`` -> ``sensors/{stream}/{kind}`` (the Processor's topics)."""
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != STORED_PREFIX:
        return None
    token, kind = ".".join(parts[2:-1]), parts[-1]
    return f"sensors/{token_to_stream(token)}/{kind}"


def topic_to_subject(topic: str) -> str:
    """An MQTT-style answer topic (``predictions/{stream}``) as the NATS subject that NATS's
    MQTT listener delivers to subscribers of that topic."""
    return ".".join(stream_to_token(level) for level in topic.split("/"))


def _weight(worker: str, p: int) -> bytes:
    return hashlib.sha256(f"{p}\0{worker}".encode()).digest()


def preferred(p: int, workers: Iterable[str]) -> str | None:
    """The live worker that should own partition ``p`` (highest rendezvous weight)."""
    best: tuple[bytes, str] | None = None
    for w in workers:
        key = (_weight(w, p), w)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def assignment(partitions: int, workers: Iterable[str]) -> dict[int, str]:
    ws = sorted(set(workers))
    out: dict[int, str] = {}
    for p in range(partitions):
        owner = preferred(p, ws)
        if owner is not None:
            out[p] = owner
    return out

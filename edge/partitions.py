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
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError, shown

SENSOR_SUBJECTS = ("sensors.*.data", "sensors.*.control")
SENSOR_KINDS = ("data", "control")
STORED_PREFIX = "in"
# The topic a stored message is handed to the Processor on (``stored_to_topic``)
READ_TOPIC = "sensors/{stream}/{kind}"
# NATS's MQTT listener stores every QoS 1/2 publish in its own stream (R3 in a 3-node
# cluster) under this prefix before it sends the PUBACK, and delivers what is stored there to
# MQTT QoS 1 subscriptions: the worker reads devices' publishes from it and writes answers to it.
MQTT_STORE = "$MQTT_msgs"
MQTT_STORE_PREFIX = "$MQTT.msgs."
MQTT_QOS_HEADER = "Nmqtt-Pub"  # set by the listener on every MQTT publish: the QoS, first char
SOURCE_HEADER = "Nats-Stream-Source"  # set by JetStream on a message copied from another stream
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
    whole = isinstance(partitions, int) and not isinstance(partitions, bool)
    if not whole or not 1 <= partitions <= MAX_PARTITIONS:
        raise ConfigError(f"partitions = {shown(partitions)} must be in 1..{MAX_PARTITIONS}")
    return partitions


def transform_dest(partitions: int) -> str:
    """Where the stream stores ``sensors.{token}.{kind}``."""
    return (
        f"{STORED_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
    )


def transform_partitions(dest: str | None) -> int | None:
    """The partition count of a stream's transform ``dest`` (None when it is not ours)."""
    made = re.fullmatch(
        re.escape(STORED_PREFIX) + r"\.\{\{partition\((\d+),1\)\}\}\..*", dest or ""
    )
    return int(made.group(1)) if made else None


def mqtt_source_transforms(partitions: int) -> list[tuple[str, str]]:
    """(source, destination) pairs that copy devices' stored QoS 1 publishes
    (``$MQTT.msgs.sensors.{token}.{kind}``) into the partitioned stream, as the direct
    capture of ``sensors.*.*`` would store them."""
    dest = f"{STORED_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"
    return [(f"{MQTT_STORE_PREFIX}sensors.*.{k}", f"{dest}.{k}") for k in SENSOR_KINDS]


class Twins:
    """An MQTT QoS 1/2 publish reaches the stream twice: live, when the stream's leader gets
    the listener's core publish (lost while the stream elects a leader: the listener's PUBACK
    waits only for its own store), and copied from the listener's store (durable; usually
    later, not always). Whichever copy comes first is stepped and its twin passed over.
    ``admit`` says True for a copy from the store stepped first (its live twin lost, or late);
    the worker treats it as a redelivery only within a takeover's replay, where its live twin
    may have come before the restored snapshot. A device's resend of the same bytes is a
    pair of its own: one of its copies is stepped (a reported duplicate), even when an entry
    left by an earlier pair (whose live copy was lost) takes the other."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        # key -> copies stepped whose twin has not come yet: > 0 live ones, < 0 stored ones
        self._open: OrderedDict[bytes, int] = OrderedDict()
        # entries let go beyond capacity, oldest first: a twin of theirs that still comes is
        # stepped again (a duplicate when it carries a seq), so the worker reports them
        self.forgotten = 0

    @staticmethod
    def _key(subject: str, data: bytes) -> bytes:
        return hashlib.blake2b(subject.encode() + b"\0" + data, digest_size=16).digest()

    def admit(self, subject: str, data: bytes, headers: dict[str, str] | None) -> bool | None:
        """None: pass the message over; else step it, True marking it as a redelivery."""
        if not headers or headers.get(MQTT_QOS_HEADER, "")[:1] not in ("1", "2"):
            return False  # native, or MQTT QoS 0: one copy only
        key = self._key(subject, data)
        side = -1 if SOURCE_HEADER in headers else 1
        n = self._open.get(key, 0)
        if n * side < 0:  # the twin of a copy already stepped
            if n + side:
                self._open[key] = n + side
            else:
                del self._open[key]
            return None
        self._open[key] = n + side
        self._open.move_to_end(key)
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
            self.forgotten += 1
        return side < 0

    def export(self) -> list[list[Any]]:
        """The copies stepped whose twin has not come yet, for a partition snapshot: a new
        owner replaying after it must pass over the twins still to come (a control message
        stepped twice would act twice)."""
        return [[key.hex(), n] for key, n in self._open.items()]

    def load(self, entries: list[list[Any]]) -> None:
        for key, n in entries:
            self._open[bytes.fromhex(key)] = int(n)


def answer_id(stream: str, lsn: int, subject: str, payload: bytes) -> str:
    """A JetStream message id for an answer: the answer to the same message (``lsn``, its
    sequence in the sensor stream made at ``stream``) that a replay after a failover computes
    again gets the same id, so the store keeps it once; answers to different messages never
    share one, also when their bytes are the same (a device sending the same thing twice)."""
    key = f"{stream}\0{lsn}\0{subject}\0".encode() + payload
    return hashlib.sha256(key).hexdigest()[:32]


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
    return READ_TOPIC.format(stream=token_to_stream(token), kind=kind)


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

"""Pure logic of the NATS worker: partition function, ownership plan, snapshot objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.errors import ConfigError, SnapshotError
from edge.partition_snapshot import PartitionSnapshot, unpack
from edge.partitions import (
    Twins,
    assignment,
    check_partitions,
    fnv1a32,
    partition,
    stored_to_topic,
    topic_to_subject,
    transform_dest,
)


def test_fnv1a32_known_values() -> None:
    # FNV-1a 32 reference values (the function nats-server's partition() uses)
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968
    assert all(0 <= partition(f"s{i}", 16) < 16 for i in range(100))


def test_transform_and_subjects() -> None:
    assert transform_dest(16) == "in.{{partition(16,1)}}.{{wildcard(1)}}.{{wildcard(2)}}"
    assert stored_to_topic("in.3.dev-1.data") == "sensors/dev-1/data"
    assert stored_to_topic("in.3.a//b.control") == "sensors/a.b/control"  # MQTT's '.' mapping
    assert stored_to_topic("other.3.x.data") is None
    assert topic_to_subject("predictions/a.b") == "predictions.a//b"
    with pytest.raises(ConfigError, match="partitions = 0"):
        check_partitions(0)


def test_assignment_moves_only_what_it_must() -> None:
    three = assignment(64, ["w1", "w2", "w3"])
    assert set(three) == set(range(64)) and set(three.values()) == {"w1", "w2", "w3"}
    two = assignment(64, ["w1", "w3"])
    # partitions of the survivors stay where they were; only w2's move
    assert all(two[p] == o for p, o in three.items() if o != "w2")
    four = assignment(64, ["w1", "w2", "w3", "w4"])
    assert all(four[p] in (o, "w4") for p, o in three.items())
    assert assignment(4, []) == {}


def test_snapshot_object_round_trip_and_damage(tmp_path: Path) -> None:
    snap = PartitionSnapshot(3, 7, 1234, b"S" * 100, b"W" * 10)
    blob = snap.pack()
    assert unpack(blob) == snap
    flipped = bytearray(blob)
    flipped[40] ^= 1
    with pytest.raises(SnapshotError, match="checksum"):
        unpack(bytes(flipped))
    with pytest.raises(SnapshotError, match="magic"):
        unpack(b"nonsense")
    snap.write_into(tmp_path)
    assert (tmp_path / "snap-00000001.bin").read_bytes() == b"S" * 100


def _signed(edit: dict[str, object]) -> bytes:
    """A partition snapshot whose header ``edit`` changed, its crc made again: intact as far as
    the crc tells, as one of another writer would be."""
    import json
    import struct
    import zlib

    from edge.partition_snapshot import MAGIC

    snap = PartitionSnapshot(3, 7, 1234, b"S" * 100, b"W" * 10, "s1", [["ab", 1]], 16)
    blob = snap.pack()
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    head = json.loads(blob[len(MAGIC) + 4 : len(MAGIC) + 4 + n]) | edit
    text = json.dumps(head).encode()
    body = MAGIC + struct.pack("<I", len(text)) + text + blob[len(MAGIC) + 4 + n : -4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"covered": float("inf")}, "covered inf is not a whole number >= 0"),
        ({"partitions": float("nan")}, "partitions nan is not a whole number >= 0"),
        ({"generation": 7.5}, "generation 7.5 is not a whole number >= 0"),
        ({"partition": -3}, "partition -3 is not a whole number >= 0"),
        ({"snapshot": -10, "segment": 120}, "snapshot -10 is not a whole number >= 0"),
        ({"stream": None}, "stream None is not a string"),
        ({"twins": [1]}, r"twins \[1\] is not a list of \[key, count\] pairs"),
        ({"generation": 10**4000}, "generation <4001-digit integer> is not a whole number"),
        (
            {"covered": 2**64},
            r"covered 18446744073709551616 is not a whole number >= 0 and < 2\*\*64",
        ),
        ({"twins": [["zz", 1]]}, "non-hexadecimal number"),
    ],
)
def test_a_partition_snapshot_header_of_the_wrong_shape_is_refused(
    edit: dict[str, object], message: str
) -> None:
    """A header of another writer raised OverflowError out of the restore (Infinity), or was
    taken: a fraction truncated, a negative size starting the log segment inside the header,
    a null stream id read as "None", twins that failed the restore later with a TypeError."""
    assert unpack(_signed({})).twins == [["ab", 1]]  # the re-signing alone changes nothing
    with pytest.raises(SnapshotError, match=f"partition snapshot header unreadable: {message}"):
        unpack(_signed(edit))


def _live(qos: str = "1") -> dict[str, str]:
    return {"Nmqtt-Pub": qos}


def _stored() -> dict[str, str]:
    return {"Nmqtt-Pub": "1", "Nats-Stream-Source": "$MQTT_msgs 7 $MQTT.msgs.sensors.a.data"}


def test_twins_step_the_first_copy_of_an_mqtt_publish_and_pass_over_the_second() -> None:
    t = Twins()
    subj = "in.3.a.data"
    assert t.admit(subj, b"x", None) is False  # native: one copy, stepped
    assert t.admit(subj, b"x", _live("0")) is False  # MQTT QoS 0: not stored by the listener
    # live copy first, then its stored twin
    assert t.admit(subj, b"1", _live()) is False
    assert t.admit(subj, b"1", _stored()) is None
    # stored copy first (its live twin lost, or still to come): stepped as a redelivery
    assert t.admit(subj, b"2", _stored()) is True
    assert t.admit(subj, b"2", _live()) is None
    # a device's resend: a second pair, whose first copy is stepped (a reported duplicate)
    assert t.admit(subj, b"1", _live()) is False
    assert t.admit(subj, b"1", _stored()) is None
    # the same bytes on another stream are another message
    assert t.admit("in.3.b.data", b"2", _live()) is False


def test_twins_forget_the_oldest_beyond_capacity() -> None:
    t = Twins(capacity=2)
    for b in (b"1", b"2", b"3"):
        assert t.admit("in.0.a.data", b, _live()) is False
    assert t.forgotten == 1  # reported by the worker (mqtt_twins_forgotten)
    assert t.admit("in.0.a.data", b"1", _stored()) is True  # forgotten: stepped again
    assert t.forgotten == 2  # its own entry (awaiting a live twin) let "2" go
    assert t.admit("in.0.a.data", b"3", _stored()) is None


def test_answer_ids_name_the_message_answered() -> None:
    from edge.partitions import answer_id

    one = answer_id("t0", 7, "predictions.a", b"{}")
    assert one == answer_id("t0", 7, "predictions.a", b"{}")  # a replay's
    assert one != answer_id("t0", 8, "predictions.a", b"{}")  # the same bytes, another message
    assert one != answer_id("t1", 7, "predictions.a", b"{}")  # the stream made anew
    assert one != answer_id("t0", 7, "predictions.b", b"{}")
    assert one != answer_id("t0", 7, "predictions.a", b"{ }")


def test_mqtt_source_transforms_mirror_the_capture() -> None:
    from edge.partitions import mqtt_source_transforms, transform_dest

    pairs = mqtt_source_transforms(16)
    assert [src for src, _ in pairs] == [
        "$MQTT.msgs.sensors.*.data",
        "$MQTT.msgs.sensors.*.control",
    ]
    assert pairs[0][1] == transform_dest(16).replace("{{wildcard(2)}}", "data")


def test_twins_still_to_come_move_with_the_partition_snapshot() -> None:
    """A new owner replays from the sequence its snapshot covers: a copy stepped before it
    whose twin comes after it must still be passed over there (a reset stepped twice acts
    twice), so the twins not yet matched travel in the snapshot."""
    t = Twins()
    assert t.admit("in.0.a.control", b'{"cmd": "reset"}', _live()) is False
    assert t.admit("in.0.a.data", b"2", _stored()) is True  # its live twin still to come
    snap = PartitionSnapshot(0, 1, 10, b"S", b"W", "t0", t.export())
    again = Twins()
    again.load(unpack(snap.pack()).twins)
    assert again.admit("in.0.a.control", b'{"cmd": "reset"}', _stored()) is None
    assert again.admit("in.0.a.data", b"2", _live()) is None
    head_without = PartitionSnapshot(0, 1, 10, b"S", b"W", "t0")  # written by an older version
    assert unpack(head_without.pack()).twins == []

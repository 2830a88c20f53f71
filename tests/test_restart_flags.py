"""The restart flags of evicted streams: a fixed table that neither grows with churn nor
gives one stream's flag to another."""

import base64
import random
import zlib

import pytest

from edge.restart_flags import LEGACY_SLOTS, RestartFlags


def ids(rnd: random.Random, n: int) -> list[str]:
    return [f"{rnd.getrandbits(64):016x}" for _ in range(n)]


def test_evicted_streams_keep_their_flags_through_as_many_new_streams():
    """Counting per hashed slot gave 95 of these 20,000 flags to new streams sharing a slot;
    the evicted streams then came back without ``restart``."""
    rnd = random.Random(7)
    evicted, new = ids(rnd, 20_000), ids(rnd, 20_000)
    flags = RestartFlags()
    for s in evicted:
        flags.set(s)
    assert flags.pending == 20_000
    assert [s for s in new if flags.pop(s)] == []
    assert [s for s in evicted if not flags.pop(s)] == []
    assert flags.pending == 0 and flags.export() is None


def test_a_stream_flagged_twice_holds_one_flag():
    flags = RestartFlags()
    flags.set("a")
    flags.set("a")
    assert flags.pending == 1
    assert flags.pop("a") and not flags.pop("a")


class OneBucket(RestartFlags):
    BUCKETS = 1  # every id in the one bucket: 8 fingerprints, the rest counted


def test_a_full_bucket_gives_its_oldest_flags_up_to_a_count_its_streams_take():
    flags = OneBucket()
    streams = [f"s{i}" for i in range(11)]
    for s in streams:
        flags.set(s)
    assert flags.pending == 11
    # The 8 newest are found by their fingerprints, in any order; the 3 oldest by the count.
    assert all(flags.pop(s) for s in reversed(streams[3:]))
    assert flags.pop("new-1") and flags.pop("s0") and flags.pop("s1")  # the count: 3
    assert not flags.pop("s2")  # its flag went to new-1: the one way a flag is lost
    assert flags.pending == 0


@pytest.mark.parametrize("cls", [RestartFlags, OneBucket])
def test_flags_survive_a_snapshot_beside_those_set_before_it_is_read(cls):
    rnd = random.Random(3)
    before, after = ids(rnd, 30), ids(rnd, 5)
    old = cls()
    for s in before:
        old.set(s)
    doc = old.export()
    assert doc is not None and set(doc) == {"buckets"}
    restored = cls()
    for s in after:  # evicted by the restore, flagged before the snapshot's flags are read
        restored.set(s)
    restored.load(doc)
    assert restored.pending == 35
    assert all(restored.pop(s) for s in before + after)
    assert not restored.pop("never-seen") and restored.pending == 0


def legacy_table(*streams: str) -> str:
    """A snapshot's flags as counts per crc32 slot, as the runtime wrote them before."""
    table = bytearray(LEGACY_SLOTS)
    for s in streams:
        table[zlib.crc32(s.encode()) & (LEGACY_SLOTS - 1)] += 1
    return base64.b64encode(zlib.compress(bytes(table), 1)).decode()


def test_a_snapshot_table_of_counts_per_slot_is_still_taken_and_written_back():
    flags = RestartFlags()
    flags.set("fresh")
    flags.load(legacy_table("old-1", "old-2"))
    assert flags.pending == 3
    again = RestartFlags()
    doc = flags.export()
    assert doc is not None and set(doc) == {"buckets", "slots"}
    again.load(doc)
    assert again.pop("old-1") and again.pop("fresh") and again.pending == 1
    assert not again.pop("old-1") and again.pop("old-2") and again.export() is None


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"buckets": base64.b64encode(zlib.compress(b"\0" * 12)).decode()}, "3 numbers"),
        ({"slots": base64.b64encode(zlib.compress(b"\0" * 12)).decode()}, "12 slots"),
        (["a"], "of type list"),
    ],
    ids=["buckets", "slots", "list"],
)
def test_a_damaged_table_is_refused_saying_what_it_is(doc, words):
    with pytest.raises(ValueError, match=words):
        RestartFlags().load(doc)

"""Device restarts in the engine: boot ids, restart_gap, and what a reset does to seq."""

import numpy as np
import pytest

import edge
from edge.errors import StaleSample

BUNDLE = "clf-int8"


@pytest.fixture
def xs():
    return np.random.default_rng(5).normal(0, 2, (80, 6))


def test_a_new_boot_restarts_the_stream_and_an_old_one_is_stale(bundles, xs, tmp_path):
    e = edge.load(bundles / BUNDLE)
    e.step("d", xs[:50], seq=1, boot=7)
    (oc,) = e.step_many([edge.Chunk("d", xs[50:53], 1, boot=8)])  # rebooted: seq starts over
    assert oc.restart and oc.seq == 1 and len(oc.y) == 3
    np.testing.assert_array_equal(oc.y, edge.load(bundles / BUNDLE).step("x", xs[50:53]))
    with pytest.raises(StaleSample, match="boot 7"):
        e.step("d", xs[60], seq=51, boot=7)  # a late message of the previous boot
    (dup,) = e.step_many([edge.Chunk("d", xs[52:53], 3, boot=8)])
    assert dup.duplicates == 1 and not dup.restart
    e.snapshot(tmp_path / "s.bin")  # boot ids survive a snapshot
    f = edge.load(bundles / BUNDLE)
    f.restore(tmp_path / "s.bin")
    with pytest.raises(StaleSample):
        f.step("d", xs[0], seq=99, boot=7)
    assert e.counters.restarts == 1 and e.counters.stale == 1


def test_a_boot_heard_only_after_the_next_one_is_stale_not_a_restart(bundles, xs):
    """A device counting its boots rebooted twice in a row (boot 8 then 9) and the only
    message of boot 8 arrived after boot 9's first: boot 9 goes on, boot 8 is stale."""
    e = edge.load(bundles / BUNDLE)
    e.step("d", xs[:5], seq=1, boot=7)
    (nine,) = e.step_many([edge.Chunk("d", xs[5:7], 1, boot=9)])
    assert nine.restart
    with pytest.raises(StaleSample, match="boot 8"):
        e.step("d", xs[7], seq=1, boot=8)
    (more,) = e.step_many([edge.Chunk("d", xs[8:10], 3, boot=9)])
    assert len(more.y) == 2 and not more.restart and e.boots("d")[0] == 9
    # An id far from the current one (a random nonce) is a new boot, as before.
    (nonce,) = e.step_many([edge.Chunk("d", xs[10:11], 1, boot=(9 - 1000) % 2**32)])
    assert nonce.restart


def test_first_boot_id_is_adopted_without_a_restart(bundles, xs):
    e = edge.load(bundles / BUNDLE)
    e.step("d", xs[:5], seq=1)
    (oc,) = e.step_many([edge.Chunk("d", xs[5:6], 6, boot=3)])
    assert not oc.restart and oc.seq == 6


def test_restart_gap_for_devices_without_boot_ids(bundles, xs):
    plain = edge.load(bundles / BUNDLE)
    plain.step("d", xs[:50], seq=1)
    (oc,) = plain.step_many([edge.Chunk("d", xs[50:51], 1)])
    assert oc.duplicates == 1 and not len(oc.y)  # without restart_gap: a duplicate
    e = edge.load(bundles / BUNDLE, restart_gap=10)
    e.step("d", xs[:50], seq=1)
    (near,) = e.step_many([edge.Chunk("d", xs[45:46], 45)])
    assert near.duplicates == 1 and not near.restart  # within the gap: a redelivery
    (far,) = e.step_many([edge.Chunk("d", xs[50:52], 1)])
    assert far.restart and far.seq == 1
    np.testing.assert_array_equal(far.y, edge.load(bundles / BUNDLE).step("x", xs[50:52]))


def test_a_seq_exactly_2_pow_31_behind_restarts_a_stream_with_restart_gap(bundles, xs):
    """2**31 away is as far behind as ahead: admitted as behind (a duplicate without
    ``restart_gap``), so with it such a seq is more than N behind and restarts the stream."""
    plain = edge.load(bundles / BUNDLE)
    plain.step("d", xs[:3], seq=2**31 + 5)  # last seq 2**31 + 7
    (dup,) = plain.step_many([edge.Chunk("d", xs[3:4], 7)])
    assert dup.duplicates == 1 and not dup.restart
    e = edge.load(bundles / BUNDLE, restart_gap=10)
    e.step("d", xs[:3], seq=2**31 + 5)
    (far,) = e.step_many([edge.Chunk("d", xs[3:5], 7)])
    assert far.restart and far.seq == 7 and far.duplicates == 0 and len(far.y) == 2
    np.testing.assert_array_equal(far.y, edge.load(bundles / BUNDLE).step("x", xs[3:5]))
    assert e.last_seq("d") == 8 and e.counters.restarts == 1


def test_reset_keeps_seq_unless_told(bundles, xs):
    e = edge.load(bundles / BUNDLE)
    e.step("d", xs[:10], seq=1)
    e.reset("d")
    assert e.last_seq("d") == 10
    e.reset("d", next_seq=1, boot=4)
    y = e.step("d", xs[10:12], seq=1)
    np.testing.assert_array_equal(y, edge.load(bundles / BUNDLE).step("x", xs[10:12]))


def test_late_samples_are_told_from_duplicates(bundles, xs):
    e = edge.load(bundles / BUNDLE)
    e.step("d", xs[:3], seq=10)  # the stream starts at 10
    (gap,) = e.step_many([edge.Chunk("d", xs[3:4], 15)])  # 13 and 14 skipped
    assert gap.gap == 2
    (late,) = e.step_many([edge.Chunk("d", xs[4:6], 13)])
    assert (late.duplicates, late.late) == (2, 2)
    (dup,) = e.step_many([edge.Chunk("d", xs[4:5], 11)])
    assert (dup.duplicates, dup.late) == (1, 0)
    (before,) = e.step_many([edge.Chunk("d", xs[4:5], 5)])
    assert before.late == 1  # before the stream's first sample


def test_per_stream_memory_follows_capacity(bundles, xs):
    e = edge.load(bundles / BUNDLE, capacity=1000)
    for i in range(0, 20_000, 500):
        e.step_many([edge.Chunk(f"s{i + k}", xs[k % 80], 1) for k in range(500)])
    assert len(e.store) == 1000 and e.store.allocated == 1000
    assert e.store.gaps.shape[0] == 1000 and e.store.boots.shape[0] == 1000


def test_boots_and_gaps_survive_a_snapshot(bundles, xs, tmp_path):
    e = edge.load(bundles / BUNDLE)
    e.step("d", xs[:3], seq=10, boot=1)
    e.step("d", xs[3], seq=15, boot=1)  # 13, 14 skipped
    e.snapshot(tmp_path / "s.bin")
    f = edge.load(bundles / BUNDLE)
    f.restore(tmp_path / "s.bin")
    (late,) = f.step_many([edge.Chunk("d", xs[4:5], 13, boot=1)])
    assert late.late == 1 and f.boots("d") == (1, [])


@pytest.mark.parametrize("evicted", [False, True])
def test_a_reset_of_an_evicted_stream_keeps_its_numbering_and_boot(bundles, xs, evicted):
    """An evicted stream keeps its last seq and boot, and a reset keeps them too (but what it
    names). A reset of an evicted stream naming its boot or next seq gave it a new row
    without them: a redelivery of a sample applied before the eviction was stepped a second
    time, unreported, and the stream's boot was forgotten."""
    e = edge.load(bundles / BUNDLE, capacity=1)
    e.step("d", xs[:3], seq=1, boot=7)
    e.step("d", xs[3:6], seq=1, boot=8)  # rebooted
    if evicted:
        e.step("other", xs[0], seq=1)
        assert e.state_of("d") is None
    e.reset("d", boot=8)  # the device says which boot it is in
    (again,) = e.step_many([edge.Chunk("d", xs[5:6], 3, boot=8)])  # a redelivery
    assert (again.duplicates, len(again.y)) == (1, 0)
    (on,) = e.step_many([edge.Chunk("d", xs[6:8], 4, boot=8)])
    np.testing.assert_array_equal(on.y, edge.load(bundles / BUNDLE).step("x", xs[6:8]))
    assert (on.gap, on.restart) == (0, False)
    if evicted:
        e.step("other", xs[0], seq=2)
    e.reset("d", next_seq=20)
    assert e.boots("d")[0] == 8 and e.last_seq("d") == 19
    (nxt,) = e.step_many([edge.Chunk("d", xs[8:9], 20, boot=8)])
    assert (nxt.gap, nxt.restart, len(nxt.y)) == (0, False, 1)

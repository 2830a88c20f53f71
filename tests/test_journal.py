"""The state directory: log framing, damage, snapshot generations, failed writes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import edge
from edge import wal
from edge.errors import SnapshotError
from edge.journal import Journal
from edge.outbox import Outbound, Outbox
from edge.wal import Damage, Evict, Mark, Output, Record, Release, Void
from tests.conftest import fill


def rec(stream, seq, lsn, k=1, **kw):
    return Record(stream, seq, 1.5, np.full((k, 3), seq, np.float64), lsn=lsn, **kw)


def no_restore(path):
    raise SnapshotError(f"{path}: unused")


def test_every_entry_kind_round_trips():
    entries = [
        rec("a", 7, 1, k=3, boot=9, redelivered=True),
        Record("b", 5, None, np.empty((0, 3)), None, 2, rebase=True),
        Record("b", 0, None, np.empty((0, 3)), 3, 4, mid=65535),
        Output(3, "errors/x", b'{"error":"bad_json"}'),
        Mark(2),
        Release("a", 11),
        Void("b", 4),
        Evict("c"),
    ]
    data = b"".join(wal.encode(e) for e in entries)
    got = list(wal.scan(data))
    assert len(got) == len(entries)
    for e, g in zip(entries, got):
        if isinstance(e, Record):
            assert (g.stream, g.seq, g.ts, g.boot, g.lsn, g.rebase, g.redelivered, g.mid) == (
                e.stream, e.seq, e.ts, e.boot, e.lsn, e.rebase, e.redelivered, e.mid
            )  # fmt: skip
            np.testing.assert_array_equal(g.values, e.values)
        else:
            assert g == e


def write_log(tmp_path, n):
    j = Journal(tmp_path)
    j.recover(no_restore)
    j.open()
    for i in range(1, n + 1):
        j.append([rec(f"s{i % 5}", i, i)])
    j.close()
    return tmp_path / "wal-00000000.log"


def test_mid_log_damage_costs_only_the_damaged_record(tmp_path):
    path = write_log(tmp_path, 1000)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    path.write_bytes(bytes(data))
    got = Journal(tmp_path).recover(no_restore)
    lsns = [e.lsn for e in got.entries]
    assert len(lsns) == 999 and lsns == sorted(lsns)
    assert len(got.damage) == 1 and "damaged span" in got.damage[0]
    assert len(set(range(1, 1001)) - set(lsns)) == 1


def test_torn_tail_is_reported_and_the_log_goes_on(tmp_path):
    path = write_log(tmp_path, 50)
    path.write_bytes(path.read_bytes()[:-10])
    j = Journal(tmp_path)
    got = j.recover(no_restore)
    assert [e.lsn for e in got.entries] == list(range(1, 50))
    assert len(got.damage) == 1 and "torn" in got.damage[0]
    j.open()
    j.append([rec("z", 1, 51)])
    j.close()
    again = Journal(tmp_path).recover(no_restore)
    assert [e.lsn for e in again.entries][-2:] == [49, 51]


def test_a_tail_of_zeros_after_a_power_cut_is_a_torn_write_and_is_cut_off(tmp_path):
    """A power cut can leave a file's new length on disk without the blocks written last:
    the tail reads as zeros. It was reported as damage in the middle of the log (with fsync
    before each acknowledgement: acknowledged samples lost, every stream's next answer says
    restart), and so was a torn tail once the log went on after it."""
    for tail in (b"\0" * 4096, wal.encode(rec("z", 1, 51))[:30] + b"\0" * 500):
        path = write_log(tmp_path, 50)
        path.write_bytes(path.read_bytes() + tail)
        j = Journal(tmp_path, fsync=True)
        got = j.recover(no_restore)
        assert [e.lsn for e in got.entries] == list(range(1, 51))
        assert len(got.damage) == 1 and "torn" in got.damage[0] and not got.lost
        j.open()
        j.append([rec("z", 1, 51)])
        j.close()
        again = Journal(tmp_path, fsync=True).recover(no_restore)
        assert [e.lsn for e in again.entries][-2:] == [50, 51]
        assert again.damage == [] and not again.lost
        path.unlink()


def test_scan_survives_garbage_everywhere():
    rng = np.random.default_rng(0)
    good = b"".join(wal.encode(rec("s", i, i)) for i in range(1, 200))
    for _ in range(200):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), 5):
            data[pos] = int(rng.integers(0, 256))
        items = list(wal.scan(bytes(data)))
        entries = [i for i in items if not isinstance(i, Damage)]
        assert len(entries) >= 199 - 5
        assert all(isinstance(e, Record) for e in entries)


def test_damaged_snapshot_falls_back_to_the_previous_generation(bundles, tmp_path):
    bundle = bundles / "clf-int8"
    engine = edge.load(bundle)
    j = Journal(tmp_path / "state")
    j.recover(engine.restore)
    j.open()
    rng = np.random.default_rng(1)
    xs = rng.normal(0, 2, (40, 6))
    lsn = 0
    for gen in range(3):  # three checkpoints, records between them
        for _ in range(10):
            lsn += 1
            r = Record("dev", lsn, None, xs[lsn - 1 : lsn], lsn=lsn)
            j.append([r])
            engine.step("dev", r.values, seq=lsn)
        j.checkpoint(engine.snapshot, [Mark(lsn)], {"lsn": lsn})
        assert j.generation == gen + 1
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert names == ["snap-00000002.bin", "snap-00000003.bin", "wal-00000002.log",
                     "wal-00000003.log"]  # fmt: skip
    for _ in range(10):
        lsn += 1
        j.append([Record("dev", lsn, None, xs[lsn - 1 : lsn], lsn=lsn)])
        engine.step("dev", xs[lsn - 1], seq=lsn)
    j.close()
    snap = tmp_path / "state" / "snap-00000003.bin"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x40
    snap.write_bytes(bytes(data))
    fresh = edge.load(bundle)
    got = Journal(tmp_path / "state").recover(fresh.restore)
    assert got.generation == 2 and got.exact and len(got.damaged_snapshots) == 1
    replay = [e for e in got.entries if isinstance(e, Record)]
    assert [r.seq for r in replay] == list(range(21, 41))
    for r in replay:
        fresh.step(r.stream, r.values, seq=r.seq)
    np.testing.assert_array_equal(fresh.state_of("dev")[0], engine.state_of("dev")[0])
    np.testing.assert_array_equal(fresh.state_of("dev")[1], engine.state_of("dev")[1])


def _two_generations(bundle, state):
    """Two samples of one stream, a snapshot after each: the path of the second."""
    engine = edge.load(bundle)
    j = Journal(state)
    j.recover(engine.restore)
    j.open()
    for seq in (1, 2):
        j.append([Record("dev", seq, None, np.full((1, 6), 0.5), lsn=seq)])
        engine.step("dev", np.full(6, 0.5), seq=seq)
        j.checkpoint(engine.snapshot, [Mark(seq)], {"lsn": seq})
    j.close()
    return state / "snap-00000002.bin"


@pytest.mark.parametrize("lsn", [None, "x", float("inf"), 2.5])
def test_a_snapshot_whose_covered_lsn_is_no_number_falls_back_to_the_one_before(
    bundles, tmp_path, lsn
):
    """An intact snapshot (its digest made again after an edit, or another writer's) whose
    ``lsn`` is no whole number stopped the start with a TypeError, ValueError or
    OverflowError; it is now passed over as a damaged one is."""
    from tests.test_snapshot_format import resigned

    snap = _two_generations(bundles / "clf-int8", tmp_path / "state")
    edit = lambda h: {**h, "extra": {**h["extra"], "lsn": lsn}}  # noqa: E731
    snap.write_bytes(resigned(snap.read_bytes(), edit))
    fresh = edge.load(bundles / "clf-int8")
    got = Journal(tmp_path / "state").recover(fresh.restore)
    assert got.generation == 1 and got.base_lsn == 1
    assert got.damaged_snapshots == [
        f"{snap}: the last lsn it covers, {lsn!r}, is not a whole number"
    ]
    assert [r.seq for r in got.entries if isinstance(r, Record)] == [2]
    assert fresh.last_seq("dev") == 1


@pytest.mark.parametrize("how", ["grown", "replaced"])
def test_a_huge_sparse_snapshot_falls_back_to_the_one_before_without_reading_it(
    bundles, tmp_path, how
):
    """A snapshot grown to a terabyte of zeros (a file system's damage, a sparse file put in
    its place) was read whole: the start stopped with a MemoryError (or the memory ran out),
    every start again. Its size is checked against its header first, and it is passed over
    as a damaged one is."""
    snap = _two_generations(bundles / "clf-int8", tmp_path / "state")
    size = snap.stat().st_size
    if how == "replaced":
        snap.write_bytes(b"")
    os.truncate(snap, 1 << 40)
    fresh = edge.load(bundles / "clf-int8")
    got = Journal(tmp_path / "state").recover(fresh.restore)
    assert got.generation == 1 and got.base_lsn == 1 and got.exact
    want = (
        f"{snap}: {1 << 40} bytes, where its header describes {size}: the file is corrupt "
        "or truncated"
        if how == "grown"
        else f"{snap}: not an edge-lstm snapshot (bad magic or too short)"
    )
    assert got.damaged_snapshots == [want]
    assert [r.seq for r in got.entries if isinstance(r, Record)] == [2]


def test_a_log_segment_grown_sparse_to_a_terabyte_is_read_as_a_tail_of_zeros(tmp_path):
    """A segment grown to a terabyte by a hole at its end was read whole: the start stopped
    with a MemoryError, every time. The hole is read as the zeros it is, as a short tail of
    them was: the entries before it replayed, the tail reported, and cut off at the open."""
    state = tmp_path / "state"
    j = Journal(state)
    j.recover(no_restore)
    j.open()
    j.append([rec("a", 1, 1), rec("a", 2, 2)])
    j.close()
    seg = state / "wal-00000000.log"
    size = seg.stat().st_size
    os.truncate(seg, 1 << 40)
    j = Journal(state)
    got = j.recover(no_restore)
    assert [e.seq for e in got.entries if isinstance(e, Record)] == [1, 2]
    assert got.damage == [
        f"wal-00000000.log: ends inside an entry at offset {size} (a torn last write, or the "
        "file cut short), skipped"
    ]
    j.open()  # the hole cut off (a mark appended after it)
    assert size < seg.stat().st_size < 2 * size
    j.close()


def test_a_snapshot_of_boot_ids_out_of_range_falls_back_to_the_one_before(bundles, tmp_path):
    """Signed, but with an int64 minimum for a boot id: it was restored as it was."""
    from edge import snapshot as fmt

    path = _two_generations(bundles / "clf-int8", tmp_path / "state")
    snap = fmt.read(path)
    snap.boots = np.full_like(snap.boots, -(2**63))
    path.write_bytes(fmt.encode(snap))
    fresh = edge.load(bundles / "clf-int8")
    got = Journal(tmp_path / "state").recover(fresh.restore)
    assert got.generation == 1 and len(got.damaged_snapshots) == 1
    assert f"boot id {-(2**63)} is outside" in got.damaged_snapshots[0]
    assert [r.seq for r in got.entries if isinstance(r, Record)] == [2]


def test_carried_copies_are_not_replayed_twice(tmp_path):
    j = Journal(tmp_path)
    j.recover(no_restore)
    j.open()
    j.append([rec("a", 1, 1), rec("a", 3, 2)])  # 3 is held by the reorder buffer
    held = Record("a", 3, 1.5, np.full((1, 3), 3.0), lsn=2, carried=True)
    out = Output(1, "predictions/a", b"{}", carried=True)
    j.checkpoint(lambda path, extra: Path(path).write_bytes(b"junk"), [held, out, Mark(0)],
                 {"lsn": 2})  # fmt: skip
    j.append([rec("a", 2, 3)])
    j.close()
    got = Journal(tmp_path).recover(no_restore)  # the snapshot is junk: replay from the start
    assert [(type(e).__name__, e.lsn) for e in got.entries if not isinstance(e, Mark)] == [
        ("Record", 1), ("Record", 2), ("Record", 3)
    ]  # fmt: skip


def test_outbox_watermark_waits_for_every_answer_and_held_messages():
    box = Outbox(window=3)
    lsns = [1, 1, 2, 3]
    box.put([Outbound(f"p/{i}", b"1", lsn=n) for i, n in enumerate(lsns)])
    first = box.take()
    for mid, o in enumerate(first, 1):
        box.sent(mid, o)
    assert len(first) == 3 and box.take() == []  # the window is full
    assert box.watermark(3) == 0
    box.acked(1)
    assert box.watermark(3) == 0  # lsn 1 has a second answer still open
    box.acked(2)
    assert box.watermark(3) == 1
    box.acked(3)
    assert box.watermark(3) == 2 and box.watermark(3, held_from=2) == 1
    (last,) = box.take()
    box.sent(4, last)
    assert [o.lsn for o in box.unacknowledged()] == [3]
    box.acked(4)
    assert box.watermark(3) == 3 and len(box) == 0


def test_a_segment_cut_to_nothing_is_damage_and_a_new_one_is_not(tmp_path):
    """Every segment is made with a first entry, a fresh one too: one found empty was cut (by
    a tool, or a power cut with nothing synced), and what it logged is lost. Before, it read
    as a log that never had anything in it, and the streams went on from zero silently."""
    j = Journal(tmp_path / "cut")
    j.recover(no_restore)
    j.append([rec("a", 1, 1), rec("a", 2, 2)])
    j.close()
    os.truncate(tmp_path / "cut" / "wal-00000000.log", 0)
    got = Journal(tmp_path / "cut").recover(no_restore)
    assert got.lost and got.damage == [
        "wal-00000000.log: empty, cut short (what it logged is lost)"
    ]
    fresh = Journal(tmp_path / "fresh")
    fresh.recover(no_restore)
    fresh.open()  # made, nothing appended yet
    fresh.close()
    got = Journal(tmp_path / "fresh").recover(no_restore)
    assert not got.lost and got.damage == [] and got.exact


def test_a_failed_append_leaves_nothing_behind(small_disk):
    j = Journal(small_disk / "state")
    j.recover(no_restore)
    j.open()
    j.append([rec("a", 1, 1)])
    filler = small_disk / "filler"
    fill(filler)
    big = [rec("a", i, i, k=64) for i in range(2, 40)]
    with pytest.raises(OSError):
        j.append(big)
    filler.unlink()
    j.append([rec("a", 2, 2)])
    j.close()
    got = Journal(small_disk / "state").recover(no_restore)
    assert [e.lsn for e in got.entries] == [1, 2] and not got.damage
    assert os.path.getsize(small_disk / "state" / "wal-00000000.log") > 0


def test_outbox_memory_stays_bounded_behind_one_slow_answer():
    box = Outbox(window=10)
    box.put([Outbound("p/slow", b"0", lsn=1)])
    (slow,) = box.take()
    box.sent(1, slow)
    for lsn in range(2, 20_000):
        box.put([Outbound("p/x", b"1", lsn=lsn)])
        (o,) = box.take()
        box.sent(lsn, o)
        box.acked(lsn)
        assert box.watermark(lsn) == 0
    assert len(box._heap) <= 1024 + 2
    box.acked(1)
    assert box.watermark(19_999) == 19_999


def test_an_entry_carried_by_two_checkpoints_is_replayed_once(tmp_path):
    def snapshot(path, extra):
        Path(path).write_text("junk" if extra["generation"] == 2 else json.dumps(extra))

    def restore(path):
        try:
            return json.loads(Path(path).read_text())
        except ValueError as exc:
            raise SnapshotError(f"{path}: damaged") from exc

    j = Journal(tmp_path)
    j.recover(restore)
    j.open()
    j.append([rec("a", 1, 1), rec("a", 3, 2)])  # 3 stays held across two checkpoints
    held = Record("a", 3, 1.5, np.full((1, 3), 3.0), lsn=2, carried=True)
    j.checkpoint(snapshot, [held, Mark(0)], {"lsn": 2})
    j.checkpoint(snapshot, [held, Mark(0)], {"lsn": 2})  # this snapshot is damaged
    j.close()
    got = Journal(tmp_path).recover(restore)
    assert got.generation == 1
    assert [e.lsn for e in got.entries if isinstance(e, Record)] == [2]


def test_what_damage_may_have_cost_is_told(tmp_path):
    """A span damaged, or the log cut short without fsync (a power cut, or the file cut):
    acknowledged entries may be gone. With fsync before each acknowledgement, a torn last
    write held nothing acknowledged. A snapshot without the segment that follows it lost
    whatever that segment logged."""
    path = write_log(tmp_path / "a", 50)
    path.write_bytes(path.read_bytes()[:-10])
    assert Journal(tmp_path / "a").recover(no_restore).lost
    assert not Journal(tmp_path / "a", fsync=True).recover(no_restore).lost
    assert not Journal(tmp_path / "b").recover(no_restore).lost  # nothing there: nothing lost
    j = Journal(tmp_path / "c")
    j.recover(no_restore)
    j.open()
    j.append([rec("s", 1, 1)])
    j.checkpoint(lambda p, extra: Path(p).write_bytes(b"snap"), [], {"lsn": 1})
    j.append([rec("s", 2, 2)])
    j.close()
    (tmp_path / "c" / "wal-00000001.log").unlink()
    got = Journal(tmp_path / "c").recover(lambda p: {"lsn": 1})
    assert got.generation == 1 and got.lost
    assert got.damage == ["wal-00000001.log: missing (what it logged is lost)"]


@pytest.mark.parametrize("newest", ["damaged", "missing"])
def test_a_segment_missing_between_two_that_are_replayed_is_told(tmp_path, newest):
    """Every generation from the snapshot restored to the newest one has its segment (a
    checkpoint writes it before its snapshot). With the newest snapshot unusable and its
    segment gone, or a checkpoint cut short after a segment and snapshot went missing, the
    segments before and after the hole were replayed as one log: what the missing one logged
    was lost without a report."""
    state = tmp_path / "state"

    def restore(path):
        data = Path(path).read_bytes()
        if data != b"snap":
            raise SnapshotError(f"{path}: checksum mismatch")
        return {"lsn": 0}

    j = Journal(state)
    j.recover(no_restore)
    j.open()
    for lsn in (1, 2, 3):
        j.append([rec("s", lsn, lsn)])
        j.checkpoint(lambda p, extra: Path(p).write_bytes(b"snap"), [Mark(lsn)], {"lsn": lsn})
    j.append([rec("s", 4, 4)])
    j.close()
    if newest == "missing":  # and a checkpoint a crash cut short before its snapshot
        segment = wal.encode(Mark(4)) + wal.encode(rec("s", 5, 5))
        (state / "wal-00000004.log").write_bytes(segment)
        (state / "snap-00000003.bin").unlink()
    else:
        (state / "snap-00000003.bin").write_bytes(b"snaq")
    (state / "wal-00000003.log").unlink()
    got = Journal(state).recover(restore)
    assert got.generation == 2 and got.lost
    assert "wal-00000003.log: missing (what it logged is lost)" in got.damage


def test_a_snapshot_that_finds_the_disk_full_degrades_and_is_retried(bundles, small_disk):
    """The log's new segment fits, the snapshot does not: the engine reports that as a
    ``SnapshotError`` naming the file, which is the storage error it is (degraded, retried
    later), not the end of the service."""
    from tests.test_processor import answers, make, msg

    p = make(bundles, small_disk / "state")
    p.journal.open()
    assert p.handle([msg(f"s{i}", 1, np.full(6, i % 7, np.float64)) for i in range(3000)])
    for mid, _ in enumerate(answers(p), 1):  # acknowledged: the new segment carries none
        p.outbox.acked(mid)
    filler = small_disk / "filler"
    fill(filler)
    os.truncate(filler, filler.stat().st_size - 8192)  # room for a segment, not a snapshot
    assert not p.checkpoint()
    assert p.degraded is not None and "snapshot failed: No space left" in p.degraded
    filler.unlink()
    assert p.checkpoint()
    again = make(bundles, small_disk / "state")  # what the retry wrote is whole
    assert again.engine.last_seq("s2999") == 1


def _checkpointed_with_one_record(state):
    """A journal past its first checkpoint, with one record logged after it."""
    j = Journal(state)
    j.recover(no_restore)
    j.open()
    j.checkpoint(_snap_of(100), [Mark(0)], {"lsn": 0})
    j.append([rec("a", 1, 1)])
    return j


def _snap_of(size):
    """A snapshot writer of ``size`` bytes that leaves nothing behind when it fails, as the
    engine's does."""

    def snapshot(path, extra):
        try:
            Path(path).write_bytes(b"s" * size)
        except OSError as exc:
            Path(path).unlink(missing_ok=True)
            raise SnapshotError(f"{path}: {exc}") from exc

    return snapshot


def test_a_log_write_the_full_disk_cut_short_leaves_no_hole(small_disk):
    """A segment started by a checkpoint is appended to like the others: after a write the
    disk cut short (and was cut back), the next one goes on at the end, not after a gap of
    zeros that a replay would take for damage."""
    j = Journal(small_disk / "state")
    j.recover(no_restore)
    j.open()
    j.checkpoint(_snap_of(1000), [Mark(0)], {"lsn": 0})
    j.append([rec("a", 1, 1)])
    j.reserve = lambda: 0  # the write goes ahead (else the room kept for a snapshot stops it)
    filler = small_disk / "filler"
    fill(filler)
    os.truncate(filler, filler.stat().st_size - 4096)  # room for part of the next write
    with pytest.raises(OSError):
        j.append([rec("a", seq, seq, k=8) for seq in range(2, 200)])
    filler.unlink()
    j.append([rec("a", 2, 2)])
    j.close()
    got = Journal(small_disk / "state").recover(lambda p: {"lsn": 0})
    assert got.damage == [] and not got.lost
    assert [e.seq for e in got.entries if isinstance(e, Record)] == [1, 2]


@pytest.mark.parametrize("background", [False, True])
def test_a_directory_too_small_for_two_generations_keeps_one(small_disk, background):
    """The newest snapshot does not fit beside the two generations kept: the older one (only
    the fallback should the newer snapshot be damaged) goes, with a log line, and the
    checkpoint succeeds; a directory that can never checkpoint would only fill further.
    Written in the background, the same, the log going on meanwhile."""
    state = small_disk / "state"
    j = Journal(state)
    j.recover(no_restore)
    j.open()
    snapshot = _snap_of(300_000)
    for lsn in (1, 2):
        j.append([rec("a", lsn, lsn)])
        j.checkpoint(snapshot, [Mark(lsn)], {"lsn": lsn})
    filler = small_disk / "filler"
    fill(filler)
    os.truncate(filler, filler.stat().st_size - 200_000)  # not room for a third snapshot
    j.reserve = lambda: 0  # as if the disk had filled by something else than the log
    j.append([rec("a", 3, 3)])
    take = lambda path, extra: lambda: snapshot(path, extra)  # noqa: E731
    j.start_checkpoint(take, [Mark(3)], {"lsn": 3}, background=background)
    j.append([rec("a", 4, 4)])
    assert j.finish()
    assert sorted(p.name for p in state.iterdir()) == [
        "snap-00000002.bin", "snap-00000003.bin", "wal-00000002.log", "wal-00000003.log"
    ]  # fmt: skip
    j.close()
    got = Journal(state).recover(lambda p: {"lsn": 3})
    assert got.generation == 3 and got.exact and not got.damage
    assert [e.seq for e in got.entries if isinstance(e, Record)] == [4]


def test_scratch_journals_sharing_a_disk_keep_its_room_and_one_generation(small_disk):
    """A worker's partitions keep scratch journals side by side: each sees the room the
    others took (its own estimate would not, and they filled the disk to the last byte, where
    none could checkpoint), and keeps only its newest generation (the fallback is elsewhere)."""
    a, b = Journal(small_disk / "a", scratch=True), Journal(small_disk / "b", scratch=True)
    for j in (a, b):
        j.recover(no_restore)
        j.open()
        j.checkpoint_estimate = lambda: (100_000, 0)  # a reserve of 264 KiB each
        j.append([rec("s", 1, 1)])  # each has looked at the room: all of it free
    lsn = 1
    with pytest.raises(OSError, match="kept for the next snapshot"):
        while True:  # b takes all but its reserve
            lsn += 1
            b.append([rec("s", lsn, lsn, k=40) for _ in range(20)])
    with pytest.raises(OSError, match="kept for the next snapshot"):
        a.append([rec("s", 2, 2, k=40) for _ in range(200)])
    for j in (a, b):
        for gen in (1, 2):
            j.checkpoint(_snap_of(100_000), [Mark(gen)], {"lsn": gen})
        assert sorted(p.name for p in j.dir.iterdir()) == ["snap-00000002.bin", "wal-00000002.log"]
        j.close()


def test_a_segment_as_large_as_the_room_left_asks_for_a_checkpoint(small_disk):
    """A backlog logs faster than ``snapshot_interval`` comes round: the journal says when
    the log since the last snapshot takes as much room as it has left (beyond the room kept
    for the next snapshot), while a snapshot still fits; after the checkpoint it is quiet."""
    from edge import journal as journal_mod

    j = Journal(small_disk / "state")
    j.recover(no_restore)
    j.open()
    j.checkpoint(_snap_of(1000), [Mark(0)], {"lsn": 0})
    lsn, asked_at = 0, None
    while asked_at is None:
        lsn += 1
        j.append([rec("a", lsn, lsn, k=40)])
        if j.crowded():
            asked_at, reserve = j._size, j.reserve()
    st = os.statvfs(small_disk)
    left = st.f_bavail * st.f_frsize - reserve
    assert asked_at >= journal_mod.CROWDED_FROM and asked_at >= left
    # looked up every ROOM_STEP bytes, while the segment grew and the room shrank alike
    assert asked_at - left <= 2 * (journal_mod.ROOM_STEP + 4096)
    j.checkpoint(_snap_of(1000), [Mark(lsn)], {"lsn": lsn})
    assert not j.crowded()


def test_a_segment_past_its_largest_size_asks_for_a_checkpoint_with_room_to_spare(
    tmp_path, monkeypatch
):
    """A restart reads the log since the last snapshot into memory: a long
    ``snapshot_interval`` on a busy gateway let it grow past what a Pi has. Past
    ``SEGMENT_MAX`` a checkpoint is asked for whatever room is left."""
    from edge import journal as journal_mod

    monkeypatch.setattr(journal_mod, "SEGMENT_MAX", 300_000)
    j = Journal(tmp_path / "state")
    j.recover(no_restore)
    j.open()
    j.checkpoint(_snap_of(1000), [Mark(0)], {"lsn": 0})
    lsn = 0
    while not j.crowded():
        assert j._size < 300_000
        lsn += 1
        j.append([rec("a", lsn, lsn, k=40)])
    assert j._size >= 300_000 and j.room() > 100 * j._size  # not for want of room
    j.checkpoint(_snap_of(1000), [Mark(lsn)], {"lsn": lsn})
    assert not j.crowded()
    j.close()


def test_the_log_leaves_room_for_the_next_snapshot(small_disk):
    """A log that filled the disk after a snapshot failed for lack of room left no way out:
    the next snapshot could never be written, and the state directory stayed full for good.
    The log refuses the write that would take the room the next checkpoint needs (the broker
    keeps the messages), and that checkpoint then fits."""
    from edge import journal as journal_mod

    j = Journal(small_disk / "state")
    j.recover(no_restore)
    j.open()
    snapshot = _snap_of(200_000)
    j.checkpoint(snapshot, [Mark(0)], {"lsn": 0})
    assert j.reserve() == 2 * 200_000 + journal_mod.ROOM_STEP
    j.checkpoint_estimate = lambda: (250_000, 0)  # the state grew since: its owner says so
    assert j.reserve() == 2 * 250_000 + journal_mod.ROOM_STEP
    j.checkpoint_estimate = lambda: (0, 30_000)  # and answers wait to be carried over
    assert j.reserve() == 2 * 200_000 + 30_000 + journal_mod.ROOM_STEP
    lsn = 0
    with pytest.raises(OSError, match="kept for the next snapshot"):
        while lsn < 100_000:
            lsn += 1
            j.append([rec("a", lsn, lsn, k=20)])
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize >= j.reserve() - journal_mod.ROOM_STEP
    j.checkpoint(snapshot, [Mark(lsn)], {"lsn": lsn})  # fits in the room kept
    with pytest.raises(OSError, match="kept for the next snapshot"):
        j.append([rec("a", lsn + 1, lsn + 1)])  # the full log is still the fallback's
    j.checkpoint(snapshot, [Mark(lsn)], {"lsn": lsn})  # fits too, and retires it
    j.append([rec("a", lsn + 1, lsn + 1)])
    assert j.room() > 1_000_000


def test_a_checkpoint_whose_snapshot_fails_leaves_the_directory_as_it_was(tmp_path):
    """Its segment would hold only copies of what the log before it holds: it goes, and the
    log goes on where it was (a disk that stayed full gathered a segment per second)."""
    state = tmp_path / "state"
    j = _checkpointed_with_one_record(state)
    before = sorted(p.name for p in state.iterdir())

    def failing(path, extra):
        raise SnapshotError(f"{path}: cannot write snapshot: no room")

    for _ in range(3):
        with pytest.raises(SnapshotError):
            j.checkpoint(failing, [rec("a", 1, 1, carried=True), Mark(1)], {"lsn": 1})
    assert sorted(p.name for p in state.iterdir()) == before
    j.append([rec("a", 2, 2)])
    j.close()
    got = Journal(state).recover(lambda p: {"lsn": 0})
    assert got.generation == 1 and not got.damage
    assert [e.seq for e in got.entries if isinstance(e, Record)] == [1, 2]


def test_a_snapshot_write_cut_by_a_crash_leaves_no_file_behind_after_a_restart(tmp_path):
    """A crash (kill -9, power cut) while a snapshot is written leaves its temporary file, as
    large as the state: at every such crash one more, never reclaimed, not even when the disk
    fills. The next start removes it."""
    import subprocess
    import sys

    state = tmp_path / "state"
    state.mkdir()
    crash = (
        "import os, signal, sys\n"
        "from edge.snapshot import write_atomic\n"
        "def pieces():\n"
        "    yield b'x' * 100_000\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_atomic(sys.argv[1], pieces())\n"
    )
    target = state / "snap-00000002.bin"
    run = subprocess.run(
        [sys.executable, "-c", crash, str(target)], cwd=Path(__file__).parent.parent
    )
    assert run.returncode == -9 and not target.exists()
    assert [p.name for p in state.iterdir() if p.name.startswith(".snap-00000002.bin.")]
    j = Journal(state)
    j.recover(no_restore)
    assert list(state.iterdir()) == []


def test_an_old_generation_that_cannot_be_removed_does_not_fail_the_checkpoints(tmp_path, caplog):
    """A file of a retired generation that cannot be removed (here a directory in its place)
    failed every checkpoint after its snapshot was written: the service stopped acknowledging,
    and each retry, once a second, left one more generation behind until the disk was full.
    The checkpoint succeeds, the rest is removed, and the log says what is left, once."""
    state = tmp_path / "state"
    j = Journal(state)
    j.recover(no_restore)
    j.open()
    for lsn in (1, 2):
        j.append([rec("a", lsn, lsn)])
        j.checkpoint(_snap_of(100), [Mark(lsn)], {"lsn": lsn})
    stuck = j.path("snap", 1)
    stuck.unlink()
    stuck.mkdir()
    (stuck / "x").write_bytes(b"")
    for lsn in (3, 4, 5):
        j.append([rec("a", lsn, lsn)])
        j.checkpoint(_snap_of(100), [Mark(lsn)], {"lsn": lsn})
    assert sorted(p.name for p in state.iterdir()) == [
        "snap-00000001.bin", "snap-00000004.bin", "snap-00000005.bin",
        "wal-00000004.log", "wal-00000005.log",
    ]  # fmt: skip
    assert caplog.text.count("cannot remove") == 1 and str(stuck) in caplog.text


def test_a_state_dir_turned_read_only_during_a_checkpoint_loses_no_later_entry(
    tmp_path, monkeypatch
):
    """An SD card remounted read-only while a snapshot is written: the checkpoint fails and
    its segment cannot be removed. The journal kept the number of the segment it had closed,
    so the next appends went to whatever file was opened next under that number (or failed
    with EBADF at every retry), while they were reported written."""
    import errno

    state = tmp_path / "state"
    j = _checkpointed_with_one_record(state)
    real_unlink = Path.unlink

    def read_only(path, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def remounted(path, extra):
        monkeypatch.setattr(Path, "unlink", read_only)
        raise SnapshotError(f"{path}: cannot write snapshot: Read-only file system")

    with pytest.raises((OSError, SnapshotError)):
        j.checkpoint(remounted, [rec("a", 1, 1, carried=True), Mark(1)], {"lsn": 1})
    monkeypatch.setattr(Path, "unlink", real_unlink)  # writable again
    other = tmp_path / "other"
    fd = os.open(other, os.O_RDWR | os.O_CREAT)  # takes the lowest free number
    try:
        j.append([rec("a", 2, 2)])
    finally:
        os.close(fd)
    j.close()
    assert other.read_bytes() == b""
    got = Journal(state).recover(lambda p: {"lsn": 0})
    assert [e.seq for e in got.entries if isinstance(e, Record) and not e.carried] == [1, 2]


def _rounds(got):
    """The lsns of the entries recovered, grouped by the round that logged them."""
    out, cur = [], []
    for i, e in enumerate(got.entries):
        cur.append(e.lsn)
        if i not in got.joined:
            out.append(cur)
            cur = []
    return out


@pytest.mark.parametrize("cut", ["between-frames", "inside-a-frame"])
def test_a_round_a_crash_cut_short_is_not_taken_with_the_next_one(tmp_path, cut):
    """Each round's entries are replayed together, as they were stepped; a round whose last
    frames a crash kept from the disk is ended before the next start appends, else the next
    replay would step the two as one."""
    j = Journal(tmp_path)
    j.recover(no_restore)
    j.open()
    j.append([rec("a", 1, 1), rec("b", 1, 2), Mark(0)])
    j.append([rec("a", 2, 3), rec("b", 2, 4), rec("c", 1, 5)])
    j.close()
    seg = tmp_path / "wal-00000000.log"
    data = seg.read_bytes()
    size = len(wal.encode(rec("c", 1, 5)))
    seg.write_bytes(data[: -size if cut == "between-frames" else -size // 2])
    j = Journal(tmp_path)
    assert _rounds(j.recover(no_restore)) == [[1, 2], [3, 4]]
    j.open()
    j.append([rec("d", 1, 6), rec("e", 1, 7)])
    j.close()
    assert _rounds(Journal(tmp_path).recover(no_restore)) == [[1, 2], [3, 4], [6, 7]]


@pytest.mark.parametrize("name", ["wal-00000003.log", "snap-00000003.bin"])
def test_a_fifo_named_as_a_log_segment_or_snapshot_is_refused_not_waited_on(tmp_path, name):
    """Reading it waited for a writer that never comes: the service hung at start without a
    word. It is named, and the start refused."""
    from edge.errors import ConfigError

    os.mkfifo(tmp_path / name)
    with pytest.raises(ConfigError, match=f"{name} is a FIFO"):
        Journal(tmp_path).recover(no_restore)


def test_a_log_segment_that_is_a_link_to_nowhere_is_refused_naming_it(tmp_path):
    """Its read failed with "No such file or directory" of a file every listing shows (the
    start refused as "state_dir cannot be read"). It is named as what it is, as a FIFO is."""
    from edge.errors import ConfigError

    (tmp_path / "wal-00000003.log").symlink_to(tmp_path / "card" / "wal")
    with pytest.raises(ConfigError, match=r"wal-00000003\.log is a symbolic link to .*card/wal"):
        Journal(tmp_path).recover(no_restore)


def test_only_names_of_the_journals_own_pattern_are_its_files(tmp_path):
    """A name with a newline at its end, or digits of another script, is not a generation."""
    (tmp_path / "wal-00000003.log\n").write_bytes(b"")
    (tmp_path / "snap-0000000\u0663.bin").write_bytes(b"")
    assert Journal(tmp_path)._listing() == ([], [])


def test_a_checkpoint_a_crash_cut_short_before_its_snapshot_lost_nothing(tmp_path):
    """kill -9 inside a checkpoint, after its segment was made and before its snapshot was in
    place: the segment, empty or ending inside the copies it carries over, was reported as a
    log cut short ("what it logged is lost"), and every stream's next answer said restart
    though nothing was lost (seen draining a backlog with kill -9). It held only copies of
    the segment before it, which is replayed; the log goes on in it."""
    j = Journal(tmp_path)
    j.recover(no_restore)
    j.open()
    j.append([rec("a", 1, 1)])
    j.checkpoint(lambda path, extra: Path(path).write_bytes(b"state"), [Mark(1)], {"lsn": 1})
    j.append([rec("a", 2, 2), rec("a", 4, 3)])  # 4 is held by the reorder buffer
    j.close()
    carry = wal.encode(rec("a", 4, 3, carried=True)) + wal.encode(Mark(2))
    for cut in (0, len(carry) // 2):
        (tmp_path / "wal-00000002.log").write_bytes(carry[:cut])
        got = Journal(tmp_path).recover(lambda path: {"lsn": 1})
        assert not got.lost and got.damage == [] and got.exact, cut
        assert [e.lsn for e in got.entries if isinstance(e, Record)] == [2, 3]
    j = Journal(tmp_path)
    j.recover(lambda path: {"lsn": 1})
    j.open()  # the log goes on in the unfinished checkpoint's segment, its torn end cut off
    j.append([rec("a", 3, 4)])
    j.close()
    got = Journal(tmp_path).recover(lambda path: {"lsn": 1})
    assert not got.lost and got.damage == []
    assert [e.lsn for e in got.entries if isinstance(e, Record)] == [2, 3, 4]


def _held_checkpoint(j, fail=False):
    """A checkpoint begun in the background whose snapshot write waits for ``go``."""
    import threading

    go = threading.Event()

    def take(path, extra):
        def write():
            assert go.wait(30)
            if fail:
                raise SnapshotError(f"{path}: cannot write snapshot: Input/output error")
            Path(path).write_text(json.dumps(extra))

        return write

    j.start_checkpoint(take, [rec("a", 4, 3, carried=True), Mark(1)], {"lsn": 3}, background=True)
    return go


def _lsns(got):
    return [e.lsn for e in got.entries if isinstance(e, Record)]


def _restore(path):
    return json.loads(Path(path).read_text())


def test_what_is_logged_while_a_snapshot_is_written_is_replayed_once_after_it(tmp_path):
    """The log goes on in the new segment while its snapshot is written: kill -9 then (the
    snapshot not in place) replays it on the snapshot before, once in place on the new one;
    either way every entry once, the copies the checkpoint carried not again."""
    j = Journal(tmp_path)
    j.recover(no_restore)
    j.append([rec("a", 1, 1), rec("a", 2, 2), rec("a", 4, 3)])  # 4 is held for reordering
    go = _held_checkpoint(j)
    assert j.checkpointing and not j.pending_done()
    j.append([rec("a", 3, 4)])
    j.append([rec("a", 5, 5)])
    got = Journal(tmp_path).recover(_restore)  # as a crash now finds it
    assert got.generation == 0 and not got.damage and not got.lost
    assert _lsns(got) == [1, 2, 3, 4, 5]
    go.set()
    assert j.finish() and not j.checkpointing
    assert j.changed  # logged after the snapshot began: the next one is not skipped
    j.close()
    got = Journal(tmp_path).recover(_restore)
    assert got.generation == 1 and got.base_lsn == 3 and not got.damage
    assert _lsns(got) == [3, 4, 5]  # the copy of the held one, to hold it again


def test_a_snapshot_failing_in_the_background_keeps_the_log_written_meanwhile(tmp_path):
    """Its segment holds entries acknowledged while it was written: kept, the log goes on in
    it, and a restart replays it on the snapshot before; the failure is raised by ``finish``.
    With nothing logged meanwhile the directory is left as it was, as a failed checkpoint
    always left it."""
    j = Journal(tmp_path)
    j.recover(no_restore)
    j.append([rec("a", 1, 1), rec("a", 2, 2), rec("a", 4, 3)])
    _held_checkpoint(j, fail=True).set()
    with pytest.raises(SnapshotError):
        j.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wal-00000000.log"]
    go = _held_checkpoint(j, fail=True)
    j.append([rec("a", 3, 4)])
    go.set()
    with pytest.raises(SnapshotError, match="Input/output error"):
        j.finish()
    j.append([rec("a", 5, 5)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wal-00000000.log", "wal-00000001.log"]
    j.close()
    got = Journal(tmp_path).recover(_restore)
    assert not got.damage and not got.lost and _lsns(got) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("fsync", [False, True])
def test_a_torn_write_after_the_copies_of_an_unfinished_checkpoint_is_the_logs_own(tmp_path, fsync):
    """The copies a checkpoint begins its segment with, cut short, lost nothing; a write torn
    after them is of the log going on while the snapshot was written, reported as a torn
    last write anywhere is (what it may have cost told as there)."""
    j = Journal(tmp_path, fsync=fsync)
    j.recover(no_restore)
    j.append([rec("a", 1, 1), rec("a", 2, 2), rec("a", 4, 3)])
    go = _held_checkpoint(j)
    j.append([rec("a", 3, 4)])
    seg = tmp_path / "wal-00000001.log"
    at = seg.stat().st_size
    j.append([rec("a", 5, 5)])
    torn = seg.read_bytes()[:-5]
    go.set()
    j.finish()
    j.close()
    (tmp_path / "snap-00000001.bin").unlink()  # a crash before it was in place
    seg.write_bytes(torn)
    got = Journal(tmp_path, fsync=fsync).recover(_restore)
    assert _lsns(got) == [1, 2, 3, 4]
    assert got.damage == [
        f"wal-00000001.log: ends inside an entry at offset {at} (a torn last write, or the file "
        "cut short), skipped"
    ]
    assert got.lost is not fsync


def test_a_state_dir_moved_away_under_the_log_is_noticed_at_the_next_append(tmp_path):
    """``mv`` of the state directory: the log went on appending to the moved file, which a
    restart does not look at, until the next snapshot (a day by default); a crash in that
    time restarted every stream from the zero state. The next append says so, as it does
    for a removed directory, and nothing is taken until the state is written out again."""
    state = tmp_path / "state"
    j = _checkpointed_with_one_record(state)
    state.rename(tmp_path / "moved")
    with pytest.raises(OSError, match="moved away"):
        j.append([rec("a", 2, 2)])
    assert j.lost is not None and "moved away" in j.lost
    with pytest.raises(OSError):
        j.append([rec("a", 2, 2)])  # not into a new file silently either
    j.open()
    j.checkpoint(_snap_of(100), [Mark(1)], {"lsn": 1})
    assert j.lost is None
    j.append([rec("a", 2, 2)])
    j.close()
    got = Journal(state).recover(lambda p: {"lsn": 1})
    assert got.generation == 3 and [e.lsn for e in got.entries if isinstance(e, Record)] == [2]


def test_a_state_dir_that_is_a_link_to_nowhere_is_named_so(tmp_path):
    """``state_dir`` a symbolic link into a file system not mounted (an SD card): the service
    was degraded with "File exists", of a directory nobody could see. The error names the
    link and where it leads; once that is there, the log is written."""
    target = tmp_path / "card" / "edge"
    link = tmp_path / "state"
    link.symlink_to(target)
    j = Journal(link)
    j.recover(no_restore)
    with pytest.raises(OSError) as exc:
        j.open()
    assert f"{link} is a symbolic link to {target}, which does not exist" in str(exc.value)
    target.mkdir(parents=True)
    j.open()
    j.append([rec("a", 1, 1)])
    j.close()
    assert (target / "wal-00000000.log").stat().st_size

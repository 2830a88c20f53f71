"""The inbox keeps order and content while what lies beyond its memory limit waits on disk."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from edge import inbox as inbox_mod
from edge.inbox import Inbox
from edge.processor import Inbound


def msg(i: int, size: int = 20) -> Inbound:
    return Inbound(
        f"sensors/s{i % 7}/data",
        bytes([i % 251]) * (size + i % 5),
        mid=i % 65535 + 1,
        qos=i % 2,
        content_type=None if i % 3 else "application/json",
        received=1_700_000_000.0 + i / 1000,
        redelivered=i % 4 == 0,
        retained=i % 6 == 1,
    )


def test_order_and_content_survive_the_spill_file(tmp_path: Path) -> None:
    box = Inbox(10, tmp_path)
    rng = random.Random(3)
    sent = received = 0
    out: list[Inbound] = []
    while received < 2000:
        for _ in range(rng.randrange(0, 40)):
            if sent < 2000:
                box.append(msg(sent))
                sent += 1
        assert len(box) == sent - received
        assert len(box._mem) <= 10
        for _ in range(rng.randrange(0, 30)):
            if box:
                out.append(box.popleft())
                received += 1
    assert out == [msg(i) for i in range(2000)]
    assert box.spilled_total > 1000
    assert box.in_file == 0 and box._write == 0  # the file is emptied once drained


def test_a_batch_offered_again_comes_first(tmp_path: Path) -> None:
    box = Inbox(4, tmp_path)
    for i in range(12):
        box.append(msg(i))
    taken = [box.popleft() for _ in range(3)]
    box.extendleft(reversed(taken))
    assert [box.popleft() for _ in range(12)] == [msg(i) for i in range(12)]
    assert not box


def test_a_record_larger_than_a_read_chunk(tmp_path: Path, monkeypatch: object) -> None:
    monkeypatch.setattr(inbox_mod, "READ_CHUNK", 64)  # type: ignore[attr-defined]
    box = Inbox(1, tmp_path)
    msgs = [msg(0), msg(1, size=500), msg(2, size=3), msg(3, size=1000)]
    for m in msgs:
        box.append(m)
    assert box.in_file == 3
    assert [box.popleft() for _ in range(4)] == msgs


def test_clear_and_close_forget_everything(tmp_path: Path) -> None:
    box = Inbox(2, tmp_path)
    for i in range(10):
        box.append(msg(i))
    box.clear()
    assert len(box) == 0 and not box
    box.append(msg(42))
    assert box.popleft() == msg(42)
    box.close()
    assert len(box) == 0


def test_no_file_left_behind(tmp_path: Path) -> None:
    box = Inbox(1, tmp_path)
    for i in range(5):
        box.append(msg(i))
    assert box.in_file == 4
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing to clean up after a crash
    box.close()


def test_an_unwritable_spill_directory_keeps_messages_in_memory(tmp_path: Path) -> None:
    box = Inbox(2, tmp_path / "missing")
    for i in range(6):
        box.append(msg(i))
    assert box.in_file == 0 and len(box) == 6
    assert [box.popleft() for _ in range(6)] == [msg(i) for i in range(6)]


def test_one_appender_and_one_taker_in_threads(tmp_path: Path) -> None:
    box = Inbox(16, tmp_path)
    n = 20_000
    got: list[Inbound] = []

    def produce() -> None:
        for i in range(n):
            box.append(msg(i))

    t = threading.Thread(target=produce)
    t.start()
    while len(got) < n:
        if box:
            got.append(box.popleft())
    t.join()
    assert got == [msg(i) for i in range(n)]


def test_a_failing_spill_file_keeps_the_order(tmp_path: Path, monkeypatch: object) -> None:
    box = Inbox(3, tmp_path)
    for i in range(8):
        box.append(msg(i))
    assert box.in_file == 5

    def full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inbox_mod.os, "pwrite", full)  # type: ignore[attr-defined]
    for i in range(8, 12):
        box.append(msg(i))
    assert box.in_file == 0 and len(box) == 12
    assert [box.popleft() for _ in range(12)] == [msg(i) for i in range(12)]


def test_oldest_received_is_the_first_message_in_memory(tmp_path: Path) -> None:
    box = Inbox(memory_limit=10, spill_dir=tmp_path)
    assert box.oldest_received() is None
    for t in (5.0, 6.0, 7.0):
        box.append(Inbound("sensors/a/data", b"{}", received=t))
    assert box.oldest_received() == 5.0
    box.popleft()
    assert box.oldest_received() == 6.0
    box.extendleft([Inbound("sensors/a/data", b"{}", received=1.0)])
    assert box.oldest_received() == 1.0


def _appender(box: Inbox, msgs: list[Inbound]) -> threading.Thread:
    """Appends in a thread of its own: a hang shows as a thread still alive (not a timing:
    the join waits as long as a working append could ever take, many times over)."""
    t = threading.Thread(target=lambda: [box.append(m) for m in msgs], daemon=True)
    t.start()
    t.join(120)
    return t


def test_a_disk_that_fills_under_the_spill_loses_and_hangs_nothing(small_disk: Path) -> None:
    """The kernel writes what fits of a record and says so: counted whole, that record and
    the file's end disagreed and reading it back looped for good, under the lock."""
    from tests.conftest import fill

    filler = small_disk / "filler"
    fill(filler)
    os.truncate(filler, filler.stat().st_size - 12_000)  # a few pages free
    box = Inbox(4, small_disk)
    box._room = lambda: True  # type: ignore[method-assign]  # what the reserve would stop
    msgs = [msg(i, size=300) for i in range(200)]
    assert not _appender(box, msgs).is_alive()
    assert 0 < box.spilled_total < 200  # the disk took some, memory the rest
    assert [box.popleft() for _ in range(200)] == msgs


def test_the_spill_leaves_its_file_system_a_reserve(small_disk: Path) -> None:
    """The spill shares the state directory with the log: filled by the spill, the disk
    would leave the log unwritable, nothing acknowledged, and the backlog stuck for good."""
    box = Inbox(4, small_disk)
    msgs = [msg(i, size=1000) for i in range(4000)]  # twice the 2 MiB file system
    assert not _appender(box, msgs).is_alive()
    st = os.statvfs(small_disk)  # the free space is looked at every ROOM_CHECK_EVERY writes
    reserve = st.f_blocks * st.f_frsize // 4
    assert st.f_bavail * st.f_frsize >= reserve - inbox_mod.ROOM_CHECK_EVERY * 1100 > 0
    assert 0 < box.spilled_total < 4000
    assert [box.popleft() for _ in range(4000)] == msgs
    box.append(msg(0))  # worked off: the disk is tried again
    assert box.popleft() == msg(0) and not box._spill_failed


def test_the_spill_leaves_the_log_twice_its_snapshot_reserve(small_disk: Path) -> None:
    """The log keeps room for its next snapshot and refuses to write into it: a spill that
    left less than that (plus the log's own room) would stop the log for good."""
    box = Inbox(4, small_disk, log_reserve=lambda: 400_000)
    msgs = [msg(i, size=1000) for i in range(4000)]
    assert not _appender(box, msgs).is_alive()
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize >= 800_000 - inbox_mod.ROOM_CHECK_EVERY * 1100
    assert 0 < box.spilled_total < 4000
    assert [box.popleft() for _ in range(4000)] == msgs


def test_what_was_read_from_the_spill_file_gives_its_space_back(tmp_path: Path) -> None:
    """On a full disk the log needs the space the spill's read head has left behind, and
    the file shrinks only once drained: a backlog larger than the disk never drained."""
    box = Inbox(10, tmp_path)
    msgs = [msg(i, size=300) for i in range(3000)]
    for m in msgs:
        box.append(m)
    assert box._fd is not None
    full = os.fstat(box._fd).st_size
    got = [box.popleft() for _ in range(2000)]
    assert os.fstat(box._fd).st_size < full / 2
    got += [box.popleft() for _ in range(1000)]
    assert got == msgs and not box

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.state_store import NO_BOOT, NO_SEQ, Departed, StateStore


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def store(**kw):
    zero = [np.full((1, 4), -3, np.int8), np.full((1, 4), 5, np.int8)]
    clock = kw.pop("clock", Clock())
    return StateStore(zero, clock=clock, **kw), clock


def test_new_streams_start_at_the_encoded_zero_and_grow_in_chunks():
    s, _ = store(chunk=2)
    rows = s.acquire(["a", "b", "c"])
    assert len(set(rows.tolist())) == 3 and s.allocated >= 3
    assert (s.arrays[0][rows] == -3).all() and (s.arrays[1][rows] == 5).all()
    assert (s.last_seq[rows] == NO_SEQ).all()


def test_lru_eviction_restarts_the_oldest_stream_from_zero():
    s, _ = store(capacity=2, chunk=1)
    r = s.acquire(["a", "b"])
    s.arrays[0][r] = 7
    s.acquire(["a"])  # a is now the most recent
    s.acquire(["c"])
    assert "b" not in s and "a" in s and "c" in s
    assert s.stats.evicted_lru == 1
    (row,) = s.acquire(["b"])
    assert (s.arrays[0][row] == -3).all()


def test_idle_streams_are_evicted():
    s, clock = store(idle_timeout=10)
    s.acquire(["a"])
    clock.t = 5
    s.acquire(["b"])
    clock.t = 12
    assert s.evict_idle() == ["a"]
    assert s.stats.evicted_idle == 1 and "b" in s


def test_reset_keeps_last_seq():
    s, _ = store()
    (row,) = s.acquire(["a"])
    s.arrays[1][row] = 1
    s.last_seq[row] = 41
    s.reset("a")
    assert (s.arrays[1][row] == 5).all() and s.last_seq[row] == 41


def test_export_load_roundtrip():
    s, _ = store()
    rows = s.acquire(["x", "y"])
    s.arrays[0][rows] = [[1, 2, 3, 4], [5, 6, 7, 8]]
    s.last_seq[rows] = [3, 9]
    t, _ = store()
    t.load(*s.export())
    assert t.streams == ["x", "y"]
    for a, b in zip(s.export()[2], t.export()[2]):
        np.testing.assert_array_equal(a, b)


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError, match="idle_timeout"):
        store(idle_timeout=0)
    with pytest.raises(ConfigError, match="capacity"):
        store(capacity=0)


def test_evicted_streams_come_back_numbered_on_and_a_full_slot_keeps_the_newest():
    s, _ = store(capacity=2)
    rows = s.acquire(["a", "b"])
    s.last_seq[rows] = [10, 20]
    s.boots[rows[0], 0] = 3
    s.acquire(["c"])  # evicts a
    assert "a" not in s
    back = s.recall(["c", "a", "new"], s.lookup(["c", "a", "new"]))
    assert back[0] >= 0 and back[1] >= 0 and back[2] == -1
    assert "c" in s and "b" not in s  # room made without evicting c, which is in the call
    assert s.last_seq[back[1]] == 10 and s.boots[back[1], 0] == 3
    assert s.recall(["b"], s.lookup(["b"]))[0] >= 0  # b, evicted to make room, comes back too
    d = Departed()
    d.SLOTS = 1  # every id in one slot: the newest stays, the one pushed out is forgotten
    d.put("x", 5, NO_BOOT)
    d.put("y", 6, 1)
    assert d.take("x") is None and d.take("y") == (6, 1) and d.take("y") is None


def test_the_evicted_streams_table_round_trips_and_refuses_garbage():
    d = Departed()
    assert d.export() is None
    for i in range(100):
        d.put(f"s{i}", i, i % 3 - 1)
    e = Departed()
    e.load(d.export())
    assert [e.take(f"s{i}") for i in range(100)] == [d.take(f"s{i}") for i in range(100)]
    import base64
    import zlib

    def packed(*numbers):
        raw = np.asarray(numbers, "<i8").tobytes()
        return base64.b64encode(zlib.compress(raw)).decode()

    for bad in ("not base64!", base64.b64encode(b"not zlib").decode(), packed(1, 2, 3)):
        with pytest.raises((ValueError, zlib.error)):
            Departed().load(bad)
    with pytest.raises(ValueError, match="slot out of range"):
        Departed().load(packed(Departed.SLOTS, 1, 1, 1))

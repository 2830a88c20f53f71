"""Pure parts of the service: reordering, configuration, topic templates."""

import numpy as np
import pytest

from edge import config
from edge.errors import ConfigError
from edge.reorder import Reorderer
from edge.topics import Template
from edge.wal import Record


def rec(stream, seq, k=1):
    return Record(stream, seq, 1.5, np.full((k, 2), seq, np.float64))


def test_reorderer_waits_for_the_gap_then_gives_up():
    now = [0.0]
    r = Reorderer(0.1, lambda: now[0])
    assert [x.seq for x in r.push(rec("s", 1), None)] == [1]
    assert r.push(rec("s", 3), 1) == [] and r.push(rec("s", 4), 1) == []
    assert [x.seq for x in r.push(rec("s", 2), 1)] == [2, 3, 4]
    assert r.push(rec("s", 7), 4) == []
    assert r.expire() == []
    now[0] = 0.2
    assert [x.seq for x in r.expire()] == [7] and len(r) == 0


def test_reorderer_passes_duplicates_and_is_off_at_zero():
    r = Reorderer(0.1, lambda: 0.0)
    r.push(rec("s", 5), None)
    assert [x.seq for x in r.push(rec("s", 5), 5)] == [5]  # the engine drops it
    off = Reorderer(0, lambda: 0.0)
    assert [x.seq for x in off.push(rec("s", 9), 1)] == [9]


def test_config_precedence_and_errors(tmp_path):
    f = tmp_path / "edge.toml"
    f.write_text('[serve]\nmodel = "m"\nmax_batch = 64\nbroker = "mqtt://127.0.0.1:1"\n')
    cfg = config.load(f, env={"EDGE_LSTM_MAX_BATCH": "32"}, overrides={"gap_policy": "reset"})
    assert (cfg.max_batch, cfg.gap_policy, cfg.port) == (32, "reset", 1)
    assert cfg.client_id.startswith("edge-lstm-") and cfg.runtime_id == cfg.client_id
    with pytest.raises(ConfigError, match="max_batch = 'lots'"):
        config.load(f, env={"EDGE_LSTM_MAX_BATCH": "lots"})
    with pytest.raises(ConfigError, match="gap_policy = 'maybe'"):
        config.load(f, env={}, overrides={"gap_policy": "maybe"})
    with pytest.raises(ConfigError, match="unknown configuration key"):
        f.write_text('model = "m"\nmodle = 1\n')
        config.load(f, env={})
    with pytest.raises(ConfigError, match="broker = 'http://x'"):
        config.load(None, env={}, overrides={"model": "m", "broker": "http://x"})
    with pytest.raises(ConfigError, match="tls_ca = '/nope'"):
        config.load(None, env={}, overrides={"model": "m", "tls_ca": "/nope"})
    with pytest.raises(ConfigError, match="invalid TOML"):
        f.write_text("model = \n")
        config.load(f, env={})


def test_topic_templates():
    t = Template("site/{stream}/imu")
    assert t.filter == "site/+/imu" and t.stream("site/dev-1/imu") == "dev-1"
    assert t.stream("site/dev-1/other") is None and t.stream("site/a b/imu") is None
    for bad in ("sensors/data", "sensors/x{stream}/data", "a/#/{stream}"):
        with pytest.raises(ConfigError):
            Template(bad)


def test_reorderer_stops_waiting_for_a_refused_seq():
    r = Reorderer(10.0, lambda: 0.0)
    r.push(rec("s", 1), None)
    assert r.push(rec("s", 3), 1) == []  # waits for 2
    assert [x.seq for x in r.void("s", 2, 1)] == [3]  # 2 was refused (NaN): release 3
    assert r.void("s", 5, 3) == []  # refused ahead of time: 4 is still awaited
    assert [x.seq for x in r.push(rec("s", 4), 3)] == [4]
    assert [x.seq for x in r.push(rec("s", 6), 4)] == [6]  # 5 voided: no wait


def test_gap_memory_tells_late_from_duplicate():
    from edge.reorder import GapMemory

    g = GapMemory()
    g.note("s", 10, 3)  # 10, 11, 12 skipped
    assert g.late("s", 11, 1) == 1 and g.late("s", 12, 3) == 1 and g.late("s", 9, 1) == 0
    assert g.late("other", 11, 1) == 0
    g.note_start("t", 100)  # the stream began at 100: anything before it arrived too late
    assert g.late("t", 99, 1) == 1 and g.late("t", 100, 1) == 0
    g.forget(["t"])
    assert g.late("t", 99, 1) == 0


def test_gap_memory_and_reorderer_stay_bounded():
    from edge.reorder import GapMemory

    g = GapMemory(streams=100)
    r = Reorderer(0.5, lambda: 0.0)
    for i in range(10_000):
        g.note_start(f"s{i}", 1)
        r.push(rec(f"s{i}", 1), None)
        r.forget([f"s{i}"])
    assert len(g) == 100 and not r._next


def test_reorderer_force_repeats_an_expiry():
    now = [0.0]
    live = Reorderer(0.1, lambda: now[0])
    replay = Reorderer(0.1, lambda: 0.0)
    for r in (live, replay):
        r.push(rec("s", 1), None)
        assert r.push(rec("s", 3), 1) == [] and r.push(rec("s", 4), 1) == []
    now[0] = 1.0
    assert [x.seq for x in live.expire()] == [3, 4]
    assert live.forced == [("s", 3)]
    assert [x.seq for x in replay.force("s", 3)] == [3, 4]

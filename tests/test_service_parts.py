"""Pure parts of the service: reordering, configuration, topic templates."""

import dataclasses
import math
import re
from typing import Any

import numpy as np
import pytest

from edge import config
from edge import topics as topics_module
from edge.errors import ConfigError
from edge.reorder import Reorderer
from edge.topics import Template
from edge.wal import Record


def rec(stream, seq, k=1):
    return Record(stream, seq, 1.5, np.full((k, 2), seq, np.float64))


def push(r, record, last, boots=(None, [])):
    """``Reorderer.push`` with the engine's view of the stream given as values."""
    return r.push(record, lambda _: last, lambda _: boots)


def test_reorderer_waits_for_the_gap_then_gives_up():
    now = [0.0]
    r = Reorderer(0.1, lambda: now[0])
    assert [x.seq for x in push(r, rec("s", 1), 0)] == [1]
    assert push(r, rec("s", 3), 1) == [] and push(r, rec("s", 4), 1) == []
    assert [x.seq for x in push(r, rec("s", 2), 1)] == [2, 3, 4]
    assert push(r, rec("s", 7), 4) == []
    assert r.expire() == []
    now[0] = 0.2
    assert [x.seq for x in r.expire()] == [7] and len(r) == 0


def test_the_reorderer_does_not_hold_a_seq_2_pow_31_past_the_last_as_a_gap():
    """2**31 past the last applied seq is admitted as behind (a duplicate, or with
    ``restart_gap`` a new life): not held for a gap before it, nor awaited once refused."""
    last = 2**31 + 7  # seq 7 is 2**31 past it, seq 6 the farthest ahead
    r = Reorderer(10.0, lambda: 0.0)
    assert [x.seq for x in push(r, rec("s", 7), last)] == [7]
    assert push(r, rec("s", 6), last) == []  # ahead of a gap: held
    assert r.void("s", 7, last) == []
    assert r.export(lambda _: last)["s"][1] == []  # 7 is not awaited
    gap = Reorderer(10.0, lambda: 0.0, 100)
    assert push(gap, rec("s", 7), last) == []  # a new life: waits as a first record does
    assert [x.seq for x in gap.expire(force=True)] == [7]


def test_a_wait_counts_only_while_messages_can_arrive():
    """Paused (the transport not reading: starting, or cut off from its broker), nothing is
    given up on; resumed, a record held before the pause waits what it had left, one held
    during it (as those a restart holds again) its whole time."""
    now = [0.0]
    r = Reorderer(1.0, lambda: now[0])
    push(r, rec("s", 1), 0)
    assert push(r, rec("s", 3), 1) == []  # held at 0.0
    now[0] = 0.4
    r.pause()
    now[0] = 2.0
    assert push(r, rec("t", 5), 1) == []  # held at 2.0, during the pause
    now[0] = 5.0
    assert r.expire() == []  # paused: both would have been given up on
    assert [x.seq for x in r.expire(force=True)] == [3, 5]  # a forced release still goes
    r.resume()
    assert push(r, rec("s", 5), 3) == []  # held at 5.0
    now[0] = 5.5
    r.pause()
    now[0] = 6.0
    assert push(r, rec("t", 7), 5) == []  # held at 6.0, during the pause
    now[0] = 6.5
    r.resume()  # "s" 5 had waited 0.5 before the pause, "t" 7 nothing
    now[0] = 6.9
    assert r.expire() == []
    now[0] = 7.0
    assert [x.seq for x in r.expire()] == [5]
    now[0] = 7.4
    assert r.expire() == []
    now[0] = 7.5
    assert [x.seq for x in r.expire()] == [7] and len(r) == 0


def test_a_fault_that_lasts_for_months_is_a_few_log_lines_an_hour(caplog):
    """A device sending a bad sample every second for months was 10 error lines a minute for
    ever: 14,400 a day, on a gateway whose log often shares the state directory's SD card.
    While a code keeps filling its window, the window doubles up to an hour, and each one
    that sent lines to debug level is summed up; a quiet spell brings back a minute."""
    import logging

    from edge.processor import RateLimitedLog

    now = [0.0]
    say = RateLimitedLog(clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="edge.service"):
        for second in range(86_400):
            now[0] = float(second)
            say("bad_payload", f"stream d seq {second}: not JSON")
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(caplog.records) >= 86_400  # every one still at debug level
    assert 200 <= len(loud) <= 350, len(loud)  # ~10 an hour once the window is an hour
    summaries = [m for m in loud if " more in the last " in m]
    assert summaries[0] == "bad_payload: 50 more in the last 1 min (at debug level)"
    assert summaries[-1].startswith("bad_payload: 3590 more in the last 60 min")
    assert sum(int(m.split()[1]) for m in summaries) + len(loud) - len(summaries) <= 86_400
    # After an hour without the fault, its next occurrence gets a minute's window again.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="edge.service"):
        for second in range(100):
            now[0] = 86_400 + 7_200 + second
            say("bad_payload", "not JSON")
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "further ones at debug level for up to 1 min" in loud[10]  # [0] sums the last hour
    assert len(loud) == 1 + 10 + 1 + 10  # 60 s window, summary, the next minute's 10


def test_reorderer_passes_duplicates_and_is_off_at_zero():
    r = Reorderer(0.1, lambda: 0.0)
    push(r, rec("s", 5), 4)
    assert [x.seq for x in push(r, rec("s", 5), 5)] == [5]  # the engine drops it
    off = Reorderer(0, lambda: 0.0)
    assert [x.seq for x in push(off, rec("s", 9), 1)] == [9]


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


def test_config_errors_say_where_the_value_was_set(tmp_path):
    """`EDGE_LSTM_MAX_BATCH=lots` was refused as `max_batch = 'lots'`, and a misspelt key as
    `unknown configuration key(s): modle`: neither said where to look (an environment set
    by a unit file, one of several configuration files)."""
    f = tmp_path / "edge.toml"
    f.write_text('model = "m"\nmax_batch = "many"\n')
    with pytest.raises(ConfigError, match=r"max_batch = 'lots' \(EDGE_LSTM_MAX_BATCH\) is not"):
        config.load(f, env={"EDGE_LSTM_MAX_BATCH": "lots"})
    with pytest.raises(ConfigError, match=rf"max_batch = 'many' \(in {re.escape(str(f))}\) is"):
        config.load(f, env={})
    f.write_text('model = "m"\nmodle = 1\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: unknown .*key\(s\): modle$"):
        config.load(f, env={})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("reorder_ms", "nan", "reorder_ms = 'nan' is not a valid finite number"),
        ("snapshot_interval", "inf", "snapshot_interval = 'inf' is not a valid finite number"),
        ("max_wait_ms", float("nan"), "max_wait_ms = nan is not a valid finite number"),
        ("queue_size", 1.7, "queue_size = 1.7 is not a valid int"),
        ("keepalive", "100000", r"keepalive = 100000 must be in 0\.\.65535"),
        ("reconnect_max", "1e10", "reconnect_max = 1e\\+10 must be at most .* seconds"),
        ("session_expiry", "-1", r"session_expiry = -1 must be in 0\.\.4294967295"),
        ("session_expiry", str(2**32), "session_expiry = 4294967296 must be in"),
        ("metrics_port", "70000", r"metrics_port = 70000 must be in 0\.\.65535"),
        ("max_samples_per_message", "65536", "max_samples_per_message = 65536 must be <= 65535"),
        # a finite but huge wait: every batch waited until it was full
        ("max_wait_ms", "1e300", r"max_wait_ms = 1e\+300 must be in 0\.\.3600000"),
        ("reorder_ms", "1e300", r"reorder_ms = 1e\+300 must be in 0\.\.3600000"),
        ("snapshot_interval", "1e300", r"snapshot_interval = 1e\+300 must be in 0\.\.86400"),
        ("stats_interval", "1e300", r"stats_interval = 1e\+300 must be in 0\.\.86400"),
        # a name too long for the file system was an OSError traceback
        (
            "password_file",
            "p" * 100_000,
            r"password_file = 'p{79}\.\.\. \(100002 chars\): File name too long",
        ),
        ("gap_policy", "g" * 100_000, r"gap_policy = 'g{79}\.\.\. \(100002 chars\) is not one"),
        ("broker", "mqtt://127.0.0.1:99999", "broker = 'mqtt://127.0.0.1:99999': Port out of"),
        ("broker", "mqtt://127.0.0.1:abc", "broker = 'mqtt://127.0.0.1:abc'"),
        ("broker", "mqtt://127.0.0.1:0", "port 0"),
        ("broker", "unix://run/m.sock", "expected unix:///PATH, the socket's absolute path"),
        ("broker", "unix:///run/m.sock?x=1", "expected unix:///PATH"),
        ("state_dir", "", "state_dir is empty"),
        ("state_dir", "a\0b", r"state_dir = 'a\\x00b': a path cannot hold a NUL character"),
        ("model", "m\0", r"model = 'm\\x00': a path cannot hold a NUL character"),
        ("status_topic", "edge/#/{runtime_id}", "status_topic = 'edge/#/{runtime_id}'"),
        ("stats_topic", "edge/+/x", "stats_topic = 'edge/\\+/x'"),
        ("runtime_control_topic", "a/{stream}", "runtime_control_topic = 'a/{stream}'"),
        ("runtime_id", "a/+/b", "runtime_id = 'a/\\+/b'"),
        ("client_id", "a/b", "runtime_id = 'a/b' \\(the client id unless set\\)"),
        ("prediction_topic", "p/#/{stream}", "prediction_topic: topic template 'p/#/{stream}'"),
        ("control_topic", "sensors/{stream}/data", "data_topic = .* overlaps control_topic"),
        ("control_topic", "sensors/x/{stream}", "data_topic = .* overlaps control_topic"),
        ("runtime_control_topic", "sensors/r/{runtime_id}", "overlaps runtime_control_topic"),
        ("stats_topic", "edge/status/{runtime_id}", "status_topic = .* overlaps stats_topic"),
        ("error_topic", "predictions/{stream}", "prediction_topic = .* overlaps error_topic"),
        ("broker", "mqtt://[::1", "broker = 'mqtt://\\[::1': Invalid IPv6 URL"),
        (
            "client_id",
            "x" * 70000,
            r"client_id = 'x{39}\.\.\. \(70002 chars\): MQTT carries at most",
        ),
        ("client_id", "a\0b", "client_id = 'a\\\\x00b': MQTT carries"),
        ("username", "u\0", "username = 'u\\\\x00': MQTT carries"),
        ("state_dir", [1, 2], "state_dir = \\[1, 2\\] is not a valid string"),
        ("client_id", {"a": 1}, "client_id = {'a': 1} is not a valid string"),
        (
            "error_topic",
            "sensors/{stream}/data",
            "error_topic = 'sensors/{stream}/data' overlaps data_topic = 'sensors/{stream}/data'",
        ),
        ("reply_topic", "sensors/{stream}/control", "reply_topic = .* overlaps control_topic"),
        ("prediction_topic", "sensors/p/{stream}", "prediction_topic = .* overlaps data_topic"),
        ("status_topic", "sensors/{runtime_id}/data", "status_topic = .* overlaps data_topic"),
    ],
)
def test_config_refuses_values_that_would_fail_later(key, value, message):
    """Each of these used to start and then hang, loop, crash a thread or never snapshot."""
    with pytest.raises(ConfigError, match=message):
        config.load(None, env={}, overrides={"model": "m", key: value})


@pytest.mark.parametrize(
    "key, value",
    [
        ("data_topic", "$share/edge/sensors/{stream}/data"),
        ("control_topic", "$share/g/sensors/{stream}/control"),
        ("data_topic", "$queue/sensors/{stream}/data"),
        ("prediction_topic", "$share/g/predictions/{stream}"),
        ("runtime_control_topic", "$share/g/edge/control/{runtime_id}"),
        ("status_topic", "$share/g/edge/status/{runtime_id}"),
    ],
)
def test_a_shared_subscription_as_a_topic_template_is_refused(key, value):
    """A ``$share/GROUP/`` data topic used to be accepted: the broker delivers its messages
    under the topic without the prefix, so every sample was answered ``bad_topic`` and gone;
    and spreading one stream over several runtimes would step each share from its own state."""
    with pytest.raises(ConfigError, match=f"{key}.*shared subscription.*one runtime") as exc:
        config.load(None, env={}, overrides={"model": "m", key: value})
    assert "edge-lstm worker" in str(exc.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("reorder_ms", float("nan"), "reorder_ms = nan is not a valid finite number"),
        ("snapshot_interval", float("inf"), "snapshot_interval = inf is not a valid finite"),
        ("idle_timeout", float("nan"), "idle_timeout = nan is not a valid finite number"),
        ("capacity", "100", "capacity = '100' is not a valid int"),
        ("max_batch", True, "max_batch = True is not a valid int"),
        ("ha_discovery", "no", "ha_discovery = 'no' is not a valid bool"),
        ("model", None, "model = None is not a valid string"),
    ],
)
def test_a_config_made_in_python_refuses_values_of_another_type(key, value, message):
    """``config.load`` converts what it reads; a ``ServiceConfig`` made in Python is taken as
    it is, and NaN passed every range check of ``validate``."""
    with pytest.raises(ConfigError, match=message):
        config.validate(config.ServiceConfig(**{"model": "m", key: value}))


def test_worker_options_made_in_python_refuse_values_of_another_type():
    from edge.nats_worker import WorkerOptions

    with pytest.raises(ConfigError, match="partitions = 1.5 must be in"):
        WorkerOptions(["nats://127.0.0.1:4222"], "w", partitions=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="replicas = True must be 1, 3 or 5"):
        WorkerOptions(["nats://127.0.0.1:4222"], "w", replicas=True)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "snapshot_interval",
            1e300,
            r"snapshot_interval = 1e\+300 must be in 0\.\.86400 and above 0",
        ),
        ("snapshot_interval", 0.0, r"snapshot_interval = 0.0 must be in 0\.\.86400 and above 0"),
        ("snapshot_interval", math.nan, r"snapshot_interval = nan must be in 0\.\.86400"),
        ("stats_interval", 86_401, r"stats_interval = 86401 must be in 0\.\.86400"),
        ("stats_interval", -1.0, r"stats_interval = -1.0 must be in 0\.\.86400"),
        ("stats_interval", "x" * 100_000, r"stats_interval = 'x+\.\.\. \(100002 chars\) must"),
    ],
)
def test_worker_options_made_in_python_bound_their_intervals_as_the_command_line(
    key: str, value: Any, message: str
) -> None:
    """A program's own ``WorkerOptions`` took a snapshot or stats interval of 1e300 (the
    command line refused it): the journal was never folded into a snapshot."""
    from edge.nats_worker import WorkerOptions

    with pytest.raises(ConfigError, match=message):
        WorkerOptions(["nats://127.0.0.1:4222"], "w", **{key: value})


@pytest.mark.parametrize(
    "key",
    ["servers", "worker_id", "lease_seconds", "replicas"],
)
def test_worker_options_repeat_a_100000_character_value_cut_short(key: str) -> None:
    """A refused server URL or worker id was repeated in full, a 100,000-character line, and
    a lease of another type than a number raised TypeError."""
    from edge.nats_worker import WorkerOptions

    huge = "x" * 100_000
    value: Any = ["nats://" + huge + "@h:1", "tls://" + huge] if key == "servers" else huge
    if key == "worker_id":
        value = huge + ":"  # not a key of the lease bucket
    kw: dict[str, Any] = {"servers": ["nats://127.0.0.1:4222"], "worker_id": "w", key: value}
    if key == "servers":
        kw["servers"] = ["nats://127.0.0.1:4222", "http://" + huge]
    with pytest.raises(ConfigError) as refused:
        WorkerOptions(**kw)
    assert len(str(refused.value)) < 300 and "chars)" in str(refused.value)
    if key == "servers":
        shown = WorkerOptions(value, "w").shown()  # credentials out, each URL cut short
        assert len(shown) < 300 and "nats://***@h:1" in shown and "chars)" in shown


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    f = tmp_path / "edge.toml"
    f.write_bytes(b'model = "x"\n\xff\xfe = 1\n')
    with pytest.raises(ConfigError, match=f"{f}: not UTF-8 text"):
        config.load(f, env={})


def test_a_config_file_with_a_number_of_more_digits_than_python_converts_is_named(tmp_path):
    """tomllib raises a plain ValueError for an integer of more than 4300 digits: serve and
    worker stopped with a traceback instead of one line naming the file."""
    f = tmp_path / "edge.toml"
    f.write_text('model = "x"\nmax_batch = ' + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"{f}: invalid TOML: Exceeds the limit"):
        config.load(f, env={})
    with pytest.raises(ConfigError, match=f"{f}: invalid TOML: Exceeds the limit"):
        config.read_toml(f)


def test_topic_templates():
    t = Template("site/{stream}/imu")
    assert t.filter == "site/+/imu" and t.stream("site/dev-1/imu") == "dev-1"
    assert t.stream("site/dev-1/other") is None and t.stream("site/a b/imu") is None
    for bad in ("sensors/data", "sensors/x{stream}/data", "a/#/{stream}"):
        with pytest.raises(ConfigError):
            Template(bad)


def test_templates_that_share_a_topic_and_the_filter_of_every_runtime():
    from edge.topics import overlap, runtime_filter

    assert overlap("sensors/{stream}/data", "sensors/{stream}/data")
    assert overlap("sensors/{stream}/data", "{stream}/pi-1/data")  # sensors/pi-1/data
    assert not overlap("sensors/{stream}/data", "sensors/{stream}/imu")
    assert not overlap("sensors/{stream}/data", "sensors/{stream}")
    assert not overlap("a/{stream}", "b/{stream}")
    assert runtime_filter("edge/status/{runtime_id}") == "edge/status/+"
    assert runtime_filter("{runtime_id}/status") == "+/status"
    for none in ("edge/status-{runtime_id}", "edge/status", "{runtime_id}/{runtime_id}"):
        assert runtime_filter(none) is None, none


def test_a_stream_id_ending_in_a_newline_is_not_a_stream_of_the_template():
    """``$`` also matches before a final newline: ``sensors/dev-1\n/data`` was read as stream
    ``dev-1\n``, which the engine then refused, answered on a topic with a newline in it and
    logged as a line broken in two; it does not match the template (``bad_topic``)."""
    t = Template("sensors/{stream}/data")
    assert t.stream("sensors/dev-1\n/data") is None
    assert t.stream("sensors/dev-1/data") == "dev-1"


def test_topic_templates_answer_the_same_past_their_memory():
    t = Template("site/{stream}/imu")
    topics = [f"site/d{i}/imu" for i in range(topics_module.CACHED + 10)]
    topics += ["site/a b/imu", "x/d1/imu", "site/" + "d" * 2000 + "/imu"]
    for _ in range(2):  # remembered, forgotten when full, matched again: the same answers
        got = [t.stream(topic) for topic in topics]
        assert got[:-3] == [f"d{i}" for i in range(topics_module.CACHED + 10)]
        assert got[-3:] == [None, None, None]
        assert all(t.topic(s) == topic for s, topic in zip(got[:-3], topics))
    assert len(t._streams) <= topics_module.CACHED  # bounded, whatever the topics
    assert all(len(k) <= topics_module.CACHED_LENGTH for k in t._streams)


def test_a_new_streams_first_record_waits_for_one_that_overtook_it():
    """Nothing says the first record heard of a stream is its lowest: it waits like one
    ahead of a gap, and what arrives meanwhile goes out in seq order (across the wrap too)."""
    now = [0.0]
    r = Reorderer(0.5, lambda: now[0])
    top = 2**32 - 1
    assert push(r, rec("w", 0), None) == [] and push(r, rec("w", top - 1), None) == []
    assert push(r, rec("w", 2), None) == [] and push(r, rec("w", top), None) == []
    assert r.void("w", 1, None) == []  # refused on the way: not waited for
    assert push(r, rec("n", 7), None) == []
    now[0] = 0.6
    assert [(x.stream, x.seq) for x in r.expire()] == [
        ("w", top - 1),
        ("w", top),
        ("w", 0),
        ("w", 2),
        ("n", 7),
    ]
    assert r.forced == [("w", top - 1), ("n", 7)] and len(r) == 0


def test_a_reset_ends_its_streams_wait():
    r = Reorderer(10.0, lambda: 0.0)
    push(r, rec("s", 1), 0)
    assert push(r, rec("s", 4), 1) == [] and push(r, rec("x", 9), 1) == []
    assert [x.seq for x in r.end("s")] == [4] and len(r) == 1  # other streams keep waiting
    assert [x.seq for x in push(r, rec("s", 10), 9)] == [10]  # the reset's numbering: no wait
    assert r.end("s") == [] and r.forced == []  # not a clock decision: a replay repeats it


def test_reorderer_asks_the_engine_only_about_a_stream_new_to_it():
    asked = []

    def last(stream):
        asked.append(stream)
        return 4

    r = Reorderer(0.1, lambda: 0.0)
    assert [x.seq for x in r.push(rec("s", 5), last)] == [5]
    assert [x.seq for x in r.push(rec("s", 6), last)] == [6]
    assert r.push(rec("s", 8), last) == [] and asked == ["s"]


def test_a_duplicate_first_after_a_restart_does_not_set_the_expectation_back():
    """After recovery the reorderer knows a stream only from the engine's last seq; a
    redelivered old message arriving first must not make the next in-order one wait."""
    r = Reorderer(10.0, lambda: 0.0)
    r.load({})  # the snapshot held nothing special for "s": it expects last seq + 1
    assert [x.seq for x in push(r, rec("s", 9, k=2), 13)] == [9]  # duplicate: the engine drops it
    assert [x.seq for x in push(r, rec("s", 14), 13)] == [14]
    assert len(r) == 0


def test_reorderer_passes_a_boot_heard_after_the_next_one_as_stale():
    r = Reorderer(10.0, lambda: 0.0)
    push(r, dataclasses.replace(rec("s", 1), boot=7), 0, (7, []))
    assert push(r, dataclasses.replace(rec("s", 1), boot=9), 1, (7, [])) == []  # a new life
    late = dataclasses.replace(rec("s", 1), boot=8)  # never seen, just below the current one
    assert push(r, late, 1, (7, [])) == []  # an earlier boot: after boot 9 begins, stale
    assert push(r, dataclasses.replace(rec("s", 2), boot=9), 1, (7, [])) == []
    assert [(x.seq, x.boot) for x in r.expire(force=True)] == [(1, 9), (2, 9), (1, 8)]
    assert push(r, late, 2, (9, [7])) == [late]  # now straight to the engine


def test_reorderer_stops_waiting_for_a_refused_seq():
    r = Reorderer(10.0, lambda: 0.0)
    push(r, rec("s", 1), 0)
    assert push(r, rec("s", 3), 1) == []  # waits for 2
    assert [x.seq for x in r.void("s", 2, 1)] == [3]  # 2 was refused (NaN): release 3
    assert r.void("s", 5, 3) == []  # refused ahead of time: 4 is still awaited
    assert [x.seq for x in push(r, rec("s", 4), 3)] == [4]
    assert [x.seq for x in push(r, rec("s", 6), 4)] == [6]  # 5 voided: no wait


def test_refused_seqs_past_a_gap_that_never_fills_are_not_kept_without_bound():
    """A sensor that fails (NaN) right after a lost sample: every message refused, past a gap
    that never fills. Each refused seq was kept, in memory and in every snapshot, for as long
    as it went on (months); the nearest ones still spare a wait."""
    r = Reorderer(10.0, lambda: 0.0)
    push(r, rec("s", 1), 0)
    for seq in range(3, 50_003):  # 2 was lost
        assert r.void("s", seq, 1) == []
    assert len(r._void["s"]) <= 1024
    assert len(r.export(lambda _: 1)["s"][1]) <= 1024
    assert [x.seq for x in push(r, rec("s", 2), 1)] == [2]  # the gap fills at last
    assert r._next["s"] > 3 + 256  # past the refused ones nearest to it


def test_reorderer_forgets_evicted_streams():
    r = Reorderer(0.5, lambda: 0.0)
    for i in range(10_000):
        push(r, rec(f"s{i}", 1), None)
        r.forget([f"s{i}"])
    assert not r._next


def test_giving_up_on_the_gaps_of_a_long_backlog_sorts_what_waits_once():
    """A backlog of one stream out of order with samples lost now and then (a device's
    store-and-forward buffer after a reconnect): what waited was sorted again, whole, at each
    gap given up on, and a tick over 18,000 messages held with 1,800 gaps took about 40 s, the
    service answering nothing meanwhile. The work is counted here in reads of held seqs."""
    reads = [0]

    class Counted(Record):
        @property
        def seq(self) -> int:
            reads[0] += 1
            return self._seq

        @seq.setter
        def seq(self, value: int) -> None:
            self._seq = value

    n = 4000
    seqs = [q for q in range(3, 3 + n + n // 9) if q % 10]  # 2 and every tenth lost
    np.random.default_rng(1).shuffle(seqs)
    now = [0.0]
    r = Reorderer(1.0, lambda: now[0])
    assert [x.seq for x in push(r, rec("s", 1), None)] == []
    assert [x.seq for x in r.expire(force=True)] == [1]
    for q in seqs:
        assert push(r, Counted("s", q, None, np.zeros((1, 2))), 1) == []
    reads[0] = 0
    now[0] = 2.0
    out = [x.seq for x in r.expire()]
    assert out == sorted(seqs) and len(r) == 0
    assert reads[0] < 20 * n


def test_reorderer_force_repeats_an_expiry():
    now = [0.0]
    live = Reorderer(0.1, lambda: now[0])
    replay = Reorderer(0.1, lambda: 0.0)
    for r in (live, replay):
        push(r, rec("s", 1), 0)
        assert push(r, rec("s", 3), 1) == [] and push(r, rec("s", 4), 1) == []
    now[0] = 1.0
    assert [x.seq for x in live.expire()] == [3, 4]
    assert live.forced == [("s", 3)]
    assert [x.seq for x in replay.force("s", 3)] == [3, 4]


def brec(seq, boot):
    return Record("s", seq, None, np.zeros((1, 2)), boot, lsn=seq + 1000 * boot)


def test_reorderer_starts_a_new_life_on_a_new_boot():
    now = [0.0]
    r = Reorderer(10.0, lambda: now[0])
    assert [x.seq for x in push(r, brec(1, 5), 0)] == [1]
    assert push(r, brec(3, 5), 1) == []  # waits for 2 of boot 5
    # the device reboots: boot 6 starts at seq 2; boot 5's held 3 goes first, unwaited, and
    # boot 6's first waits: its seq 1, overtaken on the way, comes after it and goes first
    assert [(x.seq, x.boot) for x in push(r, brec(2, 6), 1, (5, []))] == [(3, 5)]
    assert push(r, brec(3, 6), 3) == [] and push(r, brec(1, 6), 3) == []
    assert r.expire() == []
    now[0] = 11.0
    assert [(x.seq, x.boot) for x in r.expire()] == [(1, 6), (2, 6), (3, 6)]
    assert [(x.seq, x.boot) for x in push(r, brec(9, 5), 3)] == [(9, 5)]  # stale: straight on
    assert push(r, brec(5, 6), 3) == []  # boot 6 goes on in order: 5 waits for 4


def test_an_earlier_boot_heard_while_the_new_one_waits_follows_its_start():
    """The engine is still in the old boot while the new one's first record waits: a late
    record of the old boot waits too and goes right after it, so the engine calls it stale
    instead of stepping it into the old life."""
    r = Reorderer(10.0, lambda: 0.0)
    assert [x.seq for x in push(r, brec(20, 5), 19, (5, []))] == [20]
    assert push(r, brec(1, 6), 20, (5, [])) == []
    assert push(r, brec(21, 5), 20, (5, [])) == [] and len(r) == 2
    assert [(x.seq, x.boot) for x in r.pending()] == [(1, 6), (21, 5)]
    assert [(x.seq, x.boot) for x in r.expire(force=True)] == [(1, 6), (21, 5)]
    assert [(x.seq, x.boot) for x in push(r, brec(22, 5), 1, (6, [5]))] == [(22, 5)]


def test_a_refused_seq_while_a_new_life_waits_is_not_counted_from_the_life_before():
    """A new boot's backlog (a worker's takeover replays it, or a broker delivers what queued
    while the runtime was down): its first record waits, and a refused message of it (NaN) past
    the old boot's last seq was counted from that seq. The new life's records from there on
    went to the engine first, as the new boot's beginning, and every one before them was
    answered ``late``."""
    r = Reorderer(10.0, lambda: 0.0)
    assert [x.seq for x in push(r, brec(23, 5), 22, (5, []))] == [23]
    assert push(r, brec(1, 6), 23, (5, [])) == []  # a new life: waits
    for seq in (3, 24, 25):
        assert push(r, brec(seq, 6), 23, (5, [])) == []
    assert r.void("s", 31, 23) == []  # boot 6's NaN: the new life goes on waiting
    assert r.void("s", 2, 23) == []
    assert [x.seq for x in r.expire(force=True)] == [1, 3, 24, 25]


def test_reorderer_starts_over_past_the_restart_gap():
    r = Reorderer(10.0, lambda: 0.0, restart_gap=10)
    for seq in range(1, 51):
        push(r, rec("s", seq), seq - 1)
    assert [x.seq for x in push(r, rec("s", 45), 50)] == [45]  # a redelivery: the engine drops it
    assert push(r, rec("s", 2), 50) == []  # 48 behind: a restarted device, whose first waits
    assert push(r, rec("s", 3), 50) == [] and push(r, rec("s", 1), 50) == []
    assert [x.seq for x in r.expire(force=True)] == [1, 2, 3]
    assert push(r, rec("s", 5), 3) == []  # and its numbering is the one now waited on
    assert [x.seq for x in push(r, rec("s", 4), 3)] == [4, 5]


def test_certificate_files_that_do_not_load_are_named(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for key in ("tls_ca", "tls_cert"):
        with pytest.raises(ConfigError, match=f"{key} = '{junk}'"):
            config.load(None, env={}, overrides={"model": "m", key: str(junk)})


def test_a_client_key_with_a_passphrase_is_named_and_no_passphrase_is_asked(tmp_path):
    """A client key encrypted with a passphrase made OpenSSL ask for it on the terminal (a
    prompt at every start, on a console) or fail with `[Errno 22] Invalid argument` (under
    systemd), which named neither the key nor the passphrase. It is refused, saying why; a
    key that does not match its certificate is still named as before."""
    import subprocess

    from tests.test_service_hardening import _tls_files

    certs = _tls_files(tmp_path / "certs")
    encrypted = certs / "client-enc.key"
    protect = ["-aes256", "-passout", "pass:pw", "-out", encrypted]
    subprocess.run(
        ["openssl", "pkey", "-in", certs / "client.key", *protect], check=True, capture_output=True
    )
    said = r"tls_key = '/.*: the private key is encrypted \(it has a passphrase\)"
    with pytest.raises(ConfigError, match=said):
        config.load(
            None,
            env={},
            overrides={
                "model": "m",
                "tls_cert": str(certs / "client.crt"),
                "tls_key": str(encrypted),
            },
        )
    with pytest.raises(
        ConfigError, match="not a usable certificate and key: .*KEY_VALUES_MISMATCH"
    ):
        config.load(
            None,
            env={},
            overrides={
                "model": "m",
                "tls_cert": str(certs / "client.crt"),
                "tls_key": str(certs / "server.key"),
            },
        )


def test_a_state_dir_is_locked_while_held_and_free_once_released(tmp_path):
    import os

    from edge.state_lock import StateLock

    first = StateLock(tmp_path / "state")
    first.acquire()
    with pytest.raises(ConfigError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        StateLock(tmp_path / "state").acquire()
    first.release()
    again = StateLock(tmp_path / "state")
    again.acquire()  # a lock is never left behind
    again.release()


def test_a_deleted_lock_file_leaves_the_state_dir_locked(tmp_path):
    """A cleaner (or ``rm``) takes the lock file: the directory itself is still held."""
    from edge.state_lock import StateLock

    first = StateLock(tmp_path / "state")
    first.acquire()
    (tmp_path / "state" / "lock").unlink()
    with pytest.raises(ConfigError, match="in use by another process"):
        StateLock(tmp_path / "state").acquire()
    first.release()
    StateLock(tmp_path / "state").acquire()


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_state_dir_made_again_under_its_holder_is_locked_before_it_is_written(tmp_path, how):
    """The directory removed or moved away under a running service and made again by it is
    another directory: it was not locked, and a second serve started on it."""
    import os
    import shutil

    from edge.state_lock import StateLock

    state = tmp_path / "state"
    first = StateLock(state)
    first.acquire()
    first.follow()  # the same directory: nothing changes
    if how == "removed":
        shutil.rmtree(state)
    else:
        state.rename(tmp_path / "moved")
    state.mkdir()
    first.follow()
    if how == "renamed":
        StateLock(tmp_path / "moved").acquire()  # let go: it is not the state_dir any more
    with pytest.raises(ConfigError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        StateLock(state).acquire()
    first.release()
    holder = StateLock(state)
    holder.acquire()
    shutil.rmtree(state)
    state.mkdir()
    newcomer = StateLock(state)  # another serve, on the directory made again before its holder
    newcomer.acquire()
    with pytest.raises(OSError, match="in use by another process"):
        holder.follow()  # nothing may be written there
    newcomer.release()
    holder.release()


def test_a_state_dir_that_cannot_be_written_is_not_locked(tmp_path, caplog):
    from edge.state_lock import StateLock

    (tmp_path / "file").write_text("not a directory")
    StateLock(tmp_path / "file" / "state").acquire()  # the service starts degraded instead
    assert "not locked" in caplog.text


def test_the_outbox_counts_the_bytes_a_checkpoint_carries_over():
    """The log keeps room for the next checkpoint, which carries the answers not yet
    acknowledged: their bytes are counted as they come and go, never by a scan."""
    from edge.outbox import Outbound, Outbox

    box = Outbox()
    a = Outbound("predictions/a", b"x" * 100, lsn=1)
    b = Outbound("predictions/b", b"y" * 50, lsn=2)
    status = Outbound("edge/status/r", b"{}", qos=0, retain=True)
    box.put([a, b, status])
    assert box.open_bytes == len(a.topic) + 100 + len(b.topic) + 50
    for mid, o in enumerate(box.take(), 1):
        box.sent(mid, o)
    box.acked(1)
    assert box.open_bytes == len(b.topic) + 50
    box.acked(2)
    assert box.open_bytes == 0


def test_a_config_file_shared_with_the_worker_is_read_by_serve(tmp_path):
    """docs/cluster.md: serve's keys at top level and the worker's in [worker], one file."""
    f = tmp_path / "edge.toml"
    f.write_text('model = "m"\nreorder_ms = 10\n[worker]\npartitions = 4\n')
    assert config.load(f, env={}).reorder_ms == 10


def test_a_topic_the_broker_refused_is_kept_out_for_a_while_then_tried_again(monkeypatch):
    """The MQTT client remembers the topics whose publish the broker refused as such (its ACL:
    each refused publish costs the connection with mosquitto): the messages on them still
    queued are taken out before a reconnect sends them again, and after
    ``REFUSAL_KEPT_SECONDS`` a publish there is tried again (the ACL may have been fixed)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from edge import mqtt_client

    now = [1000.0]
    monkeypatch.setattr(mqtt_client.time, "monotonic", lambda: now[0])
    c = mqtt_client.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5)
    c.max_queued_messages_set(0)
    first, second, other = (c.publish(t, b"{}", qos=1) for t in ("p/b", "p/b", "p/a"))
    denied = ReasonCode(PacketTypes.PUBACK, identifier=0x87)
    quota = ReasonCode(PacketTypes.PUBACK, identifier=0x97)  # about the message, not the topic
    c._do_on_publish(other.mid, quota, Properties(PacketTypes.PUBACK))
    assert c.refused("p/a") is None
    c._do_on_publish(first.mid, denied, Properties(PacketTypes.PUBACK))
    assert c.refused("p/b") == denied and c.refused("p/a") is None
    assert c.drop_refused() == [(second.mid, denied)] and not c._out_messages
    now[0] += mqtt_client.REFUSAL_KEPT_SECONDS + 1
    assert c.refused("p/b") is None


def test_a_status_cut_to_its_base_keeps_the_reloads_outcome_in_the_room_there_is():
    """Past cutting its texts, a status keeps its base and the last reload's outcome: "ok: "
    or "failed: " with what of the reason fits, the bare word when no more does, the base
    alone when not even that does."""
    import json

    from edge.mqtt_loop import STATUS_BASE, fitted

    base = {k: "x" for k in STATUS_BASE}
    noise = {"damage": ["d" * 60] * 20}  # many short texts: cutting them is not enough

    def fit(reload: str, limit: int) -> object:
        got = fitted({**base, **noise, "reload": reload}, len, limit)
        assert len(got) <= limit or limit < len(json.dumps(base)), got
        return json.loads(got).get("reload")

    room = len(json.dumps({**base, "reload": "ok: "}))
    assert fit("state kept", room + 5) == "ok: state"
    assert fit("failed, the running model kept: no bundle", room + 6) == "failed: no"
    assert fit("failed, the running model kept: no bundle", room + 4) == "failed"
    assert fit("state kept", room - 10) is None

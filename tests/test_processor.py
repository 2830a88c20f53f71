"""The decode -> log -> step -> answer path without a broker: containment of the unexpected,
replay after a crash, and the answers a restart publishes again."""

import json
import os
import time

import numpy as np
import pytest

import edge
from edge import config
from edge.errors import ConfigError
from edge.journal import Journal
from edge.metrics import Metrics
from edge.mqtt_loop import open_engine
from edge.processor import Inbound, Processor


def make(bundles, state, clock=time.monotonic, **overrides):
    """A processor that answers at once (reordering, with its waits, is tested on its own)."""
    base = {"model": str(bundles / "clf-int8"), "state_dir": str(state), "reorder_ms": 0}
    cfg = config.load(None, env={}, overrides={**base, **overrides})
    p = Processor(open_engine(cfg), cfg, Journal(state), Metrics(), clock=clock)
    p.recover()
    return p


def msg(stream, seq, row, mid=0, boot=None):
    body = {"seq": seq, "values": np.asarray(row).tolist()}
    if boot is not None:
        body["boot"] = boot
    return Inbound(f"sensors/{stream}/data", json.dumps(body).encode(), mid)


def reset_to_1(stream):
    """A reset whose next seq is 1: the stream's numbering known, nothing waits for it."""
    return Inbound(f"sensors/{stream}/control", b'{"cmd": "reset", "seq": 1}', 0)


def answers(p):
    outs = p.outbox.take()
    for mid, o in enumerate(outs, 1):
        p.outbox.sent(mid, o)
    return outs


def failing_appends(p, monkeypatch, times, error):
    """The log refuses the next ``times`` writes with ``error`` (a full disk), then takes them."""
    real = p.journal.append
    left = [times]

    def append(entries, **kw):
        if left[0]:
            left[0] -= 1
            raise error
        return real(entries, **kw)

    monkeypatch.setattr(p.journal, "append", append)


@pytest.fixture
def xs():
    return np.random.default_rng(3).normal(0, 2, (20, 6))


def test_an_unexpected_failure_costs_one_message(bundles, tmp_path, xs, monkeypatch):
    p = make(bundles, tmp_path)
    real, real_batch = p.engine.step_many, p.engine.step_batch

    def fragile(chunks):
        if any(c.stream == "poison" for c in chunks):
            raise RuntimeError("kernel exploded")
        return real(chunks)

    def fragile_batch(streams, *args, **kw):
        if "poison" in streams:
            raise RuntimeError("kernel exploded")
        return real_batch(streams, *args, **kw)

    monkeypatch.setattr(p.engine, "step_many", fragile)
    monkeypatch.setattr(p.engine, "step_batch", fragile_batch)
    assert p.handle([msg("good", 1, xs[0]), msg("poison", 1, xs[1]), msg("good", 2, xs[2])])
    outs = answers(p)
    errs = [json.loads(o.payload) for o in outs if o.topic == "errors/poison"]
    assert len(errs) == 1 and errs[0]["error"] == "internal" and len(errs[0]["id"]) == 8
    got = [json.loads(o.payload)["y"] for o in outs if o.topic == "predictions/good"]
    want = edge.load(bundles / "clf-int8").step("x", xs[[0, 2]])
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    assert p.metrics.errors["internal"] == 1


def test_a_failing_decoder_is_contained_too(bundles, tmp_path, xs, monkeypatch):
    from edge import payloads

    p = make(bundles, tmp_path)
    real = payloads.decode

    def fragile(payload, *a, **kw):
        if b"666" in payload:
            raise MemoryError("out of memory")
        return real(payload, *a, **kw)

    monkeypatch.setattr(payloads, "decode", fragile)
    assert p.handle([msg("a", 666, xs[0]), msg("a", 1, xs[1])])
    topics = [o.topic for o in answers(p)]
    assert topics == ["errors/a", "predictions/a"]


def test_errors_of_topics_that_name_no_stream_reach_no_device(bundles, tmp_path, xs):
    """A device may call itself ``_invalid`` or anything else the alphabet allows."""
    p = make(bundles, tmp_path)
    bad = Inbound("sensors/bad stream/data", msg("x", 1, xs[0]).payload, 0)
    control = Inbound("sensors/a/b/control", b'{"cmd": "reset"}', 0)
    assert p.handle([msg("_invalid", 1, xs[0]), bad, control])
    outs = answers(p)
    assert [o.topic for o in outs if o.topic.endswith("_invalid")] == ["predictions/_invalid"]
    reserved = [json.loads(o.payload)["error"] for o in outs if o.topic.startswith("errors/")]
    assert reserved == ["bad_topic"] * 2 and all(
        o.topic == "errors/~invalid" for o in outs if o.topic.startswith("errors/")
    )


def test_a_reset_naming_seq_twice_is_refused_and_resets_nothing(bundles, tmp_path, xs):
    p = make(bundles, tmp_path)
    assert p.handle([msg("c", 1, xs[0]), msg("c", 2, xs[1])])
    answers(p)
    before = p.engine.state_of("c")
    control = Inbound("sensors/c/control", b'{"cmd": "reset", "seq": 1, "seq": 2}', 0)
    p.handle([control])
    outs = answers(p)
    assert [o.topic for o in outs] == ["errors/c"]
    doc = json.loads(outs[0].payload)
    assert doc["error"] == "bad_json" and "'seq' appears twice" in doc["detail"]
    assert p.engine.last_seq("c") == 2
    assert all(np.array_equal(a, b) for a, b in zip(before, p.engine.state_of("c")))


def test_a_reset_the_broker_sends_again_leaves_the_state_the_first_one_left(bundles, tmp_path, xs):
    """Our acknowledgements lost (a reconnect, or a crash): the broker sends the reset and the
    messages around it again, marked DUP, with their packet ids. Applied again as it came, a
    reset without seq zeroed the state the samples after it built, and their copies were
    duplicates: every later prediction of the stream went on from the wrong state, silently.
    Also after a restart of the runtime, or a snapshot; a reset of a stream not known yet, and
    one naming the seq to start from (a rebooted device, its old samples sent again too)."""
    import dataclasses

    def dup(m):  # the broker's second delivery: same packet id, a new connection
        return dataclasses.replace(m, redelivered=True, mid=m.mid | 1 << 16)

    def control(stream, body, mid):
        return Inbound(f"sensors/{stream}/control", body, mid)

    engine = edge.load(bundles / "clf-int8")
    engine.step("x", xs[0:2], seq=1)
    engine.reset("x")
    engine.step("x", xs[2:4], seq=3)
    want = engine.step("x", xs[4], seq=5)
    fresh = edge.load(bundles / "clf-int8").step("x", xs[2:5])[-1]  # from a reset on
    cases = {
        "a": ([msg("a", 1, xs[0], 1), msg("a", 2, xs[1], 2)], b'{"cmd": "reset"}', 3, want),
        "n": ([], b'{"cmd": "reset"}', 3, fresh),  # a stream the runtime did not know yet
        "b": (  # a rebooted device: its old samples (sent again too), a reset naming seq 1
            [msg("b", 101, xs[0], 1), msg("b", 102, xs[1], 2)],
            b'{"cmd": "reset", "seq": 1}',
            1,
            fresh,
        ),
    }
    for when in ("reconnect", "restart", "snapshot"):
        for stream, (before, body, first, y) in cases.items():
            state = tmp_path / when / stream
            p = make(bundles, state)
            after = [msg(stream, first, xs[2], 4), msg(stream, first + 1, xs[3], 5)]
            sent = [*before, control(stream, body, 3), *after]
            assert p.handle(sent)
            if when != "reconnect":
                if when == "snapshot":
                    assert p.checkpoint()
                p.journal.close()  # kill -9
                p = make(bundles, state)
            assert p.handle([dup(m) for m in sent])
            answers(p)
            assert p.handle([msg(stream, first + 2, xs[4], 6)])
            (got,) = [json.loads(o.payload) for o in answers(p) if o.topic.startswith("pred")]
            np.testing.assert_array_equal(np.float32(got["y"]), y, f"{when} {stream}")
    # The broker got our acknowledgement and gave id 3 to a new message: a reset it then sends
    # again with that id is a new one.
    p = make(bundles, tmp_path / "reused")
    assert p.handle([msg("a", 1, xs[0], 1), control("a", b'{"cmd": "reset"}', 3)])
    assert p.handle([msg("a", 2, xs[1], 3), dup(control("a", b'{"cmd": "reset"}', 3))])
    assert p.handle([msg("a", 3, xs[2], 4)])
    got = [json.loads(o.payload) for o in answers(p) if o.topic == "predictions/a"]
    zero = edge.load(bundles / "clf-int8").step("x", xs[2])
    np.testing.assert_array_equal(np.float32(got[-1]["y"]), zero)


def test_replay_publishes_again_only_what_the_broker_did_not_acknowledge(bundles, tmp_path, xs):
    p = make(bundles, tmp_path)
    for i in range(10):
        assert p.handle([msg("a", i + 1, xs[i]), msg("b", i + 1, xs[i + 5])])
    outs = answers(p)
    assert len(outs) == 20
    for mid in range(1, 13):  # the broker acknowledged the first 12 answers (lsn 1..12)
        p.outbox.acked(mid)
    assert p.tick()  # logs the ack mark
    p.journal.close()  # kill -9 here
    q = make(bundles, tmp_path)
    again = answers(q)
    assert [o.lsn for o in again] == list(range(13, 21))
    assert [o.payload for o in again] == [o.payload for o in outs[12:]]  # same y, bit for bit
    assert q.engine.last_seq("a") == 10 and q.lsn == 20


def test_a_stream_forgotten_as_idle_is_forgotten_at_the_same_point_by_a_replay(
    bundles, tmp_path, xs
):
    """Idle eviction depends on the clock, which a replay does not consult: it is logged, so
    the answers recomputed after a crash are the ones published before it."""
    now = [1000.0]
    p = make(bundles, tmp_path, idle_timeout=60)
    p.engine.store._clock = lambda: now[0]
    assert p.handle([msg("a", 1, xs[0]), msg("a", 2, xs[1])])
    now[0] += 120  # "a" is idle now: its next sample starts from the zero state
    assert p.handle([msg("a", 3, xs[2]), msg("b", 1, xs[3])])
    live = {o.topic: o.payload for o in answers(p) if o.topic.startswith("predictions/")}
    fresh = edge.load(bundles / "clf-int8").step("x", xs[2])
    assert np.allclose(json.loads(live["predictions/a"])["y"], fresh, atol=0)
    p.journal.close()  # kill -9: nothing acknowledged, so every answer is published again

    again = make(bundles, tmp_path, idle_timeout=60)
    replayed = [o for o in answers(again) if o.topic == "predictions/a"]
    assert replayed[-1].payload == live["predictions/a"]
    assert again.engine.last_seq("a") == 3


def test_a_stream_whose_message_waits_for_reordering_is_not_forgotten_as_idle(
    bundles, tmp_path, xs
):
    """A sample that arrives within idle_timeout, after a gap, waits reorder_ms for the gap to
    fill; the stream was forgotten as idle meanwhile (its last applied sample was older), and
    that sample stepped from the zero state, flagged restart."""
    now = [1000.0]
    p = make(bundles, tmp_path, idle_timeout=60, reorder_ms=600, clock=lambda: now[0])
    p.engine.store._clock = lambda: now[0]
    assert p.handle([msg("a", 1, xs[0]), msg("a", 2, xs[1])])
    now[0] += 1
    assert p.tick()  # a stream's first message waits too: now they are applied
    now[0] += 59.5  # 59.5 s after its last sample: seq 4 comes, seq 3 is lost
    assert p.handle([msg("a", 4, xs[3])])
    assert p.handle([msg("b", 1, xs[0])])
    now[0] += 0.7  # the wait is over; a's last applied sample is 60.2 s old by now
    assert p.handle([msg("b", 2, xs[1])])  # a round that looks for idle streams
    assert p.tick()
    got = [json.loads(o.payload) for o in answers(p) if o.topic == "predictions/a"]
    assert [(d["seq"], d.get("restart"), d.get("gap")) for d in got][-1] == (4, None, 1)
    want = edge.load(bundles / "clf-int8").step("x", xs[[0, 1, 3]])[-1]
    np.testing.assert_array_equal(np.float32(got[-1]["y"]), want)
    now[0] += 61  # idle now, nothing held: forgotten
    assert p.handle([msg("b", 3, xs[2])])
    assert "a" not in p.engine.store


def test_a_stream_whose_message_waits_in_a_backlog_is_not_forgotten_as_idle(bundles, tmp_path, xs):
    """A backlog (the broker's queue after an outage, read faster than it is worked off)
    took longer to work off than a stream had left of its idle_timeout: the stream was
    forgotten as idle before its message, which came 50 s after its last one, was read, and
    that message stepped from the zero state, flagged restart. A stream is idle by the time
    the oldest message not yet worked off arrived."""
    import dataclasses

    now = [1000.0]
    p = make(bundles, tmp_path, idle_timeout=60, clock=lambda: now[0])
    p.engine.store._clock = lambda: now[0]
    assert p.handle([msg("a", 1, xs[0]), msg("a", 2, xs[1])])
    came = [dataclasses.replace(msg("a", 3, xs[2]), received=now[0] + 50)]
    now[0] += 100  # worked off 50 s after it came, 100 s after a's last sample
    assert p.handle(came)
    assert p.tick()
    got = [json.loads(o.payload) for o in answers(p) if o.topic == "predictions/a"]
    assert [(d["seq"], d.get("restart")) for d in got] == [(1, None), (2, None), (3, None)]
    want = edge.load(bundles / "clf-int8").step("x", xs[:3])[-1]
    np.testing.assert_array_equal(np.float32(got[-1]["y"]), want)
    now[0] += 10  # nothing waits now: a's last sample was 110 s ago, but applied 10 s ago
    assert p.tick() and "a" in p.engine.store


@pytest.mark.parametrize("evicted", [False, True], ids=["held", "evicted"])
def test_a_dropped_redelivery_of_applied_samples_is_not_reported_dropped(
    bundles, tmp_path, xs, evicted
):
    """drop-oldest sheds what waits; a redelivered copy of samples already predicted is not
    news, and saying "dropped" about them would contradict their prediction. An evicted
    stream keeps its numbering: such a copy was answered "dropped" when the stream was not
    held; as for a stream held, a resend is told it is a duplicate."""
    import dataclasses

    limits = {"capacity": 1, "max_batch": 1} if evicted else {}
    p = make(bundles, tmp_path, overload="drop-oldest", **limits)
    assert p.handle([msg("a", 1, xs[0]), msg("a", 2, xs[1]), *[msg("b", 1, xs[2])] * evicted])
    assert ("a" in p.engine.store) is not evicted
    answers(p)
    again = dataclasses.replace(msg("a", 2, xs[1]), redelivered=True)
    assert p.handle([], dropped=[again, msg("a", 1, xs[0]), msg("a", 3, xs[2])])
    errors = [json.loads(o.payload) for o in answers(p) if o.topic == "errors/a"]
    assert [(e["error"], e["seq"]) for e in errors] == [("duplicate", 1), ("dropped", 3)]
    assert p.metrics.counters["dropped_overload"] == 1


def test_the_reply_to_a_reset_of_an_evicted_stream_names_the_seq_it_expects(bundles, tmp_path, xs):
    """A reset without ``seq`` keeps the stream's numbering, an evicted stream's too, and
    the reply says which seq comes next: for an evicted stream it said none, and the sample
    after the one it had applied was then refused as a duplicate."""
    p = make(bundles, tmp_path, capacity=1, max_batch=1)
    assert p.handle([msg("a", 1, xs[0]), msg("a", 2, xs[1]), msg("b", 1, xs[2])])
    assert "a" not in p.engine.store
    answers(p)
    assert p.handle([Inbound("sensors/a/control", b'{"cmd": "reset"}', 0)])
    (reply,) = answers(p)
    assert json.loads(reply.payload)["next_seq"] == 3
    assert p.handle([msg("a", 2, xs[3]), msg("a", 3, xs[4])])
    got = [(o.topic, json.loads(o.payload).get("error")) for o in answers(p)]
    assert got == [("errors/a", "duplicate"), ("predictions/a", None)]


@pytest.mark.parametrize("when", ["running", "crash", "snapshot", "evicted", "sent again"])
def test_a_reset_naming_a_new_boot_lets_that_boot_number_from_its_first_message(
    bundles, tmp_path, xs, when
):
    """A rebooted device says so with ``{"cmd": "reset", "boot": B}`` and numbers from seq 1:
    the reset kept the last seq of its previous boot, and every sample of the new boot up to
    it was answered ``duplicate``, never stepped. A new boot's next message sets the baseline,
    as its first data message does; also replayed after a crash, from a snapshot, for an
    evicted stream and for a reset the broker sends again. A reset naming the current boot
    keeps the numbering."""
    import dataclasses

    p = make(bundles, tmp_path / "s", capacity=1, max_batch=1)
    assert p.handle([msg("a", s, xs[s], boot=7) for s in range(1, 6)])
    if when == "evicted":
        assert p.handle([msg("b", 1, xs[0])])
        assert "a" not in p.engine.store
    answers(p)
    reset = Inbound("sensors/a/control", b'{"cmd": "reset", "boot": 8}', 3)
    new_life = [msg("a", 1, xs[10], 4, boot=8), msg("a", 2, xs[11], 5, boot=8)]
    assert p.handle([reset])
    if when == "crash":
        p.journal.close()  # kill -9
        p = make(bundles, tmp_path / "s", capacity=1, max_batch=1)
    elif when == "snapshot":
        assert p.checkpoint()
        p.journal.close()
        p = make(bundles, tmp_path / "s", capacity=1, max_batch=1)
    replies = [json.loads(o.payload) for o in answers(p) if o.topic == "replies/a"]
    assert replies == [{"cmd": "reset", "ok": True, "next_seq": None, "boot": 8}]
    assert p.handle(new_life)
    if when == "sent again":  # our acknowledgements lost: the reset and what followed again
        again = [dataclasses.replace(m, redelivered=True) for m in [reset, *new_life]]
        assert p.handle(again)
    got = [(o.topic, json.loads(o.payload)) for o in answers(p) if o.topic != "replies/a"]
    want = edge.load(bundles / "clf-int8").step("x", xs[10:12])
    if when == "sent again":  # stepped again from the reset, as the first copies were
        want = np.concatenate([want, want])
    assert [t for t, _ in got] == ["predictions/a"] * len(want), got
    np.testing.assert_array_equal(np.float32([d["y"] for _, d in got]), want)
    # The current boot named again: the numbering is kept, seq 1 stays a duplicate.
    assert p.handle([Inbound("sensors/a/control", b'{"cmd": "reset", "boot": 8}', 0)])
    (reply,) = answers(p)
    assert json.loads(reply.payload)["next_seq"] == 3
    assert p.handle([msg("a", 2, xs[12], boot=8), msg("a", 3, xs[13], boot=8)])
    got = [(o.topic, json.loads(o.payload).get("error")) for o in answers(p)]
    assert got == [("errors/a", "duplicate"), ("predictions/a", None)]


@pytest.mark.parametrize("when", ["running", "crash", "evicted", "sent again"])
def test_a_reset_naming_a_boot_the_device_has_left_is_stale_and_changes_nothing(
    bundles, tmp_path, xs, when
):
    """A reset of boot 7 that came after boot 8 had begun (control and data are separate
    topics, a queued reset delivered late) made boot 7 current again: boot 8 was then an
    earlier boot, and its every later sample was answered ``stale``, never stepped. It is
    refused as the samples of a boot the device has left are (once: a copy the broker sends
    again was answered already); the live boot goes on from its state, also after a crash's
    replay and for an evicted stream."""
    import dataclasses

    p = make(bundles, tmp_path / "s", capacity=1, max_batch=1)
    assert p.handle([msg("a", s, xs[s], boot=7) for s in range(1, 4)])
    assert p.handle([msg("a", 1, xs[10], boot=8), msg("a", 2, xs[11], boot=8)])
    if when == "evicted":
        assert p.handle([msg("b", 1, xs[0])])
        assert "a" not in p.engine.store
    answers(p)
    late = Inbound("sensors/a/control", b'{"cmd": "reset", "boot": 7}', 3)
    assert p.handle([late])
    if when == "crash":
        p.journal.close()  # kill -9
        p = make(bundles, tmp_path / "s", capacity=1, max_batch=1)
    # (after a crash, the answers not acknowledged yet go out again with it)
    got = [json.loads(o.payload) for o in answers(p) if o.topic != "predictions/a"]
    assert [d["error"] for d in got] == ["stale"], got
    if when == "sent again":
        assert p.handle([dataclasses.replace(late, redelivered=True)])
        assert answers(p) == []
    assert p.handle([msg("a", 3, xs[12], boot=8), msg("a", 4, xs[13], boot=8)])
    got = [(o.topic, json.loads(o.payload)) for o in answers(p)]
    assert [t for t, _ in got] == ["predictions/a"] * 2, got
    # an evicted stream comes back from the zero state, as always, and says so
    evicted = when == "evicted"
    assert [d.get("restart", False) for _, d in got] == [evicted, False]
    model = edge.load(bundles / "clf-int8")
    want = model.step("x", xs[12:14]) if evicted else model.step("x", xs[10:14])[2:]
    np.testing.assert_array_equal(np.float32([d["y"] for _, d in got]), want)


def test_a_state_directory_still_read_only_stays_degraded_until_a_snapshot_is_written(
    bundles, small_disk, xs
):
    """A state directory that cannot be written (read-only, another user's) left the service
    degraded for one second: the next round of the service's loop, with nothing to log, said
    "writable again; resuming" and the status went back to online while nothing could be
    written (and, when a snapshot was due, degraded and online again every second). Only a
    write that succeeds ends it: a round's log entries, or the retry's new generation."""
    import subprocess

    p = make(bundles, small_disk / "state")
    assert p.handle([msg("s", 1, xs[0])])
    answers(p)
    assert p.tick()  # how far the answers are acknowledged: logged, nothing left to log
    p.journal.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        assert not p.handle([msg("s", 2, xs[1])])
        assert "Read-only file system" in p.degraded
        for _ in range(3):  # rounds of the service's loop with nothing to log
            p.tick()
            assert p.degraded is not None
        assert not p.checkpoint() and p.degraded is not None  # the storage retry
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert p.checkpoint() and p.degraded is None
    assert p.handle([msg("s", 2, xs[1])])
    assert [o.topic for o in answers(p)] == ["predictions/s"]


def test_a_degraded_state_names_the_errno_and_the_state_directory(bundles, small_disk, xs):
    """The degraded status said ``state_dir not writable: Read-only file system``: neither the
    error's name (as a search or an alert matches it) nor the directory (a host runs a
    ``serve`` per directory); only the service's log did."""
    import subprocess

    state = small_disk / "state"
    p = make(bundles, state)
    assert p.handle([msg("s", 1, xs[0])])
    p.journal.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        assert not p.handle([msg("s", 2, xs[1])])
        assert p.degraded == f"state_dir not writable: Read-only file system (EROFS) in {state}"
        assert not p.checkpoint()
        assert p.degraded == f"snapshot failed: Read-only file system (EROFS) in {state}"
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)


def test_a_removed_state_directory_is_noticed_and_written_out_again(bundles, tmp_path, xs):
    """rm -rf of the state directory under a running service: the next batch is not taken
    (nothing acknowledged into a file that is gone), and once the state is written out again
    a crash loses nothing."""
    import shutil

    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    assert p.handle([msg("s", 1, xs[0]), msg("s", 2, xs[1])])
    shutil.rmtree(state)
    assert not p.handle([msg("s", 3, xs[2])])  # the caller offers it again later
    assert "was removed" in p.degraded and p.journal.lost
    assert not p.handle([msg("s", 3, xs[2])])  # still refused: no silent new file
    p.journal.open()  # what the service's storage retry does
    assert p.checkpoint() and p.journal.lost is None
    assert p.handle([msg("s", 3, xs[2])]) and p.degraded is None
    got = {}
    for proc in (p, again := make(bundles, state)):  # a crash after seq 3: all is back
        if proc is again:
            assert again.handle([msg("s", 4, xs[3])])
        for o in answers(proc):
            if o.topic == "predictions/s":
                doc = json.loads(o.payload)
                got.setdefault(doc["seq"], doc["y"])  # republished ones are the same
    want = edge.load(bundles / "clf-int8").step("x", xs[:4])
    np.testing.assert_array_equal(np.asarray([got[q] for q in (1, 2, 3, 4)], np.float32), want)


def test_a_removed_state_directory_whose_rewrite_fails_is_a_loss_after_a_crash(
    bundles, tmp_path, xs
):
    """rm -rf of a state directory still at its first generation (no snapshot yet: the first
    day, by default), and the snapshot that would write the state out again fails (a full
    disk). The retry made a new wal-00000000.log, which after a crash read as the whole log
    from the start: every stream went on from the zero state without a restart flag."""
    import errno
    import shutil

    from edge.errors import SnapshotError

    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    assert p.handle([msg("s", 1, xs[0]), msg("s", 2, xs[1])])
    shutil.rmtree(state)
    assert not p.handle([msg("s", 3, xs[2])])

    def full(path, extra):
        raise SnapshotError(f"{path}: No space left on device") from OSError(
            errno.ENOSPC, "No space left on device"
        )

    p.engine.take_snapshot = full
    p.journal.open()  # what the service's storage retry does
    assert not p.checkpoint() and p.journal.lost
    p.journal.close()  # a crash
    again = make(bundles, state)
    assert again.handle([msg("s", 3, xs[2])])
    (prediction,) = [json.loads(o.payload) for o in answers(again) if o.topic == "predictions/s"]
    assert prediction["restart"] is True


def test_a_state_directory_of_a_later_version_is_refused_untouched(bundles, tmp_path, xs):
    """A rollback to this version after a later one wrote a snapshot format of its own: that
    snapshot was taken for damage, the state restored from an older generation (or none, the
    streams starting over), and the next checkpoints deleted the later version's files."""
    import hashlib

    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    for seq in (1, 2):
        assert p.handle([msg("s", seq, xs[seq])])
        assert p.checkpoint()
    p.journal.close()
    newest = state / "snap-00000002.bin"
    data = bytearray(newest.read_bytes())
    data[8:10] = (3).to_bytes(2, "little")  # what a later format version would write
    newest.write_bytes(bytes(data[:-32]) + hashlib.sha256(data[:-32]).digest())
    before = {f.name: f.read_bytes() for f in state.iterdir()}
    with pytest.raises(ConfigError, match="written by a later edge-lstm .*format version 3"):
        make(bundles, state)
    assert {f.name: f.read_bytes() for f in state.iterdir()} == before
    newest.write_bytes(bytes(data))  # the version field damaged: the digest says so
    assert make(bundles, state).engine.last_seq("s") == 2  # the older generation, and its log


def test_a_state_directory_of_another_model_is_refused_untouched(bundles, tmp_path, xs):
    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    assert p.handle([msg("s", 1, xs[0])])
    assert p.checkpoint()
    assert p.handle([msg("s", 2, xs[1])])
    p.journal.close()
    before = {f.name: f.read_bytes() for f in state.iterdir()}
    for other in ("reg2-int8", "torch-gru-int8"):  # another state layout; other features
        with pytest.raises(ConfigError, match="holds the state of another model"):
            make(bundles, state, model=str(bundles / other))
    assert {f.name: f.read_bytes() for f in state.iterdir()} == before
    right = make(bundles, state)  # the right bundle still finds it all
    right.journal.open()
    assert right.checkpoint()  # as a clean stop leaves it: snapshots, and no sample in the log
    right.journal.close()
    before = {f.name: f.read_bytes() for f in state.iterdir()}
    for other in ("reg2-int8", "torch-gru-int8"):  # the snapshot alone says whose it is
        with pytest.raises(ConfigError, match="whose state layout"):
            make(bundles, state, model=str(bundles / other))
    assert {f.name: f.read_bytes() for f in state.iterdir()} == before


def test_a_stream_evicted_for_capacity_says_restart_on_its_next_answer(bundles, tmp_path, xs):
    p = make(bundles, tmp_path, capacity=2, max_batch=1)
    flags = {}
    for stream, seq in (("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("b", 3)):
        assert p.handle([msg(stream, seq, xs[seq])])
        for o in answers(p):
            doc = json.loads(o.payload)
            flags[(stream, seq)] = doc.get("restart", False)
    # c pushed a out, a pushed b out: both start again from zero, and say so once
    assert flags == {
        ("a", 1): False,
        ("b", 1): False,
        ("c", 1): False,
        ("a", 2): True,
        ("b", 2): True,
        ("b", 3): False,
    }


def test_a_resend_after_an_eviction_is_a_duplicate_and_the_stream_goes_on(bundles, tmp_path, xs):
    """An evicted stream keeps its numbering: a sample it applied before is answered
    ``duplicate`` (it was stepped a second time from the zero state, and the next sample
    reported a gap), and its next sample restarts from zero without a gap."""
    p = make(bundles, tmp_path, capacity=2, max_batch=1)
    got = []
    for stream, seq in (("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("a", 2), ("a", 4)):
        assert p.handle([msg(stream, seq, xs[seq])])
        got += [(o.topic, json.loads(o.payload)) for o in answers(p)]
    assert [(t, d["seq"]) for t, d in got if t == "errors/a"] == [("errors/a", 2)]
    assert got[-2][1]["error"] == "duplicate"
    last = got[-1][1]
    assert (got[-1][0], last["seq"], last.get("restart"), last.get("gap")) == (
        "predictions/a",
        4,
        True,
        None,
    )


def test_held_messages_of_more_streams_than_capacity_step_in_parts(bundles, tmp_path, xs, caplog):
    """First messages of new streams wait ``reorder_ms``; released together they can bring
    more streams into one round than the state holds (``max_batch`` bounds a batch only):
    stepped in parts, each stream answered as by itself, no internal error."""
    now = [0.0]
    p = make(bundles, tmp_path, lambda: now[0], reorder_ms=500, capacity=4, max_batch=4)
    streams = [f"s{i}" for i in range(10)]
    for i in range(0, 10, 4):
        assert p.handle([msg(s, 1, xs[k]) for k, s in enumerate(streams[i : i + 4], i)])
    assert not answers(p) and len(p.reorder) == 10  # all waiting
    now[0] = 1.0
    assert p.tick()
    got = {o.topic: json.loads(o.payload) for o in answers(p)}
    assert sorted(got) == [f"predictions/{s}" for s in streams]
    one = edge.load(bundles / "clf-int8")
    for k, s in enumerate(streams):
        np.testing.assert_array_equal(np.float32(got[f"predictions/{s}"]["y"]), one.step(s, xs[k]))
    assert not p.metrics.errors and "failed to step" not in caplog.text


def test_every_stream_says_restart_when_a_fleet_larger_than_capacity_churns(bundles, tmp_path, xs):
    """Each returning stream evicts another one: a bounded list of evicted ids would lose the
    flags of the streams about to return before they do."""
    p = make(bundles, tmp_path, capacity=3, max_batch=1)
    streams = [f"s{i}" for i in range(12)]
    flags = {}
    for seq in (1, 2, 3):
        for stream in streams:
            assert p.handle([msg(stream, seq, xs[seq])])
            (o,) = answers(p)
            flags[(stream, seq)] = json.loads(o.payload).get("restart", False)
    assert [k for k, v in flags.items() if v] == [(s, q) for q in (2, 3) for s in streams]


def test_a_log_damaged_under_acknowledged_samples_makes_every_stream_say_restart(
    bundles, tmp_path, xs
):
    """The samples in a damaged span were acknowledged and are gone from the state: the
    streams go on from a state that lacks them, and their answers say so - the ones
    published again after the recovery (computed again on that state) and the next ones."""
    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    for i in range(10):
        assert p.handle([msg("a", i + 1, xs[i]), msg("b", i + 1, xs[i])])
    assert len(answers(p)) == 20  # sent, never acknowledged: published again after a crash
    p.journal.close()
    (log,) = state.glob("wal-*.log")
    data = bytearray(log.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\xde\xad\xbe\xef"
    log.write_bytes(bytes(data))
    again = make(bundles, state)
    again.journal.open()
    republished = [json.loads(o.payload) for o in answers(again)]
    assert 0 < len(republished) < 20 and all(d["restart"] for d in republished)
    assert again.handle([msg("a", 11, xs[10]), msg("b", 11, xs[10])])
    assert [json.loads(o.payload).get("restart") for o in answers(again)] == [True, True]


def _flags(p, batch):
    assert p.handle(batch)
    return [json.loads(o.payload).get("restart", False) for o in answers(p)]


def test_after_a_loss_of_unknown_streams_every_stream_new_to_the_state_says_restart(
    bundles, tmp_path, xs
):
    """No usable snapshot and a log that does not reach back to the start: a stream absent
    from the surviving log (its samples all before it) comes back from the zero state; it
    cannot be told from a new one, so both say restart, also after later restarts."""
    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    assert _flags(p, [msg("old", 1, xs[0]), msg("kept", 1, xs[0])]) == [False, False]
    assert p.checkpoint()
    assert _flags(p, [msg("kept", 2, xs[1])]) == [False]
    assert p.checkpoint()  # generation 2: the log of generation 1 is gone
    assert _flags(p, [msg("kept", 3, xs[2])]) == [False]
    p.journal.close()
    for snap in state.glob("snap-*.bin"):
        snap.write_bytes(b"garbage")
    again = make(bundles, state)
    again.journal.open()
    assert again.engine.last_seq("kept") == 3 and "old" not in again.engine.store
    answers(again)
    assert _flags(again, [msg("old", 2, xs[1])]) == [True]
    assert _flags(again, [msg("old", 3, xs[2]), msg("kept", 4, xs[3])]) == [False, True]
    assert _flags(again, [msg("new", 1, xs[0]), msg("new", 2, xs[1])]) == [True, False]
    assert again.checkpoint()
    again.journal.close()
    later = make(bundles, state)  # the flag outlives the recovery that set it
    later.journal.open()
    answers(later)  # those not acknowledged, published again
    assert _flags(later, [msg("other", 1, xs[0]), msg("kept", 5, xs[4])]) == [True, False]


def test_a_new_boots_backlog_with_a_refused_message_is_stepped_in_order(bundles, tmp_path, xs):
    """A device rebooted while its messages queued (the runtime down, or a worker's
    partition replayed after a takeover) and one of the new boot's messages was refused
    (NaN) at a seq past the old boot's last. Counted from that seq, the new boot's samples
    from there on were stepped first, as its beginning (``restart``), and all before them
    were answered ``late``: lost, and the rest computed from the wrong state."""
    now = [0.0]
    p = make(bundles, tmp_path, lambda: now[0], reorder_ms=600)
    for seq in range(1, 6):
        assert p.handle([msg("d", seq, xs[seq], boot=5)])
    now[0] = 1.0
    assert p.tick()
    answers(p)
    backlog = [msg("d", seq, xs[seq], boot=6) for seq in range(1, 12)]
    backlog[8] = Inbound("sensors/d/data", b'{"seq": 9, "values": [NaN], "boot": 6}')
    assert p.handle(backlog)
    now[0] = 2.0
    assert p.tick()
    got = [json.loads(o.payload) for o in answers(p)]
    assert [(d["seq"], d.get("error")) for d in got] == [
        (9, "not_finite"),
        *((seq, None) for seq in range(1, 9)),
        *((seq, None) for seq in (10, 11)),
    ]
    assert got[1].get("restart") and not any(d.get("restart") for d in got[2:])
    one = edge.load(bundles / "clf-int8")
    want = one.step("x", np.asarray([xs[s] for s in (*range(1, 9), 10, 11)]))
    np.testing.assert_array_equal(np.float32([d["y"] for d in got[1:]]), want)


def test_restart_flags_not_yet_taken_survive_a_restart(bundles, tmp_path, xs):
    """An evicted stream's flag, and a kept stream's flag after a damaged log, are in the
    snapshot: a restart of the runtime between the loss and the stream's return keeps them."""
    state = tmp_path / "state"
    p = make(bundles, state, capacity=2, max_batch=1)
    p.journal.open()
    for stream in ("a", "b", "c"):  # c pushes a out
        assert _flags(p, [msg(stream, 1, xs[0])]) == [False]
    assert p.checkpoint()
    p.journal.close()
    again = make(bundles, state, capacity=2, max_batch=1)
    again.journal.open()
    answers(again)
    assert _flags(again, [msg("b", 2, xs[1])]) == [False]
    assert _flags(again, [msg("a", 2, xs[1])]) == [True]  # evicted before the restart
    assert _flags(again, [msg("a", 3, xs[2])]) == [False]


def test_restart_flags_of_a_snapshot_written_before_the_fingerprint_table_are_taken(
    bundles, tmp_path, xs, monkeypatch
):
    """Snapshots held the flags of evicted streams as counts per hashed slot: an upgrade
    between a stream's eviction and its return keeps its flag."""
    from tests.test_restart_flags import legacy_table

    state = tmp_path / "state"
    p = make(bundles, state, capacity=2, max_batch=1)
    p.journal.open()
    for stream in ("a", "b", "c"):  # c pushes a out
        assert _flags(p, [msg(stream, 1, xs[0])]) == [False]
    monkeypatch.setattr(p._restarted, "export", lambda: legacy_table("a"))  # as written before
    assert p.checkpoint()
    p.journal.close()
    monkeypatch.undo()
    again = make(bundles, state, capacity=2, max_batch=1)
    again.journal.open()
    answers(again)
    assert _flags(again, [msg("new", 1, xs[1])]) == [False]
    assert _flags(again, [msg("a", 2, xs[1])]) == [True]
    assert again._restarted.pending == 2  # b and c, pushed out by new and a: fingerprints
    assert again.checkpoint()
    assert "slots" not in (again._restarted.export() or {})  # taken: not written again


def test_a_release_the_log_could_not_take_survives_the_checkpoint_that_follows(
    bundles, tmp_path, xs
):
    """A reorder expiry whose round the log could not take (its files removed under it) is
    logged after the checkpoint that writes the state out again; the record it releases must
    be carried into that checkpoint's segment, held, or a replay finds nothing to release and
    the sample (acknowledged long ago) is gone from the state."""
    import shutil

    state = tmp_path / "state"
    now = [0.0]
    cfg = config.load(
        None,
        env={},
        overrides={"model": str(bundles / "clf-int8"), "state_dir": str(state), "reorder_ms": 100},
    )
    p = Processor(open_engine(cfg), cfg, Journal(state), Metrics(), clock=lambda: now[0])
    p.recover()
    p.journal.open()
    assert p.handle([msg("s", 1, xs[0])])
    now[0] = 1.0
    assert p.tick() and p.engine.last_seq("s") == 1  # a first sample waits, then goes
    assert p.handle([msg("s", 3, xs[2])])  # waits for 2
    shutil.rmtree(state)
    now[0] = 2.0
    assert not p.tick()  # the expiry's round cannot be logged: still held, not applied
    assert p.engine.last_seq("s") == 1 and len(p.reorder) == 1
    p.journal.open()  # what the service's storage retry does
    assert p.checkpoint() and p.engine.last_seq("s") == 1
    crashed = make(bundles, state, lambda: now[0], reorder_ms=100)  # a crash now: held again
    assert crashed.engine.last_seq("s") == 1 and len(crashed.reorder) == 1
    crashed.journal.close()
    assert p.tick() and p.engine.last_seq("s") == 3  # released, logged, applied
    again = make(bundles, state, reorder_ms=100)  # a crash now: the replay has it too
    assert again.engine.last_seq("s") == 3


def test_streams_whose_every_sample_is_refused_leave_nothing_behind(bundles, tmp_path, xs):
    """A device whose first samples the engine refuses (values beyond the float32 range) never
    gets state: what the reorder buffer learnt of it must go too, or every such stream id ever
    heard stays in memory, and in every snapshot, for the life of the service."""
    now = [0.0]
    p = make(bundles, tmp_path, lambda: now[0], reorder_ms=500)
    huge = np.full(6, 1e300)
    for i in range(0, 40, 8):
        assert p.handle([msg(f"h{k}", 1, huge) for k in range(i, i + 8)])
    now[0] = 1.0
    assert p.tick()
    codes = {json.loads(o.payload)["error"] for o in answers(p)}
    assert codes == {"invalid_sample"} and p.metrics.errors["invalid_sample"] == 40
    assert not len(p.engine.store) and not len(p.reorder)
    assert p.reorder.export(p.engine.last_seq) == {}
    assert not p.reorder._next  # nothing kept per stream id
    # The stream starts as any new one when a usable sample comes, and answers it.
    assert p.handle([msg("h3", 2, xs[0])])
    now[0] = 2.0
    assert p.tick()
    (o,) = answers(p)
    assert o.topic == "predictions/h3" and json.loads(o.payload)["seq"] == 2


def test_a_restart_with_a_smaller_capacity_evicts_the_least_recently_used_streams(
    bundles, tmp_path, xs
):
    """``capacity`` lowered below the streams in the snapshot: the service starts (it used to
    refuse, exit 2, at every start: a restart loop under systemd), evicting the least
    recently used streams as it would have while running; they keep their numbering and say
    restart on their next answer."""
    state = tmp_path / "state"
    p = make(bundles, state, capacity=6, max_batch=1)
    p.journal.open()
    for k, stream in enumerate("abcdef"):
        assert p.handle([msg(stream, 1, xs[k])])
    assert p.handle([msg("a", 2, xs[6])])  # a is used again: b and c are the oldest now
    answers(p)
    assert p.checkpoint()
    p.journal.close()
    again = make(bundles, state, capacity=4, max_batch=1)
    assert sorted(again.engine.store.streams) == ["a", "d", "e", "f"]
    again.journal.open()
    answers(again)  # those not acknowledged before the restart
    assert again.handle([msg("b", 1, xs[1])])  # applied before the restart: still a duplicate
    (o,) = answers(again)
    assert o.topic == "errors/b" and json.loads(o.payload)["error"] == "duplicate"
    assert again.handle([msg("c", 2, xs[7])])
    (o,) = answers(again)
    doc = json.loads(o.payload)
    assert o.topic == "predictions/c" and doc["restart"] and "gap" not in doc
    assert again.handle([msg("a", 3, xs[8])])  # kept, with its state
    (o,) = answers(again)
    doc = json.loads(o.payload)
    assert o.topic == "predictions/a" and "restart" not in doc
    want = edge.load(bundles / "clf-int8").step("a", xs[[0, 6, 8]])[-1]
    np.testing.assert_array_equal(np.float32(doc["y"]), want)
    assert len(again.engine.store) == 4


def test_a_flood_of_resets_and_restarts_logs_a_bounded_number_of_lines(
    bundles, tmp_path, xs, caplog
):
    """Every reset and every device restart used to log a line of its own: a device resetting
    with each sample (or rebooting in a loop) filled the journal of the host, whose disk is
    often the state directory's. Like errors, the first few a minute are logged, the rest
    counted."""
    import logging

    caplog.set_level(logging.INFO, logger="edge.service")
    p = make(bundles, tmp_path)
    reset = json.dumps({"cmd": "reset"}).encode()
    for seq in range(1, 201):
        body = json.dumps({"seq": 1, "boot": seq, "values": xs[0].tolist()}).encode()
        assert p.handle([Inbound("sensors/d/control", reset), Inbound("sensors/d/data", body)])
    assert p.engine.counters.resets == 200 and p.engine.counters.restarts == 199
    lines = [r.getMessage() for r in caplog.records]
    assert 1 <= sum("reset by control message" in m for m in lines) <= 10
    assert 1 <= sum("restarted" in m for m in lines) <= 10


def _state_equal(p, stream, bundles, x):
    want = edge.load(bundles / "clf-int8")
    want.step(stream, x, seq=1)
    return all(
        np.array_equal(a, b) for a, b in zip(p.engine.state_of(stream), want.state_of(stream))
    )


@pytest.mark.parametrize(("before", "after"), [(500, 0), (0, 500)])
def test_a_restart_with_reordering_switched_replays_the_log_as_it_was_written(
    bundles, tmp_path, xs, before, after
):
    """A crash, and ``reorder_ms`` switched on or off before the restart: the log was written
    with the other setting, and replayed with the new one a sample the first run held and
    applied was dropped as late (or one it dropped as late was applied): the state no longer
    what the published answers were computed on, silently. The log is replayed as it was
    written; the new setting holds from a checkpoint on."""
    state = tmp_path / "state"
    now = [0.0]
    p = make(bundles, state, lambda: now[0], reorder_ms=before)
    p.journal.open()
    assert p.handle([msg("s", 1, xs[1])])
    now[0] = 1.0
    assert p.tick() and p.checkpoint()
    assert p.handle([msg("s", 3, xs[3])])  # held for 2 (reordering on), or applied at once
    assert p.handle([msg("s", 2, xs[2])])
    now[0] = 2.0
    assert p.tick()
    applied = xs[1:4] if before else xs[[1, 3]]  # with reordering off 2 came late: dropped
    assert _state_equal(p, "s", bundles, applied)
    for mid, _ in enumerate(answers(p), 1):
        p.outbox.acked(mid)
    assert p.tick()  # the broker's acknowledgements logged; then a crash
    again = make(bundles, state, lambda: now[0], reorder_ms=after)
    assert _state_equal(again, "s", bundles, applied)
    assert not answers(again)  # all acknowledged
    again.journal.open()
    assert again.handle([msg("s", 4, xs[4])])  # and on with the new setting
    (o,) = answers(again)
    assert o.topic == "predictions/s" and json.loads(o.payload)["seq"] == 4
    assert _state_equal(again, "s", bundles, np.concatenate([applied, xs[4:5]]))
    crash = make(bundles, state, lambda: now[0], reorder_ms=after)  # what it logged replays
    assert _state_equal(crash, "s", bundles, np.concatenate([applied, xs[4:5]]))
    assert again.checkpoint()  # the new setting from here on: 6 waits for 5, or goes at once
    assert again.handle([msg("s", 6, xs[6])])
    assert [json.loads(o.payload).get("gap") for o in answers(again)] == ([] if after else [1])
    crash = make(bundles, state, lambda: now[0], reorder_ms=after)
    assert crash.engine.last_seq("s") == again.engine.last_seq("s") == (4 if after else 6)
    assert len(crash.reorder) == len(again.reorder) == (1 if after else 0)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"gap_policy": "continue"}, {"gap_policy": "reject"}),
        ({"gap_policy": "reset"}, {"gap_policy": "continue"}),
        ({"restart_gap": 0}, {"restart_gap": 1}),
    ],
)
def test_a_restart_with_another_gap_setting_replays_the_log_as_it_was_written(
    bundles, tmp_path, xs, before, after
):
    """``gap_policy`` and ``restart_gap`` decide, as the log is replayed, what a sample does
    to its stream: changed before the restart after a crash, a replay applied what the first
    run had refused (or the reverse), leaving a state unlike the one the published answers
    were computed on. The log is replayed with the settings it was written with."""
    state = tmp_path / "state"
    p = make(bundles, state, **before)
    p.journal.open()
    assert p.checkpoint()
    for seq in (5, 7, 2):  # a gap, then a seq far behind
        assert p.handle([msg("s", seq, xs[seq])])
    for mid, _ in enumerate(answers(p), 1):
        p.outbox.acked(mid)
    assert p.tick()
    had = (p.engine.last_seq("s"), p.engine.state_of("s"))
    again = make(bundles, state, **after)  # after a crash
    assert again.engine.last_seq("s") == had[0]
    assert all(np.array_equal(a, b) for a, b in zip(again.engine.state_of("s"), had[1]))
    assert not answers(again)
    assert again.checkpoint()  # from here on the new setting
    assert {k: getattr(again.engine, k) for k in after} == after
    assert again.reorder.restart_gap == again.engine.restart_gap


def test_a_message_too_large_for_one_log_record_is_refused_not_logged_as_damage(
    bundles, tmp_path, xs, monkeypatch
):
    """A log record longer than the reader takes would be written, acknowledged, and read back
    at the next start as damage (every stream then says ``restart``): such a message (more than
    ~128 features at 65,535 samples with the record limit of 64 MiB) is refused instead. The
    limit is lowered here so that a small model reaches it."""
    from edge import wal

    monkeypatch.setattr(wal, "MAX_BODY", 8 * 6 * 100)
    p = make(bundles, tmp_path)
    big = np.repeat(xs[:1], 101, axis=0)
    assert p.handle([msg("a", 1, xs[0]), msg("a", 2, big), msg("b", 1, xs[1])])
    outs = answers(p)
    errs = [json.loads(o.payload) for o in outs if o.topic == "errors/a"]
    assert [(e["error"], e["seq"]) for e in errs] == [("too_many_samples", 2)]
    assert "log record" in errs[0]["detail"] and str(wal.MAX_BODY) in errs[0]["detail"]
    p.journal.close()
    base = {"model": str(bundles / "clf-int8"), "state_dir": str(tmp_path), "reorder_ms": 0}
    cfg = config.load(None, env={}, overrides=base)
    again = Processor(open_engine(cfg), cfg, Journal(tmp_path), Metrics())
    found = again.recover()
    assert found.damage == [] and not found.lost
    assert again.handle([msg("a", 3, xs[2])])
    docs = [json.loads(o.payload) for o in answers(again) if o.topic == "predictions/a"]
    (doc,) = [d for d in docs if d["seq"] == 3]
    assert not doc.get("restart")
    want = edge.load(bundles / "clf-int8").step("x", xs[[0, 2]])[-1]
    np.testing.assert_array_equal(np.asarray(doc["y"], np.float32), want)


@pytest.mark.parametrize("removable", [True, False], ids=["removed", "cannot-be-removed"])
def test_a_checkpoint_whose_directory_fsync_fails_loses_nothing_logged_after_it(
    bundles, tmp_path, xs, monkeypatch, removable
):
    """The snapshot is renamed into place before the directory is fsynced: when that fsync
    fails (EIO on a worn SD card) the checkpoint fails and the log goes on in the segment
    before it, but the new snapshot stayed. A restart then took it for the newest state, found
    its segment missing, and lost every acknowledged sample logged after the failure. A
    snapshot that cannot be removed either stands: the log goes on in its segment."""
    import errno
    import stat
    from pathlib import Path

    from edge import snapshot

    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    for i in range(3):
        assert p.handle([msg("a", i + 1, xs[i])])
    real = os.fsync

    def failing(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    def stuck(path, missing_ok=False):
        if path.name.startswith("snap-"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        real_unlink(path, missing_ok=missing_ok)

    real_unlink = Path.unlink
    monkeypatch.setattr(snapshot.os, "fsync", failing)
    if not removable:
        monkeypatch.setattr(Path, "unlink", stuck)
    assert not p.checkpoint() and p.degraded
    monkeypatch.setattr(snapshot.os, "fsync", real)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    for i in range(3, 6):  # logged, so acknowledged to the broker
        assert p.handle([msg("a", i + 1, xs[i])])
    had = p.engine.state_of("a")
    p.journal.close()  # kill -9 here
    again = make(bundles, state)
    assert again.engine.last_seq("a") == 6
    assert all(np.array_equal(a, b) for a, b in zip(again.engine.state_of("a"), had))


def test_a_replay_evicts_the_streams_the_run_before_the_crash_evicted(bundles, tmp_path, xs):
    """A batch in which a stream sends twice leaves it the most recently used, as stepping its
    messages one by one does. The log was replayed message by message while the batches were
    stepped whole, which leave the streams in the order they first appear: at capacity, a
    replay after a crash evicted another stream than the run had (one kept its state, the
    other lost it), and the answers it published again differed from the first ones."""
    state = tmp_path / "state"
    p = make(bundles, state, capacity=3, max_batch=3)
    p.journal.open()
    assert p.handle([msg("a", 1, xs[0]), msg("b", 1, xs[1]), msg("c", 1, xs[2])])
    assert p.handle([msg("a", 2, xs[3]), msg("b", 2, xs[4]), msg("a", 3, xs[5])])
    assert p.handle([msg("d", 1, xs[6])])
    assert p.handle([msg("e", 1, xs[7])])  # evicts the two least recently used
    had = {s: (p.engine.last_seq(s), p.engine.state_of(s)) for s in p.engine.store.streams}
    first = answers(p)
    p.journal.close()  # kill -9 here: nothing acknowledged, every answer is published again
    again = make(bundles, state, capacity=3, max_batch=3)
    assert sorted(again.engine.store.streams) == sorted(had)
    for s, (seq, st) in had.items():
        assert again.engine.last_seq(s) == seq
        assert all(np.array_equal(a, b) for a, b in zip(again.engine.state_of(s), st))
    assert sorted((o.topic, o.payload) for o in answers(again)) == sorted(
        (o.topic, o.payload) for o in first
    )


def test_a_batch_offered_again_after_a_failed_log_write_is_counted_once(
    bundles, tmp_path, xs, monkeypatch
):
    """A batch the log could not take is offered again (a full disk, a file size limit): its
    messages, samples and the refusals decided as it was read were counted at each offer,
    so ``messages_in``, ``samples_in`` and ``errors`` grew with every retry."""
    import errno

    p = make(bundles, tmp_path)
    p.journal.open()
    batch = [msg("a", 1, xs[0]), Inbound("sensors/b/data", b"{oops", 0)]
    failing_appends(p, monkeypatch, 2, OSError(errno.EFBIG, "File too large"))
    assert not p.handle(batch) and not p.handle(batch)
    assert p.handle(batch)
    snap = p.metrics.snapshot()
    assert (snap["messages_in"], snap["samples_in"], snap["errors"]) == (2, 1, {"bad_json": 1})


def test_a_reload_in_a_batch_the_log_could_not_take_waits_until_the_batch_is_taken(
    bundles, tmp_path, xs, monkeypatch
):
    """A batch the log refused is offered again later, and a ``reload`` command in it acts
    once the batch is taken, after the samples before it. It was asked at the first offer:
    the service reloaded then, and read those samples, offered again, with the new model
    (refused ``wrong_shape`` when it takes another feature count); and reloaded again."""
    import errno

    p = make(bundles, tmp_path)
    p.journal.open()
    batch = [msg("a", 1, xs[0]), Inbound(p.runtime_control, b'{"cmd": "reload"}', 0)]
    failing_appends(p, monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    assert not p.handle(batch)
    assert "reload" not in p.requests
    assert p.handle(batch)
    assert "reload" in p.requests
    assert [o.topic for o in answers(p)] == ["predictions/a"]


def test_a_snapshot_this_user_may_not_read_is_refused_not_taken_for_damage(
    bundles, tmp_path, xs, monkeypatch
):
    """Snapshots are written 0600: run once as root (``sudo``), a state directory's snapshots
    are root's, and the service user cannot read them. That was taken for damage: the state
    came from a log that did not reach back (every stream restarted), and the next
    checkpoints deleted the snapshots holding it. The start is refused, naming the file."""
    import errno
    from pathlib import Path

    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    for i in range(3):
        assert p.handle([msg("a", i + 1, xs[i])])
        assert p.checkpoint()
    p.journal.close()
    real = os.open

    def denied(path, *args, **kwargs):
        if Path(path).name.startswith("snap-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ConfigError, match="snap-00000003.bin.*Permission denied"):
        make(bundles, state)
    monkeypatch.setattr(os, "open", real)
    assert make(bundles, state).engine.last_seq("a") == 3


def test_a_failed_log_write_that_cannot_be_cut_off_is_never_replayed(
    bundles, tmp_path, xs, monkeypatch
):
    """A write the disk cut short is cut back off the log; when that fails too (the card
    turned read-only after the error, then came back), what the failed write had put in the
    log stayed there. The batch was offered again and logged after it: a replay after a crash
    stepped the intact part of the first copy and then the whole second one, answering its
    samples as duplicates the run never answered, and a reset in it twice. Nothing is
    appended after such a remnant: the next checkpoint starts a new segment first."""
    import errno

    from edge import journal

    state = tmp_path / "state"
    p = make(bundles, state)
    p.journal.open()
    assert p.handle([msg("a", 1, xs[0])])
    for mid, _ in enumerate(answers(p), 1):
        p.outbox.acked(mid)
    assert p.tick()
    real_write, real_truncate = os.write, os.ftruncate

    def half(fd, data):  # the first frames reach the file, then the disk fails
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.EIO, "Input/output error")

    def no_cut(fd, size):
        raise OSError(errno.EROFS, "Read-only file system")

    batch = [msg("a", 2, xs[1]), msg("b", 1, xs[2]), msg("c", 1, xs[3]), msg("d", 1, xs[4])]
    monkeypatch.setattr(journal.os, "write", half)
    monkeypatch.setattr(journal.os, "ftruncate", no_cut)
    assert not p.handle(batch)
    monkeypatch.setattr(journal.os, "write", real_write)
    monkeypatch.setattr(journal.os, "ftruncate", real_truncate)
    while not p.handle(batch):  # offered again until it is logged
        assert p.journal.lost and p.degraded
        p.checkpoint()
    first = answers(p)
    p.journal.close()  # kill -9 here
    again = make(bundles, state)
    assert sorted((o.topic, o.payload) for o in answers(again)) == sorted(
        (o.topic, o.payload) for o in first
    )


def test_a_periodic_checkpoint_of_an_idle_service_writes_nothing(bundles, tmp_path, xs):
    """An idle gateway wrote the same snapshot (hundreds of KB once streams were evicted) every
    ``snapshot_interval``, day and night, wearing its SD card out. With nothing logged since
    the last checkpoint, a periodic one writes nothing (and the state counts as saved); one
    asked for, or one after anything was logged, is written."""
    p = make(bundles, tmp_path)
    assert p.handle([msg("a", 1, xs[0])])
    assert p.checkpoint(if_changed=True)
    gen = p.journal.generation
    files = sorted(f.name for f in tmp_path.iterdir())
    for _ in range(3):
        assert p.checkpoint(if_changed=True)
    assert p.journal.generation == gen and sorted(f.name for f in tmp_path.iterdir()) == files
    assert p.handle([msg("a", 2, xs[1])])
    assert p.checkpoint(if_changed=True) and p.journal.generation == gen + 1
    assert p.checkpoint() and p.journal.generation == gen + 2  # asked for: written


def test_a_release_the_log_could_not_take_replays_as_the_run_applied_it_after_a_checkpoint(
    bundles, tmp_path, xs
):
    """A reorder expiry whose round the log could not take (a full disk), then a checkpoint,
    then a crash: the released record was carried into the new segment with the buffer's
    expectation already past it, so the replay stepped it at once, before that round's idle
    evictions; at capacity that evicted another stream than the run had (x1 lost its state
    in the replay only). The buffer is put back as it was when the write fails: the release
    is decided again by a later round, logged, and replayed in the same order."""
    import errno

    state = tmp_path / "state"
    now = [0.0]
    opts = {"capacity": 3, "max_batch": 3, "idle_timeout": 60, "reorder_ms": 100}
    p = make(bundles, state, lambda: now[0], **opts)
    p.engine.store._clock = lambda: now[0]
    p.journal.open()
    assert p.handle([msg("x1", 1, xs[0]), msg("x2", 1, xs[1])])
    now[0] = 0.2
    assert p.tick()  # first messages wait, then go: x1 and x2 last seen at 0.2
    now[0] = 30.0
    assert p.handle([msg("y", 1, xs[2])])
    now[0] = 30.2
    assert p.tick()
    now[0] = 60.1
    assert p.handle([msg("s", 1, xs[3])])  # a new stream: its first message waits
    now[0] = 60.15
    assert p.handle([msg("x1", 3, xs[4])])  # waits for 2
    now[0] = 60.22  # s's wait is over; x1 and x2 are idle (x1 is kept: it holds a message)
    real = p.journal.append

    def full(entries, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    p.journal.append = full
    assert not p.tick()
    p.journal.append = real
    assert p.checkpoint()
    assert p.tick()
    assert sorted(p.engine.store.streams) == ["s", "x1", "y"]
    had = {s: (p.engine.last_seq(s), p.engine.state_of(s)) for s in p.engine.store.streams}
    p.journal.close()  # kill -9
    again = make(bundles, state, **opts)
    assert sorted(again.engine.store.streams) == sorted(had)
    for s, (seq, st) in had.items():
        assert again.engine.last_seq(s) == seq
        assert all(np.array_equal(a, b) for a, b in zip(again.engine.state_of(s), st))


def test_a_refused_first_message_of_a_new_boot_does_not_make_the_next_wait_after_a_restart(
    bundles, tmp_path, xs
):
    """The first message of a device's new boot that the engine refuses (values beyond the
    float32 range) leaves the reorder buffer in the new boot, the engine in the old one. The
    buffer's boot ids were not in snapshots: after a restart the boot's next message began a
    new life again and waited ``reorder_ms`` instead of being answered at once, as it is by a
    service that did not restart."""

    def boot_msg(boot, seq, row):
        body = {"seq": seq, "boot": boot, "values": np.asarray(row).tolist()}
        return Inbound("sensors/s/data", json.dumps(body).encode(), 0)

    now = [0.0]
    state = tmp_path / "state"
    p = make(bundles, state, lambda: now[0], reorder_ms=500)
    p.journal.open()
    assert p.handle([boot_msg(7, 1, xs[0])])
    now[0] = 1.0
    assert p.tick() and p.engine.boots("s")[0] == 7
    answers(p)
    assert p.handle([boot_msg(8, 1, np.full(6, 1e300))])  # a new boot: its first waits
    now[0] = 2.0
    assert p.tick()
    (o,) = answers(p)
    assert json.loads(o.payload)["error"] == "invalid_sample" and p.engine.boots("s")[0] == 7
    assert p.checkpoint()
    p.journal.close()
    again = make(bundles, state, lambda: now[0], reorder_ms=500)
    again.journal.open()
    answers(again)
    assert again.handle([boot_msg(8, 2, xs[1])])
    got = [json.loads(o.payload) for o in answers(again)]
    assert [(d.get("seq"), d.get("boot")) for d in got] == [(2, 8)] and "y" in got[0]


def test_a_redelivery_of_a_sample_of_an_earlier_boot_is_not_reported_stale(bundles, tmp_path, xs):
    """The broker sends messages again (DUP) when our acknowledgements did not reach it (a
    restart of the broker, a reconnect): copies of samples predicted already. One of a boot
    the device has left since was answered ``stale`` as well, a second answer contradicting
    its prediction (thousands of them after a broker restart under a backlog), where a copy of
    the current boot is not reported ``duplicate``. A device that resends it is told."""
    import dataclasses

    def boot_msg(boot, seq, row, mid):
        body = {"seq": seq, "boot": boot, "values": np.asarray(row).tolist()}
        return Inbound("sensors/s/data", json.dumps(body).encode(), mid)

    p = make(bundles, tmp_path, overload="drop-oldest")
    first = [boot_msg(1, 1, xs[0], 1), boot_msg(1, 2, xs[1], 2), boot_msg(2, 0, xs[2], 3)]
    assert p.handle(first)
    got = [json.loads(o.payload) for o in answers(p)]
    assert [(d["seq"], d["boot"], "y" in d) for d in got] == [
        (1, 1, True),
        (2, 1, True),
        (0, 2, True),
    ]
    again = [dataclasses.replace(m, redelivered=True) for m in first]
    assert p.handle([*again, boot_msg(2, 1, xs[3], 4)])
    got = [json.loads(o.payload) for o in answers(p)]
    assert [(d["seq"], d["boot"], "y" in d) for d in got] == [(1, 2, True)]
    assert p.handle([boot_msg(1, 2, xs[1], 5)])  # the device itself: told
    (o,) = answers(p)
    assert o.topic == "errors/s" and json.loads(o.payload)["error"] == "stale"
    assert p.handle([], dropped=again[:2])  # shed under overload: not news either
    assert answers(p) == [] and p.metrics.counters["dropped_overload"] == 0


def test_a_sample_shed_under_overload_is_not_waited_for(bundles, tmp_path, xs):
    """drop-oldest sheds the oldest samples to keep up with fresh ones; the sample after a
    shed one waited ``reorder_ms`` for it all the same (it never comes: it was answered
    ``dropped``), so every stream that lost a sample answered its fresh ones late."""
    now = [0.0]
    p = make(bundles, tmp_path, lambda: now[0], overload="drop-oldest", reorder_ms=600)
    assert p.handle([msg("a", 1, xs[0])]) and p.tick(release_all=True)
    answers(p)
    assert p.handle([msg("a", 3, xs[2])], dropped=[msg("a", 2, xs[1])])
    got = [(o.topic, json.loads(o.payload)) for o in answers(p)]
    assert [(t, d["seq"], d.get("error"), d.get("gap")) for t, d in got] == [
        ("errors/a", 2, "dropped", None),
        ("predictions/a", 3, None, 1),
    ]
    assert len(p.reorder) == 0


@pytest.mark.parametrize("policy", ["continue", "reset"])
def test_an_answer_after_a_gap_says_restart_when_the_gap_policy_reset_zeroed_the_state(
    bundles, tmp_path, xs, policy
):
    """Both answers say ``gap``: how many samples are missing. Only with ``gap_policy =
    "reset"`` was the prediction computed from the zero state, and then it says ``restart``
    as every other answer computed from the zero state of a stream that had one."""
    p = make(bundles, tmp_path / "state", gap_policy=policy)
    assert p.handle([msg("s", 1, xs[1])]) and p.handle([msg("s", 4, xs[4])])
    docs = [json.loads(o.payload) for o in answers(p)]
    got = [(d["seq"], d.get("gap"), d.get("restart")) for d in docs]
    assert got == [(1, None, None), (4, 2, True if policy == "reset" else None)]
    fresh = edge.load(bundles / "clf-int8").step("x", xs[4])
    assert np.array_equal(docs[1]["y"], fresh.tolist()) == (policy == "reset")


def test_samples_replayed_after_a_crash_are_not_counted_as_end_to_end_latency(
    bundles, tmp_path, xs
):
    """The log replayed at a start after a crash computes again answers published minutes or
    hours before: their device ``ts`` is as old as the outage, and each was observed as an
    end-to-end latency that long (a power cut of ten minutes: p99 of ten minutes)."""
    cfg = config.load(
        None,
        env={},
        overrides={"model": str(bundles / "clf-int8"), "state_dir": str(tmp_path), "reorder_ms": 0},
    )
    wall = [1_800_000_000.0]

    def processor():
        p = Processor(open_engine(cfg), cfg, Journal(tmp_path), Metrics(), wall=lambda: wall[0])
        p.recover()
        return p

    p = processor()
    body = [
        json.dumps({"seq": i + 1, "ts": wall[0] - 0.02, "values": xs[i].tolist()}) for i in range(5)
    ]
    assert p.handle([Inbound("sensors/a/data", b.encode(), i + 1) for i, b in enumerate(body)])
    assert p.metrics.e2e_latency.count == 5 and p.metrics.e2e_latency.max < 0.1
    p.journal.close()  # kill -9, back ten minutes later
    wall[0] += 600.0
    again = processor()
    assert again.engine.last_seq("a") == 5
    assert again.metrics.e2e_latency.count == 0
    again.journal.close()


def test_samples_whose_answers_a_predecessor_sent_are_not_counted_as_latency(bundles, tmp_path, xs):
    """A worker that takes a partition over steps again the messages after its snapshot; the
    answers up to its predecessor's mark went out before (seconds to minutes ago) and are not
    sent again, yet each was observed as an end-to-end latency of the takeover's length."""
    cfg = config.load(
        None,
        env={},
        overrides={"model": str(bundles / "clf-int8"), "state_dir": str(tmp_path), "reorder_ms": 0},
    )
    wall = [1_800_000_000.0]
    p = Processor(
        open_engine(cfg), cfg, Journal(tmp_path), Metrics(), wall=lambda: wall[0], lsn_from_mid=True
    )
    p.recover()
    p.sent_before = 3  # the predecessor's answered mark
    wall[0] += 30.0  # the takeover took this long after the samples were sent
    body = [
        json.dumps({"seq": i + 1, "ts": wall[0] - 30.0, "values": xs[i].tolist()}) for i in range(5)
    ]
    assert p.handle([Inbound("sensors/a/data", b.encode(), i + 1) for i, b in enumerate(body)])
    assert p.engine.last_seq("a") == 5
    assert p.metrics.e2e_latency.count == 2  # seq 4 and 5: answered now, 30 s late
    p.journal.close()


@pytest.mark.parametrize(
    "records, said",
    [
        ({"reorder": -1}, "reorder in the snapshot unreadable"),
        ({"reorder": {"a": 1}}, "reorder in the snapshot unreadable"),
        ({"reorder_boots": {"a": [float("inf"), []]}}, "reorder_boots in the snapshot unreadable"),
        ({"restart": -1}, "restart flags in the snapshot unreadable"),
        (
            {"resets": [[float("inf"), "a", 1, None, False, None, 1]]},
            "resets in the snapshot unreadable",
        ),
    ],
)
def test_a_snapshot_whose_processor_records_are_unreadable_still_starts(
    bundles, tmp_path, caplog, records, said
):
    """An intact snapshot (its digest made again after an edit, or another writer's) whose
    records of the reorder buffer, restart flags or resets were of another shape stopped the
    start with an AttributeError, TypeError or OverflowError. Each is now logged and left out,
    as a record of a later version is, and the service answers."""
    from tests.test_snapshot_format import resigned

    state = tmp_path / "state"
    p = make(bundles, state)
    p.handle([msg("a", 1, np.zeros(6)), msg("a", 3, np.zeros(6))])
    assert p.checkpoint()
    p.journal.close()
    snap = sorted(state.glob("snap-*.bin"))[-1]
    edit = lambda h: {**h, "extra": {**h["extra"], **records}}  # noqa: E731
    snap.write_bytes(resigned(snap.read_bytes(), edit))
    again = make(bundles, state)
    assert said in caplog.text
    again.handle([msg("b", 1, np.zeros(6))])
    again.tick(release_all=True)
    assert any(o.topic == "predictions/b" for o in answers(again))


@pytest.mark.desktop  # a model made to overflow (build_bundles.make_overflowing): XNNPACK
def test_a_sample_the_float_model_overflows_on_is_reported_and_the_stream_goes_on(
    bundles, tmp_path
):
    """3e38 passes the input checks of the model but overflows its arithmetic: it was
    answered NaN, and so was every later sample of the device (its state was NaN)."""
    p = make(bundles, tmp_path, model=str(bundles / "overflow-float32"))
    ref = edge.load(bundles / "overflow-float32")
    x = np.random.default_rng(5).normal(0, 2, (3, 3))
    assert p.handle([msg("s", 1, x[0]), msg("s", 2, [3e38, 0, 0])])
    ok, refused = [json.loads(o.payload) for o in answers(p)]
    assert ok["seq"] == 1 and np.isfinite(ok["y"]).all()
    assert refused["seq"] == 2 and refused["error"] == "invalid_sample"
    assert "overflowed" in refused["detail"] and p.metrics.errors["invalid_sample"] == 1
    assert p.handle([msg("s", 2, x[1])])  # sent again with usable values: answered
    (o,) = [json.loads(o.payload) for o in answers(p)]
    ref.step("s", x[0], seq=1)
    np.testing.assert_allclose(o["y"], ref.step("s", x[1], seq=2), rtol=1e-6)


def test_a_new_boot_waiting_while_its_stream_is_evicted_replays_as_it_ran(bundles, tmp_path, xs):
    """A device's new boot waits ``reorder_ms``; a late message of its earlier boot waits
    behind it, to be answered stale once the new boot has begun. Its stream evicted from the
    engine meanwhile (``capacity``), a checkpoint did not keep that the new boot was waiting
    to begin: replayed after a crash, the earlier boot's message went to the engine at once,
    which took the stream up again in that boot, and the new boot's samples were stepped
    against it: their answers, published again, differed from the ones published before."""

    now = [0.0]
    state = tmp_path / "state"
    opts = {"reorder_ms": 500, "capacity": 2, "max_batch": 2}
    p = make(bundles, state, lambda: now[0], **opts)
    p.journal.open()
    assert p.handle([reset_to_1("s"), msg("s", 1, xs[0:2], boot=7)])  # answered at once
    assert p.handle([msg("s", 1, xs[2:4], boot=8)])  # a new boot: its first waits
    assert p.handle([reset_to_1("a"), msg("a", 1, xs[4]), reset_to_1("b"), msg("b", 1, xs[5])])
    assert "s" not in p.engine.store  # evicted while its new boot waits
    assert p.handle([msg("s", 3, xs[6], boot=7)])  # late, of the boot before: waits behind
    assert p.checkpoint()
    answers(p)
    now[0] = 1.0
    assert p.tick()
    ran = {(o.lsn, o.topic): o.payload for o in answers(p)}
    assert [json.loads(ran[k]).get("error") for k in sorted(ran)] == [None, "stale"]
    p.journal.close()
    again = make(bundles, state, lambda: now[0], **opts)  # a crash: the answers go out again
    again.journal.open()
    republished = {(o.lsn, o.topic): o.payload for o in answers(again)}
    assert {k: republished.get(k) for k in ran} == ran
    assert all(
        np.array_equal(a, b) for a, b in zip(p.engine.state_of("s"), again.engine.state_of("s"))
    )


def test_a_new_boot_of_an_evicted_stream_waits_before_a_late_message_of_the_boot_before(
    bundles, tmp_path, xs
):
    """An evicted stream keeps its boot. The reorder buffer asked the engine, which knew only
    the streams it held: a new boot of an evicted stream was not told from its first message,
    a late message of the boot before went to the engine at once and was stepped (the stream
    taken up again in that boot), and the new boot's first sample, which had arrived before
    it, was then dropped as late. As for a stream held, the late one is answered stale."""

    now = [0.0]
    p = make(bundles, tmp_path, lambda: now[0], reorder_ms=500, capacity=2, max_batch=2)
    assert p.handle([reset_to_1("s"), msg("s", 1, xs[0:2], boot=7)])
    assert p.handle([reset_to_1("a"), msg("a", 1, xs[4]), reset_to_1("b"), msg("b", 1, xs[5])])
    assert "s" not in p.engine.store  # evicted, its numbering and boot kept
    answers(p)
    assert p.handle([msg("s", 1, xs[2:4], boot=8)])  # a new boot: its first waits
    assert p.handle([msg("s", 3, xs[6], boot=7)])  # late, of the boot before
    now[0] = 1.0
    assert p.tick()
    got = [json.loads(o.payload) for o in answers(p)]
    assert [(d["seq"], d.get("error"), d.get("restart"), d["boot"]) for d in got] == [
        (1, None, True, 8),
        (3, "stale", None, 7),
    ]
    np.testing.assert_array_equal(got[0]["y"], edge.load(bundles / "clf-int8").step("x", xs[2:4]))


def test_the_earlier_boots_of_a_stream_evicted_while_it_waits_survive_a_restart(
    bundles, tmp_path, xs
):
    """An evicted stream keeps only its current boot in the engine; the reorder buffer, which
    holds a message of it past a gap, knows its earlier ones too, and a snapshot keeps them,
    so that after a restart a late message of one of them (a random nonce, not just below
    the current boot) is told as before."""

    now = [0.0]
    state = tmp_path / "state"
    opts = {"reorder_ms": 500, "capacity": 1, "max_batch": 1}
    p = make(bundles, state, lambda: now[0], **opts)
    p.journal.open()
    assert p.handle([msg("s", 1, xs[0], boot=1000)])
    now[0] = 1.0
    assert p.tick() and p.handle([msg("s", 1, xs[1], boot=50_000)])  # rebooted: a new nonce
    now[0] = 2.0
    assert p.tick() and p.engine.boots("s") == (50_000, [1000])
    assert p.handle([msg("s", 3, xs[2], boot=50_000)])  # past a gap: waits
    assert p.handle([reset_to_1("b")])
    assert p.handle([msg("b", 1, xs[3])]) and "s" not in p.engine.store
    assert p.checkpoint()
    p.journal.close()
    again = make(bundles, state, lambda: now[0], **opts)
    assert again.reorder._boots["s"] == p.reorder._boots["s"] == (50_000, [1000])

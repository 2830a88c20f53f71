"""Crash consistency of the decode -> log -> step -> answer path, without a broker: a stream
of messages with duplicates, reordering, reboots and refused payloads goes through processors
that are killed at random points (no shutdown, nothing flushed but the log) and recovered from
the same state directory. Every (stream, boot, seq) must be answered with one y only, nothing
may go missing, and without reordering (whose waits depend on the clock) the answers are the
ones of an uninterrupted run."""

import dataclasses
import json
import os
import random

import numpy as np
import pytest

from edge import config
from edge.journal import Journal
from edge.metrics import Metrics
from edge.mqtt_loop import open_engine
from edge.processor import Inbound, Processor


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(bundles, state, clock, **overrides):
    cfg = config.load(
        None,
        env={},
        overrides={
            "model": str(bundles / "clf-int8"),
            "state_dir": str(state),
            "reorder_ms": 200,
            **overrides,
        },
    )
    p = Processor(open_engine(cfg), cfg, Journal(state), Metrics(), clock=clock)
    p.recover()
    return p


def traffic(seed, streams=4, n=400):
    """Device messages: 1-3 samples, duplicates, local reordering, reboots, resets, garbage."""
    rng = random.Random(seed)
    xs = np.random.default_rng(seed).normal(0, 2, (streams, 5000, 6))
    msgs, pos, valid = [], [0] * streams, set()
    state = [
        {"boot": rng.randrange(2**32 - 100), "seq": rng.randrange(1, 100)} for _ in range(streams)
    ]
    for _ in range(n):
        i = rng.randrange(streams)
        st = state[i]
        if rng.random() < 0.02:
            st["boot"] += 1
            st["seq"] = 1
        k = rng.choice([1, 1, 2, 3])
        vals = xs[i, pos[i] : pos[i] + k]
        pos[i] += k
        body = {"seq": st["seq"], "boot": st["boot"], "values": vals.tolist()}
        st["seq"] += k
        payload = json.dumps(body).encode()
        keys = {(f"d{i}", st["boot"], (st["seq"] - k + j) % 2**32) for j in range(k)}
        if rng.random() < 0.03:
            payload = payload[:-7]  # refused: answered bad_json, its seq never comes
        elif rng.random() < 0.03:
            body["values"] = [[float("nan")] * 6] * k  # refused, seq known: not waited for
            payload = json.dumps(body).encode()
        else:
            valid |= keys
        msgs.append(Inbound(f"sensors/d{i}/data", payload, len(msgs) + 1))
        if rng.random() < 0.05:
            msgs.append(Inbound(f"sensors/d{i}/data", payload, len(msgs) + 1))  # duplicate
        if rng.random() < 0.03:  # numbering kept: a redelivered copy must not zero it again
            msgs.append(Inbound(f"sensors/d{i}/control", b'{"cmd": "reset"}', len(msgs) + 1))
    for j in range(len(msgs) - 1):  # local reordering
        if rng.random() < 0.08:
            msgs[j], msgs[j + 1] = msgs[j + 1], msgs[j]
    return msgs, valid


def predictions(outs, into):
    """(stream, boot, seq) -> the set of y bytes answered; errors: (stream, None, seq) -> code."""
    for o in outs:
        d = json.loads(o.payload)
        stream = o.topic.split("/", 1)[1]
        if o.topic.startswith("predictions/"):
            ys = np.asarray(d["y"]).reshape(-1, 4)
            for k, y in enumerate(ys):
                into.setdefault((stream, d.get("boot"), d["seq"] + k), set()).add(y.tobytes())
        elif d.get("seq") is not None:
            for k in range(d.get("count", 1)):
                into.setdefault((stream, None, d["seq"] + k), set()).add(d["error"])


class Disk:
    """The journal's writes fail while ``full`` (as on a full disk: OSError, nothing written)."""

    def __init__(self, enabled=False):
        self.full = False
        self.enabled = enabled

    def attach(self, p):
        real = p.journal.append

        def append(entries, **kw):
            if self.full:
                raise OSError(28, "No space left on device")
            real(entries, **kw)

        p.journal.append = append
        checkpoint = p.journal.checkpoint

        def snapshot(*a, **kw):
            if self.full:
                raise OSError(28, "No space left on device")
            checkpoint(*a, **kw)

        p.journal.checkpoint = snapshot
        return p


def run(bundles, state, msgs, seed, kills, reorder_ms, disk=None, background=False):
    """``background``: checkpoints written by their thread while the rounds go on; a kill
    while one is in flight finds its snapshot in place or (at random) not yet."""
    rng = random.Random(seed)
    fate = random.Random(seed + 1000)  # kills: drawn apart, so both runs see the same batches
    clock = Clock()
    disk = disk or Disk()
    p = disk.attach(make(bundles, state, clock, reorder_ms=reorder_ms))
    got = {}
    i = 0
    last: list[Inbound] = []
    while i < len(msgs):
        batch = msgs[i : i + rng.randint(1, 8)]
        if p.handle(batch):
            i += len(batch)  # acknowledged to the broker: never offered again
            last = batch
        clock.t += rng.uniform(0, 0.15)
        p.tick()
        if disk.full != (fate.random() < (0.3 if disk.full else 0.03) * disk.enabled):
            disk.full = not disk.full
        outs = p.outbox.take()
        for mid, o in enumerate(outs, 1000 * i):
            p.outbox.sent(mid, o)
        predictions(outs, got)
        for mid in list(p.outbox._sent):
            if fate.random() < 0.7:
                p.outbox.acked(mid)
        if rng.random() < 0.1:
            assert p.checkpoint(background=background) or disk.full
        p.checkpoint_done()
        if fate.random() < kills:
            gen = p.journal.generation
            if p.journal.checkpointing and p.journal.finish() and fate.random() < 0.5:
                p.journal.path("snap", gen).unlink()  # killed before its rename
            p.journal.close()  # kill -9: only what is in the log survives
            p = disk.attach(make(bundles, state, clock, reorder_ms=reorder_ms))
            again = p.outbox.take()
            for mid, o in enumerate(again, 10**7 + 1000 * i):
                p.outbox.sent(mid, o)
            predictions(again, got)
            if fate.random() < 0.5:  # our PUBACKs were lost with us: the broker sends it again
                assert p.handle([dataclasses.replace(m, redelivered=True) for m in last]) or (
                    disk.full
                )
    disk.full = False
    clock.t += 10
    assert p.tick()
    predictions(p.outbox.take(), got)
    return got


SEEDS = range(int(os.environ.get("EDGE_LSTM_CRASH_SEEDS", "6")))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("background", [False, True])
def test_kills_never_change_an_answer(bundles, tmp_path, seed, background):
    msgs, _ = traffic(seed)
    calm = run(bundles, tmp_path / "calm", msgs, seed, kills=0, reorder_ms=0)
    chaos = run(
        bundles, tmp_path / "chaos", msgs, seed, kills=0.08, reorder_ms=0, background=background
    )
    ys = lambda got: {k: v for k, v in got.items() if k[1] is not None}  # noqa: E731
    assert ys(chaos) == ys(calm)  # (a redelivery may add an error answer, never a prediction)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", ["", "full_disk", "background"])
def test_kills_with_reordering_never_answer_twice_or_lose(bundles, tmp_path, seed, how):
    msgs, valid = traffic(seed)
    disk = Disk(enabled=how == "full_disk")
    got = run(
        bundles,
        tmp_path / "chaos",
        msgs,
        seed,
        kills=0.08,
        reorder_ms=200,
        disk=disk,
        background=how == "background",
    )
    two = [k for k, v in got.items() if k[1] is not None and len(v) > 1]
    assert not two, f"answered with two different y: {two[:5]}"
    lost = [k for k in valid if k not in got and (k[0], None, k[2]) not in got]
    assert not lost, f"{len(lost)} samples never answered, e.g. {sorted(lost)[:5]}"


# -- a checkpoint written beside the answers, in a real service -----------------------------


def _gated(bundles, broker, state, gate, *args):
    """serve whose snapshot writes wait at ``gate`` (``tests.snapshot_gate``)."""
    from tests.mqtt_helpers import Serve

    svc = Serve(bundles / "clf-int8", broker.url, state, "--snapshot-interval", "3600", *args)
    svc.cmd[1:3] = ["-m", "tests.snapshot_gate", str(gate)]
    return svc.start()


def _send(pub, samples, seqs):
    for seq in seqs:
        for stream, x in samples.items():
            pub.send(stream, seq, x[seq - 1])
    pub.flush()


def _answered(col, samples, seqs):
    want = {(s, q) for s in samples for q in seqs}
    return lambda: want <= set(col.predictions())


def _held_snapshot(bundles, broker, tmp_path):
    """A service answering 20 samples of each of 4 streams, then holding the snapshot asked
    for at its write while it answers 20 more: (service, collector, publisher, samples)."""
    from tests.mqtt_helpers import Collector, Publisher, wait_until

    samples = {f"dev-{i}": np.random.default_rng(i).normal(0, 3, (60, 6)) for i in range(4)}
    col = Collector(broker.url)
    svc = _gated(bundles, broker, tmp_path / "state", tmp_path / "gate")
    wait_until(col.online, 30, "runtime online")
    pub = Publisher(broker.url)
    _send(pub, samples, range(1, 21))
    wait_until(_answered(col, samples, range(1, 21)), 30, "the first answers")
    pub.raw("edge/control/edge-test", b'{"cmd": "snapshot"}')
    wait_until((tmp_path / "gate.1").exists, 30, "the snapshot write to begin")
    _send(pub, samples, range(21, 41))
    # The write is held: the samples after it are answered all the same (the answer path
    # waited for the whole write, fsyncs and all, and here for ever).
    wait_until(_answered(col, samples, range(21, 41)), 30, "answers while the snapshot is written")
    assert not _snapshot_done(col), "snapshot said done before its file was written"
    return svc, col, pub, samples


def _snapshot_done(col):
    return any(d.get("snapshot") == "done" for _, d in col.of("edge/status/edge-test"))


def _resumed_exactly(bundles, broker, tmp_path, col, pub, samples):
    """Restart plainly, send the last 20 samples: every answer ever given is the one of an
    uninterrupted run (a sample replayed twice, or lost, changes the state after it)."""
    from tests.mqtt_helpers import Serve, offline, wait_until

    svc = Serve(bundles / "clf-int8", broker.url, tmp_path / "state").start()
    try:
        wait_until(lambda: col.online(), 30, "runtime online again")
        _send(pub, samples, range(41, 61))
        wait_until(_answered(col, samples, range(1, 61)), 60, "every answer")
        expected = offline(bundles / "clf-int8", samples)
        for key, ys in col.predictions().items():
            for y in ys:
                np.testing.assert_array_equal(y, expected[key], err_msg=str(key))
    finally:
        assert svc.stop() == 0, svc.output()


@pytest.mark.broker
def test_a_kill_9_while_a_snapshot_is_written_beside_the_answers_loses_nothing(
    bundles, broker, tmp_path
):
    svc, col, pub, samples = _held_snapshot(bundles, broker, tmp_path)
    svc.kill9()
    gens = lambda kind: [int(p.name[-12:-4]) for p in (tmp_path / "state").glob(kind)]  # noqa: E731
    assert max(gens("wal-*")) > max(gens("snap-*"), default=0)  # its segment, not its snapshot
    _resumed_exactly(bundles, broker, tmp_path, col, pub, samples)


@pytest.mark.broker
def test_a_snapshot_written_beside_the_answers_holds_the_state_it_began_with(
    bundles, broker, tmp_path
):
    from edge import snapshot, wal
    from tests.mqtt_helpers import wait_until

    svc, col, pub, samples = _held_snapshot(bundles, broker, tmp_path)
    (tmp_path / "gate.1.go").write_text("go")
    wait_until(lambda: _snapshot_done(col), 30, "snapshot done")
    journal = Journal(tmp_path / "state")
    gen = max(int(p.name[5:13]) for p in journal.dir.glob("snap-*"))
    snap = snapshot.read(journal.path("snap", gen))
    assert dict(zip(snap.streams, snap.last_seq.tolist())) == dict.fromkeys(samples, 20)
    logged = [
        (e.stream, e.seq)
        for e in wal.scan(journal.path("wal", gen).read_bytes())
        if isinstance(e, wal.Record)
    ]
    assert sorted(logged) == sorted((s, q) for s in samples for q in range(21, 41))
    svc.kill9()
    _resumed_exactly(bundles, broker, tmp_path, col, pub, samples)


@pytest.mark.broker
def test_a_snapshot_write_failing_beside_the_answers_degrades_retries_and_loses_nothing(
    bundles, broker, tmp_path
):
    from tests.mqtt_helpers import wait_until

    svc, col, pub, samples = _held_snapshot(bundles, broker, tmp_path)
    (tmp_path / "gate.1.go").write_text("fail")
    status = lambda: col.of("edge/status/edge-test")[-1][1]  # noqa: E731
    wait_until(lambda: status().get("state") == "degraded", 30, "degraded")
    assert "Input/output error" in status()["reason"]
    wait_until((tmp_path / "gate.2").exists, 30, "the snapshot retried")
    assert not _snapshot_done(col)
    (tmp_path / "gate.2.go").write_text("go")
    wait_until(lambda: _snapshot_done(col), 30, "snapshot done once retried")
    assert status().get("state") == "online"
    svc.kill9()
    _resumed_exactly(bundles, broker, tmp_path, col, pub, samples)

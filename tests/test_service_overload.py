"""The paho callbacks never block, whatever the backlog: the broker keeps it, not us."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge import config
from edge.mqtt_loop import MqttService


@dataclass
class Msg:
    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    properties: object = None
    dup: bool = False
    retain: bool = False


def service(bundles, tmp_path, **overrides):
    cfg = config.load(
        None,
        env={},
        overrides={
            "model": str(bundles / "clf-int8"),
            "broker": "mqtt://127.0.0.1:1",
            "state_dir": str(tmp_path / "state"),
            "queue_size": 2,
            **overrides,
        },
    )
    return MqttService(cfg)


def test_on_message_only_appends(bundles, tmp_path):
    svc = service(bundles, tmp_path)
    for mid in range(1, 20001):  # far past queue_size: a broker ignoring Receive Maximum
        svc._on_message(None, None, Msg("sensors/a/data", b"{}", mid, dup=mid % 2 == 0))
    assert len(svc.inbox) == 20000 and svc.wake.is_set()
    assert svc.inbox.in_file == 20000 - 2  # beyond queue_size: on disk, not in memory
    first, second = svc.inbox.popleft(), svc.inbox.popleft()
    assert (first.mid, first.redelivered, second.redelivered) == (1, False, True)
    assert [svc.inbox.popleft().mid for _ in range(19998)] == list(range(3, 20001))
    svc.processor.journal.close()


def test_drop_oldest_takes_only_the_newest(bundles, tmp_path):
    svc = service(bundles, tmp_path, overload="drop-oldest")
    for mid in range(1, 6):
        svc._on_message(None, None, Msg("sensors/a/data", b"{}", mid))
    dropped, batch = svc._take()
    assert [m.mid for m in dropped] == [1, 2, 3] and [m.mid for m in batch] == [4, 5]
    svc.processor.journal.close()


def test_drop_oldest_drops_no_more_than_the_answer_window_takes(bundles, tmp_path):
    svc = service(bundles, tmp_path, overload="drop-oldest", max_unacked=3)
    for mid in range(1, 11):
        svc._on_message(None, None, Msg("sensors/a/data", b"{}", mid))
    dropped, batch = svc._take()  # 8 beyond queue_size, but only 3 reports can go out
    assert [m.mid for m in dropped] == [1, 2, 3]
    assert [m.mid for m in batch] == list(range(4, 11))  # the rest is answered, not dropped
    svc.processor.journal.close()


def test_signals_while_starting_are_acted_on_once_the_service_can(bundles, tmp_path):
    """A ``systemctl reload`` (SIGHUP) right after a start must not kill the service, and a
    SIGTERM then is a clean stop, not a death by signal."""
    import signal

    from edge import early_signals

    before = {sig: signal.getsignal(sig) for sig in early_signals.SIGNALS}
    try:
        early_signals.catch()  # what ``serve`` does first
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        svc = service(bundles, tmp_path)
        assert "reload" in svc.requests and svc.stopping
        assert early_signals.take() == []
        svc.processor.journal.close()
        svc.lock.release()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# Runs ``edge-lstm serve`` as its console script does, with a signal sent to it while it
# imports NumPy (as ``edge`` or the runtime first asks for it): seconds on a Pi, in which
# ``systemctl reload`` or ``stop`` may come.
SIGNAL_AT_NUMPY = """
import importlib.abc, os, signal, sys

class SignalAtNumpy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), int(os.environ["SIGNAL_AT_NUMPY"]))
        return None

sys.meta_path.insert(0, SignalAtNumpy())
from edge.cli import console
raise SystemExit(console())
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_while_serve_imports_its_modules_is_acted_on_once_it_can(
    bundles, broker, tmp_path, sig
):
    """A SIGHUP that came while the command imported its modules killed it (the default
    action), before it could remember it; a SIGTERM ended it by signal, not cleanly."""
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-c", SIGNAL_AT_NUMPY, "serve"]
    cmd += ["--model", str(bundles / "clf-int8"), "--broker", broker.url]
    cmd += ["--state-dir", str(tmp_path / "state"), "--stats-interval", "0"]
    with open(log, "wb") as out:
        env = {**os.environ, "SIGNAL_AT_NUMPY": str(int(sig))}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        if sig == signal.SIGHUP:
            deadline = time.monotonic() + 120
            while "model reloaded" not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()  # reloaded, still serving
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()
        assert "stopped cleanly" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_tells_systemd_it_is_ready_once_a_reload_cannot_kill_it(bundles, broker, tmp_path):
    """Under ``Type=simple`` (the deploy kit's unit until now) systemd counted ``serve`` as
    started at its exec, and a ``systemctl reload`` right after ``systemctl start`` came while
    Python itself was starting, before any handler of ours: SIGHUP's default action ended it
    (exit 129). The unit is ``Type=notify`` and ``serve`` says ``READY=1`` once its handlers are
    in place: a SIGHUP the moment it says so is a reload."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(120)
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "edge", "serve", "--model", str(bundles / "clf-int8")]
    cmd += ["--broker", broker.url, "--state-dir", str(tmp_path / "state"), "--stats-interval", "0"]
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        assert sock.recv(4096) == b"READY=1", log.read_text()
        proc.send_signal(signal.SIGHUP)  # what systemctl reload sends once the unit is up
        deadline = time.monotonic() + 120
        while "model reloaded" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    unit = (Path(__file__).parents[1] / "edge" / "deploy" / "edge-lstm.service").read_text()
    assert "\nType=notify\n" in unit


def test_telling_systemd_is_nothing_without_its_socket_and_never_fatal(
    tmp_path, monkeypatch, caplog
):
    """No ``NOTIFY_SOCKET`` (``Type=simple``, or run by hand): nothing sent. One that cannot
    be reached: a warning naming it, and the service goes on."""
    from edge.systemd_notify import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify("READY=1") is False
    assert f"NOTIFY_SOCKET={str(tmp_path / 'gone')!r}" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "@edge-lstm-test-absent-abstract-socket")
    assert notify("READY=1") is False


def test_the_stop_signal_takes_no_lock_the_loop_may_hold(bundles, tmp_path):
    """A signal handler runs in the main thread between two of its bytecodes, maybe inside
    the lock of the Event that thread waits on or clears: a handler that took that lock
    would wait for itself forever, and ``serve`` would hang on SIGTERM until killed."""
    import threading

    svc = service(bundles, tmp_path)
    with svc.wake._cond, svc.answered._cond:  # as inside ``wait`` or ``clear``
        handler = threading.Thread(target=svc._stop)
        handler.start()
        handler.join(60)
        returned = not handler.is_alive()
    handler.join()
    assert returned and svc.stopping
    svc.processor.journal.close()
    svc.lock.release()


class Wire:
    """The client side ``_on_connect`` and ``_ack`` use: records the acknowledgements."""

    def __init__(self):
        self.acked = []

    def ack_many(self, acks):
        self.acked += [mid for mid, qos in acks]

    def socket(self):
        return None

    def subscribe(self, *a, **kw):
        return 0, 1  # as paho: (result, message id)

    def drop_refused(self):
        return []  # no topic the broker refused


def connect(svc, wire, *, session_present):
    """A successful CONNACK, as paho reports it."""
    flags = SimpleNamespace(session_present=session_present)
    svc._on_connect(wire, None, flags, SimpleNamespace(is_failure=False), None)


def test_messages_of_a_session_that_is_gone_are_not_acknowledged_on_the_next(bundles, tmp_path):
    """A broker restarted without persistence numbers its deliveries from 1 again: a PUBACK
    of a message id from before would acknowledge another, newer message."""
    svc = service(bundles, tmp_path)
    svc.client = wire = Wire()
    connect(svc, wire, session_present=False)
    svc._on_message(None, None, Msg("sensors/a/data", b"{}", 7))  # taken, not yet answered
    connect(svc, wire, session_present=True)
    svc._on_message(None, None, Msg("sensors/a/data", b"{}", 8))  # the same session goes on
    connect(svc, wire, session_present=False)
    svc._on_message(None, None, Msg("sensors/b/data", b"{}", 7))  # a new session's 7
    svc._ack([svc.inbox.popleft() for _ in range(3)])
    assert wire.acked == [7]  # the new session's, once; 7 and 8 of the old one never
    svc.processor.journal.close()
    svc.lock.release()


def test_a_message_the_broker_sends_again_on_a_session_that_goes_on_is_acknowledged_once(
    bundles, tmp_path
):
    """A reconnect to the same session: the broker sends message 7, not yet acknowledged,
    again. The original and its copy were both acknowledged, the second PUBACK for an id the
    broker may have given to a newer message by then (acknowledged before it is logged)."""
    svc = service(bundles, tmp_path)
    svc.client = wire = Wire()
    connect(svc, wire, session_present=False)
    svc._on_message(None, None, Msg("sensors/a/data", b"{}", 7))  # taken, not yet answered
    connect(svc, wire, session_present=True)
    svc._on_message(None, None, Msg("sensors/a/data", b"{}", 7, dup=True))  # its copy
    svc._ack([svc.inbox.popleft() for _ in range(2)])
    assert wire.acked == [7]
    svc.processor.journal.close()
    svc.lock.release()


def test_drop_oldest_sheds_samples_never_commands(bundles, tmp_path):
    """A reset (a rebooted device saying where its seq starts again) or a reload shed under
    overload was answered "sample(s) dropped" and never acted on: the device's samples after
    its reset were all refused as duplicates of its previous life."""
    svc = service(bundles, tmp_path, overload="drop-oldest")
    topics = ["sensors/a/data", "sensors/a/control", "sensors/a/data", "edge/control/x"]
    topics += ["sensors/b/data"] * 4
    for mid, topic in enumerate(topics, 1):
        svc._on_message(None, None, Msg(topic, b"{}", mid))
    dropped, batch = svc._take()
    assert [m.mid for m in dropped] == [1] and [m.mid for m in batch] == list(range(2, 9))
    svc.processor.journal.close()


def test_messages_held_at_a_crash_wait_for_their_gap_once_the_service_reads_again(
    bundles, tmp_path
):
    """A message held for reordering (its predecessor overtaken) when the service was
    killed is held again at the restart. Its wait ran from there: a start-up slower than
    ``reorder_ms`` (a long log to replay, thousands of answers to publish again first) gave
    it up before anything was read, and the predecessor, waiting at the broker all along,
    was then answered ``late`` and dropped, every later prediction of the stream computed
    without it. The wait begins once the service takes messages again."""
    import json

    import numpy as np

    from edge.processor import Inbound

    def sample(seq):
        body = json.dumps({"seq": seq, "values": np.full(6, 0.1 * seq).tolist()}).encode()
        return Inbound("sensors/s/data", body, seq)

    first = service(bundles, tmp_path)
    p = first.processor
    assert p.handle([sample(1)]) and p.tick(release_all=True) and p.handle([sample(3)])
    assert len(p.reorder) == 1  # seq 3 waits for seq 2
    p.journal.close()  # killed: no checkpoint
    first.lock.release()
    again = service(bundles, tmp_path)
    reorder = again.processor.reorder
    assert len(reorder) == 1
    now = [time.monotonic() + 3600.0]  # a start-up far longer than reorder_ms
    reorder._clock = lambda: now[0]
    assert again.processor.tick() and len(reorder) == 1  # not connected: nothing read yet
    again.connected.set()
    outbox = again.outbox
    assert outbox.queued and again._take() == ([], [])  # seq 1's answer goes out again first
    assert again.processor.tick() and len(reorder) == 1
    for mid, o in enumerate(outbox.take(), 1):
        outbox.sent(mid, o)
        outbox.acked(mid)
    assert again._take() == ([], [])  # reading from here on
    assert again.processor.tick() and len(reorder) == 1
    again._on_message(None, None, Msg("sensors/s/data", sample(2).payload, 2))
    dropped, batch = again._take()
    assert not dropped and again.processor.handle(batch) and len(reorder) == 0
    outs = again.outbox.take()
    got = [(o.topic, json.loads(o.payload)) for o in outs]
    assert [(t, d["seq"], d.get("gap")) for t, d in got] == [
        ("predictions/s", 2, None),
        ("predictions/s", 3, None),
    ]
    again.processor.journal.close()


def _seq_3_held_for_seq_2_in_the_inbox(bundles, tmp_path):
    """A service (reorder_ms 60 s) holding stream s's seq 3 for seq 2, which waits in its
    inbox behind a full answer window (seq 1's answer awaits its PUBACK)."""
    import json

    import numpy as np

    from edge.processor import Inbound

    def sample(seq):
        body = json.dumps({"seq": seq, "values": np.full(6, 0.1 * seq).tolist()}).encode()
        return Inbound("sensors/s/data", body, seq)

    svc = service(bundles, tmp_path, reorder_ms=60000)
    p = svc.processor
    svc.connected.set()
    assert svc._take() == ([], [])  # reading
    assert p.handle([sample(1)]) and p.tick(release_all=True) and p.handle([sample(3)])
    svc._on_message(None, None, Msg("sensors/s/data", sample(2).payload, 2))
    for mid, o in enumerate(p.outbox.take(), 1):
        p.outbox.sent(mid, o)
    svc.outbox.window = 1  # full: nothing is taken
    return svc


def _answered_in_order_once_the_window_has_room(svc):
    """Seq 3's wait long over while seq 2 waits in the inbox: nothing is given up on, and
    once the window has room seq 2, then seq 3, are answered without a gap."""
    import json

    p = svc.processor
    now = [time.monotonic() + 3600.0]  # the wait is long over
    p.reorder._clock = lambda: now[0]
    assert svc._work_once() and len(svc.inbox) == 1 and len(p.reorder) == 1
    svc.outbox.window = 100
    svc.connected.clear()  # (no broker here: the answers stay in the outbox)
    p.resume()
    assert svc._work_once() and len(svc.inbox) == 0 and len(p.reorder) == 0
    got = [(o.topic, json.loads(o.payload)) for o in p.outbox.take()]
    assert [(t, d["seq"], d.get("gap")) for t, d in got] == [
        ("predictions/s", 2, None),
        ("predictions/s", 3, None),
    ]
    p.journal.close()


def test_a_held_message_is_not_given_up_on_while_what_it_waits_for_is_in_the_inbox(
    bundles, tmp_path
):
    """Under a backlog the sample a held message waits for may have arrived already and wait
    in the inbox behind others, or while the answer window is full: the wait ran out all the
    same (seen in a backlog of 100,000 messages, several streams at once when a round took
    long), the held message was applied after a gap and its predecessor answered ``late``.
    A wait ends only once what arrived within it was read."""
    svc = _seq_3_held_for_seq_2_in_the_inbox(bundles, tmp_path)
    _answered_in_order_once_the_window_has_room(svc)


def test_time_cut_off_from_the_broker_does_not_make_a_stream_idle(bundles, tmp_path):
    """While the service is cut off from its broker the devices' samples wait there (QoS 1,
    a persistent session), so a stream is not idle meanwhile. A cut longer than
    ``idle_timeout`` forgot every stream at the first batch read after it: a stream that had
    sent without a break was stepped from the zero state, its answer flagged restart."""
    import json

    import numpy as np

    import edge

    xs = np.linspace(-1, 1, 12).reshape(2, 6)

    def sample(seq):
        return json.dumps({"seq": seq, "values": xs[seq - 1].tolist()}).encode()

    svc = service(bundles, tmp_path, idle_timeout=60, reorder_ms=0, max_wait_ms=0)
    p = svc.processor
    now = [time.monotonic()]
    p.engine.store._clock = p.reorder._clock = lambda: now[0]
    sent = []
    publish = svc.client.publish
    svc.client.publish = lambda topic, payload, *a, **k: (
        sent.append((topic, payload)) or publish(topic, payload, *a, **k)
    )
    svc.connected.set()
    svc._on_message(None, None, Msg("sensors/s/data", sample(1), 1))
    assert svc._work_once() and "s" in p.engine.store
    svc.connected.clear()  # cut off: "s" goes on sending, the broker keeps it for us
    assert svc._work_once()
    now[0] += 3600.0
    assert svc._work_once()
    svc.connected.set()  # back: the broker delivers what it kept
    svc._on_message(None, None, Msg("sensors/s/data", sample(2), 2))
    assert svc._work_once()
    got = [json.loads(b) for t, b in sent if t == "predictions/s"]
    assert [(d["seq"], d.get("restart")) for d in got] == [(1, None), (2, None)]
    want = edge.load(bundles / "clf-int8").step("x", xs)[-1]
    np.testing.assert_array_equal(np.float32(got[-1]["y"]), want)
    assert p.engine.store.stats.evicted_idle == 0
    now[0] += 61.0  # heard from nothing while connected: idle now
    svc._on_message(None, None, Msg("sensors/t/data", sample(1), 3))
    assert svc._work_once() and "s" not in p.engine.store
    p.journal.close()


def test_a_stream_idle_past_idle_timeout_is_forgotten_while_nothing_arrives(bundles, tmp_path):
    """A gateway that hears nothing more (its only device unplugged) kept the stream, and its
    Home Assistant sensors, for good: idle streams were looked for only in a round that took
    messages in. They are forgotten while the service is idle too, and a restart after that
    does not bring them back."""
    import json

    svc = service(
        bundles, tmp_path, idle_timeout=60, reorder_ms=0, max_wait_ms=0, ha_discovery=True
    )
    p = svc.processor
    now = [time.monotonic()]
    p.engine.store._clock = p.reorder._clock = lambda: now[0]
    svc.connected.set()
    body = json.dumps({"seq": 1, "values": [0.5] * 6}).encode()
    svc._on_message(None, None, Msg("sensors/s/data", body, 1))
    assert svc._work_once() and "s" in p.engine.store
    sensors = [d.topic for d in svc.ha.reconcile(p.engine.store.streams)]
    assert sensors and all("/s_" in t for t in sensors)
    now[0] += 59.0
    assert svc._work_once() and "s" in p.engine.store
    now[0] += 2.0  # nothing heard for 61 s, nothing else arrives
    assert svc._work_once()
    assert "s" not in p.engine.store and p.engine.store.stats.evicted_idle == 1
    removed = svc.ha.reconcile(p.engine.store.streams)
    assert [(d.topic, d.payload) for d in removed] == [(t, b"") for t in sensors]
    p.journal.close()  # kill -9: the log says the stream was forgotten
    svc.lock.release()
    again = service(bundles, tmp_path, idle_timeout=60)
    assert "s" not in again.processor.engine.store
    again.processor.journal.close()


def test_a_wall_clock_step_back_does_not_give_up_a_held_message_its_gap_waits_in_the_inbox(
    bundles, tmp_path, monkeypatch
):
    """The arrival of a message waiting in the inbox was taken on the wall clock and turned
    into the processor's monotonic one with the offset between them now: after NTP stepped
    the wall clock back, the message seemed to arrive in the future, a held message's wait
    ran out while the sample it waited for was in the inbox, and that sample was answered
    ``late`` and dropped."""

    import edge.mqtt_loop

    svc = _seq_3_held_for_seq_2_in_the_inbox(bundles, tmp_path)
    wall = SimpleNamespace(time=lambda: time.time() - 86400.0, monotonic=time.monotonic)
    monkeypatch.setattr(edge.mqtt_loop, "time", wall)  # NTP steps the clock back a day
    _answered_in_order_once_the_window_has_room(svc)

"""``edge-lstm serve`` against what the field throws at it, with a real Mosquitto: hostile
payloads (also retained), a backlog, overload, a full or read-only disk, device reboots."""

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge.wal import MAGIC
from tests import hostile
from tests.conftest import fill
from tests.mqtt_helpers import Collector, Publisher, offline, wait_until
from tests.test_service_mqtt import BUNDLE, assert_exact, make_samples

pytestmark = pytest.mark.broker


def strict(payload):
    """JSON as JavaScript's JSON.parse reads it: NaN and Infinity are errors."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(payload, parse_constant=refuse)


def feed_good(pub, samples, i):
    for stream, x in samples.items():
        pub.send(stream, i + 1, x[i])


def test_hostile_payloads_never_stop_the_service(bundles, broker, service):
    """Every hostile case and 20,000 mutated messages, on data and control topics and as
    retained messages, interleaved with good streams: no crash, good streams exact, every bad
    message answered, every answer strict JSON."""
    setup = Publisher(broker.url, client_id="retainer")
    for name, payload in hostile.CASES[:10]:
        setup.client.publish(f"sensors/retained-{len(name) % 5}/data", payload, qos=1, retain=True)
    setup.client.publish("sensors/ret/control", hostile.CONTROL_CASES[0][1], qos=1, retain=True)
    setup.flush()
    samples = make_samples(3, 60, seed=11)
    col = Collector(broker.url)
    svc = service()
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    bad = [p for _, p in hostile.CASES]
    control = [p for _, p in hostile.CONTROL_CASES]
    n_gen = 60 * 334
    generated = hostile.generate(seed=3, n=n_gen)
    n_bad = 0
    for i in range(60):
        feed_good(pub, samples, i)
        for k, payload in enumerate(bad if i < 2 else []):
            pub.raw(f"sensors/evil-{k % 7}/data", payload)
            n_bad += 1
        for payload in control if i == 3 else []:
            pub.raw("sensors/ctl/control", payload)
            pub.raw("edge/control/edge-test", payload)
        for _ in range(334):
            pub.raw(f"sensors/gen-{i % 11}/data", next(generated))
        if i % 10 == 9:
            pub.flush(120)
    pub.flush(120)
    expected = offline(bundles / BUNDLE, samples)
    good = lambda: {k: v for k, v in col.predictions().items() if k[0].startswith("dev-")}  # noqa: E731
    wait_until(lambda: set(expected) <= set(good()), 120, "every good prediction")
    assert_exact(good(), expected)
    evil = lambda: sum("/evil-" in t for t, _ in col.messages)  # noqa: E731
    wait_until(lambda: evil() >= n_bad, 60, "an answer to every hostile message")
    assert svc.alive(), svc.output()[-3000:]
    answered_gen = lambda: sum("/gen-" in t for t, _ in col.messages)  # noqa: E731
    try:
        wait_until(lambda: answered_gen() >= n_gen, 120, "an answer for every mutated message")
    except AssertionError as exc:  # what a rare failure needs to be understood
        said = f"{answered_gen()} of {n_gen}; serve's log ends:\n{svc.output()[-3000:]}"
        raise AssertionError(f"{exc}: {said}") from None
    assert "Traceback" not in svc.output()
    # a restart meets the retained poison again: still no crash loop
    assert svc.stop() == 0
    again = service()
    wait_until(lambda: "recovered generation" in again.output(), 30, "second start")
    pub.send("dev-0", 61, np.zeros(6))
    pub.flush()
    wait_until(lambda: ("dev-0", 61) in col.predictions(), 30, "a prediction after restart")
    assert again.alive()
    for topic, doc in col.messages:
        assert "raw" not in doc, f"{topic}: not JSON: {doc}"
    strict_ok = [strict(json.dumps(d)) for _, d in col.messages]
    assert len(strict_ok) == len(col.messages)
    setup.client.publish("sensors/ret/control", b"", qos=1, retain=True)
    setup.close()


def _backlog(broker, service, samples, *args, **where):
    """A session at the broker for the service (started once and stopped), then every
    sample of ``samples`` published while it is down: a backlog waiting for its start."""
    col = Collector(broker.url)
    first = service(*args, **where)
    wait_until(col.online, 20, "runtime online")  # the broker now keeps a session for us
    assert first.stop() == 0
    pub = Publisher(broker.url)
    for i in range(len(next(iter(samples.values())))):
        feed_good(pub, samples, i)
    pub.flush(300)
    return col


def test_backlog_before_start_is_answered_in_full(bundles, broker, service, tmp_path):
    samples = make_samples(100, 30, seed=12)
    col = _backlog(broker, service, samples)
    args = ("--queue-size", "100", "--max-unacked", "300")
    svc = service(*args)
    wait_until(lambda: len(col.predictions()) >= 100, 60, "the backlog draining")
    assert svc.stop() == 0  # SIGTERM in the middle of a backlog: a bounded drain, exit 0
    svc = service(*args)
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 120, "the whole backlog")
    got = col.predictions()
    assert_exact(got, expected)
    # (the answers may all have come before this start: a SIGTERM before the service has set
    # itself up ends the process by the signal, having taken nothing in)
    wait_until(lambda: svc.output().count("serving") == 3, 60, "the third start")
    assert svc.stop() == 0


def test_drop_oldest_reports_every_sample_it_drops(bundles, broker, service):
    samples = make_samples(4, 500, seed=13)
    col = Collector(broker.url)
    service("--overload", "drop-oldest", "--queue-size", "20", "--max-batch", "1")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    for i in range(500):
        feed_good(pub, samples, i)
    pub.flush(120)

    def accounted():
        keys = set(col.predictions())
        for topic, doc in col.of("errors/"):
            if doc.get("error") == "dropped":
                keys.add((topic.split("/", 1)[1], doc["seq"]))
        return keys

    everything = {(s, i + 1) for s in samples for i in range(500)}
    wait_until(lambda: everything <= accounted(), 120, "a prediction or a drop report each")
    predicted = set(col.predictions())
    assert not {(t.split("/", 1)[1], d["seq"]) for t, d in col.of("errors/")} & predicted


def test_duplicates_after_kill_9_are_bounded_by_what_was_in_flight(bundles, broker, service):
    window = 100
    samples = make_samples(10, 200, seed=14)
    col = Collector(broker.url)
    args = ("--max-unacked", str(window), "--snapshot-interval", "1000")
    svc = service(*args)
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    for i in range(100):
        feed_good(pub, samples, i)
        time.sleep(0.01)
    pub.flush()
    wait_until(lambda: len(col.predictions()) >= 1000, 60, "the first half answered")
    svc.kill9()
    svc = service(*args)
    for i in range(100, 200):
        feed_good(pub, samples, i)
    pub.flush()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 60, "every prediction")
    got = col.predictions()
    assert_exact(got, expected)
    duplicates = sum(len(v) - 1 for v in got.values())
    assert duplicates <= 2 * window, f"{duplicates} duplicate predictions after one kill -9"


def test_full_disk_degrades_then_recovers_without_loss(bundles, broker, service, small_disk):
    samples = make_samples(3, 40, seed=15)
    col = Collector(broker.url)
    service(state=small_disk / "state")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    for i in range(10):
        feed_good(pub, samples, i)
    pub.flush()
    wait_until(lambda: len(col.predictions()) == 30, 30, "answers before the disk fills")
    fill(small_disk / "filler")
    for i in range(10, 40):
        feed_good(pub, samples, i)
    pub.flush()
    status = lambda: col.of("edge/status/edge-test")[-1][1]  # noqa: E731
    degraded = lambda: [d for _, d in col.of("edge/status/edge-test") if d["state"] == "degraded"]  # noqa: E731
    wait_until(degraded, 30, "a degraded status")
    assert all("reason" in d for d in degraded())
    (small_disk / "filler").unlink()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 60, "every prediction")
    assert_exact(col.predictions(), expected)
    wait_until(lambda: status()["state"] == "online", 30, "online again")


@pytest.mark.parametrize("queue", [(), ("--queue-size", "64")], ids=["defaults", "queue-64"])
def test_a_backlog_larger_than_a_small_state_dir_is_answered_in_full(
    bundles, broker, service, small_disk, queue
):
    """24,000 samples wait at the broker and the state directory is a 2 MiB file system: the
    log of the backlog outgrows the disk long before ``snapshot_interval`` comes round, and
    the spill of what waits beyond ``queue_size`` shares the disk. The log is checkpointed by
    size, keeps the room its next checkpoint needs (with the answers it carries over, up to
    ``max_unacked``: degraded, the service reads their PUBACKs to get it back), and a full
    disk is given its room back by a checkpoint: it was stuck for good. With the defaults,
    the first messages of every stream wait ``reorder_ms`` (held, carried by a checkpoint):
    their release goes on while the batch behind them waits for room, since it gives room."""
    samples = make_samples(1000, 24, seed=19)
    args = (*queue, "--snapshot-interval", "600")
    col = _backlog(broker, service, samples, *args, state=small_disk / "state")
    service(*args, state=small_disk / "state")
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 600, "the whole backlog")
    assert_exact(col.predictions(), expected)
    assert not col.of("errors/")


def test_read_only_state_dir_starts_degraded(bundles, broker, service, small_disk):
    state = small_disk  # the runtime's own log goes beside it, on a writable disk
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    col = Collector(broker.url)
    svc = service(state=state)
    status = lambda: col.of("edge/status/edge-test")  # noqa: E731
    wait_until(lambda: status() and status()[-1][1]["state"] == "degraded", 30, "degraded")
    pub = Publisher(broker.url)
    pub.send("dev-0", 1, np.zeros(6))
    pub.flush()
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    wait_until(lambda: ("dev-0", 1) in col.predictions(), 30, "answered once writable")
    assert svc.alive() and "Traceback" not in svc.output()


def test_a_stop_while_degraded_says_so_not_cleanly(bundles, broker, service, small_disk):
    """A stop while the state directory could not be written skipped its final snapshot and
    logged "stopped cleanly"."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    col = Collector(broker.url)
    svc = service(state=small_disk)  # the file system's root: the runtime's log goes beside it
    status = lambda: col.of("edge/status/edge-test")  # noqa: E731
    wait_until(lambda: status() and status()[-1][1]["state"] == "degraded", 30, "degraded")
    assert svc.stop() == 0
    out = svc.output()
    assert "stopped degraded (state_dir not writable: " in out and "no final snapshot" in out
    assert "stopped cleanly" not in out
    col.close()


def test_a_degraded_status_is_said_again_when_its_reason_changes(
    bundles, broker, service, small_disk
):
    """The status was published again only when its state changed: a state directory that
    went from read-only to full kept saying ``Read-only file system`` to a monitor that
    waited for it to be made writable, while the disk now wanted room."""
    fill(small_disk / "filler")  # full, and then read-only
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    col = Collector(broker.url)
    svc = service(state=small_disk)  # the file system's root: the runtime's log goes beside it
    statuses = lambda: [d for _, d in col.of("edge/status/edge-test")]  # noqa: E731
    reason = lambda: (statuses() and statuses()[-1].get("reason")) or ""  # noqa: E731
    wait_until(lambda: "Read-only file system" in reason(), 30, "degraded: read-only")
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    pub = Publisher(broker.url)
    pub.send("dev-0", 1, np.zeros(6))
    pub.flush()
    wait_until(lambda: "No space left on device" in reason(), 30, "degraded: full")
    assert statuses()[-1]["state"] == "degraded"
    (small_disk / "filler").unlink()
    wait_until(lambda: ("dev-0", 1) in col.predictions(), 30, "answered once there is room")
    wait_until(lambda: statuses()[-1]["state"] == "online", 30, "online again")
    assert svc.alive() and "Traceback" not in svc.output()
    pub.close()
    col.close()


def test_a_state_that_appears_at_state_dir_after_the_start_is_taken_up_by_a_restart(
    bundles, broker, service, tmp_path
):
    """``state_dir`` a symbolic link into an SD card mounted after the service started: it
    began degraded, and once the card was there it wrote its own generations beside the
    card's and answered every stream from the zero state; the next restart took up the card's
    newer generation, and what had been acknowledged meanwhile was lost. It writes nothing
    there and exits 1 (systemd starts it again); the restart answers on from the card's state
    what waited at the broker."""
    samples = make_samples(2, 10, seed=23)
    card = tmp_path / "card"
    col = Collector(broker.url)
    first = service(state=card / "edge")
    wait_until(col.online, 30, "runtime online")
    pub = Publisher(broker.url)
    for i in range(5):
        feed_good(pub, samples, i)
    pub.flush()
    wait_until(lambda: len(col.predictions()) == 10, 30, "answers on the card")
    assert first.stop() == 0
    files = sorted(p.name for p in (card / "edge").glob("*-*"))  # snapshots and segments
    card.rename(tmp_path / "unmounted")
    link = tmp_path / "state"
    link.symlink_to(card / "edge")
    svc = service(state=link)
    status = lambda: [d["state"] for _, d in col.of("edge/status/edge-test")]  # noqa: E731
    wait_until(lambda: status()[-1] == "degraded", 30, "degraded without its card")
    for i in range(5, 10):
        feed_good(pub, samples, i)
    pub.flush()
    (tmp_path / "unmounted").rename(card)  # the card is mounted
    assert svc.proc.wait(60) == 1
    assert "holds a state this process did not start from" in svc.output()
    assert sorted(p.name for p in (card / "edge").glob("*-*")) == files  # none written
    service(state=link)
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 60, "every prediction")
    assert_exact(col.predictions(), expected)


def test_a_second_serve_on_a_state_dir_in_use_is_refused(bundles, broker, service, tmp_path):
    """Two processes on one state directory would split every stream's history between
    them; the second one is refused before it reads or writes anything there."""
    import sys

    col = Collector(broker.url)
    first = service()
    wait_until(lambda: col.online(), 30, "the first serve online")
    cmd = [sys.executable, "-m", "edge", "serve", "--model", str(bundles / BUNDLE)]
    cmd += ["--broker", broker.url, "--state-dir", str(tmp_path / "state")]
    second = subprocess.run(
        [*cmd, "--client-id", "edge-other"], capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 2, second.stderr
    assert f"is in use by another process (pid {first.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    pub = Publisher(broker.url)
    pub.send("dev-0", 1, np.zeros(6))
    pub.flush()
    wait_until(lambda: ("dev-0", 1) in col.predictions(), 30, "the first still answering")
    col.close()
    pub.close()


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_state_dir_removed_or_renamed_under_serve_is_written_out_again_and_kept_locked(
    bundles, broker, service, tmp_path, how
):
    """The state directory removed (``rm -rf``) or moved away (``mv``) under a running
    service: the next write notices, the state is written out again where ``state_dir``
    says, and that directory is locked as the first one was. A moved one was appended to
    for up to ``snapshot_interval`` without a word, and a kill -9 in that time restarted
    every stream from the zero state; a directory made again was not locked, and a second
    ``serve`` started on it."""
    samples = make_samples(3, 30, seed=23)
    state = tmp_path / "state"
    col = Collector(broker.url)
    svc = service("--reorder-ms", "0")
    wait_until(col.online, 30, "runtime online")
    pub = Publisher(broker.url)
    for i in range(10):
        feed_good(pub, samples, i)
    pub.flush()
    wait_until(lambda: len(col.predictions()) == 30, 60, "the first answers")
    if how == "removed":
        shutil.rmtree(state)
    else:
        state.rename(tmp_path / "state-moved")
    for i in range(10, 20):
        feed_good(pub, samples, i)
    pub.flush()
    wait_until(lambda: len(col.predictions()) == 60, 60, "the answers after it")
    wait_until(lambda: "written out again" in svc.output(), 60, "the state written out again")
    cmd = [sys.executable, "-m", "edge", "serve", "--model", str(bundles / BUNDLE)]
    cmd += ["--broker", broker.url, "--state-dir", str(state), "--client-id", "edge-other"]
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"a second serve ran on the same state_dir: {exc.stderr!r}") from None
    assert second.returncode == 2, second.stderr
    assert f"is in use by another process (pid {svc.proc.pid})" in second.stderr
    svc.kill9()
    service("--reorder-ms", "0")
    for i in range(20, 30):
        feed_good(pub, samples, i)
    pub.flush()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 60, "every prediction")
    assert_exact(col.predictions(), expected)
    assert not any(d.get("restart") for _, d in col.of("predictions/"))
    col.close()
    pub.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_session_taken_over_is_named_in_the_log(bundles, broker, service, protocol):
    """Another client with our client id (a second serve, a copied unit): the broker hands
    the session back and forth. The log says why, and the service goes on once it is gone."""
    from tests.mqtt_helpers import _hostport

    col = Collector(broker.url)
    svc = service("--protocol", protocol)
    wait_until(lambda: col.online(), 30, "online")
    v5 = protocol == "5"
    twin = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="edge-test",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        **({} if v5 else {"clean_session": False}),
    )
    twin.reconnect_delay_set(0.1, 0.1)
    twin.connect(*_hostport(broker.url), 30)
    twin.loop_start()
    # MQTT 5 brokers may say "session taken over" (Mosquitto 2.0 just closes the connection)
    said = ("gave our session to another client", "times in a row: does another client use")
    try:
        wait_until(lambda: any(s in svc.output() for s in said), 120, "the log to name it")
    finally:
        twin.loop_stop()
        twin.disconnect()
    # A twin may end the session it took (MQTT 5, no expiry): what is sent before the service
    # is back and subscribed again has nobody to go to. So: one sample at a time until answered.
    pub = Publisher(broker.url)
    for seq in range(1, 100):
        pub.send("dev-0", seq, np.zeros(6))
        pub.flush()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: any(k[0] == "dev-0" for k in col.predictions()), 5, "an answer")
            break
    assert any(k[0] == "dev-0" for k in col.predictions()), "never answered after the twin left"
    assert svc.alive() and "Traceback" not in svc.output()
    col.close()
    pub.close()


def test_device_reboot_boot_ids_and_reset_replies(bundles, broker, service):
    from edge import payloads

    x = make_samples(1, 30, seed=16)["dev-0"]
    col = Collector(broker.url)
    service()
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    for i in range(20):
        pub.raw(
            "sensors/dev-0/data",
            json.dumps({"seq": i + 1, "boot": 5, "values": x[i].tolist()}).encode(),
        )
    pub.flush()
    wait_until(lambda: ("dev-0", 20) in col.predictions(), 20, "first boot answered")
    # the device reboots: boot 6, seq from 1 again, in a binary frame v2
    pub.raw("sensors/dev-0/data", payloads.encode_frame(1, x[20:23], boot=6))
    pub.raw(
        "sensors/dev-0/data", json.dumps({"seq": 21, "boot": 5, "values": x[0].tolist()}).encode()
    )
    pub.flush()
    wait_until(lambda: any(d.get("error") == "stale" for _, d in col.of("errors/")), 20, "stale")
    after = [d for _, d in col.of("predictions/") if d.get("boot") == 6]
    assert after and after[0]["restart"] is True and after[0]["seq"] == 1
    import edge

    np.testing.assert_array_equal(
        np.asarray(after[0]["y"], np.float32), edge.load(bundles / BUNDLE).step("n", x[20:23])
    )
    pub.raw("sensors/dev-0/control", b'{"cmd": "reset", "seq": 100}')
    pub.flush()
    wait_until(lambda: bool(col.of("replies/dev-0")), 20, "a reply to the reset")
    assert col.of("replies/dev-0")[-1][1] == {
        "cmd": "reset",
        "ok": True,
        "next_seq": 100,
        "boot": None,
    }
    pub.send("dev-0", 50, x[0])  # before the new baseline: a duplicate, reported
    pub.flush()
    wait_until(lambda: any(d.get("error") == "duplicate" for _, d in col.of("errors/")), 20, "dup")


def test_restart_gap_without_boot_ids(bundles, broker, service):
    x = make_samples(1, 60, seed=17)["dev-0"]
    col = Collector(broker.url)
    service("--restart-gap", "10")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    for i in range(50):
        pub.send("dev-0", i + 1, x[i])
    pub.send("dev-0", 1, x[50])  # rebooted without a boot id: 49 behind > 10
    pub.flush()
    wait_until(
        lambda: (
            len(col.predictions()[("dev-0", 1)]) == 2
            if ("dev-0", 1) in col.predictions()
            else False
        ),
        20,
        "restart",
    )
    restarted = [d for _, d in col.of("predictions/") if d.get("restart")]
    assert len(restarted) == 1 and restarted[0]["seq"] == 1


def test_outputs_are_strict_json(bundles, broker, service):
    from edge import payloads

    col = Collector(broker.url)
    col.client.subscribe("edge/stats/#", 0)
    service("--stats-interval", "0.2")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    pub.raw("sensors/a/data", json.dumps({"seq": 1, "ts": 1.0, "values": [0.0] * 6}).encode())
    pub.raw("sensors/b/data", payloads.encode_frame(1, np.zeros((1, 6)), ts=float("inf")))
    pub.flush()
    wait_until(lambda: len(col.of("edge/stats/")) >= 2, 20, "stats")
    # each stats message names its process, as the status does (top tells twins apart by it)
    status = next(d for _, d in col.of("edge/status/") if d.get("state") == "online")
    assert {d["instance"] for _, d in col.of("edge/stats/")} == {status["instance"]}
    raw = []
    got = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw")
    got.on_message = lambda c, u, m: raw.append(m.payload)
    got.connect("127.0.0.1", int(broker.url.rsplit(":", 1)[1]))
    got.subscribe([("edge/stats/#", 0), ("errors/#", 0), ("predictions/#", 0)])
    got.loop_start()
    pub.raw("sensors/a/data", json.dumps({"seq": 2, "ts": 1.0, "values": [0.0] * 6}).encode())
    pub.raw("sensors/b/data", payloads.encode_frame(2, np.zeros((1, 6)), ts=float("inf")))
    pub.flush()
    wait_until(lambda: len(raw) >= 4, 20, "raw messages")
    got.loop_stop()
    for payload in raw:
        strict(payload)
    assert any(d.get("error") == "bad_ts" for _, d in col.of("errors/b"))


def test_a_damaged_log_entry_is_reported_and_the_rest_replayed(bundles, broker, service, tmp_path):
    samples = make_samples(4, 100, seed=18)
    col = Collector(broker.url)
    svc = service("--snapshot-interval", "1000", "--reorder-ms", "0")  # the log: one per message
    wait_until(col.online, 90, "runtime online")
    pub = Publisher(broker.url)
    for i in range(100):
        feed_good(pub, samples, i)
    pub.flush()
    wait_until(lambda: len(col.predictions()) == 400, 180, "every prediction")
    svc.kill9()
    (segment,) = (tmp_path / "state").glob("wal-*.log")
    data = bytearray(segment.read_bytes())
    # In the body of the middle sample record: where the middle byte of the file falls
    # depends on how many acknowledgement marks the run happened to log between records.
    frames, at = [], data.find(MAGIC)
    while at >= 0:
        frames.append(at)
        at = data.find(MAGIC, at + 1)
    records = [f for f in frames if data[f + 12 : f + 13] == b"S"]
    middle = records[len(records) // 2] + 16
    data[middle : middle + 4] = b"\xde\xad\xbe\xef"
    segment.write_bytes(bytes(data))
    svc = service("--snapshot-interval", "1000", "--reorder-ms", "0")
    wait_until(lambda: "damaged span" in svc.output(), 120, "the damage reported")
    wait_until(lambda: svc.output().count("recovered generation") == 2, 120, "recovery")
    replayed = int(svc.output().rsplit("recovered generation 0: ", 1)[1].split()[0])
    wait_until(lambda: "recovered_from_damage" in col.of("edge/status/")[-1][1], 90, "status")
    assert 400 - 2 <= replayed < 400  # one record lost (and perhaps the mark beside it)
    feed_good(pub, {"dev-0": np.zeros((1, 6))}, 0)  # a duplicate now: the service still answers
    pub.send("dev-0", 101, np.zeros(6))
    pub.flush()
    wait_until(lambda: ("dev-0", 101) in col.predictions(), 120, "a prediction after recovery")
    assert svc.alive()


def test_a_damaged_snapshot_falls_back_and_answers_stay_exact(bundles, broker, service, tmp_path):
    samples = make_samples(3, 90, seed=19)
    col = Collector(broker.url)
    pub = Publisher(broker.url)
    for part in range(3):
        svc = service("--snapshot-interval", "1000")
        if part == 2:  # the newest snapshot generation is damaged
            wait_until(lambda s=svc: "snapshot unusable" in s.output(), 30, "the fallback")
        wait_until(lambda p=part: col.online() and len(col.predictions()) >= 90 * p, 30, "online")
        for i in range(30 * part, 30 * (part + 1)):
            feed_good(pub, samples, i)
        pub.flush()
        wait_until(lambda p=part: len(col.predictions()) == 90 * (p + 1), 60, "predictions")
        assert svc.stop() == 0  # a checkpoint: one more snapshot generation
        if part == 1:
            newest = max((tmp_path / "state").glob("snap-*.bin"))
            data = bytearray(newest.read_bytes())
            data[len(data) // 2] ^= 0xFF
            newest.write_bytes(bytes(data))
    assert_exact(col.predictions(), offline(bundles / BUNDLE, samples))


def test_a_broker_flood_beyond_queue_size_waits_on_disk_and_is_answered(bundles, broker, service):
    """Mosquitto sends its whole backlog despite Receive Maximum; what lies beyond queue_size
    goes to the spill file, and every sample is still answered exactly, in order."""
    samples = make_samples(60, 40, seed=17)
    col = Collector(broker.url)
    first = service()
    wait_until(col.online, 20, "runtime online")  # the broker now keeps a session for us
    assert first.stop() == 0
    pub = Publisher(broker.url)
    for i in range(40):
        feed_good(pub, samples, i)
    pub.flush(120)
    # every answer due at once (none waits in a reorder hold): the broker's flood meets a
    # full answer window
    svc = service(
        "--queue-size", "5", "--max-unacked", "5", "--max-batch", "5", "--reorder-ms", "0"
    )
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 180, "the whole backlog")
    assert_exact(col.predictions(), expected)
    assert "wait on disk" in svc.output()
    assert svc.stop() == 0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_retained_messages_are_stepped_once(bundles, broker, service, tmp_path, protocol):
    """A device that publishes with the retain flag: each sample and command acts once, when
    it is published. The broker's stored copies, sent again at each later subscribe (after a
    restart, or to a fresh state directory that knows no stream), are never stepped and a
    retained reset never resets again: MQTT 5 asks the broker not to send them, 3.1.1 gets
    them and answers each one `retained`."""
    import edge

    x = make_samples(1, 9, seed=21)["dev-0"]
    col = Collector(broker.url)
    svc = service("--protocol", protocol)
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)

    def retained(topic, doc):
        pub.infos.append(pub.client.publish(topic, json.dumps(doc).encode(), qos=1, retain=True))

    retained("sensors/dev-0/data", {"seq": 1, "values": x[:1].tolist()})
    for i in (2, 3, 4):
        pub.send("dev-0", i, x[i - 1 : i])
    retained("sensors/dev-0/control", {"cmd": "reset", "seq": 5})
    pub.send("dev-0", 5, x[4:5])
    pub.flush()
    wait_until(lambda: ("dev-0", 5) in col.predictions(), 30, "seq 1 .. 5 answered")
    assert svc.stop() == 0

    def retained_errors():
        return [d for t, d in col.of("errors/dev-0") if d["error"] == "retained"]

    svc = service("--protocol", protocol)  # the same state: subscribes again
    for i in (6, 7, 8):
        pub.send("dev-0", i, x[i - 1 : i])
    pub.flush()
    wait_until(lambda: ("dev-0", 8) in col.predictions(), 30, "seq 6 .. 8 answered")
    assert svc.stop() == 0
    # answers go out in the order their messages came in, and the broker sends its stored
    # copies right after the subscribe: their answers are in by now
    assert len(retained_errors()) == (0 if protocol == "5" else 2), col.of("errors/")

    fresh = service("--protocol", protocol, state=tmp_path / "fresh")
    pub.send("dev-0", 9, x[8:9])
    pub.flush()
    wait_until(lambda: ("dev-0", 9) in col.predictions(), 30, "seq 9 answered")
    assert fresh.stop() == 0
    assert len(retained_errors()) == (0 if protocol == "5" else 4)
    assert len(retained_errors()) == len(col.of("errors/")), col.of("errors/")

    engine = edge.load(bundles / BUNDLE)
    want = list(engine.step("s", x[:4], seq=1))
    engine.reset("s", next_seq=5)
    want += list(engine.step("s", x[4:8], seq=5))
    want += list(edge.load(bundles / BUNDLE).step("s", x[8:9], seq=9))  # a stream new to it
    got = col.predictions()
    assert sorted(k for k in got if k[0] == "dev-0") == [("dev-0", i) for i in range(1, 10)]
    for i, y in enumerate(want, start=1):
        assert len(got[("dev-0", i)]) == 1, f"seq {i} answered {len(got[('dev-0', i)])} times"
        np.testing.assert_array_equal(got[("dev-0", i)][0], y, err_msg=f"seq {i}")
    for topic in ("sensors/dev-0/data", "sensors/dev-0/control"):
        pub.client.publish(topic, b"", qos=1, retain=True)
    pub.close()
    col.close()


def test_a_first_sample_overtaken_by_the_next_is_applied_first(bundles, broker, service):
    """Nothing says the first sample heard of a stream, or of a rebooted device's new life, is
    its lowest: overtaken by its successor on the wire, it is applied first (it used to be
    answered `late` and lost)."""
    import edge

    x = make_samples(1, 6, seed=22)["dev-0"]
    col = Collector(broker.url)
    service("--reorder-ms", "5000")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)

    def send(stream, seq, boot=None):
        doc = {"seq": seq, "values": x[seq - 1 : seq].tolist()}
        if boot is not None:
            doc["boot"] = boot
        pub.raw(f"sensors/{stream}/data", json.dumps(doc).encode())

    for seq in (2, 1, 3):
        send("new", seq)
    for seq in (1, 2, 3):
        send("boot", seq, boot=1)
    pub.flush()
    wait_until(lambda: ("boot", 3) in col.predictions(), 60, "the first life answered")
    for seq in (2, 1, 3):  # the device restarts; its new life's first sample is overtaken
        send("boot", seq, boot=2)
    pub.flush()
    answers = lambda: sum(map(len, col.predictions().values()))  # noqa: E731
    wait_until(lambda: answers() >= 9, 60, "every sample answered")
    one = edge.load(bundles / BUNDLE).step("s", x[:3], seq=1)
    got = col.predictions()
    for stream in ("new", "boot"):
        for seq in (1, 2, 3):
            assert len(got[(stream, seq)]) == (2 if stream == "boot" else 1), (stream, seq)
            for y in got[(stream, seq)]:  # a new life starts from the zero state again
                np.testing.assert_array_equal(y, one[seq - 1], err_msg=f"{stream} {seq}")
    assert col.of("errors/") == []


def test_a_reset_ends_a_wait_for_a_gap(bundles, broker, service):
    """A reset while samples wait for a gap: what waits is applied first (the reset is a
    barrier in message order), and the samples after it are applied at once, not after the
    hold (here 10 minutes: a test that waited for it would time out)."""
    import edge

    x = make_samples(1, 11, seed=23)["dev-0"]
    col = Collector(broker.url)
    service("--reorder-ms", "600000")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    pub.raw("sensors/k/control", b'{"cmd": "reset", "seq": 1}')  # starts at 1: no first wait
    for seq in (1, 2, 4):
        pub.send("k", seq, x[seq - 1 : seq])
    pub.raw("sensors/k/control", b'{"cmd": "reset", "seq": 10}')
    for seq in (10, 11):
        pub.send("k", seq, x[seq - 1 : seq])
    pub.flush()
    wait_until(lambda: ("k", 11) in col.predictions(), 60, "the samples after the reset")
    engine = edge.load(bundles / BUNDLE)
    want = dict(zip((1, 2), engine.step("s", x[:2], seq=1), strict=True))
    want[4] = engine.step("s", x[3:4], seq=4)[0]  # the gap skipped, as at the end of a hold
    engine.reset("s", next_seq=10)
    want.update(zip((10, 11), engine.step("s", x[9:11], seq=10), strict=True))
    got = col.predictions()
    assert sorted(got) == [("k", s) for s in sorted(want)]
    for seq, y in want.items():
        assert len(got[("k", seq)]) == 1
        np.testing.assert_array_equal(got[("k", seq)][0], y, err_msg=f"seq {seq}")
    assert col.of("errors/") == []


def test_refused_seqs_past_gaps_across_a_fleet_stay_bounded(bundles, broker, service, tmp_path):
    """A fleet whose sensors fail after a lost sample: each stream's refused seqs past its gap
    were remembered (up to 1024 a stream, kept in memory and in every snapshot), for as
    long as the gap stayed open: with enough such streams, without bound. They are kept
    up to ``VOIDS_KEPT`` in all, the farthest ahead forgotten, counted and logged once."""
    import edge.snapshot
    from edge.reorder import VOIDS_KEPT

    streams, per = 40, VOIDS_KEPT // 20  # twice the limit, each stream below its own
    col = Collector(broker.url)
    svc = service()
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    bad = np.full(6, 0.1).tolist()
    bad[0] = "broken"
    for i in range(streams):
        pub.send(f"f{i}", 1, np.full(6, 0.1))  # then seq 2 lost, and every later one refused
        for seq in range(3, 3 + per):
            pub.raw(f"sensors/f{i}/data", json.dumps({"seq": seq, "values": bad}).encode())
        pub.flush(300)
    refused = lambda: len(col.of("errors/f"))  # noqa: E731
    wait_until(lambda: refused() >= streams * per, 300, "every refusal answered")
    assert svc.stop() == 0  # its last snapshot holds what the reorder buffer keeps
    snap = edge.snapshot.read(max((tmp_path / "state").glob("snap-*.bin")))
    kept = sum(len(voids) for _, voids in snap.extra["reorder"].values())
    assert 0 < kept <= VOIDS_KEPT < streams * per
    said = [line for line in svc.output().splitlines() if "reorder_voids_forgotten: " in line]
    assert len(said) == 1, said
    assert "WARNING" in said[0] and f"kept at most {VOIDS_KEPT}" in said[0]
    counted = re.findall(r'"reorder_voids_forgotten": (\d+)', svc.output())
    assert counted and 0 < kept + int(counted[-1]) <= streams * per  # each let go counted


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_topics_of_an_earlier_configuration_are_unsubscribed(broker, service, protocol):
    """The broker session goes on under the same client id: a data topic changed since the
    last run stayed subscribed, and every message on it was answered ``bad_topic``."""
    col = Collector(broker.url)
    pub = Publisher(broker.url)
    first = service("--protocol", protocol)
    wait_until(col.online, 30, "online")

    def states() -> list[str]:
        return [doc.get("state") for _, doc in col.of("edge/status/")]

    first.stop()
    wait_until(lambda: states()[-1] == "offline", 30, "offline")
    svc = service("--protocol", protocol, "--data-topic", "dev/{stream}/in")
    wait_until(lambda: states()[-1] == "online", 30, "online again")  # subscribed by then
    pub.send("dev-1", 1, np.zeros(6), topic="dev/dev-1/in")
    wait_until(lambda: ("dev-1", 1) in col.predictions(), 60, "the new topic answered")
    pub.send("dev-2", 1, np.zeros(6))  # the earlier configuration's topic
    pub.send("dev-1", 2, np.zeros(6), topic="dev/dev-1/in")
    pub.flush()
    wait_until(lambda: ("dev-1", 2) in col.predictions(), 60, "the message after it answered")
    assert col.of("errors/") == []  # an answer to dev-2's would have come before dev-1's 2nd
    assert not any(k[0] == "dev-2" for k in col.predictions())
    assert "Traceback" not in svc.output()
    col.close()
    pub.close()


def test_a_fifo_where_the_subscriptions_are_recorded_does_not_stop_the_service(
    broker, service, tmp_path
):
    """The record of the topics subscribed to is read at each connect, in the network
    thread: a FIFO in its place waited for a writer for ever, and the service never
    subscribed, answered or said it was online. It is not read."""
    import os

    state = tmp_path / "state"
    state.mkdir()
    os.mkfifo(state / "subscriptions.json")
    col = Collector(broker.url)
    svc = service(state=state)
    wait_until(col.online, 60, "online")
    pub = Publisher(broker.url)
    pub.send("dev-1", 1, np.zeros(6))
    pub.flush()
    wait_until(lambda: ("dev-1", 1) in col.predictions(), 60, "the sample answered")
    assert svc.alive() and "Traceback" not in svc.output()
    col.close()
    pub.close()


def test_a_reload_whose_snapshot_does_not_fit_keeps_the_running_model(
    bundles, broker, small_disk, tmp_path
):
    """A reload writes a snapshot of the new model at once; on a full disk it cannot, and the
    reload is refused with the reason, the running model kept. The new model ran on over the
    old model's log: its samples of another feature count went into that log, and after a
    kill -9 neither bundle could serve the state directory again."""
    import shutil

    from edge.manifest import read_bundle
    from tests.mqtt_helpers import Serve

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    running = read_bundle(model)[0].model_id
    col = Collector(broker.url)
    svc = Serve(model, broker.url, small_disk / "state", "--reorder-ms", "0").start()
    try:
        wait_until(col.online, 20, "runtime online")
        pub = Publisher(broker.url)
        pub.send("z", 1, np.ones(6))
        pub.flush()
        wait_until(lambda: ("z", 1) in col.predictions(), 30, "the first answer")
        fill(small_disk / "filler")
        shutil.rmtree(model)
        shutil.copytree(bundles / "reg2-int8", model)  # 3 features, read at the reload
        reloads = lambda: [d for _, d in col.of("edge/status/edge-test") if "reload" in d]  # noqa: E731
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.flush()
        wait_until(reloads, 30, "the reload answered")
        assert reloads()[-1]["reload"].startswith("failed, the running model kept: snapshot failed")
        assert reloads()[-1]["model"] == running  # clf-int8
        assert reloads()[-1]["state"] == "degraded"
        pub.send("z", 2, np.ones(6))  # for the running model
        pub.flush()
        (small_disk / "filler").unlink()
        wait_until(lambda: ("z", 2) in col.predictions(), 30, "an answer of the running model")
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')  # with room: done
        pub.flush()
        done = "state layout changed: all streams reset"
        wait_until(lambda: reloads()[-1]["reload"] == done, 30, "the second reload answered")
        pub.send("z", 3, np.ones(3))
        pub.flush()
        wait_until(lambda: ("z", 3) in col.predictions(), 30, "an answer of the new model")
        assert [len(d["y"]) for _, d in col.of("predictions/z")] == [4, 4, 2]
        assert not col.of("errors/"), col.of("errors/")
        svc.kill9()
        svc = Serve(model, broker.url, small_disk / "state", "--reorder-ms", "0").start()
        pub.send("z", 4, np.ones(3))
        pub.flush()
        wait_until(lambda: ("z", 4) in col.predictions(), 30, "an answer after a restart")
    finally:
        svc.stop()


def test_a_reload_answered_while_degraded_says_degraded(bundles, broker, small_disk, tmp_path):
    """A reload (SIGHUP, as ``systemctl reload`` sends) answered while the state directory
    cannot be written: its answer went out in a retained status that said ``online``,
    without the reason, and the next round said ``degraded`` again. A monitor saw the
    service come back for a moment, and a script that read the status after its reload read
    ``online`` where nothing was acknowledged."""
    import signal

    from tests.mqtt_helpers import Serve

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    col = Collector(broker.url)
    # the state directory is the file system's root: the runtime's own log goes beside it
    svc = Serve(model, broker.url, small_disk, "--reorder-ms", "0").start()
    try:
        statuses = lambda: [d for _, d in col.of("edge/status/edge-test")]  # noqa: E731
        wait_until(lambda: statuses() and statuses()[-1]["state"] == "degraded", 30, "degraded")
        (model / "manifest.json").write_text("{")  # a bundle being copied, say
        svc.proc.send_signal(signal.SIGHUP)
        reloads = lambda: [d for d in statuses() if "reload" in d]  # noqa: E731
        wait_until(reloads, 30, "the reload answered")
        first = reloads()[0]
        assert first["reload"].startswith("failed, the running model kept: "), first
        assert "manifest.json" in first["reload"], first
        assert first["state"] == "degraded", first
        assert "Read-only file system" in first["reason"], first
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        pub = Publisher(broker.url)
        pub.send("z", 1, np.ones(6))
        pub.flush()
        wait_until(lambda: ("z", 1) in col.predictions(), 30, "answered once writable")
        wait_until(lambda: statuses()[-1]["state"] == "online", 30, "online again")
        assert statuses()[-1]["reload"] == first["reload"]  # the answer stays until the next
        pub.close()
    finally:
        assert svc.stop() == 0
        col.close()


def test_a_broker_away_for_long_is_not_a_log_line_per_attempt(bundles, tmp_path, caplog):
    """A broker down for a day was a warning every ``reconnect_max`` (2,880 a day at 30 s) on
    the gateway's SD card. The first three attempts, the 10th, every 100th and any whose
    reason changes are logged; the rest at debug level, and the connect says how many failed."""
    import logging
    from types import SimpleNamespace

    from tests.test_service_overload import service

    svc = service(bundles, tmp_path)
    try:
        refused = ConnectionRefusedError(111, "Connection refused")
        with caplog.at_level(logging.DEBUG, logger="edge.service"):
            for _ in range(1000):
                svc._on_connect_fail(refused)
            svc._on_connect_fail(OSError(113, "No route to host"))  # another reason: said
            ok = SimpleNamespace(is_failure=False)
            svc._on_connect(svc.client, None, SimpleNamespace(session_present=True), ok, None)
        said = [r for r in caplog.records if r.levelno >= logging.WARNING]
        attempts = [int(r.getMessage().split("attempt ")[1].split()[0]) for r in said]
        assert attempts == [1, 2, 3, 10, *range(100, 1001, 100), 1001], attempts
        assert "logged at attempt 10 and every 100th" in said[2].getMessage()
        assert "No route to host" in said[-1].getMessage()
        quiet = [r for r in caplog.records if r.levelno == logging.DEBUG and "attempt" in r.msg]
        assert len(quiet) == 1000 - 14  # still there, at debug level
        connected = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
        assert connected[-1].endswith("after 1001 failed attempts"), connected
    finally:
        svc.processor.journal.close()
        svc.lock.release()


def test_two_serves_with_one_client_id_both_name_the_likely_cause_while_it_lasts(
    broker, service, tmp_path
):
    """Two serves with one client id (a copy started by hand beside the systemd one): the
    broker hands the session back and forth for as long as both run. One of them held each
    connection until the other's reconnect delay ran out (up to `reconnect_max`), longer than
    a flap, so each drop was news to it, a warning for ever, and the likely cause was said
    once in its log, at the start. Both now say it again while it goes on (the 10th)."""
    flags = ("--reconnect-max", "6")
    first = service(*flags)
    wait_until(lambda: "connected to" in first.output(), 60, "the first connected")
    second = service(*flags, state=tmp_path / "second" / "state")
    said = re.compile(r"dropped the connection .* 10 times in a row: does another client use")
    for svc in (first, second):
        wait_until(lambda s=svc: said.search(s.output()), 300, "the cause named again")
    for svc in (first, second):
        assert svc.alive() and "Traceback" not in svc.output()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_another_runtime_with_our_runtime_id_is_named_in_the_log(
    bundles, broker, service, tmp_path, protocol
):
    """Two serves with client ids of their own and one runtime_id (a configuration copied to
    a second gateway, a second model's unit): each overwrote the other's retained status and
    the one that ended first had its last will say `offline` for both, with nothing in either
    log. The first says so when the second comes online; the second takes nothing of its own
    for another's."""
    col = Collector(broker.url)
    first = service("--protocol", protocol, "--ha-discovery", "true")
    wait_until(lambda: col.online(), 30, "the first online")
    topics = ("data", "control", "prediction", "error", "reply")
    second = service(
        "--protocol",
        protocol,
        "--client-id",
        "edge-test-2",
        "--runtime-id",
        "edge-test",
        *(a for t in topics for a in (f"--{t}-topic", f"two/{{stream}}/{t}")),
        state=tmp_path / "second" / "state",
    )
    said = "another runtime publishes its status on our status topic 'edge/status/edge-test'"
    wait_until(lambda: said in first.output(), 60, "the first to name the second")
    assert "give every serve a runtime_id of its own" in first.output()
    assert "Home Assistant sensors" in first.output()
    assert said not in second.output()  # nothing of its own taken for another's
    second.kill9()  # its last will: not news of another runtime (ours look the same)
    assert first.alive() and "Traceback" not in first.output()
    assert said not in second.output() and "Traceback" not in second.output()
    col.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_another_runtime_answering_our_streams_on_our_topics_is_named_in_the_log(
    bundles, broker, service, tmp_path, protocol
):
    """Two serves of their own client and runtime ids that read one data topic and answer
    on one prediction topic (a second gateway or model installed from the same kit): each
    answered every sample on the same topic, from a state of its own, and neither said a
    word. Each says so now: the second from the first's stored status, the first when the
    second comes online. A third answering elsewhere (two models compared) is no news."""
    col = Collector(broker.url)
    first = service("--protocol", protocol)
    wait_until(lambda: col.online(), 30, "the first online")

    def start(name: str, *flags: str) -> Any:
        return service(
            "--protocol", protocol, "--client-id", name, "--runtime-id", name, *flags,
            state=tmp_path / name / "state",
        )  # fmt: skip

    third = start("compared", "--prediction-topic", "compared/{stream}")
    wait_until(lambda: col.online("compared"), 60, "the third online")
    second = start("copied")
    said = "reads samples on 'sensors/{stream}/data' and answers on 'predictions/{stream}', as we"
    wait_until(lambda: said in second.output(), 60, "the second to name the first")
    assert "runtime 'edge-test' (status on 'edge/status/edge-test')" in second.output()
    wait_until(lambda: said in first.output(), 60, "the first to name the second")
    assert "runtime 'copied' (status on 'edge/status/copied')" in first.output()
    # the third's answers go elsewhere; the others' to other topics than its own
    wait_until(lambda: col.online("copied"), 60, "the second online")
    assert "as we do" not in third.output()
    assert "runtime 'compared'" not in first.output() + second.output()
    for svc in (first, second, third):
        assert svc.alive() and "Traceback" not in svc.output()
    col.close()


def test_a_session_handed_back_and_forth_is_not_two_log_lines_per_round(bundles, tmp_path, caplog):
    """Another client with our client id takes the session at every connect: each round was
    a 'disconnected' warning (or a 'session taken over' error) and a 'connected' line, for as
    long as the twin ran (5,760 lines a day at the default `reconnect_max`). Past the third in
    a row they go to debug level (the 10th and every 100th still said); a connection that held
    is said again."""
    import logging
    from types import SimpleNamespace

    from tests.test_service_overload import service

    svc = service(bundles, tmp_path)
    now = [1000.0]
    svc._clock = lambda: now[0]
    ok = SimpleNamespace(is_failure=False)
    dropped = SimpleNamespace(value=0x80, is_failure=True)
    taken = SimpleNamespace(value=0x8E, is_failure=True)

    def round_trip(lasting: float, reason: object = dropped) -> None:
        svc._on_connect(svc.client, None, SimpleNamespace(session_present=True), ok, None)
        now[0] += lasting
        svc._on_disconnect(svc.client, None, None, reason, None)

    try:
        with caplog.at_level(logging.DEBUG, logger="edge.service"):
            round_trip(3600)  # a connection that held: its drop is news
            for i in range(500):
                round_trip(0.5, taken if i % 2 else dropped)
            round_trip(3600)  # the twin is gone: a connection held again
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        drops = [m for m in said if "disconnected" in m or "gave our session" in m]
        # the first (after an hour), flaps 1-3, 10, 100..500, and the one after the long one
        assert len(drops) == 1 + 3 + 1 + 5 + 1, drops
        assert "more at the 10th and every 100th" in drops[3]
        connects = [m for m in said if m.startswith("connected to")]
        assert len(connects) == 1 + 3, connects  # the first, then until the third flap
        quiet = [r for r in caplog.records if r.levelno == logging.DEBUG]
        assert len(quiet) == 2 * 502 - len(drops) - len(connects)  # the rest, still there
    finally:
        svc.processor.journal.close()
        svc.lock.release()


def test_a_broker_that_never_answers_a_connection_is_summarised_as_failed_attempts(
    bundles, tmp_path, caplog
):
    """A broker that takes the TCP connection and never sends its CONNACK (stopped, hung) had
    each attempt end in 'disconnected from the broker (Keep alive timeout)', a warning per
    attempt for as long as it hung. Such an attempt is a failed one, logged as they are."""
    import logging
    from types import SimpleNamespace

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from tests.test_service_overload import service

    svc = service(bundles, tmp_path)
    timeout = ReasonCode(PacketTypes.DISCONNECT, "Keep alive timeout")
    try:
        with caplog.at_level(logging.DEBUG, logger="edge.service"):
            for _ in range(300):  # never connected: each close ends an attempt
                svc._on_pre_connect(svc.client, None)
                svc._on_disconnect(svc.client, None, None, timeout, None)
            # paho may tell of one disconnect twice (the broker's DISCONNECT, the socket's
            # close): said once, and not as an attempt that failed
            ok = SimpleNamespace(is_failure=False)
            svc._on_connect(svc.client, None, SimpleNamespace(session_present=True), ok, None)
            for _ in range(2):
                svc._on_disconnect(svc.client, None, None, timeout, None)
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert [int(m.split("retrying, attempt ")[1].split()[0]) for m in said[:-1]] == [
            1, 2, 3, 10, 100, 200, 300,
        ], said  # fmt: skip
        assert all("did not answer the connection (Keep alive timeout)" in m for m in said[:-1])
        assert said[-1].startswith("disconnected from the broker (Keep alive timeout)"), said
    finally:
        svc.processor.journal.close()
        svc.lock.release()


def test_answers_the_broker_refuses_are_not_a_log_line_each(bundles, tmp_path, caplog):
    """A broker whose ACL denies one stream's prediction topic (and goes on, as MQTT 5 lets
    it: a PUBACK 'Not authorized') refused every answer of that stream, and each refusal was
    an error line: a device at 10 Hz, 864,000 lines a day. As for refused samples, the first
    10 a minute are logged at their level, the rest at debug level; all are counted."""
    import logging

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from edge.outbox import Outbound
    from tests.test_service_overload import service

    svc = service(bundles, tmp_path)
    svc._log_refusal.clock = lambda: 0.0  # all within one minute
    denied = ReasonCode(PacketTypes.PUBACK, "Not authorized")
    try:
        with caplog.at_level(logging.DEBUG, logger="edge.service"):
            for mid in range(1, 501):
                o = Outbound("predictions/b", b"{}", lsn=mid)
                svc.outbox.put([o])
                svc.outbox.sent(mid, svc.outbox.take()[0])
                svc.acks.put((mid, denied))
            svc._drain_acks()
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) == 10 and all(
            "refused the answer on predictions/b" in r.getMessage() for r in loud
        )
        assert "further ones at debug level for up to 1 min" in loud[-1].getMessage()
        quiet = [r for r in caplog.records if "refused the answer" in r.getMessage()]
        assert len(quiet) == 500 and svc.metrics.counters["publish_refused"] == 500
        assert len(svc.outbox) == 0  # each done with, none left in flight
        # Likewise the answers too large for the broker, each replaced by a report.
        caplog.clear()
        svc.processor._log_note.clock = lambda: 0.0
        with caplog.at_level(logging.DEBUG, logger="edge.service"):
            for seq in range(100):
                big = Outbound("predictions/b", json.dumps({"seq": seq}).encode(), lsn=seq + 1)
                svc.processor.unsendable(big, "the broker's maximum packet size (9 bytes)")
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) == 10 and "stream b seq 0: answer of" in loud[0].getMessage()
    finally:
        svc.processor.journal.close()
        svc.lock.release()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_session_the_broker_no_longer_has_is_reported_as_messages_lost(broker, service, protocol):
    """A broker restarted without persistence (or a session past its expiry, mosquitto's
    `persistent_client_expiration`) has no session for us at the reconnect: what was published
    on our topics meanwhile is gone, and the only trace was 'session present: False' at info
    level. It is a warning naming the loss (and counted); a first connect, and a session the
    broker kept across a restart of the service, are not."""
    col = Collector(broker.url)
    first = service("--protocol", protocol)
    wait_until(col.online, 30, "online")
    first.stop()  # the session stays at the broker
    svc = service("--protocol", protocol)
    wait_until(lambda: svc.output().count("session present: True") == 1, 30, "reconnected")
    assert "kept no session" not in svc.output()
    broker.restart()  # no persistence: every session gone
    wait_until(lambda: "kept no session for client id 'edge-test'" in svc.output(), 60, "a warning")
    assert "messages published on our topics while we were away are lost" in svc.output()
    assert svc.alive() and "Traceback" not in svc.output()
    col.close()


def test_idle_connections_to_the_metrics_endpoint_hold_no_thread_or_descriptor(
    bundles, broker, service, tmp_path
):
    """A client of `metrics_port` that connects and never sends (a port scanner, a
    slowloris) held a thread and a file descriptor of the service for as long as it stayed:
    a thousand of them took every descriptor of a service run with the usual limit (1,024),
    and with them its log segments and broker connections. Connections past a few are closed
    at once, and an idle one after its timeout; samples are answered meanwhile, and a scrape
    works once they are gone."""
    import os
    import selectors
    import socket
    import urllib.request

    from firmware_sim.broker import free_port

    port = free_port()
    col = Collector(broker.url)
    svc = service("--metrics-port", str(port), "--stats-interval", "0")
    wait_until(col.online, 30, "online")
    threads = f"/proc/{svc.proc.pid}/task"
    before = len(os.listdir(threads))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(200)]
    pub = Publisher(broker.url)
    pub.send("m-1", 1, np.zeros(6))
    pub.flush()
    wait_until(lambda: ("m-1", 1) in col.predictions(), 60, "an answer meanwhile")
    sel = selectors.DefaultSelector()
    for s in idle:
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + 120
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            assert key.fileobj.recv(1) == b""  # closed by the service, nothing sent
            sel.unregister(key.fileobj)
    open_ones = len(sel.get_map())
    for s in idle:
        s.close()
    assert open_ones == 0, f"{open_ones} idle connections still held by the service"
    wait_until(lambda: len(os.listdir(threads)) <= before + 1, 60, "no thread left behind")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
    assert b"edge_lstm_messages_in_total 1.0" in body
    assert svc.alive() and "Traceback" not in svc.output()
    pub.close()
    col.close()


def _tls_files(d):
    """A CA, a broker certificate for 127.0.0.1, and client certificates: one valid, one
    expired yesterday (made with ``openssl``)."""
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    key = ["-newkey", "rsa:2048", "-nodes"]
    run(
        "req", "-x509", *key, "-subj", "/CN=ca", "-days", "2", "-keyout", "ca.key", "-out", "ca.crt"
    )
    for name, days, san in (
        ("server", "2", "IP:127.0.0.1"),
        ("client", "2", "DNS:edge"),
        ("expired", "-1", "DNS:edge"),
    ):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        run("req", *key, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ca = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"]
        sign = ["-days", days, "-extfile", f"{name}.ext", "-out", f"{name}.crt"]
        run("x509", "-req", "-in", f"{name}.csr", *ca, *sign)
    return d


def test_a_client_certificate_the_broker_refuses_is_named_and_tls_serves(service, tmp_path):
    """Over TLS 1.3 the broker refuses our client certificate (expired, or none given) with
    an alert read only after the handshake: the log said `the broker did not answer the
    connection (Unspecified error)` at every attempt, as for a hung broker. It says what the
    broker's TLS alert says; with a valid certificate, samples are answered over TLS."""
    from firmware_sim.broker import Broker, free_port

    certs = _tls_files(tmp_path / "certs")
    port = free_port()
    listener = (
        f"listener {port} 127.0.0.1\ncafile {certs}/ca.crt\ncertfile {certs}/server.crt\n"
        f"keyfile {certs}/server.key\nrequire_certificate true\n"
    )
    broker = Broker(tmp_path / "tls-broker", embedded=False, extra=listener).start()
    url = f"mqtts://127.0.0.1:{port}"
    tls = ("--tls-ca", str(certs / "ca.crt"), "--reconnect-max", "2")
    try:
        cert = ("--tls-cert", str(certs / "expired.crt"), "--tls-key", str(certs / "expired.key"))
        expired = service(*tls, *cert, url=url, state=tmp_path / "s1")
        said = "ended the connection before answering it: [SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED]"
        wait_until(lambda: said in expired.output(), 60, "the broker's alert in the log")
        expired.stop()
        col = Collector(broker.url)
        cert = ("--tls-cert", str(certs / "client.crt"), "--tls-key", str(certs / "client.key"))
        svc = service(*tls, *cert, url=url, state=tmp_path / "s2")
        wait_until(col.online, 60, "online over TLS")
        pub = Publisher(broker.url)
        pub.send("t-1", 1, np.zeros(6))
        pub.flush()
        wait_until(lambda: ("t-1", 1) in col.predictions(), 60, "an answer over TLS")
        assert "Traceback" not in svc.output()
        pub.close()
        col.close()
    finally:
        broker.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_broker_whose_max_qos_is_0_is_named_as_the_reason_it_refuses_us(
    service, tmp_path, protocol
):
    """Mosquitto with `max_qos 0` refuses our QoS 1 last will at every connect: over MQTT 5
    with `QoS not supported`, over 3.1.1 by closing the connection without a word, which the
    log told as `did not answer the connection (Unspecified error)`, the line of a hung
    broker. Both now say what the broker wants changed."""
    from firmware_sim.broker import Broker

    broker = Broker(tmp_path / "qos0", embedded=False, extra="max_qos 0\n").start()
    try:
        svc = service("--protocol", protocol, "--reconnect-max", "2", url=broker.url)
        said = "answers and subscriptions are QoS 1: the broker's max_qos must be 1 or 2"
        wait_until(lambda: said in svc.output(), 60, "the reason in the log")
        if protocol == "5":
            assert "refused the connection: QoS not supported" in svc.output()
        else:
            assert "closed, no reason given (mosquitto closes an MQTT 3.1.1" in svc.output()
        assert "Unspecified error" not in svc.output()
    finally:
        broker.stop()


def test_a_subscription_granted_at_qos_0_is_a_warning(bundles, tmp_path, caplog):
    """A broker whose maximum QoS is 0 for subscriptions grants our QoS 1 ones at QoS 0 (its
    SUBACK says so): messages then come unacknowledged, those in hand at a crash are lost and
    none are kept while the service is away. The service went on as if granted QoS 1; the
    downgrade is now a warning naming the filters, and counted. (Mosquitto 2.0.11 cannot
    show it: with `max_qos 0` it refuses the connection first, which the log names.)"""
    import logging

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from tests.test_service_overload import service

    svc = service(bundles, tmp_path)
    qos0, qos1 = (ReasonCode(PacketTypes.SUBACK, identifier=q) for q in (0, 1))
    try:
        svc._subscribing = (7, ["sensors/+/data", "sensors/+/control", "edge/control/x"])
        with caplog.at_level(logging.INFO, logger="edge.service"):
            svc._on_subscribe(svc.client, None, 7, [qos1, qos1, qos1], None)
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            svc._on_subscribe(svc.client, None, 7, [qos0, qos1, qos0], None)
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(said) == 1 and said[0].startswith(
            "the broker granted 'sensors/+/data', 'edge/control/x' at QoS 0 only"
        ), said
        assert svc.metrics.counters["subscriptions_downgraded"] == 1
        assert svc._deaf is None  # not refused: the service still hears them
    finally:
        svc.processor.journal.close()
        svc.lock.release()


def test_stats_larger_than_the_brokers_packet_size_do_not_cost_the_connection(
    broker, service, tmp_path
):
    """An MQTT 5 broker with a small maximum packet size (mosquitto `max_packet_size 700`)
    closes the connection on a larger packet: the stats message (about 1 kB) was sent at
    every `stats_interval`, and the service reconnected each time, its answers in flight with
    it, while the log blamed a second client id or the ACL. It is not sent, and said once;
    answers go on, on one connection."""
    from firmware_sim.broker import Broker

    small = Broker(tmp_path / "small", embedded=False, extra="max_packet_size 700\n").start()
    try:
        col = Collector(small.url)
        svc = service("--stats-interval", "0.2", "--log-level", "debug", url=small.url)
        wait_until(col.online, 30, "online")
        said = "not sent on edge/stats/edge-test: "
        wait_until(lambda: svc.output().count(said) >= 5, 60, "five stats messages not sent")
        pub = Publisher(small.url)
        for seq in range(1, 6):
            pub.send("p-1", seq, np.zeros(6))
        pub.flush()
        wait_until(lambda: ("p-1", 5) in col.predictions(), 60, "the answers")
        out = svc.output()
        assert "over the broker's maximum packet size (700 bytes)" in out
        assert out.count("WARNING edge.service: not sent on") == 1, out
        assert "disconnected" not in out and out.count("connected to") == 1, out
        pub.close()
        col.close()
    finally:
        small.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_refused_login_names_who_the_service_said_it_was(service, tmp_path, protocol):
    """Mosquitto with `allow_anonymous false` answers a wrong password and a client without a
    user name alike, `Not authorized`, and the log said only that: read as the ACL. The line
    now says which user name (and which password file) was refused, or that none was given."""
    from firmware_sim.broker import Broker

    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "edge", "right"], check=True)
    conf = f"allow_anonymous false\npassword_file {passwd}\n"
    broker = Broker(tmp_path / "auth", embedded=False, extra=conf).start()
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong\n")
    right = tmp_path / "right"
    right.write_text("right\n")
    try:
        args = ("--protocol", protocol, "--reconnect-max", "2")
        anonymous = service(*args, url=broker.url, state=tmp_path / "s1")
        said = "refused the connection: Not authorized (no user name given: the broker may"
        wait_until(lambda: said in anonymous.output(), 60, "the anonymous refusal named")
        anonymous.stop()
        login = ("--username", "edge", "--password-file")
        refused = service(*args, *login, str(wrong), url=broker.url, state=tmp_path / "s2")
        said = f"Not authorized (user name 'edge', password_file {wrong}: check them"
        wait_until(lambda: said in refused.output(), 60, "the refused user named")
        refused.stop()
        col = Collector(broker.url, configure=lambda c: c.username_pw_set("edge", "right"))
        svc = service(*args, *login, str(right), url=broker.url, state=tmp_path / "s3")
        wait_until(col.online, 60, "online with the right password")
        assert svc.alive()
        col.close()
    finally:
        broker.stop()


def test_a_broker_on_a_unix_socket_is_served(bundles, service, tmp_path):
    """Mosquitto 2 listens on a unix socket too (`listener 0 /run/mosquitto/mqtt.sock`), the
    way to reach a broker on the same gateway without a TCP port: `broker = unix:///PATH`
    was refused (`expected mqtt://HOST:PORT or mqtts://HOST:PORT`). It connects there, and
    samples are answered; TLS over it is refused in one line."""
    import shutil
    import tempfile

    from firmware_sim.broker import Broker

    short = Path(tempfile.mkdtemp(prefix="mq-", dir="/tmp"))  # a socket path is <= 107 bytes
    sock = short / "mqtt.sock"
    broker = Broker(tmp_path / "ux", embedded=False, extra=f"listener 0 {sock}\n").start()
    try:
        wait_until(sock.exists, 30, "the broker's socket")
        col = Collector(broker.url)
        svc = service(url=f"unix://{sock}")
        wait_until(col.online, 60, "online over the unix socket")
        pub = Publisher(broker.url)
        pub.send("u-1", 1, np.zeros(6))
        pub.flush()
        wait_until(lambda: ("u-1", 1) in col.predictions(), 60, "an answer")
        assert f"connected to unix://{sock}" in svc.output() and svc.alive()
        pub.close()
        col.close()
    finally:
        broker.stop()
        shutil.rmtree(short, ignore_errors=True)
    bad = subprocess.run(
        [sys.executable, "-m", "edge", "serve", "--model", str(bundles / "clf-int8"),
         "--broker", f"unix://{sock}", "--tls-ca", str(sock), "--state-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "no TLS over a unix socket" in bad.stderr, bad.stderr


def test_a_request_trickled_to_the_metrics_endpoint_is_cut_off(broker, service):
    """A slowloris sends its request a byte at a time, each before the idle timeout: every
    connection the endpoint serves at once was held for as long as it kept on, and no scrape
    got through. Each connection is served for a bounded time in all, then closed."""
    import select
    import socket
    import urllib.request

    from edge.metrics import HTTP_CONNECTIONS
    from firmware_sim.broker import free_port

    port = free_port()
    col = Collector(broker.url)
    service("--metrics-port", str(port), "--stats-interval", "0")
    wait_until(col.online, 30, "online")
    slow = [
        socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(HTTP_CONNECTIONS)
    ]
    line = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
    held, deadline, i = list(slow), time.monotonic() + 180, 0
    while held and time.monotonic() < deadline:
        for s in list(held):
            try:
                s.sendall(line[i % len(line) : i % len(line) + 1])  # one byte a second
            except OSError:  # closed by the service: what this test waits for
                held.remove(s)
        ready, _, _ = select.select(held, [], [], 1.0)  # the slowloris's pace
        for s in ready:
            with contextlib.suppress(OSError):  # a reset rather than a close: as good
                s.recv(65536)  # the close (or an error page before it)
            held.remove(s)
        i += 1
    for s in slow:
        s.close()
    assert not held, f"{len(held)} trickling connections still served"
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
    assert b"edge_lstm_messages_in_total" in body
    col.close()


@contextlib.contextmanager
def failed_reload_under(
    bundles: Path, tmp_path: Path, max_packet: int
) -> Iterator[tuple[Any, Path, dict[str, Any], dict[str, Any]]]:
    """A service on a bundle under a long path, behind a broker of that ``max_packet_size``,
    asked to reload once its bundle is gone: (the service, the path, its status with the
    reload's answer, the status the broker holds retained then)."""
    import shutil

    from firmware_sim.broker import Broker
    from tests.mqtt_helpers import Serve

    model = tmp_path / ("b" * 250) / ("c" * 250) / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    extra = f"max_packet_size {max_packet}\n"
    small = Broker(tmp_path / "small", embedded=False, extra=extra).start()
    svc = Serve(model, small.url, tmp_path / "state").start()
    try:
        col = Collector(small.url)
        wait_until(col.online, 30, "online")
        shutil.rmtree(model)  # the reload finds no bundle, and says where it looked
        pub = Publisher(small.url)
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.flush()
        reloads = lambda: [d for _, d in col.of("edge/status/edge-test") if "reload" in d]  # noqa: E731
        wait_until(reloads, 30, "the reload answered")
        late = Collector(small.url, client_id="late")  # what the broker holds now
        wait_until(lambda: late.of("edge/status/edge-test"), 30, "the retained status")
        yield svc, model, reloads()[-1], late.of("edge/status/edge-test")[-1][1]
        for c in (col, late, pub):
            c.close()
    finally:
        svc.stop()
        small.stop()


def test_a_status_larger_than_the_brokers_packet_size_is_shortened_and_held(bundles, tmp_path):
    """A retained status over the broker's maximum packet size (a reload failure naming a
    long bundle path) was not sent but counted as said: the broker went on showing the
    previous status, the failure nowhere but in the log. It is cut to fit, still JSON, and
    the broker holds it; the log keeps the whole text."""
    with failed_reload_under(bundles, tmp_path, 700) as (svc, model, status, held):
        said = status["reload"]
        assert said.startswith("failed, the running model kept: ") and "[...]" in said, said
        assert held["reload"] == said
        assert f"{model}: not a bundle directory" in svc.output()
        assert "status on edge/status/edge-test shortened" in svc.output()
        assert "disconnected" not in svc.output() and svc.alive()


def test_a_status_too_large_even_cut_keeps_the_reloads_outcome(bundles, tmp_path):
    """A status over the broker's maximum packet size even with its texts cut went out with
    the base fields only: a failed reload's answer vanished from it, the broker showing
    "online" as if nothing had been asked. It keeps the outcome and what of the reason fits."""
    with failed_reload_under(bundles, tmp_path, 220) as (svc, model, status, held):
        word, _, why = status["reload"].partition(": ")
        assert word == "failed" and why and str(model).startswith(why), status  # cut to fit
        assert held == status
        assert f"{model}: not a bundle directory" in svc.output()
        assert "disconnected" not in svc.output() and svc.alive()

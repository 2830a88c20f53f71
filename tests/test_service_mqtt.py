"""``edge-lstm serve`` against a real Mosquitto: exactly-once state over at-least-once MQTT."""

import json
import random
import threading
import time

import numpy as np
import pytest

from tests.mqtt_helpers import Collector, Publisher, Serve, offline, wait_until

pytestmark = pytest.mark.broker
BUNDLE = "clf-int8"


def make_samples(streams: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"dev-{i}": rng.normal(0, 3, (n, 6)) for i in range(streams)}


def assert_exact(got, expected):
    missing = sorted(set(expected) - set(got))
    assert not missing, f"{len(missing)} predictions missing, e.g. {missing[:5]}"
    for key, ys in got.items():
        for y in ys:  # every copy, duplicates included, must be the offline answer
            np.testing.assert_array_equal(y, expected[key], err_msg=str(key))


def test_duplicates_never_double_count(bundles, broker, service):
    samples = make_samples(5, 40, seed=1)
    col = Collector(broker.url)
    svc = service()
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    rng = random.Random(3)
    sent = []
    for stream, x in samples.items():
        seq = 1
        while seq <= len(x):
            k = rng.choice([1, 1, 1, 3])
            k = min(k, len(x) - seq + 1)
            pub.send(stream, seq, x[seq - 1 : seq - 1 + k])
            sent.append((stream, seq, k))
            if rng.random() < 0.3:  # QoS 1 redelivery, or a device resending
                old = rng.choice(sent)
                pub.send(old[0], old[1], samples[old[0]][old[1] - 1 : old[1] - 1 + old[2]])
            seq += k
    pub.flush()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 30, "every prediction")
    time.sleep(0.3)
    got = col.predictions()
    assert_exact(got, expected)
    assert all(len(v) == 1 for v in got.values()), "a duplicate sample was answered twice"
    assert svc.stop() == 0
    assert col.of("edge/status/edge-test")[-1][1]["state"] == "offline"


def test_kill_9_at_random_points_loses_nothing(bundles, broker, service):
    samples = make_samples(6, 150, seed=2)
    col = Collector(broker.url)
    svc = service("--snapshot-interval", "0.5")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)

    def feed():
        for i in range(150):
            for stream, x in samples.items():
                pub.send(stream, i + 1, x[i])
            time.sleep(0.004)

    feeder = threading.Thread(target=feed)
    feeder.start()
    rng = random.Random(7)
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 1.0))
        svc.kill9()
        time.sleep(rng.uniform(0.0, 0.3))
        svc = service("--snapshot-interval", "0.5")
    feeder.join()
    pub.flush()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 60, "every prediction")
    assert_exact(col.predictions(), expected)
    assert "recovered generation" in svc.output()


def test_broker_restart_with_persistence(bundles, persistent_broker, tmp_path):
    broker = persistent_broker
    samples = make_samples(4, 60, seed=3)
    col = Collector(broker.url)
    svc = Serve(
        bundles / BUNDLE,
        broker.url,
        tmp_path / "state",
        "--reconnect-min",
        "0.1",
        "--reconnect-max",
        "0.5",
    ).start()
    try:
        wait_until(col.online, 20, "runtime online")
        pub = Publisher(broker.url)
        for i in range(30):
            for stream, x in samples.items():
                pub.send(stream, i + 1, x[i])
        pub.flush()
        wait_until(lambda: len(col.predictions()) >= 40, 20, "some predictions")
        broker.restart()
        col.client.reconnect_delay_set(0.1, 0.5)
        for i in range(30, 60):
            for stream, x in samples.items():
                pub.send(stream, i + 1, x[i])
        pub.flush(60)
        expected = offline(bundles / BUNDLE, samples)
        wait_until(lambda: set(expected) <= set(col.predictions()), 60, "every prediction")
        assert_exact(col.predictions(), expected)
    finally:
        assert svc.stop() == 0, svc.output()


def test_malformed_flood_does_not_hurt_good_streams(bundles, broker, service):
    samples = make_samples(3, 50, seed=4)
    col = Collector(broker.url)
    service("--max-payload-bytes", "2000")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    bad = [
        b"{not json",
        b"\xff\xfe\x00",
        b"[]",
        b'{"seq": 1}',
        b'{"values": [1,2,3,4,5,6]}',
        b'{"seq": 1, "values": [1, 2]}',
        b'{"seq": 1, "values": [NaN,0,0,0,0,0]}',
        b'{"seq": -4, "values": [0,0,0,0,0,0]}',
        b"\x01" + b"\x00" * 40,
        b"x" * 5000,
    ]
    n_bad = 0
    for i in range(50):
        for stream, x in samples.items():
            pub.send(stream, i + 1, x[i])
            for _ in range(3):
                pub.raw(f"sensors/evil-{n_bad % 7}/data", random.choice(bad))
                n_bad += 1
        pub.raw("sensors/dev-0/control", b'{"cmd": "explode"}')
    pub.flush()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 30, "every good prediction")
    assert_exact(col.predictions(), expected)
    wait_until(lambda: len(col.of("errors/")) >= n_bad + 50, 20, "an error per bad message")
    codes = {d["error"] for _, d in col.of("errors/")}
    assert {
        "bad_json",
        "wrong_shape",
        "not_finite",
        "bad_seq",
        "missing_seq",
        "too_large",
        "unknown_command",
        "bad_senml",
    } <= codes


def test_control_reset_and_binary_frames(bundles, broker, service):
    from edge import payloads

    x = make_samples(1, 6, seed=5)["dev-0"]
    col = Collector(broker.url)
    service()
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    pub.raw("sensors/dev-0/data", payloads.encode_frame(1, x[:3]))
    pub.flush()
    wait_until(lambda: ("dev-0", 3) in col.predictions(), 10, "frame answered")
    pub.raw("sensors/dev-0/control", json.dumps({"cmd": "reset"}).encode())
    pub.raw(
        "sensors/dev-0/data",
        payloads.encode_senml(4, x[3:], ["f0", "f1", "f2", "f3", "f4", "f5"], 1.0, 0.1),
    )
    pub.flush()
    wait_until(lambda: ("dev-0", 6) in col.predictions(), 10, "senml answered")
    import edge

    fresh = edge.load(bundles / BUNDLE).step("s", x[3:])  # after the reset: a fresh stream
    got = col.predictions()
    np.testing.assert_array_equal(np.stack([got[("dev-0", s)][0] for s in (4, 5, 6)]), fresh)


def test_metrics_stats_and_reload_with_another_layout(bundles, broker, tmp_path):
    import shutil
    import urllib.request

    from firmware_sim.broker import free_port

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    port = free_port()
    col = Collector(broker.url)
    col.client.subscribe("edge/stats/#", 0)
    svc = Serve(
        model,
        broker.url,
        tmp_path / "state",
        "--metrics-port",
        str(port),
        "--stats-interval",
        "0.3",
    ).start()
    try:
        wait_until(col.online, 20, "runtime online")
        pub = Publisher(broker.url)
        pub.send("dev-0", 1, np.zeros(6))
        pub.raw("sensors/dev-0/data", b"{broken")
        pub.flush()
        wait_until(lambda: ("dev-0", 1) in col.predictions(), 10, "a prediction")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "edge_lstm_messages_in_total 2.0" in body
        assert 'edge_lstm_errors_total{code="bad_json"} 1.0' in body
        assert (
            "edge_lstm_active_streams 1.0" in body
            and "edge_lstm_step_latency_seconds_bucket" in body
        )
        wait_until(lambda: bool(col.of("edge/stats/")), 5, "a stats message")
        # hot reload of a bundle with another state layout (float32 state): streams reset
        shutil.rmtree(model)
        shutil.copytree(bundles / "clf-float32", model)
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.flush()
        wait_until(lambda: "reload" in col.of("edge/status/")[-1][1], 10, "reload status")
        assert "state layout changed" in col.of("edge/status/")[-1][1]["reload"]
        pub.send("dev-0", 2, np.ones(6))
        pub.flush()
        wait_until(lambda: ("dev-0", 2) in col.predictions(), 10, "a prediction from the new model")
        import edge

        fresh = edge.load(bundles / "clf-float32").step("x", np.ones(6))
        np.testing.assert_array_equal(col.predictions()[("dev-0", 2)][0], fresh)
    finally:
        assert svc.stop() == 0


def test_a_failed_reload_stays_in_the_status_until_the_next_reload(bundles, broker, tmp_path):
    """The answer to `reload` is in the retained status: a failed one was replaced by the next
    status the service published for another reason (here the answer to `snapshot`; a
    reconnect or storage coming back did the same), and the user never saw it failed."""
    import shutil

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    col = Collector(broker.url)
    svc = Serve(model, broker.url, tmp_path / "state").start()
    try:
        wait_until(col.online, 20, "runtime online")
        pub = Publisher(broker.url)
        (model / "manifest.json").write_text("{")  # a bundle being copied, say
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.flush()
        wait_until(lambda: "reload" in col.of("edge/status/")[-1][1], 20, "the reload answered")
        pub.raw("edge/control/edge-test", b'{"cmd": "snapshot"}')
        pub.flush()
        wait_until(lambda: "snapshot" in col.of("edge/status/")[-1][1], 20, "the snapshot")
        status = col.of("edge/status/")[-1][1]
        assert status["reload"].startswith("failed, the running model kept"), status
        shutil.rmtree(model)
        shutil.copytree(bundles / "clf-int8", model)
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.flush()
        wait_until(lambda: col.of("edge/status/")[-1][1]["reload"] == "state kept", 20, "done")
        pub.close()
    finally:
        assert svc.stop() == 0
        col.close()


def test_a_reload_to_another_feature_count_steps_held_messages_with_the_old_model(
    bundles, broker, tmp_path
):
    """A message held for reordering was taken for the running model: a reload to a model of
    other features steps it first. Carried into the new generation, the new model refused it
    and, after a kill -9, the state directory was refused as another model's: serve could
    not start again."""
    import shutil

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    col = Collector(broker.url)
    args = (model, broker.url, tmp_path / "state", "--reorder-ms", "600000")
    svc = Serve(*args).start()
    try:
        wait_until(col.online, 20, "runtime online")
        shutil.rmtree(model)
        shutil.copytree(bundles / "reg2-int8", model)  # 3 features, read at the reload
        pub = Publisher(broker.url)
        pub.send("z", 1, np.zeros(6))  # held: a stream's first message waits for reordering
        pub.send("z", 3, np.ones(6))  # held: seq 2 may still come
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')  # read after them, in order
        pub.flush()
        wait_until(lambda: "reload" in col.of("edge/status/")[-1][1], 20, "reload status")
        wait_until(lambda: ("z", 3) in col.predictions(), 20, "the held messages answered")
        assert all("label" in doc for _, doc in col.of("predictions/z"))  # by the classifier
        svc.kill9()
        svc = Serve(*args).start()
        pub.send("z", 4, np.ones(3))
        pub.flush()
        wait_until(lambda: ("z", 4) in col.predictions(), 30, "an answer after the restart")
        assert not col.of("errors/")
    finally:
        svc.stop()


def test_a_reload_to_another_state_layout_keeps_every_streams_numbering(bundles, broker, tmp_path):
    """A reload to a model of another state layout zeroes the streams' state, not their
    numbering: a sample applied before it is still a duplicate. The streams were dropped
    whole, and a device sending a sample again had it answered a second time, by the new
    model."""
    import shutil

    import edge

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    col = Collector(broker.url)
    svc = Serve(model, broker.url, tmp_path / "state").start()
    try:
        wait_until(col.online, 20, "runtime online")
        pub = Publisher(broker.url)
        for seq in (1, 2, 3):
            pub.send("d", seq, np.full(6, seq))
        pub.flush()
        wait_until(lambda: ("d", 3) in col.predictions(), 20, "the first answers")
        shutil.rmtree(model)
        shutil.copytree(bundles / "clf-float32", model)  # float32 state: another layout
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.flush()
        wait_until(lambda: "reload" in col.of("edge/status/")[-1][1], 20, "reload status")
        pub.send("d", 2, np.full(6, 2))  # the device sends an applied sample again
        pub.send("d", 4, np.full(6, 4))
        pub.flush()
        wait_until(lambda: ("d", 4) in col.predictions(), 20, "the next answer")
        assert len(col.predictions()[("d", 2)]) == 1, "an applied sample answered again"
        assert [d["error"] for _, d in col.of("errors/d")] == ["duplicate"]
        (last,) = [d for _, d in col.of("predictions/d") if d["seq"] == 4]
        assert last["restart"] is True and "gap" not in last
        fresh = edge.load(bundles / "clf-float32").step("x", np.full((1, 6), 4))
        np.testing.assert_array_equal(col.predictions()[("d", 4)][0], fresh[0])
    finally:
        assert svc.stop() == 0


def test_messages_after_a_reload_in_the_same_batch_go_to_the_new_model(bundles, broker, tmp_path):
    """A reload takes effect where it stands among the messages: those after it are the new
    model's, also when they arrive in the reload's batch. The whole batch was read with the
    running model, and a sample made for the new one was refused ``wrong_shape``."""
    import shutil

    import edge

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    col = Collector(broker.url)
    # a message waits up to 5 s for company until the batch of two is full: both come in one
    args = ("--max-batch", "2", "--max-wait-ms", "5000", "--reorder-ms", "0")
    svc = Serve(model, broker.url, tmp_path / "state", *args).start()
    try:
        wait_until(col.online, 20, "runtime online")
        shutil.rmtree(model)
        shutil.copytree(bundles / "reg2-int8", model)  # 3 features, read at the reload
        pub = Publisher(broker.url)
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.send("z", 1, np.ones(3))  # made for the new model
        pub.flush()
        wait_until(lambda: col.of("predictions/z") or col.of("errors/z"), 30, "an answer")
        assert not col.of("errors/"), col.of("errors/")
        expected = edge.load(bundles / "reg2-int8").step("x", np.ones((1, 3)))
        np.testing.assert_array_equal(col.predictions()[("z", 1)][0], expected[0])
    finally:
        assert svc.stop() == 0


def test_a_reload_to_other_feature_names_steps_held_messages_with_the_old_model(
    bundles, broker, tmp_path
):
    """A SenML message is read by feature name, into the running model's order: held for
    reordering, it is stepped by that model before a reload to a model whose features are
    named otherwise (as many of them). The new model stepped it, its values in the old
    model's order: a wrong answer."""
    import shutil

    import edge
    from edge import payloads

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    col = Collector(broker.url)
    svc = Serve(model, broker.url, tmp_path / "state", "--reorder-ms", "5000").start()
    try:
        wait_until(col.online, 20, "runtime online")
        shutil.rmtree(model)
        shutil.copytree(bundles / "torch-lstm-int8", model)  # another model of 6 features ...
        doc = json.loads((model / "manifest.json").read_text())
        doc["features"]["names"] = ["f5", "f4", "f3", "f2", "f1", "f0"]  # ... named otherwise
        (model / "manifest.json").write_text(json.dumps(doc))
        x = np.arange(6.0).reshape(1, 6) / 3
        pub = Publisher(broker.url)
        senml = payloads.encode_senml(1, x, ["f0", "f1", "f2", "f3", "f4", "f5"], 1.7e9, 0.1)
        pub.raw("sensors/z/data", senml)  # held: a stream's first message waits
        pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
        pub.flush()
        wait_until(lambda: ("z", 1) in col.predictions(), 20, "the held message answered")
        (answer,) = [d for _, d in col.of("predictions/z")]
        assert answer["model"] == edge.load(bundles / "clf-int8").manifest.model_id
        expected = edge.load(bundles / "clf-int8").step("x", x)
        np.testing.assert_array_equal(col.predictions()[("z", 1)][0], expected[0])
    finally:
        assert svc.stop() == 0


def test_max_wait_ms_gives_a_batch_time_to_fill(bundles, broker, service):
    """``--max-wait-ms``: a message that finds no company waits that long to be stepped with
    what arrives meanwhile (its latency has that lower bound, which a slow machine only
    lengthens); the answers stay exact."""
    samples = make_samples(4, 10, seed=5)
    col = Collector(broker.url)
    service("--max-wait-ms", "400")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    t0 = time.monotonic()
    pub.send("dev-0", 1, samples["dev-0"][:1])
    wait_until(lambda: ("dev-0", 1) in col.predictions(), 30, "the first answer")
    assert time.monotonic() - t0 >= 0.4
    for k in range(10):
        for stream, x in samples.items():
            if (stream, k) != ("dev-0", 0):
                pub.send(stream, k + 1, x[k : k + 1])
    pub.flush()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 30, "every prediction")
    assert_exact(col.predictions(), expected)


def test_a_batch_that_fills_does_not_wait_out_max_wait_ms(bundles, broker, service):
    """A message waits for company at most ``--max-wait-ms``; once ``--max-batch`` messages
    are there the batch is stepped at once (here the wait is an hour)."""
    samples = make_samples(4, 1, seed=6)
    col = Collector(broker.url)
    service("--max-wait-ms", "3600000", "--max-batch", "4")
    wait_until(col.online, 20, "runtime online")
    pub = Publisher(broker.url)
    streams = list(samples)
    pub.send(streams[0], 1, samples[streams[0]])
    pub.flush()  # the first waits for company ...
    for stream in streams[1:]:  # ... which fills its batch
        pub.send(stream, 1, samples[stream])
    pub.flush()
    expected = offline(bundles / BUNDLE, samples)
    wait_until(lambda: set(expected) <= set(col.predictions()), 120, "the full batch's answers")
    assert_exact(col.predictions(), expected)


@pytest.mark.parametrize(
    "limit",
    [
        "max_packet_size 1500",  # said in the CONNACK: the answer is not sent
        "message_size_limit 1500",  # not said: refused with a code paho took for an error
    ],
)
def test_an_answer_past_the_brokers_packet_size_is_reported_not_sent_again_forever(
    bundles, tmp_path, limit
):
    """Mosquitto closes the connection of a client that publishes past its limit: the
    prediction of a message of many samples was sent again at every reconnect, for ever, and
    every later answer waited behind it. An ``answer_too_large`` report goes out in its place;
    the answers after it go out."""
    from firmware_sim.broker import Broker

    broker = Broker(tmp_path / "broker", extra=f"{limit}\n", embedded=False).start()
    col = Collector(broker.url)
    svc = Serve(bundles / BUNDLE, broker.url, tmp_path / "state").start()
    try:
        wait_until(col.online, 20, "runtime online")
        samples = {k: v.round(1) for k, v in make_samples(2, 41, seed=7).items()}  # short
        samples["dev-1"] = samples["dev-1"][:1]
        pub = Publisher(broker.url)
        pub.send("dev-0", 1, samples["dev-0"][:40])  # its answer: 40 rows, past 1,500 bytes
        pub.send("dev-0", 41, samples["dev-0"][40:])
        pub.send("dev-1", 1, samples["dev-1"])
        pub.flush()
        expected = offline(bundles / BUNDLE, samples)
        later = {("dev-0", 41), ("dev-1", 1)}
        wait_until(lambda: later <= set(col.predictions()), 60, "the answers after it")
        assert_exact(col.predictions(), {k: expected[k] for k in later})
        # refused by the broker, the report goes out after what was queued meanwhile
        wait_until(lambda: col.of("errors/dev-0"), 60, "the report in its place")
        (err,) = [doc for _, doc in col.of("errors/dev-0")]
        assert err["error"] == "answer_too_large" and err["seq"] == 1
    finally:
        svc.stop()
        col.close()
        broker.stop()

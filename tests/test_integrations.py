"""Integrations against the real thing where it runs here: Home Assistant discovery through a
real Mosquitto (payloads checked against Home Assistant's documented MQTT sensor schema), the
Grafana dashboard's every metric scraped from a real service's Prometheus endpoint, and
``edge-lstm top`` reading a real service's stats."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.ha_discovery import Announcer, Discovery, object_id, sensor_configs
from edge.manifest import read_bundle
from edge.top import MAX_RUNTIMES, TopView
from firmware_sim.broker import free_port
from tests.mqtt_helpers import Collector, Publisher, wait_until

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.broker

# --- Home Assistant's MQTT discovery, as documented -------------------------------------------
# https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery (topic format, removal by an
# empty retained payload, availability list, device and origin maps) and
# https://www.home-assistant.io/integrations/sensor.mqtt/ (the sensor's configuration keys).
HA_TOPIC = re.compile(
    r"^(?P<prefix>[^/#+]+)/(?P<component>sensor)/(?:(?P<node>[a-zA-Z0-9_-]+)/)?"
    r"(?P<object>[a-zA-Z0-9_-]+)/config$"
)
HA_SENSOR_KEYS = {
    "availability": list,
    "availability_mode": str,
    "availability_template": str,
    "availability_topic": str,
    "device": dict,
    "device_class": str,
    "enabled_by_default": bool,
    "encoding": str,
    "entity_category": str,
    "entity_picture": str,
    "expire_after": int,
    "force_update": bool,
    "icon": str,
    "json_attributes_template": str,
    "json_attributes_topic": str,
    "last_reset_value_template": str,
    "name": str,
    "object_id": str,
    "options": list,
    "origin": dict,
    "payload_available": str,
    "payload_not_available": str,
    "platform": str,
    "qos": int,
    "state_class": str,
    "state_topic": str,
    "suggested_display_precision": int,
    "unique_id": str,
    "unit_of_measurement": str,
    "value_template": str,
}
HA_REQUIRED = {"state_topic"}
HA_STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
HA_AVAILABILITY_KEYS = {"topic": str, "payload_available": str, "payload_not_available": str,
                        "value_template": str}  # fmt: skip
HA_DEVICE_KEYS = {
    "configuration_url": str, "connections": list, "hw_version": str, "identifiers": list,
    "manufacturer": str, "model": str, "model_id": str, "name": str, "serial_number": str,
    "suggested_area": str, "sw_version": str, "via_device": str,
}  # fmt: skip
HA_ORIGIN_KEYS = {"name": str, "sw_version": str, "support_url": str}


def ha_schema_errors(topic: str, config: dict[str, Any]) -> list[str]:
    """Everything about one discovery message that Home Assistant's documentation forbids."""
    errs = []
    if not HA_TOPIC.match(topic):
        errs.append(f"topic {topic!r} is not <prefix>/sensor/[<node_id>/]<object_id>/config")
    for key, value in config.items():
        want = HA_SENSOR_KEYS.get(key)
        if want is None:
            errs.append(f"unknown key {key!r}")
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            errs.append(f"{key} must be {want.__name__}, not {type(value).__name__}")
    errs += [f"missing {k}" for k in HA_REQUIRED - set(config)]
    if "state_class" in config and config["state_class"] not in HA_STATE_CLASSES:
        errs.append(f"state_class {config['state_class']!r}")
    if config.get("qos", 0) not in (0, 1, 2):
        errs.append("qos")
    for topic_key in ("state_topic", "json_attributes_topic"):
        if any(c in str(config.get(topic_key, "")) for c in "+#"):
            errs.append(f"{topic_key} must be a topic, not a filter")
    for item in config.get("availability", []):
        errs += [f"availability.{k}" for k in item if k not in HA_AVAILABILITY_KEYS]
        errs += [] if "topic" in item else ["availability entry without topic"]
    device = config.get("device", {})
    errs += [f"device.{k}" for k in device if k not in HA_DEVICE_KEYS]
    if device and not (device.get("identifiers") or device.get("connections")):
        errs.append("device needs identifiers or connections")
    origin = config.get("origin")
    if origin is not None:
        errs += [f"origin.{k}" for k in origin if k not in HA_ORIGIN_KEYS]
        errs += [] if "name" in origin else ["origin needs a name"]
    return errs


def render(template: str, payload: bytes) -> str:
    """Render a value template as Home Assistant does: Jinja2 with ``value_json``."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["tojson"] = json.dumps
    return env.from_string(template).render(value_json=json.loads(payload), value=payload)


def test_discovery_configs_follow_the_documented_schema(bundles):
    for name in ("clf-int8", "reg2-int8"):
        m = read_bundle(bundles / name)[0]
        configs = sensor_configs(
            "dev/odd id:1",
            m,
            runtime_id="edge.pi-1",
            prediction_topic="predictions/dev-1",
            status_topic="edge/status/edge.pi-1",
        )
        assert configs
        for topic, config in configs:
            assert ha_schema_errors(topic, config) == [], (topic, config)
        ids = [c["unique_id"] for _, c in configs]
        assert len(set(ids)) == len(ids)
        kinds = {t.rsplit("_", 1)[-1].split("/")[0] for t, _ in configs}
        if m.output_kind == "classifier":
            assert kinds == {"label", "probability"}
        else:
            assert kinds == {f"y{i}" for i in range(m.outputs)}
    assert ha_schema_errors("homeassistant/sensor/a b/c/config", {"state_topic": "x"}) != []
    assert ha_schema_errors("homeassistant/sensor/n/o/config", {"name": "x"}) == [
        "missing state_topic"
    ]
    assert object_id("dev_1") == "dev_1" and object_id("dev/odd id:1").startswith("dev_odd_id_1_")
    readme = " ".join((ROOT / "README.md").read_text().split())  # what it says of the topics
    assert "`{sensor}` is `label` in its topic" in readme
    assert "(`y0`, `y1`, ... in its topic)" in readme
    ids = {object_id(s) for s in ("dev.1", "dev_1", "dev:1", "dev@1", "dev-1")}
    assert len(ids) == 5 and all(not re.search(r"[^a-zA-Z0-9_-]", i) for i in ids)


@pytest.mark.desktop  # needs jinja2, Home Assistant's template engine (dev extra)
def test_value_templates_render_real_predictions(bundles):
    from edge import payloads

    clf = read_bundle(bundles / "clf-int8")[0]
    configs = dict(sensor_configs("d", clf, runtime_id="r", prediction_topic="p", status_topic="s"))
    y = np.array([[0.1, 0.7, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]], np.float32)
    single = payloads.prediction(5, None, y[:1], "m", clf.labels, single=True)
    several = payloads.prediction(5, None, y, "m", clf.labels, single=False)
    label = next(c for t, c in configs.items() if t.endswith("_label/config"))
    prob = next(c for t, c in configs.items() if t.endswith("_probability/config"))
    assert render(label["value_template"], single) == clf.labels[1]
    assert render(label["value_template"], several) == clf.labels[0]  # the last sample counts
    assert float(render(prob["value_template"], single)) == pytest.approx(70.0, abs=0.1)
    assert float(render(prob["value_template"], several)) == pytest.approx(60.0, abs=0.1)
    attrs = json.loads(render(label["json_attributes_template"], single))
    assert attrs == {"seq": 5, "model": "m"}
    assert render(label["availability"][0]["value_template"], b'{"state": "online"}') == "online"
    reg = read_bundle(bundles / "reg2-int8")[0]
    rconf = sensor_configs("d", reg, runtime_id="r", prediction_topic="p", status_topic="s")
    ry = np.arange(reg.outputs * 2, dtype=np.float32).reshape(2, reg.outputs) + 0.5
    for i, (_, c) in enumerate(rconf):
        one = payloads.prediction(1, None, ry[:1], "m", (), single=True)
        two = payloads.prediction(1, None, ry, "m", (), single=False)
        assert float(render(c["value_template"], one)) == ry[0, i]
        assert float(render(c["value_template"], two)) == ry[1, i]


def test_announcer_adds_new_streams_and_removes_gone_ones(bundles):
    m = read_bundle(bundles / "clf-int8")[0]
    a = Announcer(m, runtime_id="r", prediction_template="predictions/{stream}", status_topic="s")
    first = a.reconcile(["a", "b"])
    assert len(first) == 4 and all(d.payload for d in first)
    assert a.reconcile(["a", "b"]) == []
    second = a.reconcile(["b", "c"])
    removed = [d.topic for d in second if not d.payload]
    assert sorted(removed) == sorted(d.topic for d in first if "/a_" in d.topic)
    assert sorted(json.loads(d.payload)["state_topic"] for d in second if d.payload) == [
        "predictions/c",
        "predictions/c",
    ]


def test_announcer_removes_found_sensors_no_stream_holds(bundles):
    m = read_bundle(bundles / "clf-int8")[0]
    a = Announcer(m, runtime_id="r", prediction_template="predictions/{stream}", status_topic="s")
    mine = [d.topic for d in a.reconcile(["a"])]
    ghost = "homeassistant/sensor/r/gone_label/config"
    out = a.reconcile(["a"], [*mine, ghost])
    assert out == [Discovery(ghost, b"")]
    assert all(t.startswith(a.filter.removesuffix("+/config")) for t in [*mine, ghost])


def test_announcer_paces_new_streams_and_keeps_the_sensors_of_those_still_to_come(bundles):
    """Every stream at once was a burst of megabytes after a broker lost the sensors of
    thousands: ``per_round`` streams a call, the others at the next calls, none forgotten.
    A stream still to be announced keeps the sensors a broker holds for it meanwhile."""
    m = read_bundle(bundles / "clf-int8")[0]
    kw = {"runtime_id": "r", "prediction_template": "predictions/{stream}", "status_topic": "s"}
    a = Announcer(m, **kw, per_round=2)
    streams = ["a", "b", "c", "d", "e"]

    def announced(out: list[Discovery]) -> list[str]:
        return sorted({json.loads(d.payload)["state_topic"][12:] for d in out if d.payload})

    assert (announced(a.reconcile(streams)), a.waiting) == (["a", "b"], 3)
    held = [
        t for t, _ in sensor_configs("e", m, runtime_id="r", prediction_topic="p", status_topic="s")
    ]
    ghost = "homeassistant/sensor/r/gone_label/config"
    second = a.reconcile(streams, [*held, ghost])
    assert announced(second) == ["c", "d"] and a.waiting == 1
    assert [d.topic for d in second if not d.payload] == [ghost]
    assert announced(a.reconcile(streams)) == ["e"] and a.waiting == 0
    assert a.reconcile(streams) == []
    a.reconnected(everything=True)  # the broker lost them all: each one again, paced
    again = [announced(a.reconcile(streams)) for _ in range(4)]
    assert again == [["a", "b"], ["c", "d"], ["e"], []]


def test_announcer_paces_removals_and_sends_every_one(bundles):
    """Streams forgotten by the thousand, or a reload that changes every stream's sensors,
    had all their removals in one burst. ``per_round`` streams' worth a call, in turn,
    every one in the end; a stream back before its removal went out keeps its sensors."""
    m = read_bundle(bundles / "clf-int8")[0]
    reg = read_bundle(bundles / "reg2-int8")[0]
    kw = {"runtime_id": "r", "prediction_template": "predictions/{stream}", "status_topic": "s"}
    a = Announcer(m, **kw, per_round=2)
    streams = ["a", "b", "c", "d", "e"]
    old = {d.topic for _ in range(3) for d in a.reconcile(streams)}
    assert len(old) == 10 and a.waiting == 0
    gone = a.reconcile(["c"])
    assert [bool(d.payload) for d in gone] == [False] * 4  # 2 streams' worth of 4 left
    back = a.reconcile(["c", "e"])  # "e" is back before its removal went out
    assert sorted(d.topic for d in back if not d.payload) == sorted(t for t in old if "/d_" in t)
    assert all("/e_" in d.topic for d in back if d.payload) and len(back) == 4
    assert a.reconcile(["c", "e"]) == [] and not a.removing
    changed = [a.model_changed(reg)] + [a.reconcile(["c", "e"]) for _ in range(2)]
    removed = [sorted(d.topic for d in out if not d.payload) for out in changed]
    assert removed == [sorted(t for t in old if "/c_" in t or "/e_" in t), [], []]
    assert [len([d for d in out if d.payload]) for out in changed] == [2 * reg.outputs, 0, 0]


def retained(url: str, prefix: str) -> dict[str, bytes]:
    """What a new subscriber gets from the broker's retained store under ``prefix``."""
    import time

    import paho.mqtt.client as mqtt

    from tests.mqtt_helpers import _hostport, close_client

    got: dict[str, bytes] = {}
    done = f"{prefix}-marker/{time.monotonic_ns()}"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_message = lambda cl, u, msg: got.__setitem__(msg.topic, bytes(msg.payload))
    # retained messages come right after SUBACK; a marker published after them shows the end
    c.on_subscribe = lambda cl, *a: cl.publish(done, b"x", qos=1)
    c.on_connect = lambda cl, *a: cl.subscribe([(f"{prefix}/#", 1), (done, 1)])
    c.connect(*_hostport(url), 30)
    c.loop_start()
    wait_until(lambda: done in got, 30, "the marker")
    close_client(c)
    got.pop(done)
    return got


def sensors_of(url: str) -> set[str]:
    """The streams whose sensors the broker holds."""
    return {t.split("/")[3].rsplit("_", 1)[0] for t in retained(url, "homeassistant")}


def test_home_assistant_discovery_through_a_real_broker(service, broker):
    s = service("--ha-discovery", "true", "--capacity", "2", "--max-batch", "2")
    col = Collector(broker.url)
    wait_until(col.online, 60, "runtime online")
    pub = Publisher(broker.url)
    for stream in ("dev-1", "dev-2"):
        pub.send(stream, 1, np.full(6, 0.1))
    pub.flush()
    wait_until(lambda: len(retained(broker.url, "homeassistant")) == 4, 60, "4 sensors")
    configs = retained(broker.url, "homeassistant")
    for topic, body in configs.items():
        doc = json.loads(body)
        assert ha_schema_errors(topic, doc) == []
        stream = doc["state_topic"].split("/")[1]
        assert topic.startswith(f"homeassistant/sensor/edge-test/{stream}_")
        assert doc["availability"][0]["topic"] == "edge/status/edge-test"
    pub.send("dev-3", 1, np.full(6, 0.1))  # capacity 2: dev-1 (least recently used) goes
    pub.flush()
    want = {"dev-2", "dev-3"}
    wait_until(lambda: sensors_of(broker.url) == want, 60, "dev-1 removed, dev-3 added")
    pub.close()
    col.close()
    assert "Traceback" not in s.output()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_sensors_a_previous_run_left_are_removed(service, broker, protocol):
    """A stream evicted while the service was down (or whose removal a crash cut off) left
    its sensors retained: the service reads its node's sensors back and removes those it
    does not hold. Another runtime's sensors stay; its own publishes are not taken for
    data (MQTT 3.1.1 has no "no local")."""
    pub = Publisher(broker.url)
    ghost = "homeassistant/sensor/edge-test/gone_label/config"
    other = "homeassistant/sensor/other-node/dev-9_label/config"
    for topic in (ghost, other):
        pub.client.publish(topic, b'{"name": "prediction"}', qos=1, retain=True)
    pub.flush()
    s = service("--ha-discovery", "true", "--protocol", protocol)
    col = Collector(broker.url)
    wait_until(col.online, 60, "runtime online")
    pub.send("dev-1", 1, np.full(6, 0.1))
    pub.flush()

    def topics() -> set[str]:
        return set(retained(broker.url, "homeassistant"))

    want = {other} | {
        f"homeassistant/sensor/edge-test/dev-1_{k}/config" for k in ("label", "probability")
    }
    wait_until(lambda: topics() == want, 60, "the ghost removed, dev-1 announced")
    wait_until(lambda: ("dev-1", 1) in col.predictions(), 60, "the prediction")
    assert col.of("errors/") == []
    pub.close()
    col.close()
    assert "Traceback" not in s.output()


def test_sensors_edge_lstm_0_1_0_left_under_its_node_name_are_removed(service, broker):
    """edge-lstm 0.1.0 named a runtime id's node with '_' for each character a topic level
    cannot hold (``edge.test`` -> ``edge_test``), without the hash this one appends: after
    an upgrade its sensors stayed retained beside the new ones, every stream twice in Home
    Assistant, both available. They are read back and removed; a runtime whose id is that
    name keeps its own (their availability is its status)."""
    pub = Publisher(broker.url)

    def sensor(node: str, runtime: str) -> tuple[str, bytes]:
        config = {"availability": [{"topic": f"edge/status/{runtime}"}], "name": "prediction"}
        return f"homeassistant/sensor/{node}/dev-1_label/config", json.dumps(config).encode()

    old, other = sensor("edge_test", "edge.test"), sensor("edge_test", "edge_test")
    other = (other[0].replace("dev-1", "dev-9"), other[1])
    for topic, payload in (old, other):
        pub.client.publish(topic, payload, qos=1, retain=True)
    pub.flush()
    s = service("--ha-discovery", "true", "--runtime-id", "edge.test")
    col = Collector(broker.url)
    wait_until(lambda: col.online("edge.test"), 60, "runtime online")
    pub.send("dev-1", 1, np.full(6, 0.1))
    pub.flush()
    node = object_id("edge.test")
    want = {other[0]} | {
        f"homeassistant/sensor/{node}/dev-1_{k}/config" for k in ("label", "probability")
    }
    wait_until(
        lambda: set(retained(broker.url, "homeassistant")) == want, 60, "0.1.0's sensor removed"
    )
    pub.close()
    col.close()
    assert "Traceback" not in s.output()


def test_sensors_too_large_for_the_broker_are_said_and_sent_after_a_reconnect(service, tmp_path):
    """An MQTT 5 broker with a small maximum packet size (mosquitto `max_packet_size 700`)
    takes no discovery message (about 800 bytes): they were not sent, the log named only
    the topic, and the streams counted as announced: their sensors stayed missing for good,
    also after the broker's limit was raised. The streams are named with what it means,
    and announced again after the next connection."""
    from firmware_sim.broker import Broker

    small = Broker(
        tmp_path / "small", embedded=False, persistence=True, extra="max_packet_size 700\n"
    ).start()
    try:
        col = Collector(small.url)
        svc = service("--ha-discovery", "true", url=small.url)
        wait_until(col.online, 60, "online")
        pub = Publisher(small.url)
        pub.send("dev-1", 1, np.full(6, 0.1))
        pub.flush()
        wait_until(lambda: ("dev-1", 1) in col.predictions(), 60, "the answer")
        said = "Home Assistant discovery of stream(s) dev-1 not sent: over the broker's maximum"
        wait_until(lambda: said in svc.output(), 60, "the missing sensors said")
        assert retained(small.url, "homeassistant") == {}
        pub.close()
        col.close()
        small.extra = ""  # the limit raised
        small.restart()
        want = {
            f"homeassistant/sensor/edge-test/dev-1_{k}/config" for k in ("label", "probability")
        }
        wait_until(lambda: set(retained(small.url, "homeassistant")) == want, 60, "the sensors")
        assert svc.alive() and "Traceback" not in svc.output()
    finally:
        small.stop()


def test_sensors_too_large_for_the_broker_of_a_churning_fleet_stay_bounded(
    bundles, tmp_path, caplog
):
    """A broker that takes no discovery message, and a fleet whose streams come and go (each
    wave evicting the one before it): every discovery topic was remembered, and warned about,
    once each, and every stream evicted stayed among those to announce again at the next
    reconnect, for as long as the service ran (months: an entry and a warning per device id
    ever heard). One warning says discovery messages do not fit, the streams not sent are at
    most those held, and the streams named are rate-limited as other repeated warnings."""
    import logging
    import threading

    from edge import config
    from edge.mqtt_loop import MqttService
    from firmware_sim.broker import Broker

    small = Broker(tmp_path / "small", embedded=False, extra="max_packet_size 700\n").start()
    cfg = config.load(
        None,
        env={},
        overrides={
            "model": str(bundles / "clf-int8"),
            "broker": small.url,
            "state_dir": str(tmp_path / "state"),
            "runtime_id": "edge-test",
            "capacity": 20,
            "max_batch": 20,
            "reorder_ms": 0,
            "ha_discovery": True,
        },
    )
    made: list[Any] = []

    def run() -> None:  # made here: the signals stay the test runner's
        made.append(MqttService(cfg))
        made[0].run()

    caplog.set_level(logging.INFO)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pub = Publisher(small.url)
    try:
        wait_until(lambda: made and made[0].connected.is_set(), 60, "connected")
        svc = made[0]
        waves = 15
        for w in range(waves):
            wave = [f"w{w}-{i}" for i in range(cfg.capacity)]
            for stream in wave:
                pub.send(stream, 1, np.full(6, 0.1))
            pub.flush()
            wait_until(lambda wave=wave: all(s in svc.ha.announced for s in wave), 60, f"wave {w}")
        assert svc.engine.store.stats.evicted_lru >= (waves - 1) * cfg.capacity
        assert svc._too_large_said <= {svc._stats_topic, svc._status_topic, svc.ha.filter}
        assert len(svc.ha.unsent) <= cfg.capacity
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        per_topic = [m for m in warned if m.startswith("not sent on homeassistant/")]
        assert len(per_topic) == 1, per_topic[:3]
        named = [m for m in warned if "Home Assistant discovery of stream(s)" in m]
        assert 1 <= len(named) < waves, named
    finally:
        pub.close()
        if made:
            made[0]._stop()
        thread.join(60)
        small.stop()
    assert not thread.is_alive()


def test_sensors_a_broker_restarted_without_persistence_lost_are_announced_again(service, broker):
    """A broker restarted without persistence loses its retained messages: the service's
    sensors were gone from Home Assistant until the service restarted, since it counted
    them as announced. A connection without the session it had re-announces every stream
    it holds."""
    svc = service("--ha-discovery", "true")
    col = Collector(broker.url)
    wait_until(col.online, 60, "online")
    pub = Publisher(broker.url)
    pub.send("dev-1", 1, np.full(6, 0.1))
    pub.flush()
    want = {f"homeassistant/sensor/edge-test/dev-1_{k}/config" for k in ("label", "probability")}
    wait_until(lambda: set(retained(broker.url, "homeassistant")) == want, 60, "the sensors")
    pub.close()
    col.close()
    broker.restart()
    wait_until(lambda: set(retained(broker.url, "homeassistant")) == want, 60, "announced again")
    assert svc.alive() and "Traceback" not in svc.output()


def test_a_restart_does_not_make_idle_streams_fresh(service, broker):
    """A restart restored every stream as just seen: a service restarted more often than its
    idle_timeout never forgot a dead device, nor removed its sensors. A stream idle for 12 s
    of a 20 s timeout before the restart is forgotten 8 s after it, well before one sampled
    just before the restart (both were forgotten in one round)."""
    import time

    flags = ("--ha-discovery", "true", "--idle-timeout", "20", "--reorder-ms", "0")
    svc = service(*flags)
    col = Collector(broker.url)
    wait_until(col.online, 60, "online")
    pub = Publisher(broker.url)
    pub.send("dead", 1, np.full(6, 0.1))
    pub.flush()
    wait_until(lambda: ("dead", 1) in col.predictions(), 60, "the answer to dead")
    since = time.monotonic()  # "dead" has been idle at least this long
    wait_until(lambda: time.monotonic() - since >= 12, 60, "12 s of dead idle")
    pub.send("live", 1, np.full(6, 0.1))
    pub.flush()
    wait_until(lambda: ("live", 1) in col.predictions(), 60, "the answer to live")
    wait_until(lambda: sensors_of(broker.url) == {"dead", "live"}, 60, "both announced")
    svc.stop()
    svc = service(*flags)
    wait_until(lambda: "dead" not in sensors_of(broker.url), 60, "dead forgotten")
    assert sensors_of(broker.url) == {"live"}
    wait_until(lambda: not sensors_of(broker.url), 60, "live forgotten in its turn")
    assert svc.alive() and "Traceback" not in svc.output()
    pub.close()
    col.close()


class Watcher(Collector):
    """Status, predictions and discovery messages, in the order the broker delivers them."""

    FILTERS = (("edge/status/#", 1), ("predictions/#", 1), ("homeassistant/#", 1))


class Pinger:
    """Samples of stream "p", each waited for until answered: predictions going on."""

    def __init__(self, pub: Publisher, watch: Collector, width: int = 6) -> None:
        self.pub, self.watch, self.width, self.seq = pub, watch, width, 0

    def answered(self) -> bool:
        got = self.watch.of("predictions/p")
        return bool(got) and got[-1][1]["seq"] == self.seq

    def __call__(self) -> None:
        self.seq += 1
        self.pub.send("p", self.seq, np.full(self.width, 0.1))
        wait_until(self.answered, 60, f"p {self.seq} answered")

    def until(self, cond: Any, what: str) -> None:
        """Ping until ``cond()``."""
        for _ in range(10_000):
            self()
            if cond():
                return
        raise AssertionError(f"no {what} after 10,000 predictions")


def many_streams(pub: Publisher, n: int) -> set[str]:
    """One sample of each of ``n`` streams; their names."""
    for i in range(n):
        pub.send(f"s{i}", 1, np.full(6, 0.1))
    pub.flush()
    return {f"s{i}" for i in range(n)}


def test_sensors_of_many_streams_a_broker_lost_are_announced_again_paced(service, broker):
    """A broker restarted without persistence lost the sensors of every stream: all their
    discovery messages went out in one burst (about 1.6 kB a stream, megabytes for
    thousands), and predictions waited behind it. They go out a hundred streams a second,
    predictions in between, until every sensor is back."""
    svc = service("--ha-discovery", "true", "--reorder-ms", "0", "--max-batch", "64")
    quick = {"configure": lambda c: c.reconnect_delay_set(0.1, 1)}
    watch = Watcher(broker.url, client_id="watcher", **quick)
    wait_until(watch.online, 60, "online")
    pub = Publisher(broker.url, **quick)
    want = many_streams(pub, 600) | {"p"}
    ping = Pinger(pub, watch)
    ping()
    wait_until(lambda: sensors_of(broker.url) == want, 120, "every stream announced")
    start = len(watch.messages)
    watch.granted = None
    broker.restart()  # no persistence: every retained sensor gone
    wait_until(watch.qos1_granted, 60, "the watcher subscribed again")
    wait_until(lambda: sensors_of(broker.url), 60, "the service back (subscribed)")
    ping.until(lambda: sensors_of(broker.url) == want, "every sensor back")
    kinds = {"predictions": "p", "homeassistant": "d"}
    order = "".join(kinds.get(t.split("/")[0], "") for t, _ in watch.messages[start:])
    assert order.strip("p").count("p") >= 2, order  # answers between discovery messages
    assert "Home Assistant discovery: every stream announced" in svc.output()
    assert svc.alive() and "Traceback" not in svc.output()
    pub.close()
    watch.close()


@contextlib.contextmanager
def _announced(bundles: Path, broker: Any, tmp_path: Path, n: int) -> Iterator[Any]:
    """``serve`` with discovery on a copy of the int8 classifier (``.model``), ``n`` streams
    and "p" heard and all announced; the service, publisher, watcher and pinger as attributes."""
    import shutil
    from types import SimpleNamespace

    from tests.mqtt_helpers import Serve

    model = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", model)
    flags = ("--ha-discovery", "true", "--reorder-ms", "0", "--max-batch", "64")
    svc = Serve(model, broker.url, tmp_path / "state", *flags).start()
    try:
        watch = Watcher(broker.url, client_id="watcher")
        wait_until(watch.online, 60, "online")
        pub = Publisher(broker.url)
        streams = many_streams(pub, n) | {"p"}
        ping = Pinger(pub, watch)
        ping()
        wait_until(lambda: sensors_of(broker.url) == streams, 120, "every stream announced")
        yield SimpleNamespace(
            svc=svc, pub=pub, watch=watch, ping=ping, model=model, streams=streams
        )
        pub.close()
        watch.close()
    finally:
        svc.stop()


def test_sensors_a_reload_changes_for_many_streams_are_removed_paced(bundles, broker, tmp_path):
    """A reload to a model of other outputs removed every stream's old sensors in one burst
    (thousands of empty messages at once), predictions waiting behind it. The removals go out
    a hundred streams' worth a second, predictions in between, each sensor removed once."""
    import shutil

    with _announced(bundles, broker, tmp_path, 600) as run:
        old = {
            f"homeassistant/sensor/edge-test/{s}_{k}/config"
            for s in run.streams
            for k in ("label", "probability")
        }
        wait_until(lambda: set(retained(broker.url, "homeassistant")) == old, 120, "both sensors")
        start = len(run.watch.messages)
        shutil.rmtree(run.model)
        shutil.copytree(bundles / "reg2-int8", run.model)  # a regressor: sensors y0, y1
        assert _reloaded(run.pub, run.watch) == "state layout changed: all streams reset"
        new = {t.replace("_label/", "_y0/").replace("_probability/", "_y1/") for t in old}
        held = lambda: set(retained(broker.url, "homeassistant")) == new  # noqa: E731
        run.ping.width = 3  # the regressor's features
        run.ping.until(held, "sensors of the new model alone")
        seen = run.watch.messages[start:]
        removed = [t for t, d in seen if d == {"raw": ""}]
        assert sorted(removed) == sorted(old), "each old sensor removed once"
        gone = [d == {"raw": ""} for t, d in seen]
        order = "".join("r" if g else "p" for (t, _), g in zip(seen, gone) if g or t[0] == "p")
        assert order.strip("p").count("p") >= 2, order  # answers between removals
        assert "every stream announced, every sensor removed" in run.svc.output()
        assert run.svc.alive() and "Traceback" not in run.svc.output()


def _reloaded(pub: Publisher, watch: Watcher) -> str:
    """Ask the service to reload; its answer (the status's ``reload``)."""
    pub.raw("edge/control/edge-test", b'{"cmd": "reload"}')
    said = lambda: [d for _, d in watch.of("edge/status/") if "reload" in d]  # noqa: E731
    wait_until(said, 60, "the reload answered")
    return str(said()[-1]["reload"])


def test_sensor_removals_still_queued_at_a_stop_are_sent_before_it_ends(bundles, broker, tmp_path):
    """A reload to a model of other outputs queues the removal of every stream's old sensors,
    sent a hundred streams' worth a second: those still queued when the service stopped were
    dropped, and a service not started again left them in Home Assistant for good. A clean
    stop sends up to three more rounds of them before it says offline."""
    import shutil

    with _announced(bundles, broker, tmp_path, 299) as run:
        shutil.rmtree(run.model)
        shutil.copytree(bundles / "reg2-int8", run.model)  # a regressor: sensors y0, y1
        assert _reloaded(run.pub, run.watch) == "state layout changed: all streams reset"
        assert run.svc.stop() == 0
        left = [
            topic
            for topic in retained(broker.url, "homeassistant")
            if not topic.endswith(("_y0/config", "_y1/config"))
        ]
        assert left == [], f"{len(left)} sensors of the old model left, e.g. {left[:3]}"
        assert "Traceback" not in run.svc.output()


def test_a_reload_that_keeps_the_sensors_leaves_no_stream_named_by_the_old_model(
    bundles, broker, tmp_path
):
    """A stream's device was named with the model id: after a reload every stream was
    announced again, a hundred a second, and one waiting for its turn showed the old model's
    name meanwhile (6 s for 600 streams). The name is the stream's, the model each
    prediction's ``model`` attribute: a reload whose sensors are the same changes nothing."""
    import shutil

    with _announced(bundles, broker, tmp_path, 600) as run:
        shutil.rmtree(run.model)
        shutil.copytree(bundles / "clf-float32", run.model)  # another model, the same sensors
        _reloaded(run.pub, run.watch)
        new = read_bundle(run.model)[0]
        configs = retained(broker.url, "homeassistant")
        assert len(configs) == 2 * len(run.streams)
        for topic, body in configs.items():
            stream = json.loads(body)["state_topic"].split("/", 1)[1]
            want = dict(sensor_configs(
                stream, new, runtime_id="edge-test", prediction_topic=f"predictions/{stream}",
                status_topic="edge/status/edge-test",
            ))  # fmt: skip
            assert json.loads(body) == want[topic], topic
            assert json.loads(body)["device"]["name"] == stream
        assert run.svc.alive() and "Traceback" not in run.svc.output()


def dashboard_metrics() -> set[str]:
    doc = json.loads((ROOT / "edge" / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    assert len(doc["panels"]) >= 6 and all(p["targets"] for p in doc["panels"])
    return {m for e in exprs for m in re.findall(r"\b(edge_lstm_[a-z0-9_]+)", e)}


def test_every_metric_the_grafana_dashboard_queries_exists(service, broker):
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    svc = service("--metrics-port", str(port), "--stats-interval", "0")
    col = Collector(broker.url)
    wait_until(col.online, 60, "runtime online")
    pub = Publisher(broker.url)
    pub.send("g-1", 1, np.full(6, 0.2))
    pub.raw("sensors/g-1/data", b"{not json")
    pub.flush()
    wait_until(lambda: len(col.of("errors/g-1")) == 1, 60, "an error")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    wanted = dashboard_metrics()
    assert {
        "edge_lstm_messages_in_total",
        "edge_lstm_errors_total",
        "edge_lstm_e2e_latency_seconds_bucket",
        "edge_lstm_active_streams",
        "edge_lstm_queue_depth",
        "edge_lstm_snapshot_age_seconds",
    } <= wanted
    assert wanted - samples == set(), f"queried but not exported: {sorted(wanted - samples)}"
    assert 'edge_lstm_errors_total{code="bad_json"} 1.0' in text
    # where to point Prometheus is in the start-up log, not only in the configuration
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in svc.output()
    pub.close()
    col.close()


# --- edge-lstm top ----------------------------------------------------------------------------


def test_top_view_rates_and_errors():
    v = TopView("edge/stats/", "edge/status/")
    base = {"messages_in": 100, "predictions_out": 90, "active_streams": 3, "ts": 10.0}
    v.update("edge/stats/pi-1", json.dumps({**base, "errors": {"bad_json": 1}}).encode())
    later = {**base, "messages_in": 150, "predictions_out": 130, "ts": 12.0}
    v.update(
        "edge/stats/pi-1", json.dumps({**later, "errors": {"bad_json": 5, "late": 1}}).encode()
    )
    v.update("edge/status/pi-1", b'{"state": "degraded"}')
    assert v.update("edge/stats/pi-2", b"[not an object]") is None and v.ignored == 1
    assert v.update("edge/status/pi-3", b"[" * 100_000 + b"]" * 100_000) is None  # anyone may
    assert v.ignored == 2
    assert v.update("other/topic", b"{}") is None
    line = v.render().splitlines()[1].split()
    assert line[:6] == ["pi-1", "degraded", "3", "25", "20", "2.5"]
    assert "bad_json 5, late 1" in v.render()


def test_top_shows_no_negative_rate_after_a_service_restarts():
    v = TopView("edge/stats/", "edge/status/")
    before = {"messages_in": 5000, "predictions_out": 4990, "errors": {"late": 7}, "ts": 100.0}
    v.update("edge/stats/pi-1", json.dumps(before).encode())
    after = {"messages_in": 40, "predictions_out": 40, "errors": {"late": 0}, "ts": 110.0}
    v.update("edge/stats/pi-1", json.dumps(after).encode())  # counters start again at 0
    line = v.render().splitlines()[1].split()
    assert line[3:6] == ["-", "-", "-"]
    later = {"messages_in": 60, "predictions_out": 50, "errors": {"late": 1}, "ts": 112.0}
    v.update("edge/stats/pi-1", json.dumps(later).encode())
    assert v.render().splitlines()[1].split()[3:6] == ["10", "5", "0.5"]


def test_top_takes_rates_within_one_process_when_two_share_a_runtime_id():
    """Two services given one runtime_id publish in turn on its stats topic: their counters
    were taken as one service's, a rate between the two processes' counts (one at 5,000 and
    one at 40 messages: "-" or thousands a second). Each process's stats say its instance."""
    v = TopView("edge/stats/", "edge/status/")

    def stats(instance: str, n: int, uptime: float) -> None:
        doc = {"messages_in": n, "predictions_out": n, "instance": instance}
        v.update("edge/stats/pi", json.dumps({**doc, "uptime_seconds": uptime}).encode())

    for k in range(3):
        stats("aaaa", 5000 + 100 * k, 1000.0 + 10 * k)  # 10 messages a second
        stats("bbbb", 40 + 20 * k, 50.0 + 10 * k)  # 2 a second
        assert v.render().splitlines()[1].split()[3] == ("-" if k == 0 else "2")
    assert "2 processes have published under this id" in v.render()
    # a restart is a new instance that the old one does not follow: no twins
    w = TopView("edge/stats/", "edge/status/")
    for instance, n, uptime in (("aaaa", 5000, 100.0), ("cccc", 40, 10.0), ("cccc", 60, 20.0)):
        doc = {"messages_in": n, "predictions_out": n, "instance": instance}
        w.update("edge/stats/pi", json.dumps({**doc, "uptime_seconds": uptime}).encode())
    assert w.render().splitlines()[1].split()[3] == "2" and "processes" not in w.render()


def test_top_rates_do_not_follow_a_step_of_the_services_wall_clock():
    """A gateway without a real-time clock starts at the time it last saved, and NTP then
    steps its clock by hours or months: the rates between two stats messages were divided by
    their wall-clock ``ts`` apart (0 msg/s after a step forward, nothing after a step back).
    The service says its uptime, which NTP does not step."""
    v = TopView("edge/stats/", "edge/status/")
    first = {"messages_in": 100, "predictions_out": 90, "errors": {"late": 1}}
    v.update("edge/stats/pi", json.dumps({**first, "ts": 1e9, "uptime_seconds": 60.0}).encode())
    later = {"messages_in": 200, "predictions_out": 190, "errors": {"late": 11}}
    for ts in (1e9 + 90 * 86400, 1e9 - 86400):  # forward three months, then back
        v.update("edge/stats/pi", json.dumps({**later, "ts": ts, "uptime_seconds": 70.0}).encode())
        assert v.render().splitlines()[1].split()[3:6] == ["10", "10", "1"]
        v.update("edge/stats/pi", json.dumps({**first, "ts": 1e9, "uptime_seconds": 60.0}).encode())


def test_top_survives_stats_whose_numbers_are_no_finite_numbers():
    v = TopView("edge/stats/", "edge/status/")  # anyone may publish on the stats topics
    huge = "1" + "0" * 400
    v.update(
        "edge/stats/x",
        f'{{"ts": 1, "queue_depth": {huge}, "messages_in": {huge}, '
        f'"errors": {{"a": Infinity, "b": NaN, "c": {huge}, "d": 2}}}}'.encode(),
    )
    v.update("edge/stats/x", b'{"ts": 2, "messages_in": 1, "errors": {"d": 3}}')
    assert v.render().splitlines()[1].split()[:7] == ["x", "online", "-", "-", "-", "1", "-"]


def test_top_prints_no_control_character_that_a_publisher_on_its_topics_sent():
    """Anyone may publish on the stats and status topics: a runtime id, state or error code
    holding an escape sequence (clear the screen, set the clipboard) or a newline went to the
    operator's terminal as it was."""
    v = TopView("edge/stats/", "edge/status/")
    codes = {"\x1b]52;c;ZXZpbA==\x07": 3, "bad\njson": 2, "\x9b2J" + "x" * 5000: 1}
    stats = {"ts": 1, "messages_in": 1, "errors": codes}
    v.update("edge/stats/pi\x1b[2J", json.dumps(stats).encode())
    v.update("edge/status/pi\x1b[2J", json.dumps({"state": "\x1b[31mon\rline"}).encode())
    text = v.render()
    lines = text.split("\n")
    assert len(lines) == 2 and all(line.isprintable() for line in lines), repr(text)
    assert lines[1].startswith("pi?[2J") and len(lines[1]) < 300, lines[1]
    assert "?]52;c;ZXZpbA==? 3, bad?json 2" in lines[1]


def test_top_skips_hostile_stats_with_a_note_and_keeps_a_bounded_table():
    """Anyone may publish on the stats and status topics: numbers past any real count,
    negative counts, a state that is no text, a 10 MB message and thousands of fake runtime
    ids are skipped (with a note under the table), never shown, and never grow the table."""
    v = TopView("edge/stats/", "edge/status/")
    v.update(
        "edge/stats/pi",
        b'{"uptime_seconds": 1, "messages_in": 1e300, "queue_depth": 1e300, "active_streams": -2,'
        b' "e2e_latency_p99_ms": -1, "errors": {"a": 1e300, "b": -5, "c": 2}}',
    )
    v.update("edge/stats/pi", b'{"uptime_seconds": 2, "messages_in": 1e300, "errors": {"c": 3}}')
    assert v.update("edge/status/pi", b'{"state": {"x": 1}}') is None
    assert v.update("edge/stats/big", b'{"pad": "' + b"x" * 10_000_000 + b'"}') is None
    for i in range(5000):
        v.update(f"edge/stats/fake-{i}", b'{"uptime_seconds": 1}')
    assert len(v.runtimes) <= MAX_RUNTIMES
    lines = v.render().splitlines()
    row = next(line for line in lines if line.startswith("pi "))
    assert row.split() == ["pi", "online", "-", "-", "-", "1", "-", "-", "-", "-", "c", "3"]
    assert max(len(line) for line in lines) < 200
    note = lines[-1]
    assert note.startswith("(skipped messages: ") and "1 a state that is no text" in note
    assert "1 over 1 MiB" in note and f"{5001 - MAX_RUNTIMES} past {MAX_RUNTIMES} runtimes" in note


def test_top_keeps_numbers_wider_than_their_column_apart():
    """A service with a million streams (`bench.hardening` runs one) showed
    `1,000,000123,456,789`: a number as wide as its column or wider ran into the next."""
    v = TopView("edge/stats/", "edge/status/")
    stats = {"active_streams": 1_000_000, "queue_depth": 123_456, "e2e_latency_p50_ms": 12345.6}
    v.update("edge/stats/pi", json.dumps({**stats, "uptime_seconds": 1, "messages_in": 0}).encode())
    v.update(
        "edge/stats/pi",
        json.dumps({**stats, "uptime_seconds": 2, "messages_in": 12_345_678}).encode(),
    )
    row = v.render().splitlines()[1].split()
    assert row[:8] == ["pi", "online", "1,000,000", "12,345,678", "-", "0", "123456", "12,346"]


def test_top_shows_no_rate_over_an_infinite_uptime():
    """A stats message with `"uptime_seconds": Infinity` (or the string "1e400") made the
    time between two messages infinite, and every rate showed 0 where there is none."""
    v = TopView("edge/stats/", "edge/status/")
    v.update("edge/stats/x", b'{"uptime_seconds": 1, "messages_in": 5, "errors": {"a": 1}}')
    v.update("edge/stats/x", b'{"uptime_seconds": Infinity, "messages_in": 9, "errors": {"a": 2}}')
    assert v.render().splitlines()[1].split()[3:6] == ["-", "-", "-"]
    v.update("edge/stats/x", b'{"uptime_seconds": "1e400", "messages_in": 20, "errors": {"a": 3}}')
    assert v.render().splitlines()[1].split()[3:6] == ["-", "-", "-"]


def test_top_drops_and_counts_what_comes_faster_than_it_draws():
    """Anyone may publish on the stats topics, faster than a terminal draws: every message
    waited in an unbounded queue. Past a limit they are dropped and counted (the note under
    the table says so); a refusal of the broker is never dropped."""
    from edge.top_cli import Inbox

    inbox = Inbox(limit=3)
    for _ in range(5):
        inbox.put(("edge/stats/x", b"{}"))
    inbox.put(("Not authorized", None))
    assert inbox.take_dropped() == 2 and inbox.take_dropped() == 0
    assert [inbox.get(1)[1] for _ in range(4)] == [b"{}", b"{}", b"{}", None]


def test_top_shows_a_real_service(service, broker):
    service("--stats-interval", "0.2")
    col = Collector(broker.url)
    wait_until(col.online, 60, "runtime online")
    pub = Publisher(broker.url)
    for stream in ("t-1", "t-2"):
        pub.send(stream, 1, np.full(6, 0.3))
    pub.flush()
    wait_until(lambda: len(col.of("predictions/")) == 2, 60, "predictions")
    out = subprocess.run(
        [sys.executable, "-m", "edge", "top", "--broker", broker.url, "--count", "2",
         "--timeout", "60"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    frames = [f for f in out.stdout.strip().split("\n\n") if f]
    assert len(frames) == 2 and "\033" not in out.stdout  # no escape codes into a pipe
    row = next(line for line in frames[-1].splitlines() if line.startswith("edge-test"))
    assert row.split()[1:3] == ["online", "2"]
    pub.close()
    col.close()


def test_top_on_a_small_terminal_draws_no_more_than_it_holds(broker):
    """On a terminal `top` redraws in place; with more runtimes than the terminal has lines
    (or lines wider than it) the frame scrolled: the header went off the screen, and every
    redraw left the last one's rows above it. The frame is cut to the terminal, saying so."""
    import os
    import pty

    import paho.mqtt.publish as publish

    host, port = broker.url.rsplit("/", 1)[1].split(":")
    msgs = [
        {"topic": f"edge/stats/pi-{i:02d}", "payload": json.dumps({"uptime_seconds": 1}),
         "qos": 1, "retain": True}
        for i in range(30)
    ]  # fmt: skip
    publish.multiple(msgs, hostname=host, port=int(port))
    leader, follower = pty.openpty()
    env = {**os.environ, "LINES": "12", "COLUMNS": "60"}
    top = subprocess.Popen(
        [sys.executable, "-m", "edge", "top", "--broker", broker.url, "--count", "30",
         "--timeout", "60"],
        stdout=follower, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(follower)
    text = b""
    with contextlib.suppress(OSError):  # EIO once top has exited and closed the terminal
        while chunk := os.read(leader, 65536):
            text += chunk
    os.close(leader)
    err = top.communicate(timeout=120)[1]
    assert top.returncode == 0, err
    last = text.decode().split("\x1b[2J")[-1].strip("\r\n").split("\r\n")
    assert len(last) <= 11 and all(len(line) < 60 for line in last), last
    assert last[1].startswith("runtime") and last[-1].startswith("(22 more lines: "), last


def test_top_into_a_pipe_whose_reader_is_gone_ends_without_a_traceback(broker):
    """`edge-lstm top | head -1`: the next frame after `head` exited ended `top` with a
    BrokenPipeError traceback. It ends quietly, exit 0."""
    import paho.mqtt.publish as publish

    host, port = broker.url.rsplit("/", 1)[1].split(":")

    def stats(n: int) -> None:
        doc = json.dumps({"uptime_seconds": n}).encode()
        publish.single("edge/stats/p", doc, qos=1, retain=True, hostname=host, port=int(port))

    stats(1)
    top = subprocess.Popen(
        [sys.executable, "-m", "edge", "top", "--broker", broker.url, "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert top.stdout is not None and top.stdout.readline().startswith(b"runtime")
    top.stdout.close()  # the reader goes away
    n = 2
    while True:  # each stats message is a frame written into the closed pipe
        stats(n)
        n += 1
        try:
            top.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            assert n < 120, "top did not end"
    err = top.communicate()[1].decode()
    assert top.returncode == 0 and "Traceback" not in err and "Broken pipe" not in err, err


def test_top_without_a_broker_is_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "edge", "top", "--broker", f"mqtt://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(err) == 1 and "cannot reach the broker" in err[0]
    bad = subprocess.run(
        [sys.executable, "-m", "edge", "top", "--broker", "tcp://x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "expected mqtt://" in bad.stderr
    nan = subprocess.run(
        [sys.executable, "-m", "edge", "top", "--timeout", "nan"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert nan.returncode == 2 and "--timeout nan: must be a number >= 0" in nan.stderr
    for args, named in (
        (["--broker", "mqtt://[::1"], "--broker 'mqtt://[::1': Invalid IPv6 URL"),
        (["--runtime-id", "a+b"], "--runtime-id 'a+b'"),
        (["--stats-topic", "edge/#/{runtime_id}"], "--stats-topic 'edge/#/{runtime_id}'"),
    ):  # a wildcard where MQTT forbids one killed the network thread, and top waited on
        r = subprocess.run(
            [sys.executable, "-m", "edge", "top", *args], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2 and named in r.stderr and "Traceback" not in r.stderr, r.stderr


@contextlib.contextmanager
def not_a_broker(answer: str) -> Iterator[int]:
    """A loopback port where something that is no MQTT broker listens: it closes each
    connection at once ("close") or holds it without a word ("silent")."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                if answer == "close":
                    conn.close()
                else:
                    held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("answer", ["close", "silent"])
def test_top_where_no_mqtt_broker_answers_says_so(answer):
    """`top --broker` at a port where no MQTT broker listens (another service, a TLS
    listener without mqtts://) that closed the connection had paho reconnect for ever in
    silence, and with --timeout `top` said it heard no stats, as if a broker were there."""
    with not_a_broker(answer) as port:
        timeout = "5" if answer == "silent" else "60"
        args = ["--broker", f"mqtt://127.0.0.1:{port}", "--timeout", timeout]
        out = subprocess.run(
            [sys.executable, "-m", "edge", "top", *args],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(err) == 1, out.stderr
    if answer == "close":
        assert f"error: mqtt://127.0.0.1:{port} ended the connection without answering" in err[0]
    else:
        assert f"{port} has not answered the connection as an MQTT broker does for 5 s" in err[0]


def test_top_that_hears_no_stats_names_the_topic_it_listened_on(broker):
    """`top --runtime-id` with a mistyped id (or another --stats-topic) gave up saying only
    `no stats from mqtt://...`, as if the broker were silent: it names the topic it read."""
    out = subprocess.run(
        [sys.executable, "-m", "edge", "top", "--broker", broker.url, "--runtime-id", "nosuch",
         "--timeout", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(err) == 1, out.stderr
    assert f"no stats on edge/stats/nosuch from {broker.url} for 1 s" in err[0], err


def test_top_reads_a_broker_on_a_unix_socket_and_says_when_the_broker_refuses_it(tmp_path):
    """`serve` accepts `unix:///PATH`; `top` refused it (`expected mqtt://HOST:PORT`). It
    reads the stats there now. A broker that refuses the connection (no user name where one
    is required) was retried by paho for ever in silence: one line and exit 1."""
    import shutil
    import tempfile

    import paho.mqtt.publish as publish

    from firmware_sim.broker import Broker

    short = Path(tempfile.mkdtemp(prefix="mq-", dir="/tmp"))  # a socket path is <= 107 bytes
    sock = short / "mqtt.sock"
    broker = Broker(tmp_path / "ux", embedded=False, extra=f"listener 0 {sock}\n").start()
    try:
        wait_until(sock.exists, 30, "the broker's socket")
        host, port = broker.url.rsplit("/", 1)[1].split(":")
        stats = json.dumps({"uptime_seconds": 1, "active_streams": 7}).encode()
        publish.single("edge/stats/ux", stats, qos=1, retain=True, hostname=host, port=int(port))
        out = subprocess.run(
            [sys.executable, "-m", "edge", "top", "--broker", f"unix://{sock}", "--count", "1",
             "--timeout", "60"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert next(r for r in out.stdout.splitlines() if r.startswith("ux ")).split()[:3] == [
            "ux",
            "online",
            "7",
        ]
    finally:
        broker.stop()
        shutil.rmtree(short, ignore_errors=True)
    closed = Broker(tmp_path / "closed", embedded=False, extra="allow_anonymous false\n").start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "edge", "top", "--broker", closed.url, "--timeout", "60"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        closed.stop()
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(err) == 1 and "refused us" in err[0], out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "edge", "top", "--broker", "mqtt://" + "a" * 70 + ".example"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "is no host name" in bad.stderr and "Traceback" not in bad.stderr

"""Real MQTT peers for tests: the service as a subprocess, a collector, a publisher."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import paho.mqtt.client as mqtt

from firmware_sim.mqtt import close_client
from firmware_sim.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent


def _hostport(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return str(u.hostname), int(u.port or 1883)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def Serve(bundle: Path, broker: str, state_dir: Path, *args: str) -> Runtime:
    """``edge-lstm serve`` in a child process of this very interpreter."""
    return Runtime(bundle, broker, state_dir, client_id="edge-test", extra=args)


class Collector:
    """Subscribes to predictions, errors and status with a persistent session."""

    def __init__(self, broker: str, client_id: str = "collector", **connect: Any) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(list(self.FILTERS))
        self.granted: list[int] | None = None  # from the latest SUBACK
        self.client.on_subscribe = self._on_subscribe
        self._configure = connect.get("configure")
        if self._configure:
            self._configure(self.client)
        host, port = _hostport(broker)
        self.client.connect(host, port, 30)
        self.client.loop_start()

    FILTERS: tuple[tuple[str, int], ...] = (
        ("predictions/#", 1),
        ("errors/#", 1),
        ("edge/status/#", 1),
        ("replies/#", 1),
    )

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, codes: Any, *rest: Any) -> None:
        with self.lock:
            self.granted = [int(getattr(c, "value", c)) for c in codes]

    def qos1_granted(self) -> bool:
        """Whether the broker granted every subscription at QoS 1; a refusal (NATS's MQTT
        listener refuses one whose durable consumer it could not create in time) asks again."""
        with self.lock:
            granted, self.granted = (
                self.granted,
                (None if self.granted and 128 in self.granted else self.granted),
            )
        if granted and 128 in granted:
            self.client.subscribe(list(self.FILTERS))
        return granted == [1] * len(self.FILTERS)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = {"raw": msg.payload.decode(errors="replace")}
        with self.lock:
            self.messages.append((msg.topic, doc))

    def of(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return [(t, d) for t, d in self.messages if t.startswith(prefix)]

    def online(self, runtime: str = "edge-test") -> bool:
        st = self.of(f"edge/status/{runtime}")
        return bool(st) and st[-1][1].get("state") == "online"

    def predictions(self) -> dict[tuple[str, int], list[np.ndarray]]:
        """(stream, seq) -> every y received for it (duplicates kept)."""
        out: dict[tuple[str, int], list[np.ndarray]] = {}
        for topic, doc in self.of("predictions/"):
            stream = topic.split("/", 1)[1]
            y = np.asarray(doc["y"], np.float32)
            rows = y.reshape(1, -1) if y.ndim == 1 else y
            for k, row in enumerate(rows):
                out.setdefault((stream, (doc["seq"] + k) % 2**32), []).append(row)
        return out

    def close(self) -> None:
        close_client(self.client)


class Publisher:
    def __init__(self, broker: str, client_id: str = "publisher", **kw: Any) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        if kw.get("configure"):
            kw["configure"](self.client)
        host, port = _hostport(broker)
        self.client.connect(host, port, 30)
        self.client.loop_start()
        self.infos: list[Any] = []

    def send(self, stream: str, seq: int, values: Any, topic: str | None = None) -> None:
        body = json.dumps({"seq": seq, "values": np.asarray(values).tolist()})
        self.raw(topic or f"sensors/{stream}/data", body.encode())

    def raw(self, topic: str, payload: bytes) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1))

    def flush(self, timeout: float = 30) -> None:
        from edge.mqtt_loop import delivered

        wait_until(lambda: all(delivered(i) for i in self.infos), timeout, "publishes acked")

    def close(self) -> None:
        close_client(self.client)


def offline(bundle: Path, samples: dict[str, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    """What the engine computes for each (stream, seq) when fed in order, seq from 1."""
    import edge

    engine = edge.load(bundle)
    out = {}
    for stream, x in samples.items():
        y = engine.step(stream, x, seq=1)
        for k, row in enumerate(y):
            out[(stream, k + 1)] = row
    return out

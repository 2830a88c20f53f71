"""The MQTT loop of ``edge-lstm serve``: paho in its own thread, one worker in ours.

The paho callback only turns a message into an ``Inbound`` record and puts it in a bounded
queue. The worker takes micro-batches, lets the ``Processor`` log and step them, publishes
the answers, and only then acknowledges the batch to the broker (``manual_ack``). A fixed
client id with a persistent session makes the broker keep everything unacknowledged or
published while we are away. Snapshots wait until every prediction published so far has
been acknowledged by the broker, so predictions are at-least-once too.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from .config import ServiceConfig
from .engine import Engine, load
from .errors import EdgeError, SnapshotError
from .metrics import Metrics
from .processor import Inbound, Outbound, Processor
from .wal import WriteAheadLog

log = logging.getLogger("edge.service")
SNAPSHOT = "snapshot.bin"
WAL = "wal.log"


def delivered(info: Any) -> bool:
    """Whether the broker acknowledged a QoS 1 publish.

    paho keeps a message published while disconnected and sends it after reconnecting, but
    its ``is_published()`` raises for such a message forever (its rc stays NO_CONN), so the
    flag is read directly.
    """
    return bool(info._published)


def no_delay(client: Any) -> None:
    """Switch Nagle off: paho leaves it on, and a stream of small QoS 1 messages then waits on
    delayed ACKs (tens of ms per message)."""
    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def open_engine(cfg: ServiceConfig) -> Engine:
    return load(
        cfg.model,
        backend=None if cfg.backend == "auto" else cfg.backend,
        max_batch=cfg.max_batch,
        gap_policy=cfg.gap_policy,
        allow_unsequenced=False,
        capacity=cfg.capacity,
        idle_timeout=cfg.idle_timeout or None,
        max_chunk=cfg.max_samples_per_message,
    )


class MqttService:
    def __init__(self, cfg: ServiceConfig) -> None:
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.cfg = cfg
        self.metrics = Metrics()
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine = open_engine(cfg)
        snap = self.state_dir / SNAPSHOT
        if snap.exists():
            try:
                self.engine.restore(snap, other_model_ok=True)
                log.info("restored %d streams from %s", len(self.engine.store), snap)
            except SnapshotError as exc:
                log.warning("starting with no streams: %s", exc)
        self.wal = WriteAheadLog(self.state_dir / WAL, fsync=cfg.durability == "power")
        self.processor = Processor(self.engine, cfg, self.wal, self.metrics)
        self.queue: queue.Queue[Inbound] = queue.Queue(cfg.queue_size)
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self._inflight: list[Any] = []
        self._pending_out: list[Outbound] = self.processor.replay()
        self._status_topic = cfg.status_topic.replace("{runtime_id}", cfg.runtime_id)
        self._stats_topic = cfg.stats_topic.replace("{runtime_id}", cfg.runtime_id)
        self.metrics.gauges.update(
            active_streams=lambda: len(self.engine.store),
            queue_depth=lambda: self.queue.qsize(),
        )
        self.metrics.derived_counters.update(
            duplicates=lambda: self.engine.counters.duplicates,
            gaps=lambda: self.engine.counters.gaps,
            evicted_streams=lambda: (
                self.engine.store.stats.evicted_lru + self.engine.store.stats.evicted_idle
            ),
        )
        self.client = self._make_client()

    # -- paho side --------------------------------------------------------------------------

    def _make_client(self) -> Any:
        mqtt, cfg = self.mqtt, self.cfg
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(
            cfg.reconnect_min * random.uniform(0.75, 1.25), cfg.reconnect_max
        )
        client.will_set(self._status_topic, self._status("offline"), qos=1, retain=True)
        if cfg.username:
            password = (
                Path(cfg.password_file).read_text().strip() if cfg.password_file else cfg.password
            )
            client.username_pw_set(cfg.username, password or None)
        if cfg.tls:
            client.tls_set(
                ca_certs=cfg.tls_ca or None,
                certfile=cfg.tls_cert or None,
                keyfile=cfg.tls_key or None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _status(self, state: str, **extra: Any) -> bytes:
        doc = {
            "state": state,
            "runtime_id": self.cfg.runtime_id,
            "model": self.engine.manifest.model_id,
            "ts": time.time(),
            **extra,
        }
        return json.dumps(doc).encode()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        no_delay(client)
        log.info("connected to %s (session present: %s)", self.cfg.broker, flags.session_present)
        self.metrics.inc("reconnects")
        filters = [
            self.processor.data.filter,
            self.processor.control.filter,
            self.processor.runtime_control,
        ]
        client.subscribe([(f, 1) for f in filters])
        client.publish(self._status_topic, self._status("online"), qos=1, retain=True)
        self.connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        ctype = getattr(msg.properties, "ContentType", None) if msg.properties else None
        item = Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, ctype, time.time())
        if self.cfg.overload == "drop-oldest":
            while True:
                try:
                    self.queue.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        old = self.queue.get_nowait()
                    except queue.Empty:
                        continue
                    self.metrics.inc("dropped_overload")
                    self._ack([old])
        while not self.stopping.is_set():  # "block": the broker holds the rest meanwhile
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- worker side ------------------------------------------------------------------------

    def _take(self) -> list[Inbound]:
        try:
            first = self.queue.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.cfg.max_wait_ms / 1000.0
        while len(batch) < self.cfg.max_batch:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        return batch

    def _publish(self, outs: list[Outbound]) -> None:
        for o in outs:
            info = self.client.publish(o.topic, o.payload, qos=o.qos, retain=o.retain)
            if o.qos:
                self._inflight.append(info)
        if len(self._inflight) > 4096:
            self._inflight = [i for i in self._inflight if not delivered(i)]

    def _ack(self, batch: list[Inbound]) -> None:
        for msg in batch:
            if msg.qos:
                self.client.ack(msg.mid, msg.qos)
        self.metrics.inc("acks", len(batch))

    def _predictions_delivered(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for info in self._inflight:
            while not delivered(info):
                if time.monotonic() > deadline or not self.connected.is_set():
                    return False
                time.sleep(0.002)
        self._inflight.clear()
        return True

    def checkpoint(self) -> bool:
        if not self._predictions_delivered(5.0):
            log.warning("snapshot postponed: predictions not yet acknowledged by the broker")
            return False
        self.processor.checkpoint(self.state_dir / SNAPSHOT)
        return True

    def reload(self) -> None:
        try:
            new = open_engine(self.cfg)
        except EdgeError as exc:
            log.error("reload failed, keeping the running model: %s", exc)
            return
        kept = new.manifest.state_layout() == self.engine.manifest.state_layout()
        if kept:
            new.load_state_from(self.engine)
        new.counters = self.engine.counters
        self.engine = self.processor.engine = new
        self.metrics.inc("reloads")
        note = "state kept" if kept else "state layout changed: all streams reset"
        log.info("model reloaded (%s): %s", new.manifest.model_id, note)
        self.client.publish(
            self._status_topic, self._status("online", reload=note), qos=1, retain=True
        )

    def run(self) -> int:
        cfg = self.cfg
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.processor.requests.add("reload"))
        if cfg.metrics_port:
            self.metrics.serve_prometheus(cfg.metrics_host, cfg.metrics_port)
        if cfg.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry
            props.ReceiveMaximum = min(65535, cfg.queue_size)
            self.client.connect_async(
                cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=props
            )
        else:
            self.client.connect_async(cfg.host, cfg.port, cfg.keepalive)
        self.client.loop_start()
        log.info("serving %s (%s) for %s", cfg.model, self.engine.manifest.model_id, cfg.broker)
        last_snapshot = last_stats = time.monotonic()
        try:
            while not self.stopping.is_set():
                if self._pending_out and self.connected.is_set():
                    self._publish(self._pending_out)
                    self._pending_out = []
                self._work_once()
                now = time.monotonic()
                if "reload" in self.processor.requests:
                    self.processor.requests.discard("reload")
                    self.reload()
                if (
                    now - last_snapshot >= cfg.snapshot_interval
                    or "snapshot" in self.processor.requests
                ) and self.checkpoint():
                    self.processor.requests.discard("snapshot")
                    last_snapshot = now
                if cfg.stats_interval and now - last_stats >= cfg.stats_interval:
                    self.client.publish(self._stats_topic, json.dumps(self.stats()), qos=0)
                    last_stats = now
            return self._shutdown()
        finally:
            self.client.loop_stop()
            self.wal.close()

    def _work_once(self) -> None:
        batch = self._take()
        outs = self.processor.tick()
        if batch:
            outs += self.processor.process(batch)
        self._publish(outs)
        if batch:
            self._ack(batch)

    def _shutdown(self) -> int:
        """Drain what is queued, snapshot, say offline, disconnect."""
        deadline = time.monotonic() + 3.0
        while not self.queue.empty() and time.monotonic() < deadline:
            self._work_once()
        self.checkpoint()
        info = self.client.publish(self._status_topic, self._status("offline"), qos=1, retain=True)
        if self.connected.is_set():
            info.wait_for_publish(2.0)
        self.client.disconnect()
        log.info("stopped cleanly: %s", json.dumps(self.stats()))
        return 0

    def stats(self) -> dict[str, Any]:
        return {**self.metrics.snapshot(), "engine": self.engine.stats(), "ts": time.time()}

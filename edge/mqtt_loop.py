"""The MQTT transport of ``edge-lstm serve``: paho in its own thread, one worker in ours.

The paho callbacks never block: a message becomes an ``Inbound`` record appended to the inbox,
a PUBACK becomes a message id in the ack queue. The broker holds any backlog: messages are
acknowledged only after the ``Processor`` has logged them (``manual_ack``), and MQTT 5's
Receive Maximum (``queue_size``) bounds how many the broker sends before we acknowledge (with
MQTT 3.1.1 the broker's own ``max_inflight_messages`` does). Answers leave through the
``Outbox`` within ``max_unacked``; while that window is full no new message is taken, so the
backlog stays at the broker, not in our memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from paho.mqtt.client import topic_matches_sub
from paho.mqtt.subscribeoptions import SubscribeOptions

from . import early_signals, systemd_notify
from .config import ServiceConfig
from .engine import Engine, load
from .errors import ConfigError, EdgeError, shown
from .ha_discovery import PER_ROUND, Announcer, announcer_for
from .ha_discovery import publish as publish_discovery
from .inbox import Inbox
from .journal import Journal, StateAppeared
from .metrics import Metrics
from .mqtt_client import CLOSED, Client, packet_size
from .mqtt_network import NetworkLoop, held
from .outbox import Outbound
from .outfile import replace_whole
from .processor import Inbound, Processor, RateLimitedLog, loud, storage_fault
from .state_lock import StateLock
from .topics import overlap, runtime_filter

log = logging.getLogger("edge.service")
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another client connected with our id
RETAIN_NOT_SUPPORTED = 0x9A  # MQTT 5 CONNACK reason: the broker keeps no retained messages
QOS_NOT_SUPPORTED = 0x9B  # MQTT 5 CONNACK reason: our will's QoS is above the broker's maximum
# CONNACK reasons that refuse who we are (MQTT 3.1.1's codes 4 and 5 read as these two)
BAD_CREDENTIALS, NOT_AUTHORIZED, BAD_AUTH_METHOD, BANNED = 0x86, 0x87, 0x8C, 0x8A
# What serve asks of a broker (its will, answers and subscriptions are QoS 1, its status and
# will retained), for the failures a broker gives no reason for.
QOS_HINT = (
    "serve's last will, answers and subscriptions are QoS 1: the broker's max_qos must be 1 or 2"
)
DRAIN_SECONDS = 3.0  # how long SIGTERM keeps answering what is already here
STOP_HA_ROUNDS = 3  # rounds of queued Home Assistant sensor removals a clean stop still sends
RETRY_SECONDS = 1.0  # between attempts to write to an unwritable state directory


def delivered(info: Any) -> bool:
    """Whether the broker acknowledged a QoS 1 publish.

    paho keeps a message published while disconnected and sends it after reconnecting, but
    its ``is_published()`` raises for such a message forever (its rc stays NO_CONN), so the
    flag is read directly.
    """
    return bool(info._published)


def connect_error(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in a few words (the OS's own reason)."""
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved: {exc.strerror or exc}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if isinstance(exc, ConnectionError) else exc.strerror
    return str(exc) if exc else "unknown reason"


def no_delay(client: Any) -> None:
    """Switch Nagle off: paho leaves it on, and a stream of small QoS 1 messages then waits on
    delayed ACKs (tens of ms per message)."""
    sock = client.socket()
    if sock is not None and sock.family != getattr(socket, "AF_UNIX", None):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def open_engine(cfg: ServiceConfig) -> Engine:
    return load(
        cfg.model,
        backend=None if cfg.backend == "auto" else cfg.backend,
        kernel_mismatch=cfg.kernel_mismatch,
        max_batch=cfg.max_batch,
        gap_policy=cfg.gap_policy,
        allow_unsequenced=False,
        capacity=cfg.capacity,
        idle_timeout=None,  # the processor forgets idle streams, and logs it for replays
        restart_gap=cfg.restart_gap,
    )


PACKET_TOO_LARGE = 0x95
ACL_HINT = "; check its ACL and limits"

# In the state directory: the topic filters the broker session holds for this service.
SUBSCRIPTIONS = "subscriptions.json"


def publish_size(o: Outbound, protocol: str) -> int:
    """Bytes of the PUBLISH packet that carries ``o`` (no properties)."""
    rest = 2 + len(o.topic.encode()) + (2 if o.qos else 0) + (protocol == "5") + len(o.payload)
    return (2 if rest < 1 << 7 else 3 if rest < 1 << 14 else 4 if rest < 1 << 21 else 5) + rest


# Ends a status text cut to fit the broker's maximum packet size.
CUT = " [...] (shortened to fit the broker's maximum packet size; in full in the log)"
STATUS_BASE = ("state", "runtime_id", "instance", "model", "kernels", "ts")  # never cut


def reload_outcome(answer: str) -> tuple[str, str]:
    """(``ok`` or ``failed``, why) of an answer to ``reload``."""
    failed = answer.startswith("failed")
    return ("failed", answer.partition(": ")[2]) if failed else ("ok", answer)


def base_status(doc: dict[str, Any], size: Any, limit: int) -> bytes:
    """``STATUS_BASE`` of ``doc`` and the outcome of the last ``reload`` (``failed: ...`` or
    ``ok: ...``, its reason cut to fit, else the bare word): a failed reload must not vanish
    from the status because its text, or another one, would not fit."""
    base = {k: doc[k] for k in STATUS_BASE if k in doc}
    answer = doc.get("reload")
    if isinstance(answer, str):
        word, why = reload_outcome(answer)
        while why:
            out = json.dumps({**base, "reload": f"{word}: {why}"}).encode()
            over = size(out) - limit
            if over <= 0:
                return out
            why = why[: max(0, len(why) - over)]
        out = json.dumps({**base, "reload": word}).encode()
        if size(out) <= limit:
            return out
    return json.dumps(base).encode()


def fitted(doc: dict[str, Any], size: Any, limit: int) -> bytes:
    """``doc`` as JSON, its longest texts besides ``STATUS_BASE`` (a reload failure, a
    reason, damage found) cut with ``CUT`` until ``size(payload)`` is within ``limit``; the
    base and the reload's outcome alone when cutting is not enough (``base_status``). A
    status too large is not sent at all, and the broker would go on showing the previous one."""
    whole = doc
    doc = {k: list(v) if isinstance(v, list) else v for k, v in doc.items()}
    while True:
        out = json.dumps(doc, allow_nan=False).encode()
        over = size(out) - limit
        if over <= 0:
            return out
        # (length, where it is held, its key there) of every text that may be cut
        texts: list[tuple[int, Any, Any]] = []
        for key, value in doc.items():
            if key in STATUS_BASE:
                continue
            if isinstance(value, str):
                texts.append((len(value), doc, key))
            elif isinstance(value, list):
                texts += [(len(v), value, i) for i, v in enumerate(value) if isinstance(v, str)]
        best: tuple[int, Any, Any] = max(texts, key=lambda t: t[0], default=(0, {}, ""))
        length, holder, key = best
        if length <= len(CUT):
            return base_status(whole, size, limit)
        holder[key] = holder[key][: max(0, length - over - len(CUT))] + CUT


def recorded_filters(path: Path) -> Any:
    """What ``path`` records (the JSON list of filters an earlier run subscribed to); [] when
    there is none or it cannot be read. Read in the network thread: anything but a regular
    file (a FIFO, which would wait for a writer for ever) is not opened."""
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable: nothing known to drop
        return []


class MqttService:
    def __init__(self, cfg: ServiceConfig) -> None:
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        self.cfg = cfg
        self.wake = threading.Event()  # a message arrived (or an answer was acknowledged)
        self.answered = threading.Event()  # the broker acknowledged an answer
        self.stopping = False  # asked to stop (a plain flag: see ``_stop``)
        self.exit_code = 0  # of ``run`` once stopped
        self.requests: set[str] = set()
        if threading.current_thread() is threading.main_thread():
            # First of all: a SIGTERM while the model loads or the log replays is a clean stop.
            signal.signal(signal.SIGTERM, self._stop)
            signal.signal(signal.SIGINT, self._stop)
            signal.signal(signal.SIGHUP, lambda *_: self.requests.add("reload"))
            for sig in early_signals.take():  # arrived while the process was starting
                if sig == signal.SIGHUP:
                    self.requests.add("reload")
                else:
                    self._stop()
            systemd_notify.notify("READY=1")  # systemd may send signals from now on
        self.metrics = Metrics()
        self.lock = StateLock(cfg.state_dir)
        self.lock.acquire()
        journal = Journal(cfg.state_dir, fsync=cfg.durability == "power")
        journal.claim = self.lock.follow
        self.processor = Processor(open_engine(cfg), cfg, journal, self.metrics)
        # Messages held for reordering wait only while the broker can send what they wait
        # for: from the first message taken on a connection (``_take``), not while starting
        # (those a crash left held would all be given up on) or cut off from the broker.
        self.processor.pause()
        try:
            rec = self.processor.recover()
        except OSError as exc:
            raise ConfigError(f"state_dir {shown(cfg.state_dir)} cannot be read: {exc}") from exc
        try:
            journal.open()
        except OSError as exc:
            self.processor.degraded = storage_fault("state_dir not writable", exc, cfg.state_dir)
            log.error("cannot write in state_dir %s: %s; not acknowledging", cfg.state_dir, exc)
        self.outbox = self.processor.outbox
        # Said in every status while this process runs: what start-up found damaged.
        self._recovery = [*rec.damaged_snapshots, *rec.damage][:20]
        # Messages taken from the broker before we acknowledge them; with drop-oldest twice
        # that, so that what lies beyond queue_size can be answered "dropped".
        self.read_limit = cfg.queue_size * (2 if cfg.overload == "drop-oldest" else 1)
        self.inbox = Inbox(self.read_limit, cfg.state_dir, log_reserve=journal.reserve)
        # (message id, the broker's reason code when it refused the message, else None)
        self.acks: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        # A message's packet id means something only to the session it came in: a connection
        # that finds no session (a broker restarted without persistence, the session expired)
        # numbers its deliveries anew, and a PUBACK of an old id there would acknowledge
        # another, newer message, maybe before it is logged. Inbound ids carry the epoch of
        # their session in bits 16+; only those of the current one are acknowledged.
        self._epoch = 0
        self._epoch_lock = threading.Lock()
        self._refused = False  # the last CONNACK refused us: its disconnect says nothing new
        self.connected = threading.Event()
        self._connect_failures = 0  # in a row, for the log
        self._failure_reason: str | None = None  # that of the last failure logged about
        # Connections in a row the broker dropped soon after making them (another client
        # with our id): past the third their connects and disconnects go to debug level, and
        # the network loop says how many there were (at the 3rd, 10th, every 100th).
        self._flaps = 0
        self._up_since: float | None = None  # when the current connection was made
        self._attempting = False  # a connection attempt is under way (no CONNACK yet)
        self._clock = time.monotonic
        # The broker's refusals of our publishes, one per answer (a stream's topic its ACL
        # denies), and discovery messages too large for it (each round of new streams): the
        # first 10 a minute at their level, the rest at debug level.
        self._log_refusal = RateLimitedLog()
        self._status_topic = cfg.status_topic.replace("{runtime_id}", cfg.runtime_id)
        # every runtime's status, ours among them: another runtime that answers the samples
        # we answer, on the topics we answer them on, says so in its status (``_on_peer``)
        self._statuses = runtime_filter(cfg.status_topic) or self._status_topic
        self._stats_topic = cfg.stats_topic.replace("{runtime_id}", cfg.runtime_id)
        self._said: tuple[str, str | None] | None = None  # what our retained status says
        self._answers: dict[str, Any] = {}  # the latest answer to each runtime command
        # False once the broker says it keeps no retained messages (MQTT 5 CONNACK): it
        # refuses a retained will or publish, so the status goes out without the flag.
        self._retain = True
        # The broker refused a topic filter we subscribed to: nothing on it will arrive.
        self._deaf: str | None = None
        self._status_mid = -1  # the message id of our last status
        self._max_packet = 0  # the broker's largest packet (MQTT 5 CONNACK), 0: not said
        self._subscribing: tuple[int, list[str]] = (-1, [])  # the SUBSCRIBE's id and filters
        self._had_session = False  # a connection of this process made one at the broker
        self._too_large_said: set[str] = set()  # topics whose message was too large, said
        # In each of our statuses but "offline": one on our status topic with another is
        # another runtime's. Not in the last will, which goes in every CONNECT: a broker's
        # maximum packet size refuses the connection for a will too large.
        self._instance = os.urandom(4).hex()
        self._others = 0  # statuses of other runtimes seen on our status topic, for the log
        self._peers_said: dict[str, str] = {}  # runtime id -> the instance said to overlap
        self.metrics.gauges.update(
            active_streams=lambda: len(self.engine.store),
            queue_depth=lambda: len(self.inbox),
            queue_on_disk=lambda: self.inbox.in_file,
            unacked_answers=lambda: len(self.outbox),
            degraded=lambda: float(self.processor.degraded is not None),
        )
        self.metrics.derived_counters.update(
            duplicates=lambda: self.engine.counters.duplicates,
            gaps=lambda: self.engine.counters.gaps,
            restarts=lambda: self.engine.counters.restarts,
            evicted_streams=lambda: (
                self.engine.store.stats.evicted_lru + self.engine.store.stats.evicted_idle
            ),
        )
        self.client = self._make_client()
        self.network = NetworkLoop(
            self.client,
            may_read=lambda: len(self.inbox) < self.read_limit,
            must_read=self._must_read,
            on_connect_fail=self._on_connect_fail,
            reconnect_min=cfg.reconnect_min * random.uniform(0.75, 1.25),
            reconnect_max=cfg.reconnect_max,
            keepalive=cfg.keepalive,
        )
        self.ha = announcer_for(cfg, self.engine.manifest)  # Home Assistant discovery, if on
        # the retained sensors read back at each connect, for the worker to reconcile
        self._ha_found: queue.SimpleQueue[str] = queue.SimpleQueue()
        # one per connection: whether the broker kept our session (the loop re-announces)
        self._ha_connects: queue.SimpleQueue[bool] = queue.SimpleQueue()
        # where the sensors read back are (``Announcer.filters``): a tuple for ``startswith``
        self._ha_under = (
            None if self.ha is None else tuple(f.removesuffix("+/config") for f in self.ha.filters)
        )
        self._ha_rounds: int | None = None  # rounds of a paced announcement so far

    @property
    def engine(self) -> Engine:
        return self.processor.engine

    def _must_read(self) -> bool:
        """PUBACKs are awaited: the answer window is full, or the service is degraded (the
        log keeps room for the answers a checkpoint carries over, and only their
        acknowledgements give it back)."""
        in_flight = self.outbox.in_flight
        return in_flight >= self.outbox.window or (
            in_flight > 0 and self.processor.degraded is not None
        )

    # -- paho side --------------------------------------------------------------------------

    def _make_client(self) -> Any:
        mqtt, cfg = self.mqtt, self.cfg
        v5 = cfg.protocol == "5"
        client = Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
            transport="unix" if cfg.unix else "tcp",
        )
        client.max_inflight_messages_set(
            0
        )  # our outbox window governs; paho rescans its queue otherwise
        client.max_queued_messages_set(0)
        client.will_set(self._status_topic, self._status("offline"), qos=1, retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.login_password() or None)
        if cfg.tls:
            client.tls_set(
                ca_certs=cfg.tls_ca or None,
                certfile=cfg.tls_cert or None,
                keyfile=cfg.tls_key or None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_too_large = self._on_too_large
        return client

    def _announce(self, messages: list[Any]) -> None:
        """Publish Home Assistant discovery messages; those larger than the broker takes are
        said (their sensors are missing in Home Assistant) and sent again after the next
        connection, maybe to a broker that takes them."""
        if self.ha is None:
            return
        streams = self.ha.not_sent(publish_discovery(self.client, messages, self._retain))
        if streams:  # at every round that announces new streams: rate-limited
            named = ", ".join(streams[:5]) + (
                f" and {len(streams) - 5} more" if streams[5:] else ""
            )
            self._log_refusal(
                "discovery_too_large",
                f"Home Assistant discovery of stream(s) {named} not sent: over the broker's "
                f"maximum packet size ({self._max_packet} bytes); their sensors are missing in "
                "Home Assistant until a reconnect to a broker that takes them (mosquitto's "
                "max_packet_size)",
            )

    def _reconcile_ha(self, ha: Announcer) -> None:
        """Once a second: Home Assistant's sensors in step with the streams held, new ones
        announced ``PER_ROUND`` a second (after a broker lost them, every stream is new to
        it), removals as many streams' worth, with the progress of a longer run in the log."""
        found = []
        while not self._ha_found.empty():
            found.append(self._ha_found.get_nowait())
        kept = []
        while not self._ha_connects.empty():
            kept.append(self._ha_connects.get_nowait())
        if kept:
            ha.reconnected(everything=not all(kept))
        self._announce(ha.reconcile(self.engine.store.streams, found))
        left = ha.waiting or ha.removing
        if left and self._ha_rounds is None:  # a run longer than a round starts
            self._ha_rounds = 0
            log.info(
                "Home Assistant discovery: %d streams a second; %d streams still to announce, "
                "%d sensors to remove",
                PER_ROUND,
                ha.waiting,
                len(ha.removing),
            )
        if self._ha_rounds is not None:
            self._ha_rounds += 1
            if not left:
                log.info("Home Assistant discovery: every stream announced, every sensor removed")
                self._ha_rounds = None
            elif self._ha_rounds % 10 == 0:
                log.info(
                    "Home Assistant discovery: %d streams still to announce, %d sensors to remove",
                    ha.waiting,
                    len(ha.removing),
                )

    def _remove_ha_sensors(self) -> None:
        """At a clean stop, the sensor removals still queued (streams evicted, the sensors a
        reload's model has not): dropped, a service not started again left them in Home
        Assistant for good. ``STOP_HA_ROUNDS`` rounds at most, one right away, then one a second
        as while serving; a longer queue's rest the next run removes, finding them retained
        under its node."""
        ha = self.ha
        for n in range(STOP_HA_ROUNDS):
            if ha is None or not ha.removing or not self.connected.is_set():
                return
            if n:
                time.sleep(1.0)  # the pace of ``_reconcile_ha``'s rounds
            self._announce(ha.removals())

    def _on_too_large(self, topic: str, size: int) -> None:
        """A message of ours (the stats, the status, a discovery message) larger than the
        broker takes: not sent, since the broker would close the connection for it (and
        with it every answer in flight, at every stats message). Said once per topic."""
        self.metrics.inc("publish_failed")
        # A discovery topic per stream: said once for them all, not once per device id ever
        # heard (each remembered, for as long as the service runs).
        ha = self._ha_under is not None and topic.startswith(self._ha_under)
        kind = self.ha.filter if ha and self.ha is not None else topic
        said = kind in self._too_large_said
        self._too_large_said.add(kind)
        log.log(
            logging.DEBUG if said else logging.WARNING,
            "not sent on %s: %d bytes, over the broker's maximum packet size (%d bytes), "
            "for which it would close the connection%s",
            topic,
            size,
            self._max_packet,
            "" if said else f" (said once for {kind}; counted in publish_failed)",
        )

    def _status(self, state: str, **extra: Any) -> bytes:
        """Our status as JSON, within the broker's maximum packet size (the full text of
        one cut to fit is logged)."""
        doc = {
            "state": state,
            "runtime_id": self.cfg.runtime_id,
            **({"instance": self._instance} if state != "offline" else {}),
            "model": self.engine.manifest.model_id,
            "kernels": self.engine.model.kernels,
            "ts": time.time(),
            **extra,
        }
        if state != "offline":  # what we answer, and where: for another runtime's check
            doc |= {
                "data_topic": self.cfg.data_topic,
                "prediction_topic": self.cfg.prediction_topic,
            }
        if self._recovery and state != "offline":  # every status of this run says so
            doc["recovered_from_damage"] = self._recovery
        out = json.dumps(doc, allow_nan=False).encode()
        if not self._max_packet:
            return out
        topic, v5 = self._status_topic.encode(), self.cfg.protocol == "5"
        fit = fitted(doc, lambda b: packet_size(topic, len(b), 1, v5), self._max_packet)
        if fit != out:
            log.warning(
                "status on %s shortened to fit the broker's maximum packet size (%d bytes); "
                "in full: %s",
                self._status_topic,
                self._max_packet,
                out.decode(),
            )
        return fit

    def _say(self, state: str, reason: str | None = None, **answers: Any) -> None:
        """Publish our retained status (online, degraded) when it changes. The latest answer
        to each runtime command (``reload``, ``snapshot``) stays in every status until the
        next: a later status (storage back, a reconnect) must not erase a failed reload."""
        self._answers.update(answers)
        if self.connected.is_set() and self.client.refused(self._status_topic) is None:
            extra = {**self._answers, **({"reason": reason} if reason else {})}
            status = self._status(state, **extra)
            info = self.client.publish(self._status_topic, status, 1, self._retain)
            self._status_mid = info.mid
            self._said = (state, reason)

    def _on_pre_connect(self, client: Any, userdata: Any) -> None:
        self._attempting = True
        client.read_error = None  # what ends this attempt is its own

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._attempting = False
        if reason.is_failure:
            self._refused = True
            if reason.value == RETAIN_NOT_SUPPORTED and self._retain:
                self._no_retain(client)
                return
            why = f"broker {self.cfg.broker} refused the connection: {reason}"
            if reason.value == QOS_NOT_SUPPORTED:
                why += f" ({QOS_HINT})"
            elif reason.value in (BAD_CREDENTIALS, NOT_AUTHORIZED, BAD_AUTH_METHOD, BANNED):
                why += f" ({self._credentials()})"
            self._connect_failed(logging.ERROR, why)
            return
        no_delay(client)
        for refused in client.drop_refused():  # sent again now, each would close it again
            self.acks.put(refused)
        failed = self._connect_failures
        self._up_since = self._clock()
        log.log(
            logging.INFO if self._flaps < 3 else logging.DEBUG,
            "connected to %s (session present: %s)%s",
            self.cfg.broker,
            flags.session_present,
            f" after {failed} failed attempts" if failed > 3 else "",
        )
        # What came in before is not acknowledged on this connection. A new session numbers
        # its deliveries anew: an old id would acknowledge another message. A session that
        # goes on sends every message we did not acknowledge again, with its id (MQTT
        # 4.4.0-1): that copy is the one acknowledged; the original's PUBACK as well would
        # be a second one for the id, which the broker may have given to a new message by
        # then, acknowledging it before it is in the log.
        with self._epoch_lock:
            self._epoch = (self._epoch + 1) & 0xFFFF
        limit = getattr(props, "ReceiveMaximum", None) if props else None
        if isinstance(limit, int) and limit > 0:
            # The broker takes no more unacknowledged publishes than that: our window obeys.
            self.outbox.window = min(self.cfg.max_unacked, limit)
        self.metrics.inc("reconnects")
        p = self.processor
        filters = (p.data.filter, p.control.filter, p.runtime_control)
        if self.cfg.protocol == "5":  # the broker's stored copies are old news: not sent
            keep = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            subs: list[tuple[str, Any]] = [(f, keep) for f in filters]
            if self.ha is not None:  # our own sensors' stored copies, not our publishes
                subs += [(f, SubscribeOptions(qos=0, noLocal=True)) for f in self.ha.filters]
            # the runtimes' statuses (``_on_status``, ``_on_peer``), stored ones too: a
            # runtime running already says so only in its stored status
            subs.append((self._statuses, SubscribeOptions(qos=0, noLocal=True)))
        else:  # MQTT 3.1.1 sends them at every subscribe; they are answered `retained`
            subs = [(f, 1) for f in filters]
            if self.ha is not None:
                subs += [(f, 0) for f in self.ha.filters]
            subs.append((self._statuses, 0))
        known = self._drop_stale_subscriptions(client, [f for f, _ in subs], flags.session_present)
        if not flags.session_present and (self._had_session or known):
            self._session_lost()
        self._had_session = True
        self._ha_connects.put(bool(flags.session_present))
        self._max_packet = int(getattr(props, "MaximumPacketSize", 0) or 0)
        client.max_packet = self._max_packet
        if getattr(props, "RetainAvailable", 1) == 0 and self._retain:
            self._no_retain(client)
        _, mid = client.subscribe(subs)
        self._subscribing = (mid, [f for f, _ in subs])
        self.connected.set()
        self._connect_failures = 0
        self._failure_reason = None
        self._said = None
        self.wake.set()

    def _credentials(self) -> str:
        """Who we said we are, for a refusal of it (mosquitto says `Not authorized` to a
        wrong password and to an anonymous client where it allows none alike)."""
        cfg = self.cfg
        if not cfg.username:
            return (
                "no user name given: the broker may allow no anonymous clients "
                "(mosquitto's allow_anonymous false); set username and password_file"
            )
        where = f"password_file {cfg.password_file}" if cfg.password_file else "password"
        if not cfg.password_file and not cfg.password:
            where = "no password"
        return f"user name {shown(cfg.username)}, {where}: check them against the broker's"

    def _no_retain(self, client: Any) -> None:
        """A broker without retained messages (mosquitto's ``retain_available false``)
        refuses a connection whose will is retained, for ever: the will and the status go
        without the flag from now on."""
        self._retain = False
        client.will_set(self._status_topic, self._status("offline"), qos=1, retain=False)
        log.warning(
            "broker %s keeps no retained messages: our status goes out without the retain "
            "flag, so a client subscribing later sees it only when it changes%s",
            self.cfg.broker,
            "; Home Assistant discovery is not kept either" if self.ha is not None else "",
        )

    def _session_lost(self) -> None:
        """The broker had no session for us where one was made before (by this process, or
        by an earlier run on this state directory, which recorded its subscriptions): what
        was published on our topics while we were away, and what it held unacknowledged,
        was not kept for us. Said, and counted; nothing here can get it back."""
        self.metrics.inc("sessions_lost")
        log.warning(
            "the broker %s kept no session for client id %r: messages published on our "
            "topics while we were away are lost to us (the session expired: our "
            "session_expiry, mosquitto's persistent_client_expiration; or the broker "
            "restarted without persistence)",
            self.cfg.broker,
            self.cfg.client_id,
        )

    def _drop_stale_subscriptions(
        self, client: Any, filters: list[str], session_present: bool
    ) -> bool:
        """A session that goes on keeps the subscriptions an earlier configuration made under
        this client id (another data topic, runtime id or discovery prefix): their messages
        came in and were answered ``bad_topic``. The filters each run subscribes to are
        recorded in the state directory; those recorded and not made now are unsubscribed."""
        path = Path(self.cfg.state_dir) / SUBSCRIPTIONS
        before = recorded_filters(path)
        known = {f for f in before if isinstance(f, str)} if isinstance(before, list) else set()
        stale = sorted(known - set(filters))
        if stale and session_present:
            client.unsubscribe(stale)
            log.info("unsubscribed from %s: an earlier configuration's topics", ", ".join(stale))
        if before != filters:
            try:
                replace_whole(path, lambda tmp: tmp.write_text(json.dumps(filters)), ConfigError)
            except ConfigError as exc:  # a read-only state_dir is reported where it matters
                log.warning("cannot record the subscriptions: %s", exc)
        return bool(known)

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, codes: list[Any], props: Any
    ) -> None:
        """A broker's ACL may refuse a subscription (mosquitto's dynamic security, EMQX,
        HiveMQ): the service would be online and deaf to those topics. Said loudly instead."""
        sent, filters = self._subscribing
        if mid != sent:
            return
        watch = [c for f, c in zip(filters, codes) if f == self._statuses]
        if watch and watch[0].is_failure:  # the checks for twin runtimes only
            log.warning(
                "the broker refused the subscription to the status topics %s (%s): another "
                "runtime with our runtime_id, or answering our streams, would go unnoticed",
                self._statuses,
                watch[0],
            )
        refused = [
            f"{shown(f)} ({c})"
            for f, c in zip(filters, codes)
            if c.is_failure and f != self._statuses
        ]
        # Granted at QoS 0 (a broker's maximum QoS): messages come unacknowledged, so those
        # in hand at a crash are lost, and none are kept for us while we are away.
        qos0 = [
            f
            for f, c in zip(filters, codes)
            if not c.is_failure
            and c.value == 0
            and f != self._statuses
            and (self.ha is None or f not in self.ha.filters)
        ]
        if qos0:
            self.metrics.inc("subscriptions_downgraded")
            log.warning(
                "the broker granted %s at QoS 0 only, not the QoS 1 asked for: what arrives "
                "there is not acknowledged after it is logged (a crash loses what is in hand) "
                "and nothing is kept for us while we are away; check the broker's maximum QoS",
                ", ".join(map(repr, qos0)),
            )
        if refused:
            self._deaf = f"the broker refused the subscription to {', '.join(refused)}"
            log.error(
                "%s: nothing on it arrives; check the broker's ACL for this client", self._deaf
            )
        else:
            self._deaf = None

    def _on_connect_fail(self, exc: BaseException) -> None:
        why = f"cannot reach the broker {self.cfg.broker} ({connect_error(exc)})"
        self._connect_failed(logging.WARNING, why)

    def _connect_failed(self, level: int, why: str) -> None:
        """One more failed connection attempt in a row, logged as ``loud`` says, and at once
        when its reason differs from the last one's."""
        self._connect_failures += 1
        n, last = self._connect_failures, self._failure_reason
        self._failure_reason = why
        if not loud(n) and why == last:
            log.debug("%s; retrying, attempt %d", why, n)
            return
        # Said at the third: what follows the same is summarised.
        note = " (the same again is logged at attempt 10 and every 100th)" if n == 3 else ""
        log.log(level, "%s; retrying, attempt %d%s", why, n, note)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        refused, self._refused = self._refused, False
        up, self._up_since = self._up_since, None
        attempting, self._attempting = self._attempting, False
        if self.stopping or refused:
            return
        if up is None:
            if attempting:  # no CONNACK came: the broker ended it, or hangs
                ended = getattr(client, "read_error", None)
                if ended == CLOSED and self.cfg.protocol == "3.1.1":
                    ended += (
                        " (mosquitto closes an MQTT 3.1.1 connection it refuses without a "
                        f"reason: {QOS_HINT}, and retain_available true; MQTT 5 says why)"
                    )
                if ended:  # a TLS alert (our certificate refused), a close without a word
                    why = f"the broker {self.cfg.broker} ended the connection before answering it: {ended}"
                else:
                    why = f"the broker {self.cfg.broker} did not answer the connection ({reason})"
                self._connect_failed(logging.WARNING, why)
            # else paho telling of a disconnect a second time (the broker's DISCONNECT, then
            # the socket's close): said once
            return
        short = not held(self._clock() - up, self.cfg.reconnect_max)
        self._flaps = self._flaps + 1 if short else 0
        said = loud(self._flaps)
        more = " (while it goes on, more at the 10th and every 100th)" if self._flaps == 3 else ""
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self.metrics.inc("sessions_taken_over")
            log.log(
                logging.ERROR if said else logging.DEBUG,
                "the broker gave our session to another client with client id %r: is a "
                "second serve running with it? Reconnecting with backoff%s",
                self.cfg.client_id,
                more,
            )
        else:
            log.log(
                logging.WARNING if said else logging.DEBUG,
                "disconnected from the broker (%s); reconnecting%s",
                reason,
                more,
            )

    def _on_status(self, msg: Any) -> None:
        """A status on our status topic that is not ours: another runtime with our
        runtime_id (a client id of its own; a twin with ours the broker drops in turn, see
        ``_on_disconnect``). Each overwrites the other's retained status, its last will says
        ``offline`` for both, and at each connect each removes the Home Assistant sensors of
        the other's streams under the node they share: said in the log (the first three, the
        10th, every 100th), never answered with a status of ours, which would be the other's
        news in turn, without end. A stored status (an earlier run of ours), an empty one
        (cleared by hand), ours (MQTT 3.1.1 has no noLocal) and an ``offline`` one (the last
        will of an earlier run of ours, published by the broker once it notices it gone)
        are not another runtime's news."""
        if msg.retain or not msg.payload:
            return
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and (
            doc.get("instance") == self._instance or doc.get("state") == "offline"
        ):
            return
        self._others += 1
        log.log(
            logging.ERROR if loud(self._others) else logging.DEBUG,
            "another runtime publishes its status on our status topic %s (runtime_id %r): "
            "each overwrites the other's%s; give every serve a runtime_id of its own (the "
            "client id unless set)%s",
            shown(self._status_topic),
            self.cfg.runtime_id,
            "" if self.ha is None else ", and removes the other's Home Assistant sensors",
            " (while it goes on, more at the 10th and every 100th)" if self._others == 3 else "",
        )

    def _on_peer(self, msg: Any) -> None:
        """Another runtime's status. Two runtimes reading one data topic with one prediction
        topic template (a second gateway or model installed from the same kit, a copied
        configuration) each answer every sample on the same topic, from states of their own:
        the devices get two answers to each, and nothing said so. Said here in the log, once
        per run of that runtime, with a count; the runtime ids and client ids may all differ."""
        try:
            doc = json.loads(msg.payload) if len(msg.payload) <= 65536 else None
        except ValueError:  # anyone may publish here
            doc = None
        if not isinstance(doc, dict) or doc.get("state") not in ("online", "degraded"):
            return
        said = [doc.get(k) for k in ("runtime_id", "instance", "data_topic", "prediction_topic")]
        texts = [v for v in said if isinstance(v, str)]
        if len(texts) < len(said):
            return  # an older runtime's, which says no topics, or nonsense
        rid, instance, data, predictions = texts
        if rid == self.cfg.runtime_id or predictions != self.cfg.prediction_topic:
            return  # ours; or its answers go elsewhere (two models compared, say)
        try:
            both = overlap(data, self.cfg.data_topic)
        except ConfigError:
            return
        if not both or self._peers_said.get(rid) == instance:
            return
        if len(self._peers_said) >= 64:
            self._peers_said.clear()
        self._peers_said[rid] = instance
        self.metrics.inc("overlapping_runtimes")
        log.error(
            "runtime %s (status on %s) reads samples on %s and answers on %s, as we do: a "
            "sample on a topic both read is answered twice there, each from a state of its "
            "own; give each runtime data topics of its own, or another prediction_topic",
            shown(rid),
            shown(msg.topic),
            shown(data),
            shown(predictions),
        )

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == self._status_topic:
            self._on_status(msg)
            return
        if self._statuses != self._status_topic and topic_matches_sub(self._statuses, msg.topic):
            self._on_peer(msg)
            return
        if self._ha_under is not None and msg.topic.startswith(self._ha_under):
            # a stored sensor (not an echo of a publish) of this runtime's
            if msg.retain and msg.payload and self.ha and self.ha.ours(msg.topic, msg.payload):
                self._ha_found.put(msg.topic)
            return
        props = msg.properties
        ctype = getattr(props, "ContentType", None) if props else None
        self.inbox.append(
            Inbound(
                msg.topic,
                bytes(msg.payload),
                msg.mid | self._epoch << 16,
                msg.qos,
                ctype if isinstance(ctype, str) else None,
                time.monotonic(),  # the processor's clock: NTP steps the wall clock
                bool(msg.dup),
                bool(msg.retain),
            )
        )
        if not self.wake.is_set():  # set costs a lock and a notify, for each message
            self.wake.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # Only a worker waiting for room in the window needs waking: otherwise the acks are
        # drained with the next messages (or the next idle tick). Waking it for each one
        # doubled its rounds at a steady trickle of messages, each round a thread switch.
        self.acks.put((mid, reason if getattr(reason, "is_failure", False) else None))
        if not self.answered.is_set():
            self.answered.set()

    # -- worker side ------------------------------------------------------------------------

    def _drain_acks(self) -> None:
        while True:
            try:
                mid, refusal = self.acks.get_nowait()
            except queue.Empty:
                return
            out = self.outbox.acked(mid, refusal is not None)
            if refusal is None:
                continue
            if out is None:
                on = f" on {self._status_topic}" if mid == self._status_mid else ""
                what = f"the broker refused our message {mid}{on} ({refusal}){ACL_HINT}"
                self._log_refusal("publish_refused", what, logging.ERROR)
                continue
            self.metrics.inc("publish_refused")
            if refusal.value == PACKET_TOO_LARGE and self.processor.predictions.stream(out.topic):
                limit = f"what the broker takes (it answered '{refusal}')"
                self.outbox.put([self.processor.unsendable(out, limit)])
            else:
                what = f"the broker refused the answer on {out.topic} ({refusal}){ACL_HINT}"
                self._log_refusal("publish_refused", what, logging.ERROR)

    def _flush(self) -> None:
        """Publish what the outbox lets out; paho refusals go back in line, never lost."""
        if not self.connected.is_set():
            return
        outs = self.outbox.take()
        for i, o in enumerate(outs):
            if self._max_packet and publish_size(o, self.cfg.protocol) > self._max_packet:
                limit = f"the broker's maximum packet size ({self._max_packet} bytes)"
                report = outs[i] = self.processor.unsendable(o, limit)
                self.outbox.replace(o, report)
                o = report
                if publish_size(o, self.cfg.protocol) > self._max_packet:  # nor its report
                    log.error("no room in %s for the report on %r; dropped", limit, o.topic)
                    self.metrics.inc("publish_failed")
                    self.outbox.discard(o)
                    continue
            if (refusal := self.client.refused(o.topic)) is not None:
                self.metrics.inc("publish_refused")
                what = f"the broker refused the last answer on {o.topic} ({refusal}): not sent"
                self._log_refusal("publish_refused", what + ACL_HINT, logging.ERROR)
                self.outbox.discard(o)
                continue
            try:
                info = self.client.publish(o.topic, o.payload, qos=o.qos, retain=o.retain)
            except ValueError as exc:  # a topic or payload MQTT cannot carry: never will
                log.error("cannot publish on %r: %s; answer dropped", o.topic, exc)
                self.metrics.inc("publish_failed")
                self.outbox.discard(o)
                continue
            if info.rc in (self.mqtt.MQTT_ERR_SUCCESS, self.mqtt.MQTT_ERR_NO_CONN):
                self.outbox.sent(info.mid, o)
            else:
                self.metrics.inc("publish_retries")
                self.outbox.retry(outs[i:])
                return

    def _take(self) -> tuple[list[Inbound], list[Inbound]]:
        """(dropped, batch): with ``drop-oldest``, what is queued beyond ``queue_size``.
        Nothing while answers wait: the broker keeps the backlog meanwhile, and drop reports
        that cannot go out would only pile up in memory."""
        if not self.connected.is_set():
            self.processor.pause()
        if self.outbox.queued or self.outbox.in_flight >= self.outbox.window:
            return [], []
        if self.connected.is_set():
            self.processor.resume()
        dropped: list[Inbound] = []
        if self.cfg.overload == "drop-oldest":  # as many as their reports can go out now
            room = self.outbox.window - self.outbox.in_flight
            while len(self.inbox) > self.cfg.queue_size and len(dropped) < room:
                msg = self.inbox.popleft()
                if self.processor.data.stream(msg.topic) is None:
                    # A command (a reset, a reload), not a sample: shed, it would change what
                    # the samples after it mean. It goes first, shedding goes on after it.
                    self.inbox.extendleft([msg])
                    break
                dropped.append(msg)
        batch: list[Inbound] = []
        control = self.processor.runtime_control
        while self.inbox and len(batch) < self.cfg.max_batch:
            batch.append(self.inbox.popleft())
            if batch[-1].topic == control:
                break  # a reload acts where it stands: what follows is read after it
        return dropped, batch

    def _horizon(self) -> float | None:
        """When the oldest message waiting in the inbox arrived, on the processor's clock
        (monotonic): a message held for reordering is not given up on while one that arrived
        within its wait is still to be read (a backlog, answers awaiting PUBACKs)."""
        return self.inbox.oldest_received()

    def _fill(self) -> None:
        """With ``max_wait_ms``, give a batch that is not full until its first message is
        that old to fill: at a steady trickle each message otherwise costs a round of its own
        (thread switches, a log write, a step, a publish), most of a small device's CPU.
        Latency grows by at most the wait, and not at all once the batch is full; messages
        that waited during the previous round (a busy service) do not wait again."""
        wait = self.cfg.max_wait_ms / 1000.0
        if not wait or not 0 < len(self.inbox) < self.cfg.max_batch:
            return
        first = self.inbox.oldest_received()
        if first is None:
            return
        end = first + wait
        while not self.stopping and (left := end - time.monotonic()) > 0:
            self.wake.clear()  # before looking: a message arriving after the look wakes us
            if len(self.inbox) >= self.cfg.max_batch:
                break
            self.wake.wait(min(left, 0.1))
        self.wake.clear()

    def _ack(self, batch: list[Inbound]) -> None:
        with self._epoch_lock:
            epoch = self._epoch
            self.client.ack_many(
                [(m.mid & 0xFFFF, m.qos) for m in batch if m.qos and m.mid >> 16 == epoch]
            )
        self.metrics.inc("acks", len(batch))

    def _work_once(self, take: bool = True) -> bool:
        """One round; False when the state directory refused the write."""
        self._drain_acks()
        self._flush()
        dropped, batch = self._take() if take else ([], [])
        taken = dropped + batch
        if not taken:
            ok = self.processor.tick(horizon=self._horizon())
        elif ok := self.processor.handle(batch, dropped):
            self._ack(taken)
            ok = self.processor.tick(horizon=self._horizon())
        else:
            self.inbox.extendleft(reversed(taken))  # offered again later
            # Held messages whose wait is over are released all the same: their release
            # shrinks the room the next checkpoint needs, which the batch may be waiting for
            # (so not kept until the inbox is read: it is what waits for that room).
            self.processor.tick(settle=False)
        self._flush()
        return ok

    def reload(self) -> None:
        self.processor.checkpoint_done(wait=True)  # of the running model, before it is swapped
        try:
            new = open_engine(self.cfg)
        except EdgeError as exc:
            log.error("reload failed, keeping the running model: %s", exc)
            self._answer(reload=f"failed, the running model kept: {exc}")
            return
        old = self.engine
        # Held messages were read for the running model (SenML by its feature names): a
        # model of other features, or of features named otherwise, may not step them.
        if new.manifest.feature_names != old.manifest.feature_names and not self.processor.tick(
            release_all=True
        ):
            log.error("reload failed, keeping the running model: the log cannot be written")
            self._answer(reload="failed, the running model kept: log not writable")
            return
        kept = new.manifest.state_layout() == old.manifest.state_layout()
        if kept:
            new.load_state_from(old)
        else:  # zero state, numbering kept: their next answers say restart
            new.load_numbering_from(old)
        new.counters = old.counters
        self.processor.engine = new
        # A restart must not replay the old model's log into the new one: a new generation.
        generation = self.processor.journal.generation
        if not self.processor.checkpoint():
            if self.processor.journal.generation == generation:
                # Nothing of the new model on disk: running it would add to the old model's
                # log what a restart cannot replay with either bundle. The old one goes on.
                self.processor.engine = old
                why = self.processor.degraded or "the snapshot could not be written"
                log.error("reload failed, keeping the running model: %s", why)
                failed = f"failed, the running model kept: {why}"
                self._say("degraded", reason=why, reload=failed)  # retried as any storage fault
                return
            self.processor.requests.add("checkpoint")  # written, its log to follow
        self.metrics.inc("reloads")
        note = "state kept" if kept else "state layout changed: all streams reset"
        log.info("model reloaded (%s): %s", new.manifest.model_id, note)
        if self.ha is not None:
            self._announce(self.ha.model_changed(new.manifest))
        self._answer(reload=note)

    def run(self) -> int:
        cfg = self.cfg
        if cfg.metrics_port:
            try:
                self.metrics.serve_prometheus(cfg.metrics_host, cfg.metrics_port)
            except OSError as exc:  # in use, or an address not of this machine
                where = f"{cfg.metrics_host}:{cfg.metrics_port}"
                raise ConfigError(f"metrics_host/metrics_port {where}: {exc}") from None
            log.info(
                "Prometheus metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port
            )
        if cfg.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry
            props.ReceiveMaximum = min(65535, self.read_limit)
            self.client.connect_async(
                cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=props
            )
        else:
            self.client.connect_async(cfg.host, cfg.port, cfg.keepalive)
        self.network.start()
        log.info(
            "serving %s (%s, interpreter %s %s); connecting to %s",
            cfg.model,
            self.engine.manifest.model_id,
            self.engine.model.backend.name,
            self.engine.model.backend.version,
            cfg.broker,
        )
        last_snapshot = last_stats = last_retry = last_ha = time.monotonic()
        try:
            while not self.stopping:
                now = time.monotonic()
                degraded = self.processor.degraded
                if degraded is not None and now - last_retry < RETRY_SECONDS:
                    self._drain_acks()
                    self._flush()
                    self.answered.wait(0.1)
                    self.answered.clear()
                else:
                    last_retry = now
                    if degraded is not None:
                        # said first: the retry's snapshot may take long (slow or failing
                        # storage), and a round that took over RETRY_SECONDS comes straight here
                        self._update_status()
                        self._retry_storage()
                    if self.outbox.queued or self.outbox.in_flight >= self.outbox.window:
                        self.answered.wait(0.05)  # nothing to take in before the broker acks
                        self.answered.clear()
                    else:
                        if not self.inbox:
                            self.wake.wait(0.05)
                            self.wake.clear()
                        self._fill()
                    self._work_once()
                self._update_status()
                if "reload" in self.processor.requests or "reload" in self.requests:
                    self.processor.requests.discard("reload")
                    self.requests.discard("reload")
                    self.reload()
                # Written in the background: the answers go on meanwhile; one at a time.
                self.processor.checkpoint_done()
                asked = self.processor.requests & {"snapshot", "checkpoint"}
                if (
                    (now - last_snapshot >= cfg.snapshot_interval or asked)
                    and self.processor.degraded is None
                    and not self.processor.journal.checkpointing
                ):
                    self.processor.checkpoint(if_changed=not asked, background=True)
                    last_snapshot = now
                if "snapshot" in self.processor.done_requests:  # durable: {"cmd": "snapshot"}
                    self._answer(snapshot="done", snapshot_ts=time.time())
                self.processor.done_requests.clear()
                if self.ha is not None and self.connected.is_set() and now - last_ha >= 1.0:
                    self._reconcile_ha(self.ha)
                    last_ha = now
                if cfg.stats_interval and now - last_stats >= cfg.stats_interval:
                    self.client.publish(self._stats_topic, self.metrics.dumps(self.stats()), qos=0)
                    last_stats = now
            return self._shutdown()
        finally:
            self.network.stop()
            with contextlib.suppress(Exception):  # whole before the directory is let go
                self.processor.journal.finish()
            self.processor.journal.close()
            self.lock.release()

    def _stop(self, *_: Any) -> None:
        """A flag only, seen by the loop within its longest wait (0.1 s). A handler runs in the
        main thread between two of its bytecodes, maybe while that thread holds the lock of
        the Event it waits on: setting that Event from here would wait for it forever."""
        self.stopping = True

    def _retry_storage(self) -> None:
        journal = self.processor.journal
        try:
            journal.open()
        except StateAppeared as exc:  # a restart takes it up: systemd's, after this exit
            log.error("%s; stopping (exit 1)", exc)
            self.processor.degraded = storage_fault("state_dir not usable", exc, self.cfg.state_dir)
            self.stopping, self.exit_code = True, 1
            return
        except OSError as exc:
            self.processor.degraded = storage_fault(
                "state_dir not writable", exc, self.cfg.state_dir
            )
            return
        # A new generation first: it writes out the state anew when the files were removed,
        # and gives a full disk the room of the log it ends (and of older generations).
        self.processor.checkpoint()

    def _state(self) -> tuple[str, str | None]:
        """(``online`` or ``degraded``, why) as the service stands."""
        reason = self.processor.degraded or self._deaf
        return ("online" if reason is None else "degraded"), reason

    def _update_status(self) -> None:
        """Said again when the state or its reason changes: a disk that went from full to
        read-only kept saying "No space left" while a monitor waited for room."""
        if self._state() != self._said:
            self._say(*self._state())

    def _answer(self, **answers: Any) -> None:
        """Answer a runtime command in the status as the service stands: said ``online``, a
        reload answered on a full disk put out a status without its reason, until the next
        round said ``degraded`` again."""
        self._say(*self._state(), **answers)

    def _shutdown(self) -> int:
        """Answer what is already here for a bounded time, snapshot, say offline, disconnect.
        Whatever is left unacknowledged the broker delivers again on the next start."""
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline and (self.inbox or len(self.outbox)):
            if not self._work_once(take=bool(self.inbox)):
                break
            if not self.inbox:
                self.wake.wait(0.02)
                self.wake.clear()
        left = len(self.inbox)
        self.inbox.close()
        self.processor.checkpoint_done(wait=True)  # the one in flight is whole before we go
        degraded = self.processor.degraded
        if degraded is None:
            self.processor.checkpoint()
        self._remove_ha_sensors()  # before the offline status, whose PUBACK is waited for
        offline = self._status("offline")
        info = self.client.publish(self._status_topic, offline, qos=1, retain=self._retain)
        if self.connected.is_set() and info.rc == self.mqtt.MQTT_ERR_SUCCESS:
            info.wait_for_publish(2.0)
        self.network.quiet()  # no reconnecting after this disconnect
        self.client.disconnect()
        if degraded is not None:  # "cleanly" would hide that no final snapshot was written
            log.warning(
                "stopped degraded (%s): no final snapshot; the next start replays the log since "
                "the last one",
                degraded,
            )
        log.info(
            "stopped %s(%d messages left to the broker, %d answers unacknowledged): %s",
            "cleanly " if degraded is None else "",
            left,
            len(self.outbox),
            self.metrics.dumps(self.stats()).decode(),
        )
        return self.exit_code

    def stats(self) -> dict[str, Any]:
        return {
            **self.metrics.snapshot(),
            "engine": self.engine.stats(),
            "degraded": self.processor.degraded,
            "instance": self._instance,  # tells two runtimes with one runtime_id apart (top)
            "ts": time.time(),
        }

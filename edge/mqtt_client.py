"""paho's MQTT client, with its per-message costs cut where paho leaves room.

paho reads a packet with at least three ``recv`` calls (the command byte, each byte of the
remaining length, the body), and a system call costs more than our handling of a small
sample; this client reads up to ``READ_SIZE`` bytes at once and serves paho from them. The
service has one ``on_message`` for every topic, so paho's per-message topic matching (for
per-topic callbacks it never registers) is skipped. A plain PUBACK (two bytes, or a success
reason code alone) does not build a reason code and properties object of its own each time,
and neither does a plain PUBLISH (QoS 0 or 1, no MQTT 5 properties): paho's own decoding of
one cost five times what reading it from its bytes does. paho sends each queued packet with a
system call of its own; the acknowledgements and answers of a batch go out together. paho
builds a lock and a condition for every message in and out, for a wait that the service makes
once, at its end; these messages share one.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import DISCONNECT, PUBACK, PUBLISH
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket  # paho >= 2.2, as its reading is
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

READ_SIZE = 1 << 16
WRITE_SIZE = 1 << 16  # queued packets joined into one, up to about this many bytes
_PUBACK_OK = ReasonCode(PacketTypes.PUBACK)  # success, shared: read only
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
_PUBACK_CODES = {0, 16, 128, 131, 135, 144, 145, 151, 153}  # what MQTT 5 allows in a PUBACK
# Refusals of the topic, not of the message (not authorized, topic name invalid): every later
# publish on it is refused as well, and mosquitto closes the connection after each one.
TOPIC_REFUSALS = {0x87, 0x90}
REFUSAL_KEPT_SECONDS = 600.0  # then a publish on the topic is tried again (an ACL edited)
REFUSED_TOPICS_KEPT = 10_000  # the oldest go past that
CLOSED = "closed, no reason given"  # the socket's end read where a packet was awaited


def packet_size(topic: bytes, payload: int, qos: int, v5: bool) -> int:
    """Bytes of a PUBLISH of ``payload`` bytes on ``topic`` (no properties)."""
    rest = 2 + len(topic) + (2 if qos else 0) + v5 + payload
    return (2 if rest < 1 << 7 else 3 if rest < 1 << 14 else 4 if rest < 1 << 21 else 5) + rest


def _length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while n:
        n, byte = n >> 7, n & 127
        out.append(byte | (128 if n else 0))
    return bytes(out)


def _refusal(code: int) -> ReasonCode:
    """A PUBACK reason code MQTT 5 does not allow there, read as the failure it names."""
    try:
        return ReasonCode(PacketTypes.DISCONNECT, identifier=code)
    except (KeyError, ValueError):  # paho raises either, by the code
        return ReasonCode(PacketTypes.PUBACK, "Unspecified error")


_PUBLISHED = threading.Condition()  # what waiters of every _Receipt wait on


class _Receipt(mqtt.MQTTMessageInfo):
    """paho's receipt of a message, with a condition shared by all: a wait for one message
    wakes at every acknowledgement and looks again, as paho's own wait does at a timeout."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self._condition = _PUBLISHED
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        with self._condition:
            self._published = True
            self._condition.notify_all()


def _message(mid: int, topic: bytes) -> mqtt.MQTTMessage:
    """An ``MQTTMessage`` as paho's constructor leaves it, with a ``_Receipt``."""
    m = mqtt.MQTTMessage.__new__(mqtt.MQTTMessage)
    m.timestamp = 0.0
    m.state = mqtt.mqtt_ms_invalid
    m.dup = False
    m.mid = mid
    m._topic = topic
    m.payload = b""
    m.qos = 0
    m.retain = False
    m.info = _Receipt(mid)
    m.properties = None
    return m


class Client(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None  # the socket the buffer was read from
        # topic -> (the broker's refusal, when): see ``refused``; the network thread adds,
        # the service's thread reads and expires
        self._refused_topics: dict[str, tuple[ReasonCode, float]] = {}
        self._refused_lock = threading.Lock()
        # Why the last read of the socket ended it (an error, a TLS alert, the broker's
        # close): a broker that refuses a connection before its CONNACK (a client
        # certificate it does not take, a TLS 1.3 alert read after the handshake) says so
        # only there. Cleared by the caller at each connection attempt.
        self.read_error: str | None = None
        # The broker's Maximum Packet Size (MQTT 5 CONNACK; 0: none said), set by the caller
        # at each connect. A larger packet would not be delivered: mosquitto closes the
        # connection, so such a publish is not sent and ``on_too_large(topic, size)`` told.
        self.max_packet = 0
        self.on_too_large: Any = None

    def refused(self, topic: str) -> ReasonCode | None:
        """The broker's refusal of our last publish on ``topic`` when it concerned the topic
        (its ACL), within ``REFUSAL_KEPT_SECONDS``: a publish there now would only be refused
        again and cost the connection (mosquitto closes it), and with it every other answer
        in flight, for as long as that stream sends."""
        if not self._refused_topics:
            return None
        with self._refused_lock:
            got = self._refused_topics.get(topic)
            if got is None:
                return None
            if time.monotonic() - got[1] > REFUSAL_KEPT_SECONDS:
                del self._refused_topics[topic]
                return None
            return got[0]

    def drop_refused(self) -> list[tuple[int, ReasonCode]]:
        """Take the messages on refused topics out of the queue a reconnect sends again
        (each would be refused again, and the connection closed again): (mid, refusal) each,
        to be handled as the broker's refusal."""
        if not self._refused_topics:
            return []
        with self._out_message_mutex:
            out = []
            for mid, m in list(self._out_messages.items()):
                if (why := self.refused(m.topic)) is not None:
                    del self._out_messages[mid]
                    m.info._set_as_published()  # done with: a waiter must not wait for it
                    out.append((mid, why))
            return out

    def _do_on_publish(
        self, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> MQTTErrorCode:
        if reason_code.is_failure and reason_code.value in TOPIC_REFUSALS:
            msg = self._out_messages.get(mid)
            if msg is not None:
                with self._refused_lock:
                    self._refused_topics[msg.topic] = (reason_code, time.monotonic())
                    while len(self._refused_topics) > REFUSED_TOPICS_KEPT:
                        del self._refused_topics[next(iter(self._refused_topics))]
        return super()._do_on_publish(mid, reason_code, properties)

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet (a select will not see
        them), plus what TLS has decrypted ahead."""
        if self._sock is not self._rsock:
            return 0
        tls = getattr(self._sock, "pending", None)
        return len(self._rbuf) - self._rpos + (tls() if tls is not None else 0)

    def _recv(self, bufsize: int) -> bytes:
        """paho's read of the socket, and why it ended the connection, if it did."""
        try:
            data = super()._sock_recv(bufsize)
        except BlockingIOError:
            raise
        except OSError as err:
            self.read_error = str(err) or type(err).__name__
            raise
        if not data:
            self.read_error = CLOSED
        return data

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._sock is not self._rsock:  # a new connection: nothing buffered is its
            self._rsock, self._rbuf, self._rpos = self._sock, b"", 0
        pos = self._rpos
        if pos >= len(self._rbuf):
            data = self._recv(max(bufsize, READ_SIZE))
            if len(data) <= bufsize:
                return data
            self._rbuf, pos = data, 0
        out = self._rbuf[pos : pos + bufsize]
        self._rpos = pos + len(out)
        return out

    def _packet_read(self) -> MQTTErrorCode:
        """A packet that lies whole in the read-ahead buffer is cut from it at once; paho
        reads one byte per call for the command and each length byte. A partial packet (and
        one already begun) is left to paho, which reads the rest as it arrives."""
        if self._in_packet["command"] == 0:
            if self._sock is not self._rsock or self._rpos >= len(self._rbuf):
                try:
                    data = self._recv(READ_SIZE)
                except BlockingIOError:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except OSError as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                if not data:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                self._rsock, self._rbuf, self._rpos = self._sock, data, 0
            buf, start = self._rbuf, self._rpos
            length, mult, i = 0, 1, start + 1
            while i < len(buf) and i <= start + 4:  # at most 4 length bytes
                byte = buf[i]
                length += (byte & 127) * mult
                mult *= 128
                i += 1
                if not byte & 128:
                    if i + length <= len(buf):
                        return self._handle_whole(buf, start, i, length, mult)
                    break
        return super()._packet_read()

    def _handle_whole(
        self, buf: bytes, start: int, body: int, length: int, mult: int
    ) -> MQTTErrorCode:
        """Hand paho the packet at ``buf[start:]`` as its own reading would have left it."""
        self._rpos = body + length
        self._in_packet = {
            "command": buf[start],
            "have_remaining": 1,
            "remaining_count": list(buf[start + 1 : body]),
            "remaining_mult": mult,
            "remaining_length": length,
            "packet": bytearray(buf[body : body + length]),
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc: MQTTErrorCode = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        """A plain PUBLISH read from its bytes; anything else (QoS 2, properties, automatic
        acks, a packet too short for what it claims) is paho's to decode and judge."""
        command, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (command & 0x06) >> 1
        size = len(packet)
        if qos > 1 or not self._manual_ack or size < 2:
            return super()._handle_publish()
        end = 2 + ((packet[0] << 8) | packet[1])  # the topic's
        pos = end + 2 if qos else end  # past the message id
        v5 = self._protocol == mqtt.MQTTv5
        if end == 2 or pos + v5 > size or (v5 and packet[pos] != 0):
            return super()._handle_publish()  # empty topic, too short, or properties
        message = _message((packet[end] << 8) | packet[end + 1] if qos else 0, bytes(packet[2:end]))
        message.dup = bool(command & 0x08)
        message.qos = qos
        message.retain = bool(command & 0x01)
        message.payload = bytes(packet[pos + v5 :])
        message.timestamp = mqtt.time_func()  # as paho stamps it
        self._handle_on_message(message)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """paho's publish, for a QoS 1 message of bytes without properties (each answer)."""
        if self.max_packet and isinstance(payload, (bytes, bytearray, str)):
            size = packet_size(
                topic.encode("utf-8"),
                len(payload.encode("utf-8") if isinstance(payload, str) else payload),
                qos,
                self._protocol == mqtt.MQTTv5,
            )
            if size > self.max_packet:
                info = mqtt.MQTTMessageInfo(0)
                info.rc = MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE
                if self.on_too_large is not None:
                    self.on_too_large(topic, size)
                return info
        if qos != 1 or properties is not None or not isinstance(payload, bytes) or not topic:
            return super().publish(topic, payload, qos, retain, properties)
        topic_bytes = topic.encode("utf-8")
        self._raise_for_invalid_topic(topic_bytes)
        if len(payload) > 268435455:
            raise ValueError("Payload too large.")
        message = _message(self._mid_generate(), topic_bytes)
        message.timestamp = mqtt.time_func()
        message.payload = payload
        message.qos = 1
        message.retain = retain
        info = message.info
        with self._out_message_mutex:
            if message.mid in self._out_messages or 0 < self._max_queued_messages <= len(
                self._out_messages
            ):
                info.rc = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
                return info
            self._out_messages[message.mid] = message
            if 0 < self._max_inflight_messages <= self._inflight_messages:
                message.state = mqtt.mqtt_ms_queued
                return info
            self._inflight_messages += 1
            message.state = mqtt.mqtt_ms_wait_for_puback
            rc = self._send_publish(message.mid, topic_bytes, payload, 1, retain, False, info)
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:  # sent after the next connect
                self._inflight_messages -= 1
                message.state = mqtt.mqtt_ms_publish
            info.rc = rc
            return info

    def _send_publish(
        self,
        mid: int,
        topic: bytes,
        payload: bytes | bytearray = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        info: mqtt.MQTTMessageInfo | None = None,
        properties: Properties | None = None,
    ) -> MQTTErrorCode:
        """paho's, with the packet joined at once (paho builds it a field at a time and formats
        a log line nobody reads: half the cost of an answer's publish). paho's own for
        properties, for a payload not bytes (or none), and when its log is listened to."""
        if (
            properties is not None
            or type(topic) is not bytes
            or type(payload) is not bytes
            or not payload
            or self._on_log is not None
            or self._logger is not None
        ):
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        v5 = self._protocol == mqtt.MQTTv5
        rest = 2 + len(topic) + (2 if qos else 0) + v5 + len(payload)
        if rest > 268_435_455:
            raise ValueError("Packet too large")
        packet = b"".join(
            (
                bytes((PUBLISH | (dup & 1) << 3 | qos << 1 | retain,)),
                _length(rest),
                len(topic).to_bytes(2, "big"),
                topic,
                mid.to_bytes(2, "big") if qos else b"",
                b"\x00" if v5 else b"",  # no properties
                payload,
            )
        )
        return self._packet_queue(PUBLISH, packet, mid, qos, info)

    def ack_many(self, acks: list[tuple[int, int]]) -> None:
        """``ack`` of each (message id, QoS); the PUBACKs queued as one packet, not each with
        a packet, a log line and a wake of its own."""
        if not self._manual_ack:
            return
        pubacks = b"".join(
            b"\x40\x02" + (mid & 0xFFFF).to_bytes(2, "big") for mid, q in acks if q == 1
        )
        for mid, qos in acks:
            if qos == 2:
                self.ack(mid, qos)
        if pubacks:  # none of paho's after-write actions apply to it, as to a joined run
            self._packet_queue(PUBACK, pubacks, 0, 1)

    def _packet_write(self) -> MQTTErrorCode:
        """Join runs of queued packets into one packet each before paho writes them. Never
        joined: a packet partly written already, and those paho acts on once written (a
        QoS 0 PUBLISH: its on_publish; DISCONNECT)."""
        queue = self._out_packet
        if len(queue) > 1:
            out: list[Any] = []
            run: list[Any] = []
            for _ in range(len(queue)):  # what is queued now; more may arrive meanwhile
                packet = queue.popleft()
                kind = packet["command"] & 0xF0
                if packet["pos"] or kind == DISCONNECT or (kind == PUBLISH and not packet["qos"]):
                    out += _joined(run)
                    out.append(packet)
                    run = []
                else:
                    run.append(packet)
            out += _joined(run)
            queue.extendleft(reversed(out))
        return super()._packet_write()

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is not None:
            on_message(self, self._userdata, message)

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) < 2:
            return super()._handle_pubackcomp(cmd)
        if len(packet) == 2 or (len(packet) == 3 and packet[2] == 0):
            reason = _PUBACK_OK
        elif packet[2] in _PUBACK_CODES:
            return super()._handle_pubackcomp(cmd)
        else:
            # mosquitto answers a publish past its message_size_limit with 0x95, which MQTT 5
            # allows in a DISCONNECT only: paho took it for a protocol error, kept the answer
            # in flight and sent it again after every reconnect, for ever.
            reason = _refusal(packet[2])
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _joined(packets: list[Any]) -> list[Any]:
    """Packets as one (or as they are, when one is all), at most ``WRITE_SIZE`` bytes each."""
    if len(packets) < 2:
        return packets
    out, part, size = [], [], 0
    for p in packets:
        part.append(p["packet"])
        size += len(p["packet"])
        if size >= WRITE_SIZE:
            out.append(part)
            part, size = [], 0
    if part:
        out.append(part)
    return [
        {  # none of paho's after-write actions apply to it
            "command": PUBACK,
            "mid": 0,
            "qos": 1,
            "pos": 0,
            "to_process": sum(map(len, parts)),
            "packet": b"".join(parts),
            "info": None,
        }
        for parts in out
    ]

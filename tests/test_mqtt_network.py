"""The network loop reads only while there is room: a backlog stays at the broker.

MQTT 3.1.1 has no Receive Maximum, and the test broker sets no in-flight limit of its own
(``max_inflight_messages 0``), so paho's own loop would take every message at once."""

from __future__ import annotations

import socket
import time

import paho.mqtt.client as mqtt
import pytest

from edge.mqtt_client import Client
from edge.mqtt_network import NetworkLoop
from tests.mqtt_helpers import _hostport, wait_until

ROOM = 40
SENT = 2000


def _shut(net: NetworkLoop, sub: mqtt.Client, pub: mqtt.Client) -> None:
    """A subscriber on our network loop, then its publisher: no reconnect after this."""
    net.quiet()
    sub.disconnect()
    net.stop()
    pub.loop_stop()
    pub.disconnect()


@pytest.mark.parametrize("client_class", [mqtt.Client, Client], ids=["paho", "read-ahead"])
def test_reading_pauses_while_the_inbox_is_full_and_resumes_with_room(broker, client_class):
    host, port = _hostport(broker.url)
    inbox: list[int] = []
    sub = client_class(
        mqtt.CallbackAPIVersion.VERSION2, client_id="net-sub", clean_session=False, manual_ack=True
    )
    sub.on_message = lambda c, u, m: inbox.append(m.mid)
    sub.on_connect = lambda c, u, f, r, p: c.subscribe("t/#", 1)
    subscribed: list[int] = []
    sub.on_subscribe = lambda *a: subscribed.append(1)
    sub.connect_async(host, port, 30)
    failures: list[BaseException] = []
    net = NetworkLoop(sub, may_read=lambda: len(inbox) < ROOM, on_connect_fail=failures.append)
    net.start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="net-pub")
    pub.max_inflight_messages_set(0)
    pub.connect(host, port, 30)
    pub.loop_start()
    try:
        wait_until(lambda: bool(subscribed), 20, "the subscription")
        infos = [pub.publish(f"t/{i}", b"x" * 100, qos=1) for i in range(SENT)]
        wait_until(lambda: all(i.is_published() for i in infos), 60, "the broker to take all")
        wait_until(lambda: len(inbox) >= ROOM, 20, "the inbox to fill")
        time.sleep(0.5)  # a chance for a loop that kept reading to overrun
        # One read brings in at most what paho has outstanding (nothing here) plus one packet.
        assert ROOM <= len(inbox) <= ROOM + 1, f"{len(inbox)} taken with room for {ROOM}"
        assert net.paused_reads > 0

        def drain() -> bool:  # a worker taking what arrived: acknowledged, room again
            n = len(inbox)
            for mid in inbox[:n]:
                sub.ack(mid, 1)
            del inbox[:n]
            taken[0] += n
            return taken[0] == SENT

        taken = [0]
        wait_until(drain, 120, "the rest of the backlog")
    finally:
        _shut(net, sub, pub)
    assert not failures


def test_the_read_ahead_client_serves_paho_in_order_and_forgets_an_old_connection():
    c = Client(mqtt.CallbackAPIVersion.VERSION2, client_id="read-ahead")
    a, b = socket.socketpair()
    a.setblocking(False)
    c._sock = a
    data = bytes(range(256)) * 3
    b.sendall(data)
    got = c._sock_recv(1) + c._sock_recv(2)
    assert c.buffered() == len(data) - 3  # one recv took all that was there
    while c.buffered():
        got += c._sock_recv(100)
    assert got == data
    with pytest.raises(BlockingIOError):
        c._sock_recv(1)
    b.sendall(b"abc")
    assert c._sock_recv(1) == b"a" and c.buffered() == 2
    a2, b2 = socket.socketpair()
    c._sock = a2  # reconnected: what the old socket left is not the new one's
    assert c.buffered() == 0
    b2.sendall(b"xyz")
    assert c._sock_recv(3) == b"xyz"
    for s in (a, b, a2, b2):
        s.close()
    c._sock = None


def _fields(m: mqtt.MQTTMessage) -> tuple[object, ...]:
    props = m.properties
    ctype = getattr(props, "ContentType", None) if props else None
    return (m.topic, bytes(m.payload), m.mid, m.qos, m.retain, m.dup, ctype)


def _publish_packet(
    topic: bytes, payload: bytes, qos: int, v5: bool, props: bytes = b"\x00", flags: int = 0
) -> tuple[int, bytes]:
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00\x2a" if qos else b"")
    return 0x30 | (qos << 1) | flags, body + (props if v5 else b"") + payload


PACKETS = {
    "qos1": (b"sensors/d1/data", b'{"seq": 1}', 1, 0),
    "qos0": (b"sensors/d1/data", b"\x00\xff binary", 0, 0),
    "empty payload": (b"a/b", b"", 1, 0),
    "retained, dup": (b"a/b", b"x", 1, 0x09),
    "utf-8 topic": ("capteurs/été/data".encode(), b"x", 1, 0),
}


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize("name", list(PACKETS))
def test_a_plain_publish_reads_as_paho_reads_it(name, v5, monkeypatch):
    topic, payload, qos, flags = PACKETS[name]
    command, packet = _publish_packet(topic, payload, qos, v5, flags=flags)
    got = []
    for cls in (mqtt.Client, Client):
        if cls is Client:  # read from the bytes, not handed back to paho

            def paho_decoding(self):
                raise AssertionError("paho decoded a plain PUBLISH")

            monkeypatch.setattr(mqtt.Client, "_handle_publish", paho_decoding)
        c = cls(
            mqtt.CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
        )
        seen: list[mqtt.MQTTMessage] = []
        c.on_message = lambda cl, u, m, seen=seen: seen.append(m)
        c._in_packet = {**c._in_packet, "command": command, "packet": bytearray(packet)}
        assert c._handle_publish() == mqtt.MQTT_ERR_SUCCESS
        (m,) = seen
        got.append(_fields(m))
    assert got[0] == got[1]


@pytest.mark.parametrize(
    "command, packet",
    [
        (0x32, b"\x00"),  # shorter than a topic length
        (0x32, b"\x00\x09abc"),  # a topic longer than the packet
        (0x32, b"\x00\x01a\x00"),  # no room for the message id
        (0x32, b"\x00\x01a\x00\x2a"),  # MQTT 5: no property length
        (0x32, b"\x00\x00\x00\x2a\x00x"),  # an empty topic (an alias would be needed)
        (0x32, b"\x00\x01a\x00\x2a\x05\x03\x00\x02ab"),  # properties: a truncated one
    ],
)
def test_an_unusual_publish_is_left_to_paho(command, packet):
    """Whatever paho does with these (refuse or read), the fast path does the same."""
    outcomes = []
    for cls in (mqtt.Client, Client):
        c = cls(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
        seen: list[mqtt.MQTTMessage] = []
        c.on_message = lambda cl, u, m, seen=seen: seen.append(m)
        c._in_packet = {**c._in_packet, "command": command, "packet": bytearray(packet)}
        try:
            outcomes.append((c._handle_publish(), [_fields(m) for m in seen]))
        except Exception as exc:  # paho's own refusal of a malformed packet
            outcomes.append((type(exc).__name__, str(exc)))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_messages_through_a_broker_read_alike(broker, protocol):
    """paho's client and ours, subscribed side by side, see the same messages."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    host, port = _hostport(broker.url)
    seen: dict[str, list[tuple[object, ...]]] = {"paho": [], "ours": []}
    loops = []
    subscribed: list[str] = []
    failures: list[BaseException] = []
    for name, cls in (("paho", mqtt.Client), ("ours", Client)):
        c = cls(mqtt.CallbackAPIVersion.VERSION2, client_id=f"alike-{name}", protocol=protocol)
        c.on_message = lambda cl, u, m, out=seen[name]: out.append(_fields(m)[:2] + _fields(m)[3:])
        c.on_connect = lambda cl, *a: cl.subscribe("alike/#", 1)
        c.on_subscribe = lambda *a, name=name: subscribed.append(name)
        c.connect_async(host, port, 30)
        # ours reads ahead, so it runs on the service's loop, which reads what it buffered
        loops.append(NetworkLoop(c, may_read=lambda: True, on_connect_fail=failures.append))
        loops[-1].start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="alike-pub", protocol=protocol)
    pub.connect(host, port, 30)
    pub.loop_start()
    try:
        wait_until(lambda: len(subscribed) == 2, 20, f"both subscriptions ({subscribed})")
        typed = Properties(PacketTypes.PUBLISH)
        typed.ContentType = "application/json"
        sent = [
            ("alike/a", b'{"seq": 1}', 1, None),
            ("alike/b", b"", 0, None),
            ("alike/c", bytes(range(256)), 1, None),
            ("alike/d", b"{}", 1, typed if protocol == mqtt.MQTTv5 else None),
        ]
        for topic, payload, qos, props in sent:
            pub.publish(topic, payload, qos, properties=props).wait_for_publish(10)
        wait_until(lambda: all(len(v) == len(sent) for v in seen.values()), 20, "both to hear all")
        assert seen["paho"] == seen["ours"]
        assert [m[0] for m in seen["ours"]] == [s[0] for s in sent]
        if protocol == mqtt.MQTTv5:
            assert seen["ours"][-1][-1] == "application/json"
    finally:
        for net in loops:
            net.quiet()
            net.client.disconnect()
            net.stop()
        pub.loop_stop()
        pub.disconnect()
    assert not failures


def test_queued_packets_leave_together_in_order():
    """Acknowledgements and QoS 1 answers go out in one send; a QoS 0 PUBLISH (paho calls its
    on_publish once written) and a partly written packet are never joined."""
    c = Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    a, b = socket.socketpair()
    a.setblocking(False)
    c._sock = a
    c.on_socket_register_write = lambda *_: None
    sends: list[int] = []
    plain_send = c._sock_send
    c._sock_send = lambda data: sends.append(len(data)) or plain_send(data)
    published: list[int] = []
    c.on_publish = lambda cl, u, mid, rc, props: published.append(mid)
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    for mid in (1, 2, 3):
        c.ack(mid, 1)
    c.publish("answers/s1", b'{"y": 1}', qos=1)
    qos0 = c.publish("stats/r1", b"{}", qos=0)
    c.ack(4, 1)
    c.publish("answers/s2", b'{"y": 2}', qos=1)
    expected = b"".join(bytes(p["packet"]) for p in c._out_packet)
    assert len(c._out_packet) == 7
    assert c.loop_write() == mqtt.MQTT_ERR_SUCCESS
    got = b""
    while len(got) < len(expected):
        got += b.recv(65536)
    assert got == expected  # every byte, in the order queued
    assert len(sends) == 3  # 4 joined, the QoS 0 one alone, 2 joined
    assert published == [qos0.mid] and qos0.is_published()
    c._sock = None
    a.close()
    b.close()


def _published_state(cls: type[mqtt.Client], connected: bool, inflight: int, v5: bool):
    """What publishing three answers and acknowledging the first leaves behind: queued bytes,
    the messages kept for a resend, the receipts' codes and flags, and a wait's outcome."""
    c = cls(
        mqtt.CallbackAPIVersion.VERSION2,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=True,
    )
    c.max_inflight_messages_set(inflight)
    a, b = socket.socketpair()
    if connected:
        c._sock = a
        c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    c.on_socket_register_write = lambda *_: None
    infos = [
        c.publish("answers/s1", b'{"y": 1}', qos=1),
        c.publish("answers/s2", b"", qos=1, retain=True),
        c.publish("answers/s3", b"\x00" * 300, qos=1),
        c.publish("answers/s4", b"\x01" * 20_000, qos=1),  # three length bytes
    ]
    queued = [bytes(p["packet"]) for p in c._out_packet]
    kept = [
        (m.mid, m.topic, bytes(m.payload), m.qos, m.retain, m.dup, m.state, m.properties)
        for m in c._out_messages.values()
    ]
    c._in_packet = {**c._in_packet, "packet": bytearray(infos[0].mid.to_bytes(2, "big"))}
    c._handle_pubackcomp("PUBACK")
    if infos[0].rc == mqtt.MQTT_ERR_SUCCESS:
        infos[0].wait_for_publish(0.01)  # returns at once: acknowledged
    receipts = [(i.rc, i.mid, i.is_published() if i.rc == 0 else None) for i in infos]
    c._sock = None
    a.close()
    b.close()
    return queued, kept, receipts, c._inflight_messages, sorted(c._out_messages)


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize("connected", [True, False], ids=["connected", "offline"])
@pytest.mark.parametrize("inflight", [0, 2])
def test_an_answer_is_published_as_paho_publishes_it(v5, connected, inflight):
    """The service's publish skips paho's per-message lock and condition and makes the packet
    in one piece, nothing else: the same bytes queued, the same messages kept to send again,
    the same receipts."""
    assert _published_state(Client, connected, inflight, v5) == _published_state(
        mqtt.Client, connected, inflight, v5
    )


def test_a_wait_for_one_answer_ends_when_that_answer_is_acknowledged():
    """Receipts share one condition: a wait wakes at another answer's ack and waits on."""
    import threading

    c = Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    a, b = socket.socketpair()
    c._sock = a
    c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    c.on_socket_register_write = lambda *_: None
    first, second = (c.publish(f"answers/s{i}", b"{}", qos=1) for i in (1, 2))
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (second.wait_for_publish(60), done.set()))
    waiter.start()
    for info in (first, second):
        c._in_packet = {**c._in_packet, "packet": bytearray(info.mid.to_bytes(2, "big"))}
        c._handle_pubackcomp("PUBACK")
        if info is first:
            assert not done.wait(0.2) and not second.is_published()
    waiter.join(60)
    assert done.is_set() and second.is_published()
    c._sock = None
    a.close()
    b.close()


def test_acks_of_a_batch_queue_the_bytes_of_pahos_acks():
    """QoS 1 acknowledgements leave as one packet, byte for byte what paho's ``ack`` of each
    would send; a QoS 2 one goes paho's way (a PUBCOMP), QoS 0 has none."""
    acks = [(1, 1), (65535, 1), (7, 2), (300, 1), (9, 0)]
    sent = []
    for batched in (False, True):
        c = Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
        c.on_socket_register_write = lambda *_: None
        if batched:
            c.ack_many(acks)
        else:
            for mid, qos in acks:
                c.ack(mid, qos)
        sent.append(
            sorted(
                bytes(p["packet"][i : i + 4])
                for p in c._out_packet
                for i in range(0, len(p["packet"]), 4)
            )
        )
    assert sent[0] == sent[1] and len(sent[1]) == 4


def _stream(rng) -> bytes:
    """PUBLISHes (with and without properties, short and long), PUBACKs of mids 1..40, a
    PINGRESP: what a subscriber that also publishes reads from its broker."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    typed = Properties(PacketTypes.PUBLISH)
    typed.ContentType = "application/json"
    out = []
    for i in range(1, 41):
        payload = bytes(rng.integers(0, 256, int(rng.choice([0, 10, 200, 20000]))).tolist())
        props = typed.pack() if i % 5 == 0 else b"\x00"
        command, body = _publish_packet(f"s/d{i}".encode(), payload, i % 2, True, props)
        out.append(bytes([command]) + _length(len(body)) + body)
        out.append(bytes([0x40, 2]) + i.to_bytes(2, "big"))
        if i % 13 == 0:
            out.append(b"\xd0\x00")  # PINGRESP
    return b"".join(out)


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 127
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def test_packets_cut_from_the_read_ahead_buffer_read_as_paho_reads_them(monkeypatch):
    """The same byte stream, delivered in random pieces (packets split anywhere), gives the
    same messages and acknowledgements as paho's own reading."""
    import numpy as np

    whole: list[int] = []
    cut = Client._handle_whole
    monkeypatch.setattr(Client, "_handle_whole", lambda self, *a: whole.append(1) or cut(self, *a))

    rng = np.random.default_rng(7)
    data = _stream(rng)
    cuts = np.sort(rng.choice(len(data), 300, replace=False)).tolist()
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    events: dict[str, list[tuple[object, ...]]] = {}
    for cls in (mqtt.Client, Client):
        c = cls(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
        c.max_inflight_messages_set(0)
        a, b = socket.socketpair()
        a.setblocking(False)
        c._sock = a
        c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
        c.on_socket_register_write = lambda *_: None
        seen = events.setdefault(cls.__module__, [])
        c.on_message = lambda cl, u, m, seen=seen: seen.append(("message", *_fields(m)))
        c.on_publish = lambda cl, u, mid, rc, p, seen=seen: seen.append(("acked", mid))
        for i in range(40):  # mids 1..40 awaiting their PUBACK
            c.publish(f"answers/{i}", b"y", qos=1)
        c._out_packet.clear()
        for piece in pieces:
            b.sendall(piece)
            for _ in range(40):
                assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
        c._sock = None
        a.close()
        b.close()
    paho_saw, ours = events.values()
    assert len(paho_saw) == 80 and ours == paho_saw
    assert 40 < len(whole) < 83  # most packets cut whole, the split ones left to paho


def test_a_length_of_five_bytes_is_refused_as_paho_refuses_it():
    outcomes = []
    for cls in (mqtt.Client, Client):
        c = cls(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
        a, b = socket.socketpair()
        a.setblocking(False)
        c._sock = a
        b.sendall(b"\x30\xff\xff\xff\xff\x01" + b"x" * 64)
        outcomes.append(c._packet_read())
        c._sock = None
        a.close()
        b.close()
    assert outcomes == [mqtt.MQTT_ERR_PROTOCOL] * 2


def test_the_network_loop_outlives_an_unexpected_error(broker):
    """An exception in the network thread drops the connection and reconnects: a thread
    that died would leave the service up, connected to nothing, with nobody told."""

    class Fragile(Client):
        failures = 1

        def loop_read(self, *a, **kw):
            if Fragile.failures and connects:  # once connected
                Fragile.failures -= 1
                raise RuntimeError("unexpected")
            return super().loop_read(*a, **kw)

    host, port = _hostport(broker.url)
    connects: list[int] = []
    inbox: list[bytes] = []
    sub = Fragile(mqtt.CallbackAPIVersion.VERSION2, client_id="fragile", manual_ack=True)
    sub.on_connect = lambda c, u, f, r, p: (connects.append(1), c.subscribe("f/#", 1))
    subscribed: list[int] = []
    sub.on_subscribe = lambda *a: subscribed.append(len(connects))
    sub.on_message = lambda c, u, m: (inbox.append(m.payload), c.ack(m.mid, 1))
    sub.connect_async(host, port, 30)
    failures: list[BaseException] = []
    net = NetworkLoop(
        sub, may_read=lambda: True, on_connect_fail=failures.append, reconnect_min=0.1
    )
    net.start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fragile-pub")
    pub.connect(host, port, 30)
    pub.loop_start()
    try:
        wait_until(lambda: len(connects) >= 2, 30, "a reconnect after the failure")
        wait_until(lambda: len(connects) in subscribed, 20, "the subscription after it")
        pub.publish("f/1", b"after", qos=1).wait_for_publish(10)
        wait_until(lambda: b"after" in inbox, 20, "a message after the failure")
        assert Fragile.failures == 0
    finally:
        _shut(net, sub, pub)


def test_a_connection_is_made_while_there_is_no_room(broker):
    """A reconnect with the inbox full (a backlog in hand when the broker went away): the
    CONNACK is read all the same, or the service would stay connected to nothing, its
    answers queued and its inbox never drained. Reading then waits for room again."""
    host, port = _hostport(broker.url)
    room = [False]
    connects: list[int] = []
    inbox: list[bytes] = []
    sub = Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="no-room", clean_session=False, manual_ack=True
    )
    sub.on_connect = lambda c, u, f, r, p: (connects.append(1), c.subscribe("n/#", 1))
    sub.on_message = lambda c, u, m: (inbox.append(m.payload), c.ack(m.mid, 1))
    subscribed: list[int] = []
    sub.on_subscribe = lambda c, u, mid, r, p: subscribed.append(mid)
    sub.connect_async(host, port, 30)
    failures: list[BaseException] = []
    net = NetworkLoop(sub, may_read=lambda: room[0], on_connect_fail=failures.append)
    net.start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="no-room-pub")
    pub.connect(host, port, 30)
    pub.loop_start()
    try:
        wait_until(lambda: sub.is_connected(), 30, "the CONNACK read with no room")
        wait_until(lambda: net.paused_reads > 0, 20, "reading paused once connected")
        room[0] = True  # the SUBACK is read once there is room
        wait_until(lambda: subscribed, 20, "the SUBACK")
        pub.publish("n/1", b"with room", qos=1).wait_for_publish(10)
        wait_until(lambda: inbox == [b"with room"], 20, "the message once there is room")
        assert connects == [1]
    finally:
        _shut(net, sub, pub)
    assert not failures


def test_a_paused_loop_still_reads_once_every_half_keep_alive():
    """Reads paused for longer than the keep-alive left the broker's PINGRESP unread, and paho
    ended the connection: a service degraded by a full disk reconnected every minute. Paused,
    the loop still reads once every half keep-alive (one packet: the next read is again
    half a keep-alive away)."""

    class Connected:
        on_socket_register_write = None

        def is_connected(self) -> bool:
            return True

    net = NetworkLoop(
        Connected(), may_read=lambda: False, on_connect_fail=lambda e: None, keepalive=30
    )
    net._read_at = time.monotonic()
    assert not net._reading()  # just read: paused
    net._read_at = time.monotonic() - 16
    assert net._reading()  # over half the keep-alive ago


def test_a_paused_loop_reads_within_the_keep_alive_the_broker_gives(tmp_path):
    """An MQTT 5 broker may shorten our keep-alive in its CONNACK (mosquitto's
    `max_keepalive`), and paho then pings at that interval and drops the connection when a
    PINGRESP is not read within it. Paused, the loop read once every half of the keep-alive
    it was configured with: a service degraded (or with a full inbox) reconnected every few
    seconds. It reads within half the one the broker gave."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from firmware_sim.broker import Broker

    broker = Broker(tmp_path / "broker", embedded=False, extra="max_keepalive 10\n").start()
    sub = Client(mqtt.CallbackAPIVersion.VERSION2, client_id="short-ka", protocol=mqtt.MQTTv5)
    events: list[str] = []
    sub.on_connect = lambda c, u, f, r, p: events.append("connect")
    sub.on_disconnect = lambda c, u, f, r, p: events.append("disconnect")
    sub.on_log = lambda c, u, level, msg: (
        msg.startswith("Sending PINGREQ") and events.append("ping")
    )
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    sub.connect_async(*_hostport(broker.url), 60, clean_start=True, properties=props)
    net = NetworkLoop(sub, may_read=lambda: False, on_connect_fail=lambda e: None, keepalive=60)
    net.start()
    try:
        # Each ping is sent once the one before was answered: three on one connection.
        wait_until(lambda: events.count("ping") >= 3 or "disconnect" in events, 120, "three pings")
        assert sub.keepalive == 10 and events[:1] == ["connect"]
        assert "disconnect" not in events, events
    finally:
        net.quiet()
        sub.disconnect()
        net.stop()
        broker.stop()

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


@pytest.mark.parametrize("client_class", [mqtt.Client, Client], ids=["paho", "read-ahead"])
def test_reading_pauses_while_the_inbox_is_full_and_resumes_with_room(broker, client_class):
    host, port = _hostport(broker.url)
    inbox: list[int] = []
    sub = client_class(
        mqtt.CallbackAPIVersion.VERSION2, client_id="net-sub", clean_session=False, manual_ack=True
    )
    sub.on_message = lambda c, u, m: inbox.append(m.mid)
    sub.on_connect = lambda c, u, f, r, p: c.subscribe("t/#", 1)
    sub.connect_async(host, port, 30)
    failures: list[BaseException] = []
    net = NetworkLoop(sub, may_read=lambda: len(inbox) < ROOM, on_connect_fail=failures.append)
    net.start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="net-pub")
    pub.max_inflight_messages_set(0)
    pub.connect(host, port, 30)
    pub.loop_start()
    try:
        wait_until(lambda: sub.is_connected(), 20, "the subscriber to connect")
        time.sleep(0.5)  # the subscription is in place before the first message
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
        net.quiet()
        sub.disconnect()
        net.stop()
        pub.loop_stop()
        pub.disconnect()
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

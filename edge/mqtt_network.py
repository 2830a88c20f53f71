"""paho's network loop, run by us so that reading can pause.

paho's own ``loop_start`` reads whatever the broker sends, as fast as it arrives. MQTT 5's
Receive Maximum should bound that, but MQTT 3.1.1 has no such bound and brokers overshoot it
(``bench.broker_flow``). This loop reads only while ``may_read()`` says there is room, so a
backlog stays at the broker and not in our memory. It still reads when ``must_read()`` says so
(PUBACKs are awaited: the answer window is full; they may queue behind a broker's flood, which
then comes in too), until a connection is made (the CONNACK), and once every half keep-alive
(a PINGRESP left unread would end the connection). It keeps the connection alive and
reconnects with backoff (growing also while connections are dropped soon after they are made).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("edge.service")
PAUSED_POLL = 0.02  # seconds between looks at the inbox while reading is paused
MAX_READS_AHEAD = 1000  # packets taken from what is read ahead before writing again
# A connection that lasts less is a flap (e.g. two clients with one client id taking the
# session from each other): the reconnect delay keeps growing instead of starting over.
STABLE_SECONDS = 5.0


def held(lasted: float, reconnect_max: float) -> bool:
    """Whether a connection that lasted ``lasted`` seconds held, for the log: longer than a
    flap and than the longest reconnect delay. Another client with our client id takes the
    session back once its own delay runs out, up to ``reconnect_max``: of two serves with
    one client id, the one whose connections lasted that long logged each drop as news, a
    warning for ever, and the likely cause only once, at the start."""
    return lasted >= STABLE_SECONDS + reconnect_max


class NetworkLoop:
    def __init__(
        self,
        client: Any,
        *,
        may_read: Callable[[], bool],
        must_read: Callable[[], bool] = lambda: False,
        on_connect_fail: Callable[[BaseException], None],
        reconnect_min: float = 1.0,
        reconnect_max: float = 30.0,
        keepalive: float = 60.0,
    ) -> None:
        self.client = client
        self.keepalive = keepalive
        self._read_at = 0.0  # when the socket was last read (monotonic)
        self.may_read, self.must_read = may_read, must_read
        self.on_connect_fail = on_connect_fail
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.paused_reads = 0  # rounds in which reading waited for room: a backlog held off
        self._stop = threading.Event()
        self._quiet = threading.Event()  # set: do not reconnect any more (shutting down)
        self._wake_r: socket.socket | None = None  # a socket pair, made on start
        self._wake_w: socket.socket | None = None
        self._woken = False  # a wake is on its way: paho asks for one per packet it queues
        self._waiting = False  # in (or about to decide) its select: a wake must be sent
        # paho tells us when it has something to send (from any thread): wake the select.
        client.on_socket_register_write = lambda *_: self.wake()
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)

    def start(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread.start()

    def wake(self) -> None:
        """Make the select return. A system call only while the loop waits in its select, at
        most one per wait: between selects, it looks at what is queued before the next one
        (``_waiting`` is set first, and the worker queues before it calls this)."""
        if self._woken or not self._waiting:
            return
        self._woken = True
        self._send_wake()

    def _send_wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # already woken (buffer full) or closing
                self._wake_w.send(b"\0")

    def quiet(self) -> None:
        """No reconnecting from now on; the current connection keeps working."""
        self._quiet.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._send_wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    def _buffered(self, sock: Any) -> int:
        buffered = getattr(self.client, "buffered", None)
        if buffered is not None:
            return int(buffered())
        return int(getattr(sock, "pending", lambda: 0)())  # TLS decrypts ahead

    def _reading(self) -> bool:
        """Read while there is room or PUBACKs are awaited, and always until connected: a
        CONNACK left unread behind a full inbox would leave the service connected to nothing.
        Paused, read once every half keep-alive all the same (the broker's, when it gave a
        shorter one): a PINGRESP left unread ends the connection (a service degraded by a full
        disk reconnected every minute)."""
        return (
            not self.client.is_connected()
            or self.may_read()
            or self.must_read()
            or time.monotonic() - self._read_at >= self._keepalive() / 2
        )

    def _keepalive(self) -> float:
        """The keep-alive paho pings by: an MQTT 5 broker may have shortened ours in its
        CONNACK (mosquitto's ``max_keepalive``), and paho then drops a connection whose
        PINGRESP is not read within that."""
        given = getattr(self.client, "keepalive", None)
        if isinstance(given, (int, float)) and 0 < given < self.keepalive:
            return float(given)
        return self.keepalive

    def _run(self) -> None:
        """The loop, restarted after anything it did not expect: a network thread that died
        would leave the service running, connected to nothing, with nobody told."""
        import paho.mqtt.client as mqtt

        delay = self.reconnect_min
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except Exception:
                log.exception("the MQTT network loop failed; dropping the connection")
                with contextlib.suppress(Exception):  # as paho drops a lost connection
                    self.client._loop_rc_handle(mqtt.MQTT_ERR_CONN_LOST)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.reconnect_max)

    def _loop(self) -> None:
        wake_r = self._wake_r
        assert wake_r is not None
        import paho.mqtt.client as mqtt

        delay, waited = self.reconnect_min, False  # the first connect does not wait
        up_since: float | None = None  # when the current connection was made (CONNACK)
        flaps = 0  # connections in a row that the broker dropped soon after making them
        short = 0  # connections in a row that did not hold (``held``), for the log
        while not self._stop.is_set():
            sock = self.client.socket()
            if sock is None:
                if self._quiet.is_set():
                    self._stop.wait(PAUSED_POLL)
                    continue
                if up_since is not None:
                    lasted = time.monotonic() - up_since
                    flaps = 0 if lasted >= STABLE_SECONDS else flaps + 1
                    short = 0 if held(lasted, self.reconnect_max) else short + 1
                    if not flaps:
                        delay = self.reconnect_min  # a connection that held: start over
                    if short in (3, 10) or (short and short % 100 == 0):
                        log.error(
                            "the broker dropped the connection %.1f s after making it, %d "
                            "times in a row: does another client use this client id (a second "
                            "serve: the broker hands the session to the newest one), or does "
                            "the broker's ACL refuse a topic we publish on (mosquitto then "
                            "closes the connection)?",
                            lasted,
                            short,
                        )
                    up_since = None
                if waited:
                    if self._stop.wait(delay):
                        break
                    delay = min(delay * 2, self.reconnect_max)
                waited = True
                try:
                    self.client.reconnect()
                except (OSError, ValueError) as exc:
                    self.on_connect_fail(exc)
                continue
            if up_since is None and self.client.is_connected():
                up_since = time.monotonic()
            self._waiting = True  # before anything the select depends on is looked at
            reading = self._reading()
            self.paused_reads += not reading
            rlist = [sock, wake_r] if reading else [wake_r]
            wlist = [sock] if self.client.want_write() else []
            # Bytes read ahead (by the client, or decrypted by TLS) make no noise on the socket.
            pending = reading and self._buffered(sock) > 0
            try:
                wait = 0.0 if pending else 1.0 if reading else PAUSED_POLL
                ready, writable, _ = select.select(rlist, wlist, [], wait)
            except (OSError, ValueError, TypeError):  # closed under us: look again
                continue
            finally:
                self._waiting = False
            if pending and sock not in ready:
                ready = [*ready, sock]
            if wake_r in ready:
                with contextlib.suppress(OSError):  # drained (BlockingIOError) or closing
                    while wake_r.recv(4096):
                        pass
            self._woken = False  # after draining, before writing: a wake from now on is sent
            rc = mqtt.MQTT_ERR_SUCCESS
            if sock in ready:
                self._read_at = time.monotonic()
                rc = self.client.loop_read()
                # What is read ahead is taken now, not one packet per select.
                for _ in range(MAX_READS_AHEAD):
                    if rc != mqtt.MQTT_ERR_SUCCESS or not self._buffered(sock):
                        break
                    if not self._reading():
                        break
                    rc = self.client.loop_read()
            if rc == mqtt.MQTT_ERR_SUCCESS and (writable or self.client.want_write()):
                rc = self.client.loop_write()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                self.client.loop_misc()  # keep-alive pings, and a ping timeout closes

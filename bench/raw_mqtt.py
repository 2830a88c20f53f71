"""A pipelined MQTT 3.1.1 publisher on a raw socket, for load that costs its sender little.

A paho publisher in Python tops out around the rate of the process it should measure, so a
"ceiling" measured with it measures the generator. This one encodes every PUBLISH up front and
writes them in large chunks; PUBACKs are read and counted, never waited for one by one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterable


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    cid = client_id.encode()
    body = (
        b"\x00\x04MQTT\x04\x02" + struct.pack(">H", keepalive) + struct.pack(">H", len(cid)) + cid
    )
    return b"\x10" + _remaining(len(body)) + body


def publish_packet(topic: str, payload: bytes, mid: int) -> bytes:
    """QoS 1 PUBLISH."""
    t = topic.encode()
    body = struct.pack(">H", len(t)) + t + struct.pack(">H", mid) + payload
    return b"\x32" + _remaining(len(body)) + body


class RawPublisher:
    """Connects, then ``send`` pipelines QoS 1 publishes; ``acked`` counts PUBACKs."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused the connection: CONNACK {connack.hex()}")
        self.acked = 0
        self._mid = 0
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read_acks(self) -> None:
        pending = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += data
            n = len(pending) // 4  # PUBACK: 0x40 0x02 mid mid
            self.acked += n
            pending = pending[n * 4 :]

    def packets(self, msgs: Iterable[tuple[str, bytes]]) -> list[bytes]:
        out = []
        for topic, payload in msgs:
            self._mid = self._mid % 65535 + 1
            out.append(publish_packet(topic, payload, self._mid))
        return out

    def send(self, packets: list[bytes], chunk: int = 256, max_unacked: int = 60000) -> None:
        """Write ``packets`` in chunks, keeping at most ``max_unacked`` unacknowledged (ids)."""
        sent = 0
        base = self.acked
        for i in range(0, len(packets), chunk):
            while sent - (self.acked - base) > max_unacked - chunk:
                time.sleep(0.001)
            part = packets[i : i + chunk]
            self.sock.sendall(b"".join(part))
            sent += len(part)

    def wait_acked(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.acked < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.acked >= n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()

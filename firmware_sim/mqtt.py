"""Small paho helpers shared by the emulator, the scorer and the tests."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import paho.mqtt.client as mqtt

from edge.config import broker_address


def new_client(url: str, client_id: str, **kw: Any) -> Any:
    """A paho client for the broker at ``url`` (``mqtt://``, ``mqtts://`` with the system's
    CA certificates, or ``unix:///PATH``: the URLs ``edge-lstm serve`` takes)."""
    transport, _, _ = broker_address(url, "--broker")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, transport=transport, **kw
    )
    if url.startswith("mqtts:"):
        client.tls_set(tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def connect(client: Any, url: str, keepalive: int = 30) -> None:
    """``client.connect`` to the broker at ``url`` (its host and port, or its socket)."""
    _, host, port = broker_address(url, "--broker")
    client.connect(host, port, keepalive)


def close_client(client: Any) -> None:
    """Disconnect, stop the network thread, and release every socket.

    paho's ``loop_start`` opens a socket pair per call that ``loop_stop`` leaves open; the
    private reset is the only way to close it (otherwise: ResourceWarnings at exit).
    """
    client.disconnect()
    # paho's network thread clears ``_thread`` when it ends on its own (after the disconnect
    # above), which can happen between loop_stop's check and its join: stopped already.
    with contextlib.suppress(AttributeError):
        client.loop_stop()
    client._reset_sockets()

"""Small paho helpers shared by the emulator, the scorer and the tests."""

from __future__ import annotations

from typing import Any


def close_client(client: Any) -> None:
    """Disconnect, stop the network thread, and release every socket.

    paho's ``loop_start`` opens a socket pair per call that ``loop_stop`` leaves open; the
    private reset is the only way to close it (otherwise: ResourceWarnings at exit).
    """
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()

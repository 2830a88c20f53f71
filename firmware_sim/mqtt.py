"""Small paho helpers shared by the emulator, the scorer and the tests."""

from __future__ import annotations

import contextlib
from typing import Any


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

"""systemd's readiness protocol (``Type=notify``), without libsystemd.

With ``Type=simple`` systemd counts the service as started at its ``exec``, and a ``systemctl
reload`` right after ``systemctl start`` sent SIGHUP while Python was still starting, before
any handler of ours was in place (0.1-0.2 s on a desktop, longer on a Pi): SIGHUP's default
action ended the service. With ``Type=notify`` systemd waits for ``READY=1``, which the
service sends once its handlers are in place (not after the model and log are loaded: a long
recovery would outlast ``TimeoutStartSec``), and holds a reload or stop until then.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("edge.service")


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``) to ``$NOTIFY_SOCKET``; False, and nothing
    done, when the service does not run under ``Type=notify``. A socket that cannot be
    reached is logged, never fatal: the service works the same without it."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except (OSError, ValueError) as exc:
        log.warning("cannot tell systemd %s through NOTIFY_SOCKET=%r: %s", state, path, exc)
        return False
    return True

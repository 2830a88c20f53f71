"""Signals that arrive while a service starts (imports, configuration, the model loading).

Until the service's own handlers are in place, the default action applies, and for SIGHUP
that is to terminate: a ``systemctl reload`` right after a start would kill the service, and
a SIGTERM would end it by signal instead of the clean stop (exit 0) it asks for. ``catch``
runs first thing in a command and remembers them; the service takes them once it can act.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_received: list[int] = []


def catch() -> None:
    """Remember these signals from now on (main thread only, as Python's signals are)."""
    for sig in SIGNALS:
        signal.signal(sig, lambda number, _frame: _received.append(number))


def take() -> list[int]:
    """What arrived since ``catch``, oldest first, and forget it."""
    out = list(_received)
    _received.clear()
    return out

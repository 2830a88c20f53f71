"""Child processes that end with the process that started them.

firmware-sim's broker, runtimes and workers, and the converter's device-Python checks
(``edge-lstm replay``, ``edge-lstm inspect``). Their parent ends them when it ends on its own,
on Ctrl-C or on SIGTERM; a kill -9 (an out-of-memory kill, say) runs nothing, and left them
running for good, one set per kill. On Linux each child asks the kernel for a SIGTERM when the
process that started it ends (``PR_SET_PDEATHSIG``), which they take as a clean stop.

Imports nothing beyond the standard library: the converter and firmware-sim both use it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1

_prctl: Any = None
if sys.platform.startswith("linux"):
    try:  # looked up here: a forked child must not load anything before it execs
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def ending_with_us(then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when this process
    ends, however it ends; ``then`` runs after (in the child, before exec)."""
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # we ended before the request was made
                os.kill(os.getpid(), signal.SIGTERM)
        if then is not None:
            then()

    return preexec

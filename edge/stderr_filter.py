"""Drop TensorFlow's start-up lines from a command's stderr.

TensorFlow 2.21 writes some lines from C++ before its logging is set up, where
``TF_CPP_MIN_LOG_LEVEL`` has no say: "All log messages before absl::InitializeLog() ...",
the oneDNN note and "Could not find cuda drivers". They say nothing a user can act on, so the
commands that may import TensorFlow pass their stderr (file descriptor 2, which C++ writes to)
through a pipe that drops exactly these lines and forwards everything else unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading

NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:.]+ +\d+ (port|cudart_stub|cpu_feature_guard)\.cc:\d+\] .*"
    rb"|E\d{4} [\d:.]+ +\d+ cuda_(platform|executor|diagnostics)\.cc:\d+\] .*"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow .*)$"
)


def is_noise(line: bytes) -> bool:
    return bool(NOISE.match(line.rstrip(b"\r\n")))


def install() -> None:
    """Route fd 2 through the filter for the rest of the process (once; undone at exit)."""
    if getattr(install, "done", False) or os.environ.get("EDGE_LSTM_TF_LOGS") == "1":
        return
    install.done = True  # type: ignore[attr-defined]
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                keep = b"".join(line + b"\n" for line in lines if not is_noise(line))
                if pending[:1] not in b"IWET":  # cannot start a noise line: pass on now
                    keep, pending = keep + pending, b""  # (progress bars end in \r, not \n)
                if keep:
                    os.write(original, keep)
            if pending and not is_noise(pending):
                os.write(original, pending)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last write end closes: the thread sees the end
        thread.join(timeout=2)

    atexit.register(restore)

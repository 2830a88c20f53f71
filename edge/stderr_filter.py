"""Drop TensorFlow's start-up lines from a command's stderr.

TensorFlow 2.21 writes some lines from C++ before its logging is set up, where
``TF_CPP_MIN_LOG_LEVEL`` has no say: "All log messages before absl::InitializeLog() ...",
the oneDNN note and "Could not find cuda drivers". They say nothing a user can act on, so the
commands that may import TensorFlow pass their stderr (file descriptor 2, which C++ writes to)
through a pipe that drops exactly these lines and forwards everything else unchanged.

A service (``edge-lstm``) does not: a thread between its log and its stderr would lose the
last lines before a crash, and block every log call once the reader of stderr is gone. There
only the making of an interpreter and its first step, where its delegate writes "Created
TensorFlow Lite XNNPACK delegate for CPU." from C++, are caught (``interpreter_lines``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

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


_scoped = False


def catch_interpreter_lines() -> None:
    """From now on ``interpreter_lines`` drops the noise written while an interpreter is made."""
    global _scoped
    _scoped = os.environ.get("EDGE_LSTM_TF_LOGS") != "1"


@contextlib.contextmanager
def interpreter_lines() -> Iterator[None]:
    """fd 2 goes to a temporary file for the block, then what it got is passed on less the
    noise. A no-op unless ``catch_interpreter_lines`` was called: a library user's stderr is
    not touched."""
    if not _scoped:
        yield
        return
    try:
        sys.stderr.flush()
        caught = tempfile.TemporaryFile()  # noqa: SIM115 (closed after the block, below)
        original = os.dup(2)
    except (OSError, ValueError):  # no room for the file, no descriptor: the line stays
        yield
        return
    try:
        os.dup2(caught.fileno(), 2)
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(original, 2)
        os.close(original)
        with caught:
            caught.seek(0)
            kept = b"".join(line for line in caught if not is_noise(line))
        if kept:
            with contextlib.suppress(OSError):  # a stderr nobody reads any more
                os.write(2, kept)

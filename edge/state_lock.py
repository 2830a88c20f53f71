"""One process per state directory.

Two processes appending to one write-ahead log, or writing snapshot generations over each
other, leave a state that is neither's: every stream's history split between them. A lock
file held with ``flock`` for the life of the process refuses the second one at start-up; the
kernel drops the lock when the process ends, however it ends, so a crash leaves nothing stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("edge.service")
LOCK_NAME = "lock"


class StateLock:
    def __init__(self, directory: str | Path, what: str = "state_dir") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or ConfigError naming the process that holds it. A directory this
        process cannot write is not locked (a warning): it cannot be written over either."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("%s %s: not locked (%s)", self.what, self.path.parent, exc.strerror or exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.what} {str(self.path.parent)!r} is in use by another process (pid "
                f"{holder}); give each one a {self.what} of its own"
            ) from None
        with contextlib.suppress(OSError):  # the pid is for the message above only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __del__(self) -> None:
        self.release()

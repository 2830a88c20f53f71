"""One process per state directory.

Two processes appending to one write-ahead log, or writing snapshot generations over each
other, leave a state that is neither's: every stream's history split between them. The
directory itself is held with ``flock`` for the life of the process (a lock file alone is
gone once a cleaner deletes it), and a lock file in it says which process holds it; the
kernel drops both when the process ends, however it ends, so a crash leaves nothing stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path

from .errors import ConfigError, shown

log = logging.getLogger("edge.service")
LOCK_NAME = "lock"


def make_dir(directory: Path) -> None:
    """``mkdir -p directory``. A symbolic link to a directory that is not there (on a file
    system not mounted) is an OSError that says so: mkdir's own is "File exists", of a
    directory nobody can see."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        if directory.is_symlink() and not directory.exists():
            target = os.readlink(directory)
            raise OSError(
                errno.ENOENT, f"{directory} is a symbolic link to {target}, which does not exist"
            ) from None
        raise


class StateLock:
    def __init__(self, directory: str | Path, what: str = "state_dir") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or ConfigError naming the process that holds it. A directory that
        cannot be made or opened is not locked (a warning): the service starts degraded."""
        directory = self.path.parent
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"{self.what} {directory}: not a directory")
        try:
            make_dir(directory)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            log.warning("%s %s: not locked (%s)", self.what, directory, exc.strerror or exc)
            return
        if not self._hold(dfd):
            raise ConfigError(self._in_use()) from None

    def follow(self) -> None:
        """Hold the directory that is at the path now. One removed or moved away under the
        process (``rm -rf``, ``mv``) and made again by it is another directory, which no one
        holds: it is locked before anything is written in it. OSError when it cannot be
        (another process holds it: nothing may be written there)."""
        directory = self.path.parent
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        had = self._dir_fd is not None  # else none could be made or opened at the start
        if self._dir_fd is not None:
            now, held = os.fstat(dfd), os.fstat(self._dir_fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                os.close(dfd)
                return
        if not self._hold(dfd):
            raise OSError(errno.EBUSY, self._in_use())
        if had:
            log.warning("%s %s is another directory now: locked that one", self.what, directory)

    def _hold(self, dfd: int) -> bool:
        """Lock the directory open as ``dfd`` (taken over: closed on failure) and write the
        pid into its lock file, letting go of any directory held before; False when another
        process holds it."""
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(dfd)
            return False
        self.release()
        self._dir_fd = dfd
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only directory: locked, without the pid
            log.warning(
                "%s %s: no lock file (%s)", self.what, self.path.parent, exc.strerror or exc
            )
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a process of a version that locked the file alone
            os.close(fd)
            self.release()
            return False
        with contextlib.suppress(OSError):  # the pid is for the message below only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def _in_use(self) -> str:
        try:
            holder = self.path.read_bytes()[:32].decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        return (
            f"{self.what} {shown(str(self.path.parent))} is in use by another process (pid "
            f"{holder or 'unknown'}); give each one a {self.what} of its own"
        )

    def release(self) -> None:
        for fd in (self._fd, self._dir_fd):
            if fd is not None:
                os.close(fd)  # closing drops the lock
        self._fd = self._dir_fd = None

    def __del__(self) -> None:
        self.release()

"""The file a command was told to write: the file itself, never what stands in its place.

Outputs are written under a temporary name and renamed over the target, so none is ever
half-written. A rename replaces whatever holds the name: run as root, ``--out /dev/null`` would
leave a regular file where the device was, and a symbolic link would become a copy. So an
existing target must be a regular file, and a link is followed: the file it points to is
replaced (the temporary file beside it, so the rename stays on one file system) and the link
is kept.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import EdgeError

KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link that loops",
}


def regular_target(path: Path, error: type[EdgeError], label: str = "") -> Path:
    """``path`` with its links followed; raises ``error`` (one line naming ``path`` and what
    it is) unless that is a regular file or does not exist yet."""
    real = Path(os.path.realpath(path))
    try:
        mode = real.lstat().st_mode
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise error(f"{label}{path}: cannot look at it: {exc.strerror}") from exc
    if stat.S_ISREG(mode):
        return real
    kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
    via = f" (where the link leads: {real})" if os.path.islink(path) else ""
    raise error(f"{label}{path} is {kind}{via}; only a regular file is replaced")


def new_mode(target: Path, made: int = 0o666) -> int:
    """The permissions of the file that replaces ``target``: its own if it exists, else what
    creating it with mode ``made`` would have given (the temporary file is created 0600; a
    directory: 0o777)."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return made & ~umask


def replace_whole(
    path: Path, write: Callable[[Path], object], error: type[EdgeError], label: str = ""
) -> None:
    """``write`` a temporary file beside ``path`` (where its link leads, if it is one), then
    rename it over ``path``: a reader finds the old file or the new one, never part of one."""
    target = regular_target(path, error, label)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
        )
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, new_mode(target))
        regular_target(path, error, label)  # again: it may have changed meanwhile
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise error(f"{label}{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def replace_together(
    writes: Sequence[tuple[Path, Callable[[Path], object]]],
    error: type[EdgeError],
    label: str = "",
) -> None:
    """Each ``write`` to a temporary file beside its path first, and only once all are
    written, each renamed over its path: a failure while writing (a full disk) leaves every
    path as it was, not some new files beside old ones."""
    staged: list[tuple[Path, Path, Path]] = []  # (path, where its link leads, temporary)
    try:
        for path, write in writes:
            target = regular_target(path, error, label)
            try:
                fd, name = tempfile.mkstemp(
                    prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
                )
                os.close(fd)
                staged.append((path, target, Path(name)))
                write(Path(name))
                os.chmod(name, new_mode(target))
            except OSError as exc:
                raise error(f"{label}{path}: cannot write: {exc.strerror or exc}") from exc
        for path, _, _ in staged:
            regular_target(path, error, label)  # again: one may have changed meanwhile
        for path, target, tmp in staged:
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise error(f"{label}{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        for _, _, tmp in staged:
            tmp.unlink(missing_ok=True)

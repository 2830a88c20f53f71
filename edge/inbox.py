"""The queue of received, not yet acknowledged messages, bounded in memory.

The network loop stops reading when the inbox is full, but it must read while answers wait
for PUBACKs, and a broker that ignores Receive Maximum (Mosquitto 2.0.11 does,
``bench.broker_flow``) sends its whole backlog ahead of them. What arrives beyond
``memory_limit`` goes to an unnamed file in the state directory, in order, and comes back as
the head drains. Nothing in it is acknowledged, so a crash loses nothing: the broker
redelivers it, and the file disappears with the process. The file leaves a reserve of its
file system free (``RESERVE``, and twice the room the log keeps for its next snapshot): it
shares the state directory with the log, and a log that cannot be written acknowledges
nothing, so a spill that filled the disk would never drain.
Past that (or when a write fails), messages wait in memory until they are worked off.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from .processor import Inbound

log = logging.getLogger("edge.inbox")

# mid, qos, flags (1: dup, 2: retained), received, topic length, content-type length (all ones:
# none), payload length
_HEAD = struct.Struct("<IBBdHII")
_NO_CTYPE = 0xFFFFFFFF
READ_CHUNK = 1 << 20
RESERVE = 64 << 20  # bytes left free for the log; a quarter of a smaller file system
ROOM_CHECK_EVERY = 256  # spill writes between looks at the free space
COMPACT_AT = 256 << 10  # a read head this far in, and past the file's middle: move the rest up


def encode(msg: Inbound) -> bytes:
    topic = msg.topic.encode()
    ctype = b"" if msg.content_type is None else msg.content_type.encode()
    head = _HEAD.pack(
        msg.mid,
        msg.qos,
        msg.redelivered | msg.retained << 1,
        msg.received,
        len(topic),
        _NO_CTYPE if msg.content_type is None else len(ctype),
        len(msg.payload),
    )
    return b"".join((head, topic, ctype, msg.payload))


def decode(buf: bytes, limit: int) -> tuple[list[Inbound], int]:
    """Up to ``limit`` whole records from the start of ``buf``, and the bytes they took."""
    out: list[Inbound] = []
    pos, end, size = 0, len(buf), _HEAD.size
    while pos + size <= end and len(out) < limit:
        mid, qos, flags, received, n_topic, n_ctype, n_payload = _HEAD.unpack_from(buf, pos)
        n_c = 0 if n_ctype == _NO_CTYPE else n_ctype
        stop = pos + size + n_topic + n_c + n_payload
        if stop > end:
            break
        at = pos + size
        topic = buf[at : at + n_topic].decode()
        at += n_topic
        ctype = None if n_ctype == _NO_CTYPE else buf[at : at + n_c].decode()
        at += n_c
        payload = buf[at:stop]
        out.append(Inbound(topic, payload, mid, qos, ctype, received, bool(flags & 1), flags > 1))
        pos = stop
    return out, pos


class Inbox:
    """A FIFO of ``Inbound``; one thread appends, another takes (``popleft``, ``extendleft``).

    At most ``memory_limit`` messages are held in memory by ``append``; the rest wait in a
    spill file. ``extendleft`` (a batch offered again) may go over the limit: those are few.
    """

    def __init__(
        self,
        memory_limit: int,
        spill_dir: Path | str | None = None,
        *,
        log_reserve: Callable[[], int] = lambda: 0,
    ) -> None:
        self.memory_limit = max(1, memory_limit)
        self.spill_dir = spill_dir
        self.log_reserve = log_reserve  # what the log keeps free for its next snapshot
        self.spilled_total = 0  # messages that went through the file, for stats
        self._mem: deque[Inbound] = deque()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._read = self._write = 0  # file offsets
        self._in_file = 0  # messages in the file
        self._spill_failed = False  # memory holds what comes, until that is worked off
        self._until_check = 0

    def __len__(self) -> int:
        return len(self._mem) + self._in_file

    def __bool__(self) -> bool:
        return bool(self._mem) or self._in_file > 0

    @property
    def in_file(self) -> int:
        return self._in_file

    def oldest_received(self) -> float | None:
        """When the first message held in memory arrived (``Inbound.received``), if any."""
        mem = self._mem
        return mem[0].received if mem else None

    def append(self, msg: Inbound) -> None:
        with self._lock:
            if not self._in_file and len(self._mem) < self.memory_limit:
                self._mem.append(msg)
            elif not self._spill(msg):  # no file: memory, rather than losing the message
                self._load(len(self))  # what the file holds comes first
                self._mem.append(msg)

    def popleft(self) -> Inbound:
        if not self._mem and self._in_file:
            self._refill()
        msg = self._mem.popleft()
        if self._in_file and len(self._mem) < self.memory_limit // 2:
            self._refill()
        elif self._spill_failed and len(self._mem) < self.memory_limit // 2:
            with self._lock:  # worked off: the next overflow tries the disk again
                self._spill_failed = False
                self._until_check = 0
        return msg

    def extendleft(self, msgs: Iterable[Inbound]) -> None:
        self._mem.extendleft(msgs)

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._reset_file()

    def close(self) -> None:
        with self._lock:
            self._mem.clear()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._read = self._write = self._in_file = 0

    def _spill(self, msg: Inbound) -> bool:
        if self._spill_failed:
            return False
        if self._until_check <= 0:
            self._until_check = ROOM_CHECK_EVERY
            if not self._room():
                return False
        self._until_check -= 1
        if self._fd is None:
            try:
                self._fd = _unnamed_file(self.spill_dir)
            except OSError as exc:
                self._spill_failed = True
                log.error(
                    "cannot open a spill file in %s (%s); holding in memory", self.spill_dir, exc
                )
                return False
            log.warning(
                "the broker sent more than %d unacknowledged messages; the rest wait on disk",
                self.memory_limit,
            )
        rec = encode(msg)
        try:
            written = os.pwrite(self._fd, rec, self._write)
        except OSError as exc:
            written, reason = -1, str(exc)
        else:
            reason = f"{written} of {len(rec)} bytes written: the disk is full"
        if written != len(rec):  # a part written is past the end that counts: ignored
            log.error("cannot write the spill file (%s); holding in memory", reason)
            self._spill_failed = True
            return False
        self._write += len(rec)
        self._in_file += 1
        self.spilled_total += 1
        return True

    def _refill(self) -> None:
        """Move the file's head into memory, up to the limit (in order: under the lock)."""
        with self._lock:
            self._load(self.memory_limit - len(self._mem))

    def _room(self) -> bool:
        """Whether the spill may grow: the file system keeps its reserve free for the log."""
        try:
            st = os.statvfs(self.spill_dir if self.spill_dir is not None else tempfile.gettempdir())
        except OSError:
            return True  # cannot tell: a write that fails says so
        # and at least twice what the log keeps for its next snapshot: the log's own room
        reserve = max(min(RESERVE, st.f_blocks * st.f_frsize // 4), 2 * self.log_reserve())
        if st.f_bavail * st.f_frsize >= reserve:
            return True
        log.error(
            "the spill file leaves %d bytes free in %s, its reserve for the log; holding in memory",
            reserve,
            self.spill_dir,
        )
        self._spill_failed = True
        return False

    def _load(self, room: int) -> None:
        if self._fd is not None:
            while self._in_file and room > 0:
                want = min(READ_CHUNK, self._write - self._read)
                buf = os.pread(self._fd, want, self._read)
                msgs, used = decode(buf, room)
                if not msgs and len(buf) >= _HEAD.size:  # one record larger than a chunk
                    buf = os.pread(self._fd, _record_size(buf), self._read)
                    msgs, used = decode(buf, room)
                if not msgs:  # cannot be: every record counted was written whole
                    log.error(
                        "spill file unreadable at offset %d: %d unacknowledged messages in it "
                        "dropped (the broker sends them again on the next connection)",
                        self._read,
                        self._in_file,
                    )
                    self._in_file = 0
                    break
                self._mem.extend(msgs)
                self._read += used
                self._in_file -= len(msgs)
                room -= len(msgs)
            if self._in_file and self._read >= COMPACT_AT and 2 * self._read >= self._write:
                self._compact()
        if not self._in_file:
            self._reset_file()

    def _compact(self) -> None:
        """Move what is still to be read to the file's start and cut the file there: what
        was read gives its space back (to the log, on a full disk) before the file drains.
        The rest is no longer than what was read, so the move never writes over what it has
        yet to read, and a failure leaves the file as it was from the read head on."""
        assert self._fd is not None
        src, dst = self._read, 0
        try:
            while src < self._write:
                chunk = os.pread(self._fd, min(READ_CHUNK, self._write - src), src)
                if not chunk or os.pwrite(self._fd, chunk, dst) != len(chunk):
                    raise OSError("short read or write")
                src, dst = src + len(chunk), dst + len(chunk)
            os.ftruncate(self._fd, dst)
        except OSError as exc:  # moved in part: the original bytes beyond ``dst`` are intact
            log.warning("cannot compact the spill file (%s); it shrinks once drained", exc)
            return
        self._read, self._write = 0, dst

    def _reset_file(self) -> None:
        if self._fd is not None and self._write:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                os.close(self._fd)
                self._fd = None
        self._read = self._write = self._in_file = 0


def _record_size(buf: bytes) -> int:
    n_topic, n_ctype, n_payload = _HEAD.unpack_from(buf, 0)[4:]
    size: int = _HEAD.size + n_topic + (0 if n_ctype == _NO_CTYPE else n_ctype) + n_payload
    return size


def _unnamed_file(directory: Path | str | None) -> int:
    """A file no one else can open and that goes away with the process (O_TMPFILE when the
    file system has it, else created and unlinked at once)."""
    d = str(directory) if directory is not None else tempfile.gettempdir()
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(d, flags | tmpfile, 0o600)
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix=".inbox-", suffix=".spill", dir=d)
    os.unlink(name)
    return fd

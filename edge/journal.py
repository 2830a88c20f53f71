"""The service's state directory: snapshot generations and write-ahead log segments.

::

    snap-00000007.bin   state after every log entry before segment 7 (the previous generation)
    wal-00000007.log    entries since then
    snap-00000008.bin   the newest snapshot
    wal-00000008.log    entries since it; appended now

A checkpoint opens segment G+1 (starting with the entries a snapshot cannot hold: messages held
by the reorder buffer and answers the broker has not acknowledged, marked ``carried``), writes
snapshot G+1 of the state copied when it began (in a background thread while the log goes on in
segment G+1, or before it returns), and then deletes what the generation before the previous
one needed. Until snapshot G+1 is in place, snapshot G and segments G and G+1 are the state.
Recovery restores the newest snapshot that reads back intact and replays every segment from its
generation on, so a damaged snapshot costs a longer replay, not state. Damaged log spans are
skipped and reported; intact entries after them are replayed.

Writes either complete or leave the files as they were (a failed append is cut back off; one
that cannot be is never appended after: the next checkpoint starts a new segment first), so a
full disk or a read-only directory is an ``OSError`` the caller can wait out and retry.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, SnapshotError, StateMismatch, shown
from .outfile import KINDS
from .state_lock import make_dir
from .wal import Damage, Entry, Joined, Mark, Output, Record, encode, encode_round, scan

log = logging.getLogger("edge.service")
_NAME = re.compile(r"(snap|wal)-([0-9]{8})\.(bin|log)")  # matched whole: not before a \n
# The temporary file of a snapshot being written (``edge.snapshot.write_atomic``): one found at
# start-up was left by a crash in the middle of that write.
_PARTIAL = re.compile(r"\.snap-[0-9]{8}\.bin\..+", re.DOTALL)


@dataclass
class Recovery:
    """What start-up found: where the state came from and what to replay on top of it."""

    generation: int = 0  # the snapshot restored (0: none)
    base_lsn: int = 0  # the last lsn that snapshot covers
    extra: dict[str, Any] = field(default_factory=dict)  # what the snapshot was given to keep
    exact: bool = True  # False: no usable snapshot and the log does not reach back to the start
    damaged_snapshots: list[str] = field(default_factory=list)
    damage: list[str] = field(default_factory=list)  # one line per damaged log span
    lost: bool = False  # the damage may have taken acknowledged entries with it
    entries: list[Entry] = field(default_factory=list)
    # Indices of entries logged in one round with the entry after them: replayed together.
    joined: set[int] = field(default_factory=set)
    acked: int = 0  # the highest ack mark found
    last_lsn: int = 0


# A segment this large is checkpointed early once it takes as much room as its file system
# has left: a backlog logs far faster than ``snapshot_interval`` comes round, and a full disk
# can no longer take the snapshot that would free it. The room left is looked up every
# ROOM_STEP bytes of log (and estimated in between); the log never takes the last
# ``reserve`` bytes, kept for the next checkpoint.
CROWDED_FROM = 256 * 1024
ROOM_STEP = 64 * 1024
# A segment this large is checkpointed early whatever room is left: a restart reads the log
# since the last snapshot into memory, ~7 bytes of memory for each byte of log (a 96 MB
# segment of a million samples took 610 MB more than an empty one: bench.recovery_memory),
# which a long ``snapshot_interval`` on a busy gateway made more than a Pi has, at every
# restart.
SEGMENT_MAX = 16 * 1024 * 1024


@dataclass
class _Pending:
    """A checkpoint whose snapshot is being written."""

    generation: int
    carried: int  # the size of its segment when begun: the carried copies only
    lost: str | None  # ``Journal.lost`` when it began: the loss it mends
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    size: int = 0  # of the snapshot written


class Journal:
    def __init__(
        self, directory: str | Path, *, fsync: bool = False, scratch: bool = False
    ) -> None:
        """``scratch``: a copy of state kept elsewhere (a worker's partition, whose snapshots
        and log live in JetStream), one of several sharing a file system. Only the newest
        generation is kept (the fallback is elsewhere), and the room left is looked up at
        every append (the others' writes make an estimate from its own wrong)."""
        self.dir = Path(directory)
        self.fsync = fsync
        self.scratch = scratch
        self.generation = 0  # of the segment appended to
        self.snapshots: list[int] = []  # generations with a good snapshot, oldest first
        self._fd: int | None = None
        self._size = 0
        self._checkpointed = -1  # the segment's size when the last checkpoint began it
        self._room = -1  # free bytes on the file system when last looked up (-1: not yet)
        self._room_at = 0  # the segment's size then
        self._snapshot_bytes = 0  # of the newest snapshot written or restored
        # What the next checkpoint will write, as its owner reckons it: (snapshot, carried
        # entries). The state grows between snapshots (a first one of no streams says nothing
        # of the thousandth), and a backlog's unacknowledged answers are carried over.
        self.checkpoint_estimate: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # Set when the segment was removed under us (the directory deleted, say): nothing more
        # is appended until a checkpoint has written the state out again.
        self.lost: str | None = None
        self._stuck: set[str] = set()  # retired files that could not be removed (logged once)
        # (generation, offset) of a torn last write found at the end of the newest segment:
        # cut off before that segment is appended to, else it reads as damage in the middle.
        self._torn: tuple[int, int] | None = None
        self._unfinished = False  # the newest segment ends inside a round (see ``open``)
        self._pending: _Pending | None = None  # the checkpoint in flight
        self._ident = (0, 0)  # (st_dev, st_ino) of the segment appended to
        # Called once the directory is there, before a file is made in it: the directory may
        # be one made again (removed or moved away under the process), which its owner locks.
        self.claim: Callable[[], None] = lambda: None
        # (st_dev, st_ino) of the directory recovered from, or made since (None: none yet)
        self._home: tuple[int, int] | None = None
        self._writer: ThreadPoolExecutor | None = None  # writes its snapshot (``background``)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"state_dir {shown(str(self.dir))} exists and is not a directory")

    def path(self, kind: str, gen: int) -> Path:
        return self.dir / (f"snap-{gen:08d}.bin" if kind == "snap" else f"wal-{gen:08d}.log")

    def _listing(self) -> tuple[list[int], list[int]]:
        snaps: list[int] = []
        segs: list[int] = []
        for p in self.dir.iterdir() if self.dir.is_dir() else []:
            m = _NAME.fullmatch(p.name)
            if m:
                (snaps if m.group(1) == "snap" else segs).append(int(m.group(2)))
        return sorted(snaps), sorted(segs)

    def _regular(self, snaps: list[int], segs: list[int]) -> None:
        """Refuse a snapshot or segment that is not a regular file (where a link leads): a FIFO
        would be waited on for ever, a device read without end. A segment that is a link to
        nothing cannot be read either (a snapshot is read as a damaged one)."""
        for path in [*(self.path("snap", g) for g in snaps), *(self.path("wal", g) for g in segs)]:
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:  # a dangling link
                if path.name.startswith("snap-"):
                    continue
                kind = f"a symbolic link to {shown(os.readlink(path))}, which does not exist,"
            else:
                if stat.S_ISREG(mode):
                    continue
                kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise ConfigError(
                f"state_dir {shown(str(self.dir))}: {path.name} is {kind}, not a file this "
                "runtime wrote; remove it, or give another state_dir"
            )

    # -- start-up ---------------------------------------------------------------------------

    def recover(self, restore: Any) -> Recovery:
        """Restore the newest intact snapshot (``restore(path) -> extra dict``, raising
        ``SnapshotError``) and collect the log entries to replay on top of it."""
        self._home = _ident(self.dir)
        self._adopt_format_1()
        self._drop_partial()
        snaps, segs = self._listing()
        self._regular(snaps, segs)
        rec = Recovery()
        for gen in reversed(snaps):
            try:
                extra = restore(self.path("snap", gen))
                lsn = _covered_lsn(extra, self.path("snap", gen))
            except StateMismatch:
                raise  # intact, of another model: not to be replaced by this one's state
            except SnapshotError as exc:
                if isinstance(exc.__cause__, PermissionError):
                    # Not damage: another user's file (snapshots are 0600; a run as root).
                    # Falling back would restart every stream, and the next checkpoints
                    # would delete the snapshots that hold their state.
                    raise ConfigError(
                        f"state_dir {shown(str(self.dir))}: cannot read "
                        f"{self.path('snap', gen).name}: {exc.__cause__.strerror}; give its "
                        "files to the user serve runs as"
                    ) from None
                rec.damaged_snapshots.append(str(exc))
                continue
            rec.generation, rec.base_lsn, rec.extra = gen, lsn, extra
            self.snapshots = [g for g in snaps if g <= gen]
            self._snapshot_bytes = self.path("snap", gen).stat().st_size
            break
        if not rec.generation:
            # No usable snapshot: exact only if the log still reaches back to the beginning.
            rec.exact = not segs or segs[0] == 0
        first = rec.generation
        # Every generation from the snapshot restored to the newest one, a snapshot unusable
        # too, has its segment (a checkpoint writes it before the snapshot): one missing was
        # removed, and the segments on either side of it are no log without it.
        start = first or min([*segs, *snaps], default=0)
        for gen in range(start, max([*segs, *snaps], default=-1) + 1):
            if gen not in segs:
                rec.damage.append(f"{self.path('wal', gen).name}: missing (what it logged is lost)")
                rec.lost = True
        carried: set[Any] = set()
        # A newest segment beyond every snapshot is a checkpoint a crash cut short before its
        # snapshot was in place (or one whose snapshot failed): it starts with copies carried
        # over from the segment before it, ended by a Mark, so cut short there it lost nothing.
        # What the log appended after them while the snapshot was written is replayed as any.
        unfinished = segs[-1] if segs and segs[-1] > max(snaps, default=0) else None
        for gen in (g for g in segs if g >= first):
            path = self.path("wal", gen)
            data = _read_segment(path)
            if not data and gen != unfinished:  # made with a first entry: cut to nothing
                rec.damage.append(f"{path.name}: empty, cut short (what it logged is lost)")
                rec.lost = True
            # The last entry replayed, while every frame read since was of its round.
            open_round: int | None = None
            more = False  # the frame just read was written with the next one
            copies = gen == unfinished  # still in the copies a checkpoint began it with
            for item in scan(data):
                if isinstance(item, Joined):
                    more = True
                    continue
                joins, more = more, False
                if not joins:
                    open_round = None
                if isinstance(item, Damage):
                    open_round = None
                    if item.at_end:
                        if gen == segs[-1]:
                            self._torn = (gen, item.offset)
                            self._unfinished = True  # the round the torn write was in
                        if copies:  # carried copies cut short: cut off, no loss
                            continue
                        what = (
                            f"ends inside an entry at offset {item.offset} (a torn last "
                            "write, or the file cut short), skipped"
                        )
                    else:
                        what = (
                            f"damaged span of {item.length} bytes at offset {item.offset} "
                            "skipped; the intact entries after it are replayed"
                        )
                    rec.damage.append(f"{path.name}: {what}")
                    # With fsync before each acknowledgement a torn last write held nothing
                    # acknowledged (the broker sends it again); otherwise it may have.
                    rec.lost = rec.lost or not (item.at_end and self.fsync)
                    continue
                if isinstance(item, Mark):
                    rec.acked = max(rec.acked, item.acked)
                    copies = False
                    continue
                if isinstance(item, (Record, Output)):
                    if item.carried:
                        # Redundant: the original lies in a segment replayed here, or an earlier
                        # checkpoint carried the same entry already.
                        key = (
                            (item.lsn, item.topic, item.payload)
                            if isinstance(item, Output)
                            else item.lsn
                        )
                        if item.lsn > rec.base_lsn or key in carried:
                            continue
                        carried.add(key)
                    rec.last_lsn = max(rec.last_lsn, item.lsn)
                if open_round is not None:
                    rec.joined.add(open_round)
                open_round = len(rec.entries)
                rec.entries.append(item)
            if gen == segs[-1] and more:  # its last round cut short: ended before the next
                self._unfinished = True
        rec.last_lsn = max(rec.last_lsn, rec.base_lsn, rec.acked)
        self.generation = max([first, *segs, *snaps])
        return rec

    def _drop_partial(self) -> None:
        """Remove what snapshot writes cut short by a crash left: each as large as the state,
        and nothing else would ever reclaim them (one process per directory: none is ours)."""
        for p in self.dir.iterdir() if self.dir.is_dir() else []:
            if not _PARTIAL.fullmatch(p.name):
                continue
            try:
                p.unlink()
            except OSError as exc:  # a read-only directory, say: the service starts degraded
                log.warning("cannot remove %s, left by a snapshot write: %s", p, exc.strerror)
                continue
            log.warning("removed %s, left by a snapshot write a crash cut short", p)

    def _adopt_format_1(self) -> None:
        """edge-lstm 0.1 kept one ``snapshot.bin`` and one ``wal.log``: the snapshot becomes
        generation 1; that log's format is not read any more and is set aside, named."""
        old_snap, old_log = self.dir / "snapshot.bin", self.dir / "wal.log"
        if old_snap.exists() and not self.path("snap", 1).exists():
            old_snap.rename(self.path("snap", 1))
            log.warning("adopted %s as the first snapshot generation", old_snap)
        if old_log.exists():
            old_log.rename(old_log.with_suffix(".log.v1"))
            log.error(
                "%s is a format-1 log, which this version does not replay; kept as %s",
                old_log,
                old_log.with_suffix(".log.v1").name,
            )

    def open(self) -> None:
        """Open the current segment for appending; OSError when the directory is unusable."""
        if self._fd is not None:
            return
        self._enter()
        path = self.path("wal", self.generation)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._torn is not None and self._torn[0] == self.generation:
            try:
                os.ftruncate(fd, self._torn[1])  # reported at start-up; garbage
            except OSError:
                os.close(fd)
                raise
            self._torn = None
        # A segment begins with an entry (an empty one was cut), and a round a crash cut short
        # is ended before the next one (else a replay would take the two for one).
        if not os.fstat(fd).st_size or self._unfinished:
            try:
                _write_all(fd, encode(Mark(0)), os.fstat(fd).st_size, True)
            except OSError:
                empty = not os.fstat(fd).st_size
                os.close(fd)
                if empty:
                    path.unlink(missing_ok=True)
                raise
            self._unfinished = False
        st = os.fstat(fd)
        self._fd, self._size, self._room, self._ident = fd, st.st_size, -1, (st.st_dev, st.st_ino)

    def _enter(self) -> None:
        """Make the directory (again) and have it claimed before a file is made in it. One
        other than the directory recovered from (or made since) that holds snapshots or log
        segments is a state this process did not start from: a file system mounted at or
        above ``state_dir`` after the start, when it was missing or empty. Its generations
        written beside, a restart took up the newest, and what this process logged there
        was lost; so nothing is written in it (``StateAppeared``) until a restart recovers it."""
        make_dir(self.dir)
        self.claim()
        here = _ident(self.dir)
        if here == self._home:
            return
        snaps, segs = self._listing()
        if snaps or segs:
            newest = self.path("snap" if snaps else "wal", max(snaps or segs)).name
            raise StateAppeared(
                errno.EEXIST,
                f"{self.dir} holds a state this process did not start from ({newest}; a file "
                "system mounted after the start?): restart the service to take it up",
            )
        self._home = here

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    # -- running ----------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry], *, keep_reserve: bool = True) -> None:
        """One write for all; on return they survive a crash of this process (and, with
        ``fsync``, a power cut). On OSError nothing of them is left in the file.
        ``keep_reserve=False``: entries that shrink the next checkpoint (releases of held
        messages) may use the room kept for it; refused, they would keep it too large."""
        if not entries:
            return
        if self.lost:
            raise OSError(errno.ENOENT, self.lost)
        self.open()
        assert self._fd is not None
        data = encode_round(entries)
        reserve = self.reserve() if keep_reserve else 0
        if (
            reserve
            and self.room() - len(data) < reserve
            and self.room(look=True) - len(data) < reserve
        ):
            raise OSError(
                errno.ENOSPC,
                f"No space left on device (the last {reserve} bytes are kept for the next "
                "snapshot)",
            )
        try:
            _write_all(self._fd, data, self._size, self.fsync)
        except UncutWrite as exc:
            # Intact frames of a write never acknowledged would be replayed, and the entries
            # offered again after them replayed a second time: a checkpoint first.
            self.lost = f"log segment {self.path('wal', self.generation)} {exc.strerror}"
            self.close()
            raise
        self._size += len(data)
        if gone := self._displaced():  # written to a file no longer where a restart looks
            self.lost = f"log segment {self.path('wal', self.generation)} {gone}"
            self.close()
            # The log goes on in the next segment: one made again under this number would
            # read, after a crash before the state is written out again, as that generation's
            # whole log (at generation 0, as the whole log from the start: no loss seen).
            self.generation += 1
            raise OSError(errno.ENOENT, self.lost)

    def _displaced(self) -> str | None:
        """What became of the segment appended to, if it is no longer at its path: removed
        (``rm -rf`` of the directory), or moved away with its directory (``mv``), which the
        log would go on appending to until the next snapshot, a restart finding nothing."""
        try:
            st = os.stat(self.path("wal", self.generation))
        except OSError:
            return "was removed or moved away"
        if (st.st_dev, st.st_ino) != self._ident:
            return "was replaced"
        return None

    def room(self, *, look: bool = False) -> int:
        """Free bytes on the log's file system: looked up when ``look`` or after ROOM_STEP
        bytes of log, else estimated from the last look and what the log wrote since."""
        if look or self.scratch or self._room < 0 or abs(self._size - self._room_at) >= ROOM_STEP:
            try:
                st = os.statvfs(self.dir)
            except OSError:
                return 1 << 62  # not known: the writes will tell
            self._room, self._room_at = st.f_bavail * st.f_frsize, self._size
        return self._room - (self._size - self._room_at)

    def reserve(self) -> int:
        """Room the log leaves for the next checkpoint: a snapshot (twice the larger of the
        last one and the estimate, for what may come until then) and a segment's start with
        what it carries over."""
        snapshot, carry = self.checkpoint_estimate()
        return 2 * max(self._snapshot_bytes, snapshot) + carry + ROOM_STEP

    def crowded(self) -> bool:
        """Whether it is time for a checkpoint: the log since the last snapshot is past
        ``SEGMENT_MAX``, or takes as much room as it has left on its file system (beyond the
        reserve), while there is room for one."""
        if self._size >= SEGMENT_MAX:
            return True
        return self._size >= CROWDED_FROM and self._size >= self.room() - self.reserve()

    @property
    def changed(self) -> bool:
        """Anything appended since the last checkpoint (else a checkpoint writes what is there)."""
        return self._size != self._checkpointed or self.lost is not None

    def checkpoint(self, snapshot: Any, carry: Sequence[Entry], extra: dict[str, Any]) -> None:
        """Start segment G+1 with ``carry``, write snapshot G+1 with ``snapshot(path, extra)``,
        then drop what only generations before the previous snapshot needed."""
        self.start_checkpoint(lambda path, ex: lambda: snapshot(path, ex), carry, extra)
        self.finish()

    def start_checkpoint(
        self,
        take: Callable[[Path, dict[str, Any]], Callable[[], None]],
        carry: Sequence[Entry],
        extra: dict[str, Any],
        *,
        background: bool = False,
    ) -> None:
        """Begin a checkpoint: ``take(path, extra)`` copies the state now and returns the call
        that writes snapshot G+1; segment G+1 is started with ``carry`` and appended to from
        here on. ``background``: that write (and the removal of retired generations) runs in
        a thread, the loop answering on meanwhile, and ``finish`` says how it went; else it
        runs before this returns. A crash before the snapshot is in place leaves snapshot G
        and segments G and G+1, the state a restart rebuilds (``recover``). One at a time;
        an ``OSError`` or ``SnapshotError`` raised here changed nothing."""
        assert self._pending is None, "a checkpoint is in flight"
        gen = self.generation + 1
        write = take(self.path("snap", gen), {**extra, "generation": gen})
        if not carry or not isinstance(carry[-1], Mark):
            # ends the copies: a torn write after it is one of the log's own (``recover``)
            carry = [*carry, Mark(0)]
        seg = self.path("wal", gen)
        self._enter()
        fd = os.open(seg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        data = b"".join(encode(e) for e in carry)
        try:
            # fsynced with the snapshot's write, before it (and before the log appended to it
            # counts for anything: the snapshot before it is the state until then)
            self._with_room(lambda: _write_all(fd, data, 0, False))
            synced = os.dup(fd)
        except OSError:
            os.close(fd)
            _remove(seg, "the segment of a failed checkpoint")
            raise
        if self._fd is not None:
            os.close(self._fd)
        st = os.fstat(fd)
        self._fd, self._size, self.generation = fd, st.st_size, gen
        self._room, self._ident = -1, (st.st_dev, st.st_ino)
        pending = _Pending(gen, self._size, self.lost)
        self._pending = pending
        if background:
            # One thread kept for them: starting one waits until it runs, which on a busy
            # machine took milliseconds. An exit waits for the work handed to it.
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="edge-checkpoint")
            self._writer.submit(self._write_snapshot, pending, synced, write)
        else:
            self._write_snapshot(pending, synced, write)

    def _write_snapshot(self, pending: _Pending, segment: int, write: Callable[[], None]) -> None:
        """The slow part of a checkpoint, in whichever thread: fsync the carried copies (fd
        ``segment``, a duplicate of its own, closed here), write the snapshot, then retire
        what it makes unneeded. It touches only files of other generations than the one
        appended to, and ``snapshots``, which nothing else uses while it runs."""
        try:
            try:
                os.fsync(segment)
            finally:
                os.close(segment)
            self._with_room(write)
            path = self.path("snap", pending.generation)
            pending.size = path.stat().st_size
            self.snapshots.append(pending.generation)
            keep = 1 if self.scratch else 2
            self._drop_before(self.snapshots[-keep] if len(self.snapshots) >= keep else 0)
        except BaseException as exc:  # handed to ``finish``, in the thread that started it
            pending.error = exc
        finally:
            pending.done.set()

    @property
    def checkpointing(self) -> bool:
        """A checkpoint is in flight (its snapshot not yet written, or not yet ``finish``ed)."""
        return self._pending is not None

    def pending_done(self) -> bool:
        """The checkpoint in flight wrote its snapshot or failed: ``finish`` will not wait."""
        return self._pending is not None and self._pending.done.is_set()

    def finish(self) -> bool:
        """Wait for the checkpoint in flight, if any; whether there was one. Raises what its
        write raised: the snapshot is then removed and the log goes on in its segment (a
        restart replays it on the snapshot before), or, when nothing was appended to that
        segment yet, the directory is left as before the checkpoint."""
        pending = self._pending
        if pending is None:
            return False
        pending.done.wait()
        self._pending = None
        gen = pending.generation
        if pending.error is None:
            self._snapshot_bytes = pending.size
            self._checkpointed = pending.carried
            if self.lost == pending.lost:  # not a loss met while the snapshot was written
                self.lost = None
            return True
        # A snapshot renamed into place before the failure (its directory's fsync failed) goes
        # first: a restart would take it for the newest state, a state the rollback below
        # would have the log no longer follow.
        if not _remove(self.path("snap", gen), "the snapshot of a failed checkpoint"):
            # It stays, whole (written before its rename): the log goes on after it.
            self.snapshots.append(gen)
            raise pending.error
        if self._fd is not None and self.generation == gen and self._size == pending.carried:
            # The segment holds copies of what the log before it holds: the log goes on there,
            # and a disk that stays full does not gather a segment per attempt.
            # First of all: nothing may be appended to the number the fd had once it is closed.
            self.close()
            self.generation = gen - 1
            _remove(self.path("wal", gen), "the segment of a failed checkpoint")
            with contextlib.suppress(OSError):  # the next append says what is wrong
                self.open()
        raise pending.error

    def _with_room(self, write: Callable[[], None]) -> None:
        """``write``; when the disk is full, once more after dropping the generations before
        the newest snapshot. They are only the fallback should that snapshot turn out damaged,
        and a directory too small for two generations would otherwise never checkpoint again:
        its log, and the spill beside it, could only grow."""
        try:
            write()
            return
        except (OSError, SnapshotError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if getattr(cause, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if not self.snapshots or not self._drop_before(self.snapshots[-1]):
                raise
            log.warning(
                "%s is full: the generations before %d were removed to make room (one "
                "generation is kept until there is room for two)",
                self.dir,
                self.snapshots[-1],
            )
        write()

    def _drop_before(self, generation: int) -> bool:
        """Remove the snapshots and segments older than ``generation``; whether there were."""
        snaps, segs = self._listing()
        old = [self.path("snap", g) for g in snaps if g < generation]
        old += [self.path("wal", g) for g in segs if g < generation]
        removed = False
        for f in old:
            try:
                f.unlink(missing_ok=True)
                removed = True
            except OSError as exc:  # say a directory in its place: the checkpoint stands
                if f.name not in self._stuck:
                    self._stuck.add(f.name)
                    log.error("cannot remove %s of a retired generation: %s", f, exc.strerror)
        self.snapshots = [g for g in self.snapshots if g >= generation]
        return removed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def files(self) -> Iterator[Path]:
        snaps, segs = self._listing()
        yield from (self.path("snap", g) for g in snaps)
        yield from (self.path("wal", g) for g in segs)


def _read_segment(path: Path) -> bytes:
    """A log segment's bytes, but for a hole that runs to its end (a file grown sparse, by
    a file system's damage or a tool, to gigabytes): one zero byte stands for it, which
    ``scan`` reads as the zeros it is (a tail cut short). Read whole, the start stopped with
    a MemoryError, or ran out of memory, every time."""
    with open(path, "rb") as f:
        size = hole = os.fstat(f.fileno()).st_size
        try:
            hole = os.lseek(f.fileno(), 0, os.SEEK_HOLE)
            if hole < size:
                os.lseek(f.fileno(), hole, os.SEEK_DATA)  # ENXIO: no data after the hole
                hole = size  # a hole inside: read whole
        except OSError:  # ENXIO: none (the hole is its tail); or holes are not told
            pass
        f.seek(0)
        if hole >= size:
            return f.read()
        return f.read(hole) + b"\0"


def _ident(directory: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _remove(path: Path, what: str) -> bool:
    """Remove ``path`` if it is there; whether it is gone. A failure (a read-only directory)
    is logged."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot remove %s, %s: %s", path, what, exc.strerror or exc)
        return False
    return True


class StateAppeared(OSError):
    """The state directory holds snapshots or a log this process did not start from."""


class UncutWrite(OSError):
    """A write failed, and what it put in the file could not be cut back off."""


def _write_all(fd: int, data: bytes, size: int, fsync: bool) -> None:
    """Write everything or, on failure, cut the file back to ``size`` and re-raise
    (``UncutWrite`` when the cut fails too)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, size)
        except OSError as cut:
            log.error("could not cut a failed log write back off: %s", cut)
            raise UncutWrite(
                exc.errno,
                f"holds part of a failed write ({exc.strerror or exc}) that could not be cut "
                f"off ({cut.strerror or cut})",
            ) from exc
        raise


def _covered_lsn(extra: dict[str, Any], path: Path) -> int:
    """The last lsn a snapshot covers, a whole number >= 0; else the snapshot is unusable, as
    a damaged one is. ``int()`` of a null, a word, NaN or Infinity stopped the start with a
    traceback instead of falling back to the snapshot before it."""
    lsn = extra.get("lsn", 0)
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn < 2**63:
        raise SnapshotError(
            f"{path}: the last lsn it covers, {shown(lsn, 40)}, is not a whole number"
        )
    return lsn

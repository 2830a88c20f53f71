"""The in-process engine: per-stream state, exactly-once sequencing, batched stepping.

No MQTT here; ``edge.mqtt_loop`` and ``edge.processor`` are a thin shell around this class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import snapshot as snapfmt
from .backend import select
from .errors import (
    BundleError,
    ConfigError,
    DuplicateSample,
    InvalidSample,
    MissingSeq,
    SampleError,
    SequenceGap,
    SnapshotError,
    StaleSample,
)
from .kernels import enforce
from .manifest import Manifest, read_bundle
from .model import StepModel, dequantize
from .sequencing import GAP_POLICIES, HALF, U32, admit, earlier_boot, last_of
from .state_store import NO_SEQ, StateStore

MAX_STREAM_ID = 256
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Chunk:
    """k consecutive samples of one stream; ``seq`` numbers the first (see ``sequencing``).

    ``boot`` identifies the device's current boot (a counter or a random nonce): a chunk of a
    new boot restarts the stream, one of an earlier boot is refused as stale.
    """

    stream: str
    values: Any
    seq: int | None = None
    boot: int | None = None


@dataclass
class Outcome:
    """What happened to one chunk. ``y`` has one row per applied sample."""

    stream: str
    seq: int | None
    y: np.ndarray
    duplicates: int = 0
    gap: int = 0
    late: int = 0  # of the duplicates, those that fell in a gap the stream was stepped across
    reset: bool = False  # the state was zeroed before the first applied sample
    restart: bool = False  # ... because the device restarted (new boot, or seq far behind)
    error: SampleError | None = None


class _Segment(NamedTuple):
    values: np.ndarray  # [k, F] float64, already validated and de-duplicated
    outcome: int  # index of the Outcome that receives the k outputs
    reset: bool  # zero the state before the first of them (gap policy "reset")


@dataclass
class Counters:
    samples: int = 0
    steps: int = 0
    invokes: int = 0
    duplicates: int = 0
    gaps: int = 0
    gap_resets: int = 0
    rejected: int = 0
    resets: int = 0
    restarts: int = 0
    stale: int = 0


class Engine:
    def __init__(
        self,
        model: StepModel,
        *,
        gap_policy: str = "continue",
        allow_unsequenced: bool = True,
        capacity: int = 1_000_000,
        idle_timeout: float | None = None,
        max_chunk: int = 1024,
        restart_gap: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if gap_policy not in GAP_POLICIES:
            raise ConfigError(f"gap_policy {gap_policy!r} is not one of {GAP_POLICIES}")
        if max_chunk < 1:
            raise ConfigError(f"max_chunk must be >= 1, got {max_chunk}")
        if not 0 <= restart_gap < HALF:
            raise ConfigError(f"restart_gap must be in 0..{HALF - 1}, got {restart_gap}")
        self.restart_gap = restart_gap
        self.model = model
        self.gap_policy = gap_policy
        self.allow_unsequenced = allow_unsequenced
        self.max_chunk = max_chunk
        self.store = StateStore(
            model.zero_state(), capacity=capacity, idle_timeout=idle_timeout, clock=clock
        )
        self.counters = Counters()
        self._no_output = np.empty((0, model.manifest.outputs), np.float32)
        self._no_output.flags.writeable = False

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    # -- public API -------------------------------------------------------------------------

    def step(
        self, stream: str, x: Any, seq: int | None = None, boot: int | None = None
    ) -> np.ndarray:
        """x: [F] -> y: [O]; x: [k, F] -> y: [k, O]. Raises a ``SampleError`` on refusal."""
        out = self.step_many([Chunk(stream, x, seq, boot)])[0]
        if out.error is not None:
            raise out.error
        if np.ndim(x) == 1:
            if len(out.y) == 0:
                raise DuplicateSample("duplicate sample dropped", stream_id=stream, seq=seq)
            return np.asarray(out.y[0])
        return out.y

    def reset(self, stream: str, *, next_seq: int | None = None, boot: int | None = None) -> None:
        """Zero the stream's state. Its last seq is kept (redeliveries stay duplicates) unless
        ``next_seq`` is given: then that seq is the next one accepted. ``boot`` makes that boot
        the stream's current one."""
        self.store.reset(stream)
        self.counters.resets += 1
        row = self.store.peek(stream)
        if row is None and (next_seq is not None or boot is not None):
            row = int(self.store.acquire([stream])[0])
        if row is not None and next_seq is not None:  # a new numbering: old gaps mean nothing
            self.store.last_seq[row] = (next_seq - 1) % U32
            self.store.gaps[row] = 0
        if row is not None and boot is not None:
            self.store.set_boot(row, boot)

    def last_seq(self, stream: str) -> int | None:
        row = self.store.peek(stream)
        if row is None or self.store.last_seq[row] == NO_SEQ:
            return None
        return int(self.store.last_seq[row])

    def boots(self, stream: str) -> tuple[int | None, list[int]]:
        """(current boot id or None, earlier boot ids) of a stream."""
        row = self.store.peek(stream)
        return (None, []) if row is None else self.store.boot_of(row)

    def state_of(self, stream: str) -> list[np.ndarray] | None:
        row = self.store.peek(stream)
        return None if row is None else [a[row].copy() for a in self.store.arrays]

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {
            "streams": len(self.store),
            "evicted_lru": self.store.stats.evicted_lru,
            "evicted_idle": self.store.stats.evicted_idle,
            "samples": c.samples,
            "steps": c.steps,
            "invokes": c.invokes,
            "duplicates": c.duplicates,
            "gaps": c.gaps,
            "gap_resets": c.gap_resets,
            "rejected": c.rejected,
            "resets": c.resets,
            "restarts": c.restarts,
            "stale": c.stale,
            "state_bytes": self.store.nbytes(),
        }

    def snapshot(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """All streams' state, last seq and boot ids, atomically (see ``edge.snapshot``)."""
        streams, last_seq, arrays, boots, gaps = self.store.export()
        snap = snapfmt.Snapshot(
            self.manifest.tflite_sha256,
            [list(x) for x in self.manifest.state_layout()],
            streams,
            last_seq,
            arrays,
            extra or {},
            boots,
            gaps,
        )
        snapfmt.write_atomic(path, snapfmt.chunks(snap))

    def restore(
        self, path: str | Path, *, fresh_on_mismatch: bool = False, other_model_ok: bool = False
    ) -> dict[str, Any]:
        """Load a snapshot of this model. Returns its ``extra`` dict.

        A snapshot of another model or state layout is refused, unless ``fresh_on_mismatch``,
        which starts with no streams instead. ``other_model_ok`` accepts another model with
        the same state layout (an updated bundle keeps its streams, as on hot reload).
        """
        snap = snapfmt.read(path)
        layout = [list(x) for x in self.manifest.state_layout()]
        problem = None
        if snap.model_sha256 != self.manifest.tflite_sha256 and not (
            other_model_ok and snap.state_layout == layout
        ):
            problem = (
                f"it was taken with model {snap.model_sha256[:12]}..., this engine runs "
                f"{self.manifest.tflite_sha256[:12]}..."
            )
        elif snap.state_layout != layout:
            problem = f"its state layout {snap.state_layout} differs from {layout}"
        if problem:
            if fresh_on_mismatch:
                self.store.load([], np.empty(0, np.int64), [a[:0] for a in self.store.arrays])
                return {}
            raise SnapshotError(f"{path}: cannot restore: {problem} (start fresh to ignore it)")
        self.store.load(snap.streams, snap.last_seq, snap.arrays, snap.boots, snap.gaps)
        return snap.extra

    def load_state_from(self, other: Engine) -> None:
        """Carry every stream over from another engine with the same state layout."""
        if other.manifest.state_layout() != self.manifest.state_layout():
            raise BundleError("state layouts differ; the streams cannot be carried over")
        self.store.load(*other.store.export())

    # -- stepping ---------------------------------------------------------------------------

    def step_many(self, items: Iterable[Chunk] | Mapping[str, Any]) -> list[Outcome]:
        """Advance many streams with as few invokes as possible.

        Chunks are applied in the order given; a stream's samples step in order. Round r steps
        the r-th pending sample of every stream in one batched invoke.
        """
        if isinstance(items, Mapping):
            items = [Chunk(s, v) for s, v in items.items()]
        self.store.evict_idle()
        outcomes: list[Outcome] = []
        plans: dict[str, list[_Segment]] = {}
        last: dict[str, int | None] = {}
        boots: dict[str, int] = {}
        gaps: list[tuple[str, int, int, bool]] = []  # (stream, first skipped, count, fresh)
        for chunk in items:
            outcome, values = self._admit(chunk, last, boots, gaps)
            outcomes.append(outcome)
            if values is not None and len(values):
                seg = _Segment(values, len(outcomes) - 1, outcome.reset)
                plans.setdefault(chunk.stream, []).append(seg)
        if plans:
            self._run(plans, outcomes)
            for stream, seq in last.items():
                row = self.store.peek(stream)
                if row is not None and seq is not None:
                    self.store.last_seq[row] = seq
        for stream, boot in boots.items():
            row = self.store.peek(stream)
            if row is not None:
                self.store.set_boot(row, boot)
        for stream, first, count, fresh in gaps:
            row = self.store.peek(stream)
            if row is not None:
                self.store.note_gap(row, first, count, fresh=fresh)
        return outcomes

    def _boot_of(self, stream: str, boots: dict[str, int]) -> tuple[int | None, list[int]]:
        row = self.store.peek(stream)
        cur, old = (None, []) if row is None else self.store.boot_of(row)
        if stream in boots and boots[stream] != cur:
            old = [] if cur is None else [cur, *old]
            cur = boots[stream]
        return cur, old

    def _admit(
        self,
        chunk: Chunk,
        last: dict[str, int | None],
        boots: dict[str, int],
        gaps: list[tuple[str, int, int, bool]],
    ) -> tuple[Outcome, np.ndarray | None]:
        stream, seq = chunk.stream, chunk.seq
        empty = self._no_output
        try:
            values = self._validate(chunk)
        except SampleError as err:
            self.counters.rejected += 1
            return Outcome(stream, seq, empty, error=err), None
        self.counters.samples += len(values)
        if seq is None:
            return Outcome(stream, None, empty), values
        if stream not in last:
            last[stream] = self.last_seq(stream)
        restart = False
        if chunk.boot is not None:
            cur, old = self._boot_of(stream, boots)
            if earlier_boot(chunk.boot, cur, old):
                self.counters.stale += 1
                stale = StaleSample(
                    f"boot {chunk.boot} is older than the stream's current boot {cur}",
                    stream_id=stream,
                    seq=seq,
                )
                return Outcome(stream, seq, empty, error=stale), None
            restart = cur is not None and chunk.boot != cur and last[stream] is not None
            boots[stream] = chunk.boot
        prev = last[stream]
        if not restart and self.restart_gap and prev is not None:
            behind = (prev - seq) % U32
            restart = self.restart_gap < behind < HALF
        if restart:
            self.counters.restarts += 1
            last[stream] = None
        start = last[stream] is None
        adm = admit(last[stream], seq, len(values))
        self.counters.duplicates += adm.duplicates
        late = self._late(stream, seq, adm.duplicates, gaps) if adm.duplicates else 0
        if adm.first_new is None:
            return Outcome(stream, seq, empty, duplicates=adm.duplicates, late=late), None
        if start:  # it starts here: anything before it arrives too late
            gaps.append((stream, (adm.first_new - HALF + 1) % U32, HALF - 1, True))
        reset = False
        if adm.gap:
            self.counters.gaps += 1
            if self.gap_policy == "reject":
                self.counters.rejected += 1
                gap_error = SequenceGap(
                    f"{adm.gap} sample(s) missing before this one (gap policy 'reject')",
                    stream_id=stream,
                    seq=seq,
                )
                return Outcome(stream, seq, empty, gap=adm.gap, error=gap_error), None
            if self.gap_policy == "reset":
                reset = True
                self.counters.gap_resets += 1
        if adm.gap:
            gaps.append((stream, (adm.first_new - adm.gap) % U32, adm.gap, False))
        values = values[adm.duplicates :]
        last[stream] = last_of(adm.first_new, len(values))
        return Outcome(
            stream, adm.first_new, empty, adm.duplicates, adm.gap, late, reset or restart, restart
        ), values

    def _late(
        self, stream: str, seq: int, count: int, pending: list[tuple[str, int, int, bool]]
    ) -> int:
        """How many of ``count`` duplicate samples from ``seq`` fall in a gap the stream was
        stepped across: remembered in its row, or noted earlier in this same call."""
        mine = [(first, n, fresh) for s, first, n, fresh in pending if s == stream]
        row = self.store.peek(stream)
        spans = [] if row is None else [(int(f), int(n)) for f, n in self.store.gaps[row] if n]
        for first, n, fresh in mine:
            spans = [*([] if fresh else spans), (first, n)]
        seqs = [(seq + k) % U32 for k in range(count)]
        return sum(any((q - f) % U32 < n for f, n in spans) for q in seqs)

    def _validate(self, chunk: Chunk) -> np.ndarray:
        stream, seq = chunk.stream, chunk.seq
        if (
            not isinstance(stream, str)
            or not 0 < len(stream) <= MAX_STREAM_ID
            or not (stream.isprintable())
        ):
            raise InvalidSample(f"invalid stream id {stream!r}", stream_id=None, seq=seq)
        if seq is None and not self.allow_unsequenced:
            raise MissingSeq(
                "sample has no seq; this engine needs sequenced streams", stream_id=stream
            )
        if seq is not None and (
            isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < 2**32
        ):
            raise InvalidSample(f"seq {seq!r} is not an unsigned 32-bit integer", stream_id=stream)
        try:
            arr = np.asarray(chunk.values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidSample(
                f"values are not numeric: {exc}", stream_id=stream, seq=seq
            ) from exc
        f = self.manifest.features
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != f:
            raise InvalidSample(
                f"values have shape {np.shape(chunk.values)}, expected [{f}] or [k, {f}]",
                stream_id=stream,
                seq=seq,
            )
        if not 0 < len(arr) <= self.max_chunk:
            raise InvalidSample(
                f"{len(arr)} samples in one chunk, expected 1..{self.max_chunk}",
                stream_id=stream,
                seq=seq,
            )
        if not np.isfinite(arr).all():
            raise InvalidSample("values contain NaN or Inf", stream_id=stream, seq=seq)
        if np.abs(arr).max() > FLOAT32_MAX:  # the model computes in float32 at most
            raise InvalidSample(
                f"values beyond the float32 range (max |x| {np.abs(arr).max():.3g})",
                stream_id=stream,
                seq=seq,
            )
        return arr

    def _run(self, plans: dict[str, list[_Segment]], outcomes: list[Outcome]) -> None:
        if len(plans) > self.store.capacity:
            raise ConfigError(
                f"{len(plans)} streams in one batch exceed the state capacity "
                f"{self.store.capacity}; lower the batch size or raise the capacity"
            )
        segments = list(plans.values())
        if all(len(segs) == 1 and len(segs[0].values) == 1 for segs in segments):
            # The common case, one new sample per stream: one round, no per-sample bookkeeping.
            rows = self.store.acquire(plans)
            x = np.concatenate([segs[0].values for segs in segments])
            zero = [i for i, segs in enumerate(segments) if segs[0].reset]
            y = self._step_rows(rows, x, zero)
            for i, segs in enumerate(segments):
                outcomes[segs[0].outcome].y = y[i : i + 1]
            return
        streams = sorted(plans, key=lambda s: -sum(len(seg.values) for seg in plans[s]))
        rows = self.store.acquire(streams)
        xs, where, resets = [], [], []
        for stream in streams:
            segs = plans[stream]
            xs.append(np.concatenate([seg.values for seg in segs]))
            where.append([(seg.outcome, k) for seg in segs for k in range(len(seg.values))])
            starts = np.cumsum([0] + [len(seg.values) for seg in segs])
            resets.append({int(starts[j]) for j, seg in enumerate(segs) if seg.reset})
            for seg in segs:
                shape = (len(seg.values), self.manifest.outputs)
                outcomes[seg.outcome].y = np.empty(shape, np.float32)
        lengths = np.array([len(x) for x in xs])
        for r in range(int(lengths.max())):
            m = int((lengths > r).sum())  # sorted by length: the active streams are a prefix
            x = np.stack([xs[i][r] for i in range(m)])
            y = self._step_rows(rows[:m], x, [i for i in range(m) if r in resets[i]])
            for i in range(m):
                oi, k = where[i][r]
                outcomes[oi].y[k] = y[i]

    def _step_rows(self, rows: np.ndarray, x: np.ndarray, zero: list[int]) -> np.ndarray:
        """One step for these state rows: reset some, gather, invoke, scatter -> float y."""
        if zero:
            self.store.zero_rows(rows[zero])
        y_raw, new_state = self.model.invoke(self.model.encode_x(x), self.store.gather(rows))
        self.store.scatter(rows, new_state)
        self.counters.invokes += -(-len(rows) // self.model.max_batch)
        self.counters.steps += len(rows)
        return dequantize(y_raw, self.model.y_spec)


def load(
    directory: str | Path,
    *,
    backend: str | None = None,
    max_batch: int = 256,
    num_threads: int = 1,
    self_test: bool = True,
    builtin_kernels: bool = False,
    kernel_mismatch: str = "refuse",
    **engine_options: Any,
) -> Engine:
    """Open a bundle directory: manifest checked, sha256 checked, one-step self-test run, and
    the kernel set the interpreter really runs checked against those the bundle was verified
    with (``kernel_mismatch``: "refuse", "warn", or "allow" for tools that compare kernel sets
    on purpose). ``builtin_kernels`` switches the interpreter's default delegates off."""
    manifest, content = read_bundle(directory)
    chosen = select(backend)
    model = StepModel(
        manifest,
        content,
        chosen.builtin() if builtin_kernels else chosen,
        max_batch=max_batch,
        num_threads=num_threads,
    )
    if kernel_mismatch != "allow":
        enforce(manifest, model.kernels, kernel_mismatch, str(directory))
    if self_test:
        y, _ = model.invoke(model.encode_x(np.zeros((1, manifest.features))), model.zero_state())
        if y.shape != (1, manifest.outputs) or not np.isfinite(dequantize(y, model.y_spec)).all():
            raise BundleError(f"{directory}: self-test step gave {y!r}")
    return Engine(model, **engine_options)

"""The in-process engine: per-stream state, exactly-once sequencing, batched stepping.

No MQTT here; ``edge.service`` is a thin shell around this class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
)
from .manifest import Manifest, read_bundle
from .model import StepModel, dequantize
from .sequencing import GAP_POLICIES, admit, last_of
from .state_store import NO_SEQ, StateStore

MAX_STREAM_ID = 256


@dataclass(frozen=True)
class Chunk:
    """k consecutive samples of one stream; ``seq`` numbers the first (see ``sequencing``)."""

    stream: str
    values: Any
    seq: int | None = None


@dataclass
class Outcome:
    """What happened to one chunk. ``y`` has one row per applied sample."""

    stream: str
    seq: int | None
    y: np.ndarray
    duplicates: int = 0
    gap: int = 0
    reset: bool = False
    error: SampleError | None = None


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
    extra: dict[str, int] = field(default_factory=dict)


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if gap_policy not in GAP_POLICIES:
            raise ConfigError(f"gap_policy {gap_policy!r} is not one of {GAP_POLICIES}")
        if max_chunk < 1:
            raise ConfigError(f"max_chunk must be >= 1, got {max_chunk}")
        self.model = model
        self.gap_policy = gap_policy
        self.allow_unsequenced = allow_unsequenced
        self.max_chunk = max_chunk
        self.store = StateStore(
            model.zero_state(), capacity=capacity, idle_timeout=idle_timeout, clock=clock
        )
        self.counters = Counters()

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    # -- public API -------------------------------------------------------------------------

    def step(self, stream: str, x: Any, seq: int | None = None) -> np.ndarray:
        """x: [F] -> y: [O]; x: [k, F] -> y: [k, O]. Raises a ``SampleError`` on refusal."""
        out = self.step_many([Chunk(stream, x, seq)])[0]
        if out.error is not None:
            raise out.error
        if np.ndim(x) == 1:
            if len(out.y) == 0:
                raise DuplicateSample("duplicate sample dropped", stream_id=stream, seq=seq)
            return np.asarray(out.y[0])
        return out.y

    def reset(self, stream: str) -> None:
        self.store.reset(stream)
        self.counters.resets += 1

    def last_seq(self, stream: str) -> int | None:
        row = self.store.peek(stream)
        if row is None or self.store.last_seq[row] == NO_SEQ:
            return None
        return int(self.store.last_seq[row])

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
            "rejected": c.rejected,
            "resets": c.resets,
            "state_bytes": self.store.nbytes(),
        }

    def snapshot(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """All streams' state and last seq, atomically (see ``edge.snapshot``)."""
        streams, last_seq, arrays = self.store.export()
        snap = snapfmt.Snapshot(
            self.manifest.tflite_sha256,
            [list(x) for x in self.manifest.state_layout()],
            streams,
            last_seq,
            arrays,
            extra or {},
        )
        snapfmt.write_atomic(path, snapfmt.encode(snap))

    def restore(self, path: str | Path, *, fresh_on_mismatch: bool = False) -> dict[str, Any]:
        """Load a snapshot of this model. Returns its ``extra`` dict.

        A snapshot of another model or state layout is refused, unless ``fresh_on_mismatch``,
        which starts with no streams instead.
        """
        snap = snapfmt.read(path)
        layout = [list(x) for x in self.manifest.state_layout()]
        problem = None
        if snap.model_sha256 != self.manifest.tflite_sha256:
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
        self.store.load(snap.streams, snap.last_seq, snap.arrays)
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
        plans: dict[str, list[tuple[np.ndarray, int, bool]]] = {}
        last: dict[str, int | None] = {}
        for chunk in items:
            outcome, values = self._admit(chunk, last)
            outcomes.append(outcome)
            if values is not None and len(values):
                plans.setdefault(chunk.stream, []).append(
                    (values, len(outcomes) - 1, outcome.reset)
                )
        if plans:
            self._run(plans, outcomes)
            for stream, seq in last.items():
                row = self.store.peek(stream)
                if row is not None and seq is not None:
                    self.store.last_seq[row] = seq
        return outcomes

    def _admit(
        self, chunk: Chunk, last: dict[str, int | None]
    ) -> tuple[Outcome, np.ndarray | None]:
        stream, seq = chunk.stream, chunk.seq
        empty = np.empty((0, self.manifest.outputs), np.float32)
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
        adm = admit(last[stream], seq, len(values))
        self.counters.duplicates += adm.duplicates
        if adm.first_new is None:
            return Outcome(stream, seq, empty, duplicates=adm.duplicates), None
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
        values = values[adm.duplicates :]
        last[stream] = last_of(adm.first_new, len(values))
        return Outcome(stream, adm.first_new, empty, adm.duplicates, adm.gap, reset), values

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
        return arr

    def _run(
        self, plans: dict[str, list[tuple[np.ndarray, int, bool]]], outcomes: list[Outcome]
    ) -> None:
        if len(plans) > self.store.capacity:
            raise ConfigError(
                f"{len(plans)} streams in one batch exceed the state capacity "
                f"{self.store.capacity}; lower the batch size or raise the capacity"
            )
        streams = sorted(plans, key=lambda s: -sum(len(v) for v, _, _ in plans[s]))
        rows = self.store.acquire(streams)
        xs, owner, offset, resets = [], [], [], []
        for stream in streams:
            segs = plans[stream]
            xs.append(np.concatenate([v for v, _, _ in segs]) if len(segs) > 1 else segs[0][0])
            owner.append(np.concatenate([np.full(len(v), oi) for v, oi, _ in segs]))
            offset.append(np.concatenate([np.arange(len(v)) for v, _, _ in segs]))
            pos, r = set(), 0
            for v, _, reset in segs:
                if reset:
                    pos.add(r)
                r += len(v)
            resets.append(pos)
        lengths = np.array([len(x) for x in xs])
        ys = {
            oi: np.empty((len(v), self.manifest.outputs), np.float32)
            for segs in plans.values()
            for v, oi, _ in segs
        }
        y_spec = self.model.y_spec
        for r in range(int(lengths.max())):
            m = int((lengths > r).sum())  # streams are sorted by length: a prefix is active
            active = rows[:m]
            zero = [active[i] for i in range(m) if r in resets[i]]
            if zero:
                self.store.zero_rows(np.asarray(zero, np.intp))
            x = self.model.encode_x(np.stack([xs[i][r] for i in range(m)]))
            y_raw, new_state = self.model.invoke(x, self.store.gather(active))
            self.store.scatter(active, new_state)
            y = dequantize(y_raw, y_spec)
            for i in range(m):
                ys[int(owner[i][r])][int(offset[i][r])] = y[i]
            self.counters.invokes += -(-m // self.model.max_batch)
            self.counters.steps += m
        for oi, y in ys.items():
            outcomes[oi].y = y


def load(
    directory: str | Path,
    *,
    backend: str | None = None,
    max_batch: int = 256,
    num_threads: int = 1,
    self_test: bool = True,
    **engine_options: Any,
) -> Engine:
    """Open a bundle directory: manifest checked, sha256 checked, one-step self-test run."""
    manifest, content = read_bundle(directory)
    model = StepModel(
        manifest, content, select(backend), max_batch=max_batch, num_threads=num_threads
    )
    if self_test:
        y, _ = model.invoke(model.encode_x(np.zeros((1, manifest.features))), model.zero_state())
        if y.shape != (1, manifest.outputs) or not np.isfinite(dequantize(y, model.y_spec)).all():
            raise BundleError(f"{directory}: self-test step gave {y!r}")
    return Engine(model, **engine_options)

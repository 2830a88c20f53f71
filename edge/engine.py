"""The in-process engine: per-stream state, exactly-once sequencing, batched stepping.

No MQTT here; ``edge.mqtt_loop`` and ``edge.processor`` are a thin shell around this class.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import snapshot as snapfmt
from .backend import select
from .errors import (
    BackendError,
    BundleError,
    ConfigError,
    DuplicateSample,
    InvalidSample,
    MissingSeq,
    SampleError,
    SequenceGap,
    SnapshotError,
    StaleSample,
    StateMismatch,
    shown,
)
from .kernels import enforce
from .manifest import Manifest, read_bundle
from .model import NP_DTYPES, StepModel, requantize
from .sequencing import GAP_POLICIES, HALF, U32, admit, earlier_boot, last_of
from .state_store import BOOT_HISTORY, GAP_SLOTS, NO_BOOT, NO_SEQ, StateStore, whole_number

MAX_STREAM_ID = 256
# The snapshot's ``extra`` keys of the evicted streams' numbering, and of those given their
# rows back that have applied nothing since.
DEPARTED, RECALLED = "departed", "recalled"
FLOAT32_MAX = float(np.finfo(np.float32).max)
_COMPLEX = (complex, np.complexfloating)
_F64 = np.dtype(np.float64)
_REAL = "fiub"  # dtype kinds the quick paths cast to float64 exactly as the general path does


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


@dataclass
class Batch:
    """What ``step_batch`` did to each chunk, as arrays with one entry per chunk (the fields
    of ``Outcome``). Chunk i's outputs are ``y[offsets[i]:offsets[i + 1]]``, one row per
    applied sample; ``seq`` is ``NO_SEQ`` where the outcome has none."""

    streams: Sequence[str]
    y: np.ndarray  # [applied samples, O] float32, chunk after chunk
    offsets: np.ndarray  # [N + 1]
    seq: np.ndarray
    duplicates: np.ndarray
    gap: np.ndarray
    late: np.ndarray
    reset: np.ndarray
    restart: np.ndarray
    errors: dict[int, SampleError]

    def __len__(self) -> int:
        return len(self.streams)

    def y_of(self, i: int) -> np.ndarray:
        return self.y[self.offsets[i] : self.offsets[i + 1]]

    def outcome(self, i: int) -> Outcome:
        seq = int(self.seq[i])
        return Outcome(
            self.streams[i],
            None if seq == NO_SEQ else seq,
            self.y_of(i),
            int(self.duplicates[i]),
            int(self.gap[i]),
            int(self.late[i]),
            bool(self.reset[i]),
            bool(self.restart[i]),
            self.errors.get(i),
        )


@dataclass
class _Plan:
    """What admission decided, per chunk (arrays), and what to record after stepping. Keys
    of ``last``/``boots``/``notes`` are stream ids, or chunk indices into ``rows``."""

    applied: np.ndarray  # samples stepped
    skip: np.ndarray  # leading duplicates skipped
    stream_of: np.ndarray  # index of the chunk's stream among this batch's streams
    first_seq: np.ndarray
    duplicates: np.ndarray
    gap: np.ndarray
    late: np.ndarray
    reset: np.ndarray  # zero the state before the chunk's first applied sample
    restart: np.ndarray
    rows: np.ndarray | None  # per chunk (fast admission: every stream once)
    last: list[tuple[str, int]]
    # (chunks with a seq or None for all, their last seq)
    last_arrays: tuple[np.ndarray | None, np.ndarray] | None
    boots: list[tuple[Any, int]]
    notes: list[tuple[Any, int, int, bool]]  # (key, first skipped seq, count, fresh)


def _u32(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, np.integer))
        and 0 <= int(value) < U32
    )


def _int_array(name: str, value: Any) -> np.ndarray:
    """int64 from integers only: floats would be truncated without a word."""
    arr = np.asarray(value)
    if arr.size and (
        arr.dtype.kind not in "iu" or (arr.dtype.kind == "u" and int(arr.max()) >= 2**63)
    ):
        raise InvalidSample(f"{name} must be integers, got {arr.dtype} values")
    return arr.astype(np.int64)


def _valid_id(stream: Any) -> bool:
    return isinstance(stream, str) and 0 < len(stream) <= MAX_STREAM_ID and stream.isprintable()


def _real_values(values: Any) -> np.ndarray:
    """float64 values, or InvalidSample naming what cannot be one: a complex value would be cast
    with its imaginary part dropped, and an int past the float range raises OverflowError."""
    if isinstance(values, np.ma.MaskedArray) and np.ma.is_masked(values):
        # np.asarray passes what lies under the mask, as if it had been measured
        raise InvalidSample("values hold masked (missing) entries; the model takes numbers")
    try:
        raw = np.asarray(values)
    except Exception as exc:  # an object's __array__ raises what it likes (torch: RuntimeError)
        raise InvalidSample(f"values are not numeric: {shown(str(exc), 200)}") from exc
    kind = raw.dtype.kind
    if kind in "mM":  # a cast gives counts of the time unit since 1970: no sensor values
        raise InvalidSample(f"values are times ({raw.dtype}), not numbers")
    if kind == "c" or (kind == "O" and any(isinstance(v, _COMPLEX) for v in raw.flat)):
        flat = raw.ravel()
        bad = next((v for v in flat if isinstance(v, _COMPLEX) and v.imag), flat[0])
        raise InvalidSample(f"value {complex(bad)} is complex; the model takes real numbers")
    try:
        return raw.astype(np.float64, copy=False)
    except OverflowError as exc:
        big = [v for v in raw.flat if isinstance(v, int) and abs(v) > FLOAT32_MAX]
        if not big:
            raise InvalidSample(f"values are not numeric: {shown(str(exc), 200)}") from exc
        raise InvalidSample(
            f"values beyond the float32 range (max |x| ~1e{int(math.log10(abs(big[0])))})"
        ) from exc
    except Exception as exc:  # an object's __float__ raises what it likes
        raise InvalidSample(f"values are not numeric: {shown(str(exc), 200)}") from exc


def input_bounds(model: StepModel) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high) per feature for a float input the runtime normalises: the raw values whose
    (x - mean) / std the model's float32 input holds. Past them it is inf, the model computes
    NaN, and the stream's state stays NaN for good. None when every float32 value is fine (a
    quantised input clips, an input not normalised is the value itself)."""
    mean, std = model.input_normalization
    if model.x_spec.quantized or mean is None or std is None:
        return None
    span = FLOAT32_MAX * (1 - 1e-6) * std
    return np.maximum(mean - span, -FLOAT32_MAX), np.minimum(mean + span, FLOAT32_MAX)


def out_of_bounds(x: np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per row of x [k, F]: whether a value lies past ``input_bounds``."""
    lo, hi = bounds
    return np.asarray(~((x >= lo) & (x <= hi)).all(axis=-1))


def float_outputs(model: StepModel) -> list[int]:
    """Indices among the binding's outputs [y, *states] of the float ones: only those can
    come out of an overflowing step as inf or NaN (an integer-quantised one saturates)."""
    specs = [model.y_spec, *model.state_out]
    return [k for k, spec in enumerate(specs) if not spec.quantized]


class _Overflow(Exception):
    """Samples a batch stepped to a non-finite answer or state (``bad``: per applied sample,
    chunk after chunk), and the refusals that makes (``errors``, by chunk)."""

    def __init__(self, bad: np.ndarray) -> None:
        super().__init__("non-finite step")
        self.bad = bad
        self.errors: dict[int, SampleError] = {}


def _plain_arrays(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read-only (zeros, falses, 0..n): the outcome arrays of a plain batch of n."""
    out = (np.zeros(n, np.int64), np.zeros(n, bool), np.arange(n + 1))
    for a in out:
        a.flags.writeable = False
    return out


def _opt(value: Any) -> int | None:
    """An int64 array entry -> int, or None for the "none" marker (NO_SEQ = NO_BOOT = -1)."""
    v = int(value)
    return None if v == NO_SEQ else v


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
        restart_gap: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if gap_policy not in GAP_POLICIES:
            raise ConfigError(f"gap_policy {shown(gap_policy)} is not one of {GAP_POLICIES}")
        if not whole_number(restart_gap) or not 0 <= restart_gap < HALF:
            raise ConfigError(
                f"restart_gap must be a whole number in 0..{HALF - 1}, got {shown(restart_gap)}"
            )
        if not isinstance(allow_unsequenced, (bool, np.bool_)):  # "no" would allow them
            raise ConfigError(
                f"allow_unsequenced must be True or False, got {shown(allow_unsequenced)}"
            )
        self.restart_gap = restart_gap
        self.model = model
        self._features = model.manifest.features  # read on every call: kept, not recounted
        self._bounds = input_bounds(model)
        self.gap_policy = gap_policy
        self.allow_unsequenced = allow_unsequenced
        self.store = StateStore(
            model.zero_state(), capacity=capacity, idle_timeout=idle_timeout, clock=clock
        )
        self.counters = Counters()
        self._no_output = np.empty((0, model.manifest.outputs), np.float32)
        self._no_output.flags.writeable = False
        # (zeros, falses, 0..n) as long as the longest plain batch, and views of them for the
        # last size asked: one set per size was kept for every size ever seen (max_batch**2
        # bytes over time, 140 MB at max_batch 4096).
        self._plain_full = self._plain_last = _plain_arrays(0)
        # The last steady batch's streams, their rows, and ``store.moves`` once they were
        # marked used: while nothing has moved since, the same streams need no lookup.
        self._steady: tuple[list[str], np.ndarray, int] | None = None
        # State outputs fed back byte for byte (no stacked layer re-encodes its state)
        self._same_bytes = not any(model.requantized)
        # Float outputs checked after each invoke: inf - inf inside the model gives NaN, and a
        # NaN state answered NaN for every later sample of the stream.
        self._float_outs = float_outputs(model)

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    # -- public API -------------------------------------------------------------------------

    def step(
        self, stream: str, x: Any, seq: int | None = None, boot: int | None = None
    ) -> np.ndarray:
        """x: [F] -> y: [O]; x: [k, F] -> y: [k, O], any k (a whole recording in one call).
        Raises a ``SampleError`` on refusal (``DuplicateSample`` for one sample applied before).
        With ``seq``, samples of ``x`` applied before (a redelivery that overlaps what the
        stream applied) are skipped: y then has a row for each of the last ``len(y)`` samples
        of ``x`` only (none when all were), so align it with ``x[len(x) - len(y):]``."""
        y = self._step_next(stream, x, seq, boot)
        if y is not None:
            return y
        out = self.step_many([Chunk(stream, x, seq, boot)])[0]
        if out.error is not None:
            raise out.error
        if np.ndim(x) == 1:
            if len(out.y) == 0:
                raise DuplicateSample("duplicate sample dropped", stream_id=stream, seq=seq)
            return np.asarray(out.y[0])
        return out.y

    def _step_next(self, stream: Any, x: Any, seq: Any, boot: Any) -> np.ndarray | None:
        """One sample of a known stream that simply continues it (next seq or none, same
        boot): the arithmetic of ``step_batch`` without its batch bookkeeping. None when the
        general path must decide."""
        store = self.store
        if type(stream) is not str or store.idle_timeout is not None:
            return None
        row = store.peek(stream)
        if row is None or stream in store.recalled:
            return None
        if seq is None:
            if not self.allow_unsequenced:
                return None
        else:
            last = int(store.last_seq[row])
            # in range first: 2**32 after 2**32 - 1 (or -1 after 2**32 - 2) is "next" modulo
            # 2**32, and was stored as the stream's last seq
            if type(seq) is not int or not 0 <= seq < U32:
                return None
            if last == NO_SEQ or (seq - last) % U32 != 1:
                return None
        if boot is not None and (type(boot) is not int or boot != store.boots[row, 0]):
            return None
        if isinstance(x, np.ma.MaskedArray):  # np.asarray drops the mask: the general path
            return None
        try:
            arr = np.asarray(x)
        except Exception:  # an object's __array__ raises what it likes: the general path says
            return None
        if arr.dtype is not _F64:  # complex, objects (an int past float), text: not here
            if arr.dtype.kind not in _REAL:
                return None
            arr = arr.astype(np.float64)
        if arr.shape != (self._features,) or not np.abs(arr).max() <= FLOAT32_MAX:
            return None
        if self._bounds is not None and out_of_bounds(arr, self._bounds):
            return None
        model = self.model
        b = model.binding
        b.bind(1)
        model.encode_x_into(arr, b.inputs[0][0])
        for arena, view in zip(store.arrays, b.inputs[1:]):
            view[0] = arena[row]
        model.run()
        if self._float_outs and not self._finite(b.outputs):
            return None  # the general path refuses it, the state untouched
        for arena, out, rq, so, si in zip(
            store.arrays, b.outputs[1:], model.requantized, model.state_out, model.state_in
        ):
            arena[row] = requantize(out[0], so, si) if rq else out[0]
        y = model.decode_y(b.outputs[0][0])
        store.touch(stream, row)
        if seq is not None:
            store.last_seq[row] = seq
        c = self.counters
        c.samples += 1
        c.steps += 1
        c.invokes += 1
        return y

    def reset(self, stream: str, *, next_seq: int | None = None, boot: int | None = None) -> None:
        """Zero the stream's state. Its last seq is kept (redeliveries stay duplicates) unless
        ``next_seq`` is given: then that seq is the next one accepted. ``boot`` makes that boot
        the stream's current one; a boot other than its current one without ``next_seq``
        forgets the last seq: the boot's next sample sets it, as a new boot's first does.
        Refused (``InvalidSample``, nothing changed) with an invalid stream id, or a
        ``next_seq`` or ``boot`` that ``step`` would refuse as a seq or boot; and
        (``StaleSample``) naming a boot the device has left, as its samples are: made current,
        it took the live boot for an earlier one, whose every later sample was then stale."""
        if not _valid_id(stream):
            raise InvalidSample(f"invalid stream id {shown(stream)}")
        for name, value in (("next_seq", next_seq), ("boot", boot)):
            if value is not None and not _u32(value):
                raise InvalidSample(
                    f"{name} {shown(value)} is not an unsigned 32-bit integer", stream_id=stream
                )
        if boot is not None:
            cur, old = self.boots(stream)
            if earlier_boot(int(boot), cur, old):
                self.counters.stale += 1
                raise StaleSample(
                    f"reset of boot {boot}, older than the stream's current boot {cur}; "
                    "nothing changed",
                    stream_id=stream,
                )
        self.store.reset(stream)
        self.counters.resets += 1
        row = self.store.peek(stream)
        if row is None and (next_seq is not None or boot is not None):
            # An evicted stream gets its last seq and boot ids back first: the reset keeps
            # them as it keeps a known stream's (a straggler of an earlier boot stays stale,
            # a redelivery a duplicate). Its state is zero, as the reset asks: no restart.
            row = int(self.store.recall([stream], np.full(1, -1, np.intp))[0])
            self.store.recalled.discard(stream)
            if row < 0:
                row = int(self.store.acquire([stream])[0])
        if row is not None and next_seq is None and boot is not None:
            current = int(self.store.boots[row, 0])
            if current not in (NO_BOOT, boot):  # a new boot numbers anew: its next seq is the
                self.store.last_seq[row] = NO_SEQ  # baseline, as a new boot's first message's
                self.store.gaps[row] = 0
        if row is not None and next_seq is not None:  # a new numbering: old gaps mean nothing
            self.store.last_seq[row] = (int(next_seq) - 1) % U32
            self.store.gaps[row] = 0
        if row is not None and boot is not None:
            self.store.set_boot(row, int(boot))

    def _known(self, stream: Any) -> int | None:
        """The row of a stream, None for one without (or an id no stream can have: a list
        is unhashable, and raised TypeError from the lookup)."""
        return self.store.peek(stream) if isinstance(stream, str) else None

    def last_seq(self, stream: str) -> int | None:
        row = self._known(stream)
        if row is None or self.store.last_seq[row] == NO_SEQ:
            return None
        return int(self.store.last_seq[row])

    def boots(self, stream: str) -> tuple[int | None, list[int]]:
        """(current boot id or None, earlier boot ids) of a stream. An evicted stream kept its
        current boot (not its earlier ones): its next sample is admitted in that boot."""
        row = self._known(stream)
        if row is not None:
            return self.store.boot_of(row)
        kept = self.store.departed.peek(stream) if isinstance(stream, str) else None
        return (None, []) if kept is None or kept[1] == NO_BOOT else (kept[1], [])

    def state_of(self, stream: str) -> list[np.ndarray] | None:
        row = self._known(stream)
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
        """All streams' state, last seq, boot ids and idle time, atomically (``edge.snapshot``).

        A failed write leaves ``path`` as it was and raises ``SnapshotError`` naming it.
        ``extra`` (given back by ``restore``) must be JSON without NaN or infinities, and may
        not use the keys the engine keeps its own records under (``departed``, ``recalled``).
        """
        self.take_snapshot(path, extra)()

    def take_snapshot(
        self, path: str | Path, extra: dict[str, Any] | None = None
    ) -> Callable[[], None]:
        """``snapshot`` in two: the state is copied now (array copies, cheap), and the returned
        call encodes, writes and fsyncs that copy, the slow part, which may run in another
        thread while this engine steps on. Bad ``extra`` raises here, nothing written."""
        if "\0" in str(path):  # no file name holds one; the write raised ValueError
            raise SnapshotError(f"{shown(path)}: the path holds a NUL character. Nothing written")
        snap = self.capture(extra, path)

        def write() -> None:
            try:
                snapfmt.write_atomic(path, snapfmt.chunks(snap))
            except OSError as exc:
                reason = exc.strerror or exc
                raise SnapshotError(f"{path}: cannot write snapshot: {reason}") from exc

        return write

    def capture(self, extra: dict[str, Any] | None, path: str | Path) -> snapfmt.Snapshot:
        """A copy of what a snapshot holds, ``extra`` checked (errors name ``path``)."""
        if not isinstance(extra, (Mapping, type(None))) or any(
            not isinstance(k, str) for k in extra or {}
        ):
            # JSON would turn a key 1 into "1": restore would give back another dict
            raise SnapshotError(
                f"{path}: extra must be a dict with string keys, got {shown(extra, 60)}. "
                "Nothing written"
            )
        extra = dict(extra or {})
        taken = sorted(k for k in (DEPARTED, RECALLED) if k in extra)
        if taken:
            raise SnapshotError(
                f"{path}: extra key {shown(taken[0])} is the engine's own (its evicted streams); "
                "name it otherwise. Nothing written"
            )
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"{path}: extra is not plain JSON: {exc}. Nothing written") from exc
        streams, last_seq, arrays, boots, gaps = self.store.export()
        kept = {DEPARTED: self.store.departed.export(), RECALLED: sorted(self.store.recalled)}
        return snapfmt.Snapshot(
            self.manifest.model_sha256,
            [list(x) for x in self.manifest.state_layout()],
            streams,
            last_seq,
            arrays,
            {**extra, **{k: v for k, v in kept.items() if v}},
            boots,
            gaps,
            self.store.idle_seconds(),
        )

    def restore(
        self, path: str | Path, *, fresh_on_mismatch: bool = False, other_model_ok: bool = False
    ) -> dict[str, Any]:
        """Load a snapshot of this model. Returns its ``extra`` dict.

        A snapshot of another model or state layout is refused, unless ``fresh_on_mismatch``,
        which starts with no streams instead. ``other_model_ok`` accepts another model with
        the same state layout (an updated bundle keeps its streams, as on hot reload).
        A snapshot of more streams than ``capacity`` keeps the most recently used ones; the
        others are evicted (numbering kept, as any eviction).
        """
        snap = snapfmt.read(path)
        layout = [list(x) for x in self.manifest.state_layout()]
        problem = None
        if snap.state_layout != layout:
            problem = (
                f"it was taken with model {snap.model_sha256[:12]}..., whose state layout "
                f"{snap.state_layout} differs from this one's {layout}"
            )
        elif not other_model_ok and snap.model_sha256 not in (
            self.manifest.model_sha256,
            self.manifest.tflite_sha256,  # a snapshot of an edge-lstm that knew only the file's
        ):
            problem = (
                f"it was taken with model {snap.model_sha256[:12]}..., this engine runs "
                f"{self.manifest.model_id}..."
            )
        if problem:
            if fresh_on_mismatch:
                self.store.load([], np.empty(0, np.int64), [a[:0] for a in self.store.arrays])
                return {}
            raise StateMismatch(f"{path}: cannot restore: {problem}")
        self.store.load(snap.streams, snap.last_seq, snap.arrays, snap.boots, snap.gaps, snap.idle)
        extra = dict(snap.extra)
        recalled = extra.pop(RECALLED, None) or []
        try:
            self.store.departed.load(extra.pop(DEPARTED, None))
            if not isinstance(recalled, list) or not all(isinstance(s, str) for s in recalled):
                raise TypeError(f"{RECALLED!r} is not a list of stream ids")
        except (ValueError, TypeError, zlib.error) as exc:  # binascii.Error is a ValueError
            raise SnapshotError(f"{path}: malformed table of evicted streams: {exc}") from exc
        self.store.recalled = {s for s in recalled if s in self.store}
        self.store.depart_shed()  # a snapshot of more streams than this engine's capacity
        return extra

    def load_state_from(self, other: Engine) -> None:
        """Carry every stream over from another engine with the same state layout."""
        if other.manifest.state_layout() != self.manifest.state_layout():
            raise BundleError("state layouts differ; the streams cannot be carried over")
        self.store.load(*other.store.export())
        self.store.seen_as(other.store)
        # Copies: shared, a stream that came back to one engine was forgotten by the other's
        # table, which then stepped that stream's old samples a second time.
        self.store.departed.load(other.store.departed.export())
        self.store.recalled = {s for s in other.store.recalled if s in self.store}
        self.store.depart_shed()  # a smaller capacity than the other's, as in ``restore``

    def load_numbering_from(self, other: Engine) -> None:
        """Carry every stream's numbering (last seq, boot ids, gaps, evicted streams) over
        from an engine of another state layout, with the zero state: a sample applied before
        is still a duplicate, and a stream's first sample applied here says ``restart``."""
        streams, last_seq, _, boots, gaps = other.store.export()
        zeros = [np.repeat(z[None], len(streams), axis=0) for z in self.store.zero_row]
        self.store.load(streams, last_seq, zeros, boots, gaps)
        self.store.seen_as(other.store)
        self.store.departed.load(other.store.departed.export())
        self.store.recalled = set(self.store.streams)
        self.store.depart_shed()

    # -- stepping ---------------------------------------------------------------------------

    def step_many(self, items: Iterable[Chunk] | Mapping[str, Any]) -> list[Outcome]:
        """Advance many streams with as few invokes as possible (see ``step_batch``); one
        ``Outcome`` per chunk. Chunks are applied in the order given."""
        if isinstance(items, Mapping):
            items = [Chunk(s, v) for s, v in items.items()]
        chunks = list(items)
        for c in chunks:
            if not isinstance(c, Chunk):
                raise InvalidSample(
                    f"step_many takes Chunk objects or a mapping of stream -> values, "
                    f"got {type(c).__name__} {shown(c, 60)}"
                )
        n = len(chunks)
        f = self._features
        streams: list[Any] = [c.stream for c in chunks]
        seqs = np.full(n, NO_SEQ, np.int64)
        boots = np.full(n, NO_BOOT, np.int64)
        counts = np.zeros(n, np.int64)
        parts: list[np.ndarray] = []
        errors: dict[int, SampleError] = {}
        for i, c in enumerate(chunks):
            try:
                arr = self._chunk_values(c)
            except SampleError as err:
                errors[i] = err
                continue
            parts.append(arr)
            counts[i] = len(arr)
            if c.seq is not None:
                seqs[i] = c.seq
            if c.boot is not None:
                boots[i] = c.boot
        x = np.concatenate(parts) if parts else np.empty((0, f))
        batch = None
        if not errors and len(x) == n:  # one sample each: perhaps the steady batch
            batch = self._step_steady(streams, x, seqs, boots)
        if batch is None:
            batch = self._step_arrays(streams, x, counts, seqs, boots, errors)
        outcomes = [batch.outcome(i) for i in range(n)]
        for i in batch.errors:  # the seq as given, even one refused as invalid
            outcomes[i].seq = chunks[i].seq
        return outcomes

    def step_batch(
        self,
        streams: Sequence[str],
        values: Any,
        *,
        counts: Any = None,
        seqs: Any = None,
        boots: Any = None,
    ) -> Batch:
        """Advance many streams, the whole batch as arrays.

        Chunk i is ``counts[i]`` consecutive rows of ``values`` (``[total, F]``; one row per
        chunk when ``counts`` is None) for ``streams[i]``, its first sample numbered
        ``seqs[i]`` (``NO_SEQ`` = unsequenced; None: all unsequenced), from device boot
        ``boots[i]`` (``NO_BOOT`` = none). Chunks apply in the order given, a stream's samples
        in order; round r steps the r-th pending sample of every stream in one invoke. A chunk
        may hold any number of samples. A refused chunk is reported in ``Batch.errors`` and
        changes nothing. More than ``capacity`` streams in one call: ``ConfigError``, nothing
        changed."""
        n = len(streams)
        f = self._features
        if counts is None and seqs is not None:
            batch = self._step_steady(streams, values, seqs, boots)
            if batch is not None:
                return batch
        x = _real_values(values)
        if x.ndim == 1 and n == 1 and counts is None:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != f:
            raise InvalidSample(f"values have shape {x.shape}, expected [total, {f}]")
        cnt = np.ones(n, np.int64) if counts is None else _int_array("counts", counts)
        sq = np.full(n, NO_SEQ, np.int64) if seqs is None else _int_array("seqs", seqs)
        bt = np.full(n, NO_BOOT, np.int64) if boots is None else _int_array("boots", boots)
        for name, arr in (("counts", cnt), ("seqs", sq), ("boots", bt)):
            if arr.shape != (n,):
                raise InvalidSample(f"{name} has shape {arr.shape}, expected ({n},)")
        if n and (bt.min() < NO_BOOT or bt.max() >= U32):
            bad = int(bt[(bt < NO_BOOT) | (bt >= U32)][0])
            raise InvalidSample(f"boot {bad} is not an unsigned 32-bit integer (or NO_BOOT)")
        if n and cnt.min() < 0:
            i = int(np.flatnonzero(cnt < 0)[0])
            raise InvalidSample(f"count {int(cnt[i])} of chunk {i} is negative")
        total = int(cnt.sum())
        if n and int(cnt.max()) > len(x):  # then the int64 sum may have wrapped around
            total = sum(cnt.tolist())
        if total != len(x):
            raise InvalidSample(f"counts add up to {total}, values have {len(x)} rows")
        errors: dict[int, SampleError] = {}
        return self._step_arrays(streams, x, cnt, sq, bt, errors)

    def _step_steady(
        self, streams: Sequence[str], values: Any, seqs: Any, boots: Any
    ) -> Batch | None:
        """The service's steady batch in as few array operations as possible: one sample
        for each of ``streams`` (all known, all different), each the next seq of its stream,
        no boot change, every value in range. Exactly what the general path would do; None
        when it must decide."""
        n = len(streams)
        store = self.store
        f = self._features
        if not n or n > self.model.max_batch or store.idle_timeout is not None:
            return None
        found = self._steady_rows(streams)
        if found is None or (store.recalled and not store.recalled.isdisjoint(streams)):
            return None
        rows, moved = found
        if isinstance(values, np.ma.MaskedArray):  # np.asarray drops the mask: general path
            return None
        try:
            x = np.asarray(values)
        except Exception:  # an object's __array__ raises what it likes: the general path says
            return None
        if x.dtype is not _F64:  # complex, objects (an int past float), text: not here
            if x.dtype.kind not in _REAL:
                return None
            x = x.astype(np.float64)
        sq = np.asarray(seqs)
        if sq.dtype != np.int64:  # the general path converts, or refuses, anything else
            return None
        if x.shape != (n, f) or sq.shape != (n,):
            return None
        prev = sq - 1
        # every seq in 1 .. 2**32 - 1: its predecessor read unsigned (a negative one is huge)
        unsequenced = int(prev.view(np.uint64).max()) >= U32 - 1
        if not unsequenced:  # each the next of its stream: a start, gap, replay or wrap is not
            if prev.tobytes() != store.last_seq.take(rows).tobytes():  # (==).all(), quicker
                return None
        else:  # all without seq: nothing to admit, no boots to look at
            if sq.max() != NO_SEQ or not self.allow_unsequenced or sq.min() != NO_SEQ:
                return None  # a seq past 32 bits, seq 0, or -5 (no "none" mark)
            if boots is not None:  # ... once the general path would not refuse one
                bt = np.asarray(boots)
                if bt.dtype != np.int64 or bt.shape != (n,):
                    return None
                if bt.min() < NO_BOOT or bt.max() >= U32:
                    return None
            boots = None
        if boots is not None:
            bt = np.asarray(boots)
            if bt.shape != (n,) or bt.dtype != np.int64:
                return None
            if bt.max() != NO_BOOT:  # each the stream's current boot, or none
                same = bt == store.boots[rows, 0]
                if not same.all() and not (same | (bt == NO_BOOT)).all():
                    return None
        if not np.abs(x).max() <= FLOAT32_MAX:
            return None
        if self._bounds is not None and out_of_bounds(x, self._bounds).any():
            return None
        if moved:
            store.touch_many(streams, rows)
            self._steady = (list(streams), rows, store.moves)
        else:  # the most recently used already, in this order
            store.stamp(rows)
        model = self.model
        b = model.binding
        b.bind(n)
        model.encode_x_into(x, b.inputs[0])
        for rec, view in zip(store.records, b.state_in):  # whole rows, as one item each
            rec.take(rows, out=view)
        model.run()
        if self._float_outs and not self._finite(b.outputs):
            return None  # the general path refuses the stream, the others go on
        if self._same_bytes:
            for rec, out in zip(store.records, b.state_out):
                rec.put(rows, out)
        else:
            for arena, out, rq, so, si in zip(
                store.arrays, b.outputs[1:], model.requantized, model.state_out, model.state_in
            ):
                arena[rows] = requantize(out, so, si) if rq else out
        y = model.decode_y(b.outputs[0])
        if not unsequenced:
            store.last_seq[rows] = sq
        c = self.counters
        c.samples += n
        c.steps += n
        c.invokes += 1
        zeros, no, offsets = self._plain(n)
        return Batch(streams, y, offsets, sq, zeros, zeros, zeros, no, no, {})

    def _steady_rows(self, streams: Sequence[str]) -> tuple[np.ndarray, bool] | None:
        """(rows, whether they must be marked used) of a batch's streams, all known and all
        different; None otherwise. The last steady batch's streams again, with nothing moved
        since, are the most recently used already, in this order."""
        seen = self._steady
        if seen is not None and seen[2] == self.store.moves and type(streams) is list:
            try:
                if streams == seen[0]:
                    return seen[1], False
            except (TypeError, ValueError):  # an id compared as an array (general path)
                return None
        rows = self.store.rows_of(streams)
        if rows is None or len(set(streams)) != len(streams):
            return None
        return rows, True

    def _plain(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read-only (zeros, falses, 0..n) for the outcome arrays of a plain batch of n."""
        got = self._plain_last
        if len(got[1]) != n:
            full = self._plain_full
            if len(full[1]) < n:
                full = self._plain_full = _plain_arrays(n)
            got = self._plain_last = (full[0][:n], full[1][:n], full[2][: n + 1])
        return got

    def _chunk_values(self, chunk: Chunk) -> np.ndarray:
        """One chunk's checks that need its Python objects (the rest run on the whole batch),
        in the order a refusal names them: stream id, seq, values."""
        stream, seq = chunk.stream, chunk.seq
        if not _valid_id(stream):
            raise InvalidSample(f"invalid stream id {shown(stream)}", stream_id=None, seq=seq)
        if seq is None and not self.allow_unsequenced:
            raise MissingSeq(
                "sample has no seq; this engine needs sequenced streams", stream_id=stream
            )
        if seq is not None and not _u32(seq):
            raise InvalidSample(
                f"seq {shown(seq)} is not an unsigned 32-bit integer", stream_id=stream
            )
        if chunk.boot is not None and not _u32(chunk.boot):
            raise InvalidSample(
                f"boot {shown(chunk.boot)} is not an unsigned 32-bit integer",
                stream_id=stream,
                seq=seq,
            )
        try:
            arr = _real_values(chunk.values)
        except InvalidSample as exc:
            raise InvalidSample(str(exc), stream_id=stream, seq=seq) from exc.__cause__
        f = self._features
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != f:
            raise InvalidSample(
                f"values have shape {np.shape(chunk.values)}, expected [{f}] or [k, {f}]",
                stream_id=stream,
                seq=seq,
            )
        return arr

    def _step_arrays(
        self,
        streams: Sequence[Any],
        x: np.ndarray,
        cnt: np.ndarray,
        sq: np.ndarray,
        bt: np.ndarray,
        errors: dict[int, SampleError],
    ) -> Batch:
        """Check, admit, step and record a batch (``errors``: chunks refused already). A chunk
        a float model overflows on is refused, and the batch stepped again without it: its
        stream's state is the one before the chunk, as for any refused chunk."""
        if not self._float_outs:
            return self._step_once(streams, x, cnt, sq, bt, errors)
        given, counters = dict(errors), replace(self.counters)
        while True:
            try:
                return self._step_once(streams, x, cnt, sq, bt, errors)
            except _Overflow as exc:  # rare: nothing recorded, every state as it was
                self.counters = replace(counters)
                errors = {**given, **exc.errors}

    def _step_once(
        self,
        streams: Sequence[Any],
        x: np.ndarray,
        cnt: np.ndarray,
        sq: np.ndarray,
        bt: np.ndarray,
        errors: dict[int, SampleError],
    ) -> Batch:
        """``_step_arrays`` for one set of refused chunks; ``_Overflow`` when the model
        overflowed on a sample, with the chunks to refuse."""
        n = len(streams)
        cap = self.store.capacity
        if n > cap:  # refused before anything changes: no eviction, no count
            ids = {s for i, s in enumerate(streams) if type(s) is str and i not in errors}
            if len(ids) > cap and (wide := sum(map(_valid_id, ids))) > cap:
                raise ConfigError(
                    f"{wide} streams in one batch exceed the state capacity {cap}; "
                    "lower the batch size or raise the capacity"
                )
        self.store.evict_idle()
        try:
            rows = self.store.lookup(streams)
        except TypeError:  # an unhashable stream id: refused below like any invalid one
            get = self.store.peek
            found = [get(s) if isinstance(s, str) else None for s in streams]
            rows = np.array([-1 if r is None else r for r in found], np.intp)
        rows = self.store.recall(streams, rows)
        self._check(streams, x, cnt, sq, rows, errors)
        if errors:
            self.counters.rejected += len(errors)
        ok = np.ones(n, bool)
        if errors:
            ok[list(errors)] = False
        self.counters.samples += int(cnt[ok].sum())
        plan = self._admit_fast(streams, cnt, sq, bt, rows, ok)
        if plan is None:
            plan = self._admit_each(streams, cnt, sq, bt, ok, errors)
        recalled = set(self.store.recalled) if self._float_outs else set()
        if self.store.recalled:
            self._restart_recalled(streams, plan)
        try:
            return self._apply(streams, x, cnt, sq, plan, errors)
        except _Overflow as exc:  # as before this call, for the batch to be stepped again
            self.store.recalled = {s for s in recalled if s in self.store}
            exc.errors = self._overflow_errors(streams, sq, plan, exc.bad)
            raise

    def _overflow_errors(
        self, streams: Sequence[Any], sq: np.ndarray, plan: _Plan, bad: np.ndarray
    ) -> dict[int, SampleError]:
        """The refusal of each stream's first chunk holding a sample the model overflowed on
        (``bad``: per applied sample, chunk after chunk). A later chunk of that stream was
        stepped from the broken state: it is judged again."""
        ends = np.cumsum(plan.applied)
        errors: dict[int, SampleError] = {}
        seen: set[int] = set()
        for r in np.flatnonzero(bad).tolist():
            i = int(np.searchsorted(ends, r, "right"))
            if int(plan.stream_of[i]) in seen:
                continue
            seen.add(int(plan.stream_of[i]))
            k = r - int(ends[i] - plan.applied[i])  # among the chunk's applied samples
            where = "this sample"
            if plan.applied[i] + plan.skip[i] > 1:
                where = f"sample {int(plan.skip[i]) + k} of the chunk"
                if sq[i] != NO_SEQ:
                    where += f" (seq {(int(plan.first_seq[i]) + k) % U32})"
            errors[i] = InvalidSample(
                f"the model's computation overflowed on {where}: values too large for the "
                "model (its answer or state was not finite); the stream's state is kept",
                stream_id=streams[i],
                seq=_opt(sq[i]),
            )
        return errors

    def _restart_recalled(self, streams: Sequence[Any], plan: _Plan) -> None:
        """The first samples an evicted stream applies once back start from the zero state:
        its answer says ``restart`` (a duplicate it sent first does not count)."""
        recalled = self.store.recalled
        plan.restart = plan.restart.copy()  # the fast plan shares one array of False
        for i in np.flatnonzero(plan.applied > 0).tolist():
            if streams[i] in recalled:
                recalled.discard(streams[i])
                plan.restart[i] = True

    def _check(
        self,
        streams: Sequence[Any],
        x: np.ndarray,
        cnt: np.ndarray,
        sq: np.ndarray,
        rows: np.ndarray,
        errors: dict[int, SampleError],
    ) -> None:
        """The batch-wide refusals, in the order a refusal names them: stream id, seq, length,
        values. A stream with a row was checked when it got it."""
        if not len(streams):
            return
        if rows.min() < 0:
            for i in np.flatnonzero(rows < 0).tolist():
                if i not in errors and not _valid_id(streams[i]):
                    msg = f"invalid stream id {shown(streams[i])}"
                    errors[i] = InvalidSample(msg, stream_id=None, seq=_opt(sq[i]))
        lo, hi = int(sq.min()), int(sq.max())
        if lo <= NO_SEQ and not self.allow_unsequenced:  # below it: an invalid seq is lowest
            for i in np.flatnonzero(sq == NO_SEQ).tolist():
                errors.setdefault(
                    i,
                    MissingSeq(
                        "sample has no seq; this engine needs sequenced streams",
                        stream_id=streams[i],
                    ),
                )
        if lo < NO_SEQ or hi >= U32:
            for i in np.flatnonzero((sq < NO_SEQ) | (sq >= U32)).tolist():
                msg = f"seq {int(sq[i])} is not an unsigned 32-bit integer"
                errors.setdefault(i, InvalidSample(msg, stream_id=streams[i]))
        if cnt.min() < 1:
            for i in np.flatnonzero(cnt < 1).tolist():
                msg = "no samples in the chunk, expected at least 1"
                errors.setdefault(i, InvalidSample(msg, stream_id=streams[i], seq=_opt(sq[i])))
        if self._bounds is not None and len(x):
            self._check_bounds(streams, x, cnt, sq, errors, self._bounds)
        if not len(x) or np.abs(x).max() <= FLOAT32_MAX:  # NaN compares false: it fails too
            return
        peak = np.abs(x).max(axis=1)
        ends = np.cumsum(cnt)
        for i in np.unique(np.searchsorted(ends, np.flatnonzero(~(peak <= FLOAT32_MAX)), "right")):
            i = int(i)
            part = x[ends[i] - cnt[i] : ends[i]]
            if not np.isfinite(part).all():
                err = InvalidSample(
                    "values contain NaN or Inf", stream_id=streams[i], seq=_opt(sq[i])
                )
            else:  # the model computes in float32 at most
                err = InvalidSample(
                    f"values beyond the float32 range (max |x| {np.abs(part).max():.3g})",
                    stream_id=streams[i],
                    seq=_opt(sq[i]),
                )
            errors.setdefault(i, err)

    def _check_bounds(
        self,
        streams: Sequence[Any],
        x: np.ndarray,
        cnt: np.ndarray,
        sq: np.ndarray,
        errors: dict[int, SampleError],
        bounds: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Chunks holding a value the normalised float32 input cannot hold (see
        ``input_bounds``); NaN and values past float32 itself are named by ``_check``."""
        bad = out_of_bounds(x, bounds) & (np.abs(x).max(axis=1) <= FLOAT32_MAX)
        if not bad.any():
            return
        ends = np.cumsum(cnt)
        mean, std = self.model.input_normalization
        assert mean is not None and std is not None, "bounds come with a normalisation"
        for r in np.flatnonzero(bad).tolist():
            i = int(np.searchsorted(ends, r, "right"))
            row = x[r]
            j = int(np.flatnonzero((row < bounds[0]) | (row > bounds[1]))[0])
            errors.setdefault(
                i,
                InvalidSample(
                    f"value {row[j]:.6g} of feature {j} is past what the model's float32 input "
                    f"holds once normalised (mean {mean[j]:.6g}, std {std[j]:.6g})",
                    stream_id=streams[i],
                    seq=_opt(sq[i]),
                ),
            )

    def _admit_fast(
        self,
        streams: Sequence[Any],
        cnt: np.ndarray,
        sq: np.ndarray,
        bt: np.ndarray,
        rows: np.ndarray,
        ok: np.ndarray,
    ) -> _Plan | None:
        """The common batch, admitted with array arithmetic: every stream once, every seq
        ahead of the stream's last one, no boot change. None: admit chunk by chunk instead."""
        n = len(streams)
        if n > 1:
            try:
                if len(set(streams)) != n:
                    return None
            except TypeError:
                return None
        store = self.store
        if n and ok.all() and rows.min() >= 0 and sq.min() >= 0:  # the steady state, quickly
            last = store.last_seq[rows]
            ahead = (sq - last) % U32
            if (
                last.min() != NO_SEQ
                and ahead.min() == 1
                and ahead.max() == 1
                and (bt.max() == NO_BOOT or ((bt == store.boots[rows, 0]) | (bt == NO_BOOT)).all())
            ):
                zeros = np.zeros(n, np.int64)
                no = np.zeros(n, bool)
                return _Plan(
                    applied=cnt,
                    skip=zeros,
                    stream_of=np.arange(n),
                    first_seq=sq,
                    duplicates=zeros,
                    gap=zeros,
                    late=zeros,
                    reset=no,
                    restart=no,
                    rows=rows,
                    last=[],
                    last_arrays=(None, (sq + cnt - 1) % U32),
                    boots=[],
                    notes=[],
                )
        known = rows >= 0
        safe = np.where(known, rows, 0) if len(store.last_seq) else None
        last = np.full(n, NO_SEQ, np.int64) if safe is None else store.last_seq[safe]
        last[~known] = NO_SEQ
        seq_on = ok & (sq != NO_SEQ)
        cont = seq_on & (last != NO_SEQ)
        ahead = (sq - last) % U32
        if (cont & ((ahead == 0) | (ahead >= HALF))).any():
            return None  # duplicates, replays, restarts: chunk by chunk
        gap = np.where(cont, ahead - 1, 0)
        gapped = gap > 0
        any_gap = bool(gapped.any())
        if any_gap and self.gap_policy == "reject":
            return None
        set_boot = np.zeros(n, bool)
        with_boot = seq_on & (bt != NO_BOOT)
        if with_boot.any():
            cur = np.full(n, NO_BOOT, np.int64) if safe is None else store.boots[safe, 0]
            cur[~known] = NO_BOOT
            if (with_boot & (cur != NO_BOOT) & (bt != cur)).any():
                return None  # a new or an earlier boot: chunk by chunk
            set_boot = with_boot & (cur == NO_BOOT)
        reset = gapped & (self.gap_policy == "reset")
        if any_gap:
            self.counters.gaps += int(gapped.sum())
            self.counters.gap_resets += int(reset.sum())
        zeros = np.zeros(n, np.int64)
        notes: list[tuple[int, int, int, bool]] = []  # (chunk, first skipped seq, count, fresh)
        for i in np.flatnonzero(seq_on & ~cont).tolist():  # a stream starting here
            notes.append((i, (int(sq[i]) - HALF + 1) % U32, HALF - 1, True))
        for i in np.flatnonzero(gapped).tolist():
            notes.append((i, (int(sq[i]) - int(gap[i])) % U32, int(gap[i]), False))
        boots = [(i, int(bt[i])) for i in np.flatnonzero(set_boot).tolist()]
        return _Plan(
            applied=np.where(ok, cnt, 0),
            skip=zeros,
            stream_of=np.arange(n),
            first_seq=sq,
            duplicates=zeros,
            gap=gap,
            late=zeros,
            reset=reset,
            restart=np.zeros(n, bool),
            rows=rows,
            last=[],
            last_arrays=(seq_on, (sq + cnt - 1) % U32),
            boots=boots,
            notes=notes,
        )

    def _admit_each(
        self,
        streams: Sequence[Any],
        cnt: np.ndarray,
        sq: np.ndarray,
        bt: np.ndarray,
        ok: np.ndarray,
        errors: dict[int, SampleError],
    ) -> _Plan:
        """Admission chunk by chunk: duplicates, replays, restarts, boots, a stream more than
        once. Nothing is written to the store here; ``_apply`` records it after stepping."""
        n = len(streams)
        applied = np.zeros(n, np.int64)
        skip = np.zeros(n, np.int64)
        first_seq = sq.copy()
        dups = np.zeros(n, np.int64)
        gaps = np.zeros(n, np.int64)
        late = np.zeros(n, np.int64)
        reset = np.zeros(n, bool)
        restart = np.zeros(n, bool)
        stream_of = np.zeros(n, np.int64)
        index: dict[str, int] = {}
        last: dict[str, int | None] = {}
        boots: dict[str, list[int]] = {}  # each stream's boots in this batch, in order
        notes: list[tuple[str, int, int, bool]] = []
        for i in range(n):
            if not ok[i]:
                continue
            stream = streams[i]
            stream_of[i] = index.setdefault(stream, len(index))
            seq = _opt(sq[i])
            count = int(cnt[i])
            if seq is None:
                applied[i] = count
                continue
            if stream not in last:
                last[stream] = self.last_seq(stream)
            boot = _opt(bt[i])
            is_restart = False
            if boot is not None:
                cur, old = self._boot_of(stream, boots)
                if earlier_boot(boot, cur, old):
                    self.counters.stale += 1
                    errors[i] = StaleSample(
                        f"boot {boot} is older than the stream's current boot {cur}",
                        stream_id=stream,
                        seq=seq,
                    )
                    continue
                is_restart = cur is not None and boot != cur and last[stream] is not None
                boots.setdefault(stream, []).append(boot)
            prev = last[stream]
            if not is_restart and self.restart_gap and prev is not None:
                behind = (prev - seq) % U32  # 2**31: as far behind as ahead, admitted as behind
                is_restart = self.restart_gap < behind <= HALF
            if is_restart:
                self.counters.restarts += 1
                last[stream] = None
            start = last[stream] is None
            adm = admit(last[stream], seq, count)
            self.counters.duplicates += adm.duplicates
            dups[i] = adm.duplicates
            if adm.duplicates:
                late[i] = self._late(stream, seq, adm.duplicates, notes)
            if adm.first_new is None:
                continue
            if start:  # it starts here: anything before it arrives too late
                notes.append((stream, (adm.first_new - HALF + 1) % U32, HALF - 1, True))
            if adm.gap:
                self.counters.gaps += 1
                gaps[i] = adm.gap
                if self.gap_policy == "reject":
                    self.counters.rejected += 1
                    errors[i] = SequenceGap(
                        f"{adm.gap} sample(s) missing before this one (gap policy 'reject')",
                        stream_id=stream,
                        seq=seq,
                    )
                    continue
                if self.gap_policy == "reset":
                    reset[i] = True
                    self.counters.gap_resets += 1
                notes.append((stream, (adm.first_new - adm.gap) % U32, adm.gap, False))
            first_seq[i] = adm.first_new
            skip[i] = adm.duplicates
            applied[i] = count - adm.duplicates
            last[stream] = last_of(adm.first_new, int(applied[i]))
            reset[i] |= is_restart
            restart[i] = is_restart
        return _Plan(
            applied=applied,
            skip=skip,
            stream_of=stream_of,
            first_seq=first_seq,
            duplicates=dups,
            gap=gaps,
            late=late,
            reset=reset,
            restart=restart,
            rows=None,
            last=[(s, q) for s, q in last.items() if q is not None],
            last_arrays=None,
            boots=[(s, b) for s, seen in boots.items() for b in seen],
            notes=notes,
        )

    def _apply(
        self,
        streams: Sequence[Any],
        x: np.ndarray,
        cnt: np.ndarray,
        seq_out: np.ndarray,
        plan: _Plan,
        errors: dict[int, SampleError],
    ) -> Batch:
        """Step what the plan admits, then record last seqs, boots and gaps in the store."""
        n = len(streams)
        applied = plan.applied
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(applied, out=offsets[1:])
        total = int(offsets[-1])
        stepped = applied > 0
        if not total:
            y = self._no_output
        else:
            if total == len(x):
                xa = x
            else:  # the applied rows of each chunk: after its duplicates, none of a refused one
                ends = np.cumsum(cnt)
                keep = np.zeros(len(x), bool)
                for i in np.flatnonzero(stepped).tolist():
                    a = int(ends[i] - cnt[i] + plan.skip[i])
                    keep[a : a + int(applied[i])] = True
                xa = x[keep]
            y = self._step_streams(streams, xa, applied, stepped, plan)
        store = self.store
        if plan.last_arrays is not None and plan.rows is not None and total:
            seq_on, last = plan.last_arrays
            if seq_on is None:
                store.last_seq[plan.rows] = last
            else:
                done = seq_on & stepped
                store.last_seq[plan.rows[done]] = last[done]
        elif total:
            for stream, q in plan.last:
                row = store.peek(stream)
                if row is not None:
                    store.last_seq[row] = q
        for key, boot in plan.boots:
            row = self._row(plan, key)
            if row is not None:
                store.set_boot(row, boot)
        for key, first, count, fresh in plan.notes:
            row = self._row(plan, key)
            if row is not None:
                store.note_gap(row, first, count, fresh=fresh)
        return Batch(
            streams,
            y,
            offsets,
            np.where(stepped, plan.first_seq, seq_out),
            plan.duplicates,
            plan.gap,
            plan.late,
            plan.reset & stepped,
            plan.restart & stepped,
            errors,
        )

    def _row(self, plan: _Plan, key: Any) -> int | None:
        """The row of a plan's key: a stream id, or a chunk index into ``plan.rows``."""
        if isinstance(key, str) or plan.rows is None:
            return self.store.peek(key)
        return int(plan.rows[key])

    def _step_streams(
        self,
        streams: Sequence[Any],
        xa: np.ndarray,
        applied: np.ndarray,
        stepped: np.ndarray,
        plan: _Plan,
    ) -> np.ndarray:
        """Group the applied samples by stream, acquire rows, advance, and give back y in the
        order of ``xa`` (chunk after chunk)."""
        model = self.model
        n = len(stepped)
        if plan.rows is not None and len(xa) == n <= self.store.capacity and stepped.all():
            # Fast admission, one sample per stream, all known: no grouping to do.
            names = list(streams)
            known = plan.rows.copy() if self._float_outs else plan.rows
            rows = plan.rows[:] = self.store.acquire(names, plan.rows)
            zero = plan.reset if plan.reset.any() else None
            xq = model.encode_x(xa)
            return model.decode_y(self._guarded(names, known, rows, applied, xq, zero))
        chunks = np.flatnonzero(stepped)
        # Streams numbered densely among the stepped chunks (in order of first appearance):
        # a stream whose chunks were all refused or duplicates has no samples to step.
        _, u_of_chunk = np.unique(plan.stream_of[chunks], return_inverse=True)
        u_of_chunk = u_of_chunk.reshape(-1)
        n_streams = int(u_of_chunk.max()) + 1 if len(chunks) else 0
        firsts = np.full(n_streams, -1, np.int64)
        firsts[u_of_chunk[::-1]] = chunks[::-1]  # each stream's first chunk
        names = [streams[int(i)] for i in firsts]
        assert n_streams <= self.store.capacity, "a wider batch is refused by _step_arrays"
        known = None if plan.rows is None else plan.rows[firsts]
        if known is None:
            known = self.store.lookup(names)
        rows = self.store.acquire(names, known)
        if plan.rows is not None:
            plan.rows[firsts] = rows
        lengths = np.bincount(u_of_chunk, weights=plan.applied[chunks], minlength=n_streams)
        lengths = lengths.astype(np.int64)
        zero_first = plan.reset[chunks]
        grouped = n_streams == len(chunks) and bool((np.diff(u_of_chunk) > 0).all())
        starts_c = np.zeros(len(chunks), np.int64)  # each chunk's first sample in xa
        np.cumsum(applied[chunks][:-1], out=starts_c[1:])
        if grouped:  # streams in chunk order, one chunk each: xa is grouped already
            xg, order = xa, None
            zero_at = starts_c[zero_first]
        else:  # a stable sort by stream keeps every stream's samples in order
            sample_stream = np.repeat(u_of_chunk, applied[chunks])
            order = np.argsort(sample_stream, kind="stable")
            xg = xa[order]
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            zero_at = inverse[starts_c[zero_first]]
        zero = None
        if len(zero_at):
            zero = np.zeros(len(xa), bool)
            zero[zero_at] = True
        try:
            y_raw = self._guarded(names, known, rows, lengths, self.model.encode_x(xg), zero)
        except _Overflow as exc:
            if order is not None:  # back to the order of xa
                exc.bad = exc.bad[inverse]
            raise
        if order is not None:
            back = np.empty_like(y_raw)
            back[order] = y_raw
            y_raw = back
        return self.model.decode_y(y_raw)

    def _guarded(
        self,
        names: list[Any],
        known: np.ndarray,
        rows: np.ndarray,
        lengths: np.ndarray,
        xq: np.ndarray,
        zero: np.ndarray | None,
    ) -> np.ndarray:
        """``_advance``, and for a float model: when a sample's answer or new state is not
        finite, every stream's state put back as it was (and the streams that got their row
        here dropped) and ``_Overflow`` raised, per sample in ``xq``'s order."""
        if not self._float_outs:
            return self._advance(rows, lengths, xq, zero)
        before = self.store.gather(rows)
        bad = np.zeros(len(xq), bool)
        y_raw = self._advance(rows, lengths, xq, zero, bad)
        if bad.any():
            self.store.scatter(rows, before)
            for name in np.asarray(names, object)[known < 0].tolist():
                self.store.remove(name)
            raise _Overflow(bad)
        return y_raw

    def _finite(self, outputs: Sequence[np.ndarray]) -> bool:
        """Whether the float outputs of an invoke are all finite: one check per tensor."""
        return all(np.isfinite(outputs[k]).all() for k in self._float_outs)

    def _mark_bad(self, outputs: Sequence[np.ndarray], idx: np.ndarray, bad: np.ndarray) -> None:
        """Mark ``bad[idx]`` where a row of an invoke's float outputs is not finite."""
        if self._finite(outputs):
            return
        for k in self._float_outs:
            bad[idx[~np.isfinite(outputs[k]).all(axis=1)]] = True

    def _advance(
        self,
        rows: np.ndarray,
        lengths: np.ndarray,
        xq: np.ndarray,
        zero: np.ndarray | None,
        bad: np.ndarray | None = None,
    ) -> np.ndarray:
        """Step streams ``rows`` through their ``lengths`` encoded samples (``xq`` grouped by
        stream, in order); ``zero``: reset the state before these samples. Round r steps the
        r-th sample of every stream still going, in one invoke per ``max_batch`` rows. While
        the same streams go on, the state stays in the interpreter's buffers between rounds;
        it goes back to the arena when one finishes. -> encoded y, in ``xq``'s order. ``bad``:
        marked where a sample's float answer or state was not finite."""
        model = self.model
        b = model.binding
        arenas = self.store.arrays
        zero_rows = self.store.zero_row
        total = len(xq)
        y_raw = np.empty((total, self.manifest.outputs), NP_DTYPES[model.y_spec.dtype])
        n = len(rows)
        starts = np.zeros(n, np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        zero_rounds: set[int] = set()
        if zero is not None:  # the rounds (sample positions in their stream) with a reset
            pos = np.arange(total) - np.repeat(starts, lengths)
            zero_rounds = set(pos[zero].tolist())
        if total == n:
            spans = [(0, 1, n)]
        else:  # longest first: the streams still going in a round are a prefix
            order = np.argsort(-lengths, kind="stable")
            rows, starts, lengths = rows[order], starts[order], lengths[order]
            spans = []
            r, m = 0, n
            ls = lengths.tolist()
            while m:
                end = ls[m - 1]
                spans.append((r, end, m))
                r = end
                while m and ls[m - 1] <= r:
                    m -= 1
        maxb = model.max_batch
        requant = model.requantized
        specs = list(zip(model.state_out, model.state_in))
        invokes = 0
        for r0, r1, m in spans:
            if m > maxb:  # split rounds: every part gathers and scatters its rows
                for r in range(r0, r1):
                    for k in range(0, m, maxb):
                        part = slice(k, min(m, k + maxb))
                        self._round(rows[part], starts[part] + r, xq, zero, y_raw, bad)
                        invokes += 1
                continue
            b.bind(m)
            x_in, s_in = b.inputs[0], b.inputs[1:]
            y_out, s_out = b.outputs[0], b.outputs[1:]
            mine = rows[:m]
            for arena, view in zip(arenas, s_in):
                arena.take(mine, axis=0, out=view)
            st = starts[:m]
            for r in range(r0, r1):
                idx = st + r
                xq.take(idx, axis=0, out=x_in)
                if r in zero_rounds:
                    z = zero[idx]  # type: ignore[index]
                    for view, zr in zip(s_in, zero_rows):
                        view[z] = zr
                model.run()
                if bad is not None:
                    self._mark_bad(b.outputs, idx, bad)
                y_raw[idx] = y_out
                if r + 1 < r1:  # the same streams go on: feed the state straight back
                    for view, out, rq, (so, si) in zip(s_in, s_out, requant, specs):
                        if rq:
                            view[...] = requantize(out, so, si)
                        else:
                            np.copyto(view, out)
            for arena, out, rq, (so, si) in zip(arenas, s_out, requant, specs):
                arena[mine] = requantize(out, so, si) if rq else out
            invokes += r1 - r0
        self.counters.invokes += invokes
        self.counters.steps += total
        return y_raw

    def _round(
        self,
        rows: np.ndarray,
        idx: np.ndarray,
        xq: np.ndarray,
        zero: np.ndarray | None,
        y_raw: np.ndarray,
        bad: np.ndarray | None,
    ) -> None:
        """One invoke for some rows of a round too wide for ``max_batch``: gather, scatter."""
        if zero is not None:
            z = zero[idx]
            if z.any():
                self.store.zero_rows(rows[z])
        y, states = self.model.invoke(xq[idx], self.store.gather(rows))
        if bad is not None:  # the outputs as the model gave them, before any re-encoding
            self._mark_bad(self.model.binding.outputs, idx, bad)
        self.store.scatter(rows, states)
        y_raw[idx] = y

    def _boot_of(self, stream: str, boots: dict[str, list[int]]) -> tuple[int | None, list[int]]:
        """(current boot, earlier boots) of a stream, counting the boots seen in this batch."""
        row = self.store.peek(stream)
        cur, old = (None, []) if row is None else self.store.boot_of(row)
        history = [] if cur is None else [cur, *old]
        for boot in boots.get(stream, ()):
            if not history or history[0] != boot:  # as StateStore.set_boot records it
                history = [boot, *(b for b in history if b != boot)][:BOOT_HISTORY]
        return (history[0] if history else None), history[1:]

    def _late(
        self, stream: str, seq: int, count: int, pending: list[tuple[str, int, int, bool]]
    ) -> int:
        """How many of ``count`` duplicate samples from ``seq`` fall in a gap the stream was
        stepped across: remembered in its row, or noted earlier in this same call. The notes
        of this call are added as ``StateStore.note_gap`` will record them, into its
        ``GAP_SLOTS`` slots: a chunk's answer does not depend on the chunks sent with it."""
        row = self.store.peek(stream)
        slots = [(0, 0)] * GAP_SLOTS
        if row is not None:
            slots = [(int(f), int(n)) for f, n in self.store.gaps[row]]
        for s, first, n, fresh in pending:
            if s == stream:
                slots = [(first, n), *([(0, 0)] * GAP_SLOTS if fresh else slots)][:GAP_SLOTS]
        spans = [(f, n) for f, n in slots if n]
        seqs = [(seq + k) % U32 for k in range(count)]
        return sum(any((q - f) % U32 < n for f, n in spans) for q in seqs)


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
    for name, flag in (("self_test", self_test), ("builtin_kernels", builtin_kernels)):
        if not isinstance(flag, (bool, np.bool_)):  # "no" would switch it on
            raise ConfigError(f"{name} must be True or False, got {shown(flag)}")
    manifest, content = read_bundle(directory)
    chosen = select(backend)
    try:
        model = StepModel(
            manifest,
            content,
            chosen.builtin() if builtin_kernels else chosen,
            max_batch=max_batch,
            num_threads=num_threads,
        )
    except (BundleError, BackendError) as exc:  # the interpreter's and the signature's
        # refusals name no file: a reload's status and log said which model only by this
        raise type(exc)(f"{Path(directory) / manifest.model_file}: {exc}") from exc
    if kernel_mismatch != "allow":
        enforce(manifest, model.kernels, kernel_mismatch, str(directory))
    if self_test:
        y, _ = model.invoke(model.encode_x(np.zeros((1, manifest.features))), model.zero_state())
        if y.shape != (1, manifest.outputs) or not np.isfinite(model.decode_y(y)).all():
            raise BundleError(f"{directory}: self-test step gave {y!r}")
    return Engine(model, **engine_options)

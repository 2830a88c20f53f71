"""Wire formats of samples in and predictions out. Pure functions, no I/O.

Samples (auto-detected by the first byte, or by the MQTT 5 content type):

* JSON ``{"seq": int, "ts": float?, "boot": int?, "values": [F floats] | [[F floats], ...]}``
  (content type ``application/json``). k samples numbered ``seq .. seq+k-1``.
* SenML JSON, RFC 8428 (``application/senml+json``): a JSON array of records. Records with a
  name equal to a feature name (after ``bn``) carry that feature; records sharing one time
  (``bt`` + ``t``) form one sample, in time order; a record named ``seq`` gives the first seq
  and one named ``boot`` the boot counter (both in ``v``).
* Binary frame (``application/vnd.edge-lstm.frame``), little-endian. Version 1::

      offset size
      0      1    version = 1
      1      1    flags (0)
      2      2    u16 sample count k
      4      4    u32 seq of the first sample
      8      8    f64 timestamp, seconds (NaN = none)
      16     4*k*F  float32 values, sample-major

  Version 2 adds the boot counter after the timestamp::

      0      1    version = 2
      1      1    flags: bit 0 = boot present (other bits reserved, 0)
      2      2    u16 sample count k
      4      4    u32 seq of the first sample
      8      8    f64 timestamp, seconds (NaN = none)
      16     4    u32 boot counter (ignored unless flags bit 0 is set)
      20     4*k*F  float32 values, sample-major

``seq`` and ``boot`` are unsigned 32-bit integers. ``boot`` counts device restarts: a device
that lost its seq counter on reboot bumps it so the service can tell a restart from a replay.
Timestamps are seconds since the Unix epoch and must lie in [0, 4102444800] (up to 2100-01-01).
JSON nesting deeper than ``MAX_DEPTH`` is refused before parsing.

Every refusal is a ``PayloadError`` with a stable ``code`` and a detail naming the bad value.
Decoding is total: any bytes and any content type give ``Samples`` or a ``PayloadError``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from .errors import shown

try:  # a C JSON codec, when installed; the standard library otherwise (same results)
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None  # type: ignore[assignment]

FRAME_HEAD = struct.Struct("<BBHId")
FRAME_VERSION = 1
FRAME_HEAD_V2 = struct.Struct("<BBHIdI")
FRAME_VERSION_V2 = 2
FRAME_FLAG_BOOT = 0x01
CONTENT_TYPES = {
    "application/json": "json",
    "application/senml+json": "senml",
    "application/vnd.edge-lstm.frame": "binary",
    "application/octet-stream": "binary",
}
MAX_DEPTH = 8
MAX_TS = 4102444800.0  # 2100-01-01T00:00:00Z: later (or negative) times are clock garbage
# SenML (RFC 8428): a time below 2**28 s is relative to now; negative ones are seconds ago, as
# a device without a clock sends them. Those further back than this are clock garbage too.
SENML_RELATIVE = 2.0**28
U32 = 2**32

_BOM = b"\xef\xbb\xbf"
_STRUCTURE = b'[]{}"'
_DROP = bytes(b for b in range(256) if b not in _STRUCTURE)
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")  # nesting is nesting, whichever the bracket
_OPEN = ord("[")
# orjson reads integers beyond 64 bits as floats; the standard library keeps them exact. A
# payload with an integer of 16 digits or more goes to the standard library: every digit
# mapped to "0", a point or exponent mark to ".", everything else to " ", then one substring
# search (a tenth of the cost of a regex search). The digits after a float's point are no
# integer: a device printing its floats in full (17 significant digits) stays with orjson.
_DIGITS_AS_ZERO = bytes(48 if 48 <= b <= 57 else 46 if b in b".eE" else 32 for b in range(256))
_LONG_DIGITS = b"0" * 16
_LONG_INTEGER = b" " + _LONG_DIGITS  # at the start of a number (a sign reads as " " too)


def _long_integer(payload: bytes) -> bool:
    """Whether ``payload`` may hold an integer of 16 digits or more (never a false no)."""
    marked = payload.translate(_DIGITS_AS_ZERO)
    return _LONG_INTEGER in marked or marked.startswith(_LONG_DIGITS)


class PayloadError(ValueError):
    def __init__(self, code: str, detail: str, seq: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.seq = seq


@dataclass(slots=True)  # made per message: not frozen, whose __init__ costs 5x
class Samples:
    seq: int | None
    ts: float | None
    values: np.ndarray  # [k, F] float64
    boot: int | None = None


_NUMBER_TYPES = {int, float}  # exact types: bool is an int subclass and must be refused
_LIST = {list}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_depth(payload: bytes, limit: int) -> None:
    """Refuse JSON nesting deeper than ``limit`` without parsing: json.loads recurses per level.

    Only brackets outside strings count; escaped quotes are removed first so a string cannot
    hide or fake brackets. Assumes UTF-8 (ASCII bytes never occur inside multi-byte chars)."""
    data = payload
    if b"\\" in data:  # "\\" is one escaped backslash; any "\" left then escapes the next char
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = data.translate(_AS_BRACKETS, _DROP)
    if len(data) - data.count(b'"') <= limit:  # too few brackets to nest deeper
        return
    if b'"' in data:
        data = b"".join(data.split(b'"')[::2])  # even parts lie outside strings
    # Each round removes the innermost pairs: balanced brackets empty in as many rounds as
    # they nest deep. What is left after ``limit`` rounds is too deep or unbalanced.
    left = data
    for _ in range(limit):
        left = left.replace(b"[]", b"")
        if not left:
            return
    depth = 0
    for c in data:
        if c == _OPEN:
            depth += 1
            if depth > limit:
                raise PayloadError("too_deep", f"JSON nests deeper than {limit} levels")
        elif depth:
            depth -= 1


def parse_json(payload: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """JSON document of a message; every failure is a PayloadError ("bad_json" or "too_deep").

    Strict UTF-8 (a leading BOM is skipped), nesting checked before parsing, integers above
    Python's digit limit refused. NaN/Infinity literals parse (the value checks refuse them)."""
    return _parse(payload, max_depth)[0]


def _parse(payload: bytes, max_depth: int) -> tuple[Any, bool]:
    """(document, whether its numbers are known finite): orjson refuses NaN, Infinity and
    numbers beyond a double's range, so what it parsed needs no check for them."""
    if payload[:3] == _BOM:
        payload = payload[3:]
    check_depth(payload, max_depth)
    if orjson is not None and not _long_integer(payload):
        try:
            return orjson.loads(payload), True
        except orjson.JSONDecodeError:
            pass  # NaN literals, lone surrogates, bad bytes: the standard library decides
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("bad_json", f"payload is not UTF-8: {shown(payload[:40])}") from exc
    try:
        return json.loads(text), False
    except json.JSONDecodeError as exc:
        raise PayloadError("bad_json", f"malformed JSON: {shown(str(exc), 200)}") from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer beyond the digit limit
        raise PayloadError("bad_json", f"unparsable JSON: {shown(str(exc), 200)}") from exc


def detect(payload: bytes, content_type: str | None = None) -> str:
    if content_type:
        key = content_type.split(";")[0].strip().lower() if isinstance(content_type, str) else ""
        kind = CONTENT_TYPES.get(key)
        if kind is None:
            raise PayloadError(
                "bad_content_type", f"content type {shown(content_type)} is not supported"
            )
        return kind
    head = payload.removeprefix(_BOM).lstrip()[:1]
    if head == b"{":
        return "json"
    if head == b"[":
        return "senml"
    if payload[:1] in (bytes([FRAME_VERSION]), bytes([FRAME_VERSION_V2])):
        return "binary"
    raise PayloadError("bad_payload", f"not JSON, SenML or a binary frame (starts {payload[:8]!r})")


def decode(
    payload: bytes,
    features: Sequence[str],
    content_type: str | None = None,
    *,
    max_depth: int = MAX_DEPTH,
) -> Samples:
    """Samples of one message, or PayloadError: never any other exception."""
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    kind = detect(payload, content_type)
    if kind == "binary":
        return decode_frame(payload, len(features))
    doc, finite = _parse(payload, max_depth)
    if kind == "senml":
        return decode_senml(doc, features)
    _unique_keys(payload, doc)
    return decode_json(doc, len(features), finite=finite)


_KEYS = (b'"seq"', b'"values"', b'"ts"', b'"boot"')


def parse_control(payload: bytes) -> Any:
    """A control message's JSON document (see ``parse_json``); a key named twice in one object
    is refused ``bad_json`` as in a sample: a reset's "seq" must say one thing."""
    doc = parse_json(payload)
    _no_repeated_key(payload)
    return doc


def _unique_keys(payload: bytes, doc: Any) -> None:
    """JSON lets an object name a key twice and parsers keep the last: a sample whose "seq"
    or "values" says two things is refused, not read as whichever came last. Cheap looks at
    the bytes first (a payload whose only strings are its object's keys, or that names no key
    twice); the objects are looked at only when a key may repeat."""
    if type(doc) is dict and payload.count(b'"') == 2 * len(doc):
        return
    if b"\\u" not in payload and all(payload.count(k) < 2 for k in _KEYS):
        return
    _no_repeated_key(payload)


def _no_repeated_key(payload: bytes) -> None:
    """PayloadError ``bad_json`` naming a key that one object of ``payload`` names twice."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) < len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise PayloadError("bad_json", f"key {shown(twice)} appears twice in one object")
        return dict(items)

    try:
        json.loads(payload.decode("utf-8", errors="replace"), object_pairs_hook=pairs)
    except PayloadError:
        raise
    except (ValueError, RecursionError):  # parsed already: what the standard library refuses
        pass  # (NaN literals, long integers) was accepted by the parser that decides


def _seq(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < U32:
        raise PayloadError("bad_seq", f"seq {shown(value)} is not an unsigned 32-bit integer")
    return value


def _boot(value: Any, seq: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < U32:
        raise PayloadError(
            "bad_boot", f"boot {shown(value)} is not an unsigned 32-bit integer", seq
        )
    return value


def _number(value: Any, what: str, seq: int | None) -> float:
    """A finite float from a JSON number; huge ints and inf/NaN are refused as bad_ts."""
    if _is_number(value):
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if math.isfinite(x):
            return x
    raise PayloadError("bad_ts", f"{what} {shown(value)} is not a finite number", seq)


def _plausible(ts: float, what: str, seq: int | None) -> float:
    if not 0.0 <= ts <= MAX_TS:
        raise PayloadError(
            "bad_ts", f"{what} {shown(ts)} is outside [0, {MAX_TS:.0f}] seconds since 1970", seq
        )
    return ts


def _ts(value: Any, seq: int | None = None) -> float | None:
    if value is None:
        return None
    return _plausible(_number(value, "ts", seq), "ts", seq)


def _row(row: list[Any], where: str, seq: int | None) -> list[float]:
    out = []
    for i, v in enumerate(row):
        if not _is_number(v):
            code = "wrong_shape" if isinstance(v, list) else "bad_values"
            raise PayloadError(code, f"{where}[{i}] is {shown(v)}, not a number", seq)
        try:
            x = float(v)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            raise PayloadError("not_finite", f"{where}[{i}] is {shown(v)}, not finite", seq)
        out.append(x)
    return out


def _plain(values: list[Any], f: int, finite: bool) -> np.ndarray | None:
    """[k, F] float64 when ``values`` is exactly [F] or [k, F] plain finite numbers, else None
    (``finite``: its floats are known to be).

    The common case checked with a few C-level scans and one array build instead of a Python
    call per number; anything else (and every error message) is left to the element-wise path."""
    if type(values[0]) is not list:
        flat = values if len(values) == f else None
    elif set(map(type, values)) == _LIST and set(map(len, values)) == {f}:
        flat = list(chain.from_iterable(values))
    else:
        flat = None
    if flat is None or not set(map(type, flat)) <= _NUMBER_TYPES:
        return None
    try:
        arr = np.fromiter(flat, np.float64, len(flat)).reshape(-1, f)
    except OverflowError:
        return None
    return arr if finite or np.isfinite(arr).all() else None


def _values(values: Any, f: int, seq: int | None, finite: bool = False) -> np.ndarray:
    """[k, F] float64 from a JSON array of F numbers or of k such arrays."""
    if type(values) is list and values and (fast := _plain(values, f, finite)) is not None:
        return fast
    if not isinstance(values, list):
        raise PayloadError("bad_values", f"values must be an array, got {shown(values)}", seq)
    if not values:
        raise PayloadError("wrong_shape", f"values are empty, expected [{f}] or [k, {f}]", seq)
    if not isinstance(values[0], list):
        rows = [_row(values, "values", seq)]
    else:
        rows = []
        for k, row in enumerate(values):
            if not isinstance(row, list):
                raise PayloadError(
                    "bad_values", f"values[{k}] is {shown(row)}, expected an array", seq
                )
            rows.append(_row(row, f"values[{k}]", seq))
        if len({len(r) for r in rows}) > 1:
            lengths = shown([len(r) for r in rows])
            raise PayloadError("bad_values", f"rows of values differ in length: {lengths}", seq)
    if len(rows[0]) != f:
        shape = [len(rows[0])] if not isinstance(values[0], list) else [len(rows), len(rows[0])]
        raise PayloadError(
            "wrong_shape", f"values have shape {shape}, expected [{f}] or [k, {f}]", seq
        )
    return np.array(rows, dtype=np.float64).reshape(len(rows), f)


def decode_json(doc: Any, f: int, *, finite: bool = False) -> Samples:
    if not isinstance(doc, dict):
        raise PayloadError("bad_json", f"expected a JSON object, got {type(doc).__name__}")
    seq = _seq(doc["seq"]) if "seq" in doc else None
    if "values" not in doc:
        raise PayloadError("bad_values", "missing field 'values'", seq)
    ts = _ts(doc.get("ts"), seq)
    boot = _boot(doc.get("boot"), seq)
    return Samples(seq, ts, _values(doc["values"], f, seq, finite), boot)


def decode_senml(doc: Any, features: Sequence[str]) -> Samples:
    if not isinstance(doc, list) or not doc or not all(isinstance(r, dict) for r in doc):
        raise PayloadError("bad_senml", "SenML must be a non-empty array of records")
    base_name, base_time, seq, boot, timed = "", 0.0, None, None, False
    relative: str | None = None  # the first record timed relative to now (a negative time)
    by_time: dict[float, dict[str, float]] = {}
    for rec in doc:
        bn = rec.get("bn", base_name)
        if not isinstance(bn, str):
            raise PayloadError("bad_senml", f"base name 'bn' {shown(bn)} is not a string", seq)
        base_name = bn
        if rec.get("bt") is not None:
            base_time, timed = _number(rec["bt"], "base time 'bt'", seq), True
        n = rec.get("n", "")
        if not isinstance(n, str):
            raise PayloadError("bad_senml", f"record name 'n' {shown(n)} is not a string", seq)
        name = base_name + n
        short = name.rsplit("/", 1)[-1] if name not in features else name
        if short == "seq":  # named twice, which one is meant cannot be told: neither is taken
            if seq is not None:
                raise PayloadError("bad_senml", f"'seq' is given twice (record {shown(name, 60)})")
            seq = _seq(rec.get("v"))
            continue
        if short == "boot":
            if boot is not None:
                raise PayloadError(
                    "bad_senml", f"'boot' is given twice (record {shown(name, 60)})", seq
                )
            if rec.get("v") is None:
                raise PayloadError("bad_boot", f"record {shown(name, 60)} has no 'v'", seq)
            boot = _boot(rec["v"], seq)
            continue
        if short not in features:
            continue  # other quantities in the pack are allowed and ignored
        v = rec.get("v")
        if not _is_number(v):
            raise PayloadError(
                "bad_senml", f"record {shown(name, 60)} has no numeric 'v' ({shown(v)})", seq
            )
        t = base_time
        if rec.get("t") is not None:
            t, timed = t + _number(rec["t"], "time 't'", seq), True
        if -SENML_RELATIVE <= t < 0:  # seconds ago: only their order is known
            relative = relative or shown(name, 40)
        else:
            t = _plausible(t, f"time of record {shown(name, 40)}", seq)
        sample = by_time.setdefault(t, {})
        if short in sample:  # which one is meant cannot be told: neither is taken
            raise PayloadError("bad_senml", f"{shown(short, 60)} is given twice at t={t}", seq)
        sample[short] = v
    if not by_time:
        raise PayloadError(
            "bad_senml", f"no record names one of the features {shown(list(features), 200)}", seq
        )
    rows = []
    for t in sorted(by_time):
        missing = [n for n in features if n not in by_time[t]]
        if missing:
            raise PayloadError("wrong_shape", f"sample at t={t} lacks {shown(missing)}", seq)
        rows.append([by_time[t][n] for n in features])
    if relative is not None:
        if max(by_time) >= SENML_RELATIVE:  # now is not known here: no order between them
            raise PayloadError(
                "bad_ts",
                f"record {relative} is timed relative to now (a negative time), others at "
                f"{max(by_time):.0f} s since 1970: times of one pack must be one or the other",
                seq,
            )
        ts = None  # relative to now: no absolute time to give
    else:
        ts = min(by_time) if timed else None
    return Samples(seq, ts, _values(rows, len(features), seq), boot)


def decode_frame(payload: bytes, f: int) -> Samples:
    version = payload[0] if payload else None
    if version not in (FRAME_VERSION, FRAME_VERSION_V2):
        raise PayloadError(
            "bad_frame", f"frame version {version}, expected {FRAME_VERSION} or {FRAME_VERSION_V2}"
        )
    head = FRAME_HEAD if version == FRAME_VERSION else FRAME_HEAD_V2
    if len(payload) < head.size:
        raise PayloadError(
            "bad_frame",
            f"frame of {len(payload)} bytes is shorter than its header ({head.size})",
        )
    boot: int | None = None
    if version == FRAME_VERSION:
        _, _, k, seq, ts = FRAME_HEAD.unpack_from(payload)
    else:
        _, flags, k, seq, ts, raw_boot = FRAME_HEAD_V2.unpack_from(payload)
        if flags & ~FRAME_FLAG_BOOT:
            raise PayloadError("bad_frame", f"frame flags {flags:#04x} set reserved bits", seq)
        boot = raw_boot if flags & FRAME_FLAG_BOOT else None
    want = head.size + 4 * k * f
    if len(payload) != want or k == 0:
        raise PayloadError(
            "wrong_shape",
            f"frame holds {len(payload)} bytes; {k} samples x {f} features need {want}",
            seq,
        )
    stamp = None if math.isnan(ts) else _ts(ts, seq)
    # Non-finite = all exponent bits set; tested on the bits so that no NaN (signalling ones
    # included) ever reaches a float operation that could warn.
    bits = np.frombuffer(payload, "<u4", k * f, head.size)
    bad = np.flatnonzero((bits & 0x7F800000) == 0x7F800000)
    if len(bad):
        i, j = divmod(int(bad[0]), f)
        word = int(bits[bad[0]])
        what = "nan" if word & 0x007FFFFF else "-inf" if word >> 31 else "inf"
        raise PayloadError("not_finite", f"values[{i}][{j}] is {what} ({word:#010x})", seq)
    values = np.frombuffer(payload, "<f4", k * f, head.size).astype(np.float64).reshape(k, f)
    return Samples(seq, stamp, values, boot)


def encode_frame(
    seq: int, values: np.ndarray, ts: float | None = None, boot: int | None = None
) -> bytes:
    """Version 1 without ``boot`` (bytes identical to older devices), version 2 with it."""
    values = np.asarray(values, "<f4").reshape(-1, np.shape(values)[-1])
    stamp = math.nan if ts is None else ts
    if boot is None:
        head = FRAME_HEAD.pack(FRAME_VERSION, 0, len(values), seq, stamp)
    else:
        head = FRAME_HEAD_V2.pack(FRAME_VERSION_V2, FRAME_FLAG_BOOT, len(values), seq, stamp, boot)
    return head + values.tobytes()


def encode_senml(
    seq: int,
    values: np.ndarray,
    names: Sequence[str],
    ts: float,
    dt: float,
    boot: int | None = None,
) -> bytes:
    records: list[dict[str, Any]] = [{"bt": ts, "n": "seq", "v": seq}]
    if boot is not None:
        records.append({"n": "boot", "v": boot})
    for k, row in enumerate(np.asarray(values).reshape(-1, len(names))):
        records += [{"n": n, "t": k * dt, "v": float(v)} for n, v in zip(names, row)]
    return json.dumps(records).encode()


def _finite(x: Any) -> float | None:
    """Float for a JSON document, or None where JSON has no number (NaN, Inf, huge ints)."""
    try:
        f = float(x)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


class Outputs(NamedTuple):
    """Model outputs made ready for JSON: one list of floats per sample (None where a value is
    not finite) and each sample's top index (None where none is finite). Made once for a
    whole batch and sliced per answer: numpy's cost per call dwarfs that of a few rows."""

    rows: list[list[float | None]]
    top: list[int | None]

    @classmethod
    def of(cls, y: np.ndarray) -> Outputs:
        exact = np.asarray(y, np.float64)  # float32 values print exactly (shortest round trip)
        ok = np.isfinite(exact)
        rows: list[list[float | None]] = exact.tolist()
        if ok.all():
            return cls(rows, exact.argmax(-1).tolist())
        mask: list[list[bool]] = ok.tolist()
        rows = [[v if good else None for v, good in zip(r, m)] for r, m in zip(rows, mask)]
        top: list[int] = np.where(ok, exact, -np.inf).argmax(-1).tolist()
        return cls(rows, [t if any(m) else None for t, m in zip(top, mask)])

    def part(self, start: int, stop: int) -> Outputs:
        return Outputs(self.rows[start:stop], self.top[start:stop])


def prediction(
    seq: int | None,
    ts: float | None,
    y: np.ndarray | Outputs,
    model: str,
    labels: Sequence[str] = (),
    *,
    single: bool,
    gap: int = 0,
    restart: bool = False,
    boot: int | None = None,
) -> bytes:
    """One prediction message for one message in (y: [k, O]); ``single`` keeps y flat.

    Always valid JSON: a non-finite ts is left out and a non-finite y element is null."""
    doc: dict[str, Any] = {"seq": seq}
    stamp = None if ts is None else _finite(ts)
    if stamp is not None:
        doc["ts"] = stamp
    out = y if isinstance(y, Outputs) else Outputs.of(y)
    doc["y"] = out.rows[0] if single else out.rows
    doc["model"] = model
    if labels:
        names = [None if t is None else labels[t] for t in out.top]
        p = [None if t is None else row[t] for row, t in zip(out.rows, out.top)]
        doc["label"], doc["p"] = (names[0], p[0]) if single else (names, p)
    if gap:
        doc["gap"] = gap
    if restart:
        doc["restart"] = True
    if boot is not None:
        doc["boot"] = boot
    return dumps(doc)


def dumps(doc: dict[str, Any]) -> bytes:
    """Compact JSON of a document whose numbers are finite and ints at most 64-bit."""
    if orjson is not None:
        return orjson.dumps(doc)
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Caller-supplied extras made JSON-safe: non-finite floats become null, unknowns text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    if depth < MAX_DEPTH and isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < MAX_DEPTH and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    return shown(value, 200)


def error(
    code: str, detail: str, seq: int | None = None, extra: Mapping[str, Any] | None = None
) -> bytes:
    """Error message; ``extra`` adds fields (e.g. a count) but cannot replace seq/error/detail."""
    doc: dict[str, Any] = {"seq": seq, "error": code, "detail": str(detail)[:500]}
    for key, value in (_jsonable(extra) if extra else {}).items():
        doc.setdefault(key, value)
    return json.dumps(doc, allow_nan=False).encode()

"""Wire formats of samples in and predictions out. Pure functions, no I/O.

Samples (auto-detected by the first byte, or by the MQTT 5 content type):

* JSON ``{"seq": int, "ts": float?, "values": [F floats] | [[F floats], ...]}``
  (content type ``application/json``). k samples numbered ``seq .. seq+k-1``.
* SenML JSON, RFC 8428 (``application/senml+json``): a JSON array of records. Records with a
  name equal to a feature name (after ``bn``) carry that feature; records sharing one time
  (``bt`` + ``t``) form one sample, in time order; a record named ``seq`` gives the first seq.
* Binary frame (``application/vnd.edge-lstm.frame``), little-endian::

      offset size
      0      1    version = 1
      1      1    flags (0)
      2      2    u16 sample count k
      4      4    u32 seq of the first sample
      8      8    f64 timestamp, seconds (NaN = none)
      16     4*k*F  float32 values, sample-major

Every refusal is a ``PayloadError`` with a stable ``code`` and a detail naming the bad value.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FRAME_HEAD = struct.Struct("<BBHId")
FRAME_VERSION = 1
CONTENT_TYPES = {
    "application/json": "json",
    "application/senml+json": "senml",
    "application/vnd.edge-lstm.frame": "binary",
    "application/octet-stream": "binary",
}


class PayloadError(ValueError):
    def __init__(self, code: str, detail: str, seq: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.seq = seq


@dataclass(frozen=True)
class Samples:
    seq: int | None
    ts: float | None
    values: np.ndarray  # [k, F] float64


def detect(payload: bytes, content_type: str | None = None) -> str:
    if content_type:
        kind = CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if kind is None:
            raise PayloadError(
                "bad_content_type", f"content type {content_type!r} is not supported"
            )
        return kind
    head = payload.lstrip()[:1]
    if head == b"{":
        return "json"
    if head == b"[":
        return "senml"
    if payload[:1] == bytes([FRAME_VERSION]):
        return "binary"
    raise PayloadError("bad_payload", f"not JSON, SenML or a binary frame (starts {payload[:8]!r})")


def decode(payload: bytes, features: Sequence[str], content_type: str | None = None) -> Samples:
    kind = detect(payload, content_type)
    if kind == "binary":
        return decode_frame(payload, len(features))
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError("bad_json", f"malformed JSON: {exc}") from exc
    return decode_senml(doc, features) if kind == "senml" else decode_json(doc, len(features))


def _seq(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise PayloadError("bad_seq", f"seq {value!r} is not an unsigned 32-bit integer")
    return value


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PayloadError("bad_ts", f"ts {value!r} is not a finite number")
    return float(value)


def _values(values: Any, f: int, seq: int | None) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PayloadError("bad_values", f"values are not numbers: {exc}", seq) from exc
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != f or len(arr) == 0:
        raise PayloadError(
            "wrong_shape",
            f"values have shape {list(np.shape(values))}, expected [{f}] or [k, {f}]",
            seq,
        )
    if not np.isfinite(arr).all():
        raise PayloadError("not_finite", "values contain NaN or Inf", seq)
    return arr


def decode_json(doc: Any, f: int) -> Samples:
    if not isinstance(doc, dict):
        raise PayloadError("bad_json", f"expected a JSON object, got {type(doc).__name__}")
    seq = _seq(doc["seq"]) if "seq" in doc else None
    if "values" not in doc:
        raise PayloadError("bad_values", "missing field 'values'", seq)
    return Samples(seq, _ts(doc.get("ts")), _values(doc["values"], f, seq))


def decode_senml(doc: Any, features: Sequence[str]) -> Samples:
    if not isinstance(doc, list) or not doc or not all(isinstance(r, dict) for r in doc):
        raise PayloadError("bad_senml", "SenML must be a non-empty array of records")
    base_name, base_time, seq = "", 0.0, None
    by_time: dict[float, dict[str, float]] = {}
    for rec in doc:
        base_name = rec.get("bn", base_name)
        bt = _ts(rec.get("bt"))
        base_time = bt if bt is not None else base_time
        name = base_name + str(rec.get("n", ""))
        short = name.rsplit("/", 1)[-1] if name not in features else name
        if short == "seq":
            seq = _seq(rec.get("v"))
            continue
        if short not in features:
            continue  # other quantities in the pack are allowed and ignored
        v = rec.get("v")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PayloadError("bad_senml", f"record {name!r} has no numeric 'v' ({v!r})", seq)
        t = base_time + (_ts(rec.get("t")) or 0.0)
        by_time.setdefault(t, {})[short] = float(v)
    if not by_time:
        raise PayloadError(
            "bad_senml", f"no record names one of the features {list(features)}", seq
        )
    rows = []
    for t in sorted(by_time):
        missing = [n for n in features if n not in by_time[t]]
        if missing:
            raise PayloadError("wrong_shape", f"sample at t={t} lacks {missing}", seq)
        rows.append([by_time[t][n] for n in features])
    ts = min(by_time) if base_time or any(by_time) else None
    return Samples(seq, ts, _values(rows, len(features), seq))


def decode_frame(payload: bytes, f: int) -> Samples:
    if len(payload) < FRAME_HEAD.size:
        raise PayloadError("bad_frame", f"frame of {len(payload)} bytes is shorter than its header")
    version, _, k, seq, ts = FRAME_HEAD.unpack_from(payload)
    if version != FRAME_VERSION:
        raise PayloadError("bad_frame", f"frame version {version}, expected {FRAME_VERSION}")
    want = FRAME_HEAD.size + 4 * k * f
    if len(payload) != want or k == 0:
        raise PayloadError(
            "wrong_shape",
            f"frame holds {len(payload)} bytes; {k} samples x {f} features need {want}",
            seq,
        )
    values = np.frombuffer(payload, "<f4", k * f, FRAME_HEAD.size).reshape(k, f)
    return Samples(seq, None if math.isnan(ts) else ts, _values(values, f, seq))


def encode_frame(seq: int, values: np.ndarray, ts: float | None = None) -> bytes:
    values = np.asarray(values, "<f4").reshape(-1, np.shape(values)[-1])
    head = FRAME_HEAD.pack(FRAME_VERSION, 0, len(values), seq, math.nan if ts is None else ts)
    return head + values.tobytes()


def encode_senml(seq: int, values: np.ndarray, names: Sequence[str], ts: float, dt: float) -> bytes:
    records: list[dict[str, Any]] = [{"bt": ts, "n": "seq", "v": seq}]
    for k, row in enumerate(np.asarray(values).reshape(-1, len(names))):
        records += [{"n": n, "t": k * dt, "v": float(v)} for n, v in zip(names, row)]
    return json.dumps(records).encode()


def prediction(
    seq: int | None,
    ts: float | None,
    y: np.ndarray,
    model: str,
    labels: Sequence[str] = (),
    *,
    single: bool,
    gap: int = 0,
) -> bytes:
    """One prediction message for one message in (y: [k, O]); ``single`` keeps y flat."""
    doc: dict[str, Any] = {"seq": seq}
    if ts is not None:
        doc["ts"] = ts
    exact = y.astype(np.float64)  # float32 values print exactly (shortest round-trip repr)
    doc["y"] = exact[0].tolist() if single else exact.tolist()
    doc["model"] = model
    if labels:
        top = y.argmax(-1)
        names = [labels[i] for i in top]
        p = [float(y[k, i]) for k, i in enumerate(top)]
        doc["label"], doc["p"] = (names[0], p[0]) if single else (names, p)
    if gap:
        doc["gap"] = gap
    return json.dumps(doc, separators=(",", ":")).encode()


def error(code: str, detail: str, seq: int | None = None) -> bytes:
    return json.dumps({"seq": seq, "error": code, "detail": detail[:500]}).encode()

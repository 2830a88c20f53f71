"""The bundle manifest: parsed once, validated field by field, immutable afterwards.

A bundle is a directory holding ``model.tflite`` and ``manifest.json``. The manifest says
everything the runtime needs; the converter writes it (``convert.bundle``) from this module's
``to_dict`` so both sides share one schema.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import tflite_check
from .errors import BundleError, shown
from .outfile import KINDS

FORMAT = "edge-lstm-bundle"
FORMAT_VERSION = 2
# The output tensor holds logits and the runtime applies ``output.activation``, or the
# quantisation is a mode 0.1.0 does not know (``MIXED_MODES``). Written only by bundles that
# need it: an older runtime refuses those naming the version ("upgrade edge-lstm") instead of
# publishing logits or naming a quantization it calls invalid, and still reads the others.
ACTIVATION_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: LSTM-only state layout (h_in/h_out/c_in/c_out per layer)
MANIFEST_NAME = "manifest.json"
# Each is read whole, so each has a size limit: a real manifest is a few KiB, a step model a
# few MiB at most; beyond these a file is damaged or not a bundle's, and reading it could
# exhaust a small device's memory.
MANIFEST_LIMIT = 1 << 20
MODEL_LIMIT = 2 << 30
QUANT_MODES = ("int8", "int8-float-head", "int8-float-cell", "int16x8", "float16", "float32")
MIXED_MODES = ("int8-float-head", "int8-float-cell")  # written as ACTIVATION_VERSION
DTYPES = ("int8", "int16", "float32")
OUTPUT_KINDS = ("classifier", "regressor")
OUTPUT_ACTIVATIONS = ("linear", "softmax")  # applied by the runtime to the output tensor
STATE_ROLES = ("h", "c", "buffer")  # hidden state, LSTM cell state, convolution input buffer
NORMALIZATIONS = ("graph", "runtime")  # where (x - mean) / std happens
# The runtime's arithmetic ends in float32: a number beyond these turns into inf or 0 there.
F32_MAX = 3.4028234663852886e38
F32_TINY = 1.1754943508222875e-38  # the smallest normal float32
INT_RANGES = {"int8": (-128, 127), "int16": (-32768, 32767), "float32": (0, 0)}


@dataclass(frozen=True)
class TensorSpec:
    """One signature tensor. ``scale == 0`` means not quantised (float)."""

    name: str
    dtype: str
    width: int
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.dtype != "float32"


@dataclass(frozen=True)
class StateTensor:
    """One state tensor: fed as ``input``, read back from ``output`` after each step.

    ``role`` says what it holds (``h``, ``c`` or a convolution's ``buffer`` of past inputs),
    ``layer`` and ``cell`` which layer of the step owns it. The runtime treats every role
    alike: zero at the start of a stream, carried, snapshotted."""

    input: str
    output: str
    width: int
    role: str
    layer: int = 0
    cell: str = "lstm"


# Manifest fields that describe a bundle without changing what its model answers: left out of
# ``Manifest.model_sha256`` (a bundle verified again on another kernel set keeps its id).
DESCRIPTIVE = frozenset(
    {
        "format",
        "format_version",
        "model_file",
        "source_sha256",
        "source_name",
        "source",
        "fidelity",
        "interpreters",
        "kernels",
        "quantization_choice",  # why --quant auto chose the mode: the mode itself is kept
    }
)


@dataclass(frozen=True)
class Manifest:
    model_file: str
    tflite_sha256: str
    source_sha256: str
    quantization: str
    signature: str
    input: str
    output: str
    feature_names: tuple[str, ...]
    feature_units: tuple[str, ...]
    output_kind: str
    labels: tuple[str, ...]
    states: tuple[StateTensor, ...]
    tensors: Mapping[str, TensorSpec]
    sample_rate_hz: float | None = None
    fidelity: Mapping[str, Any] = field(default_factory=dict)
    interpreters: Mapping[str, Any] = field(default_factory=dict)
    kernels: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    output_activation: str = "linear"  # "softmax": the output tensor holds int8 logits

    @property
    def verified_kernels(self) -> tuple[str, ...] | None:
        """Kernel sets the converter verified this bundle with (``edge.backend`` names them);
        None for a manifest written before kernel sets were recorded."""
        if not self.kernels:
            return None
        return tuple(self.kernels.get("verified", ()))

    @property
    def features(self) -> int:
        return len(self.feature_names)

    @property
    def outputs(self) -> int:
        return self.tensors[self.output].width

    @functools.cached_property
    def model_sha256(self) -> str:
        """The model as it answers: the .tflite's digest with every manifest field that
        changes a prediction or the state (input normalisation, labels, output activation,
        tensors, ...), not those that only describe it (fidelity, interpreters, source).
        Two bundles of one .tflite that answer differently differ here."""
        doc = {k: v for k, v in self.to_dict().items() if k not in DESCRIPTIVE}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def model_id(self) -> str:
        """Short model id published with every prediction (of ``model_sha256``)."""
        return self.model_sha256[:12]

    @property
    def state_names(self) -> tuple[tuple[str, str], ...]:
        """(input name, output name) for every state tensor, in the manifest's order."""
        return tuple((s.input, s.output) for s in self.states)

    def state_layout(self) -> list[tuple[str, int, str, float, int]]:
        """What a snapshot or a hot reload must agree on to carry state over."""
        return [
            (
                n,
                self.tensors[n].width,
                self.tensors[n].dtype,
                self.tensors[n].scale,
                self.tensors[n].zero_point,
            )
            for n, _ in self.state_names
        ]

    def to_dict(self) -> dict[str, Any]:
        act = self.output_activation
        activation = {"activation": act} if act != "linear" else {}
        return {
            "format": FORMAT,
            "format_version": (
                ACTIVATION_VERSION
                if activation or self.quantization in MIXED_MODES
                else FORMAT_VERSION
            ),
            "model_file": self.model_file,
            "tflite_sha256": self.tflite_sha256,
            "source_sha256": self.source_sha256,
            "quantization": self.quantization,
            "signature": {"key": self.signature, "input": self.input, "output": self.output},
            "features": {
                "count": self.features,
                "names": list(self.feature_names),
                "units": list(self.feature_units),
            },
            "sample_rate_hz": self.sample_rate_hz,
            "output": {"kind": self.output_kind, "labels": list(self.labels), **activation},
            "state": [asdict(s) for s in self.states],
            "tensors": {name: asdict(spec) for name, spec in self.tensors.items()},
            "fidelity": dict(self.fidelity),
            "interpreters": dict(self.interpreters),
            **({"kernels": dict(self.kernels)} if self.kernels else {}),
            **dict(self.extra),
        }


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise BundleError(f"{where}: missing field {shown(key)}")
    value = d[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise BundleError(f"{where}: field {shown(key)} has the wrong type ({shown(value)})")
    return value


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None: JSON numbers include NaN, Infinity and integers
    too large for a float (``float()`` raises on those)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def parse(data: Mapping[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    """Validate a manifest dict; every error names the field and the bad value."""
    if not isinstance(data, Mapping):
        raise BundleError(f"{where}: not a JSON object")
    if data.get("format") != FORMAT:
        raise BundleError(f"{where}: field 'format' is {shown(data.get('format'))}, not {FORMAT!r}")
    version = _get(data, "format_version", int, where)
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"{where}: format_version {version} is not supported (this runtime reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade edge-lstm or re-convert the model"
        )
    quant = _get(data, "quantization", str, where)
    if quant not in QUANT_MODES:
        raise BundleError(f"{where}: quantization {shown(quant)} is not one of {QUANT_MODES}")
    sig = _get(data, "signature", dict, where)
    feats = _get(data, "features", dict, where)
    raw_names = _get(feats, "names", list, f"{where}: features")
    if not all(isinstance(n, str) and n for n in raw_names) or len(set(raw_names)) != len(
        raw_names
    ):
        raise BundleError(f"{where}: features.names must be distinct names, got {shown(raw_names)}")
    names = tuple(raw_names)
    count = _get(feats, "count", int, f"{where}: features")
    if count != len(names) or count < 1:
        raise BundleError(f"{where}: features.count {count} does not match {len(names)} names")
    raw_units = feats.get("units") or [""] * count
    if not isinstance(raw_units, list) or len(raw_units) != count:
        raise BundleError(
            f"{where}: features.units must list {count} units, got {shown(raw_units)}"
        )
    units = tuple(str(u) for u in raw_units)
    out = _get(data, "output", dict, where)
    kind = _get(out, "kind", str, f"{where}: output")
    if kind not in OUTPUT_KINDS:
        raise BundleError(f"{where}: output.kind {shown(kind)} is not one of {OUTPUT_KINDS}")
    tensors: dict[str, TensorSpec] = {}
    for name, spec in _get(data, "tensors", dict, where).items():
        w = f"{where}: tensors.{name}"
        if not isinstance(spec, Mapping):
            raise BundleError(f"{w}: not a JSON object ({shown(spec, 40)})")
        dtype = _get(spec, "dtype", str, w)
        if dtype not in DTYPES:
            raise BundleError(f"{w}: dtype {shown(dtype)} is not one of {DTYPES}")
        width = _get(spec, "width", int, w)
        raw_scale = _get(spec, "scale", (int, float), w)
        scale = _finite(raw_scale)
        if (
            width < 1
            or scale is None
            or scale < 0
            or (dtype != "float32") != (scale > 0)
            or (scale > 0 and not F32_TINY <= scale <= F32_MAX)
        ):
            raise BundleError(f"{w}: width {width} / scale {raw_scale} invalid for dtype {dtype}")
        zero_point = _get(spec, "zero_point", int, w)
        lo, hi = INT_RANGES[dtype]
        if not lo <= zero_point <= hi:
            raise BundleError(f"{w}: zero_point {zero_point} is outside {dtype}'s [{lo}, {hi}]")
        tensors[name] = TensorSpec(name, dtype, width, scale, zero_point)
    states = _parse_states(_get(data, "state", list, where), version, tensors, where)
    m_in, m_out = _get(sig, "input", str, where), _get(sig, "output", str, where)
    for name in (m_in, m_out):
        if name not in tensors:
            raise BundleError(
                f"{where}: signature tensor {shown(name)} is not described in 'tensors'"
            )
    if m_in == m_out:
        raise BundleError(f"{where}: signature input and output are both {shown(m_in)}")
    if tensors[m_in].width != count:
        raise BundleError(f"{where}: input width {tensors[m_in].width} != features.count {count}")
    raw_labels = out.get("labels") or []
    if not isinstance(raw_labels, list) or not all(isinstance(x, str) for x in raw_labels):
        raise BundleError(
            f"{where}: output.labels must be a list of names, got {shown(raw_labels)}"
        )
    if not all(raw_labels) or len(set(raw_labels)) != len(raw_labels):
        # the published label names the class: two classes named alike cannot be told apart
        raise BundleError(f"{where}: output.labels must be distinct names, got {shown(raw_labels)}")
    labels = tuple(raw_labels)
    activation = out.get("activation", "linear")
    if activation not in OUTPUT_ACTIVATIONS:
        raise BundleError(
            f"{where}: output.activation {shown(activation)} is not one of {OUTPUT_ACTIVATIONS}"
        )
    if version == ACTIVATION_VERSION and activation == "linear" and quant not in MIXED_MODES:
        # Only a bundle whose output tensor holds logits (or of a mixed mode) is written as
        # version 3: without its activation the logits would be published as the answer.
        raise BundleError(
            f"{where}: format_version {version} marks an output of logits, but "
            "output.activation is missing or 'linear'"
        )
    y_dtype = tensors[m_out].dtype
    if activation != "linear" and (version < ACTIVATION_VERSION or y_dtype != "int8"):
        raise BundleError(
            f"{where}: output.activation {shown(activation)} needs format_version "
            f"{ACTIVATION_VERSION} and an int8 output tensor (got {version}, {y_dtype})"
        )
    if kind == "classifier" and labels and len(labels) != tensors[m_out].width:
        raise BundleError(f"{where}: {len(labels)} labels for {tensors[m_out].width} outputs")
    known = {
        "format",
        "format_version",
        "model_file",
        "tflite_sha256",
        "source_sha256",
        "quantization",
        "signature",
        "features",
        "sample_rate_hz",
        "output",
        "state",
        "tensors",
        "fidelity",
        "interpreters",
        "kernels",
    }
    rate = data.get("sample_rate_hz")
    if rate is not None and not ((_finite(rate) or 0.0) > 0):
        raise BundleError(f"{where}: sample_rate_hz {shown(rate)} is not a positive number")
    for s in states:
        if {s.input, s.output} & {m_in, m_out}:
            raise BundleError(
                f"{where}: state tensor {shown(s.input)} is the model's input or output"
            )
    _check_state_encodings(data, states, tensors, where)
    _check_state_pairs(states, version, where)
    for key in ("fidelity", "interpreters"):  # records of the conversion, read as objects
        if not isinstance(data.get(key) or {}, Mapping):
            raise BundleError(
                f"{where}: field {shown(key)} has the wrong type ({shown(data[key], 40)})"
            )
    _check_normalization(data, count, where)
    return Manifest(
        model_file=_get(data, "model_file", str, where),
        tflite_sha256=_get(data, "tflite_sha256", str, where),
        source_sha256=str(data.get("source_sha256", "")),
        quantization=quant,
        signature=_get(sig, "key", str, where),
        input=m_in,
        output=m_out,
        feature_names=names,
        feature_units=units,
        output_kind=kind,
        labels=labels,
        states=states,
        tensors=tensors,
        sample_rate_hz=float(rate) if rate is not None else None,
        fidelity=dict(data.get("fidelity") or {}),
        interpreters=dict(data.get("interpreters") or {}),
        kernels=_kernels(data, where),
        extra={k: v for k, v in data.items() if k not in known},
        output_activation=activation,
    )


def _parse_states(
    entries: list[Any], version: int, tensors: Mapping[str, TensorSpec], where: str
) -> tuple[StateTensor, ...]:
    """Version 1 lists LSTM layers (h and c per entry); version 2 one entry per tensor."""
    states: list[StateTensor] = []
    for i, e in enumerate(entries):
        w = f"{where}: state[{i}]"
        if not isinstance(e, Mapping):
            raise BundleError(f"{w}: not a JSON object")
        if version == 1:
            units = _get(e, "units", int, w)
            states += [
                StateTensor(_get(e, "h_in", str, w), _get(e, "h_out", str, w), units, "h", i),
                StateTensor(_get(e, "c_in", str, w), _get(e, "c_out", str, w), units, "c", i),
            ]
            continue
        role = _get(e, "role", str, w)
        if role not in STATE_ROLES:
            raise BundleError(f"{w}: role {shown(role)} is not one of {STATE_ROLES}")
        states.append(
            StateTensor(
                _get(e, "input", str, w),
                _get(e, "output", str, w),
                _get(e, "width", int, w),
                role,
                _get(e, "layer", int, w),
                _get(e, "cell", str, w),
            )
        )
    for i, s in enumerate(states):
        w = f"{where}: state[{i if version > 1 else i // 2}]"
        for name in (s.input, s.output):
            if name not in tensors or tensors[name].width != s.width:
                raise BundleError(f"{w}: tensor {shown(name)} missing or not {s.width} wide")
    for side in ("input", "output"):
        seen = [getattr(s, side) for s in states]
        twice = sorted({n for n in seen if seen.count(n) > 1})
        if twice:
            raise BundleError(f"{where}: state {side} {shown(twice[0])} is listed twice")
    if {s.input for s in states} & {s.output for s in states}:
        raise BundleError(f"{where}: a state tensor is both an input and an output")
    if not states:
        raise BundleError(f"{where}: field 'state' lists no state tensor")
    return tuple(states)


def _check_state_encodings(
    data: Mapping[str, Any],
    states: tuple[StateTensor, ...],
    tensors: Mapping[str, TensorSpec],
    where: str,
) -> None:
    """A state output is fed back as its input. When the converter recorded that no state
    needs re-encoding (``state_requantization`` false), each output is encoded exactly as its
    input, so a pair that differs is cross-wired: h0 fed from c0_next is as wide and as int8
    as h0_next, but c's scale is not h's. (Float states carry no such mark.)"""
    requant = data.get("state_requantization", True)
    if not isinstance(requant, bool):
        raise BundleError(f"{where}: state_requantization {shown(requant)} is not true or false")
    if requant:
        return
    for s in states:
        i, o = tensors[s.input], tensors[s.output]
        if (i.dtype, i.scale, i.zero_point) != (o.dtype, o.scale, o.zero_point):
            raise BundleError(
                f"{where}: state output {shown(o.name)} is {o.dtype} ({o.scale}, {o.zero_point}), "
                f"its input {shown(i.name)} {i.dtype} ({i.scale}, {i.zero_point}), but "
                "state_requantization is false: the state outputs are cross-wired"
            )


def _check_state_pairs(states: tuple[StateTensor, ...], version: int, where: str) -> None:
    """The converter names each state output after its input (h0 -> h0_next). Outputs all so
    named but paired with another state's input are cross-wired: h0 fed from h1_next has h0's
    width and encoding, so no other check tells, and every answer would be wrong."""
    if {s.output for s in states} != {f"{s.input}_next" for s in states}:
        return  # named otherwise: nothing to go by
    for i, s in enumerate(states):
        if s.output != f"{s.input}_next":
            raise BundleError(
                f"{where}: state[{i if version > 1 else i // 2}] feeds {shown(s.input)} from "
                f"{shown(s.output)}, the next value of {shown(s.output[: -len('_next')])}: the "
                "state "
                "outputs are cross-wired"
            )


def _check_normalization(data: Mapping[str, Any], count: int, where: str) -> None:
    """``input_normalization`` is applied to every sample as (x - mean) / std; a mean or std
    the runtime's float32 cannot hold (NaN, inf, 1e300, 1e-300) gives garbage, not an error.
    Missing while ``normalization`` says the runtime normalises, the model gets raw units.
    (An explicit null is the converter's record of a model without normalisation.)"""
    mode = data.get("normalization")
    if mode is not None and mode not in NORMALIZATIONS:
        raise BundleError(f"{where}: normalization {shown(mode)} is not one of {NORMALIZATIONS}")
    if "input_normalization" not in data:
        if mode == "runtime":
            raise BundleError(
                f"{where}: normalization is 'runtime' but field 'input_normalization' is missing"
            )
        return
    norm = data["input_normalization"]
    if norm is None:
        return
    if mode == "graph":
        raise BundleError(
            f"{where}: normalization is 'graph' (the model normalises) but "
            "input_normalization is given: the input would be normalised twice"
        )
    w = f"{where}: input_normalization"
    if not isinstance(norm, Mapping):
        raise BundleError(f"{w} has the wrong type ({shown(norm)})")
    for key in ("mean", "std"):
        values = _get(norm, key, list, w)
        if len(values) != count:
            raise BundleError(f"{w}.{key} lists {len(values)} values for {count} features")
        for k, v in enumerate(values):
            x = _finite(v)
            if key == "mean":
                ok = x is not None and abs(x) <= F32_MAX
                need = f"a finite number within float32's +-{F32_MAX:.4g}"
            else:
                ok = x is not None and F32_TINY <= x <= F32_MAX
                need = f"a finite number in [{F32_TINY:.4g}, {F32_MAX:.4g}]"
            if not ok:
                raise BundleError(f"{w}.{key}[{k}] is {shown(v)}; it must be {need}")


def _kernels(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``kernels`` record: {"reference": NAME, "verified": [NAME, ...], "sets": {...}}."""
    if "kernels" not in data:
        return {}
    k = _get(data, "kernels", dict, where)
    verified = _get(k, "verified", list, f"{where}: kernels")
    if not all(isinstance(v, str) and v for v in verified):
        raise BundleError(
            f"{where}: kernels.verified must list kernel-set names, got {shown(verified)}"
        )
    reference = _get(k, "reference", str, f"{where}: kernels")
    if not isinstance(k.get("sets", {}), dict):
        raise BundleError(f"{where}: kernels.sets has the wrong type ({shown(k['sets'])})")
    if reference not in k.get("sets", {reference: None}):
        raise BundleError(
            f"{where}: kernels.reference {shown(reference)} is not one of kernels.sets"
        )
    return dict(k)


def _open_regular(
    path: Path, limit: int, what: str, within: tuple[int, Path] | None = None
) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file of at most ``limit`` bytes. A FIFO
    would block the open or the read forever, a device may never end, and each file is read
    whole: all of them are refused by ``stat`` before the open. The open never blocks, and the
    opened file is checked again in case the path changed in between. ``within``: (an open
    directory, the file's path in it) is what is opened; ``path`` only names it."""
    dir_fd, name = within if within is not None else (None, path)
    st = os.stat(name, dir_fd=dir_fd)  # FileNotFoundError and other OSErrors: the caller words them
    _check_regular(path, st, limit, what)
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    f = os.fdopen(fd, "rb")
    try:
        _check_regular(path, os.fstat(fd), limit, what)
    except BaseException:
        f.close()
        raise
    return f


def _check_regular(path: Path, st: os.stat_result, limit: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        raise BundleError(f"{path}: the {what} is {kind}, not a regular file")
    if st.st_size > limit:
        raise BundleError(
            f"{path}: the {what} is {st.st_size} bytes, over the limit of {limit} bytes"
        )


TFLITE_IDENTIFIER = b"TFL3"  # the flatbuffer file identifier of every .tflite, at byte 4


def read_bundle(directory: str | Path) -> tuple[Manifest, bytes]:
    """Read and check a bundle directory: manifest valid, tflite present, sha256 matching."""
    d = Path(directory)
    if not d.is_dir():
        raise BundleError(f"{d}: not a bundle directory")
    # Both files are read in the directory that is there now: a new bundle put in place
    # meanwhile (a symbolic link pointed at it, a directory renamed over) gave the manifest of
    # one and the model of the other, and a good new bundle was refused as modified.
    try:
        dir_fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise BundleError(f"{d}: not a bundle directory: {exc}") from exc
    try:
        return _read_bundle(d, dir_fd)
    finally:
        os.close(dir_fd)


def _read_bundle(d: Path, dir_fd: int) -> tuple[Manifest, bytes]:
    mpath = d / MANIFEST_NAME
    try:
        with _open_regular(mpath, MANIFEST_LIMIT, "manifest", (dir_fd, Path(MANIFEST_NAME))) as f:
            raw = f.read(MANIFEST_LIMIT + 1)
        if len(raw) > MANIFEST_LIMIT:  # grew after the size check
            raise BundleError(f"{mpath}: the manifest is over the limit of {MANIFEST_LIMIT} bytes")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{mpath}: missing; is {d} a bundle made by lstm-convert?") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: malformed JSON, or
        # an integer of more digits than Python converts (a traceback until it was caught)
        raise BundleError(f"{mpath}: unreadable: {exc}") from exc
    except RecursionError as exc:  # nesting far beyond any manifest's
        raise BundleError(f"{mpath}: unreadable: JSON nested too deeply") from exc
    manifest = parse(data, str(mpath))
    if "\0" in manifest.model_file:  # no file name holds one; os.stat raises ValueError
        raise BundleError(f"{mpath}: model_file {shown(manifest.model_file)} holds a NUL character")
    mfile = Path(manifest.model_file)
    if mfile.is_absolute() or ".." in mfile.parts:
        raise BundleError(
            f"{mpath}: model_file {shown(manifest.model_file)} must stay inside the bundle"
        )
    tpath = d / mfile
    try:
        with _open_regular(tpath, MODEL_LIMIT, "model", (dir_fd, mfile)) as f:
            content = _read_verified(f, tpath, manifest.tflite_sha256)
    except OSError as exc:
        raise BundleError(f"{tpath}: cannot read the model: {exc}") from exc
    if content[4:8] != TFLITE_IDENTIFIER:  # a manifest whose sha256 was made for another
        # file: the interpreters call it "model_path or model_content must be specified" (an
        # empty one), a 'utf-8' codec error or std::bad_alloc, naming no file
        raise BundleError(
            f"{tpath}: not a TFLite model ("
            + (f"{len(content)} bytes without" if content else "an empty file, no")
            + " 'TFL3' at byte 4), though its sha256 is the manifest's tflite_sha256"
        )
    # A model damaged before its sha256 was made: tflite-runtime reads its flatbuffer
    # unchecked and crashed (SIGSEGV) on offsets past the end. (edge.trial_load catches what
    # this walk of the schema cannot.)
    damage = tflite_check.problem(content)
    if damage is not None:
        raise BundleError(
            f"{tpath}: not a sound TFLite model ({damage}), though its sha256 is the manifest's "
            "tflite_sha256: the file was damaged (cut off or overwritten) before its sha256 "
            "was made; copy or convert the bundle again"
        )
    return manifest, content


def _read_verified(f: BinaryIO, path: Path, sha256: str) -> bytes:
    """The model's bytes, once their sha256 matches. Hashed in 1 MiB reads first, so a wrong
    or damaged file is refused without holding it in memory; then read whole (the interpreter
    takes bytes), and refused if it changed in between."""
    before = os.fstat(f.fileno())
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    digest = h.hexdigest()
    if digest != sha256:
        raise BundleError(
            f"{path}: sha256 {digest[:12]}... does not match the manifest's tflite_sha256 "
            f"{sha256[:12]}...; the bundle was modified or is incomplete"
        )
    f.seek(0)
    try:
        content = f.read(before.st_size + 1)
    except MemoryError as exc:
        raise BundleError(
            f"{path}: the model ({before.st_size} bytes) does not fit in the memory left"
        ) from exc
    after = os.fstat(f.fileno())
    if len(content) != before.st_size or (after.st_size, after.st_mtime_ns) != (
        before.st_size,
        before.st_mtime_ns,
    ):
        raise BundleError(f"{path}: the model changed while it was read; load it again")
    return content

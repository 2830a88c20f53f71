"""Calibration and the TFLite converter for every quantisation mode.

Calibration follows the runtime: the float reference runs over every calibration sequence and
over their concatenation (one long stream, so the long-run state ranges are covered), and
real ``(x_t, h_{t-1}, c_{t-1})`` triples from those runs feed the converter.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge.errors import shown

from . import reference, step_graph
from .errors import ConvertError
from .spec import Activation, Dense, GRUCell, LSTMCell, ModelSpec

MODES = ("int8", "int8-float-head", "int8-float-cell", "int16x8", "float16", "float32")
# ``--quant auto``'s order: by bundle size, smallest first, as measured on the example model
# (README, "Quantisation modes"); the float parts cost little, int16 activations double the
# state and output bytes.
AUTO_ORDER = ("int8", "int8-float-cell", "int8-float-head", "int16x8", "float16", "float32")
# int8 except the ops in these name scopes (see step_graph), kept float by TFLite's selective
# quantisation; the tensors' own names say which scope an op belongs to.
FLOAT_PARTS = {"int8-float-head": step_graph.HEAD_SCOPE, "int8-float-cell": step_graph.CELL_SCOPE}
C_CANDIDATES = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
SEARCH_STEPS = 4000  # steps of each run searched (sequences from zero state, one long stream)
BATCH = 16  # rows per representative batch


# Ranges known without data: the interval an activation's values lie in.
INTERVALS = {
    "tanh": (-1.0, 1.0),
    "softsign": (-1.0, 1.0),
    "sigmoid": (0.0, 1.0),
    "hard_sigmoid": (0.0, 1.0),
}
# A range read from calibration data gets this much room beyond what the data showed.
HEADROOM = 1.1


@dataclass(frozen=True)
class Calibration:
    x: np.ndarray  # [M, F], normalised as the graph sees it
    states: list[np.ndarray]  # per state tensor [M, W], the state *before* the step
    ranges: list[tuple[float, float]]  # per state tensor, the int8 range to pin


def calibrate(
    spec: ModelSpec,
    calib: np.ndarray,
    *,
    normalize_in_graph: bool,
    search_c_range: bool,
    regime: str = "sequences",
    samples: int = 1024,
    seed: int = 0,
) -> Calibration:
    """``search_c_range``: pick the int8 cell-state range (only int8 pins state ranges), for
    the verdict's ``regime`` (see ``choose_c_range``)."""
    long = calib.reshape(1, -1, calib.shape[-1])
    xs, states, ys, runs = [], [], [], []
    for data, what in ((calib, "sequence"), (long, "the sequences run back to back")):
        y, before, xn = reference.run(spec, data)
        _finite_or_refuse(spec, y, before, what)
        xs.append((data if normalize_in_graph else xn).reshape(-1, spec.features))
        states.append([b.reshape(-1, b.shape[-1]) for b in before])
        ys.append(y.reshape(-1, y.shape[-1]))
        # about SEARCH_STEPS steps of each for the search: whole sequences, the stream's head
        n = max(1, SEARCH_STEPS // data.shape[1])
        runs.append((xn[:n, :SEARCH_STEPS], y[:n, :SEARCH_STEPS]))
    x_all = np.concatenate(xs)
    st_all = [np.concatenate([s[k] for s in states]) for k in range(len(states[0]))]
    ranges = base_ranges(spec, st_all)
    if search_c_range and any(s.role == "c" for s in spec.states):
        # the last run is the long stream: its states give the ranges searched
        stream = [b[0, :SEARCH_STEPS] for b in before]
        if regime == "continuous":  # judged on unreset streams: the stream alone, one round
            ranges = choose_c_range(spec, runs[1:], stream, rounds=1)
        else:
            ranges = choose_c_range(spec, runs, stream, rounds=2)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x_all), size=min(samples, len(x_all)), replace=False)
    # Plus the rows holding every column's extremes (inputs, outputs, states), so the ranges
    # the converter reads cover all of the calibration data, not only a random sample of it.
    extremes = [
        idx for a in (x_all, np.concatenate(ys), *st_all) for idx in (a.argmin(0), a.argmax(0))
    ]
    pick = np.unique(np.concatenate([pick, *extremes]))
    # the TFLite calibrator needs every batch of the same size (BATCH rows)
    pick = np.resize(pick, -(-len(pick) // BATCH) * BATCH)
    return Calibration(
        x_all[pick].astype(np.float32), [s[pick].astype(np.float32) for s in st_all], ranges
    )


def _finite_or_refuse(spec: ModelSpec, y: np.ndarray, states: list[np.ndarray], what: str) -> None:
    """A float model that overflows on its own calibration data has no ranges to quantise
    to, and no float reference to verify against: said here, naming where, not later as an
    invalid scale deep in a bundle."""
    named = [(f"state {shown(s.name)} (layer {s.layer})", b) for s, b in zip(spec.states, states)]
    for name, a in [*named, ("output", y)]:
        bad = ~np.isfinite(a)
        if bad.any():
            seq, step = (int(v) for v in np.argwhere(bad)[0][:2])
            where = (
                f"sequence {seq}, step {step}" if what == "sequence" else f"step {step} of {what}"
            )
            raise ConvertError(
                f"the float model's {name} becomes NaN or infinite on --calib ({where}): it "
                "diverges there, so it cannot be quantised or verified (check its activations "
                "and training)"
            )


def _hull_with_zero(lo: float, hi: float) -> tuple[float, float]:
    return min(lo, 0.0), max(hi, 0.0)


def base_ranges(spec: ModelSpec, seen: list[np.ndarray]) -> list[tuple[float, float]]:
    """Every state's int8 range: an activation's own interval where the cell bounds the state
    by it (h of a tanh LSTM is in [-1, 1] whatever the data), else what calibration saw plus
    ``HEADROOM``. A cell state starts at the calibrated maximum; ``choose_c_range`` refines it.
    A convolution's buffer right after a recurrent layer holds that layer's past ``h``: it gets
    ``h``'s range, which the int8 concatenation of the two needs (one scale for all its
    operands; two pinned apart stop the converter)."""
    out: list[tuple[float, float]] = []
    h_range: dict[int, tuple[float, float]] = {}
    for s, values in zip(spec.states, seen):
        layer = spec.layers[s.layer]
        known = h_range.get(s.layer - 1) if s.role == "buffer" else None
        if s.role == "h":
            act = INTERVALS.get(getattr(layer, "activation", ""))
            gate = getattr(layer, "recurrent_activation", "sigmoid")
            if act is not None and INTERVALS.get(gate) == (0.0, 1.0):
                known = _hull_with_zero(*act)
        if s.role == "c":
            c = max(float(np.abs(values).max()) * HEADROOM, 1.0)
            known = (-c, c)
        if known is None:
            lo, hi = _hull_with_zero(float(values.min()), float(values.max()))
            known = (lo * HEADROOM, max(hi * HEADROOM, lo * -1e-3, 1e-3))
        if s.role == "h":
            h_range[s.layer] = known
        out.append(known)
    return out


def _fake_quant(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = (hi - lo) / 255.0
    return np.clip(np.rint((v - lo) / scale), 0, 255) * scale + lo


def simulate_error(
    spec: ModelSpec, xn: np.ndarray, y_float: np.ndarray, ranges: list[tuple[float, float]]
) -> float:
    """Mean |y - y_float| of the float reference with its state rounded to the int8 grid;
    ``xn`` [N, T, F]: N sequences from zero state, stepped together."""
    state = reference.zero_state(spec, xn.shape[0])
    err = 0.0
    for t in range(xn.shape[1]):
        y, state = reference.step(spec, xn[:, t], state, normalized=True)
        state = [_fake_quant(s, *r) for s, r in zip(state, ranges)]
        err += float(np.abs(y - y_float[:, t]).mean())
    return err / xn.shape[1]


def choose_c_range(
    spec: ModelSpec,
    runs: list[tuple[np.ndarray, np.ndarray]],
    before: list[np.ndarray],
    *,
    rounds: int = 2,
) -> list[tuple[float, float]]:
    """The int8 range of C is a trade: too wide and small cell values lose resolution, too
    narrow and large ones clip. |C| beyond ~4 barely moves tanh(C), so clipping there is often
    cheap; pick the ranges whose state rounding disturbs the float model's output least.

    ``runs``: float reference runs, (normalised inputs [N, T, F], outputs [N, T, O]) each;
    ``before``: every state before each step of one run [T, W]. With several runs a range is
    judged by its worst error relative to the best any range gets on that run, so that no
    regime pays much for the other. ``rounds``: passes over the layers; in the first each
    layer's range is picked with the layers after it still at their calibrated maximum (a
    stacked cell's can be 10-100x what it needs), a second picks each again given the others'.

    A model reset between sequences is judged on both, sequences from a zero state (parity)
    and one long stream (drift): searched on the stream alone in one round, a 2-layer nn.LSTM
    classifier's cells got +-6 and +-24 and its int8 bundle agreed with the float model on
    97.4% of the steps of its test sequences; on both in two rounds +-8 and +-16, and 99.2%.
    Where only unreset streams are judged the stream alone is searched."""
    ranges = base_ranges(spec, before)
    cells = [k for k, s in enumerate(spec.states) if s.role == "c"]
    for k in cells * (rounds if len(cells) > 1 else 1):
        # one layer's cell at a time, the others at their range so far: layers' cells can
        # differ by orders of magnitude, and one range for all coarsens the smaller ones
        c_seen = float(np.abs(before[k]).max())
        cands = [c for c in C_CANDIDATES if c < c_seen * 1.1] + [max(1.0, c_seen * 1.1)]

        def with_c(
            c: float, k: int = k, base: list[tuple[float, float]] = ranges
        ) -> list[tuple[float, float]]:
            return [(-c, c) if j == k else r for j, r in enumerate(base)]

        errors = np.array([[simulate_error(spec, x, y, with_c(c)) for x, y in runs] for c in cands])
        worst = (errors / np.maximum(errors.min(axis=0), 1e-12)).max(axis=1)
        ranges = with_c(cands[int(worst.argmin())])
    return ranges


def state_ranges(spec: ModelSpec, cal: Calibration) -> list[tuple[float, float]]:
    return cal.ranges


def layer_input_ranges(
    spec: ModelSpec, cal: Calibration, *, normalize_in_graph: bool
) -> dict[int, tuple[float, float]]:
    """Per layer index, the (min, max) of its input over the calibration rows (one step of the
    float reference from each row's state)."""
    inp = reference.normalize(spec, cal.x) if normalize_in_graph else cal.x.astype(np.float64)
    owners = [s.layer for s in spec.states]
    out: dict[int, tuple[float, float]] = {}
    k = 0
    for i, layer in enumerate(spec.layers):
        out[i] = (float(inp.min()), float(inp.max()))
        n = owners.count(i)
        inp, _ = reference.layer_step(layer, inp, cal.states[k : k + n])
        k += n
    return out


# Past these pre-activations an int8 activation's output is its first or last code: the int8
# sigmoid (scale 1/256) gives its top code for z > 5.2 and its bottom one below -6.3, tanh (scale
# 1/128) for |z| > 3.1; with room for the rounding of z itself.
SATURATES = {"sigmoid": 7.0, "tanh": 3.5}


def gate_ranges(
    spec: ModelSpec, cal: Calibration, *, normalize_in_graph: bool
) -> dict[int, dict[str, tuple[float, float]]]:
    """Per LSTM / GRU layer, per gate whose calibrated pre-activation reaches beyond where its
    activation saturates in int8 (``SATURATES``), that range cut there. The calibrated range
    of a gate fed outlying inputs can span +-15 and more, all of it at one int8 scale: cut
    where the activation's output no longer changes, the values that do change it are
    resolved several times finer, and no output moves by more than its rounding."""
    inp = reference.normalize(spec, cal.x) if normalize_in_graph else cal.x.astype(np.float64)
    owners = [s.layer for s in spec.states]
    out: dict[int, dict[str, tuple[float, float]]] = {}
    k = 0
    for i, layer in enumerate(spec.layers):
        n = owners.count(i)
        st = [s.astype(np.float64) for s in cal.states[k : k + n]]
        stacked = any(isinstance(b, (LSTMCell, GRUCell)) for b in spec.layers[:i])
        pre = _preactivations(layer, inp, st, stacked=stacked)
        pins = {}
        for g, (z, act, extra) in pre.items():
            if act not in SATURATES:
                continue
            bound = SATURATES[act] + extra
            lo, hi = _hull_with_zero(float(z.min()), float(z.max()))
            if lo < -bound or hi > bound:
                pins[g] = (max(lo, -bound), min(hi, bound))
        if pins:
            out[i] = pins
        inp, _ = reference.layer_step(layer, inp, st)
        k += n
    return out


def _preactivations(
    layer: object, inp: np.ndarray, st: list[np.ndarray], *, stacked: bool
) -> dict[str, tuple[np.ndarray, str, float]]:
    """Per gate of a recurrent layer (its pre-activation on these rows, its activation, 0),
    and per gate ``x<gate>`` (the input's part of it, the activation, the most the recurrent
    part can add: h in [-1, 1]); the input's part beyond that plus the saturation bound
    saturates the gate whatever h is."""
    if isinstance(layer, LSTMCell):
        h = st[0]
        xp = inp @ layer.kernel + (0.0 if stacked else layer.bias)
        reach = np.abs(layer.recurrent).sum(0) + (np.abs(layer.bias) if stacked else 0.0)
        z = xp + h @ layer.recurrent + (layer.bias if stacked else 0.0)
        out = {}
        for g in "ifco":
            act = layer.activation if g == "c" else layer.recurrent_activation
            out[g] = (layer.gate(g, z), act, 0.0)
            out["x" + g] = (layer.gate(g, xp), act, float(layer.gate(g, reach).max()))
        return out
    if isinstance(layer, GRUCell):
        h = st[0]
        x = inp @ layer.kernel + layer.input_bias
        ract = layer.recurrent_activation
        reach = np.abs(layer.recurrent).sum(0) + np.abs(layer.recurrent_bias)
        if layer.reset_after:
            r_ = h @ layer.recurrent + layer.recurrent_bias
            zr = {g: layer.gate(g, x) + layer.gate(g, r_) for g in "zr"}
            r = reference.activate(zr["r"], ract)
            hh = layer.gate("h", x) + r * layer.gate("h", r_)
        else:
            zr = {g: layer.gate(g, x) + h @ layer.gate(g, layer.recurrent) for g in "zr"}
            r = reference.activate(zr["r"], ract)
            hh = layer.gate("h", x) + (r * h) @ layer.gate("h", layer.recurrent)
        acts = {"z": ract, "r": ract, "h": layer.activation}
        out = {"z": (zr["z"], ract, 0.0), "r": (zr["r"], ract, 0.0), "h": (hh, acts["h"], 0.0)}
        for g in "zrh":
            out["x" + g] = (layer.gate(g, x), acts[g], float(layer.gate(g, reach).max()))
        return out
    return {}


# Where one weight tensor holds a gate's input rows and recurrent rows (``step_graph._lstm_fn``),
# neither part may span more than this many times the other's magnitude: the smaller part's
# weights would be rounded that much coarser than with a tensor of their own.
MAX_WEIGHT_IMBALANCE = 2.0
# ...and the scaled input must use at least this share of h's int8 codes.
MIN_SHARED_RANGE_USE = 0.5
# An input inside h's range using at least this share of it joins h unscaled (no MUL).
UNSCALED_USE = 0.8


def input_scales(
    spec: ModelSpec, cal: Calibration, *, normalize_in_graph: bool
) -> dict[int, float | None]:
    """Per LSTM layer, the factor that maps its input's calibrated range into the range of its
    ``h`` (an integer concatenation ``[input, h]`` shares ``h``'s scale), or None where the
    input cannot share it well: an input with signs ``h`` lacks, one that would use under
    ``MIN_SHARED_RANGE_USE`` of the codes, or one whose scaled weights would differ from the
    recurrent ones by more than ``MAX_WEIGHT_IMBALANCE`` (e.g. a first layer fed raw features
    with outliers); that input gets FCs of its own."""
    seen = layer_input_ranges(spec, cal, normalize_in_graph=normalize_in_graph)
    h_range = {s.layer: cal.ranges[k] for k, s in enumerate(spec.states) if s.role == "h"}
    out: dict[int, float | None] = {}
    for i, layer in enumerate(spec.layers):
        if not isinstance(layer, LSTMCell):
            continue
        (lo, hi), (h_lo, h_hi) = _hull_with_zero(*seen[i]), h_range[i]
        fits = [b / a for a, b in ((lo, h_lo), (hi, h_hi)) if a != 0.0]
        k = min(fits, default=1.0)
        if k >= 1.0 and (hi - lo) / (h_hi - h_lo) >= UNSCALED_USE:
            k = 1.0  # e.g. a stacked layer's input, the h below it: no MUL needed
        use = k * (hi - lo) / (h_hi - h_lo)
        balanced = k > 0.0 and all(
            _within(
                float(np.abs(layer.gate(g, layer.kernel)).max()) / k,
                float(np.abs(layer.gate(g, layer.recurrent)).max()),
                MAX_WEIGHT_IMBALANCE,
            )
            for g in "ifco"
        )
        out[i] = k if balanced and use >= MIN_SHARED_RANGE_USE else None
    return out


def _within(a: float, b: float, factor: float) -> bool:
    return a <= factor * b and b <= factor * a


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """The converter prints C++ log lines straight to fd 2; keep the terminal readable."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def unfit(spec: ModelSpec, mode: str) -> str | None:
    """Why ``mode`` cannot apply to this model (None: it can)."""
    if mode == "int8-float-head" and _head_start(spec) >= len(spec.layers):
        return "int8-float-head: the model has no output layers after its last recurrent layer"
    if mode == "int8-float-cell" and not any(s.role == "c" for s in spec.states):
        return "int8-float-cell: the model has no LSTM cell state"
    if mode not in ("float16", "float32"):
        integer = spec.layers[: _head_start(spec)] if mode == "int8-float-head" else spec.layers
        i = next((i for i, la in enumerate(integer) if "softsign" in _activations(la)), None)
        if i is not None:
            return f"{mode}: layer {i} uses softsign, whose DIV TFLite cannot run in integers"
    return None


def _activations(layer: object) -> set[str]:
    if isinstance(layer, Activation):
        return {layer.name}
    return {getattr(layer, a) for a in ("activation", "recurrent_activation") if hasattr(layer, a)}


def runtime_softmax(spec: ModelSpec, mode: str) -> bool:
    """Whether the graph ends at the logits and the runtime applies the softmax: in int8,
    where the interpreter's SOFTMAX rounds differently per machine (``edge.softmax``). The
    mixed modes' float output keeps it in the graph (no int8 logits to start from)."""
    return mode == "int8" and spec.final_activation == "softmax"


def logits(spec: ModelSpec) -> ModelSpec:
    """``spec`` without its final softmax (the last layer: see ``ModelSpec.final_activation``)."""
    last = spec.layers[-1]
    if isinstance(last, Activation):
        return replace(spec, layers=spec.layers[:-1])
    assert isinstance(last, Dense), last
    return replace(spec, layers=(*spec.layers[:-1], replace(last, activation="linear")))


def _head_start(spec: ModelSpec) -> int:
    return 1 + max((s.layer for s in spec.states), default=-1)


def _float_nodes(calibrated: bytes, spec: ModelSpec, mode: str) -> list[str]:
    """The tensors ``mode`` keeps float: every tensor named in its scope, plus the signature
    outputs that scope computes (an output tensor carries the signature's name, not the op's:
    ``y`` for the head, each ``c{n}_next`` for the cell)."""
    from edge.backend import select

    it, runner = select().open(calibrated, "serving_default")
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    scope = FLOAT_PARTS[mode]
    out = [n for n in names.values() if any(scope in p.split("/") for p in n.split(";"))]
    outputs = runner.get_output_details()
    keep = ["y"] if mode == "int8-float-head" else [s.output for s in spec.states if s.role == "c"]
    return out + [names[outputs[k]["index"]] for k in keep]


def convert(
    spec: ModelSpec,
    cal: Calibration,
    mode: str,
    *,
    normalize_in_graph: bool,
    per_channel: bool = False,
) -> bytes:
    if mode not in MODES:
        raise ConvertError(f"--quant {shown(mode)} is not one of {', '.join(MODES)}")
    import tensorflow as tf

    if (why := unfit(spec, mode)) is not None:
        raise ConvertError(why)
    integer = mode.startswith("int")
    ranges: list[tuple[float, float] | None] | None = None
    if mode.startswith("int8"):
        ranges = list(state_ranges(spec, cal))
        if mode == "int8-float-cell":  # C stays float: no int8 range on it
            ranges = [None if s.role == "c" else r for s, r in zip(spec.states, ranges)]
    scales = input_scales(spec, cal, normalize_in_graph=normalize_in_graph) if integer else None
    gates = (
        gate_ranges(spec, cal, normalize_in_graph=normalize_in_graph) if mode == "int8" else None
    )
    fn, owner = step_graph.build(
        logits(spec) if runtime_softmax(spec, mode) else spec,
        normalize_in_graph=normalize_in_graph,
        state_ranges=ranges,
        input_scales=scales,
        gate_ranges=gates,
    )
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn], owner)
    names = [n for n, _, _ in step_graph.state_names(spec)]

    def representative() -> Iterator[dict[str, Any]]:
        for i in range(0, len(cal.x), BATCH):
            feed = {"x": cal.x[i : i + BATCH]}
            for n, s in zip(names, cal.states):
                feed[n] = s[i : i + BATCH]
            yield feed

    if integer:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        # Each gate has its own weight tensor (see step_graph), so one scale per tensor loses
        # little, while per-channel parameters cost 12 bytes per channel per tensor: ~40% of
        # the int8 file for the example model. ``per_channel=True`` opts back in.
        conv._experimental_disable_per_channel = not per_channel
        if mode in FLOAT_PARTS:
            return _selective(conv, spec, mode, per_channel=per_channel)
        if mode == "int8":
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = conv.inference_output_type = tf.int8
        else:
            conv.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            ]
            conv.inference_input_type = conv.inference_output_type = tf.int16
    elif mode == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    try:
        with _quiet_native_stderr():
            result: bytes = conv.convert()
    except Exception as exc:
        raise converter_failed(mode, exc) from exc
    return match_bias_scales(result) if integer else result


# XNNPACK takes an int8 FULLY_CONNECTED only when input scale x weight scale / output scale is
# below 256; past it LiteRT's delegate aborts the process (a double free) on the first invoke
XNNPACK_MAX_REQUANT = 256.0


def _widen_collapsed_outputs(model: Any, fc: list[int]) -> bool:
    """Every int8 FULLY_CONNECTED's output scale at least its input scale times weight scale
    over ``XNNPACK_MAX_REQUANT``. A layer that gives the same value on every calibration sample
    (a ReLU that never fires) is calibrated to a range of a few millionths, a scale far finer
    than one unit of the kernel's integer sum (input scale x weight scale), so the output can
    hold nothing but that one value: at the coarser scale it holds the same, and XNNPACK takes
    the op. Returns whether a scale changed (their consumers' biases follow in
    ``match_bias_scales``)."""
    from tensorflow.lite.python import schema_py_generated as fb

    changed = False
    for sg in model.subgraphs:
        for op in sg.operators:
            if op.opcodeIndex not in fc or len(op.inputs) < 2 or not len(op.outputs):
                continue
            x, w, y = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]], sg.tensors[op.outputs[0]]
            if any(t.type != fb.TensorType.INT8 for t in (x, w, y)):
                continue
            qx, qw, qy = x.quantization, w.quantization, y.quantization
            if qx is None or qw is None or qy is None or qy.scale is None or len(qy.scale) != 1:
                continue
            unit = float(qx.scale[0]) * float(np.max(np.asarray(qw.scale, np.float64)))
            if unit / float(qy.scale[0]) >= XNNPACK_MAX_REQUANT:
                qy.scale = [float(np.float32(unit))]
                changed = True
    return changed


def match_bias_scales(content: bytes) -> bytes:
    """Every integer FULLY_CONNECTED's bias at the scale its kernel adds it at: input scale
    times weight scale. TFLite's quantiser scales a bias by its input's calibrated range, and
    where that input is pinned by a fake-quant to a wider range (a state ``h``, [-1, 1]; a
    concatenation holding one) it gets the pinned scale: the kernels add the bias as if it
    were at the product scale, so it counted (product / bias scale) times too much (5x for a
    head reading an LSTM's ``h`` of calibrated range 0.2), and the built-in kernels refused a
    mismatch over 2% of the output scale ('scale_diff / output_scale <= 0.02'). The bias's
    integers are rescaled to the product scale, so it adds what the float model adds. Output
    scales collapsed on a constant layer are widened first (``_widen_collapsed_outputs``)."""
    from tensorflow.lite.python import schema_py_generated as fb

    model = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(content, 0))
    wide = {fb.TensorType.INT32: np.int32, fb.TensorType.INT64: np.int64}
    integer = (fb.TensorType.INT8, fb.TensorType.INT16)
    fc = [
        k
        for k, oc in enumerate(model.operatorCodes)
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == fb.BuiltinOperator.FULLY_CONNECTED
    ]
    done: set[int] = set()
    changed = _widen_collapsed_outputs(model, fc)  # first: it changes inputs' scales
    for sg in model.subgraphs:
        for op in sg.operators:
            ins = list(op.inputs)
            if op.opcodeIndex not in fc or len(ins) < 3 or ins[2] < 0 or ins[2] in done:
                continue
            x, w, b = (sg.tensors[i] for i in ins[:3])
            if x.type not in integer or w.type != fb.TensorType.INT8 or b.type not in wide:
                continue
            qx, qw, qb = x.quantization, w.quantization, b.quantization
            data = model.buffers[b.buffer].data
            if qx is None or qw is None or qb is None or data is None or not len(data):
                continue
            want = np.float64(qx.scale[0]) * np.asarray(qw.scale, np.float64)
            have = np.asarray(qb.scale, np.float64)
            done.add(ins[2])
            if np.allclose(have, want, rtol=1e-6, atol=0.0):
                continue
            kind = wide[b.type]
            ints = np.frombuffer(np.asarray(data, np.uint8).tobytes(), kind).astype(np.float64)
            lim = np.iinfo(kind)
            fixed = np.clip(np.round(ints * have / want), lim.min, lim.max).astype(kind)
            model.buffers[b.buffer].data = np.frombuffer(fixed.tobytes(), np.uint8)
            qb.scale = np.broadcast_to(want, have.shape).astype(np.float32).tolist()
            changed = True
    if not changed:
        return content
    import flatbuffers

    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def converter_failed(mode: str, exc: BaseException) -> ConvertError:
    """One line from what the TFLite converter raised: MLIR's errors come as several lines
    (``<loc>: error: ...``, then ``note: called from`` lines), the first error says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    why = errors[0].split(": error: ", 1)[1] if errors else (lines[0] if lines else repr(exc))
    return ConvertError(f"the TFLite converter failed ({mode}): {why}")


def _selective(conv: Any, spec: ModelSpec, mode: str, *, per_channel: bool) -> bytes:
    """TFLite's selective quantisation (what ``tf.lite.experimental.QuantizationDebugger``
    does with ``denylisted_nodes``): calibrate only, then quantise everything to int8 except
    the denylisted tensors' ops, which stay float. Inputs and outputs are float32 (the
    quantiser's selective path does not make them integer); the int8 states still round-trip
    exactly, as their QUANTIZE and DEQUANTIZE share one scale."""
    from tensorflow.lite.python import convert as tflite_convert

    conv.experimental_mlir_quantizer = True
    conv._experimental_calibrate_only = True
    try:
        with _quiet_native_stderr():
            calibrated = conv.convert()
            quantized = tflite_convert.mlir_quantize(
                calibrated,
                disable_per_channel=not per_channel,
                fully_quantize=False,
                denylisted_nodes=_float_nodes(calibrated, spec, mode),
            )
            return match_bias_scales(bytes(quantized))
    except Exception as exc:
        raise converter_failed(mode, exc) from exc

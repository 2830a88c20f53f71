"""The one-step TF function: explicit state in and out, plain ops only.

Inputs ``x [B, F]`` and every state tensor of ``spec.states`` (``h0``, ``c0``, ``buf0``, ...);
outputs ``y`` and ``<state>_next``. For int8, fake-quant nodes pin every state input and its
matching output to the same range so the converter gives them identical scale/zero-point and
the runtime feeds the int8 bytes straight back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .spec import (
    Activation,
    Affine,
    Conv1D,
    Dense,
    GRUCell,
    LayerNorm,
    LSTMCell,
    ModelSpec,
    SimpleRNNCell,
)

RECURRENT = (LSTMCell, GRUCell, SimpleRNNCell)
HEAD_SCOPE = "head"  # the output layers' ops (see ``build``)
CELL_SCOPE = "cell"  # an LSTM's cell-state update and tanh(C) (see ``_lstm_fn``)


def state_names(spec: ModelSpec) -> list[tuple[str, str, int]]:
    """(input name, output name, width) for every state tensor, in signature order."""
    return [(s.name, s.output, s.width) for s in spec.states]


def tf_activation(name: str) -> Callable[[Any], Any]:
    import tensorflow as tf

    table: dict[str, Callable[[Any], Any]] = {
        "linear": lambda z: z,
        "sigmoid": tf.sigmoid,
        "tanh": tf.tanh,
        "relu": tf.nn.relu,
        "relu6": tf.nn.relu6,
        "hard_sigmoid": lambda z: tf.nn.relu6(z + 3.0) / 6.0,
        "hard_silu": lambda z: z * tf.nn.relu6(z + 3.0) / 6.0,
        "softsign": lambda z: z / (1.0 + tf.abs(z)),
        "softplus": tf.nn.softplus,
        "elu": tf.nn.elu,
        "selu": tf.nn.selu,
        "silu": lambda z: z * tf.sigmoid(z),
        "gelu": lambda z: tf.nn.gelu(z, approximate=False),
        "exponential": tf.exp,
        "leaky_relu": lambda z: tf.nn.leaky_relu(z, alpha=0.2),
        "softmax": tf.nn.softmax,
    }
    return table[name]


def _gates(a: np.ndarray, units: int, count: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(a[..., k * units : (k + 1) * units]) for k in range(count)]


def build(
    spec: ModelSpec,
    *,
    normalize_in_graph: bool,
    state_ranges: Sequence[tuple[float, float] | None] | None = None,
    input_scales: Mapping[int, float | None] | None = None,
    gate_ranges: Mapping[int, Mapping[str, tuple[float, float]]] | None = None,
) -> tuple[Any, Any]:
    """(concrete function, the module owning it). ``state_ranges`` adds fake-quants (none
    on a state whose range is None).

    ``input_scales``: per LSTM layer index, the factor its input is scaled by before it joins
    ``h`` in one tensor (see ``_lstm_fn``), or None for an input FC apart from the recurrent
    one; a layer not named gets 1.0.

    ``gate_ranges``: per recurrent layer index, per gate, the int8 range its pre-activation is
    pinned to (``quantize.gate_ranges``); a gate not named keeps its calibrated range."""
    import tensorflow as tf

    c = tf.constant
    mean = c(spec.norm_mean) if normalize_in_graph and spec.norm_mean is not None else None
    std = c(spec.norm_std) if mean is not None else None
    states = spec.states
    slots = {i: [k for k, s in enumerate(states) if s.layer == i] for i in range(len(spec.layers))}

    def pin(t: Any, k: int) -> Any:
        if state_ranges is None or state_ranges[k] is None:
            return t
        lo, hi = state_ranges[k]
        return tf.quantization.fake_quant_with_min_max_args(t, min=lo, max=hi, num_bits=8)

    scales = input_scales or {}
    steps: list[LayerFn] = []
    for i, layer in enumerate(spec.layers):
        gates = _pins(tf, (gate_ranges or {}).get(i, {}))
        if isinstance(layer, LSTMCell):
            stacked = any(isinstance(b, RECURRENT) for b in spec.layers[:i])
            steps.append(
                _lstm_fn(layer, tf, c, scales.get(i, 1.0), bias_with_h=stacked, gate_pin=gates)
            )
        else:
            steps.append(_layer_fn(layer, tf, c, gate_pin=gates))

    specs = [tf.TensorSpec([None, spec.features], tf.float32, name="x")]
    specs += [tf.TensorSpec([None, s.width], tf.float32, name=s.name) for s in states]

    # Every op after the last recurrent layer's h lies in the name scope HEAD_SCOPE, so a mixed
    # quantisation mode can find the output layers by their tensors' names.
    head = 1 + max((i for i, layer in enumerate(spec.layers) if slots[i]), default=-1)

    @tf.function(input_signature=specs)  # type: ignore[misc]
    def step(x: Any, *state: Any) -> dict[str, Any]:
        inp = (x - mean) / std if mean is not None else x
        out = {}
        for i, fn in enumerate(steps):
            ks = slots[i]
            with tf.name_scope(HEAD_SCOPE if i >= head else f"layer{i}"):
                inp, new = fn(
                    inp, [pin(state[k], k) for k in ks], lambda j, t, ks=ks: pin(t, ks[j])
                )
            for k, t in zip(ks, new):
                out[states[k].output] = t
        out["y"] = inp
        return out

    module = tf.Module()
    module.step = step
    return step.get_concrete_function(), module


Pin = Callable[[int, Any], Any]
LayerFn = Callable[[Any, list[Any], Pin], tuple[Any, list[Any]]]
GatePin = Callable[[str, Any], Any]


def _pins(tf: Any, ranges: Mapping[str, tuple[float, float]]) -> GatePin:
    """A gate's pre-activation pinned to its range in ``ranges``, or left as it is."""

    def pin(gate: str, t: Any) -> Any:
        if gate not in ranges:
            return t
        lo, hi = ranges[gate]
        return tf.quantization.fake_quant_with_min_max_args(t, min=lo, max=hi, num_bits=8)

    return pin


def _layer_fn(
    layer: Any, tf: Any, c: Callable[[Any], Any], *, gate_pin: GatePin | None = None
) -> LayerFn:
    """A TF function of (input, this layer's state, pin) -> (output, new state); ``pin(j, t)``
    gives state output ``j`` the range of state input ``j``."""
    gp = gate_pin or (lambda g, t: t)
    if isinstance(layer, Dense):
        w, b, act = c(layer.kernel), c(layer.bias), tf_activation(layer.activation)
        return lambda inp, st, pin: (act(tf.matmul(inp, w) + b), [])
    if isinstance(layer, Affine):
        sc, sh = c(layer.scale), c(layer.shift)
        return lambda inp, st, pin: (inp * sc + sh, [])
    if isinstance(layer, Activation):
        act = tf_activation(layer.name)
        return lambda inp, st, pin: (act(inp), [])
    if isinstance(layer, LayerNorm):
        g, b, eps, rms = c(layer.gamma), c(layer.beta), layer.epsilon, layer.rms
        plain = layer.root_mean_square  # RMSNormalization: nothing centred

        def layer_norm(inp: Any, st: list[Any], pin: Pin) -> tuple[Any, list[Any]]:
            centred = inp if plain else inp - tf.reduce_mean(inp, axis=-1, keepdims=True)
            # centred * centred, not tf.square: the converter fuses square(x - mean) into
            # SQUARED_DIFFERENCE, which has no int8 kernel
            var = tf.reduce_mean(centred * centred, axis=-1, keepdims=True)
            # rms: Keras' rms_scaling, the input itself (not centred) over its deviation
            return (inp if rms else centred) * tf.math.rsqrt(var + eps) * g + b, []

        return layer_norm
    if isinstance(layer, GRUCell):
        u = layer.units
        kx = dict(zip(layer.gates, (c(a) for a in _gates(layer.kernel, u, 3))))
        kh = dict(zip(layer.gates, (c(a) for a in _gates(layer.recurrent, u, 3))))
        bx = dict(zip(layer.gates, (c(a) for a in _gates(layer.input_bias, u, 3))))
        bh = dict(zip(layer.gates, (c(a) for a in _gates(layer.recurrent_bias, u, 3))))
        act, ract = tf_activation(layer.activation), tf_activation(layer.recurrent_activation)
        after = layer.reset_after

        def gru(inp: Any, st: list[Any], pin: Pin) -> tuple[Any, list[Any]]:
            (h,) = st
            x = {g: gp("x" + g, tf.matmul(inp, kx[g]) + bx[g]) for g in "zrh"}
            if after:
                r_ = {g: tf.matmul(h, kh[g]) + bh[g] for g in "zrh"}
                z, r = (ract(gp(g, x[g] + r_[g])) for g in "zr")
                hh = act(gp("h", x["h"] + r * r_["h"]))
            else:
                z, r = (ract(gp(g, x[g] + tf.matmul(h, kh[g]))) for g in "zr")
                hh = act(gp("h", x["h"] + tf.matmul(r * h, kh["h"])))
            h = pin(0, z * h + (1.0 - z) * hh)
            return h, [h]

        return gru
    if isinstance(layer, SimpleRNNCell):
        w, r, b = c(layer.kernel), c(layer.recurrent), c(layer.bias)
        act = tf_activation(layer.activation)

        def rnn(inp: Any, st: list[Any], pin: Pin) -> tuple[Any, list[Any]]:
            # the bias rides in the input FULLY_CONNECTED: no ADD of a broadcast bias
            h = pin(0, act((tf.matmul(inp, w) + b) + tf.matmul(st[0], r)))
            return h, [h]

        return rnn
    if isinstance(layer, Conv1D):
        k, d_in, d_out = layer.kernel.shape
        taps = [j * layer.dilation * d_in for j in range(k)]
        w = c(np.ascontiguousarray(layer.kernel.reshape(k * d_in, d_out)))
        b, act, span = c(layer.bias), tf_activation(layer.activation), layer.span

        def conv(inp: Any, st: list[Any], pin: Pin) -> tuple[Any, list[Any]]:
            window = tf.concat([st[0], inp], axis=-1) if span else inp
            cols = tf.concat([window[:, a : a + d_in] for a in taps], axis=-1) if k > 1 else window
            y = act(tf.matmul(cols, w) + b)
            return y, ([pin(0, window[:, d_in:])] if span else [])

        return conv
    raise TypeError(f"unknown layer {layer!r}")


def _lstm_fn(
    layer: LSTMCell,
    tf: Any,
    c: Callable[[Any], Any],
    scale: float | None,
    *,
    bias_with_h: bool,
    gate_pin: GatePin | None = None,
) -> LayerFn:
    """The gates' pre-activations, each gate's bias inside a FULLY_CONNECTED (no broadcast
    ADD; the built-in int8 kernels of older runtimes spent most of a step on those).

    ``scale`` a number: one FULLY_CONNECTED per gate over ``[input * scale, h]``, one
    CONCATENATION per layer. In int8 a concatenation shares one scale between its inputs,
    pinned by ``h``: ``scale`` maps the input's range onto ``h``'s and the input rows of each
    gate's kernel are divided by it, so the float function is unchanged; the weight tensor then
    shares one scale between input and recurrent rows, which ``quantize.input_scales`` allows
    only where their magnitudes are alike. ``scale`` None: per gate an input FC and a
    recurrent FC, then one ADD of the two (same shapes, no broadcast); the bias rides in the
    input FC, or in the recurrent one where ``bias_with_h`` (a layer stacked on another
    recurrent layer). Same ops either way, but not the same int8 error: with the bias beside
    the lower layer's ``h``, 2- and 3-layer PyTorch regressors came out with 2-7x the int8
    error of either alternative (RMSE against float; ``tests/test_convert_step_graph.py``),
    while for a first layer fed the model's input it made no clear difference.

    One FC per gate, not one [4H] FC then a split: in int8 a split shares one scale across its
    outputs, so the gate with the widest pre-activation range would set the resolution of all
    of them."""
    gates = {g: (layer.gate(g, layer.kernel), layer.gate(g, layer.recurrent)) for g in "ifco"}
    bias = {g: c(np.ascontiguousarray(layer.gate(g, layer.bias))) for g in "ifco"}
    act, ract = tf_activation(layer.activation), tf_activation(layer.recurrent_activation)
    if scale is None:
        kx = {g: c(np.ascontiguousarray(k)) for g, (k, _) in gates.items()}
        kh = {g: c(np.ascontiguousarray(r)) for g, (_, r) in gates.items()}
    else:
        kxh = {
            g: c(np.concatenate([k / np.float32(scale), r]).astype(np.float32))
            for g, (k, r) in gates.items()
        }

    def lstm(inp: Any, st: list[Any], pin: Pin) -> tuple[Any, list[Any]]:
        h, cell = st
        gp = gate_pin or (lambda g, t: t)
        if scale is None and bias_with_h:
            z = {
                g: gp("x" + g, tf.matmul(inp, kx[g])) + (tf.matmul(h, kh[g]) + bias[g])
                for g in "ifco"
            }
        elif scale is None:
            z = {
                g: gp("x" + g, tf.matmul(inp, kx[g]) + bias[g]) + tf.matmul(h, kh[g])
                for g in "ifco"
            }
        else:
            xh = tf.concat([inp * scale if scale != 1.0 else inp, h], axis=-1)
            z = {g: tf.matmul(xh, kxh[g]) + bias[g] for g in "ifco"}
        if gate_pin is not None:
            z = {g: gate_pin(g, z[g]) for g in "ifco"}
        f, i, g, o = ract(z["f"]), ract(z["i"]), act(z["c"]), ract(z["o"])
        with tf.name_scope(CELL_SCOPE):  # C and what computes it, up to act(C)
            cell = pin(1, f * cell + i * g)
            act_c = act(cell)
        h = pin(0, o * act_c)
        return h, [h, cell]

    return lstm

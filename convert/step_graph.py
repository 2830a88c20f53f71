"""The one-step TF function: explicit per-layer state in and out, plain ops only.

Inputs ``x [B, F]``, ``h{l}``/``c{l} [B, H_l]``; outputs ``y``, ``h{l}_next``, ``c{l}_next``.
For int8, fake-quant nodes pin every state input and its matching output to the same range
(``h`` in [-1, 1], ``C`` in [-c_max, c_max]) so the converter gives them identical
scale/zero-point and the runtime feeds the int8 bytes straight back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .intake import ModelSpec


def state_names(spec: ModelSpec) -> list[tuple[str, str, int]]:
    """(input name, output name, width) for h0, c0, h1, c1, ..."""
    out = []
    for layer, w in enumerate(spec.lstms):
        for kind in ("h", "c"):
            out.append((f"{kind}{layer}", f"{kind}{layer}_next", w.units))
    return out


def build(
    spec: ModelSpec,
    *,
    normalize_in_graph: bool,
    state_ranges: Sequence[tuple[float, float]] | None = None,
) -> tuple[Any, Any]:
    """(concrete function, the module owning it). ``state_ranges`` adds fake-quants."""
    import tensorflow as tf

    # One matmul pair per gate, not one [4H] matmul then a split: in int8 a split shares one
    # scale across its outputs, so the gate with the widest pre-activation range would set the
    # resolution of all four. Separate tensors get a range each.
    consts = [
        [
            tuple(
                tf.constant(np.ascontiguousarray(a[..., k * w.units : (k + 1) * w.units]))
                for a in (w.kernel, w.recurrent, w.bias)
            )
            for k in range(4)
        ]
        for w in spec.lstms
    ]
    head = [(tf.constant(d.kernel), tf.constant(d.bias), d.activation) for d in spec.head]
    mean = (
        tf.constant(spec.norm_mean) if normalize_in_graph and spec.norm_mean is not None else None
    )
    std = tf.constant(spec.norm_std) if mean is not None else None
    names = state_names(spec)

    def pin(t: Any, k: int) -> Any:
        if state_ranges is None:
            return t
        lo, hi = state_ranges[k]
        return tf.quantization.fake_quant_with_min_max_args(t, min=lo, max=hi, num_bits=8)

    specs = [tf.TensorSpec([None, spec.features], tf.float32, name="x")]
    specs += [tf.TensorSpec([None, w], tf.float32, name=n) for n, _, w in names]

    @tf.function(input_signature=specs)  # type: ignore[misc]
    def step(x: Any, *state: Any) -> dict[str, Any]:
        inp = (x - mean) / std if mean is not None else x
        out = {}
        for layer, gates in enumerate(consts):
            h = pin(state[2 * layer], 2 * layer)
            c = pin(state[2 * layer + 1], 2 * layer + 1)
            i, f, g, o = (tf.matmul(inp, kx) + tf.matmul(h, kh) + b for kx, kh, b in gates)
            c = pin(tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g), 2 * layer + 1)
            h = pin(tf.sigmoid(o) * tf.tanh(c), 2 * layer)
            out[names[2 * layer][1]] = h
            out[names[2 * layer + 1][1]] = c
            inp = h
        for kernel, bias, act in head:
            inp = tf.matmul(inp, kernel) + bias
            if act == "softmax":
                inp = tf.nn.softmax(inp)
            elif act != "linear":
                inp = getattr(tf.nn, act)(inp)
        out["y"] = inp
        return out

    module = tf.Module()
    module.step = step
    return step.get_concrete_function(), module

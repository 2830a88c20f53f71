"""The golden float step in NumPy (DESIGN.md section 2), used to calibrate and to verify.

LSTM: z = x W + h U + b;  i, f, g, o = split(z);  C' = s(f) C + s(i) tanh(g);  h' = s(o) tanh(C')
(with the cell's own activations); GRU, SimpleRNN and the causal convolution as in ``spec``.
"""

from __future__ import annotations

import numpy as np

from .spec import (
    Activation,
    Affine,
    Conv1D,
    Dense,
    GRUCell,
    Layer,
    LayerNorm,
    LSTMCell,
    ModelSpec,
    SimpleRNNCell,
)

_SELU = (1.6732632423543772, 1.0507009873554805)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exact identity, no overflow for large |z|


def activate(z: np.ndarray, name: str) -> np.ndarray:
    """Keras' activations of the same name (``spec.ACTIVATIONS``)."""
    if name == "linear":
        return z
    if name == "sigmoid":
        return sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0)
    if name == "relu6":
        return np.clip(z, 0, 6)
    if name == "hard_sigmoid":
        return np.clip(z + 3.0, 0, 6) / 6.0
    if name == "hard_silu":
        return z * np.clip(z + 3.0, 0, 6) / 6.0
    if name == "softsign":
        return z / (1.0 + np.abs(z))
    if name == "softplus":
        return np.logaddexp(0.0, z)
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    if name == "selu":
        a, s = _SELU
        return s * np.where(z > 0, z, a * np.expm1(np.minimum(z, 0)))
    if name == "silu":
        return z * sigmoid(z)
    if name == "gelu":
        from math import erf, sqrt

        return 0.5 * z * (1.0 + np.vectorize(erf)(z / sqrt(2.0)))
    if name == "exponential":
        return np.exp(z)
    if name == "leaky_relu":
        return np.where(z > 0, z, 0.2 * z)
    if name == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown activation {name!r}")


def zero_state(spec: ModelSpec, batch: int, dtype: type = np.float64) -> list[np.ndarray]:
    return [np.zeros((batch, s.width), dtype) for s in spec.states]


def normalize(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    if spec.norm_mean is None or spec.norm_std is None:
        return x
    return (x - spec.norm_mean) / spec.norm_std


def layer_step(
    layer: Layer, inp: np.ndarray, state: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One layer, one step: (output, its new state tensors)."""
    if isinstance(layer, Dense):
        return activate(inp @ layer.kernel + layer.bias, layer.activation), []
    if isinstance(layer, Affine):
        return inp * layer.scale + layer.shift, []
    if isinstance(layer, Activation):
        return activate(inp, layer.name), []
    if isinstance(layer, LayerNorm):
        c = inp if layer.root_mean_square else inp - inp.mean(-1, keepdims=True)
        # ``rms``: Keras' rms_scaling, the input itself (not centred) over its deviation
        out = (inp if layer.rms else c) / np.sqrt((c**2).mean(-1, keepdims=True) + layer.epsilon)
        return out * layer.gamma + layer.beta, []
    if isinstance(layer, LSTMCell):
        h, c = state
        z = inp @ layer.kernel + h @ layer.recurrent + layer.bias
        ra, a = layer.recurrent_activation, layer.activation
        i, f, o = (activate(layer.gate(g, z), ra) for g in "ifo")
        c = f * c + i * activate(layer.gate("c", z), a)
        h = o * activate(c, a)
        return h, [h, c]
    if isinstance(layer, GRUCell):
        (h,) = state
        xz = inp @ layer.kernel + layer.input_bias
        ra, a = layer.recurrent_activation, layer.activation
        if layer.reset_after:
            hz = h @ layer.recurrent + layer.recurrent_bias
            z, r = (activate(layer.gate(g, xz) + layer.gate(g, hz), ra) for g in "zr")
            hh = activate(layer.gate("h", xz) + r * layer.gate("h", hz), a)
        else:
            u = layer.recurrent
            z, r = (activate(layer.gate(g, xz) + h @ layer.gate(g, u), ra) for g in "zr")
            hh = activate(layer.gate("h", xz) + (r * h) @ layer.gate("h", u), a)
        h = z * h + (1.0 - z) * hh
        return h, [h]
    if isinstance(layer, SimpleRNNCell):
        (h,) = state
        h = activate(inp @ layer.kernel + h @ layer.recurrent + layer.bias, layer.activation)
        return h, [h]
    if isinstance(layer, Conv1D):
        k, d_in, _ = layer.kernel.shape
        window = np.concatenate([*state, inp], axis=-1) if layer.span else inp
        taps = [
            window[:, j * layer.dilation * d_in : j * layer.dilation * d_in + d_in]
            for j in range(k)
        ]
        y = np.concatenate(taps, axis=-1) @ layer.kernel.reshape(k * d_in, -1) + layer.bias
        return activate(y, layer.activation), ([window[:, d_in:]] if layer.span else [])
    raise TypeError(f"unknown layer {layer!r}")


def step(
    spec: ModelSpec, x: np.ndarray, state: list[np.ndarray], *, normalized: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One step for a batch: x [B, F] raw units (or normalised), state in ``spec.states``
    order."""
    inp = x if normalized else normalize(spec, x)
    new: list[np.ndarray] = []
    k = 0
    owners = [s.layer for s in spec.states]
    for i, layer in enumerate(spec.layers):
        n = owners.count(i)
        inp, st = layer_step(layer, inp, state[k : k + n])
        new += st
        k += n
    return inp, new


def run(
    spec: ModelSpec, xs: np.ndarray, dtype: type = np.float64
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Whole sequences [N, T, F] from zero state -> (y [N, T, O], states before each step
    [N, T, W] per state tensor, normalised inputs [N, T, F])."""
    xs = np.asarray(xs, dtype)
    n, t, _ = xs.shape
    xn = normalize(spec, xs).astype(dtype)
    state = zero_state(spec, n, dtype)
    ys = np.empty((n, t, spec.outputs), dtype)
    before = [np.empty((n, t, s.shape[1]), dtype) for s in state]
    for k in range(t):
        for b, s in zip(before, state):
            b[:, k] = s
        ys[:, k], state = step(spec, xn[:, k], state, normalized=True)
    return ys, before, xn

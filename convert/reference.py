"""The golden float LSTM in NumPy (DESIGN.md section 2), used to calibrate and to verify.

z = x W + h U + b;  i, f, g, o = split(z);  C' = s(f) C + s(i) tanh(g);  h' = s(o) tanh(C')
"""

from __future__ import annotations

import numpy as np

from .intake import DenseWeights, ModelSpec


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # exact identity, no overflow for large |z|


def activate(z: np.ndarray, name: str) -> np.ndarray:
    if name == "sigmoid":
        return sigmoid(z)
    if name == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "relu":
        return np.maximum(z, 0)
    if name == "tanh":
        return np.tanh(z)
    return z


def head(spec_head: tuple[DenseWeights, ...], h: np.ndarray) -> np.ndarray:
    for d in spec_head:
        h = activate(h @ d.kernel + d.bias, d.activation)
    return h


def zero_state(spec: ModelSpec, batch: int, dtype: type = np.float64) -> list[np.ndarray]:
    return [np.zeros((batch, w.units), dtype) for w in spec.lstms for _ in range(2)]


def normalize(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    if spec.norm_mean is None or spec.norm_std is None:
        return x
    return (x - spec.norm_mean) / spec.norm_std


def step(
    spec: ModelSpec, x: np.ndarray, state: list[np.ndarray], *, normalized: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One step for a batch: x [B, F] raw units (or normalised), state [h0, c0, h1, c1, ...]."""
    inp = x if normalized else normalize(spec, x)
    new = []
    for layer, w in enumerate(spec.lstms):
        h, c = state[2 * layer], state[2 * layer + 1]
        z = inp @ w.kernel + h @ w.recurrent + w.bias
        i, f, g, o = np.split(z, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        new += [h, c]
        inp = h
    return head(spec.head, inp), new


def run(
    spec: ModelSpec, xs: np.ndarray, dtype: type = np.float64
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Whole sequences [N, T, F] from zero state -> (y [N, T, O], states before each step
    [N, T, H] per state tensor, normalised inputs [N, T, F])."""
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

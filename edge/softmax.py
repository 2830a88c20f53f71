"""A softmax over int8 logits whose bits do not depend on the machine.

An int8 classifier's SOFTMAX is not among the ops XNNPACK takes; the interpreter's built-in
kernel rounds it differently on x86-64 and aarch64 (one output step apart, measured under
emulation), so the same bundle published different probabilities on a desktop and on a Pi.
The converter therefore ends an int8 classifier's graph at its logits and the runtime applies
this softmax (the manifest says ``output.activation: softmax``).

Every step is exact or correctly rounded, so every machine computes the same float32:

- the distance of each logit from its row's maximum is an integer ``d`` in 0..255, so
  ``exp(-d * scale)`` takes 256 values, computed once with ``decimal`` (software arithmetic,
  correctly rounded) and held as integers scaled by 2**40;
- a row's sum is an integer sum;
- each probability is one IEEE division (correctly rounded), then one rounding to float32.

Logits below the maximum by more than ~28 / ``scale`` steps get probability 0 (exp < 2**-40).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, localcontext

import numpy as np

KEPT_ROWS = 4096  # the largest batch whose working buffers are kept for the next call
ONE = 1 << 40  # the table's fixed point: K * 2**40 stays exact in float64 up to 8,192 classes


def exp_table(scale: float) -> np.ndarray:
    """``round(exp(-d * scale) * 2**40)`` for d = 0..255, identical on every machine."""
    if not (scale > 0 and np.isfinite(scale)):
        raise ValueError(f"softmax needs a positive finite logit scale, got {scale!r}")
    out = np.empty(256, dtype=np.int64)
    with localcontext() as ctx:
        ctx.prec = 60
        s = Decimal(float(scale))  # exact: every float is a finite decimal
        for d in range(256):
            out[d] = int(((-d * s).exp() * ONE).to_integral_value(rounding=ROUND_HALF_EVEN))
    out.flags.writeable = False
    return out


class IntSoftmax:
    """Softmax of int8 logits ``(q - zero_point) * scale`` along the last axis -> float32."""

    def __init__(self, scale: float) -> None:
        self.table = exp_table(scale)
        self._ints: list[int] = self.table.tolist()
        # The same integers as float64 (exact below 2**53): the sums and the division need no
        # int64 -> float64 conversion of their own.
        self._exact = self.table.astype(np.float64)
        self._shape: tuple[int, ...] = ()  # the shape ``_work`` holds buffers for
        self._work: tuple[np.ndarray, ...] = ()

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if raw.size == raw.shape[-1]:  # one row: Python ints cost a third of NumPy calls
            q = raw.ravel().tolist()
            top = max(q)
            e = [self._ints[top - v] for v in q]
            total = sum(e)  # int / int is correctly rounded, as the division below
            return np.array([v / total for v in e], np.float32).reshape(raw.shape)
        if raw.ndim == 2:
            return self._rows_of(raw)
        # classes first: reductions over a short last axis cost NumPy several times more
        t = np.ascontiguousarray(raw.T)
        e = self.table[(t.max(axis=0) - t).view(np.uint8)]  # int8 wraps: d = max - q, 0..255
        out: np.ndarray = (e / e.sum(axis=0)).T.astype(np.float32)
        return out

    def _rows_of(self, raw: np.ndarray) -> np.ndarray:
        """The same arithmetic for ``[n, classes]`` in buffers kept while the shape repeats
        (the service's batches): at these sizes each temporary costs as much as the arithmetic.
        A long chunk's buffers are not kept."""
        work = self._work
        if raw.shape != self._shape:
            n, c = raw.shape
            t, d = np.empty((c, n), np.int8), np.empty((c, n), np.int8)
            work = (t, np.empty(n, np.int8), d, d.view(np.uint8), np.empty((c, n)), np.empty(n))
            if n <= KEPT_ROWS:
                self._work, self._shape = work, raw.shape
        t, top, d, du, e, total = work
        np.copyto(t, raw.T)  # classes first: reductions over a short last axis cost more
        np.maximum.reduce(t, axis=0, out=top)
        np.subtract(top, t, out=d)  # int8 wraps: d = max - q, 0..255 read as uint8
        self._exact.take(du, out=e)
        np.add.reduce(e, axis=0, out=total)
        np.divide(e, total, out=e)
        out: np.ndarray = e.T.astype(np.float32)
        return out

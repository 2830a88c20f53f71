"""A step model's tensors bound once per batch size, read and written in place.

The signature runner resizes, re-allocates, copies in and copies out every tensor on every call
(about 8 us at batch 1 against about 2 us of invoke). A step model is called again and again
with the same batch size, so ``TensorBinding`` resizes and re-allocates only when the batch size
changes and otherwise hands out NumPy views of the interpreter's own input and output buffers:
the engine gathers state rows straight into them and scatters them back from them.

Views of interpreter memory are only valid until the next resize: ``bind`` drops them first and
makes new ones after. The interpreter's public ``invoke`` refuses to run while such views exist
(it cannot tell a resize-safe caller from an unsafe one), so the binding invokes through the
interpreter's wrapper, as the signature runner itself does. Nothing else may resize or allocate
the bound interpreter. Interpreters without that wrapper get ``RunnerBinding``: the same
interface over the signature runner, with copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .backend import SignatureRunner
from .errors import BackendError
from .state_store import as_records


class Binding(Protocol):
    """``inputs`` = [x, *state inputs], ``outputs`` = [y, *state outputs], each ``[rows, width]``;
    ``state_in``/``state_out``: the state ones as ``as_records`` views. All valid until the next
    ``bind`` with another row count."""

    rows: int
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    state_in: list[np.ndarray]
    state_out: list[np.ndarray]
    rebinds: int

    def bind(self, rows: int) -> None: ...

    def invoke(self) -> None: ...


class TensorBinding:
    """Views of one interpreter's signature tensors, re-made only when the row count changes."""

    def __init__(
        self,
        interpreter: Any,
        signature: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        widths: Sequence[int],
    ) -> None:
        wrapper = interpreter._interpreter
        sig = interpreter._get_full_signature_list()[signature]
        self._wrapper = wrapper
        self._sub = int(wrapper.GetSubgraphIndexFromSignature(signature))
        self._in = [int(sig["inputs"][n]) for n in inputs]
        self._out = [int(sig["outputs"][n]) for n in outputs]
        self._widths = list(widths[: len(self._in)])
        self._invoke: Callable[[int], Any] = wrapper.Invoke
        self.rows = 0
        self.rebinds = 0
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.state_in: list[np.ndarray] = []
        self.state_out: list[np.ndarray] = []

    def bind(self, rows: int) -> None:
        if rows == self.rows:
            return
        # no view may outlive the buffers it shows
        self.inputs, self.outputs, self.state_in, self.state_out = [], [], [], []
        w, sub = self._wrapper, self._sub
        try:
            for index, width in zip(self._in, self._widths):
                w.ResizeInputTensor(index, np.array([rows, width], np.int32), False, sub)
            w.AllocateTensors(sub)
            self.inputs = [w.tensor(w, i, sub) for i in self._in]
            self.outputs = [w.tensor(w, i, sub) for i in self._out]
            self.state_in = [as_records(a) for a in self.inputs[1:]]
            self.state_out = [as_records(a) for a in self.outputs[1:]]
        except Exception as exc:
            self.rows = 0
            raise BackendError(f"cannot bind the model's tensors for {rows} rows: {exc}") from exc
        self.rows = rows
        self.rebinds += 1

    def invoke(self) -> None:
        try:
            self._invoke(self._sub)
        except Exception as exc:
            raise BackendError(f"invoke failed: {exc}") from exc


class RunnerBinding:
    """The same interface over a signature runner: arrays of our own, copied on every invoke."""

    def __init__(
        self,
        runner: SignatureRunner,
        inputs: Sequence[str],
        outputs: Sequence[str],
        dtypes: Sequence[np.dtype[Any]],
        widths: Sequence[int],
    ) -> None:
        self._runner = runner
        self._in = list(inputs)
        self._out = list(outputs)
        self._dtypes = list(dtypes)  # inputs first, then outputs
        self._widths = list(widths)
        self.rows = 0
        self.rebinds = 0
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.state_in: list[np.ndarray] = []
        self.state_out: list[np.ndarray] = []

    def bind(self, rows: int) -> None:
        if rows == self.rows:
            return
        arrays = [np.zeros((rows, w), d) for d, w in zip(self._dtypes, self._widths)]
        self.inputs, self.outputs = arrays[: len(self._in)], arrays[len(self._in) :]
        self.state_in = [as_records(a) for a in self.inputs[1:]]
        self.state_out = [as_records(a) for a in self.outputs[1:]]
        self.rows = rows
        self.rebinds += 1

    def invoke(self) -> None:
        try:
            out = self._runner(**dict(zip(self._in, self.inputs)))
        except Exception as exc:
            raise BackendError(f"invoke failed: {exc}") from exc
        for name, dst in zip(self._out, self.outputs):
            dst[...] = out[name]


def bind(
    interpreter: Any,
    runner: SignatureRunner,
    signature: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
) -> Binding:
    """A ``TensorBinding`` where the interpreter allows one, else a ``RunnerBinding``."""
    details = {**runner.get_input_details(), **runner.get_output_details()}
    names = [*inputs, *outputs]
    widths = [int(details[n]["shape"][-1]) for n in names]
    wrapper = getattr(interpreter, "_interpreter", None)
    needed = ("GetSubgraphIndexFromSignature", "ResizeInputTensor", "AllocateTensors", "tensor")
    if wrapper is not None and all(hasattr(wrapper, n) for n in needed):
        try:
            return TensorBinding(interpreter, signature, inputs, outputs, widths)
        except (AttributeError, KeyError, TypeError):
            pass  # an interpreter whose wrapper differs: fall back to copies
    dtypes = [np.dtype(details[n]["dtype"]) for n in names]
    return RunnerBinding(runner, inputs, outputs, dtypes, widths)

"""The step model behind a tensor binding: quantise in, invoke a batch, dequantise out.

Batch handling, chosen by measurement (``python -m bench.engine``, "mixed batches"): one
interpreter whose input shapes follow the batch. ``edge.binding`` resizes and re-allocates
only when the batch size changes (a repeated size costs nothing extra), which for a step model
costs less than padding to fixed power-of-two buckets. Batches above ``max_batch`` are split.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import trial_load
from .backend import Backend, SignatureRunner, kernel_set
from .binding import Binding, bind
from .errors import BackendError, BundleError, ConfigError, shown
from .manifest import Manifest, TensorSpec
from .softmax import IntSoftmax
from .state_store import whole_number
from .stderr_filter import interpreter_lines

NP_DTYPES: dict[str, type[np.generic]] = {"int8": np.int8, "int16": np.int16, "float32": np.float32}
INT_RANGES = {"int8": (-128, 127), "int16": (-32768, 32767)}
# Shapes of batches whose scratch views encode_x_into keeps: sizes repeat in a service, but
# every size up to max_batch shows up in time.
SCRATCH_SHAPES = 64


def quantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    dtype = NP_DTYPES[spec.dtype]
    if not spec.quantized:
        return np.asarray(values, dtype=np.float32)
    lo, hi = INT_RANGES[spec.dtype]
    q = np.rint(np.asarray(values, dtype=np.float64) / spec.scale) + spec.zero_point
    out: np.ndarray = np.clip(q, lo, hi).astype(dtype)
    return out


def dequantize(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if not spec.quantized:
        return np.asarray(values, dtype=np.float32)
    return ((values.astype(np.float32) - spec.zero_point) * spec.scale).astype(np.float32)


def requantize(values: np.ndarray, src: TensorSpec, dst: TensorSpec) -> np.ndarray:
    """State output -> state input encoding. A no-op when the converter made them equal."""
    if (src.dtype, src.scale, src.zero_point) == (dst.dtype, dst.scale, dst.zero_point):
        return values
    return quantize(dequantize(values, src), dst)


class StepModel:
    def __init__(
        self,
        manifest: Manifest,
        content: bytes,
        backend: Backend,
        *,
        max_batch: int = 256,
        num_threads: int = 1,
        trial: bool = True,
    ) -> None:
        """``trial``: open the model in a child process first (``edge.trial_load``), so that
        bytes the interpreter crashes on are refused instead of killing this process."""
        if not whole_number(max_batch) or max_batch < 1:
            raise ConfigError(f"max_batch must be a whole number >= 1, got {shown(max_batch)}")
        # the interpreter's C int; True would be 1 thread, and the interpreter's own refusal
        # was worded as a model it "could not open"
        if not whole_number(num_threads) or not 1 <= num_threads < 2**31:
            raise ConfigError(
                f"num_threads must be a whole number from 1 to {2**31 - 1}, got "
                f"{shown(num_threads)}"
            )
        self.manifest = manifest
        self.backend = backend
        self.max_batch = max_batch
        if trial:
            trial_load.check(manifest, content, backend, num_threads, max_batch)
        interpreter, self._runner = backend.open(content, manifest.signature, num_threads)
        t = manifest.tensors
        self.x_spec = t[manifest.input]
        self.y_spec = t[manifest.output]
        self.state_in = [t[i] for i, _ in manifest.state_names]
        self.state_out = [t[o] for _, o in manifest.state_names]
        self._mean, self._std = _input_normalization(manifest)
        self._scratch: dict[tuple[int, ...], np.ndarray] = {}  # encode_x_into's, by shape
        self._scratch_base = np.empty(0, np.float64)
        # the quantised input's range less its zero point, and the zero point, as floats
        lo, hi = INT_RANGES.get(self.x_spec.dtype, (0, 0))
        zp = self.x_spec.zero_point
        self._x_range = (float(lo - zp), float(hi - zp), float(zp))
        self._check_signature(self._runner)
        self.binding: Binding = bind(
            interpreter,
            self._runner,
            manifest.signature,
            [self.x_spec.name, *(s.name for s in self.state_in)],
            [self.y_spec.name, *(s.name for s in self.state_out)],
        )
        # Whether a state output must be re-encoded before it is fed back (stacked layers whose
        # output and input encodings differ); else the bytes go straight back.
        self.requantized = [
            (so.dtype, so.scale, so.zero_point) != (si.dtype, si.scale, si.zero_point)
            for so, si in zip(self.state_out, self.state_in)
        ]
        self.decode_y = output_decoder(manifest)
        # One step from zero state applies the interpreter's lazy delegates, so the execution
        # plan then shows the kernels every later invoke runs (and the delegate's line is
        # written now, where the service catches it).
        with interpreter_lines():
            self.invoke(self.encode_x(np.zeros((1, manifest.features))), self.zero_state())
        self.kernels = kernel_set(backend, interpreter)

    def _check_signature(self, runner: SignatureRunner) -> None:
        """The manifest must describe the tensors the model really has, by name and encoding."""
        try:
            ins, outs = runner.get_input_details(), runner.get_output_details()
        except Exception as exc:
            raise BundleError(f"cannot read the model's signature: {exc}") from exc
        found = {**ins, **outs}
        sides = [(s, ins, "input") for s in [self.x_spec, *self.state_in]]
        sides += [(s, outs, "output") for s in [self.y_spec, *self.state_out]]
        for spec, side, kind in sides:
            d = side.get(spec.name)
            if d is None and spec.name in found:
                raise BundleError(
                    f"manifest tensor {shown(spec.name)} is used as an {kind} of the model, but "
                    "it is "
                    f"not one (its {kind}s are {sorted(side)})"
                )
            if d is None:
                raise BundleError(
                    f"manifest tensor {shown(spec.name)} is not in the model's signature "
                    f"(it has {sorted(found)})"
                )
            dtype = np.dtype(d["dtype"]).name
            scale, zp = d.get("quantization", (0.0, 0))
            width = int(d["shape"][-1])
            if dtype != spec.dtype or width != spec.width:
                raise BundleError(
                    f"tensor {shown(spec.name)}: model has {dtype}[{width}], manifest says "
                    f"{spec.dtype}[{spec.width}]"
                )
            # Exactly, in the float32 the model holds (the converter writes that value): a scale
            # off by a few parts in 10^5 passed np.isclose and shifted most answers by an LSB.
            same = np.float32(scale) == np.float32(spec.scale)
            if spec.quantized and (not same or zp != spec.zero_point):
                raise BundleError(
                    f"tensor {shown(spec.name)}: model quantisation ({scale}, {zp}) differs from "
                    "the "
                    f"manifest's ({spec.scale}, {spec.zero_point})"
                )
        # An input the manifest does not name is never fed: a state left out of 'state' held
        # whatever its buffer held, and every answer was wrong without a word. (An output it
        # does not name is only not read.)
        named = sorted(s.name for s in [self.x_spec, *self.state_in])
        unnamed = sorted(set(ins) - set(named))
        if unnamed:
            raise BundleError(
                f"the model's input {shown(unnamed[0])} is not in the manifest (its inputs are "
                f"{sorted(ins)}; the manifest names {named})"
            )

    @property
    def input_normalization(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(mean, std) per feature the runtime normalises the input with, or (None, None)."""
        return self._mean, self._std

    def encode_x(self, values: np.ndarray) -> np.ndarray:
        """Raw sensor units -> the model's input tensor (normalised in float, then quantised)."""
        if self._mean is not None:
            values = (values - self._mean) / self._std
        return quantize(values, self.x_spec)

    def encode_x_into(self, values: np.ndarray, out: np.ndarray) -> None:
        """``encode_x`` written straight into ``out`` (a bound input tensor): the same float64
        results, bit for bit, in a scratch array kept per shape (at the
        service's small batches each temporary costs as much as the arithmetic)."""
        spec, mean, std = self.x_spec, self._mean, self._std
        if mean is None and not spec.quantized:
            out[...] = values
            return
        v = self._scratch.get(values.shape)
        if v is None:
            v = self._scratch_view(values.shape)
        if mean is not None and std is not None:
            np.subtract(values, mean, out=v)
            np.divide(v, std, out=v)
            if spec.quantized:
                np.divide(v, spec.scale, out=v)
        else:
            np.divide(values, spec.scale, out=v)
        if not spec.quantized:
            out[...] = v
            return
        # Clipped to the integer range before rounding, not after: rint is monotone and keeps
        # integers, so the bits are ``quantize``'s. Float operands: NumPy converts an int each
        # call.
        lo, hi, zp = self._x_range
        np.maximum(v, lo, out=v)  # np.clip, without its per-call overhead
        np.minimum(v, hi, out=v)
        np.rint(v, out=v)
        np.add(v, zp, out=v)
        out[...] = v

    def _scratch_view(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 view of ``shape`` on one buffer that grows to the largest batch seen."""
        size = int(np.prod(shape))
        if size > self._scratch_base.size:
            self._scratch_base = np.empty(size, np.float64)
            self._scratch.clear()  # views of the old buffer
        elif len(self._scratch) >= SCRATCH_SHAPES:
            self._scratch.clear()  # not a view for every batch size ever seen
        view = self._scratch_base[:size].reshape(shape)
        self._scratch[shape] = view
        return view

    def zero_state(self) -> list[np.ndarray]:
        """One row per state tensor holding the encoded zero (the zero point for int8)."""
        return [quantize(np.zeros((1, s.width)), s) for s in self.state_in]

    def invoke(
        self, x: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step for ``len(x)`` rows of encoded input/state -> (encoded y, next states)."""
        n = len(x)
        if n > self.max_batch:
            parts = [
                self.invoke(x[i : i + self.max_batch], [s[i : i + self.max_batch] for s in states])
                for i in range(0, n, self.max_batch)
            ]
            return (
                np.concatenate([p[0] for p in parts]),
                [np.concatenate([p[1][k] for p in parts]) for k in range(len(states))],
            )
        b = self.binding
        b.bind(n)
        b.inputs[0][...] = x
        for dst, arr in zip(b.inputs[1:], states):
            dst[...] = arr
        self.run()
        new_states = [
            requantize(out.copy(), so, si)
            for out, so, si in zip(b.outputs[1:], self.state_out, self.state_in)
        ]
        return b.outputs[0].copy(), new_states

    def run(self) -> None:
        """Invoke on what the binding holds."""
        try:
            self.binding.invoke()
        except BackendError as exc:
            raise BackendError(f"{self.backend.name} {exc}") from exc


def output_decoder(manifest: Manifest) -> Callable[[np.ndarray], np.ndarray]:
    """Encoded y rows -> the float32 the runtime publishes: ``dequantize`` (by table for
    int8), or the machine-independent softmax of ``edge.softmax`` when the bundle's output
    tensor holds logits. Always a new array: ``raw`` may be the interpreter's own buffer."""
    spec = manifest.tensors[manifest.output]
    if manifest.output_activation == "softmax":
        return IntSoftmax(spec.scale)
    if not spec.quantized:
        return lambda raw: np.array(raw, dtype=np.float32)
    if spec.dtype != "int8":
        return lambda raw: dequantize(raw, spec)
    table = dequantize(np.arange(256, dtype=np.uint8).view(np.int8), spec)
    table.flags.writeable = False
    return lambda raw: table[raw.view(np.uint8)]


def _input_normalization(manifest: Manifest) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-feature mean/std applied in float before quantising, when the bundle asks for it."""
    norm = manifest.extra.get("input_normalization")
    if norm is None:
        return None, None
    try:
        mean = np.asarray(norm["mean"], np.float64)
        std = np.asarray(norm["std"], np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"manifest: input_normalization is malformed: {exc}") from exc
    f = manifest.features
    if mean.shape != (f,) or std.shape != (f,) or not (std > 0).all():
        raise BundleError(f"manifest: input_normalization needs {f} means and {f} positive stds")
    return mean, std

"""What a user could run instead of the engine, with the same weights, measured beside it.

- ``NumpyLSTM``: a float32 LSTM step written in NumPy, vectorised over streams (the "30 lines
  of NumPy" a user writes): state arrays ``h``/``C`` per layer, one matrix product per gate
  block, no stream ids, no seq.
- ``OnnxLSTM``: a one-step ONNX ``LSTM`` graph with explicit state inputs and outputs, built with
  the ``onnx`` helper API and run in onnxruntime (one thread), when both are installed.
- ``interleaved``: CPU time per call (``time.process_time``) of several contenders measured in
  interleaved rounds, so that a noisy machine slows all of them alike; min and median.

Needs no TensorFlow (it also runs in the device-like environment); ``keras_weights`` reads the
weights of a Keras model on the desktop and ``save_weights``/``load_weights`` carry them over.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]


def keras_weights(model_path: Path) -> Weights:
    """Normalisation, LSTM layers (Keras gate order i, f, c, o) and the Dense head of the example
    models (an optional leading ``Normalization``, stacked ``LSTM`` layers, one ``Dense``)."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    w: Weights = {}
    layers = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Normalization":
            mean, var = (np.asarray(v, np.float64) for v in layer.get_weights()[:2])
            w["mean"] = mean.reshape(-1).astype(np.float32)
            w["std"] = np.maximum(np.sqrt(var.reshape(-1)), 1e-7).astype(np.float32)
        elif kind == "LSTM":
            kernel, recurrent, bias = layer.get_weights()
            w[f"W{layers}"], w[f"U{layers}"], w[f"b{layers}"] = kernel, recurrent, bias
            layers += 1
        elif kind == "Dense":
            w["Wd"], w["bd"] = layer.get_weights()
            w["softmax"] = np.array(layer.activation.__name__ == "softmax")
        elif kind not in ("InputLayer", "GaussianNoise", "Dropout"):
            raise ValueError(f"the peers do not model a {kind} layer")
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def save_weights(path: Path, w: Weights) -> None:
    np.savez(path, **w)


def load_weights(path: Path) -> Weights:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _layers(w: Weights) -> int:
    return sum(1 for k in w if k.startswith("W") and k[1:].isdigit())


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


class NumpyLSTM:
    """A float32 LSTM step vectorised over ``streams`` rows of state."""

    def __init__(self, w: Weights, streams: int) -> None:
        self.w = w
        self.n = _layers(w)
        units = [w[f"U{k}"].shape[0] for k in range(self.n)]
        self.h = [np.zeros((streams, u), np.float32) for u in units]
        self.c = [np.zeros((streams, u), np.float32) for u in units]

    def step(self, x: np.ndarray) -> np.ndarray:
        w = self.w
        a = np.asarray(x, np.float32)
        if "mean" in w:
            a = (a - w["mean"]) / w["std"]
        for k in range(self.n):
            z = a @ w[f"W{k}"] + self.h[k] @ w[f"U{k}"] + w[f"b{k}"]
            i, f, g, o = np.split(z, 4, axis=1)
            c = _sigmoid(f) * self.c[k] + _sigmoid(i) * np.tanh(g)
            a = _sigmoid(o) * np.tanh(c)
            self.c[k], self.h[k] = c, a
        y: np.ndarray = a @ w["Wd"] + w["bd"]
        if bool(w["softmax"]):
            e = np.exp(y - y.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        return y


def onnx_model(w: Weights) -> bytes:
    """One step of the same network as an ONNX graph: x [1, N, F], h{k}/c{k} [1, N, H] in,
    y [1, N, O] and h{k}_next/c{k}_next out (ONNX gate order i, o, f, c)."""
    from onnx import TensorProto, helper, numpy_helper

    n = _layers(w)
    f = w["W0"].shape[0]
    inits, nodes = [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "N", f])]
    outputs = []
    a = "x"
    if "mean" in w:
        inits += [numpy_helper.from_array(w["mean"], "mean")]
        inits += [numpy_helper.from_array(w["std"], "std")]
        nodes += [helper.make_node("Sub", ["x", "mean"], ["xc"])]
        nodes += [helper.make_node("Div", ["xc", "std"], ["xn"])]
        a = "xn"
    order = [0, 3, 1, 2]  # Keras i, f, c, o -> ONNX i, o, f, c
    for k in range(n):
        hid = w[f"U{k}"].shape[0]

        def gates(m: np.ndarray, hid: int = hid) -> np.ndarray:
            blocks = np.split(m, 4, axis=-1)
            return np.concatenate([blocks[j] for j in order], axis=-1)

        W = gates(w[f"W{k}"]).T[None]  # [1, 4H, in]
        R = gates(w[f"U{k}"]).T[None]  # [1, 4H, H]
        B = np.concatenate([gates(w[f"b{k}"]), np.zeros(4 * hid, np.float32)])[None]
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(v, np.float32), f"{name}{k}")
            for name, v in (("W", W), ("R", R), ("B", B))
        ]
        for s in ("h", "c"):
            inputs.append(
                helper.make_tensor_value_info(f"{s}{k}", TensorProto.FLOAT, [1, "N", hid])
            )
            outputs.append(
                helper.make_tensor_value_info(f"{s}{k}_next", TensorProto.FLOAT, [1, "N", hid])
            )
        nodes.append(
            helper.make_node(
                "LSTM",
                [a, f"W{k}", f"R{k}", f"B{k}", "", f"h{k}", f"c{k}"],
                [f"seq{k}", f"h{k}_next", f"c{k}_next"],
                hidden_size=hid,
            )
        )
        a = f"h{k}_next"
    inits += [numpy_helper.from_array(w["Wd"], "Wd"), numpy_helper.from_array(w["bd"], "bd")]
    nodes += [helper.make_node("MatMul", [a, "Wd"], ["logits0"])]
    nodes += [helper.make_node("Add", ["logits0", "bd"], ["logits" if bool(w["softmax"]) else "y"])]
    if bool(w["softmax"]):
        nodes += [helper.make_node("Softmax", ["logits"], ["y"], axis=-1)]
    out_dim = w["Wd"].shape[1]
    outputs.insert(0, helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "N", out_dim]))
    graph = helper.make_graph(nodes, "lstm_step", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


class OnnxLSTM:
    """The ONNX step in onnxruntime (one thread), its state fed back between calls."""

    def __init__(self, w: Weights, streams: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(onnx_model(w), opts, providers=["CPUExecutionProvider"])
        n = _layers(w)
        self.names = [f"{s}{k}" for k in range(n) for s in ("h", "c")]
        units = [w[f"U{k}"].shape[0] for k in range(n) for _ in ("h", "c")]
        self.state = [np.zeros((1, streams, u), np.float32) for u in units]
        self.outs = ["y", *(f"{name}_next" for name in self.names)]

    def step(self, x: np.ndarray) -> np.ndarray:
        feeds = {"x": np.asarray(x, np.float32)[None], **dict(zip(self.names, self.state))}
        y, *self.state = self.sess.run(self.outs, feeds)
        out: np.ndarray = y[0]
        return out


def onnx_missing() -> str | None:
    """Why the onnxruntime peer cannot run here, or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"not measured: {exc.name} is not installed (pip install onnx onnxruntime)"
    return None


def interleaved(
    contenders: dict[str, Callable[[], Any]], *, rounds: int = 7, min_time: float = 0.05
) -> dict[str, dict[str, float]]:
    """CPU seconds per call of each contender: ``rounds`` interleaved rounds of at least
    ``min_time`` each (calls per round fixed per contender after a warm-up); min and median."""
    calls: dict[str, int] = {}
    for name, fn in contenders.items():
        fn()
        k = 1
        while True:
            t0 = time.process_time()
            for _ in range(k):
                fn()
            if time.process_time() - t0 >= min_time:
                break
            k *= 2
        calls[name] = k
    per_call: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            k = calls[name]
            t0 = time.process_time()
            for _ in range(k):
                fn()
            per_call[name].append((time.process_time() - t0) / k)
    return {name: {"min": min(v), "median": statistics.median(v)} for name, v in per_call.items()}


def compare(
    bundle: Path,
    weights: Weights,
    *,
    streams: tuple[int, ...] = (1, 16, 64, 256),
    rounds: int = 7,
    min_time: float = 0.05,
) -> dict[str, Any]:
    """Microseconds per stream-step of the engine and its peers at each stream count, all
    with the same inputs, in interleaved rounds. The engine is measured as the service calls
    it (``step_batch`` with seqs), as ``step_many`` without seqs, and at one stream as
    ``step``; ``interpreter_invoke`` is the floor, the bound interpreter's invoke alone.
    -> {streams: {contender: {"min", "median"}, "ratios": ...}, "onnxruntime": why, ...}"""
    import edge

    # Speed, not numerics: an interpreter the bundle was not verified with is measured too
    # (a bundle converted where tflite-runtime 2.14 was not reachable records no such set).
    engine = edge.load(bundle, kernel_mismatch="warn")
    f = engine.manifest.features
    rng = np.random.default_rng(0)
    why_not = onnx_missing()
    out: dict[str, Any] = {"backend": f"{engine.model.backend.name} {engine.model.backend.version}"}
    out["kernels"] = engine.model.kernels
    out["onnxruntime"] = why_not or "measured"
    for n in streams:
        contenders = _contenders(engine, weights, rng.normal(0, 2, (n, f)), why_not is None)
        times = interleaved(contenders, rounds=rounds, min_time=min_time)
        row = {k: {s: v * 1e6 / n for s, v in t.items()} for k, t in times.items()}
        out[str(n)] = row
        ratios: dict[str, float] = {}
        for peer in ("numpy", "onnxruntime"):
            if peer in row:
                for mine in ("engine_step_batch_seq", "engine_step", "engine_step_seq"):
                    if mine in row:
                        for stat in ("min", "median"):
                            ratios[f"{mine}/{peer} ({stat})"] = row[mine][stat] / row[peer][stat]
        out[str(n)]["ratios"] = ratios
    return out


def _contenders(
    engine: Any, weights: Weights, xs: np.ndarray, with_onnx: bool
) -> dict[str, Callable[[], Any]]:
    """One call of each contender advances ``len(xs)`` streams by one sample."""
    from edge import Chunk

    n = len(xs)
    names = [f"n{n}-s{i}" for i in range(n)]
    chunks = [Chunk(s, xs[i]) for i, s in enumerate(names)]
    seq = [0, 0]
    numpy_peer = NumpyLSTM(weights, n)

    def batch_seq() -> None:
        seq[0] += 1
        engine.step_batch(names, xs, seqs=np.full(n, seq[0], np.int64))

    def step_seq() -> None:
        seq[1] += 1
        engine.step("solo-seq", xs[0], seq=seq[1])

    def raw_invoke() -> None:  # the floor: the interpreter alone, tensors bound already
        engine.model.binding.bind(n)
        engine.model.run()

    out: dict[str, Callable[[], Any]] = {
        "interpreter_invoke": raw_invoke,
        "engine_step_batch_seq": batch_seq,
        "engine_step_many": lambda: engine.step_many(chunks),
    }
    if n == 1:
        out["engine_step"] = lambda: engine.step("solo", xs[0])
        out["engine_step_seq"] = step_seq
    out["numpy"] = lambda: numpy_peer.step(xs)
    if with_onnx:
        onnx_peer = OnnxLSTM(weights, n)
        out["onnxruntime"] = lambda: onnx_peer.step(xs)
    return out

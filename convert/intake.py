"""Read a Keras model and reduce it to what a causal step needs: ``ModelSpec``.

Supported: optional leading ``Normalization``, 1-3 stacked ``LSTM`` layers, then a per-step
head of ``Dense``/``TimeDistributed(Dense)``/``Activation``/``Dropout``. Everything else is
refused with the layer's name and the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError, UnsupportedModel

ACTIVATIONS = ("linear", "sigmoid", "softmax", "relu", "tanh")
MAX_LSTM_LAYERS = 3
_REASONS = {
    "Bidirectional": "it reads the sequence backwards too, so step t depends on future samples",
    "GRU": "GRU layers are not supported yet (only LSTM)",
    "SimpleRNN": "SimpleRNN layers are not supported yet (only LSTM)",
    "Masking": "masking changes which steps update the state; the step model cannot reproduce it",
    "Attention": "attention looks at the whole sequence, not one causal step",
    "MultiHeadAttention": "attention looks at the whole sequence, not one causal step",
    "Conv1D": "a convolution over time needs a window of samples, not one step",
    "GlobalAveragePooling1D": "pooling over time needs the whole sequence",
    "Flatten": "flattening mixes time steps together",
}


@dataclass(frozen=True)
class LSTMWeights:
    kernel: np.ndarray  # [F, 4H], gate order i, f, c, o
    recurrent: np.ndarray  # [H, 4H]
    bias: np.ndarray  # [4H]

    @property
    def units(self) -> int:
        return int(self.recurrent.shape[0])


@dataclass(frozen=True)
class DenseWeights:
    kernel: np.ndarray
    bias: np.ndarray
    activation: str


@dataclass(frozen=True)
class ModelSpec:
    features: int
    norm_mean: np.ndarray | None  # [F]
    norm_std: np.ndarray | None  # [F], already max(sqrt(var), eps)
    lstms: tuple[LSTMWeights, ...]
    head: tuple[DenseWeights, ...]
    source_sha256: str
    name: str
    sequence_output: bool = True  # False: many-to-one (Keras returns the last step only)

    @property
    def outputs(self) -> int:
        return int(self.head[-1].kernel.shape[1]) if self.head else self.lstms[-1].units

    @property
    def final_activation(self) -> str:
        return self.head[-1].activation if self.head else "tanh"


def _activation_name(layer: object) -> str:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", str(act))
    return "linear" if name in ("linear", "None") else name


def load_model(path: str | Path) -> object:
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{p}: model file not found")
    if p.suffix not in (".keras", ".h5", ".hdf5"):
        raise ConvertError(f"{p}: expected a .keras (or legacy .h5) model file")
    import keras

    try:
        return keras.models.load_model(p, compile=False)
    except Exception as exc:  # Keras raises many types for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(f"{p}: Keras cannot read this model: {first}") from exc


def spec_from_model(model: object, source_sha256: str = "", name: str = "model") -> ModelSpec:
    import keras

    layers = [la for la in model.layers if not isinstance(la, keras.layers.InputLayer)]  # type: ignore[attr-defined]
    shape = model.inputs[0].shape  # type: ignore[attr-defined]
    if len(shape) != 3:
        raise UnsupportedModel(f"model input has shape {shape}; expected [batch, time, features]")
    features = int(shape[-1])
    mean = std = None
    lstms: list[LSTMWeights] = []
    head: list[DenseWeights] = []
    for layer in layers:
        kind = type(layer).__name__
        where = f"layer {layer.name!r} ({kind})"
        if kind in _REASONS:
            raise UnsupportedModel(f"{where} cannot be streamed: {_REASONS[kind]}")
        if isinstance(layer, keras.layers.Normalization):
            if lstms or head or mean is not None or getattr(layer, "invert", False):
                raise UnsupportedModel(
                    f"{where}: only a leading, non-inverting Normalization is supported"
                )
            m, v = (np.asarray(w, np.float64).reshape(-1) for w in layer.get_weights()[:2])
            mean = np.broadcast_to(m, (features,)).astype(np.float32)
            var = np.broadcast_to(v, (features,))
            std = np.maximum(np.sqrt(var), keras.config.epsilon()).astype(np.float32)
        elif isinstance(layer, keras.layers.LSTM):
            if head:
                raise UnsupportedModel(f"{where}: an LSTM after the head is not supported")
            problems = []
            if layer.stateful:
                problems.append("stateful=True (a fixed batch); the runtime keeps the state itself")
            if layer.go_backwards:
                problems.append("go_backwards=True reads the sequence in reverse")
            if layer.return_state:
                problems.append("return_state=True")
            if (
                _activation_name(layer) != "tanh"
                or layer.recurrent_activation.__name__ != "sigmoid"
            ):
                problems.append(
                    "only activation='tanh', recurrent_activation='sigmoid' are supported"
                )
            if not layer.use_bias:
                problems.append("use_bias=False is not supported")
            if problems:
                raise UnsupportedModel(f"{where} cannot be streamed: {'; '.join(problems)}")
            kernel, recurrent, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
            lstms.append(LSTMWeights(kernel, recurrent, bias))
        elif isinstance(layer, (keras.layers.Dense, keras.layers.TimeDistributed)):
            inner = layer.layer if isinstance(layer, keras.layers.TimeDistributed) else layer
            if not isinstance(inner, keras.layers.Dense):
                raise UnsupportedModel(f"{where}: only TimeDistributed(Dense) is supported")
            if not lstms:
                raise UnsupportedModel(f"{where}: Dense before the first LSTM is not supported")
            act = _activation_name(inner)
            if act not in ACTIVATIONS:
                raise UnsupportedModel(f"{where}: activation {act!r} is not one of {ACTIVATIONS}")
            w = inner.get_weights()
            bias = (
                np.asarray(w[1], np.float32) if len(w) > 1 else np.zeros(w[0].shape[1], np.float32)
            )
            head.append(DenseWeights(np.asarray(w[0], np.float32), bias, act))
        elif isinstance(layer, keras.layers.Activation):
            act = _activation_name(layer)
            if not head or head[-1].activation != "linear" or act not in ACTIVATIONS:
                raise UnsupportedModel(f"{where}: activation {act!r} must follow a linear Dense")
            head[-1] = DenseWeights(head[-1].kernel, head[-1].bias, act)
        elif isinstance(
            layer, (keras.layers.Dropout, keras.layers.GaussianNoise, keras.layers.GaussianDropout)
        ):
            continue  # identity at inference
        else:
            raise UnsupportedModel(f"{where} is not supported in a streaming step model")
    if not lstms:
        raise UnsupportedModel("the model has no LSTM layer")
    if len(lstms) > MAX_LSTM_LAYERS:
        raise UnsupportedModel(
            f"{len(lstms)} stacked LSTM layers; at most {MAX_LSTM_LAYERS} are supported"
        )
    lstm_layers = [la for la in layers if isinstance(la, keras.layers.LSTM)]
    for la in lstm_layers[:-1]:
        if not la.return_sequences:
            raise UnsupportedModel(
                f"layer {la.name!r} (LSTM) feeds another LSTM without return_sequences=True"
            )
    if lstms[0].kernel.shape[0] != features:
        raise UnsupportedModel(
            f"first LSTM expects {lstms[0].kernel.shape[0]} features, input has {features}"
        )
    seq_out = bool(lstm_layers[-1].return_sequences)
    return ModelSpec(features, mean, std, tuple(lstms), tuple(head), source_sha256, name, seq_out)


def read_spec(path: str | Path) -> ModelSpec:
    p = Path(path)
    model = load_model(p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return spec_from_model(model, digest, p.stem)

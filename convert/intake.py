"""Read a Keras model and reduce it to what a causal step needs: ``spec.ModelSpec``.

Accepted, in any order along one chain: ``LSTM`` / ``GRU`` / ``SimpleRNN`` (also as ``RNN``
over their cells or ``StackedRNNCells``, any activations of ``spec.ACTIVATIONS``, with or
without bias, ``stateful`` or not: the runtime keeps the state itself), stride-1 ``Conv1D``
with ``causal`` or ``valid`` padding (any dilation; ``ZeroPadding1D((span, 0))`` before a
``valid`` one makes it the causal convolution it is), ``Dense`` / ``TimeDistributed``,
``Activation``, ``BatchNormalization`` (folded), ``LayerNormalization``, ``RMSNormalization``,
``Normalization`` and the layers that are the identity at inference (``Dropout`` and kin).
Refused, with the layer's name and why: whatever makes step ``t`` depend on later samples or on
the whole sequence.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import shown

from .datasets import input_file
from .errors import ConvertError, UnsupportedModel
from .spec import (
    ACTIVATIONS,
    ALIASES,
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
    layer_states,
)

# Re-exported for callers that imported the spec from here.
__all__ = ["ModelSpec", "load_model", "read_spec", "spec_from_model"]

_REASONS = {
    "Bidirectional": "it reads the sequence backwards too, so step t depends on future samples",
    "Masking": "a masked step must leave state and output untouched, which a step model fed "
    "by the runtime cannot tell apart from a real sample; drop masked samples before sending",
    "Attention": "attention looks at the whole sequence, not one causal step",
    "AdditiveAttention": "attention looks at the whole sequence, not one causal step",
    "MultiHeadAttention": "attention looks at the whole sequence, not one causal step",
    "GlobalAveragePooling1D": "pooling over time needs the whole sequence",
    "GlobalMaxPooling1D": "pooling over time needs the whole sequence",
    "MaxPooling1D": "pooling over time changes the sample rate",
    "AveragePooling1D": "pooling over time changes the sample rate",
    "Flatten": "flattening mixes time steps together",
    "Reshape": "reshaping may mix time steps together",
    "RepeatVector": "an encoder-decoder repeats a summary of the whole input",
    "Lambda": "arbitrary code cannot be turned into a step",
    "ConvLSTM1D": "ConvLSTM layers are not supported",
}
IDENTITY = (
    "Dropout",
    "SpatialDropout1D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "InputLayer",
    "Identity",
)


def _activation_name(fn: object) -> str:
    name = getattr(fn, "__name__", str(fn))
    return ALIASES.get(name, name)


def _act(fn: object, where: str, allow_softmax: bool = False) -> str:
    name = _activation_name(fn)
    ok = [a for a in ACTIVATIONS if allow_softmax or a != "softmax"]
    if name not in ok:
        raise UnsupportedModel(f"{where}: activation {shown(name)} is not one of {', '.join(ok)}")
    return name


def load_model(path: str | Path) -> object:
    saved = Path(path) / "saved_model.pb" if Path(path).is_dir() else Path(path)
    if saved.name == "saved_model.pb" and saved.is_file():
        raise ConvertError(
            f"{path}: a TensorFlow SavedModel (model.export(), tf.saved_model.save()), whose "
            "layers Keras cannot read back; convert the model saved with "
            "model.save('model.keras') (or exported to ONNX)"
        )
    p = input_file(path, missing="model file not found")
    if p.suffix not in (".keras", ".h5", ".hdf5"):
        raise ConvertError(f"{p}: expected a .keras (or legacy .h5) or an .onnx model file")
    if p.suffix == ".keras" and not zipfile.is_zipfile(p):
        # Keras says "File not found" of a file that is there but is no zip archive
        raise ConvertError(
            f"{p}: Keras cannot read this model: it is not a zip archive, as a .keras file is "
            "(damaged, cut short, or another format renamed)"
        )
    import keras

    try:
        try:
            return keras.models.load_model(p, compile=False)
        except Exception as exc:  # Keras 2's time_major, which Keras 3 has no keyword for
            if p.suffix == ".keras" or "'time_major'" not in str(exc):
                raise
            model = keras.models.load_model(p, compile=False, custom_objects=_keras2_rnn())
    except Exception as exc:  # Keras raises many types for unreadable files
        if (custom := _custom_object(exc)) is not None:
            raise UnsupportedModel(
                f"{p}: the model uses {custom}, which is not one of Keras' own: a custom "
                "layer, activation or model is Python code the converter cannot read; build the "
                "model from Keras' layers and activations (see the README's list)"
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        saved = _saved_by(p)
        if saved is not None and saved != keras.__version__:  # a keyword of another Keras
            first += f" (the model was saved by Keras {saved}, this is Keras {keras.__version__})"
        raise ConvertError(f"{p}: Keras cannot read this model: {first}") from exc
    time_major = [la.name for la in _all_layers(model) if getattr(la, "keras2_time_major", False)]
    if time_major:
        raise UnsupportedModel(
            f"{p}: layer {shown(time_major[0])} was saved with time_major=True (Keras 2): it "
            "reads [time, batch, features]; only batch-major models ([batch, time, features]) "
            "are read"
        )
    return model


def _saved_by(p: Path) -> str | None:
    """The Keras version a model file says saved it, if it says."""
    import json

    try:
        if p.suffix == ".keras":
            with zipfile.ZipFile(p) as z:
                version = json.loads(z.read("metadata.json")).get("keras_version")
        else:
            import h5py

            with h5py.File(p, "r") as f:
                version = f.attrs.get("keras_version")
        version = version.decode() if isinstance(version, bytes) else version
    except Exception:  # damaged or without it: nothing to add
        return None
    ok = isinstance(version, str) and version.isprintable() and len(version) <= 40
    return version if ok else None


def _keras2(base: Any) -> Any:
    """``base`` (a Keras 3 recurrent layer) taking Keras 2's ``time_major`` keyword, which a
    legacy .h5 of tf.keras 2 holds for every LSTM / GRU / SimpleRNN / RNN layer."""

    class Keras2(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, time_major: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.keras2_time_major = bool(time_major)

    Keras2.__name__ = Keras2.__qualname__ = base.__name__
    return Keras2


def _keras2_rnn() -> dict[str, Any]:
    import keras

    class Bidirectional(keras.layers.Bidirectional):  # type: ignore[misc]
        """Keras builds the layers it wraps without the custom objects: it gets them without
        ``time_major`` (it is refused whatever it holds)."""

        @classmethod
        def from_config(cls, config: Any, custom_objects: Any = None) -> Any:
            for key in ("layer", "backward_layer"):
                if isinstance(wrapped := config.get(key), dict):
                    wrapped.get("config", {}).pop("time_major", None)
            return super().from_config(config, custom_objects)

    rnn = {n: _keras2(getattr(keras.layers, n)) for n in ("LSTM", "GRU", "SimpleRNN", "RNN")}
    return {**rnn, "Bidirectional": Bidirectional}


def _all_layers(model: Any) -> list[Any]:
    """Every layer of ``model``, those of nested models and wrappers included."""
    out = []
    for la in getattr(model, "layers", []):
        out += [la, *_all_layers(la)]
        if (inner := getattr(la, "layer", None)) is not None:  # Bidirectional, TimeDistributed
            out += [inner]
    return out


# Keras' words for an object of the file that is not its own (.keras; legacy .h5), and for the
# layer whose config holds it (a custom activation of a Dense)
_UNKNOWN = re.compile(r"Could not locate (class|function) '([^']+)'|Unknown (\w+): '([^']+)'")
_HOLDER = re.compile(r"Error when deserializing class '(\w+)' using config=\{'name': '([^']+)'")


def _custom_object(exc: BaseException) -> str | None:
    """The custom object Keras could not find when loading, named (its first line only said
    that the whole model "could not be deserialized properly"); None for other failures."""
    said = []
    cause: BaseException | None = exc
    while cause is not None and len(said) < 20:
        said.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(said)
    if (found := _UNKNOWN.search(text)) is None:
        return None
    kind, name = (found[1], found[2]) if found[1] else (found[3], found[4])
    holder = _HOLDER.search(text)
    where = f" (of layer {shown(holder[2])} ({holder[1]}))" if holder and kind != "layer" else ""
    return f"the {kind} {shown(name)}{where}"


def _f32(a: Any) -> np.ndarray:
    return np.asarray(a, np.float32)


def _weight(v: Any) -> np.ndarray:
    """A layer's weight as Keras computes it (``Dense.kernel`` adds a LoRA adapter's update to
    the stored kernel, which ``get_weights()`` lists apart)."""
    import keras

    return _f32(keras.ops.convert_to_numpy(v))


def _cell(cell: Any, where: str) -> Layer:
    """One recurrent cell's weights and activations."""
    import keras

    kind = type(cell).__name__
    act = _act(cell.activation, where)
    w = [_f32(v) for v in cell.get_weights()]
    if isinstance(cell, keras.layers.LSTMCell):
        ract = _act(cell.recurrent_activation, where)
        bias = w[2] if cell.use_bias else np.zeros(w[0].shape[1], np.float32)
        return LSTMCell(w[0], w[1], bias, "ifco", act, ract)
    if isinstance(cell, keras.layers.GRUCell):
        ract = _act(cell.recurrent_activation, where)
        width = w[0].shape[1]
        zeros = np.zeros(width, np.float32)
        if not cell.use_bias:
            b_in, b_rec = zeros, zeros
        elif cell.reset_after:
            b_in, b_rec = w[2][0], w[2][1]
        else:
            b_in, b_rec = w[2].reshape(-1), zeros
        return GRUCell(w[0], w[1], b_in, b_rec, bool(cell.reset_after), "zrh", act, ract)
    if isinstance(cell, keras.layers.SimpleRNNCell):
        bias = w[2] if cell.use_bias else np.zeros(w[0].shape[1], np.float32)
        return SimpleRNNCell(w[0], w[1], bias, act)
    raise UnsupportedModel(f"{where}: cell {kind} is not supported (LSTM, GRU, SimpleRNN cells)")


def _recurrent(layer: Any, where: str) -> tuple[list[Layer], bool]:
    """(cells, return_sequences) of an LSTM / GRU / SimpleRNN / RNN layer."""
    import keras

    problems = []
    if layer.go_backwards:
        problems.append("go_backwards=True reads the sequence in reverse")
    if layer.return_state:
        problems.append("return_state=True (the runtime keeps the state; return the sequence)")
    if problems:
        raise UnsupportedModel(f"{where} cannot be streamed: {'; '.join(problems)}")
    cell = layer.cell
    cells = list(cell.cells) if isinstance(cell, keras.layers.StackedRNNCells) else [cell]
    return [_cell(c, where) for c in cells], bool(layer.return_sequences)


def _span(layer: Any) -> int:
    """How many earlier samples a Conv1D's window reaches back."""
    return (int(layer.kernel_size[0]) - 1) * int(np.prod(layer.dilation_rate))


def _causal_padding(layer: Any, where: str, nxt: Any) -> None:
    """A ``ZeroPadding1D`` is read only as what makes the next ``valid`` Conv1D causal:
    exactly its span of zeros before the sequence, none after (a stream has no end)."""
    import keras

    left, right = (int(v) for v in layer.padding)
    conv = getattr(nxt, "layer", nxt)
    fits = (
        isinstance(conv, keras.layers.Conv1D)
        and conv.padding == "valid"
        and not isinstance(nxt, keras.layers.TimeDistributed)
    )
    if right or not fits or _span(conv) != left:
        raise UnsupportedModel(
            f"{where} pads ({left}, {right}): only zeros before a Conv1D with padding='valid', "
            "as many as its window reaches back ((kernel_size - 1) * dilation_rate), are "
            "streamed (they make it a causal convolution); padding after the sequence needs "
            "its end, which a stream does not have"
        )


def _conv(layer: Any, where: str) -> Conv1D:
    problems = []
    stride = int(np.prod(layer.strides))
    if stride != 1:
        problems.append(
            f"strides={stride} gives one output per {stride} samples; the step model gives one "
            "per sample"
        )
    if layer.padding not in ("causal", "valid") and _span(layer):  # one tap: no padding
        problems.append(
            f"padding={shown(layer.padding)} centres the window, so step t reads later samples; "
            "use "
            "padding='causal'"
        )
    if layer.data_format != "channels_last":
        problems.append("data_format must be 'channels_last' ([batch, time, features])")
    if problems:
        raise UnsupportedModel(f"{where} cannot be streamed: {'; '.join(problems)}")
    kernel = _weight(layer.kernel)  # [K, D_in / groups, D_out], with a LoRA adapter's update
    groups = int(getattr(layer, "groups", 1))
    if groups > 1:  # a block-diagonal full kernel
        k, d_g, d_out = kernel.shape
        full = np.zeros((k, d_g * groups, d_out), np.float32)
        per = d_out // groups
        for g in range(groups):
            full[:, g * d_g : (g + 1) * d_g, g * per : (g + 1) * per] = kernel[
                ..., g * per : (g + 1) * per
            ]
        kernel = full
    bias = _weight(layer.bias) if layer.use_bias else np.zeros(kernel.shape[2], np.float32)
    act = _act(layer.activation, where)
    return Conv1D(kernel, bias, int(np.prod(layer.dilation_rate)), act)


def _relu(layer: Any, where: str) -> str:
    """The activation a ``ReLU`` layer's parameters make: relu, relu6 or leaky_relu (0.2)."""
    top = None if layer.max_value is None else float(layer.max_value)
    slope, threshold = float(layer.negative_slope), float(layer.threshold)
    if threshold == 0.0 and (top, slope) in ((None, 0.0), (6.0, 0.0)):
        return "relu" if top is None else "relu6"
    if threshold == 0.0 and top is None and abs(slope - 0.2) <= 1e-7:
        return "leaky_relu"
    raise UnsupportedModel(
        f"{where}: max_value={top}, negative_slope={slope:g}, threshold={threshold:g}; the "
        "step computes a ReLU capped at 6 or none, with a negative slope of 0 or 0.2 "
        "(relu, relu6, leaky_relu), from a threshold of 0"
    )


def _per_feature(a: np.ndarray, width: int, where: str, what: str) -> np.ndarray:
    """``a`` as a [width] vector when it applies per feature (one value per feature, or one for
    all); a shape with a time axis (one value per step of a fixed-length window) is refused."""
    if any(n != 1 for n in a.shape[:-1]) or (a.ndim and a.shape[-1] not in (1, width)):
        raise UnsupportedModel(
            f"{where}: its {what} have shape {list(a.shape)}, not one value per feature (a "
            f"value per time step of a fixed-length window?); only [{width}] or one value "
            "for all applies to every step of a stream"
        )
    return np.broadcast_to(a.reshape(-1), (width,))


def _on_features(layer: Any, where: str, rank: int, what: str) -> None:
    """``layer.axis`` must be the features' axis of a tensor of ``rank`` ([batch, time,
    features], or [batch, features] after a many-to-one layer or inside TimeDistributed)."""
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    if len(axes) != 1 or axes[0] % rank != rank - 1:
        raise UnsupportedModel(
            f"{where}: axis={layer.axis} on a tensor of {rank} axes is not the features' axis; "
            f"only {what} (axis=-1) is computed per step"
        )


def _batchnorm(layer: Any, where: str, width: int, rank: int) -> Affine:
    _on_features(layer, where, rank, "a normalisation per feature")
    mean = _f32(layer.moving_mean.numpy())
    var = np.asarray(layer.moving_variance.numpy(), np.float64)
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones(width)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros(width)
    scale = gamma / np.sqrt(var + layer.epsilon)
    return Affine(_f32(scale), _f32(beta - mean * scale))


def _fold(prev: Layer | None, affine: Affine) -> Layer | None:
    """An affine after a linear Dense or convolution becomes part of its weights."""
    if isinstance(prev, Dense) and prev.activation == "linear":
        return Dense(prev.kernel * affine.scale, prev.bias * affine.scale + affine.shift)
    if isinstance(prev, Conv1D) and prev.activation == "linear":
        return Conv1D(
            prev.kernel * affine.scale, prev.bias * affine.scale + affine.shift, prev.dilation
        )
    return None


def _chain(model: Any) -> list[Any]:
    """The layers from the model's input to its output in the order Keras calls them: a layer
    called twice is listed twice, a nested model's layers stand in its place. Whatever is not
    one chain of layers is refused naming it: an operation on the model's tensors (``x * 2``,
    ``keras.ops.add``), which ``model.layers`` does not list; a layer reading several tensors
    (a branch); a subclassed model, whose ``call`` is code."""
    import keras

    _readable(model)
    if isinstance(model, keras.Sequential):
        return [la for top in model.layers for la in (_chain(top) if _nested(top) else [top])]
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModel(
            f"model {shown(model.name)}: {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; a model inside the model must take one tensor and give one"
        )
    start, t = model.inputs[0], model.outputs[0]
    found: list[Any] = []
    while t is not start:
        op, node_index, _ = t._keras_history
        if not isinstance(op, keras.layers.Layer):
            raise UnsupportedModel(
                f"operation {shown(op.name)} ({type(op).__name__}) cannot be streamed: it is an "
                "operation on the model's tensors (x * 2, x + y, keras.ops...), not a layer, "
                "and is not read; use layers (Rescaling, Activation, Dense, ...)"
            )
        ins = _tensors_read(op._inbound_nodes[node_index])
        if isinstance(op, keras.layers.InputLayer):
            raise UnsupportedModel(f"the output is computed from {shown(op.name)}, not the input")
        if len(ins) != 1 and type(op).__name__ not in _REASONS:  # those say why themselves
            raise UnsupportedModel(
                f"layer {shown(op.name)} ({type(op).__name__}) takes {len(ins)} tensors: the model "
                "branches (a residual connection, a concatenation, an initial state); only "
                "one chain of layers from the input to the output is streamed"
            )
        found += reversed(_chain(op)) if _nested(op) else [op]
        t = ins[0]
    return found[::-1]


def _tensors_read(node: Any) -> list[Any]:
    """The distinct tensors a call reads (a mask is the tensor's own, not another input)."""
    import keras

    args = node.arguments
    kwargs = {k: v for k, v in args.kwargs.items() if k != "mask"}
    out: list[Any] = []
    for t in keras.tree.flatten((args.args, kwargs)):
        if isinstance(t, keras.KerasTensor) and all(t is not u for u in out):
            out.append(t)
    return out


def _nested(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _readable(model: Any) -> None:
    """A Sequential or functional model: a subclassed one's ``call`` is code, not layers."""
    import keras
    from keras.src.models.functional import Functional  # no public name for it

    if not isinstance(model, (keras.Sequential, Functional)):
        raise UnsupportedModel(
            f"model {shown(model.name)} ({type(model).__name__}) is a subclassed keras.Model: its "
            "call() is Python code the converter cannot read; build it with keras.Sequential "
            "or the functional API (keras.Model(inputs, outputs))"
        )


def spec_from_model(model: object, source_sha256: str = "", name: str = "model") -> ModelSpec:
    import keras

    keras_model: Any = model
    _readable(keras_model)
    ins = [t.name for t in keras_model.inputs]
    outs = list(getattr(keras_model, "output_names", None) or [t.name for t in keras_model.outputs])
    if len(ins) != 1:
        raise UnsupportedModel(
            f"the model has {len(ins)} inputs ({', '.join(ins)}); expected one "
            "[batch, time, features] input (the runtime keeps the state itself)"
        )
    if len(outs) != 1:
        raise UnsupportedModel(
            f"the model has {len(outs)} outputs ({', '.join(outs)}); expected one (return only "
            "the per-step prediction)"
        )
    shape = model.inputs[0].shape  # type: ignore[attr-defined]
    if len(shape) != 3:
        raise UnsupportedModel(f"model input has shape {shape}; expected [batch, time, features]")
    features = int(shape[-1])
    mean = std = None
    out: list[Layer] = []
    width = features
    timeline = True  # False once a layer returned only its last step
    layers = _chain(keras_model)
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        where = f"layer {shown(layer.name)} ({kind})"
        inner = layer.layer if isinstance(layer, keras.layers.TimeDistributed) else layer
        ikind = type(inner).__name__
        if kind in _REASONS or ikind in _REASONS:
            reason = _REASONS.get(kind) or _REASONS[ikind]
            raise UnsupportedModel(f"{where} cannot be streamed: {reason}")
        if ikind in IDENTITY:
            continue
        rank = (3 if timeline else 2) - (layer is not inner)  # TimeDistributed: one step
        if mode := getattr(inner, "quantization_mode", None):
            raise UnsupportedModel(
                f"{where} is quantised by Keras ({mode}): convert the float model (before "
                "model.quantize()); the converter quantises the step itself (--quant)"
            )
        if isinstance(layer, keras.layers.ZeroPadding1D):
            _causal_padding(layer, where, layers[i + 1] if i + 1 < len(layers) else None)
            continue  # the convolution's zero buffer at the start of a stream is that padding
        new: list[Layer] = []
        if isinstance(inner, keras.layers.Normalization):
            # adapted (weights) or given to the constructor (no weights): both end up here
            m, v = (
                np.asarray(keras.ops.convert_to_numpy(t), np.float64)
                for t in (inner.mean, inner.variance)
            )
            what = f"statistics (axis={inner.axis})"
            m, v = (_per_feature(a, width, where, what) for a in (m, v))
            s = np.maximum(np.sqrt(v), keras.config.epsilon())
            if not out and mean is None and not getattr(inner, "invert", False):
                mean, std = _f32(m), _f32(s)
            elif getattr(inner, "invert", False):
                new = [Affine(_f32(s), _f32(m))]
            else:
                new = [Affine(_f32(1.0 / s), _f32(-m / s))]
        elif isinstance(inner, keras.layers.BatchNormalization):
            affine = _batchnorm(inner, where, width, rank)
            folded = _fold(out[-1] if out else None, affine)
            if folded is not None:
                out[-1] = folded
            else:
                new = [affine]
        elif isinstance(inner, keras.layers.LayerNormalization):
            _on_features(inner, where, rank, "a normalisation over each step's features")
            gamma = inner.gamma  # rms_scaling=True keeps center=True but makes no beta
            gamma = _f32(gamma.numpy()) if gamma is not None else np.ones(width, np.float32)
            beta = inner.beta
            beta = _f32(beta.numpy()) if beta is not None else np.zeros(width, np.float32)
            rms = bool(getattr(inner, "rms_scaling", False))
            new = [LayerNorm(gamma, beta, float(inner.epsilon), rms)]
        elif isinstance(inner, keras.layers.RMSNormalization):
            _on_features(inner, where, rank, "a normalisation over each step's features")
            eps = keras.config.epsilon() if inner.epsilon is None else float(inner.epsilon)
            scale = _f32(inner.scale.numpy())
            new = [LayerNorm(scale, np.zeros(width, np.float32), eps, True, True)]
        elif isinstance(inner, keras.layers.Dense):
            kernel = _weight(inner.kernel)  # with a LoRA adapter's update, as Keras applies it
            bias = _weight(inner.bias) if inner.use_bias else np.zeros(kernel.shape[1], np.float32)
            new = [Dense(kernel, bias, _act(inner.activation, where, allow_softmax=True))]
        elif isinstance(inner, keras.layers.Activation):
            new = [Activation(_act(inner.activation, where, allow_softmax=True))]
        elif isinstance(inner, keras.layers.ReLU):
            new = [Activation(_relu(inner, where))]
        elif isinstance(inner, keras.layers.Softmax):
            _on_features(inner, where, rank, "a softmax over each step's features")
            new = [Activation("softmax")]
        elif isinstance(inner, keras.layers.Rescaling):
            scale, offset = (
                _per_feature(np.asarray(v, np.float64), width, where, what)
                for v, what in ((inner.scale, "scale"), (inner.offset, "offset"))
            )
            new = [Affine(_f32(scale), _f32(offset))]
        elif isinstance(inner, keras.layers.ELU):
            if float(inner.alpha) != 1.0:
                raise UnsupportedModel(f"{where}: only alpha=1.0 (the 'elu' activation)")
            new = [Activation("elu")]
        elif isinstance(inner, keras.layers.LeakyReLU):
            if abs(float(inner.negative_slope) - 0.2) > 1e-7:
                raise UnsupportedModel(
                    f"{where}: negative_slope={inner.negative_slope:g}; only 0.2, the slope of "
                    "the 'leaky_relu' activation the step computes"
                )
            new = [Activation("leaky_relu")]
        elif layer is not inner:
            raise UnsupportedModel(
                f"{where}: TimeDistributed({ikind}) is not supported (per-step layers only)"
            )
        elif isinstance(layer, keras.layers.RNN):
            if not timeline:
                raise UnsupportedModel(
                    f"{where}: follows a layer that returned only its last step "
                    "(set return_sequences=True on the layer before)"
                )
            new, timeline = _recurrent(layer, where)
        elif isinstance(layer, keras.layers.Conv1D):
            if not timeline:
                raise UnsupportedModel(f"{where}: follows a layer that returned its last step")
            new = [_conv(layer, where)]
        else:
            raise UnsupportedModel(
                f"{where} is not a layer the converter reads (recurrent layers, stride-1 Conv1D, "
                "Dense, per-step normalisations and activations; see the README's list)"
            )
        for la in new:
            if isinstance(la, (Dense, LSTMCell, GRUCell, SimpleRNNCell, Conv1D)):
                d_in = la.kernel.shape[-2]
                if d_in != width:
                    raise UnsupportedModel(f"{where}: expects {d_in} features, gets {width}")
                width = (
                    int(la.kernel.shape[-1])
                    if not isinstance(la, (LSTMCell, GRUCell, SimpleRNNCell))
                    else la.units
                )
        out += new
    layers = tuple(out)
    if not layer_states(layers):
        raise UnsupportedModel(
            "the model has no recurrent layer or convolution over time: nothing to stream"
        )
    return ModelSpec(features, mean, std, layers, source_sha256, name, timeline)


def read(path: str | Path) -> tuple[ModelSpec, Any]:
    """The spec read from a Keras model file, and the Keras model itself."""
    p = Path(path)
    model = load_model(p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return spec_from_model(model, digest, p.stem), model


def read_spec(path: str | Path) -> ModelSpec:
    return read(path)[0]


AGREEMENT_TOL = 1e-4  # Keras vs the step read from the model, relative to the output scale
AGREEMENT_SEQUENCES = 16
AGREEMENT_STEPS = 4  # compared strictly: later, float32 rounding may grow in an unstable model
HALF_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}  # machine epsilon of a half precision
HALF_STEPS_EPS = 8  # Keras in half precision vs the float32 step: up to this many epsilons


def _unwrapped(layer: Any) -> Any:
    return getattr(layer, "layer", layer)


def _zero_padding(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.layers.ZeroPadding1D)


def _causal_twin(model: Any) -> Any:
    """``model`` with every ``valid`` Conv1D that no ``ZeroPadding1D`` makes causal made
    ``causal``, its weights the same: the model a stream runs. None when Keras cannot clone
    the model so (a custom layer): the checks then do what they can without it."""
    import keras

    chain = _chain(model)
    padded = {id(la) for prev, la in zip([None, *chain], chain) if _zero_padding(prev)}

    def twin_of(layer: Any) -> Any:
        config = layer.get_config()
        valid = isinstance(layer, keras.layers.Conv1D) and layer.padding == "valid"
        if valid and id(layer) not in padded:
            config["padding"] = "causal"
        return layer.__class__.from_config(config)

    try:
        twin = keras.models.clone_model(model, clone_function=twin_of, recursive=True)
        twin.set_weights(model.get_weights())
    except Exception:  # a layer Keras cannot rebuild from its config: no twin to run
        return None
    return twin


def _input_cast(model: Any, xs: np.ndarray) -> None:
    """A model whose input is not a float (``keras.Input(dtype="int32")``) casts every sample
    to that type, which the step, fed float32 samples as they come, does not: samples the cast
    changes (a fraction, a value out of its range) are refused, naming the first."""
    import keras

    dtype = str(model.inputs[0].dtype)
    if "float" in dtype:
        return
    cast = keras.ops.cast(keras.ops.cast(xs, dtype), "float32")
    kept = np.asarray(keras.ops.convert_to_numpy(cast))
    if not np.array_equal(kept, xs):
        at = np.argwhere(kept != xs)[0]
        raise UnsupportedModel(
            f"the model's input is {dtype} (keras.Input(dtype=...)): Keras casts every sample "
            "to it, the step takes the samples as they come; the data holds "
            f"{float(xs[tuple(at)]):g} at index {at.tolist()}, which that cast changes: give "
            f"the samples as {dtype} values, as the device will send them, or build the model "
            "with a float input"
        )


def check_agreement(model: Any, spec: ModelSpec, xs: np.ndarray) -> str | None:
    """Keras itself against the step read from the model, over the first steps of ``xs``:
    what is read wrongly is refused here (exit 2) rather than verified against itself. (Only
    the first steps: in a model whose state grows without bound, float32 rounding grows too.)
    A ``valid`` convolution streams as its causal twin (Keras drops its first outputs, the
    stream emits them and the layers after it see them): that difference, over all of ``xs``,
    is returned as a warning. None when there is nothing to say, or when Keras cannot run the
    model alone. A ``stateful`` model runs batch by batch from a reset state (sequences
    repeated to fill a batch of its size); a model of a fixed length gets sequences of that
    length (cut, or repeated along time), and its first steps are compared (its last, the
    whole length, for a many-to-one model)."""
    import keras

    from . import reference

    layers = [_unwrapped(la) for la in _chain(model)]
    stateful = [la for la in layers if getattr(la, "stateful", False)]
    batch = model.inputs[0].shape[0] if stateful else None

    def keras_run(fed: np.ndarray, m: Any) -> np.ndarray:
        """Keras' own outputs from the zero state: a stateful model (a fixed batch, its state
        carried from one call to the next) runs one batch at a time, reset before each."""
        if not stateful:
            return np.asarray(m.predict(fed, verbose=0, batch_size=len(fed)), np.float64)
        held = [la for la in map(_unwrapped, _chain(m)) if getattr(la, "stateful", False)]
        outs = []
        try:
            for i in range(0, len(fed), batch):
                for la in held:
                    la.reset_state()
                outs.append(m.predict(fed[i : i + batch], verbose=0, batch_size=batch))
        finally:
            for la in held:
                la.reset_state()
        return np.asarray(np.concatenate(outs), np.float64)

    shift = sum(
        _span(la)
        for prev, la in zip([None, *layers], layers)
        if isinstance(la, keras.layers.Conv1D)
        and la.padding == "valid"
        and not isinstance(prev, keras.layers.ZeroPadding1D)  # padded: causal, no shift
    )
    _input_cast(model, xs)
    xs = xs[:AGREEMENT_SEQUENCES]
    if stateful:  # whole batches of the model's fixed size
        if not isinstance(batch, int):
            return None
        xs = np.resize(xs, (max(batch, len(xs) // batch * batch), *xs.shape[1:]))
    length = model.inputs[0].shape[1]  # a fixed length: Keras runs nothing else

    def fit(x: np.ndarray, steps: int | None) -> np.ndarray:
        """``x`` cut to ``steps`` samples, or repeated along time up to them."""
        return x if steps is None else np.concatenate([x] * -(-steps // x.shape[1]), 1)[:, :steps]

    early_steps = AGREEMENT_STEPS if length is None or spec.sequence_output else None
    # A mixed-precision policy (mixed_float16 / mixed_bfloat16), or a half-precision input
    # (keras.Input(dtype="float16"), which rounds every sample): Keras computes in half
    # precision, the step in float32; they differ by that rounding, not by a misread layer.
    dtypes = {str(getattr(la, "compute_dtype", "")) for la in layers}
    half = sorted({*dtypes, str(model.inputs[0].dtype)} & set(HALF_EPS))
    tol = max([AGREEMENT_TOL, *(HALF_STEPS_EPS * HALF_EPS[h] for h in half)])

    def differ(
        x: np.ndarray,
        pad: np.ndarray | None = None,
        first: int | None = None,
        keras_model: Any = None,
    ) -> float | None:
        """Relative max difference (over the ``first`` steps, if given); ``pad``: Keras gets
        it before ``x`` (the twin's padding); ``keras_model``: the causal twin to run instead
        of the model (its outputs are the stream's, none dropped)."""
        fed = x if pad is None else np.concatenate([np.broadcast_to(pad, x[:, :shift].shape), x], 1)
        try:
            want = keras_run(fed, model if keras_model is None else keras_model)
        except Exception:  # e.g. a fixed batch size or length: the reference is all there is
            return None
        drop = shift if pad is None and keras_model is None else 0
        got = np.asarray(reference.run(spec, x)[0], np.float64)
        got = got[:, drop:] if spec.sequence_output else got[:, -1]
        if got.shape != want.shape or not np.isfinite(want).all():
            return None  # a model that diverges is said by the calibration, naming where
        if first is not None and spec.sequence_output:
            got, want = got[:, :first], want[:, :first]
        return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))

    early = None
    if not shift:
        early = differ(fit(xs[:, :early_steps], length), first=early_steps)
    elif (twin := _causal_twin(model)) is not None:
        # Keras' own run of the twin the stream is: every 'valid' convolution 'causal', the
        # weights the same. Wherever the convolution is, a layer read wrongly is found here,
        # not taken for the difference the 'valid' padding makes (said below).
        early = differ(fit(xs[:, :early_steps], length), first=early_steps, keras_model=twin)
    elif isinstance(spec.layers[0], Conv1D) and spec.layers[0].span == shift:
        # one valid convolution, first: Keras on the input padded with what the twin's zero
        # buffer stands for (the mean, where the normalisation runs before it) is the twin
        mean = spec.norm_mean
        pad = np.zeros(spec.features) if mean is None else mean.astype(np.float64)
        x = fit(xs[:, :early_steps], None if length is None else max(1, length - shift))
        early = differ(x, pad.astype(np.float32), first=early_steps)
    if early is not None and not early <= tol:
        raise UnsupportedModel(
            f"the step read from the model differs from Keras' own run of it by {early:.3g} "
            f"(relative) in the first {early_steps or length} steps of --calib: a layer is not "
            "read as Keras computes it (please report the model)"
        )
    if half and early is not None and early > AGREEMENT_TOL:
        return (
            f"Keras computes this model in {half[0]} (a mixed-precision dtype policy or a "
            f"half-precision input), the step in float32: they differ by {early:.3g} (relative) "
            f"in the first {early_steps or length} steps of --calib, and the bundle is verified "
            "against the float32 step"
        )
    if shift and (whole := differ(fit(xs, length))) is not None and whole > tol:
        return (
            "a Conv1D with padding='valid' streams as its causal twin: on --calib its outputs "
            f"differ from Keras' by {whole:.3g} (relative to the output's scale; the stream "
            f"also steps the {shift} first outputs Keras drops, and the state after them "
            "carries that on); train with padding='causal' for a stream that is the model"
        )
    return None

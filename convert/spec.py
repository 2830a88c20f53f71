"""What a causal step computes, free of any framework: ``ModelSpec``, an ordered list of layers.

A reader (``intake`` for Keras; an ONNX or PyTorch reader the same way) turns a trained model
into this; ``reference`` runs it in NumPy and ``step_graph`` builds the TFLite step from it.
Every layer maps one step's vector to the next; recurrent cells and convolutions carry state
tensors, listed by ``ModelSpec.states`` in the order the step model's signature holds them.

Gate layouts are explicit (``LSTMCell.gates``, ``GRUCell.gates``: the order of the gate blocks
along the kernels' last axis), so a reader with another order (ONNX: i, o, f, c) need not
permute weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The activations a cell, a convolution or a Dense may use (names as Keras spells them).
ACTIVATIONS = (
    "linear",
    "sigmoid",
    "tanh",
    "relu",
    "relu6",
    "hard_sigmoid",
    "softsign",
    "softplus",
    "elu",
    "selu",
    "silu",
    "gelu",
    "exponential",
    "hard_silu",
    "leaky_relu",
    "softmax",
)
ALIASES = {"swish": "silu", "hard_swish": "hard_silu", "None": "linear"}
# |f(x)| <= bound for every x: a state made of such values has a range known without data
BOUNDS = {"tanh": 1.0, "sigmoid": 1.0, "hard_sigmoid": 1.0, "softsign": 1.0, "softmax": 1.0}


@dataclass(frozen=True)
class Dense:
    """act(x W + b) per step."""

    kernel: np.ndarray  # [D_in, D_out]
    bias: np.ndarray  # [D_out]
    activation: str = "linear"


@dataclass(frozen=True)
class Affine:
    """x * scale + shift per feature: a folded BatchNormalization or an inner Normalization."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True)
class LayerNorm:
    """Normalise each step's vector over its features (``rms``: Keras' ``rms_scaling``, the
    input itself, not centred, divided by its standard deviation; ``root_mean_square``: Keras'
    ``RMSNormalization``, the input over its root mean square, nothing centred)."""

    gamma: np.ndarray
    beta: np.ndarray
    epsilon: float
    rms: bool = False
    root_mean_square: bool = False


@dataclass(frozen=True)
class Activation:
    name: str


class _Gated:
    """A cell whose kernels hold one block of ``units`` columns per gate, in ``gates`` order."""

    recurrent: np.ndarray
    gates: str

    @property
    def units(self) -> int:
        return int(self.recurrent.shape[0])

    def gate(self, name: str, a: np.ndarray) -> np.ndarray:
        k = self.gates.index(name)
        return a[..., k * self.units : (k + 1) * self.units]


@dataclass(frozen=True)
class LSTMCell(_Gated):
    """c' = f c + i g, h' = o act(c'); i, f, o = rec_act(.), g = act(.)."""

    kernel: np.ndarray  # [D_in, 4H], gate blocks in ``gates`` order
    recurrent: np.ndarray  # [H, 4H]
    bias: np.ndarray  # [4H] (zeros when the model has none)
    gates: str = "ifco"
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"


@dataclass(frozen=True)
class GRUCell(_Gated):
    """z, r = rec_act(.); hh = act(x W_h + r * (h U_h + b_rh)) when ``reset_after``, else
    act(x W_h + (r h) U_h + b_h); h' = z h + (1 - z) hh."""

    kernel: np.ndarray  # [D_in, 3H], gate blocks in ``gates`` order
    recurrent: np.ndarray  # [H, 3H]
    input_bias: np.ndarray  # [3H]
    recurrent_bias: np.ndarray  # [3H] (zeros unless ``reset_after``)
    reset_after: bool = True
    gates: str = "zrh"
    activation: str = "tanh"
    recurrent_activation: str = "sigmoid"


@dataclass(frozen=True)
class SimpleRNNCell:
    """h' = act(x W + h U + b)."""

    kernel: np.ndarray
    recurrent: np.ndarray
    bias: np.ndarray
    activation: str = "tanh"

    @property
    def units(self) -> int:
        return int(self.recurrent.shape[0])


@dataclass(frozen=True)
class Conv1D:
    """A stride-1 causal convolution over time: y_t = act(sum_k x_{t-(K-1-k)d} W_k + b).

    Its state is the last ``(K-1) d`` inputs, oldest first, flattened: ``[(K-1) d * D_in]``.
    The zero state is the causal zero padding."""

    kernel: np.ndarray  # [K, D_in, D_out]
    bias: np.ndarray  # [D_out]
    dilation: int = 1
    activation: str = "linear"

    @property
    def span(self) -> int:
        """Past samples the convolution needs besides the current one."""
        return (int(self.kernel.shape[0]) - 1) * self.dilation

    @property
    def buffer_width(self) -> int:
        return self.span * int(self.kernel.shape[1])


Layer = Dense | Affine | LayerNorm | Activation | LSTMCell | GRUCell | SimpleRNNCell | Conv1D
CELL_KIND = {LSTMCell: "lstm", GRUCell: "gru", SimpleRNNCell: "rnn", Conv1D: "conv1d"}


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of the step: ``name`` in, ``name + '_next'`` out."""

    name: str
    role: str  # "h", "c" or "buffer"
    width: int
    layer: int  # index into ModelSpec.layers
    cell: str  # "lstm", "gru", "rnn", "conv1d"

    @property
    def output(self) -> str:
        return f"{self.name}_next"


def layer_states(layers: tuple[Layer, ...]) -> list[StateTensor]:
    """State tensors in signature order: per recurrent cell h (then c for an LSTM), named by
    the cell's rank (h0, c0, h1, ...); per convolution its buffer (buf0, buf1, ...)."""
    out: list[StateTensor] = []
    cells = convs = 0
    for i, layer in enumerate(layers):
        kind = CELL_KIND.get(type(layer))
        if kind == "conv1d":
            assert isinstance(layer, Conv1D)
            if layer.span:
                out.append(StateTensor(f"buf{convs}", "buffer", layer.buffer_width, i, kind))
            convs += 1
        elif kind is not None:
            units = layer.units  # type: ignore[union-attr]
            out.append(StateTensor(f"h{cells}", "h", units, i, kind))
            if kind == "lstm":
                out.append(StateTensor(f"c{cells}", "c", units, i, kind))
            cells += 1
    return out


def output_width(layers: tuple[Layer, ...], features: int) -> int:
    width = features
    for layer in layers:
        if isinstance(layer, Dense):
            width = int(layer.kernel.shape[1])
        elif isinstance(layer, Conv1D):
            width = int(layer.kernel.shape[2])
        elif isinstance(layer, (LSTMCell, GRUCell, SimpleRNNCell)):
            width = layer.units
    return width


@dataclass(frozen=True)
class ModelSpec:
    features: int
    norm_mean: np.ndarray | None  # [F], a leading Normalization (may run in the runtime)
    norm_std: np.ndarray | None  # [F], already max(sqrt(var), eps)
    layers: tuple[Layer, ...]
    source_sha256: str
    name: str
    sequence_output: bool = True  # False: many-to-one (the source returns the last step only)

    @property
    def states(self) -> list[StateTensor]:
        return layer_states(self.layers)

    @property
    def outputs(self) -> int:
        return output_width(self.layers, self.features)

    @property
    def final_activation(self) -> str:
        for layer in reversed(self.layers):
            if isinstance(layer, Activation):
                return layer.name
            if isinstance(layer, Dense):
                return layer.activation
            if isinstance(layer, (Affine, LayerNorm)):
                return "linear"
            if isinstance(layer, (LSTMCell, GRUCell, SimpleRNNCell, Conv1D)):
                return "linear" if isinstance(layer, Conv1D) else "state"
        return "linear"

    @property
    def cells(self) -> list[Layer]:
        return [la for la in self.layers if isinstance(la, (LSTMCell, GRUCell, SimpleRNNCell))]

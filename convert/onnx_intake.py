"""Read an ONNX model (as ``torch.onnx.export`` writes ``nn.LSTM`` / ``nn.GRU`` models) into a
``spec.ModelSpec``, and run the original graph in onnxruntime as the float reference.

Accepted: one input ``[batch, time, features]`` or ``[time, batch, features]`` (which one is
read from the first recurrent op), one chain of ONNX ``LSTM`` / ``GRU`` ops (forward, default
activations or others the step reproduces, both bias vectors, zero initial state; a state
given as inputs and returned as outputs is left out: the runtime keeps it) with the layout
ops exporters put between them (``Transpose``, ``Squeeze``, ``Unsqueeze``, ``Reshape``,
``Flatten``, ``Identity``, ``Dropout``; the batch and time axes may be flattened into one axis
of rows and split again in the same order), per-feature ``Sub`` / ``Add`` / ``Mul`` / ``Div``
by constants and ``Neg`` (a leading one becomes the runtime's input normalisation),
``LayerNormalization`` and an inference ``BatchNormalization`` over the features, and a
per-step head of ``MatMul`` / ``Gemm`` + ``Add`` and ``Relu``, ``Sigmoid``, ``Tanh``,
``Softmax`` or the activation ops with the parameters the step computes (``Elu``, ``Selu``,
``LeakyRelu`` of slope 0.2, ``HardSigmoid`` and ``HardSwish`` as PyTorch writes them, exact
``Gelu``, ``Softplus``, ``Softsign``, ``Clip`` to [0, 6]; SiLU written out as
``x * Sigmoid(x)``). Everything else is refused with one line naming the node and why.

Many-to-one models (the last step of the top layer, ``out[:, -1]`` or ``h_n[-1]``, then the
head) are read as the same step with ``sequence_output=False``: the step applies the head after
every sample, and its output after a sequence's last sample is the graph's output. The last
step is recognised from what the nodes select (a ``Gather`` / ``Slice`` keeping only the last
index of the time axis, or the ``Y_h`` output, through a ``Concat`` of the layers' ``Y_h`` and
its last entry); any other selection of steps or layers is refused naming the node.

Shapes are read from what the graph computes, not from what it declares (an exporter may write
the example's fixed time length into declared shapes): onnxruntime runs the graph on two probe
inputs of different batch and time lengths, and an axis is the batch or time axis when its
length follows the probe's. The tensors that do not depend on the input's values (weights,
initial states, reshape targets) are read from the same runs, so weights that an exporter
computes from initialisers (a gate reordering) are read as onnxruntime computes them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import shown

from .datasets import input_file
from .errors import ConvertError, UnsupportedModel
from .spec import (
    Activation,
    Affine,
    Dense,
    GRUCell,
    Layer,
    LayerNorm,
    LSTMCell,
    ModelSpec,
    layer_states,
)

# ONNX activation names the step reproduces exactly (the cell's own f, g, h activations).
CELL_ACTIVATIONS = {
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Relu": "relu",
    "Softsign": "softsign",
    "Softplus": "softplus",
}
HEAD_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softmax": "softmax"}
LAYOUT_OPS = ("Transpose", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity", "Dropout")
# read as a layout op where every axis they reduce has length 1 (out[:, -1:].mean(1))
REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd")
ELEMENTWISE = ("Sub", "Add", "Mul", "Div")
REASONS = {
    "ReduceMean": "a reduction over time needs the whole sequence",
    "ReduceMax": "a reduction over time needs the whole sequence",
    "GlobalAveragePool": "pooling over time needs the whole sequence",
    "InstanceNormalization": "it normalises each sequence by its mean and variance over time "
    "(nn.InstanceNorm1d), which needs the whole sequence; normalise with constants (the "
    "training data's mean and std: (x - mean) / std), which are read as the input normalisation",
    "GlobalMaxPool": "pooling over time needs the whole sequence",
    "Conv": "convolutions are not read from ONNX models (LSTM / GRU chains only)",
    "RNN": "the plain ONNX RNN op is not read (LSTM and GRU only)",
    "Concat": "joining tensors is not a per-step layer (only the layers' final states h_n, "
    "of which h_n[-1] is read)",
    "Attention": "attention looks at the whole sequence, not one causal step",
    "LogSoftmax": "LogSoftmax has no step equivalent here; export Softmax (or the logits)",
    "Loop": "control flow cannot be turned into a step",
    "Scan": "control flow cannot be turned into a step",
    "If": "control flow cannot be turned into a step (torch.onnx.export(..., dynamo=False) "
    "writes squeeze(dim) of an axis whose length it cannot tell as an If: select the last step "
    "with out[:, -1])",
}
PROBES = ((5, 7), (6, 9))  # (axis 0, axis 1) lengths of the two probe inputs
AGREEMENT_TOL = 1e-4  # float reference vs the spec read from it, relative to the output scale
AGREEMENT_SEQUENCES = 32  # calibration sequences the agreement check runs


def _dim(d: Any) -> int | str:
    return int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")


@dataclass
class _Graph:
    """The model with every tensor's probe values, and who consumes what."""

    model: Any
    input_name: str
    output_name: str
    consts: dict[str, np.ndarray]
    probes: list[dict[str, np.ndarray]]  # per probe: tensor name -> value
    consumers: dict[str, list[Any]] = field(default_factory=dict)


def _where(node: Any) -> str:
    return f"node {shown(node.name or node.output[0])} ({node.op_type})"


def load(path: str | Path) -> Any:
    """The ONNX model with its external data, or one clear line why not."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    p = input_file(path, missing="model file not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError and friends
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvertError(f"{p}: not an ONNX model: {why}") from exc
    if model.ir_version <= 0 or not model.graph.node:
        raise ConvertError(f"{p}: not an ONNX model (no graph in the file)")
    for t in model.graph.initializer:
        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            where = p.parent / info.get("location", "")
            if not info.get("location") or not where.is_file():
                raise ConvertError(
                    f"{p}: initializer {shown(t.name)} keeps its data in the external file "
                    f"{shown(info.get('location', ''))}, which is not beside the model"
                )
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:
        raise ConvertError(f"{p}: cannot read the model's external data: {exc}") from exc
    return model


def _strip_shapes(model: Any) -> Any:
    """A copy without declared intermediate and output shapes (they may be wrong: see the module
    docstring); onnxruntime then checks nothing against them."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    return m


def _free_axes(model: Any, input_name: str) -> Any:
    """A copy whose input ``input_name`` declares its first two axes (batch and time, in
    either order) of any length."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inp = next(i for i in m.graph.input if i.name == input_name)
    for k, d in enumerate(inp.type.tensor_type.shape.dim[:2]):
        d.Clear()
        d.dim_param = f"free_axis_{k}"
    return m


def session(model: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # fatal only: a node that fails is raised with its reason and said in one line; at the
    # error level onnxruntime also writes it to stderr itself, over several coloured lines
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        unknown = re.search(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op", first)
        if unknown:  # e.g. ConstantFill, which torch.onnx.export writes before opset 9
            domain, op = unknown.group(1), unknown.group(2)
            standard = domain in ("", "ai.onnx")
            want = ("", "ai.onnx") if standard else (domain,)
            opset = next((o.version for o in model.opset_import if o.domain in want), 0)
            raise ConvertError(
                f"onnxruntime cannot run the model: it has no {op} op in {domain or 'ai.onnx'} "
                f"opset {opset}"
                + ("; export with a current opset_version (17 or later)" if standard else "")
            ) from exc
        raise ConvertError(f"onnxruntime cannot run the model: {first}") from exc


def _probe(
    model: Any, input_name: str, features: int, one_feature: bool = False
) -> list[dict[str, np.ndarray]]:
    """Every tensor's value for two inputs of different batch and time lengths (``[a, b]``
    for an input of one feature without its axis)."""
    import onnx

    m = _strip_shapes(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    except Exception:
        types = {}
    for node in m.graph.node:  # onnxruntime's refusal would not say what to do about it
        elem = types.get(node.input[0]) if node.op_type in ("LSTM", "GRU", "RNN") else None
        if elem not in (None, onnx.TensorProto.FLOAT):
            raise UnsupportedModel(
                f"{_where(node)} computes in {onnx.helper.tensor_dtype_to_np_dtype(elem)}: the "
                "step model is float32 (export the model without .double() or .half() on its "
                "recurrent layers)"
            )
    have = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for name in node.output:
            if name and name not in have:
                elem = types.get(name) or onnx.TensorProto.FLOAT
                m.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
                have.add(name)
    sess = session(m)
    names = [o.name for o in sess.get_outputs()]
    out = []
    rng = np.random.default_rng(0)
    for a, b in PROBES:
        x = rng.normal(0, 1, (a, b, features)).astype(np.float32)
        if one_feature:
            x = x[..., 0]
        try:
            values = sess.run(names, {input_name: x})
        except Exception as exc:
            text = str(exc).strip()
            node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
            where = f"node {shown(node.group(2))} ({node.group(1)})" if node else "the graph"
            status = re.search(r"Status Message: (.+)", text)
            # without onnxruntime's source location and failed condition before the reason
            why = (
                re.sub(r"^/\S+:\d+ .* was false\. ", "", status.group(1).strip()) if status else ""
            )
            cell = re.search(
                r"initial_c must have shape \{1,(\d+),(\d+)\}\. Actual:\{1,\1,(\d+)\}", why
            )
            if cell:  # the state's batch is right, its units are not: nn.LSTM(proj_size=...)
                raise UnsupportedModel(
                    f"{where}: its initial cell state has {cell.group(3)} units but its "
                    f"hidden_size is {cell.group(2)}, as torch 2.13's default exporter writes an "
                    f"nn.LSTM with proj_size={cell.group(2)} (it drops the projection); "
                    "LSTM projections are not read (train it without proj_size)"
                ) from exc
            raise UnsupportedModel(
                f"onnxruntime cannot run the model on a [{a}, {b}, {features}] input: {where} "
                f"fails{f' ({why})' if why else ''}; if it fixes a batch or time length, export "
                "with dynamic batch and time axes: torch 2.13's default exporter fixes the time "
                "length of batch_first=False layers (export those with torch.onnx.export(..., "
                "dynamo=False)) and, given named Dims, of stacked layers and h_n (give those "
                "torch.export.Dim.AUTO axes)"
            ) from exc
        out.append({n: np.asarray(v) for n, v in zip(names, values)} | {input_name: x})
    return out


def _roles(g: _Graph, name: str) -> list[str]:
    """Per axis of tensor ``name``: 'a0' / 'a1' (follows the input's axis 0 / 1), 'a0a1' (their
    product: both flattened into one axis of rows, ``y.reshape(-1, units)``) or 'static'."""
    shapes = [p[name].shape for p in g.probes]
    if len({len(s) for s in shapes}) != 1:
        return ["?"]
    roles = []
    for k in range(len(shapes[0])):
        sizes = [s[k] for s in shapes]
        if all(n == PROBES[i][0] for i, n in enumerate(sizes)):
            roles.append("a0")
        elif all(n == PROBES[i][1] for i, n in enumerate(sizes)):
            roles.append("a1")
        elif all(n == PROBES[i][0] * PROBES[i][1] for i, n in enumerate(sizes)):
            roles.append("a0a1")
        elif len(set(sizes)) == 1:
            roles.append("static")
        else:
            roles.append("?")
    return roles


def _const(g: _Graph, name: str, node: Any, what: str) -> np.ndarray:
    """A tensor that does not depend on the input's values: an initialiser, or what
    onnxruntime computed for it (the same in both probes)."""
    if name in g.consts:
        return g.consts[name]
    values = [p.get(name) for p in g.probes]
    if values[0] is None or any(v is None or not np.array_equal(v, values[0]) for v in values):
        raise UnsupportedModel(f"{_where(node)}: its {what} is not a constant")
    return np.asarray(values[0])


class _Chain:
    """Walks the value path from the input to the output, collecting layers."""

    def __init__(self, g: _Graph) -> None:
        self.g = g
        self.layers: list[Layer] = []
        self.width = 0
        self.batch_axis = ""  # 'a0' or 'a1' once the first recurrent op tells
        self.cells = 0
        self.last = False  # the last step was selected: no time axis from here on
        self.final_states: list[str] = []  # Y_h of each cell whose final state the graph uses
        self.stack: tuple[int, list[str]] | None = None  # (axis, Y_h names) of a Concat h_n
        self.outer = ""  # 'a0' or 'a1': the outer of the two axes flattened into rows

    @property
    def time_axis(self) -> str:
        return "a1" if self.batch_axis == "a0" else "a0"

    def feature_axis(self, node: Any, name: str) -> int:
        """The one feature axis of a tensor on the chain (others: batch, time, or length 1;
        no time axis once the last step was selected)."""
        roles = _roles(self.g, name)
        shape = self.g.probes[0][name].shape
        if self.last:
            ok = roles.count(self.batch_axis) == 1 and self.time_axis not in roles
            what = "sequence"
        else:  # a batch and a time axis, or both flattened into one axis of rows
            ok = sorted(r for r in roles if r != "static") in (["a0", "a1"], ["a0a1"])
            what = "step"
        if "?" in roles or not ok:
            raise UnsupportedModel(
                f"{_where(node)}: its output {shown(name)} has shape {list(shape)} on a "
                f"[{PROBES[0][0]}, {PROBES[0][1]}, F] input, no longer one row of features per "
                f"{what} (it mixes time steps or batch rows together)"
            )
        wide = [k for k, r in enumerate(roles) if r == "static" and shape[k] != 1]
        if len(wide) > 1:
            raise UnsupportedModel(
                f"{_where(node)}: its output {shown(name)} has {len(wide)} feature axes; "
                "expected one"
            )
        if wide:
            return wide[0]
        # one feature: the last axis of length 1 ([batch, 1, time] too), else the last axis
        ones = [k for k, r in enumerate(roles) if r == "static"]
        return ones[-1] if ones else len(shape) - 1

    def step_axis(self, node: Any, name: str) -> int:
        """The feature axis of a tensor an op normalises or takes a softmax over; refused where
        a single feature was squeezed away and the last axis left is the batch or time axis."""
        k = self.feature_axis(node, name)
        role = _roles(self.g, name)[k]
        if role != "static":
            what = {self.batch_axis: "batch", self.time_axis: "time"}.get(role, "batch and time")
            raise UnsupportedModel(
                f"{_where(node)}: works over the {what} axis of its input (shape "
                f"{list(self.g.probes[0][name].shape)} on a [{PROBES[0][0]}, {PROBES[0][1]}, F] "
                "input, its one feature squeezed away), not over one step's features"
            )
        return k

    def rows(self, node: Any, x: str, y: str) -> None:
        """Follows a layout op that flattens the batch and time axes into one axis of rows
        (``y.reshape(-1, units)``), or splits them again: in the order they were flattened, or
        the rows would be handed to other batch rows and time steps."""
        before, after = _roles(self.g, x), _roles(self.g, y)
        split = [r for r in after if r in ("a0", "a1")]
        if "a0a1" in after and "a0a1" not in before:
            self.outer = next(r for r in before if r in ("a0", "a1"))
        elif "a0a1" in before and len(split) == 2 and split[0] != self.outer:
            raise UnsupportedModel(
                f"{_where(node)}: splits the rows of the batch and time axes (flattened with "
                f"{'batch' if self.outer == self.batch_axis else 'time'} outer) in the other "
                "order, which hands each step's row to another batch row and time step"
            )

    def add(self, layer: Layer) -> None:
        prev = self.layers[-1] if self.layers else None
        linear_dense = isinstance(prev, Dense) and prev.activation == "linear"
        if isinstance(layer, Affine) and isinstance(prev, Affine):
            scale, shift = prev.scale * layer.scale, prev.shift * layer.scale + layer.shift
            self.layers[-1] = Affine(scale, shift)
            return
        if isinstance(layer, Affine) and isinstance(prev, Dense) and linear_dense:
            kernel, bias = prev.kernel * layer.scale, prev.bias * layer.scale + layer.shift
            self.layers[-1] = Dense(kernel, bias)
            return
        if isinstance(layer, Activation) and isinstance(prev, Dense) and linear_dense:
            self.layers[-1] = Dense(prev.kernel, prev.bias, layer.name)
            return
        self.layers.append(layer)


def _vector(g: _Graph, node: Any, name: str, width: int, what: str) -> np.ndarray:
    """A constant that broadcasts along the feature axis only, as a [width] vector."""
    c = _const(g, name, node, what).astype(np.float64)
    if c.size == 1:
        return np.full(width, float(c.reshape(())), np.float64)
    if c.ndim >= 1 and c.shape[-1] == width and c.size == width:
        return c.reshape(width)
    raise UnsupportedModel(
        f"{_where(node)}: its {what} has shape {list(c.shape)}; only a per-feature constant "
        f"([{width}] or a scalar) can be applied per step"
    )


def _cell_activations(node: Any, attrs: dict[str, Any], count: int) -> list[str]:
    names = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    where = _where(node)
    if not names:
        return ["sigmoid", "tanh", "tanh"][:count]
    if len(names) != count:
        raise UnsupportedModel(f"{where}: {len(names)} activations; expected {count}")
    if attrs.get("activation_alpha") or attrs.get("activation_beta"):
        raise UnsupportedModel(
            f"{_where(node)}: activations with parameters (activation_alpha/beta) cannot be "
            "reproduced by the step"
        )
    out = []
    # onnxruntime reads the names in any case ('sigmoid', 'TANH'), as hand-edited graphs
    # write them: so does the step
    known = {k.lower(): v for k, v in CELL_ACTIVATIONS.items()}
    for n in names:
        if n.lower() not in known:
            raise UnsupportedModel(
                f"{_where(node)}: activation {shown(n)} cannot be reproduced by the step (one of "
                f"{', '.join(CELL_ACTIVATIONS)})"
            )
        out.append(known[n.lower()])
    return out


def _activation_op(g: _Graph, node: Any) -> str | None:
    """The spec activation an ONNX activation op with parameters computes, when it is one the
    step computes (else one line why not); None for an op that is not such an activation."""
    op, where, a = node.op_type, _where(node), _attrs(node)

    def near(value: float, want: float) -> bool:
        return abs(float(value) - want) <= 1e-6 * max(1.0, abs(want))

    if op in ("Softplus", "Softsign"):
        return op.lower()
    if op == "HardSwish":
        return "hard_silu"
    if op == "Elu":
        if not near(a.get("alpha", 1.0), 1.0):
            raise UnsupportedModel(f"{where}: alpha={a['alpha']:g}; only 1 (the step's 'elu')")
        return "elu"
    if op == "Selu":
        alpha, gamma = a.get("alpha", 1.6732632), a.get("gamma", 1.0507010)
        if not (near(alpha, 1.6732632) and near(gamma, 1.0507010)):
            raise UnsupportedModel(f"{where}: alpha / gamma differ from SELU's own; not read")
        return "selu"
    if op == "LeakyRelu":
        if not near(a.get("alpha", 0.01), 0.2):
            raise UnsupportedModel(
                f"{where}: negative slope {a.get('alpha', 0.01):g}; the step's 'leaky_relu' has "
                "0.2 (nn.LeakyReLU(0.2))"
            )
        return "leaky_relu"
    if op == "HardSigmoid":
        if not (near(a.get("alpha", 0.2), 1 / 6) and near(a.get("beta", 0.5), 0.5)):
            raise UnsupportedModel(
                f"{where}: alpha={a.get('alpha', 0.2):g}, beta={a.get('beta', 0.5):g}; the step's "
                "'hard_sigmoid' is relu6(x + 3) / 6 (alpha=1/6, beta=0.5: nn.Hardsigmoid)"
            )
        return "hard_sigmoid"
    if op == "Gelu":
        if a.get("approximate", "none") != "none":
            raise UnsupportedModel(
                f"{where}: approximate={shown(a['approximate'])}; only the exact GELU"
            )
        return "gelu"
    if op == "Clip":
        ins = [*node.input, "", ""]
        lo = _const(g, ins[1], node, "min") if ins[1] else a.get("min")
        hi = _const(g, ins[2], node, "max") if ins[2] else a.get("max")
        if lo is not None and near(lo, 0.0) and (hi is None or float(hi) == np.inf):
            return "relu"  # x.clamp(min=0)
        if lo is None or hi is None or not (near(lo, 0.0) and near(hi, 6.0)):
            raise UnsupportedModel(
                f"{where}: clips to [{'-inf' if lo is None else f'{float(lo):g}'}, "
                f"{'inf' if hi is None else f'{float(hi):g}'}]; only [0, 6] (ReLU6) and [0, "
                "inf] (ReLU) are read"
            )
        return "relu6"
    if op == "Max" and len(node.input) == 2:  # x.clamp(min=0) as the dynamo exporter writes it
        bounds = [_const(g, i, node, "bound") for i in node.input if i in g.consts]
        if len(bounds) != 1 or bounds[0].size != 1 or not near(bounds[0].reshape(()), 0.0):
            raise UnsupportedModel(
                f"{where}: only the maximum of the values and 0 (x.clamp(min=0), a ReLU) is "
                "read; not of two tensors or another bound"
            )
        return "relu"
    return None


def _silu(g: _Graph, x: str) -> tuple[Any, Any] | None:
    """(Sigmoid, Mul) when ``x``'s only consumers compute x * sigmoid(x), as exporters write
    SiLU; else None."""
    uses = g.consumers.get(x, [])
    sig = next((c for c in uses if c.op_type == "Sigmoid"), None)
    mul = next((c for c in uses if c.op_type == "Mul"), None)
    if len(uses) != 2 or sig is None or mul is None:
        return None
    if sorted(mul.input) != sorted([x, sig.output[0]]) or g.consumers.get(sig.output[0]) != [mul]:
        return None
    return sig, mul


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    out = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


def check_recurrent(node: Any) -> None:
    """What the step cannot do, from the op's attributes and inputs alone (before running it)."""
    attrs = _attrs(node)
    where = _where(node)
    ins = list(node.input) + [""] * (8 - len(node.input))
    direction = attrs.get("direction", "forward")
    if direction != "forward":
        raise UnsupportedModel(
            f"{where} cannot be streamed: direction={shown(direction)} reads the sequence "
            "backwards, "
            "so step t depends on later samples (bidirectional=False in PyTorch)"
        )
    if "clip" in attrs:
        raise UnsupportedModel(
            f"{where}: clip={attrs['clip']:g} clips the gate pre-activations; the step does not"
        )
    if node.op_type == "LSTM" and attrs.get("input_forget", 0):
        raise UnsupportedModel(f"{where}: input_forget=1 (coupled gates) is not supported")
    if ins[4]:
        raise UnsupportedModel(
            f"{where}: sequence_lens masks steps of shorter sequences, which a step model fed by "
            "the runtime cannot tell apart from real samples; export without packed sequences "
            "and drop padding before sending"
        )
    if node.op_type == "LSTM" and ins[7]:
        raise UnsupportedModel(f"{where}: peephole weights (input P) are not supported")
    acts = _cell_activations(node, attrs, 3 if node.op_type == "LSTM" else 2)
    if node.op_type == "LSTM" and acts[1] != acts[2]:
        raise UnsupportedModel(
            f"{where}: cell activation {shown(acts[1])} differs from the output activation "
            f"{shown(acts[2])}; the step uses one for both"
        )


def check_weights(node: Any, w: np.ndarray, r: np.ndarray) -> int:
    """The op's hidden size, from weights W and R that agree with each other and with its
    ``hidden_size``; else one line naming the node (onnxruntime would only fail to run it)."""
    where = _where(node)
    gates = 4 if node.op_type == "LSTM" else 3
    h = int(r.shape[-1]) if r.ndim else 0
    if w.ndim != 3 or w.shape[0] != 1 or w.shape[1] != gates * h or r.shape != (1, gates * h, h):
        raise UnsupportedModel(f"{where}: weights W {list(w.shape)} / R {list(r.shape)} unexpected")
    hidden = _attrs(node).get("hidden_size")
    if hidden is not None and int(hidden) != h:
        raise UnsupportedModel(
            f"{where}: hidden_size {hidden} but its weights R {list(r.shape)} are for {h} units"
        )
    return h


def _recurrent(chain: _Chain, node: Any, x_name: str) -> tuple[Layer, str]:
    """An ONNX LSTM / GRU op as a spec cell, and the name of the output the chain follows."""
    g = chain.g
    attrs = _attrs(node)
    where = _where(node)
    if chain.last:
        raise UnsupportedModel(
            f"{where}: runs over the selected last step (a one-step sequence), not over the "
            "stream; only per-step layers can follow out[:, -1] / h_n[-1]"
        )
    ins = list(node.input) + [""] * (8 - len(node.input))
    layout = int(attrs.get("layout", 0))
    roles = _roles(g, x_name)
    if len(roles) != 3 or roles[2] != "static":
        raise UnsupportedModel(f"{where}: input X is not [time, batch, features]")
    t_axis = 1 if layout else 0
    batch = roles[1 - t_axis]
    if chain.batch_axis and chain.batch_axis != batch:
        raise UnsupportedModel(f"{where}: swaps the batch and time axes of the layers before it")
    chain.batch_axis = batch
    w = _const(g, ins[1], node, "input weight W").astype(np.float32)
    r = _const(g, ins[2], node, "recurrent weight R").astype(np.float32)
    gates = 4 if node.op_type == "LSTM" else 3
    h = check_weights(node, w, r)
    d_in = int(w.shape[2])
    if d_in != chain.width:
        raise UnsupportedModel(f"{where}: expects {d_in} features, gets {chain.width}")
    b = (
        _const(g, ins[3], node, "bias B").astype(np.float32).reshape(-1)
        if ins[3]
        else np.zeros(2 * gates * h, np.float32)
    )
    if b.size != 2 * gates * h:
        raise UnsupportedModel(f"{where}: bias B has {b.size} values; expected {2 * gates * h}")
    for k, what in ((5, "initial_h"), (6, "initial_c")):
        if k == 6 and node.op_type != "LSTM":
            continue
        if ins[k]:
            v = [p.get(ins[k]) for p in g.probes]
            if ins[k] in g.consts:
                v = [g.consts[ins[k]]]
            if any(a is None or np.any(a != 0) for a in v):
                raise UnsupportedModel(
                    f"{where}: {what} is not zero; the runtime starts every stream from the "
                    "zero state"
                )
    kernel, recurrent = np.ascontiguousarray(w[0].T), np.ascontiguousarray(r[0].T)
    if node.op_type == "LSTM":
        f, g_act, _ = _cell_activations(node, attrs, 3)
        cell: Layer = LSTMCell(kernel, recurrent, b[: 4 * h] + b[4 * h :], "iofc", g_act, f)
    else:
        f, g_act = _cell_activations(node, attrs, 2)
        if int(attrs.get("linear_before_reset", 0)):
            cell = GRUCell(kernel, recurrent, b[: 3 * h], b[3 * h :], True, "zrh", g_act, f)
        else:
            folded, zeros = b[: 3 * h] + b[3 * h :], np.zeros(3 * h, np.float32)
            cell = GRUCell(kernel, recurrent, folded, zeros, False, "zrh", g_act, f)
    outs = [*node.output, "", "", ""]
    used = [k for k in range(3) if outs[k] and g.consumers.get(outs[k])]
    used += [k for k in range(3) if outs[k] == g.output_name and k not in used]
    if 2 in used:
        raise UnsupportedModel(
            f"{where}: the model uses the final cell state Y_c (c_n) of the recurrent op; the "
            "step streams the hidden state: use h_n[-1] or out[:, -1] (or every step of out)"
        )
    if not used:
        raise UnsupportedModel(f"{where}: the model uses no output of the recurrent op")
    chain.width = h
    chain.cells += 1
    if 1 in used:  # h_n: its own last step (read here), or a layer's entry of a Concat h_n
        chain.final_states.append(outs[1])
    if used == [1]:  # many-to-one: the final hidden state is the output Y at the last step
        chain.last = True
        return cell, outs[1]
    return cell, outs[0]


def _matmul(chain: _Chain, node: Any, name: str, w: np.ndarray) -> None:
    if w.ndim != 2 or w.shape[0] != chain.width:
        raise UnsupportedModel(
            f"{_where(node)}: weight of shape {list(w.shape)} for {chain.width} features"
        )
    chain.add(Dense(w.astype(np.float32), np.zeros(w.shape[1], np.float32)))
    chain.width = int(w.shape[1])


def _values(g: _Graph, node: Any, name: str, what: str) -> list[np.ndarray]:
    """Per probe, a tensor that does not depend on the input's values (it may depend on its
    shape: an index computed from the time length)."""
    if name in g.consts:
        return [np.asarray(g.consts[name])] * len(g.probes)
    values = [p.get(name) for p in g.probes]
    if any(v is None for v in values):
        raise UnsupportedModel(f"{_where(node)}: cannot read its {what}")
    return [np.asarray(v) for v in values]


def _kept(
    node: Any, data_shape: tuple[int, ...], ins: list[np.ndarray | None]
) -> dict[int, list[int]]:
    """The indices a Gather / Slice keeps along each axis it cuts (for one probe; ``ins``: its
    inputs after the data, None where an optional one is not given)."""
    rank = len(data_shape)
    ins = ins + [None] * (4 - len(ins))
    if node.op_type == "Gather":
        axis = int(_attrs(node).get("axis", 0)) % rank
        n = data_shape[axis]
        assert ins[0] is not None
        return {axis: [int(i) + n if i < 0 else int(i) for i in ins[0].reshape(-1).tolist()]}
    assert ins[0] is not None and ins[1] is not None
    starts, ends = ins[0].reshape(-1).tolist(), ins[1].reshape(-1).tolist()
    axes = ins[2].reshape(-1).tolist() if ins[2] is not None else list(range(len(starts)))
    steps = ins[3].reshape(-1).tolist() if ins[3] is not None else [1] * len(starts)
    out = {}
    for start, end, a, step in zip(starts, ends, axes, steps):
        a, n = int(a) % rank, data_shape[int(a) % rank]
        kept = list(range(n))[slice(int(start), int(end), int(step))]
        if kept != list(range(n)):
            out[a] = kept
    return out


def _picked(g: _Graph, node: Any, data: str) -> tuple[int, list[list[int]]] | None:
    """The one axis a Gather / Slice cuts and, per probe, the indices it keeps there (None: a
    Slice that keeps everything)."""
    where = _where(node)
    if node.input[0] != data:
        raise UnsupportedModel(f"{where}: uses the model's values as indices")
    given: list[list[np.ndarray] | None]
    if node.op_type == "Slice" and len(node.input) < 3:  # Slice-1 (opset < 10): attributes
        a = _attrs(node)
        if "starts" not in a or "ends" not in a:
            raise UnsupportedModel(f"{where}: a Slice without starts / ends is not read")
        given = [
            [np.asarray(a[k], np.int64)] * len(g.probes) if k in a else None
            for k in ("starts", "ends", "axes")
        ]
    else:
        given = [_values(g, node, i, "indices") if i else None for i in node.input[1:]]
    cuts = [
        _kept(node, p[data].shape, [v[k] if v is not None else None for v in given])
        for k, p in enumerate(g.probes)
    ]
    axes = {a for c in cuts for a in c}
    if not axes:
        return None
    if len(axes) > 1:
        raise UnsupportedModel(f"{where}: selects along {len(axes)} axes at once; not read")
    (axis,) = axes
    return axis, [c.get(axis, list(range(p[data].shape[axis]))) for c, p in zip(cuts, g.probes)]


def _indices(kept: list[int], length: int, what: str) -> str:
    if len(kept) == 1:
        return f"{what} {kept[0]} of {length}"
    if not kept:
        return f"no {what} of {length}"
    return f"{len(kept)} {what}s ({kept[0]}..{kept[-1]}) of {length}"


def _reduce_axes(g: _Graph, node: Any, data: str) -> list[int]:
    """The axes of ``data`` a Reduce* op reduces (none: ``noop_with_empty_axes``)."""
    attrs = _attrs(node)
    if len(node.input) > 1 and node.input[1]:  # opset 18 (ReduceSum: 13): axes as an input
        axes = [int(a) for a in _const(g, node.input[1], node, "axes").reshape(-1)]
    else:
        axes = [int(a) for a in attrs.get("axes", [])]
    rank = len(g.probes[0][data].shape)
    if not axes and not attrs.get("noop_with_empty_axes", 0):
        axes = list(range(rank))  # no axes: all of them
    return sorted({a % rank for a in axes})


def _reduces_nothing(g: _Graph, node: Any, data: str) -> bool:
    """Whether a Reduce* op reduces only axes of length 1 on every probe (a mean or sum over
    the one step ``out[:, -1:]`` selected): then it is the identity, a squeeze at most."""
    axes = _reduce_axes(g, node, data)
    return all(p[data].shape[a] == 1 for p in g.probes for a in axes)


def _reduce_features(chain: _Chain, node: Any, data: str) -> None:
    """A Reduce* op after the recurrent layers: a mean or sum over each step's features (its
    feature axis only, ``y.mean(-1)``) is a Dense to one output; over time or batch rows, or
    another reduction, it is refused naming what it reduces."""
    g, where, op = chain.g, _where(node), node.op_type
    roles, shape = _roles(g, data), list(g.probes[0][data].shape)
    axes = [a for a in _reduce_axes(g, node, data) if shape[a] != 1]
    if any(roles[a] == chain.time_axis for a in axes) or any(roles[a] == "a0a1" for a in axes):
        raise UnsupportedModel(
            f"{where} cannot be streamed: a reduction over time needs the whole sequence"
        )
    if any(roles[a] != "static" for a in axes):
        raise UnsupportedModel(
            f"{where} cannot be streamed: it reduces over the batch rows "
            "(each sequence streams on its own)"
        )
    if axes != [chain.feature_axis(node, data)]:
        raise UnsupportedModel(f"{where}: reduces axes {axes} of {shape}, not one step's features")
    if op not in ("ReduceMean", "ReduceSum"):
        raise UnsupportedModel(
            f"{where}: a {op} over each step's features is not read (a mean or a sum is)"
        )
    w = chain.width
    kernel = np.full((w, 1), 1.0 / w if op == "ReduceMean" else 1.0, np.float32)
    chain.add(Dense(kernel, np.zeros(1, np.float32)))
    chain.width = 1


def _written_out_mean(chain: _Chain, node: Any, data: str) -> UnsupportedModel:
    """Why ``x - x.mean(axis, keepdim=True)`` (a ReduceMean beside a Sub of ``data``) is not
    read: over time or the batch it needs the whole sequence (a per-sequence normalisation);
    over each step's features it is a LayerNorm written out, as exporters write nn.LayerNorm
    before opset 17."""
    g, where = chain.g, _where(node)
    roles, shape = _roles(g, data), list(g.probes[0][data].shape)
    axes = [a for a in _reduce_axes(g, node, data) if shape[a] != 1]
    if any(roles[a] != "static" for a in axes):
        return UnsupportedModel(
            f"{where} cannot be streamed: its mean over axis {', '.join(map(str, axes))} of "
            f"{shape} (on a [{PROBES[0][0]}, {PROBES[0][1]}, F] input) mixes time steps or batch "
            "rows (a normalisation per sequence, x - x.mean(1)), which needs the whole "
            "sequence; normalise with constants (the training data's mean and std: (x - mean) "
            "/ std), which are read as the input normalisation"
        )
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset < 17:
        return UnsupportedModel(
            f"{where}: a LayerNorm written out in elementwise ops (ReduceMean, Sub, Pow, Sqrt, "
            "Div), as exporters write it before opset 17, is not read; export with "
            "opset_version=17 or later (one LayerNormalization node)"
        )
    return UnsupportedModel(
        f"{where}: a mean over each step's features written out in elementwise ops (x - "
        "x.mean(-1, keepdim=True)) is not read; a LayerNorm is read as one "
        "LayerNormalization node (nn.LayerNorm, opset 17 or later)"
    )


def _select(chain: _Chain, node: Any, data: str) -> None:
    """A Gather / Slice on the chain: the last time step (many-to-one), the top layer's entry
    of a Concat h_n, or dropping a length-1 axis; every other selection is refused."""
    g, where = chain.g, _where(node)
    picked = _picked(g, node, data)
    if picked is None:
        return
    axis, kept = picked
    lengths = [p[data].shape[axis] for p in g.probes]
    last = all(k == [n - 1] for k, n in zip(kept, lengths))
    probe = f"(on a probe input of {PROBES[0][1 if chain.batch_axis == 'a0' else 0]} steps)"
    if chain.stack is not None:
        if axis != chain.stack[0] or not last:
            which = _indices(kept[0], lengths[0], "layer") if axis == chain.stack[0] else "parts"
            raise UnsupportedModel(
                f"{where} cannot be streamed: it selects {which} of the layers' final states "
                "h_n; only the top layer's (h_n[-1]) is the output of the last step"
            )
        chain.stack = None
        return
    role = _roles(g, data)[axis]
    if role == chain.time_axis and chain.cells and not chain.last:
        if not last:
            raise UnsupportedModel(
                f"{where} cannot be streamed: it selects {_indices(kept[0], lengths[0], 'step')} "
                f"along the time axis {probe}; a step model's output after a sequence's last "
                "sample is the last step's (out[:, -1]), other steps need the whole sequence"
            )
        chain.last = True
        return
    if role == "static" and all(n == 1 for n in lengths) and all(k == [0] for k in kept):
        return  # drops a length-1 axis (h_n[-1] of one layer: its direction axis)
    what = {
        chain.batch_axis: "batch rows (each sequence streams on its own)",
        "a0a1": "rows of the batch and time axes flattened together",
        "static": "features of a step (only whole feature vectors are read)",
    }.get(role, "time steps before the recurrent layers")
    raise UnsupportedModel(f"{where} cannot be streamed: it selects {what}")


def _stack(chain: _Chain, node: Any, on_chain: list[str], current: str) -> None:
    """A Concat of the layers' final states Y_h (PyTorch's h_n of a stacked nn.LSTM / nn.GRU):
    read only when the next node picks the top layer's entry."""
    g, where = chain.g, _where(node)
    if (
        not chain.last
        or on_chain != list(node.input)
        or on_chain != chain.final_states
        or on_chain[-1] != current
        or any(len(g.consumers.get(i, [])) != 1 for i in on_chain)
    ):
        raise UnsupportedModel(
            f"{where}: the model branches or joins here (e.g. a residual connection); only "
            "one chain of per-step layers (or the layers' final states h_n) can be streamed"
        )
    rank = len(g.probes[0][current].shape)
    axis = int(_attrs(node).get("axis", 0)) % rank
    if _roles(g, current)[axis] != "static" or any(
        g.probes[0][i].shape[axis] != 1 for i in on_chain
    ):
        raise UnsupportedModel(f"{where}: joins the layers' final states along another axis")
    chain.stack = (axis, on_chain)


# ops a model's state input passes through to reach a recurrent op's initial state (a layer's
# part of a stacked h0), and its final states through to a state output (h_n of a stack)
STATE_PATH_OPS = ("Slice", "Gather", "Split", "Squeeze", "Unsqueeze", "Identity", "Reshape")


def _without_state(model: Any, consts: dict[str, np.ndarray]) -> tuple[Any, list[str]]:
    """A copy of ``model`` without the recurrent state as inputs and outputs (PyTorch's
    ``forward(x, h0, c0)`` returning ``y, h_n, c_n``, to carry the state between calls), and
    the names dropped. A state input feeds only recurrent ops' initial states (through
    ``STATE_PATH_OPS``); they start at zero, as the runtime starts every stream, which keeps
    each stream's state itself (a state input no node reads goes with them). A state output is
    made only of recurrent ops' final states.
    The model is returned as it is when that would not leave one input and one output."""
    import onnx

    graph = model.graph
    nodes = list(graph.node)
    uses: dict[str, list[tuple[int, int]]] = {}  # tensor -> (node index, input slot)
    made: dict[str, tuple[int, int]] = {}  # tensor -> (node index, output slot)
    for j, n in enumerate(nodes):
        for k, i in enumerate(n.input):
            uses.setdefault(i, []).append((j, k))
        for k, o in enumerate(n.output):
            made[o] = (j, k)
    outputs = {o.name for o in graph.output}

    def state_in(name: str, path: list[int]) -> bool:
        if name in outputs or not uses.get(name):
            return False
        for j, k in uses[name]:
            n = nodes[j]
            slots = (5, 6) if n.op_type == "LSTM" else (5,) if n.op_type == "GRU" else ()
            if k in slots:
                continue
            if n.op_type not in STATE_PATH_OPS or k != 0:
                return False
            path.append(j)
            if not all(state_in(o, path) for o in n.output if o):
                return False
        return True

    def state_out(name: str) -> bool:
        if name not in made:
            return False
        j, k = made[name]
        n = nodes[j]
        if n.op_type in ("LSTM", "GRU"):
            return k in (1, 2)
        if n.op_type not in (*STATE_PATH_OPS, "Concat", "Transpose"):
            return False
        ins = [i for i in n.input if i]
        data = ins if n.op_type == "Concat" else ins[:1]
        return all(state_out(i) for i in data)

    inputs = [i.name for i in graph.input if i.name not in consts]
    paths: dict[str, list[int]] = {}
    for name in inputs:
        path: list[int] = []
        if state_in(name, path):
            paths[name] = path
    if paths:  # a state input no node reads: torch.onnx.export(net, (x, (h0, h0))) of an
        # nn.LSTM, one tensor given as h0 and c0, feeds both initial states from c0 (dynamo)
        unread = {n for n in inputs if not uses.get(n) and n not in outputs}
        paths = {n: paths.get(n, []) for n in inputs if n in paths or n in unread}
    state_outputs = [o.name for o in graph.output if state_out(o.name)]
    if len(graph.output) - len(state_outputs) != 1:
        state_outputs = []
    if len(inputs) - len(paths) != 1 or not (paths or state_outputs):
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    gone = {j for path in paths.values() for j in path}
    dropped = set(paths)
    dropped.update(o for j in gone for o in nodes[j].output)
    del g.node[:]  # extended with copies of the original's nodes, inputs and outputs
    g.node.extend(n for j, n in enumerate(nodes) if j not in gone)
    for n in g.node:
        if n.op_type in ("LSTM", "GRU"):
            for k in range(5, len(n.input)):
                if n.input[k] in dropped:
                    n.input[k] = ""  # no initial state: zero
    del g.input[:]
    g.input.extend(i for i in graph.input if i.name not in paths)
    del g.output[:]
    g.output.extend(o for o in graph.output if o.name not in state_outputs)
    return m, [*paths, *state_outputs]


def read(path: str | Path) -> OnnxSource:
    """Read ``path`` into a spec, checking every node on the way (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    p = Path(path)
    model = load(p)
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    model, state = _without_state(model, consts)
    graph = model.graph
    recurrent = [n for n in graph.node if n.op_type in ("LSTM", "GRU")]
    if not recurrent:
        for n in graph.node:  # a recurrent op that is not read: named, not "nothing to stream"
            if n.op_type == "RNN":
                raise UnsupportedModel(f"{_where(n)} cannot be streamed: {REASONS['RNN']}")
        raise ConvertError(f"{p}: no LSTM or GRU op in the model: nothing to stream")
    for n in recurrent:
        check_recurrent(n)
        w, r = [*n.input, "", ""][1:3]
        if w in consts and r in consts:  # else read from what onnxruntime computes, later
            check_weights(n, consts[w], consts[r])
    inputs = [i for i in graph.input if i.name not in consts]
    weights = [n.input[k] for n in recurrent for k in (1, 2, 3) if k < len(n.input) and n.input[k]]
    given = [i.name for i in inputs if i.name in weights]
    if given:  # torch.onnx.export(..., export_params=False): no weights in the file
        owner = next(n for n in recurrent if given[0] in n.input)
        raise UnsupportedModel(
            f"the model has {len(inputs)} inputs: its weights are not stored in the file but "
            f"inputs (input {shown(given[0])} is a weight of {_where(owner)}); export with the "
            "parameters (torch.onnx.export(..., export_params=True), its default)"
        )
    if len(inputs) != 1:
        raise UnsupportedModel(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); expected "
            "one [batch, time, features] input (the runtime keeps the state itself)"
        )
    if len(graph.output) != 1:
        raise UnsupportedModel(
            f"the model has {len(graph.output)} outputs ({', '.join(o.name for o in graph.output)})"
            "; expected one (return only the per-step prediction, not the states)"
        )
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem and elem != onnx.TensorProto.FLOAT:
        try:
            kind = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name
        except (KeyError, TypeError):  # a type NumPy has no name for (bfloat16, ...)
            kind = onnx.TensorProto.DataType.Name(elem).lower()
        raise UnsupportedModel(
            f"model input {shown(inp.name)} is {kind}; the step model reads float32 samples: "
            "export "
            "the model in float32 (in PyTorch, model.float() and a float32 example input)"
        )
    dims = [_dim(d) for d in inp.type.tensor_type.shape.dim]
    w_first = consts.get(recurrent[0].input[1])
    # [batch, time] samples of one feature, x.unsqueeze(-1) inside the model
    one_feature = len(dims) == 2 and w_first is not None and w_first.shape[-1] == 1
    if inp.type.tensor_type.HasField("shape") and len(dims) != 3 and not one_feature:
        raise UnsupportedModel(
            f"model input {shown(inp.name)} has shape {dims}; expected [batch, time, features] "
            "(or [batch, time] for a model of one feature)"
        )
    fixed = [isinstance(d, int) and d > 0 for d in dims]
    if len(dims) == 3 and not fixed[2] and any(fixed[:2]):
        raise UnsupportedModel(
            f"model input {shown(inp.name)} has shape {dims}: its features are not on the last "
            "axis; "
            "the step reads [batch, time, features] (or [time, batch, features]) samples: "
            "move the features last before exporting"
        )
    declared = dims if len(dims) in (2, 3) and any(fixed[:2]) else None
    if declared is not None:
        # torch.onnx.export's default without dynamic axes: the example's batch and time
        # lengths are declared, and onnxruntime runs the graph on no others. The graph may
        # well compute for any (the step does not depend on them): the probes tell, on a copy
        # whose input declares the two axes free.
        model = _free_axes(model, inp.name)
        graph = model.graph
        inp = next(i for i in graph.input if i.name == inp.name)
    features = int(dims[2]) if len(dims) == 3 and isinstance(dims[2], int) and dims[2] > 0 else 0
    if not features:
        first = recurrent[0]
        w = consts.get(first.input[1])
        if w is None:
            raise UnsupportedModel(f"{_where(first)}: cannot tell the number of input features")
        features = int(w.shape[-1])
    g = _Graph(model, inp.name, graph.output[0].name, consts, [])
    # Which nodes' values reach the output (in topological order, as ONNX keeps nodes). The
    # rest feed only Shape / Size, e.g. a tensor kept for the batch size of the next module's
    # zero initial state when an exporter fused away the transposes between two modules.
    live = {graph.output[0].name}
    for n in reversed(graph.node):
        if n.op_type not in ("Shape", "Size") and any(o in live for o in n.output if o):
            live.update(_node_inputs(n))
    # Which tensors depend on the input's values (Shape and Size read only its shape).
    value = {inp.name}
    for n in graph.node:
        if n.op_type in ("Shape", "Size") or not any(o in live for o in n.output if o):
            continue
        if any(i in value for i in _node_inputs(n)):
            value.update(o for o in n.output if o)
            for i in _node_inputs(n):
                if i in value:
                    g.consumers.setdefault(i, []).append(n)
    try:
        g.probes = _probe(model, inp.name, features, one_feature)
    except UnsupportedModel as exc:
        if declared is None:
            raise
        why = re.search(r": (node .*? fails(?: \([^)]*\))?);", str(exc))
        raise UnsupportedModel(
            f"model input {shown(inp.name)} has the fixed shape {declared} and the graph computes "
            "for no other batch size or sequence length"
            + (
                f" ({why.group(1)} on a [{PROBES[0][0]}, {PROBES[0][1]}, {features}] input)"
                if why
                else ""
            )
            + "; export with dynamic batch and time axes (torch.onnx.export(..., "
            f"dynamic_axes={{{shown(inp.name)}: {{0: 'batch', 1: 'time'}}}}, dynamo=False), or "
            "dynamic_shapes with torch.export.Dim.AUTO axes)"
        ) from exc
    chain = _Chain(g)
    chain.width = features
    current = inp.name
    time_first: bool | None = None
    for n in graph.node:
        if not any(i in value for i in _node_inputs(n)) or n.op_type in ("Shape", "Size"):
            continue
        if not any(o in live for o in n.output if o):
            continue  # its values go nowhere
        where = _where(n)
        on_chain = [i for i in _node_inputs(n) if i in value]
        if (silu := _silu(g, current)) is not None and any(n is s for s in silu):
            if n is silu[1]:  # x * sigmoid(x): PyTorch's SiLU, written out
                chain.add(Activation("silu"))
                chain.feature_axis(n, n.output[0])
                current = n.output[0]
            continue
        if n.op_type == "Concat" and len(on_chain) > 1:
            _stack(chain, n, on_chain, current)
            current = n.output[0]
            continue
        if chain.stack is not None and n.op_type not in ("Gather", "Slice"):
            raise UnsupportedModel(
                f"{where} cannot be streamed: it uses every layer's final state h_n; only the "
                "top layer's (h_n[-1]) is the output of the last step"
            )
        if on_chain != [current] or len(g.consumers.get(current, [])) != 1:
            uses = g.consumers.get(current, [])
            if {"ReduceMean", "Sub"} <= {c.op_type for c in uses}:
                mean = next(c for c in uses if c.op_type == "ReduceMean")
                raise _written_out_mean(chain, mean, current)
            raise UnsupportedModel(
                f"{where}: the model branches or joins here (e.g. a residual connection); only "
                "one chain of per-step layers can be streamed"
            )
        op = n.op_type
        nxt = n.output[0]
        reduces_nothing = op in REDUCE_OPS and _reduces_nothing(g, n, current)
        if op in REDUCE_OPS and not reduces_nothing and chain.cells:
            # over each step's features: a mean or a sum is a Dense to one output
            _reduce_features(chain, n, current)
            chain.feature_axis(n, nxt)
            current = nxt
            continue
        if op in REASONS and not reduces_nothing:
            raise UnsupportedModel(f"{where} cannot be streamed: {REASONS[op]}")
        if op in ("LSTM", "GRU"):
            if time_first is None:
                roles = _roles(g, n.input[0])
                layout = next((a.i for a in n.attribute if a.name == "layout"), 0)
                t_role = roles[1 if layout else 0] if len(roles) == 3 else "?"
                time_first = t_role == "a0"
            cell, nxt = _recurrent(chain, n, current)
            chain.add(cell)
        elif op in ("Gather", "Slice"):
            _select(chain, n, current)
            if chain.stack is None:
                chain.feature_axis(n, nxt)
        elif op in LAYOUT_OPS or (op == "Cast" and _cast_to_float(n)) or reduces_nothing:
            chain.feature_axis(n, nxt)
            chain.rows(n, current, nxt)
        elif op in ("MatMul", "Gemm"):
            axis = chain.feature_axis(n, current)
            if axis != len(g.probes[0][current].shape) - 1 or n.input[0] != current:
                raise UnsupportedModel(f"{where}: multiplies along an axis other than features")
            w = _const(g, n.input[1], n, "weight")
            bias = None
            if op == "Gemm":
                attrs = {a.name: a for a in n.attribute}
                if attrs.get("transA") and attrs["transA"].i:
                    raise UnsupportedModel(f"{where}: transA=1 is not a per-step Dense")
                if attrs.get("transB") and attrs["transB"].i:
                    w = w.T
                alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
                beta = attrs["beta"].f if "beta" in attrs else 1.0
                w = w * alpha
                if len(n.input) > 2 and n.input[2]:
                    bias = _vector(g, n, n.input[2], int(w.shape[-1]), "bias") * beta
            _matmul(chain, n, nxt, w)
            if bias is not None:
                chain.add(Affine(np.ones_like(bias, np.float32), bias.astype(np.float32)))
            chain.feature_axis(n, nxt)
        elif op == "Neg":
            chain.add(Affine(-np.ones(chain.width, np.float32), np.zeros(chain.width, np.float32)))
            chain.feature_axis(n, nxt)
        elif op in ELEMENTWISE:
            if n.input[0] != current and op == "Div":
                raise UnsupportedModel(f"{where}: the constant comes first ({op} of a constant)")
            other = n.input[1] if n.input[0] == current else n.input[0]
            v = _vector(g, n, other, chain.width, "constant")
            if op == "Sub" and n.input[0] != current:  # c - x
                chain.add(Affine(-np.ones(chain.width, np.float32), v.astype(np.float32)))
            elif op == "Sub":
                chain.add(Affine(np.ones(chain.width, np.float32), (-v).astype(np.float32)))
            elif op == "Add":
                chain.add(Affine(np.ones(chain.width, np.float32), v.astype(np.float32)))
            elif op == "Mul":
                chain.add(Affine(v.astype(np.float32), np.zeros(chain.width, np.float32)))
            else:
                if np.any(v == 0):
                    raise UnsupportedModel(f"{where}: divides by zero")
                chain.add(Affine((1.0 / v).astype(np.float32), np.zeros(chain.width, np.float32)))
            chain.feature_axis(n, nxt)
        elif op in HEAD_ACTIVATIONS:
            if op == "Softmax":
                _softmax_axis(chain, n, current)
            chain.add(Activation(HEAD_ACTIVATIONS[op]))
            chain.feature_axis(n, nxt)
        elif (act := _activation_op(g, n)) is not None:
            chain.add(Activation(act))
            chain.feature_axis(n, nxt)
        elif op == "BatchNormalization":
            chain.add(_batch_norm(chain, n, current))
            chain.feature_axis(n, nxt)
        elif op == "LayerNormalization":
            attrs = {a.name: a for a in n.attribute}
            rank = len(g.probes[0][current].shape)
            axis = (attrs["axis"].i if "axis" in attrs else -1) % rank
            if axis != rank - 1 or chain.step_axis(n, current) != rank - 1:
                raise UnsupportedModel(f"{where}: normalises over more than one step's features")
            gamma = _vector(g, n, n.input[1], chain.width, "scale")
            beta = (
                _vector(g, n, n.input[2], chain.width, "bias")
                if len(n.input) > 2 and n.input[2]
                else np.zeros(chain.width)
            )
            eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
            chain.add(LayerNorm(gamma.astype(np.float32), beta.astype(np.float32), float(eps)))
            chain.feature_axis(n, nxt)
        else:
            raise UnsupportedModel(
                f"{where} is not supported in a streaming step model (LSTM / GRU, layout ops, "
                "per-feature Sub/Add/Mul/Div, Neg, LayerNormalization, BatchNormalization, "
                "MatMul/Gemm + Add, Relu, Sigmoid, Tanh, Softmax and the activations of the "
                "README's list)"
            )
        current = nxt
    if current != g.output_name:
        raise UnsupportedModel(
            f"the chain from the input ends at {shown(current)}, not at the output"
        )
    if chain.stack is not None:
        raise UnsupportedModel(
            "the model outputs every layer's final state h_n; only the top layer's (h_n[-1]) is "
            "the output of the last step"
        )
    out_roles = _roles(g, current)
    if "a0a1" in out_roles:
        raise UnsupportedModel(
            f"the output {shown(current)} has the batch and time axes flattened together (shape "
            f"{list(g.probes[0][current].shape)} on a [{PROBES[0][0]}, {PROBES[0][1]}, F] "
            "input); reshape it back to the input's batch and time axes in the model"
        )
    chain.feature_axis(graph.node[-1], current)
    layers = tuple(chain.layers)
    mean = std = None
    if layers and isinstance(layers[0], Affine) and np.all(layers[0].scale > 0):
        std = (1.0 / layers[0].scale.astype(np.float64)).astype(np.float32)
        mean = (-layers[0].shift.astype(np.float64) * std).astype(np.float32)
        layers = layers[1:]
    if not layer_states(layers):
        raise ConvertError(f"{p}: no LSTM or GRU op on the path from input to output")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    spec = ModelSpec(features, mean, std, layers, digest, p.stem, not chain.last)
    assert time_first is not None
    return OnnxSource(
        spec,
        model,
        inp.name,
        g.output_name,
        time_first,
        out_roles,
        chain.batch_axis,
        state,
        one_feature,
    )


def _batch_norm(chain: _Chain, node: Any, x: str) -> Affine:
    """An inference BatchNormalization (PyTorch's BatchNorm1d in eval mode) over the features
    (its axis 1: [batch, features] or [batch, features, time]) as x * scale + shift."""
    g, where = chain.g, _where(node)
    a = _attrs(node)
    if a.get("training_mode", 0) or any(node.output[1:]):  # the statistics' outputs: training
        raise UnsupportedModel(
            f"{where}: batch statistics (training mode) need the whole batch; export the "
            "model in eval mode (model.eval())"
        )
    if chain.step_axis(node, x) != 1:
        raise UnsupportedModel(
            f"{where}: normalises axis 1 of {list(g.probes[0][x].shape)} (on a "
            f"[{PROBES[0][0]}, {PROBES[0][1]}, F] input), not the features of a step"
        )
    w = chain.width
    gamma, beta, mean, var = (
        _vector(g, node, node.input[k], w, what)
        for k, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance"))
    )
    scale = gamma / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    return Affine(scale.astype(np.float32), (beta - mean * scale).astype(np.float32))


def _softmax_axis(chain: _Chain, node: Any, x: str) -> None:
    """Refuses a Softmax that is not over one step's features. Before opset 13 a Softmax
    computes over its input's axes from ``axis`` (default 1) on, flattened together."""
    g, where = chain.g, _where(node)
    shapes = [p[x].shape for p in g.probes]
    rank, feature = len(shapes[0]), chain.step_axis(node, x)
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    given = next((a.i for a in node.attribute if a.name == "axis"), None)
    axis = (given if given is not None else (-1 if opset >= 13 else 1)) % rank
    over = [k for k in range(axis, rank) if k == feature or any(s[k] != 1 for s in shapes)]
    if opset >= 13 or len(over) == 1:
        if (axis if opset >= 13 else over[0]) != feature:
            raise UnsupportedModel(f"{where}: softmax over an axis other than features")
        return
    raise UnsupportedModel(
        f"{where}: a Softmax of opset {opset} (before 13) computes over the axes from "
        f"axis={axis} on, flattened together ({list(shapes[0])} on a [{PROBES[0][0]}, "
        f"{PROBES[0][1]}, F] input), not over one step's features; write its axis as the "
        "last one (or export with opset_version=13 or later)"
    )


def _node_inputs(node: Any) -> list[str]:
    """A node's inputs, and the outer tensors its subgraphs (the branches of an ``If``, the
    body of a ``Loop`` / ``Scan``) read without naming them as inputs."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for sub in [a.g] if a.HasField("g") else list(a.graphs):
            made = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for m in sub.node:
                made.update(m.output)
            used = [o.name for o in sub.output]
            for m in sub.node:
                used += _node_inputs(m)
            names += [u for u in used if u not in made and u not in names]
    return names


def _cast_to_float(node: Any) -> bool:
    import onnx

    to = next((a.i for a in node.attribute if a.name == "to"), 0)
    return bool(to == onnx.TensorProto.FLOAT)


@dataclass
class OnnxSource:
    """The spec read from an ONNX model, and the model itself as the float reference."""

    spec: ModelSpec
    model: Any
    input_name: str
    output_name: str
    time_first: bool
    output_roles: list[str]
    batch_role: str
    state: list[str] = field(default_factory=list)  # the state inputs and outputs dropped
    one_feature: bool = False  # the input is [batch, time]: one feature, without its axis
    _session: Any = None

    @property
    def layout(self) -> str:
        if self.one_feature:
            return (
                "[time, batch] (one feature)" if self.time_first else "[batch, time] (one feature)"
            )
        return "[time, batch, features]" if self.time_first else "[batch, time, features]"

    def describe(self) -> dict[str, Any]:
        import onnxruntime

        out = {
            "format": "onnx",
            "input_layout": self.layout,
            "float_reference": f"onnxruntime {onnxruntime.__version__} (the original graph)",
            "output": "every step",
        }
        if self.state:
            out["state"] = (
                f"{', '.join(self.state)}: the recurrent state, which the runtime keeps for "
                "each stream itself (from zero at its start); not inputs or outputs of the bundle"
            )
        if not self.spec.sequence_output:
            out["output"] = (
                "the last step (many-to-one); the bundle predicts after every sample, the steps "
                "before the last are compared with the step read from the graph"
            )
        return out

    def run(self, xs: np.ndarray, chunk: int = 256) -> np.ndarray:
        """[N, T, F] sequences from zero state -> per-step outputs [N, T, O] (float64): the
        graph's own, or for a many-to-one graph its output at the last step and, before it, the
        NumPy reference of the step read from the graph (as for a Keras many-to-one model;
        ``check_agreement`` ties the two together)."""
        y = self.run_graph(xs, chunk)
        if self.spec.sequence_output:
            return y
        from . import reference

        steps, _, _ = reference.run(self.spec, xs)
        steps = np.array(steps, np.float64)
        steps[:, -1] = y
        return steps

    def run_graph(self, xs: np.ndarray, chunk: int = 256) -> np.ndarray:
        """The graph's outputs in onnxruntime: [N, T, O], or [N, O] for a many-to-one graph."""
        if self._session is None:
            self._session = session(_strip_shapes(self.model))
        xs = np.asarray(xs, np.float32)
        outs = []
        for i in range(0, len(xs), chunk):
            x = xs[i : i + chunk]
            feed = np.ascontiguousarray(x.transpose(1, 0, 2)) if self.time_first else x
            if self.one_feature:  # an input [batch, time] of one feature, without its axis
                feed = np.ascontiguousarray(feed[..., 0])
            (y,) = self._session.run([self.output_name], {self.input_name: feed})
            outs.append(self._canonical(np.asarray(y, np.float64)))
        return np.concatenate(outs)

    def _canonical(self, y: np.ndarray) -> np.ndarray:
        """The output's axes as [batch, time, features] ([batch, features] for a many-to-one
        graph), whatever the graph put where."""
        roles = self.output_roles
        b = roles.index(self.batch_role)
        if not self.spec.sequence_output:
            y = y.transpose(b, *[k for k in range(y.ndim) if k != b])
            return y.reshape(y.shape[0], -1)
        t = roles.index("a1" if self.batch_role == "a0" else "a0")
        rest = [k for k in range(y.ndim) if k not in (b, t)]
        y = y.transpose(b, t, *rest)
        return y.reshape(y.shape[0], y.shape[1], -1)

    def check_agreement(self, xs: np.ndarray) -> float:
        """Max |y| difference between the graph and the spec read from it, on ``xs`` (at the
        last step for a many-to-one graph); refuses a graph that computes something else than
        what was read (exit 2)."""
        from . import reference

        y_ref, _, _ = reference.run(self.spec, xs)
        if not self.spec.sequence_output:
            y_ref = y_ref[:, -1]
        y_ort = self.run_graph(xs)
        diff = float(np.abs(y_ref - y_ort).max())
        scale = max(1.0, float(np.abs(y_ort).max()))
        if not diff <= AGREEMENT_TOL * scale:
            raise UnsupportedModel(
                "the step read from the graph differs from onnxruntime's run of it by up to "
                f"{diff:.3g} on --calib: the graph does more than the nodes this reader knows"
            )
        return diff

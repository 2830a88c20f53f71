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
    return _built(tmp_path_factory, layers=2)


def _built(tmp_path_factory, **recipe):
    from tests.torch_models import Recipe, build

    return build(
        Recipe(kind="LSTM", task="clf", exporter="legacy", **recipe), tmp_path_factory.mktemp("src")
    )


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


@pytest.mark.parametrize(
    "recipe",
    [{"layers": 2, "seed": 0}, {"layers": 2, "seed": 2}, {"layers": 1, "seed": 2}],
    ids=["2x16-seed0", "2x16-seed2", "1x16-seed2"],
)
def test_the_classifier_in_int8_itself_is_judged_on_every_target_and_says_so(
    capsys, tmp_path_factory, recipe
):
    """Small, barely trained classifiers (float accuracy 87.5-100%), where int8 is at its
    edge. Each cell's range is chosen on the int8 graph among the state search's choice and
    its neighbours (``cell_range``). Whether int8 then meets every target depends on the
    trained weights, and PyTorch's training is not bit-reproducible across machines' CPUs:
    on one machine these three met every target, on another the 1x16 model agreed with its
    float model on 97.65% of the steps (the target is 98%). What holds for each model: the
    exit code is the checks' verdict, a miss is one of the task-metric targets (never drift,
    the op audit or the interpreters) and its advice names the modes to try (``--quant auto``
    meets every target: the test above), and the bundle holds the ranges the report says."""
    src = _built(tmp_path_factory, **recipe)
    out = tmp_path_factory.mktemp("out") / "bundle"
    code, res = convert_cli(capsys, src, out, "int8", long_steps=10_000)
    report = json.loads((out / "report.json").read_text())
    checks = report["checks"]
    assert code == (0 if all(checks.values()) else 1), res.err
    assert report["quantization"] == "int8"
    assert report["drift"]["no_drift"] and report["drift"]["steps"] == 10_000
    missed = {k for k, ok in checks.items() if not ok}
    assert missed <= {"top1_agreement", "accuracy"}, (checks, report["advice"])
    if missed:
        assert any("--quant auto" in line for line in report["advice"]), report["advice"]
    else:
        assert report["parity"]["top1_agreement"] >= 0.98
        assert report["parity"]["accuracy_drop"] <= 0.01
    # the bundle holds the ranges the report says were chosen, and they were tried
    chosen = report["cell_state_range"]["chosen"]
    assert chosen in [t["cells"] for t in report["cell_state_range"]["tried"]]
    tensors = json.loads((out / "manifest.json").read_text())["tensors"]
    cells = [v["scale"] for k, v in sorted(tensors.items()) if k[0] == "c" and k[1:].isdigit()]
    assert cells == pytest.approx([2 * c / 255 for c in chosen], rel=1e-6)

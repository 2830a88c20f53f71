"""The verdict's logic: label shapes, task metrics, gates and advice (pure NumPy)."""

import numpy as np
import pytest

from convert import verdict
from convert.errors import ConvertError


def test_many_to_one_targets_are_compared_with_the_last_step():
    rng = np.random.default_rng(0)
    y_float = rng.normal(0, 1, (20, 7, 1))
    y_bundle = y_float + rng.normal(0, 0.1, y_float.shape)
    target = y_float[:, -1, 0] + rng.normal(0, 0.3, 20)
    for labels in (target, target[:, None]):
        m = verdict.task_metrics(y_float, y_bundle, labels, kind="regressor", sequence_output=False)
        rmse_f = np.sqrt(((y_float[:, -1, 0] - target) ** 2).mean())
        rmse_b = np.sqrt(((y_bundle[:, -1, 0] - target) ** 2).mean())
        assert m["labels"].startswith("per sequence")
        assert m["rmse_float"] == pytest.approx(rmse_f)
        assert m["rmse_ratio"] == pytest.approx(rmse_b / rmse_f)


def test_per_step_targets_use_every_step():
    rng = np.random.default_rng(1)
    y_float = rng.normal(0, 1, (5, 9, 2))
    target = y_float + 0.5
    m = verdict.task_metrics(
        y_float, y_float.copy(), target, kind="regressor", sequence_output=True
    )
    assert m["labels"] == "per step" and m["rmse_float"] == pytest.approx(0.5)
    assert m["rmse_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_classifier_labels_per_sequence(shape):
    y_float = np.zeros((6, 4, 3))
    y_float[:, -1, 1] = 1.0  # every sequence ends on class 1
    y_bundle = y_float.copy()
    y_bundle[:2, -1] = [0.0, 0.0, 1.0]  # two end on class 2 in the bundle
    labels = np.ones(shape, np.int64)
    m = verdict.task_metrics(y_float, y_bundle, labels, kind="classifier", sequence_output=True)
    assert m["accuracy_float"] == 1.0 and m["accuracy_bundle"] == pytest.approx(4 / 6)
    assert m["top1_agreement_last_step"] == pytest.approx(4 / 6)


def test_one_hot_labels_per_step():
    rng = np.random.default_rng(2)
    y = rng.random((3, 5, 4))
    one_hot = np.eye(4)[y.argmax(-1)]
    m = verdict.task_metrics(y, y, one_hot, kind="classifier", sequence_output=True)
    assert m["labels"] == "per step" and m["accuracy_float"] == 1.0


def test_bad_label_shape_names_the_shape():
    with pytest.raises(ConvertError, match=r"labels 'y' have shape \[4, 3, 2\]"):
        verdict.label_alignment(np.zeros((4, 3, 2)), "regressor", 4, 3, 1)
    with pytest.raises(ConvertError, match="expected 5 rows"):
        verdict.label_alignment(np.zeros(4), "classifier", 5, 3, 2)


def _report(**parity):
    return {
        "quantization": "int8",
        "op_audit": {"passed": True},
        "interpreters": {"litert": {"status": "passed"}},
        "parity": parity,
        "drift": {
            "no_drift": True,
            "top1_agreement": 0.95,
            "steps": 10_000,
            "last_10pct_mean_error": 0.1,
            "second_10pct_mean_error": 0.1,
        },
        "saturation": {},
    }


def test_long_stream_agreement_gates_only_continuous_models():
    r = _report(
        top1_agreement=0.991,
        accuracy_float=0.916,
        accuracy_bundle=0.922,
        accuracy_drop=-0.006,
        labels="per sequence",
    )
    ch = verdict.checks(r, verdict.Targets())
    assert all(ch.values()) and "long_stream_top1_agreement" not in ch
    ch = verdict.checks(r, verdict.Targets(regime="continuous"))
    assert ch["long_stream_top1_agreement"] is False
    r["checks"] = ch
    (line,) = verdict.advice(r, verdict.Targets(regime="continuous"))
    assert "long-stream top-1 agreement 95.00%" in line and "--quant int16x8" in line


@pytest.mark.parametrize(
    "mode, tried",
    [
        ("int8", "try --quant int8-float-cell, --quant int16x8 or --quant auto"),
        ("int8-float-cell", "try --quant int16x8 or --quant auto"),
        ("int16x8", "try --quant float16 (or --quant auto)"),
        ("float16", "try --quant float32"),
    ],
)
def test_drift_advice_names_a_more_faithful_mode(mode, tried):
    """An int16x8 bundle that drifted was told to try --quant int16x8, and a float16 one (whose
    states are float) that its state clips its range."""
    r = _report(top1_agreement=1.0)
    r["quantization"] = mode
    r["drift"].update(no_drift=False, last_10pct_mean_error=0.2)
    r["checks"] = verdict.checks(r, verdict.Targets())
    (line,) = verdict.advice(r, verdict.Targets())
    assert line.startswith("the error grows over a long stream") and line.endswith(tried), line
    assert f"--quant {mode} " not in line and not line.endswith(f"--quant {mode}")
    assert ("clips" in line) == (mode != "float16")


def test_failed_rmse_says_what_to_try():
    r = _report(rmse_float=1.0, rmse_bundle=1.254, rmse_ratio=1.254, labels="per step")
    r["normalization"] = "graph"
    r["saturation"] = {"y": {"clipped": 0.07}}
    targets = verdict.Targets()
    r["checks"] = verdict.checks(r, targets)
    assert r["checks"]["rmse_ratio"] is False
    (line,) = verdict.advice(r, targets)
    assert "x1.254" in line and "--quant int16x8" in line
    assert "--normalization runtime" in line and "y 7.00% clipped" in line
    assert verdict.checks(r, verdict.Targets(max_rmse_ratio=1.3))["rmse_ratio"] is True


def test_saturation_counts_values_beyond_half_a_step():
    sat = verdict.saturation(np.array([-1.0, 0.0, 0.99, 1.2, 3.0]), "int8", 1 / 128, 0)
    assert sat["range_max"] == pytest.approx(127 / 128) and sat["clipped"] == pytest.approx(0.4)
    assert verdict.saturation(np.zeros(3), "float32", 0.0, 0) is None


def test_a_tensor_clipping_beyond_max_saturation_is_warned_of_in_the_summary(bundles):
    """As --max-saturation's help and the README say, also when every gate passes; not for a
    cell state, whose int8 range the converter chooses to clip."""
    import json

    from convert.pipeline import summary

    report = json.loads((bundles / "clf-int8" / "report.json").read_text())
    sat = report["saturation"]
    for v in sat.values():
        if v:
            v["clipped"] = 0.0
    (cell,) = [k for k, v in sat.items() if v and v.get("role") == "c"]
    sat[cell]["clipped"] = 0.05
    assert "warning" not in summary(report)
    sat["x"]["clipped"] = 0.02
    (line,) = [x for x in summary(report).splitlines() if "warning" in x]
    assert "--max-saturation 0.100%" in line and "x 2.000%" in line and cell not in line


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"regime": "forever"}, "--regime 'forever'"),
        ({"max_rmse_ratio": 0.9}, "--max-rmse-ratio 0.9 must be >= 1"),
        ({"min_agreement": 1.5}, "--min-agreement 1.5 must be in [0, 1]"),
        ({"long_steps": 10}, "--long-steps 10 must be >= 100"),
        ({"long_steps": 99999999999}, "--long-steps 99999999999 must be <= 1000000"),
    ],
)
def test_bad_thresholds_are_usage_errors(kw, needle):
    with pytest.raises(ConvertError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        verdict.Targets(**kw)


def _lookup(report, figure):
    node = report
    for part in figure.split("."):
        node = node[part]
    return node


def test_gates_stand_beside_the_figures_and_limits_the_verdict_applies():
    """report.json's "gates": each check with the figure it reads and the limit it applies, so
    0.99 beside a limit of 0.995 cannot read as a pass."""
    r = _report(
        top1_agreement=0.99,
        accuracy_float=0.90,
        accuracy_bundle=0.895,
        accuracy_drop=0.005,
        labels="per step",
    )
    g = verdict.gates(r, verdict.Targets())
    assert g["top1_agreement"] == {
        "figure": "parity.top1_agreement",
        "measured": 0.99,
        "rule": ">=",
        "limit": 0.98,
        "passed": True,
        "gated": True,
    }
    assert g["accuracy"]["limit"] == pytest.approx(0.89) and g["accuracy"]["passed"]
    assert g["no_drift"]["limit"] == pytest.approx(1.2 * 0.1 + verdict.DRIFT_ABS_FLOOR)
    long = g["long_stream_top1_agreement"]
    assert (long["measured"], long["passed"], long["gated"]) == (0.95, False, False)
    for gate in g.values():
        if gate["rule"] != "is true":  # a yes/no gate's figure may name several values
            assert _lookup(r, gate["figure"]) == gate["measured"]
    assert verdict.checks(r, verdict.Targets()) == {
        k: v["passed"] for k, v in g.items() if v["gated"]
    }
    strict = verdict.gates(r, verdict.Targets(min_agreement=0.995, regime="continuous"))
    assert strict["top1_agreement"]["limit"] == 0.995 and not strict["top1_agreement"]["passed"]
    assert strict["long_stream_top1_agreement"]["gated"]
    r["drift"]["last_10pct_mean_error"] = 0.2  # beyond 1.2 x 0.1 + floor
    assert not verdict.gates(r, verdict.Targets())["no_drift"]["passed"]


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array(["a", "b", "c", "d"]), "must be finite numbers"),
        (np.array([0.0, 1.0, np.nan, 2.0]), "must be finite numbers"),
        (np.array([0, 1, 2, 9]), "label 9 is not a class of this model"),
        (np.array([0, 1, -1, 2]), "label -1 is not a class"),
        (np.array([0.0, 1.5, 2.0, 1.0]), "whole class indices"),
        (
            np.eye(4)[[0, 1, 2, 3]] + np.eye(4)[[1, 1, 0, 3]] * (np.arange(4) == 0)[:, None],
            r"not one-hot \(row 0 is \[1\.0, 1\.0, 0\.0, 0\.0\]\): for a multi-label model",
        ),
        (np.zeros((4, 4)), r"not one-hot \(row 0 is \[0\.0, 0\.0, 0\.0, 0\.0\]\)"),
    ],
)
def test_class_labels_that_are_not_classes_are_named(labels, message):
    from convert.errors import ConvertError
    from convert.verdict import class_index, label_alignment

    with pytest.raises(ConvertError, match=message):
        where = label_alignment(labels, "classifier", 4, 10, 4, sequence_output=False)
        class_index(labels, where, 4)


def test_class_indices_for_a_model_taken_for_a_regressor_say_what_to_do():
    with pytest.raises(ConvertError, match=r"expected \[4, 3\] / \[4, 10, 3\] \(class indices"):
        verdict.label_alignment(np.array([0, 1, 2, 1]), "regressor", 4, 10, 3)


def test_a_kernel_set_is_judged_by_the_verdicts_gates():
    """A kernel set passes where the verdict would pass the bundle: per-step agreement is a
    gate; long-stream agreement only with regime continuous (a model reset between sequences
    met the task's targets although its unreset long stream agreed on 97.7%)."""
    from types import SimpleNamespace

    from convert import kernels

    rng = np.random.default_rng(0)
    y_float = rng.normal(size=(4, 50, 3))
    y_long_float = rng.normal(size=(1000, 3))
    y_long = y_long_float.copy()
    y_long[:30] = y_long[:30, ::-1]  # 3% of the long stream's steps disagree (mostly)
    agreement = float((y_long.argmax(-1) == y_long_float.argmax(-1)).mean())
    assert agreement < 0.98
    base = {"top1_agreement": 0.98, "drift_ratio": 1.2, "max_accuracy_drop": 0.01}
    clf = SimpleNamespace(output_kind="classifier")

    def judge(y_parity, regime):
        targets = {**base, "max_rmse_ratio": 1.05, "regime": regime}
        return kernels.figures(clf, y_parity, y_float, None, y_long, y_long_float, targets, 0.1)

    reset = judge(y_float, "sequences")
    assert reset["passed"] and "long_stream_top1_agreement" not in reset["checks"]
    assert reset["drift"]["top1_agreement"] == agreement  # reported all the same
    assert not judge(y_float, "continuous")["passed"]
    off = y_float.copy()
    off[:, :5] = off[:, :5, ::-1]  # 10% of the per-step outputs disagree
    worse = judge(off, "sequences")
    assert not worse["passed"] and worse["checks"]["top1_agreement"] is False


@pytest.mark.parametrize("length", [40, 900, 20_000])
def test_the_long_stream_is_as_long_as_asked_whatever_the_sequences_length(length):
    """Sequences longer than a tenth of the stream made it ten sequences long: 200,000 steps
    for --long-steps 10000 with recordings of 20,000 samples, run again in every kernel set."""
    from convert.verify import periodic_stream

    x = np.random.default_rng(0).normal(0, 1, (10, length, 2)).astype(np.float32)
    long = periodic_stream(x, 10_000)
    tenth = len(long) // 10
    assert 10_000 <= len(long) < 20_000 and len(long) % 10 == 0
    np.testing.assert_array_equal(long[:tenth], long[-tenth:])  # the same inputs: only drift

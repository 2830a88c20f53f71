"""The mixed modes on a real Keras model (``tests/model_suite.py``): int8 with a float head and
int8 with a float cell state, converted and verified like every mode, served by the engine bit
for bit as verified, and ``--quant auto`` trying them between int8 and int16x8."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge
from edge import replay
from edge.manifest import parse, read_bundle
from tests import model_suite

pytestmark = pytest.mark.desktop
MODEL = "lstm32-many-to-one"  # LSTM(32) -> Dense(1): a cell state and a head
MODES = ("int8", "int8-float-head", "int8-float-cell")


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    from convert.pipeline import run_convert

    src = model_suite.trained(MODEL)
    out = tmp_path_factory.mktemp("mixed")
    return {
        m: (
            out / m,
            run_convert(
                src / "model.keras",
                src / "calib.npy",
                out / m,
                mode=m,
                data_path=src / "test.npz",
                progress=_quiet,
            ),
        )
        for m in MODES
    }


@pytest.mark.parametrize("mode", MODES[1:])
def test_a_mixed_mode_passes_the_verdict_in_every_kernel_set(built, mode):
    path, r = built[mode]
    assert r["quantization"] == mode
    assert all(r["checks"].values()), (r["checks"], r["advice"])
    sets = r["kernel_sets"]["sets"]
    assert all(v["passed"] for v in sets.values()), sets
    # the device-like tflite-runtime 2.14 is among the kernel sets verified
    assert any(k.startswith("tflite-2.14") for k in sets), sorted(sets)
    assert set(read_bundle(path)[0].verified_kernels or ()) == set(sets)


@pytest.mark.parametrize("mode", MODES[1:])
def test_a_mixed_mode_is_at_least_as_accurate_as_int8(built, mode):
    """The float head removes the output's int8 rounding; the float cell C's. Neither may do
    worse than int8 against the float model, nor on the task (RMSE against the targets) by
    more than its noise: within 1.002x of float both differ from int8 by chance."""
    par, par8 = built[mode][1]["parity"], built["int8"][1]["parity"]
    assert par["rmse_ratio"] <= max(par8["rmse_ratio"], 1.002) + 0.002
    assert par["mean_abs_error"] <= par8["mean_abs_error"]


def test_the_float_head_is_within_the_int8_cores_error(built):
    """Only the head is float: the output differs from float by what the int8 core carries,
    no more than int8's error and not zero (the core is still int8)."""
    head, int8 = built["int8-float-head"][1]["parity"], built["int8"][1]["parity"]
    assert 0 < head["max_abs_error"] <= int8["max_abs_error"]


def _op_making(interp: Any, tensor_index: int) -> dict[str, Any]:
    return next(op for op in interp._get_ops_details() if tensor_index in op["outputs"])


@pytest.mark.parametrize(
    ("mode", "output", "op"),
    [("int8-float-head", "y", "FULLY_CONNECTED"), ("int8-float-cell", "c0_next", "ADD")],
)
def test_the_float_part_is_computed_in_float_and_the_rest_in_int8(built, mode, output, op):
    from edge.backend import select

    path = built[mode][0]
    interp, runner = select().open((path / "model.tflite").read_bytes(), "serving_default")
    tensors = interp.get_tensor_details()
    made = _op_making(interp, runner.get_output_details()[output]["index"])
    assert made["op_name"] == op
    assert all(tensors[i]["dtype"] == np.float32 for i in made["inputs"] if i >= 0)
    # the gates' FULLY_CONNECTEDs stay int8: weights of one byte
    fcs = [o for o in interp._get_ops_details() if o["op_name"] == "FULLY_CONNECTED"]
    assert sum(tensors[o["inputs"][1]]["dtype"] == np.int8 for o in fcs) >= 4


@pytest.mark.parametrize("mode", MODES[1:])
def test_the_manifest_round_trips_and_the_engine_serves_what_was_verified(built, mode):
    from convert import kernels

    path = built[mode][0]
    manifest, _ = read_bundle(path)
    assert manifest.quantization == mode
    assert parse(manifest.to_dict()) == manifest
    # selective quantisation gives float I/O: the engine reads that from the tensors
    assert {t.dtype for t in manifest.tensors.values()} == {"float32"}
    x = np.load(model_suite.trained(MODEL) / "test.npz")["x"][:6]
    engine = edge.load(path)
    runs, failed = kernels.in_process(path, {"x": x})
    assert not failed
    ref = next(run for run in runs if run.kernels == engine.model.kernels)
    y, state = replay.run(engine, x)
    np.testing.assert_array_equal(y, ref.outputs["x/y"])
    np.testing.assert_array_equal(state, ref.outputs["x/state"])
    # ...and chunked streaming is the same as sample by sample
    outs = engine.step_many([edge.Chunk(f"s{i}", seq) for i, seq in enumerate(x)])
    np.testing.assert_array_equal(np.stack([o.y for o in outs]), y)


def test_auto_tries_the_mixed_modes_after_int8_and_says_why(tmp_path):
    """With an RMSE gate of 1.001x the float model's, int8 fails on this model and the float
    cell passes: auto stops there and names the failing check of the mode it tried."""
    from convert.pipeline import run_convert, summary
    from convert.verdict import Targets

    src = model_suite.trained(MODEL)
    r = run_convert(
        src / "model.keras",
        src / "calib.npy",
        tmp_path / "auto",
        mode="auto",
        data_path=src / "test.npz",
        targets=Targets(max_rmse_ratio=1.001),
        progress=_quiet,
    )
    tried = r["auto"]["tried"]
    assert [t["mode"] for t in tried] == ["int8", "int8-float-cell"]
    assert [t["passed"] for t in tried] == [False, True]
    assert tried[0]["failed"] == ["rmse_ratio"]
    assert r["quantization"] == read_bundle(tmp_path / "auto")[0].quantization == "int8-float-cell"
    text = summary(r)
    assert r["advice"][0].startswith("--quant auto chose int8-float-cell")
    assert "tried int8: failed rmse_ratio: RMSE" in text, text
    assert "tried int8-float-cell: passed" in text


def test_a_mode_without_its_part_is_skipped_by_auto_and_refused_on_its_own(tmp_path):
    from convert import intake, quantize
    from convert.errors import ConvertError
    from convert.pipeline import run_convert

    src = model_suite.trained("gru16-classifier")  # a GRU: no cell state
    spec = intake.read_spec(src / "model.keras")
    assert quantize.unfit(spec, "int8-float-cell") == (
        "int8-float-cell: the model has no LSTM cell state"
    )
    assert quantize.unfit(spec, "int8-float-head") is None
    with pytest.raises(ConvertError, match="--quant int8-float-cell: the model has no LSTM"):
        run_convert(
            src / "model.keras",
            src / "calib.npy",
            tmp_path / "out",
            mode="int8-float-cell",
            progress=_quiet,
        )
    assert not (tmp_path / "out").exists()


def test_auto_lines_name_every_mode_tried():
    from convert.pipeline import auto_lines, auto_reason

    tried = [
        {"mode": "int8", "passed": False, "failed": ["accuracy"], "why": "accuracy 77.50%"},
        {"mode": "int8-float-cell", "passed": False, "failed": [], "skipped": True,
         "why": "int8-float-cell: the model has no LSTM cell state"},
        {"mode": "int8-float-head", "passed": True, "failed": [], "why": ""},
    ]  # fmt: skip
    assert auto_lines(tried) == [
        "  tried int8: failed accuracy: accuracy 77.50%",
        "  tried int8-float-cell: skipped (int8-float-cell: the model has no LSTM cell state)",
        "  tried int8-float-head: passed",
    ]
    assert auto_reason(tried) == (
        "--quant auto chose int8-float-head, the smallest mode meeting every target (int8 "
        "failed: accuracy 77.50%; int8-float-cell skipped: the model has no LSTM cell state)"
    )


def test_softsign_is_left_to_the_modes_whose_kernels_can_run_it():
    """TFLite's int8 DIV refuses a denominator stored as 0 (1 + |x| can be), int16x8 has no
    DIV: a softsign in the integer part of a mode makes the mode unfit, said before any work."""
    import keras

    from convert import intake, quantize

    inp = keras.Input((None, 3))
    core = keras.layers.LSTM(4, activation="softsign", return_sequences=True)(inp)
    in_core = intake.spec_from_model(keras.Model(inp, keras.layers.Dense(2)(core)))
    plain = keras.layers.LSTM(4, return_sequences=True)(inp)
    head = keras.layers.Dense(2, activation="softsign")(plain)
    in_head = intake.spec_from_model(keras.Model(inp, head))
    for mode in ("int8", "int8-float-cell", "int8-float-head", "int16x8"):
        assert quantize.unfit(in_core, mode) == (
            f"{mode}: layer 0 uses softsign, whose DIV TFLite cannot run in integers"
        )
    assert quantize.unfit(in_head, "int8") is not None
    assert [quantize.unfit(in_head, m) for m in ("int8-float-head", "float16")] == [None, None]
    assert quantize.unfit(in_core, "float16") is None

"""Bundles converted from real PyTorch models (exported to ONNX) in a real interpreter: runs in
both environments, so the device-like one (tflite-runtime 2.14, no TensorFlow, no PyTorch, no
onnxruntime) streams them too."""

import numpy as np
import pytest

import edge
from edge import Chunk, replay
from tests.build_bundles import TORCH

BUNDLES = [f"{name}-{mode}" for name, (_, modes) in TORCH.items() for mode in modes]


@pytest.mark.parametrize("name", BUNDLES)
def test_streams_match_onnxruntime_within_the_recorded_fidelity(bundles, name):
    """``y`` of expected.npz is onnxruntime running the exported graph over whole sequences."""
    engine = edge.load(bundles / name)
    with np.load(bundles / name / "expected.npz") as z:
        x, y_ort = z["x"], z["y"]
    outs = engine.step_many([Chunk(f"s{i}", seq) for i, seq in enumerate(x)])
    y = np.stack([o.y for o in outs])
    bound = engine.manifest.fidelity["parity"]["max_abs_error"]
    assert np.abs(y - y_ort).max() <= bound + 1e-6
    if engine.manifest.quantization == "float32":
        assert np.abs(y - y_ort).max() <= 1e-5


@pytest.mark.parametrize("name", BUNDLES)
def test_this_environment_computes_the_bits_the_desktop_verified(bundles, name):
    """The closed loop in the kernel set this environment picks (tflite-runtime 2.14's built-in
    kernels in the device-like run, ai-edge-litert's XNNPACK on the desktop) gives exactly the
    bits the desktop computed for that kernel set when it built and verified the bundle."""
    engine = edge.load(bundles / name)
    assert engine.model.kernels in engine.manifest.verified_kernels
    with np.load(bundles / name / "expected.npz") as z:
        x = z["x"]
    with np.load(bundles / name / "bits.npz") as bits:
        recorded = {k.split("/")[0] for k in bits.files}
        assert engine.model.kernels in recorded, (engine.model.kernels, recorded)
        y_bits = bits[f"{engine.model.kernels}/x/y"]
        state_bits = bits[f"{engine.model.kernels}/x/state"]
    y, state = replay.run(engine, x)
    np.testing.assert_array_equal(y, y_bits)
    np.testing.assert_array_equal(state, state_bits)


@pytest.mark.parametrize("name", BUNDLES)
def test_the_manifest_says_where_the_model_came_from(bundles, name):
    m = edge.load(bundles / name).manifest
    src = m.extra["source"]
    assert src["format"] == "onnx" and src["float_reference"].startswith("onnxruntime ")
    time_first = not TORCH[name.rsplit("-", 1)[0]][0].get("batch_first", True)
    assert src["input_layout"] == (
        "[time, batch, features]" if time_first else "[batch, time, features]"
    )
    assert m.extra["input_normalization"] is not None  # the model's (x - mean) / std
    if m.quantization == "int8":  # int8 pins each state output to its input's range
        assert not m.extra["state_requantization"]

"""Models as users write them (``tests/model_suite.py``): each converts, float32 matches Keras,
``--quant auto`` meets the task targets, and chunked streaming equals sample by sample."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge
from edge import Chunk
from tests import model_suite

pytestmark = pytest.mark.desktop
NAMES = list(model_suite.RECIPES)


def _convert_key() -> str:
    root = model_suite.ROOT
    h = hashlib.sha256()
    for p in sorted([*root.glob("convert/*.py"), root / "edge/manifest.py", Path(__file__)]):
        h.update(p.read_bytes())
    h.update(model_suite._recipe_key().encode())
    return h.hexdigest()[:12]


def _build(name: str) -> dict[str, Any]:
    from convert.pipeline import run_convert
    from convert.verdict import Targets

    src = model_suite.trained(name)
    out = model_suite.CACHE / f"bundles-{_convert_key()}" / name
    if (out / "reports.json").exists():
        return json.loads((out / "reports.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    reports = {}
    for mode in ("float32", "auto"):
        r = run_convert(
            src / "model.keras",
            src / "calib.npy",
            out / mode,
            mode=mode,
            data_path=src / "test.npz",
            targets=Targets(long_steps=2000),
            progress=lambda m: None,
        )
        reports[mode] = {k: v for k, v in r.items() if not k.startswith("_")}
    (out / "reports.json").write_text(json.dumps(reports, indent=2, default=str))
    return reports


@pytest.fixture(scope="module")
def suite() -> dict[str, dict[str, Any]]:
    built = {name: _build(name) for name in NAMES}
    _write_table(built)
    return built


def _bundle(name: str, mode: str) -> Path:
    return model_suite.CACHE / f"bundles-{_convert_key()}" / name / mode


def _keras_predict(model: Any, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Keras' own output on the first sequences (a stateful model: one fixed batch)."""
    batch = model.inputs[0].shape[0]
    if batch:
        for layer in model.layers:
            if hasattr(layer, "reset_state"):
                layer.reset_state()
        return np.asarray(model.predict(x[:batch], batch_size=batch, verbose=0)), batch
    return np.asarray(model.predict(x, verbose=0)), len(x)


@pytest.mark.parametrize("name", NAMES)
def test_float32_bundle_matches_keras(suite, name):
    import keras

    src = model_suite.trained(name)
    model = keras.models.load_model(src / "model.keras", compile=False)
    x = np.load(src / "test.npz")["x"][:40]
    want, n = _keras_predict(model, x)
    engine = edge.load(_bundle(name, "float32"))
    outs = engine.step_many([Chunk(f"s{i}", x[i]) for i in range(n)])
    got = np.stack([o.y for o in outs])
    if want.ndim == 2:  # many-to-one: the stream's output after the last sample
        got = got[:, -1]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_auto_meets_the_task_targets(suite, name):
    r = suite[name]["auto"]
    assert all(r["checks"].values()), (r["checks"], r["advice"])
    par = r["parity"]
    assert "rmse_ratio" in par or "accuracy_drop" in par, par
    assert r["auto"]["chosen"] == r["quantization"]
    f32 = suite[name]["float32"]
    assert all(f32["checks"].values()), (f32["checks"], f32["advice"])


@pytest.mark.parametrize("name", NAMES)
def test_chunked_streaming_equals_sample_by_sample(suite, name):
    path = _bundle(name, "auto")
    x = np.load(model_suite.trained(name) / "test.npz")["x"][0][:40]
    a, b = edge.load(path), edge.load(path)
    ya = np.concatenate([a.step("s", x[i : i + 7], seq=1 + i) for i in range(0, len(x), 7)])
    yb = np.stack([b.step("s", x[i], seq=1 + i) for i in range(len(x))])
    if a.manifest.quantization == "float32":
        np.testing.assert_allclose(ya, yb, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(ya, yb)


def _write_table(built: dict[str, dict[str, Any]]) -> None:
    """The suite's figures as a Markdown table (build/model-suite/table.md)."""
    rows = [
        "| model | labels | mode chosen | metric float | metric bundle | top-1 agreement "
        "| drift ratio (last/2nd 10%) | tried |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, reports in built.items():
        r = reports["auto"]
        par, dr = r["parity"], r["drift"]
        if "rmse_ratio" in par:
            mf, mb = (
                f"RMSE {par['rmse_float']:.4f}",
                (f"RMSE {par['rmse_bundle']:.4f} (x{par['rmse_ratio']:.3f})"),
            )
        else:
            mf, mb = f"acc {par['accuracy_float']:.1%}", f"acc {par['accuracy_bundle']:.1%}"
        agree = f"{par['top1_agreement']:.2%}" if "top1_agreement" in par else "-"
        tried = ", ".join(
            f"{t['mode']} "
            + (
                "ok"
                if t["passed"]
                else "skipped"
                if t.get("skipped")
                else "failed: " + ", ".join(t.get("failed", []))
            )
            for t in r["auto"]["tried"]
        )
        rows.append(
            f"| {name} | {par['labels']} | {r['quantization']} | {mf} | {mb} | {agree} "
            f"| {dr['drift_ratio_steady']:.3f} | {tried} |"
        )
    (model_suite.CACHE / "table.md").write_text("\n".join(rows) + "\n")

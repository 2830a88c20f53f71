"""Train and convert the small models the tests share (desktop environment only).

Bundles land in one directory with ``expected.npz`` beside each: probe inputs and the float
reference outputs, so the device-like run can check fidelity without TensorFlow. Rebuilt only
when the converter, the manifest schema or this file change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["Badminton", "Running", "Standing", "Walking"]
MODES = ("int8", "float32", "int16x8", "float16")


def _key() -> str:
    h = hashlib.sha256()
    for p in sorted([*ROOT.glob("convert/*.py"), ROOT / "edge/manifest.py", Path(__file__)]):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def regression_data(n: int, t: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """3 raw channels of very different scales -> 2 noisy targets that need memory."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0, 0.3, (n, t)), axis=1)
    sine = np.sin(np.linspace(0, 12, t)[None] * rng.uniform(0.5, 2, (n, 1)))
    noise = rng.normal(0, 1, (n, t))
    x = np.stack([walk * 10.0, sine * 0.5, noise], axis=-1).astype(np.float32)
    ema = np.zeros((n, t))
    for k in range(1, t):
        ema[:, k] = 0.8 * ema[:, k - 1] + 0.2 * walk[:, k]
    lag = np.concatenate([np.zeros((n, 3)), sine[:, :-3]], axis=1)
    y = np.stack([ema, lag * noise.clip(-1, 1)], axis=-1)
    # Targets are measurements too: without noise the float model's error would be smaller
    # than one int8 output step and the RMSE ratio would only measure output resolution.
    y += rng.normal(0, 0.15, y.shape)
    return x, y.astype(np.float32)


def train_regressor(out: Path) -> None:
    import keras

    keras.utils.set_random_seed(3)
    x, y = regression_data(160, 60, seed=1)
    inp = keras.Input((None, 3))
    norm = keras.layers.Normalization()
    z = norm(inp)
    z = keras.layers.LSTM(24, return_sequences=True)(z)
    z = keras.layers.LSTM(16, return_sequences=True)(z)
    model = keras.Model(inp, keras.layers.Dense(2)(z))
    norm.adapt(x)
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss="mse")
    model.fit(x, y, epochs=40, batch_size=16, verbose=0)
    model.save(out / "model.keras")
    np.save(out / "calib.npy", x[:80])
    xt, yt = regression_data(40, 60, seed=2)
    np.savez(out / "test.npz", x=xt, y=yt)


def train_cnn_gru(out: Path) -> None:
    """A causal convolution front-end (its input buffer is a state tensor) before a GRU."""
    import keras

    keras.utils.set_random_seed(4)
    x, y = regression_data(160, 60, seed=1)
    inp = keras.Input((None, 3))
    norm = keras.layers.Normalization()
    z = norm(inp)
    z = keras.layers.Conv1D(8, 3, dilation_rate=2, padding="causal", activation="relu")(z)
    z = keras.layers.GRU(16, return_sequences=True)(z)
    model = keras.Model(inp, keras.layers.Dense(2)(z))
    norm.adapt(x)
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss="mse")
    model.fit(x, y, epochs=25, batch_size=16, verbose=0)
    model.save(out / "model.keras")
    np.save(out / "calib.npy", x[:80])
    xt, yt = regression_data(40, 60, seed=2)
    np.savez(out / "test.npz", x=xt, y=yt)


def build_all(dest: Path) -> None:
    key = _key()
    if (dest / "complete").exists() and (dest / "complete").read_text() == key:
        return
    from convert import intake, reference
    from convert.pipeline import run_convert
    from convert.train import train_example
    from convert.verdict import Targets
    from edge.cli import probe_inputs

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    src = tmp / "src"
    (src / "clf").mkdir(parents=True)
    (src / "reg").mkdir(parents=True)
    train_example(
        src / "clf" / "model.keras", epochs=5, pretrain_epochs=40, units=16, progress=False
    )
    train_regressor(src / "reg")
    (src / "cnn-gru").mkdir(parents=True)
    train_cnn_gru(src / "cnn-gru")
    quiet = lambda msg: None  # noqa: E731
    jobs = [
        (
            f"clf-{m}",
            src / "clf" / "model.keras",
            src / "clf" / "model.calib.npy",
            src / "clf" / "model.test.npz",
            m,
            LABELS,
        )
        for m in MODES
    ]
    jobs.append(
        (
            "reg2-int8",
            src / "reg" / "model.keras",
            src / "reg" / "calib.npy",
            src / "reg" / "test.npz",
            "int8",
            None,
        )
    )
    for mode in ("int8", "float32"):
        jobs.append(
            (
                f"cnn-gru-{mode}",
                src / "cnn-gru" / "model.keras",
                src / "cnn-gru" / "calib.npy",
                src / "cnn-gru" / "test.npz",
                mode,
                None,
            )
        )
    reports = {}
    for name, model, calib, data, mode, labels in jobs:
        report = run_convert(
            model,
            calib,
            tmp / name,
            mode=mode,
            labels=labels,
            data_path=data,
            targets=Targets(long_steps=2000),
            progress=quiet,
        )
        reports[name] = {k: v for k, v in report.items() if not k.startswith("_")}
        spec = intake.read_spec(model)
        probe = probe_inputs(spec.features, 64)
        with np.load(data) as z:
            seqs = z["x"][:8]
        y_probe, _, _ = reference.run(spec, probe[None])
        y_seqs, _, _ = reference.run(spec, seqs)
        np.savez(tmp / name / "expected.npz", probe=probe, y_probe=y_probe[0], x=seqs, y=y_seqs)
    (tmp / "reports.json").write_text(json.dumps(reports, indent=2, default=str))
    (tmp / "complete").write_text(key)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)

"""Small models as users write them, trained briefly on real or clean synthetic data.

Each recipe returns (model, calib x, test x, test y). Trained models are cached under
``build/model-suite/<recipe>-<hash>`` (the hash covers this file and the Keras version), so only
a changed recipe trains again; conversions are redone whenever the converter changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.build_bundles import regression_data

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGE_LSTM_MODEL_SUITE", ROOT / "build" / "model-suite"))
Data = tuple[Any, np.ndarray, np.ndarray, np.ndarray]


def _windows(series: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows [N, length, 1] and the next value [N, 1] (a forecasting tutorial)."""
    idx = np.arange(length)[None] + np.arange(len(series) - length)[:, None]
    return series[idx][..., None].astype(np.float32), series[length:, None].astype(np.float32)


def _series(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    clean = np.sin(t * 0.07) + 0.5 * np.sin(t * 0.23 + 1.0)
    return clean + rng.normal(0, 0.1, n)


def _fit(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, loss: str, **kw: Any) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(kw.pop("lr", 1e-2)), loss=loss)
    model.fit(x, y, epochs=epochs, verbose=0, **{"batch_size": 32, **kw})


def many_to_one_forecaster() -> Data:
    """``Sequential([Input((None, 1)), LSTM(32), Dense(1)])``: the most common tutorial."""
    import keras

    x, y = _windows(_series(1400, 0), 30)
    xt, yt = _windows(_series(500, 1), 30)
    model = keras.Sequential([keras.Input((None, 1)), keras.layers.LSTM(32), keras.layers.Dense(1)])
    _fit(model, x, y, 12, "mse")
    return model, x[:200], xt, yt


def relu_lstm_forecaster() -> Data:
    """``LSTM(50, activation='relu')``, the most-copied tutorial LSTM, many-to-one."""
    import keras

    x, y = _windows(_series(1400, 2), 20)
    xt, yt = _windows(_series(500, 3), 20)
    model = keras.Sequential(
        [keras.Input((None, 1)), keras.layers.LSTM(50, activation="relu"), keras.layers.Dense(1)]
    )
    _fit(model, x, y, 12, "mse", lr=3e-3)
    return model, x[:200], xt, yt


def _motions() -> tuple[Any, Any]:
    from convert.datasets import basicmotions

    return basicmotions("train"), basicmotions("test")


def gru_classifier() -> Data:
    """A GRU classifier of whole recordings (label per sequence), on real IMU data."""
    import keras

    train, test = _motions()
    norm = keras.layers.Normalization()
    norm.adapt(train.x)
    model = keras.Sequential(
        [
            keras.Input((None, 6)),
            norm,
            keras.layers.GRU(16),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    _fit(model, train.x, train.labels, 40, "sparse_categorical_crossentropy", batch_size=8)
    return model, train.x, test.x, test.labels


def cnn_lstm_har() -> Data:
    """The CNN-LSTM of activity recognition: causal convolutions (one dilated), batch norm,
    dropout, an LSTM returning its last step."""
    import keras

    L = keras.layers
    train, test = _motions()
    norm = L.Normalization()
    norm.adapt(train.x)
    model = keras.Sequential(
        [
            keras.Input((None, 6)),
            norm,
            L.Conv1D(12, 5, padding="causal", activation="relu"),
            L.BatchNormalization(),
            L.Conv1D(12, 3, dilation_rate=2, padding="causal", activation="relu"),
            L.SpatialDropout1D(0.1),
            L.LSTM(16),
            L.Dropout(0.2),
            L.Dense(4, activation="softmax"),
        ]
    )
    _fit(model, train.x, train.labels, 30, "sparse_categorical_crossentropy", batch_size=8)
    return model, train.x, test.x, test.labels


def stacked_cells_layernorm() -> Data:
    """``RNN(StackedRNNCells([LSTMCell, GRUCell]))`` + LayerNormalization, per-step regression."""
    import keras

    L = keras.layers
    x, y = regression_data(160, 60, 1)
    xt, yt = regression_data(40, 60, 2)
    norm = L.Normalization()
    norm.adapt(x)
    cells = L.StackedRNNCells([L.LSTMCell(24), L.GRUCell(16)])
    model = keras.Sequential(
        [
            keras.Input((None, 3)),
            norm,
            L.RNN(cells, return_sequences=True),
            L.LayerNormalization(),
            L.Dense(2),
        ]
    )
    _fit(model, x, y, 30, "mse", lr=5e-3, batch_size=16)
    return model, x[:80], xt, yt


def stateful_lstm_no_bias() -> Data:
    """``LSTM(stateful=True, use_bias=False)`` trained on a fixed batch, per-step regression."""
    import keras

    L = keras.layers
    x, y = regression_data(160, 60, 3)
    xt, yt = regression_data(40, 60, 4)
    norm = L.Normalization()
    norm.adapt(x)
    inp = keras.Input((None, 3), batch_size=16)
    z = norm(inp)
    z = L.LSTM(24, stateful=True, use_bias=False, return_sequences=True)(z)
    model = keras.Model(inp, L.Dense(2)(z))
    _fit(model, x, y, 30, "mse", lr=5e-3, batch_size=16, shuffle=False)
    return model, x[:80], xt, yt


def gru_hard_sigmoid_per_step() -> Data:
    """GRU(reset_after=False, recurrent_activation='hard_sigmoid') labelling every step."""
    import keras

    L = keras.layers
    train, test = _motions()
    norm = L.Normalization()
    norm.adapt(train.x)
    model = keras.Sequential(
        [
            keras.Input((None, 6)),
            norm,
            L.GRU(
                16, reset_after=False, recurrent_activation="hard_sigmoid", return_sequences=True
            ),
            L.Dense(4, activation="softmax"),
        ]
    )
    t = train.x.shape[1]
    y = np.repeat(train.labels[:, None], t, axis=1)
    _fit(model, train.x, y, 40, "sparse_categorical_crossentropy", batch_size=8)
    return model, train.x, test.x, np.repeat(test.labels[:, None], t, axis=1)


RECIPES: dict[str, Callable[[], Data]] = {
    "lstm32-many-to-one": many_to_one_forecaster,
    "lstm50-relu-many-to-one": relu_lstm_forecaster,
    "gru16-classifier": gru_classifier,
    "cnn-lstm-har": cnn_lstm_har,
    "stacked-cells-layernorm": stacked_cells_layernorm,
    "stateful-no-bias": stateful_lstm_no_bias,
    "gru-hard-sigmoid-per-step": gru_hard_sigmoid_per_step,
}


def _recipe_key() -> str:
    import keras

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(keras.__version__.encode())
    return h.hexdigest()[:12]


def trained(name: str) -> Path:
    """Directory holding model.keras, calib.npy and test.npz for a recipe (trained once)."""
    d = CACHE / f"{name}-{_recipe_key()}"
    if (d / "complete").exists():
        return d
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(11)
    tf.config.experimental.enable_op_determinism()
    model, calib, xt, yt = RECIPES[name]()
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp / "model.keras")
    np.save(tmp / "calib.npy", calib)
    np.savez(tmp / "test.npz", x=xt, y=yt)
    (tmp / "complete").write_text(json.dumps({"recipe": name}))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return d

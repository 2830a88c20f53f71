"""The example model: a per-step activity classifier on the BasicMotions IMU recordings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import CHANNELS, SAMPLE_RATE_HZ, basicmotions
from .errors import ConvertError


def build_model(features: int, classes: int, units: int = 64, layers: int = 1) -> Any:
    import keras

    inp = keras.Input((None, features), name="imu")
    z = keras.layers.Normalization(name="normalize")(inp)
    # Training-time noise: the test recordings hold orientations the 40 training ones lack.
    z = keras.layers.GaussianNoise(0.5, name="augment")(z)
    for i in range(layers):
        z = keras.layers.LSTM(units, return_sequences=True, name=f"lstm{i}")(z)
    out = keras.layers.Dense(classes, activation="softmax", name="activity")(z)
    return keras.Model(inp, out, name="basicmotions_lstm")


def train_example(
    out: str | Path,
    *,
    epochs: int = 300,
    seed: int = 7,
    units: int = 64,
    layers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, save MODEL.keras plus MODEL.calib.npy (train x) and MODEL.test.npz (x, y)."""
    out = Path(out)
    if out.suffix != ".keras":
        raise ConvertError(f"--out {out}: the model file must end in .keras")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"--out {out}: cannot create the directory: {exc}") from exc
    if not os.access(out.parent, os.W_OK):
        raise ConvertError(f"--out {out}: directory is not writable")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    train, test = basicmotions("train"), basicmotions("test")
    _, t, f = train.x.shape
    model = build_model(f, len(train.classes), units, layers)
    model.get_layer("normalize").adapt(train.x)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    y_steps = np.repeat(train.labels[:, None], t, axis=1)
    callbacks = [_TqdmEpochs(epochs)] if progress else []
    model.fit(
        train.x, y_steps, epochs=epochs, batch_size=8, verbose=0, shuffle=True, callbacks=callbacks
    )
    p_test = model.predict(test.x, verbose=0)
    acc_last = float((p_test[:, -1].argmax(-1) == test.labels).mean())
    acc_steps = float((p_test.argmax(-1) == test.labels[:, None]).mean())
    tmp = out.with_name(f".{out.name}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, out)
    stem = out.with_suffix("")
    np.save(f"{stem}.calib.npy", train.x)
    np.savez(f"{stem}.test.npz", x=test.x, y=test.labels)
    info = {
        "model": str(out),
        "calib": f"{stem}.calib.npy",
        "test": f"{stem}.test.npz",
        "classes": list(train.classes),
        "features": list(CHANNELS),
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "test_accuracy_last_step": acc_last,
        "test_accuracy_all_steps": acc_steps,
        "epochs": epochs,
        "seed": seed,
    }
    Path(f"{stem}.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


class _TqdmEpochs:
    """A Keras callback driving a tqdm bar over epochs (duck-typed to keep import light)."""

    def __new__(cls, epochs: int) -> Any:
        import keras
        from tqdm import tqdm

        class Bar(keras.callbacks.Callback):  # type: ignore[misc]
            def on_train_begin(self, logs: Any = None) -> None:
                self.bar = tqdm(total=epochs, desc="training", unit="epoch", disable=None)

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['accuracy']:.3f}")
                self.bar.update()

            def on_train_end(self, logs: Any = None) -> None:
                self.bar.close()

        return Bar()

"""The example model: a per-step activity classifier on the BasicMotions IMU recordings.

It is trained on *continuous streams*, the regime the runtime runs it in: a device's samples
arrive one after another, activity after activity, and the model's state is never reset
between them. A model trained only on single recordings from the zero state learns to
classify a recording's start, not to notice that the activity changed; one trained only to
follow changes quickly jumps at every quiet stretch of an activity. See docs/training.md.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.outfile import regular_target, replace_together

from .datasets import CHANNELS, SAMPLE_RATE_HZ, basicmotions
from .errors import ConvertError

# Defaults of train-example; tests/build_bundles.py trains a smaller one with fewer epochs.
PRETRAIN_EPOCHS = 100  # single recordings from the zero state: learn the classes first
EPOCHS = 15  # then streams (each epoch also shows every recording alone, SINGLES_PER_EPOCH times)
SINGLES_PER_EPOCH = 3
SETTLE = 25  # loss weight after a change of activity rises from 1/SETTLE to 1 over SETTLE steps
CONSISTENCY = 5.0  # weight of the penalty on a prediction that changes while the label does not
NOISE = 0.3  # training-time Gaussian noise on the normalised features
STREAMS_PER_EPOCH = 48
STREAM_STEPS = 300
SEGMENT_MIN = 30  # shortest segment of a recording in a stream (steps)
VALIDATION_PER_CLASS = 1  # training recordings held out to choose the epoch on
REPLAY_ORDERS = 5


@dataclass(frozen=True)
class Streams:
    x: np.ndarray  # [S, L, F] float32
    y: np.ndarray  # [S, L] label index per step


def make_streams(
    x: np.ndarray,
    labels: np.ndarray,
    count: int,
    length: int,
    rng: np.random.Generator,
) -> Streams:
    """``count`` streams of ``length`` steps, each a chain of segments cut from random
    recordings (random start, random length of SEGMENT_MIN..T steps), labelled per step.
    Activities change at random times, so the model cannot learn to expect a change every T
    steps; half of the streams begin with a recording's first sample (the zero state meets a
    fresh recording, as when a device starts)."""
    n, t, f = x.shape
    xs = np.empty((count, length, f), np.float32)
    ys = np.empty((count, length), np.int64)
    for s in range(count):
        at, first = 0, rng.random() < 0.5
        while at < length:
            r = int(rng.integers(n))
            size = int(rng.integers(min(SEGMENT_MIN, t), t + 1))
            start = 0 if first else int(rng.integers(0, t - size + 1))
            size = min(size, length - at)
            xs[s, at : at + size] = x[r, start : start + size]
            ys[s, at : at + size] = labels[r]
            at, first = at + size, False
    return Streams(xs, ys)


def settle_weights(y: np.ndarray, settle: int) -> np.ndarray:
    """Loss weight per step of streams ``y`` ([S, L] labels): ``(k + 1) / settle`` at the k-th
    step after the stream's start or a change of label, 1 from step ``settle - 1`` on. The
    model is not pushed to answer the new activity at its first samples, where the evidence is
    thin, so it does not learn to jump at every quiet or ambiguous sample either."""
    since = np.zeros(y.shape, np.float64)
    for j in range(1, y.shape[1]):
        since[:, j] = np.where(y[:, j] != y[:, j - 1], 0, since[:, j - 1] + 1)
    return np.minimum(1.0, (since + 1) / settle).astype(np.float32)


def replay_streams(x: np.ndarray, labels: np.ndarray, orders: int, seed: int) -> Streams:
    """Every recording once, back to back, in ``orders`` seeded random orders: what a device of
    ``firmware-sim`` sends (each device replays the recordings in its own order)."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(x)) for _ in range(orders)]
    return Streams(
        np.stack([x[p].reshape(-1, x.shape[2]) for p in perms]).astype(np.float32),
        np.stack([np.repeat(labels[p], x.shape[1]) for p in perms]),
    )


def step_accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Share of steps whose top-1 class is the label ([S, L, C] against [S, L])."""
    return float((probs.argmax(-1) == y).mean())


def split_per_class(
    labels: np.ndarray, per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): ``per_class`` recordings of each class held out."""
    held = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for c in np.unique(labels)
        ]
    )
    return np.setdiff1d(np.arange(len(labels)), held), np.sort(held)


def build_model(
    features: int, classes: int, units: int = 64, layers: int = 1, noise: float = NOISE
) -> Any:
    import keras

    inp = keras.Input((None, features), name="imu")
    z = keras.layers.Normalization(name="normalize")(inp)
    # Training-time noise: the test recordings hold orientations the 40 training ones lack;
    # more noise than this drowns the small motions that tell Standing from Walking.
    z = keras.layers.GaussianNoise(noise, name="augment")(z)
    for i in range(layers):
        z = keras.layers.LSTM(units, return_sequences=True, name=f"lstm{i}")(z)
    out = keras.layers.Dense(classes, activation="softmax", name="activity")(z)
    return keras.Model(inp, out, name="basicmotions_lstm")


def consistency_loss(weight: float) -> Any:
    """Cross-entropy per step plus ``weight`` x the squared change of the predicted
    probabilities from the previous step wherever the label did not change: the model is
    taught to hold its answer through a quiet or ambiguous stretch of one activity (a pause,
    the end of a recording), and is not held back where the activity really changes."""
    import keras
    from keras import ops

    def loss(y_true: Any, y_pred: Any) -> Any:
        ce = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        if not weight:
            return ce
        y = ops.cast(ops.reshape(y_true, ops.shape(y_pred)[:2]), "int32")
        same = ops.cast(ops.equal(y[:, 1:], y[:, :-1]), y_pred.dtype)
        change = ops.sum(ops.square(y_pred[:, 1:] - y_pred[:, :-1]), axis=-1)
        return ce + weight * ops.pad(same * change, [[0, 0], [1, 0]])

    return loss


def train_example(
    out: str | Path,
    *,
    epochs: int = EPOCHS,
    pretrain_epochs: int = PRETRAIN_EPOCHS,
    seed: int = 7,
    units: int = 64,
    layers: int = 1,
    singles_per_epoch: int = SINGLES_PER_EPOCH,
    settle: int = SETTLE,
    consistency: float = CONSISTENCY,
    noise: float = NOISE,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on single recordings, then on streams (the first steps after each change weighed
    in gently, a prediction that changes within one activity penalised, the single recordings
    shown again ``singles_per_epoch`` times an epoch); keep the stream epoch that is best on
    held-out streams (see docs/training.md); save MODEL.keras,
    MODEL.calib.npy (train x), MODEL.test.npz (x, y) and MODEL.json (the figures)."""
    out = Path(out)
    if out.suffix != ".keras":
        raise ConvertError(f"--out {out}: the model file must end in .keras")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"--out {out}: cannot create the directory: {exc}") from exc
    if not os.access(out.parent, os.W_OK):
        raise ConvertError(f"--out {out}: directory is not writable")
    model_file = regular_target(out, ConvertError, "--out ")  # the file a link leads to
    stem = out.with_suffix("")
    # the files written beside it, checked as well before training, not after it
    beside = {
        kind: regular_target(Path(f"{stem}.{kind}"), ConvertError, f"--out {out}: ")
        for kind in ("calib.npy", "test.npz", "json")
    }
    if epochs < 1 or pretrain_epochs < 0:
        raise ConvertError(
            f"--epochs {epochs} must be >= 1 and --pretrain-epochs {pretrain_epochs} >= 0"
        )
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(seed)
    train, test = basicmotions("train"), basicmotions("test")
    fit_idx, val_idx = split_per_class(train.labels, VALIDATION_PER_CLASS, rng)
    fit_x, fit_y = train.x[fit_idx], train.labels[fit_idx]
    fit_steps = np.repeat(fit_y[:, None], fit_x.shape[1], 1)
    val = replay_streams(train.x[val_idx], train.labels[val_idx], REPLAY_ORDERS, seed)

    model = build_model(train.x.shape[2], len(train.classes), units, layers, noise)
    model.get_layer("normalize").adapt(train.x)
    batch = 8
    singles = -(-len(fit_x) // batch)  # optimizer steps per pass over the recordings
    steps = (
        epochs * (-(-STREAMS_PER_EPOCH // batch) + singles_per_epoch * singles)
        + pretrain_epochs * singles
    )
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(3e-3, steps, alpha=0.02), clipnorm=1.0
        ),
        loss=consistency_loss(consistency) if consistency else "sparse_categorical_crossentropy",
    )
    bar = _bar(pretrain_epochs + epochs) if progress else lambda *a: None
    if pretrain_epochs:
        tick = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: bar(logs["loss"]))
        model.fit(
            fit_x, fit_steps, batch_size=batch, epochs=pretrain_epochs, verbose=0, callbacks=[tick]
        )
    best: tuple[float, int, list[Any]] = (-1.0, -1, [])
    for epoch in range(epochs):
        s = make_streams(fit_x, fit_y, STREAMS_PER_EPOCH, STREAM_STEPS, rng)
        weights = settle_weights(s.y, settle) if settle > 1 else None
        loss = model.fit(
            s.x, s.y, sample_weight=weights, batch_size=batch, epochs=1, verbose=0, shuffle=True
        )
        for _ in range(singles_per_epoch):
            model.fit(fit_x, fit_steps, batch_size=batch, epochs=1, verbose=0, shuffle=True)
        acc = step_accuracy(model.predict(val.x, verbose=0, batch_size=len(val.x)), val.y)
        if acc >= best[0]:  # ties: the later epoch, further down the schedule
            best = (acc, epoch, model.get_weights())
        bar(loss.history["loss"][-1], acc, best[0])
    bar(None)
    model.set_weights(best[2])
    if consistency:  # the saved file names no custom loss, so it loads without this module
        model.compile(optimizer=model.optimizer, loss="sparse_categorical_crossentropy")

    figures = evaluate(lambda x: model.predict(x, verbose=0), test.x, test.labels, seed)
    info = {
        "model": str(out),
        "calib": f"{stem}.calib.npy",
        "test": f"{stem}.test.npz",
        "classes": list(train.classes),
        "features": list(CHANNELS),
        "sample_rate_hz": SAMPLE_RATE_HZ,
        **figures,
        "validation_replay_accuracy": best[0],
        "best_epoch": best[1] + 1,
        "epochs": epochs,
        "pretrain_epochs": pretrain_epochs,
        "seed": seed,
        "training": {
            "streams_per_epoch": STREAMS_PER_EPOCH,
            "singles_per_epoch": singles_per_epoch,
            "settle": settle,
            "consistency": consistency,
            "noise": noise,
            "stream_steps": STREAM_STEPS,
            "validation_recordings": [int(i) for i in val_idx],
        },
    }
    text = json.dumps(info, indent=2) + "\n"
    # all four written before any is put in place: a full disk partway through retraining
    # over an earlier model leaves that model's files as they were (suffixes kept: Keras and
    # NumPy go by them)
    replace_together(
        [
            (model_file, model.save),
            (beside["calib.npy"], lambda tmp: np.save(tmp, train.x)),
            (beside["test.npz"], lambda tmp: np.savez(tmp, x=test.x, y=test.labels)),
            (beside["json"], lambda tmp: tmp.write_text(text)),
        ],
        ConvertError,
        "--out ",
    )
    return info


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, labels: np.ndarray, seed: int
) -> dict[str, float]:
    """The example's figures on recordings ``x``: each recording from the zero state (last
    step, every step), and all of them replayed back to back in seeded orders (every step)."""
    p = predict(x)
    replay = replay_streams(x, labels, REPLAY_ORDERS, seed + 1)
    return {
        "test_accuracy_last_step": float((p[:, -1].argmax(-1) == labels).mean()),
        "test_accuracy_all_steps": step_accuracy(p, np.repeat(labels[:, None], x.shape[1], 1)),
        "test_accuracy_replay": step_accuracy(predict(replay.x), replay.y),
    }


def _bar(epochs: int) -> Callable[..., None]:
    """A tqdm bar over all epochs: ``bar(loss[, held-out replay accuracy, best])`` per epoch,
    ``bar(None)`` to close. Where stderr is no terminal (a log, a pipe, the demo under a
    script) tqdm draws nothing, so a plain line every tenth of the epochs says training goes on."""
    from tqdm import tqdm

    bar = tqdm(total=epochs, desc="training", unit="epoch", disable=None)
    every, done = max(1, epochs // 10), 0

    def update(loss: float | None, val: float | None = None, best: float | None = None) -> None:
        nonlocal done
        if loss is None:
            bar.close()
            return
        post = {"loss": f"{loss:.3f}"}
        if val is not None and best is not None:
            post.update(val=f"{val:.3f}", best=f"{best:.3f}")
        bar.set_postfix(post)
        bar.update()
        done += 1
        if bar.disable and (done % every == 0 or done == epochs):
            figures = ", ".join(f"{k} {v}" for k, v in post.items())
            print(f"training: epoch {done}/{epochs}, {figures}", file=sys.stderr, flush=True)

    return update

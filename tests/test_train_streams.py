"""The example's training streams (pure NumPy): what the model is shown is what the runtime
will give it - recordings back to back, changes at any time, some from a recording's start."""

from __future__ import annotations

import numpy as np
import pytest

from convert import train


def _recordings(n: int = 8, t: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Recording r holds r + step/1000 in every feature: each step says where it came from."""
    x = np.arange(n)[:, None, None] + np.arange(t)[None, :, None] / 1000 + np.zeros((1, 1, 3))
    return x.astype(np.float32), np.arange(n) % 4


def test_streams_are_labelled_segments_of_recordings_that_change_at_any_time():
    x, labels = _recordings()
    s = train.make_streams(x, labels, 200, 300, np.random.default_rng(0))
    assert s.x.shape == (200, 300, 3) and s.y.shape == (200, 300)
    rec = np.rint(s.x[..., 0] - (s.x[..., 0] % 1)).astype(int)  # source recording per step
    step = np.rint((s.x[..., 0] % 1) * 1000).astype(int)  # step inside that recording
    assert (s.y == labels[rec]).all()
    from_start = s.x[:, 0, 0] % 1 == 0
    assert 0.35 < from_start.mean() < 0.65  # about half begin where a device starts
    changes, lengths = [], []
    for r, k in zip(rec, step):
        cut = np.flatnonzero((np.diff(r) != 0) | (np.diff(k) != 1)) + 1
        changes += list(cut)
        lengths += list(np.diff(cut))  # whole segments (not the first or the truncated last)
        # inside a segment the recording plays on, one step at a time
        for a, b in zip([0, *cut], [*cut, len(r)]):
            assert (np.diff(k[a:b]) == 1).all() and len(set(r[a:b])) == 1
    assert min(lengths) >= train.SEGMENT_MIN and max(lengths) <= 100
    # transitions fall anywhere, not only every 100 steps
    assert len({c % 100 for c in changes}) > 50


def test_replay_plays_every_recording_once_per_order_like_the_simulated_devices():
    x, labels = _recordings(6, 10)
    s = train.replay_streams(x, labels, 3, seed=1)
    assert s.x.shape == (3, 60, 3)
    for stream, y in zip(s.x, s.y):
        order = stream[::10, 0].astype(int)
        assert sorted(order) == list(range(6))
        assert (y == np.repeat(labels[order], 10)).all()
    again = train.replay_streams(x, labels, 3, seed=1)
    assert (again.x == s.x).all()


def test_validation_holds_out_recordings_of_every_class():
    labels = np.repeat(np.arange(4), 10)
    fit, held = train.split_per_class(labels, 1, np.random.default_rng(0))
    assert sorted(labels[held]) == [0, 1, 2, 3]
    assert set(fit).isdisjoint(held) and len(fit) + len(held) == 40


def test_step_accuracy():
    probs = np.eye(3)[[[0, 1, 2, 2]]]
    assert train.step_accuracy(probs, np.array([[0, 1, 1, 2]])) == 0.75


def test_settle_weights_rise_after_every_start_and_change_of_activity():
    y = np.array([[0, 0, 0, 0, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    w = train.settle_weights(y, 3)
    third = 1 / 3
    expected = [
        [third, 2 * third, 1, 1, third, 2 * third, third, 2 * third, 1, 1],
        [third, 2 * third, 1, 1, 1, 1, 1, 1, 1, 1],
    ]
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w.dtype == np.float32
    assert (train.settle_weights(y, 1) == 1).all()


@pytest.mark.desktop
def test_the_consistency_loss_charges_a_changed_answer_only_where_the_label_held():
    keras = pytest.importorskip("keras")
    p = np.array([[[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]], np.float32)
    ce = keras.ops.convert_to_numpy(
        keras.losses.sparse_categorical_crossentropy(np.array([[0, 0, 1]]), p)
    )
    for y, penalised in (([0, 0, 1], [0, 0.32, 0]), ([0, 0, 0], [0, 0.32, 0.18])):
        got = keras.ops.convert_to_numpy(train.consistency_loss(2.0)(np.array([y]), p))
        plain = keras.ops.convert_to_numpy(
            keras.losses.sparse_categorical_crossentropy(np.array([y]), p)
        )
        np.testing.assert_allclose(got[0], plain[0] + 2.0 * np.array(penalised), rtol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(train.consistency_loss(0.0)(np.array([[0, 0, 1]]), p)), ce
    )

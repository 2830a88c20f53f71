"""The runtime's softmax of int8 logits: accurate, and the same bits on every machine."""

import hashlib

import numpy as np
import pytest

from edge.softmax import ONE, IntSoftmax, exp_table

SCALE = 0.0302687380462  # a logit scale the converter wrote for the example classifier


def float_softmax(raw: np.ndarray, scale: float) -> np.ndarray:
    z = raw.astype(np.float64) * scale
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("scale", [SCALE, 1e-3, 0.1, 0.5])
@pytest.mark.parametrize("classes", [2, 4, 9, 300])
def test_matches_float_softmax_to_float32_resolution(scale, classes):
    raw = np.random.default_rng(classes).integers(-128, 128, (50, classes)).astype(np.int8)
    p = IntSoftmax(scale)(raw)
    assert p.dtype == np.float32 and p.shape == raw.shape
    np.testing.assert_allclose(p, float_softmax(raw, scale), rtol=0, atol=1e-7)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)


def test_a_row_alone_gives_the_bits_it_gives_in_a_batch():
    """The one-row path (Python ints) and the batch path (NumPy) are two roads to one result."""
    sm = IntSoftmax(SCALE)
    raw = np.random.default_rng(0).integers(-128, 128, (40, 6)).astype(np.int8)
    batch = sm(raw)
    for i in range(len(raw)):
        assert sm(raw[i]).tobytes() == batch[i].tobytes()
        assert sm(raw[i : i + 1]).tobytes() == batch[i : i + 1].tobytes()


def test_shift_and_ties():
    sm = IntSoftmax(SCALE)
    raw = np.array([[5, 5, -3], [10, 10, 2]], np.int8)  # the same distances from the maximum
    p = sm(raw)
    assert p[0].tobytes() == p[1].tobytes() and p[0, 0] == p[0, 1]


def test_table_is_exp_in_fixed_point():
    t = exp_table(SCALE)
    assert t.dtype == np.int64 and t.shape == (256,) and t[0] == ONE
    assert (np.diff(t) <= 0).all()
    approx = np.exp(-np.arange(256) * SCALE) * ONE
    assert np.abs(t - approx).max() <= 1.0  # float64 exp is within an ulp; the table is exact


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_scale_is_named(bad):
    with pytest.raises(ValueError, match="logit scale"):
        exp_table(bad)


def test_same_bits_on_every_machine():
    """Digests computed once on x86-64; ``scripts/test-arm`` runs this file on emulated
    aarch64, where any machine-dependent step (a libm exp, a float sum's order) would show."""
    assert (
        hashlib.sha256(exp_table(SCALE).tobytes()).hexdigest()
        == "c0bb941c0c9ad38c7b9c94c6a64f64216a51f062800a3844225c60fe4faf41df"
    )
    raw = (np.arange(-128, 128, dtype=np.int16).reshape(32, 8) * 37 % 256 - 128).astype(np.int8)
    assert (
        hashlib.sha256(IntSoftmax(SCALE)(raw).tobytes()).hexdigest()
        == "36003c9618d55094d7828fc85afdee68ac222d7fb00647c21ce7f689255d9990"
    )


def test_any_leading_shape():
    """[T, K], [N, T, K] (replay's raw outputs) and [1, T, K] are rows along the last axis."""
    sm = IntSoftmax(SCALE)
    raw = np.random.default_rng(3).integers(-128, 128, (3, 5, 4)).astype(np.int8)
    rows = np.stack([[sm(raw[i, j]) for j in range(5)] for i in range(3)])
    assert sm(raw).tobytes() == rows.tobytes()
    assert sm(raw[:1]).tobytes() == rows[:1].tobytes()
    assert sm(raw[0]).tobytes() == rows[0].tobytes()


def test_batches_of_changing_shapes_keep_their_own_results():
    """The batch path keeps its working buffers while the shape repeats: every result is the
    row-by-row one, and a later call (same shape, another shape, a long chunk) leaves the
    arrays handed out before untouched."""
    sm = IntSoftmax(SCALE)
    rng = np.random.default_rng(7)
    shapes = [(64, 4), (64, 4), (5, 4), (64, 4), (5000, 4), (64, 9), (3, 4), (64, 4)]
    given, kept = [], []
    for shape in shapes:
        raw = rng.integers(-128, 128, shape).astype(np.int8)
        p = sm(raw)
        rows = np.stack([sm(r) for r in raw])
        assert p.tobytes() == rows.tobytes()
        given.append(p)
        kept.append(p.copy())
    for p, copy in zip(given, kept):
        assert p.tobytes() == copy.tobytes()

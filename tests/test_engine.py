"""The engine against real bundles in a real interpreter (runs in both environments)."""

import platform
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edge
from edge import Chunk
from edge import snapshot as fmt
from edge.engine import float_outputs

MODES = [
    "clf-int8",
    "clf-float32",
    "clf-int16x8",
    "clf-float16",
    "reg2-int8",
    "reg2-int8-float-head",
    "cnn-gru-int8",
    "cnn-gru-float32",
]
F = 6
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def samples(n: int, seed: int, f: int = F) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (n, f))


def states_equal(a: edge.Engine, b: edge.Engine, stream: str) -> bool:
    sa, sb = a.state_of(stream), b.state_of(stream)
    return all(np.array_equal(x, y) for x, y in zip(sa, sb))


@pytest.fixture
def load(bundles):
    def _load(name: str = "clf-int8", **kw) -> edge.Engine:
        return edge.load(bundles / name, **kw)

    return _load


@pytest.mark.parametrize("name", MODES)
def test_outputs_match_the_float_reference_within_the_recorded_fidelity(load, bundles, name):
    engine = load(name)
    exp = np.load(bundles / name / "expected.npz")
    outs = engine.step_many([Chunk(f"s{i}", x) for i, x in enumerate(exp["x"])])
    y = np.stack([o.y for o in outs])
    # the figure recorded for the kernel set this environment runs (tflite-runtime 2.14's
    # built-in kernels in the device-like run), else the reference kernel set's
    own = engine.manifest.kernels.get("sets", {}).get(engine.model.kernels, {})
    bound = own.get("parity", engine.manifest.fidelity["parity"])["max_abs_error"]
    assert np.abs(y - exp["y"]).max() <= bound + 1e-6


@pytest.mark.parametrize("name", MODES)
def test_every_mode_runs_through_the_same_engine(load, name):
    engine = load(name)
    f = engine.manifest.features
    y = engine.step("a", samples(5, 0, f))
    assert y.shape == (5, engine.manifest.outputs) and np.isfinite(y).all()
    assert engine.state_of("a")[0].dtype == {"int8": np.int8, "int16x8": np.int16}.get(
        engine.manifest.quantization, np.float32
    )


def test_a_mixed_mode_bundle_computes_the_bits_the_desktop_verified(load, bundles):
    """int8-float-head (int8 core, float head, float I/O): the closed loop in this
    environment's kernel set (tflite-runtime 2.14's built-in kernels in the device-like run)
    gives exactly the bits the desktop recorded for that kernel set when it built the bundle."""
    from edge import replay

    engine = load("reg2-int8-float-head")
    assert engine.manifest.quantization == "int8-float-head"
    assert engine.model.kernels in (engine.manifest.verified_kernels or ())
    with np.load(bundles / "reg2-int8-float-head" / "expected.npz") as z:
        x = z["x"]
    with np.load(bundles / "reg2-int8-float-head" / "bits.npz") as bits:
        y_bits = bits[f"{engine.model.kernels}/x/y"]
        state_bits = bits[f"{engine.model.kernels}/x/state"]
    y, state = replay.run(engine, x)
    if platform.machine() != "x86_64":
        # The bits were recorded on x86. The float parts run float kernels, which round
        # differently on Arm (~1e-7, as float32 bundles do; README, Known limits).
        np.testing.assert_allclose(y, y_bits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(state, state_bits, rtol=0, atol=1e-5)
        return
    np.testing.assert_array_equal(y, y_bits)
    np.testing.assert_array_equal(state, state_bits)


def test_int8_state_is_fed_back_as_bytes(load):
    engine = load("clf-int8")
    assert not engine.manifest.extra["state_requantization"]
    h = engine.manifest.tensors["h0"]
    assert engine.state_of("x") is None
    engine.step("x", samples(1, 0)[0])
    assert engine.state_of("x")[0].nbytes == h.width  # one byte per unit


@SETTINGS
@given(n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_k_samples_at_once_equal_one_at_a_time(load, n, seed):
    a, b = load(), load()
    x = samples(n, seed)
    ya = a.step("s", x, seq=100)
    yb = np.stack([b.step("s", x[i], seq=100 + i) for i in range(n)])
    np.testing.assert_array_equal(ya, yb)
    assert states_equal(a, b, "s") and a.last_seq("s") == b.last_seq("s") == 99 + n


@SETTINGS
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=20),
    seed=st.integers(0, 999),
    name=st.sampled_from(
        ["clf-int8", "clf-float32", "reg2-int8", "reg2-int8-float-head", "cnn-gru-int8"]
    ),
)
def test_batched_equals_unbatched_bit_for_bit(load, lengths, seed, name):
    batched = load(name, max_batch=8)  # small buckets: padding and splitting both happen
    f = batched.manifest.features
    xs = [samples(k, seed + i, f) for i, k in enumerate(lengths)]
    outs = batched.step_many([Chunk(f"s{i}", x, seq=1) for i, x in enumerate(xs)])
    for i, x in enumerate(xs):
        alone = load(name, max_batch=1)
        y = alone.step(f"s{i}", x, seq=1)
        if batched.manifest.quantization == "float32":
            # Float kernels (XNNPACK, ruy) may sum in another order per batch size: 1 ulp.
            np.testing.assert_allclose(outs[i].y, y, rtol=1e-6, atol=1e-6)
        elif batched.manifest.tensors["y"].dtype == "float32":
            # a float head on an int8 core: the head may sum in another order, the state
            # (dequantised int8 codes) is exact
            np.testing.assert_allclose(outs[i].y, y, rtol=1e-6, atol=1e-6)
            assert states_equal(batched, alone, f"s{i}")
        else:
            np.testing.assert_array_equal(outs[i].y, y)
            assert states_equal(batched, alone, f"s{i}")


@SETTINGS
@given(cut=st.integers(0, 30), seed=st.integers(0, 999))
def test_snapshot_restore_continues_bit_identically(load, tmp_path, cut, seed):
    x = samples(30, seed)
    straight = load()
    y_straight = straight.step("s", x, seq=1)
    first = load()
    if cut:
        first.step("s", x[:cut], seq=1)
    first.step("other", x[:3], seq=7)
    path = tmp_path / f"snap-{cut}-{seed}.bin"
    first.snapshot(path)
    second = load()
    second.restore(path)
    assert second.last_seq("other") == 9
    if cut < 30:
        np.testing.assert_array_equal(second.step("s", x[cut:], seq=1 + cut), y_straight[cut:])
    assert states_equal(second, straight, "s")


@SETTINGS
@given(ops=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 4)), min_size=1, max_size=30))
def test_duplicates_and_replays_never_change_the_state(load, ops):
    """Any redelivery pattern ends in the state of the distinct samples applied in order."""
    x = samples(30, 1)
    engine = load()
    high = -1  # highest seq applied so far
    for start, k in ops:
        start = min(start, high + 1)  # at-least-once: replays, overlaps and news, no gaps
        k = min(k, 30 - start)
        if k <= 0:
            continue
        before = engine.state_of("s")
        out = engine.step_many([Chunk("s", x[start : start + k], seq=start)])[0]
        dups = max(0, min(k, high - start + 1))
        assert out.duplicates == dups and len(out.y) == k - dups
        if dups == k:
            assert all(np.array_equal(a, b) for a, b in zip(before, engine.state_of("s")))
        high = max(high, start + k - 1)
    clean = load()
    clean.step("s", x[: high + 1], seq=0)
    assert states_equal(engine, clean, "s")
    assert engine.counters.duplicates == engine.counters.samples - (high + 1)


def test_reset_equals_a_fresh_stream(load):
    x = samples(10, 3)
    a = load()
    a.step("s", x, seq=1)
    a.reset("s")
    y = a.step("s", x, seq=11)
    np.testing.assert_array_equal(y, load().step("s", x))
    assert a.last_seq("s") == 20


def test_eviction_then_return_equals_a_fresh_stream_numbered_on(load):
    """An evicted stream loses its state, not its numbering: what it had applied stays
    applied (a resend is a duplicate, not stepped a second time), and it goes on from zero."""
    x = samples(10, 4)
    engine = load(capacity=1)
    engine.step("a", x, seq=1)
    engine.step("b", x, seq=1)  # evicts a
    assert engine.stats()["evicted_lru"] == 1
    again = engine.step_many([Chunk("a", x[4:6], 5)])[0]
    assert (again.duplicates, len(again.y)) == (2, 0)
    out = engine.step_many([Chunk("a", x, 11)])[0]
    assert out.gap == 0 and out.restart  # from the zero state
    np.testing.assert_array_equal(out.y, load().step("a", x))


@pytest.mark.parametrize("how", ["capacity", "idle", "snapshot"])
def test_a_sample_applied_before_an_eviction_is_a_duplicate_after_it(load, how, tmp_path):
    now = [0.0]
    opts = {"capacity": 2} if how == "capacity" else {"idle_timeout": 60}
    engine = load(clock=lambda: now[0], **opts)
    x = samples(6, 5)
    engine.step_many([Chunk("a", x[:4], 1, boot=7)])
    now[0] = 100  # a is idle from here on
    engine.step_many([Chunk("b", x[:1], 1), Chunk("c", x[:1], 1)])
    assert engine.state_of("a") is None  # evicted
    if how == "snapshot":  # the numbering of evicted streams is in the snapshot
        engine.snapshot(tmp_path / "snap.bin")
        engine = load(clock=lambda: now[0], **opts)
        engine.restore(tmp_path / "snap.bin")
    outs = engine.step_many([Chunk("a", x[3:5], 4, boot=7), Chunk("z", x[:1], 9)])
    assert (outs[0].duplicates, outs[0].seq, len(outs[0].y), outs[0].restart) == (1, 5, 1, True)
    assert outs[1].duplicates == 0  # never seen: a new stream, whatever its seq


def test_idle_timeout_uses_the_injected_clock(load):
    now = [0.0]
    engine = load(idle_timeout=60, clock=lambda: now[0])
    engine.step("a", samples(1, 0)[0], seq=1)
    now[0] = 61
    engine.step("b", samples(1, 0)[0], seq=1)
    assert engine.state_of("a") is None and engine.stats()["evicted_idle"] == 1


@pytest.mark.parametrize("carry", ["load_state_from", "load_numbering_from"])
def test_a_reload_keeps_how_long_each_stream_has_been_idle(load, carry):
    """A reload carries the streams over to a new engine: each was marked as used at that
    moment, so every reload put off the forgetting of idle streams (and the removal of their
    Home Assistant sensors) by a whole idle_timeout."""
    now = [0.0]
    old = load(idle_timeout=60, clock=lambda: now[0])
    old.step("a", samples(1, 0)[0], seq=1)
    now[0] = 50.0
    old.step("b", samples(1, 0)[0], seq=1)
    now[0] = 100.0  # "a" idle for 100 s, "b" for 50 s
    new = load(idle_timeout=60, clock=lambda: now[0])
    getattr(new, carry)(old)
    assert new.store.streams == ["a", "b"] and new.store.idle(60) == ["a"]
    now[0] = 111.0
    assert new.store.idle(60) == ["a", "b"]


def test_a_restore_keeps_how_long_each_stream_has_been_idle(load, tmp_path):
    """A restored stream was "just seen": a service restarted more often than its
    idle_timeout never forgot a dead device. The snapshot keeps how long each stream had
    been idle (a duration: the restarted process's clock starts anew) and counting goes on."""
    now = [1000.0]
    old = load(idle_timeout=60, clock=lambda: now[0])
    old.step("a", samples(1, 0)[0], seq=1)
    now[0] += 50.0
    old.step("b", samples(1, 0)[0], seq=1)
    now[0] += 5.0  # "a" idle for 55 s, "b" for 5 s
    old.snapshot(tmp_path / "snap.bin")
    now[0] = 3.0  # another boot, another clock
    new = load(idle_timeout=60, clock=lambda: now[0])
    new.restore(tmp_path / "snap.bin")
    assert new.store.idle(60) == []
    now[0] += 6.0
    assert new.store.idle(60) == ["a"]
    now[0] += 50.0
    assert new.store.idle(60) == ["a", "b"]


def test_a_snapshot_that_does_not_say_how_long_streams_were_idle_restores_them_as_just_seen(
    load, tmp_path
):
    """One written before snapshots kept idle time: its streams count from the restore."""
    now = [0.0]
    old = load(idle_timeout=60, clock=lambda: now[0])
    old.step("a", samples(1, 0)[0], seq=1)
    now[0] = 59.0
    old.snapshot(tmp_path / "snap.bin")
    snap = fmt.read(tmp_path / "snap.bin")
    snap.idle = None
    fmt.write_atomic(tmp_path / "snap.bin", fmt.encode(snap))
    new = load(idle_timeout=60, clock=lambda: now[0])
    new.restore(tmp_path / "snap.bin")
    now[0] = 118.0
    assert new.store.idle(60) == []
    now[0] = 119.0
    assert new.store.idle(60) == ["a"]


@pytest.mark.parametrize(
    "values, message",
    [
        ([1.0] * 5, r"shape \(5,\), expected \[6\]"),
        (np.ones((2, 2, 6)), "shape"),
        ([1.0, 2.0, float("nan"), 0, 0, 0], "NaN or Inf"),
        ([1.0, 2.0, float("inf"), 0, 0, 0], "NaN or Inf"),
        (["a", "b", "c", "d", "e", "f"], "not numeric"),
        (np.ones((0, 6)), "no samples in the chunk"),
        ([10**400, 0, 0, 0, 0, 0], r"beyond the float32 range \(max \|x\| ~1e400\)"),
        ([1 + 2j, 0, 0, 0, 0, 0], r"value \(1\+2j\) is complex"),
        (np.array([0, 3j, 0, 0, 0, 0]), r"value 3j is complex"),
        ([np.complex128(2j), 0.0, 0, 0, 0, 0], r"value 2j is complex"),
        # were taken as counts of seconds since 1970, and the data under the mask as measured
        (np.arange(6).astype("datetime64[s]"), r"values are times \(datetime64\[s\]\)"),
        (np.arange(6).astype("timedelta64[ms]"), r"values are times \(timedelta64\[ms\]\)"),
        (np.ma.masked_array(np.ones(6), mask=[1, 0, 0, 0, 0, 0]), "masked \\(missing\\)"),
    ],
)
def test_invalid_samples_are_refused_and_change_nothing(load, values, message):
    engine = load()
    engine.step("s", samples(3, 0), seq=10)
    before = engine.state_of("s")
    with pytest.raises(edge.InvalidSample, match=message) as err:
        engine.step("s", values, seq=13)
    assert err.value.stream_id == "s" and err.value.seq == 13 and "stream 's'" in str(err.value)
    assert engine.last_seq("s") == 12
    assert all(np.array_equal(a, b) for a, b in zip(before, engine.state_of("s")))


@pytest.mark.parametrize(
    "values",
    [
        np.array([0, 3j, 0, 0, 0, 0]),
        [10**400, 0, 0, 0, 0, 0],
        np.ma.masked_array(np.ones(6), mask=[0, 0, 1, 0, 0, 0]),
        np.zeros(6, "datetime64[s]"),
    ],
    ids=["complex", "huge", "masked", "times"],
)
def test_a_value_past_float_or_complex_continuing_a_stream_is_refused(load, values):
    """A known stream's next sample goes the quick way: it refuses the same values."""
    engine = load()
    engine.step("s", samples(1, 0)[0], seq=1)
    before = engine.state_of("s")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not cast with a warning: refused
        with pytest.raises(edge.InvalidSample, match="complex|float32 range|masked|times"):
            engine.step("s", values, seq=2)
    assert engine.last_seq("s") == 1
    assert all(np.array_equal(a, b) for a, b in zip(before, engine.state_of("s")))


def test_every_error_of_the_hierarchy_can_be_caught_by_its_name_from_edge(load):
    """``edge.StaleSample`` (what ``step`` raises for an earlier boot) and ``StateMismatch``
    (what ``restore`` raises for another model) were not exported: ``except edge.StaleSample``
    raised AttributeError while handling the refusal."""
    import edge.errors

    hierarchy = {
        name
        for name, obj in vars(edge.errors).items()
        if isinstance(obj, type) and issubclass(obj, edge.errors.EdgeError)
    }
    assert hierarchy <= set(edge.__all__)
    engine = load()
    engine.step("s", samples(1, 0)[0], seq=1, boot=5)
    engine.step("s", samples(1, 1)[0], seq=1, boot=6)
    with pytest.raises(edge.StaleSample):
        engine.step("s", samples(1, 2)[0], seq=2, boot=5)


@pytest.mark.parametrize("stream", [["s"], {"s": 1}, 5, None], ids=str)
def test_asking_about_an_id_no_stream_can_have_answers_none(load, stream):
    """An unhashable id (a list) raised TypeError from the lookup of ``state_of``,
    ``last_seq`` and ``boots``; an int answered None."""
    engine = load()
    engine.step("s", samples(1, 0)[0], seq=1, boot=3)
    assert engine.state_of(stream) is None and engine.last_seq(stream) is None
    assert engine.boots(stream) == (None, [])
    assert engine.last_seq("s") == 1 and engine.boots("s") == (3, [])


class _NoArray:
    """Like a torch tensor that requires grad: its ``__array__`` raises RuntimeError."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad")


class _NoFloat:
    def __float__(self):
        raise ZeroDivisionError("no float for this one")


@pytest.mark.parametrize(
    "values", [_NoArray(), [_NoFloat()] * 6], ids=["array-raises", "float-raises"]
)
def test_values_whose_conversion_raises_any_error_are_refused_as_invalid_samples(load, values):
    """A torch tensor that requires grad raises RuntimeError from ``np.asarray``: it escaped
    from ``step``, ``step_batch`` and ``step_many``, where it stopped the whole batch."""
    engine = load()
    engine.step("s", samples(1, 0)[0], seq=1)
    for seq in (2, None):  # the quick way of a stream's next sample, and the general one
        with pytest.raises(edge.InvalidSample, match="values are not numeric: .*(grad|no float)"):
            engine.step("s", values, seq=seq)
        with pytest.raises(edge.InvalidSample, match="values are not numeric"):
            engine.step_batch(["s"], values, seqs=None if seq is None else [seq])
    bad, good = engine.step_many([Chunk("s", values, 2), Chunk("t", samples(1, 1), 1)])
    assert isinstance(bad.error, edge.InvalidSample) and good.error is None and len(good.y) == 1
    assert engine.last_seq("s") == 1


def test_a_long_value_that_is_not_a_number_is_cut_in_the_refusal(load):
    """NumPy's words for a string it cannot convert hold the whole string: a 1 MB value made
    a 1 MB refusal (and log line). It is cut like every other repeated value now."""
    engine = load()
    values = ["x" * 1_000_000] + [0.0] * 5
    with pytest.raises(edge.InvalidSample, match="values are not numeric") as err:
        engine.step("s", values, seq=1)
    assert "chars)" in str(err.value) and len(str(err.value)) < 400
    (bad,) = engine.step_many([Chunk("s", values, 1)])
    assert len(str(bad.error)) < 400
    assert engine.last_seq("s") is None


def test_one_bad_chunk_does_not_stop_the_others(load):
    engine = load()
    outs = engine.step_many(
        [Chunk("good", samples(2, 0), 1), Chunk("bad", [1.0], 1), Chunk("good", samples(1, 1), 3)]
    )
    assert outs[1].error is not None and outs[1].error.code == "invalid_sample"
    assert len(outs[0].y) == 2 and len(outs[2].y) == 1 and engine.state_of("bad") is None


def test_a_value_past_float_in_one_chunk_does_not_stop_the_others(load):
    engine = load()
    outs = engine.step_many(
        [Chunk("good", samples(1, 0)[0], 1), Chunk("huge", [10**400, 0, 0, 0, 0, 0], 1)]
    )
    assert outs[0].error is None and len(outs[0].y) == 1 and engine.last_seq("good") == 1
    assert isinstance(outs[1].error, edge.InvalidSample) and "1e400" in str(outs[1].error)
    assert outs[1].seq == 1 and engine.state_of("huge") is None


@pytest.mark.parametrize(
    "args, message",
    [
        ((None, {}), "invalid stream id None"),
        (("", {"next_seq": 1}), "invalid stream id ''"),
        ((["s"], {}), r"invalid stream id \['s'\]"),
        (("s", {"next_seq": 2**32}), "next_seq 4294967296 is not an unsigned 32-bit"),
        (("s", {"next_seq": -1}), "next_seq -1 is not"),
        (("s", {"next_seq": 1.5}), "next_seq 1.5 is not"),
        (("s", {"next_seq": "7"}), "next_seq '7' is not"),
        (("s", {"next_seq": True}), "next_seq True is not"),
        (("s", {"boot": -5}), "boot -5 is not"),
        (("s", {"boot": 2**40}), "boot 1099511627776 is not"),
        (("s", {"next_seq": 3, "boot": 2.0}), r"boot 2\.0 is not"),
        (("new", {"next_seq": 2**32}), "next_seq 4294967296 is not"),
    ],
)
def test_reset_refuses_what_step_refuses_and_changes_nothing(load, args, message):
    engine = load()
    engine.step("s", samples(1, 0)[0], seq=5, boot=2)
    before = engine.state_of("s")
    stream, kw = args
    with pytest.raises(edge.InvalidSample, match=message):
        engine.reset(stream, **kw)
    assert engine.last_seq("s") == 5 and engine.boots("s") == (2, [])
    assert all(np.array_equal(a, b) for a, b in zip(before, engine.state_of("s")))
    assert engine.stats()["streams"] == 1 and engine.counters.resets == 0


def test_refusals_repeat_a_100000_character_value_cut_short(load):
    """A stream id, seq or option of 100,000 characters was repeated in full in the refusal
    (on ``errors/{stream}``, in the log): each is now cut to 80 characters with its length."""
    engine = load()
    huge = "x" * 100_000
    said = [
        str(engine.step_many([Chunk(huge, samples(1, 0)[0], 1)])[0].error),
        str(engine.step_many([Chunk(huge + "\n", samples(1, 0)[0], huge)])[0].error),
        str(engine.step_many([Chunk("s", samples(1, 0)[0], huge)])[0].error),
        str(engine.step_many([Chunk("s", samples(1, 0)[0], 10**5000)])[0].error),
    ]
    for call in (
        lambda: engine.reset(huge),
        lambda: engine.reset("s", next_seq=huge),
        lambda: load(gap_policy=huge),
    ):
        with pytest.raises(edge.EdgeError) as refused:
            call()
        said.append(str(refused.value))
    for line in said:
        assert len(line) < 400 and ("(100002 chars)" in line or "-digit integer>" in line), line[
            :200
        ]


def test_reset_takes_numpy_integers(load):
    engine = load()
    engine.reset("s", next_seq=np.uint32(7), boot=np.int64(3))
    assert engine.last_seq("s") == 6 and engine.boots("s") == (3, [])


def test_gap_policies(load):
    x = samples(1, 0)[0]
    cont = load()
    cont.step("s", x, seq=1)
    out = cont.step_many([Chunk("s", x, seq=5)])[0]
    assert out.gap == 3 and len(out.y) == 1

    reset = load(gap_policy="reset")
    reset.step("s", x, seq=1)
    y = reset.step("s", x, seq=5)
    np.testing.assert_array_equal(y, load().step("t", x))

    reject = load(gap_policy="reject")
    reject.step("s", x, seq=1)
    with pytest.raises(edge.SequenceGap, match="3 sample"):
        reject.step("s", x, seq=5)
    assert reject.last_seq("s") == 1

    with pytest.raises(edge.ConfigError, match="'sometimes'"):
        load(gap_policy="sometimes")


@pytest.mark.parametrize(
    "option",
    [
        {"idle_timeout": float("nan")},  # accepted, it forgot every stream at every call
        {"idle_timeout": True},
        {"capacity": float("nan")},
        {"capacity": 2.5},
        {"capacity": "100"},
        {"restart_gap": 2.5},
        {"restart_gap": True},
        {"allow_unsequenced": "no"},  # accepted, and unsequenced samples were allowed
        {"max_batch": 1.5},
        {"num_threads": 0},  # refused by the interpreter as a model it "could not open"
        {"num_threads": True},  # accepted as 1
        {"num_threads": 2**31},  # refused as a model it could not open
        {"builtin_kernels": "no"},  # accepted, and the built-in kernels were switched on
        {"self_test": "no"},
    ],
    ids=str,
)
def test_engine_options_of_no_valid_value_are_refused_naming_it(load, option):
    ((name, value),) = option.items()
    with pytest.raises(edge.ConfigError, match=f"^{name} must be .*{value!r}"):
        load(**option)


def test_an_idle_timeout_keeps_the_state_of_a_stream_that_is_not_idle(load):
    x = samples(3, 1)
    engine, plain = load(idle_timeout=3600), load()
    np.testing.assert_array_equal(
        [engine.step("s", v, seq=i + 1) for i, v in enumerate(x)],
        [plain.step("s", v, seq=i + 1) for i, v in enumerate(x)],
    )
    assert engine.stats()["evicted_idle"] == 0


@pytest.mark.parametrize("last, seq", [(2**32 - 1, 2**32), (2**32 - 2, -1), (5, 6 - 2**32)])
def test_step_refuses_a_seq_out_of_range_that_is_next_modulo_2_32(load, last, seq):
    """``step``'s quick path for the next sample of a stream compared seqs modulo 2**32 only:
    2**32 after 2**32 - 1 was applied and kept as the stream's last seq, so the real next one,
    0, was dropped as a duplicate; -1 (the 'no seq' mark) made the stream unsequenced."""
    x = samples(2, 4)
    engine, twin = load(), load()
    for e in (engine, twin):
        e.step("s", x[0], seq=last)
    with pytest.raises(edge.InvalidSample, match=f"seq {seq} is not an unsigned 32-bit"):
        engine.step("s", x[1], seq=seq)
    assert engine.last_seq("s") == last
    nxt = (last + 1) % 2**32
    np.testing.assert_array_equal(engine.step("s", x[1], seq=nxt), twin.step("s", x[1], seq=nxt))


def test_a_chunk_overlapping_what_was_applied_answers_its_last_samples_only(load):
    """As README and ``step`` say: y aligns with the end of x, not its start."""
    x = samples(8, 5)
    engine, plain = load(), load()
    want = plain.step("s", x, seq=1)
    engine.step("s", x[:5], seq=1)
    y = engine.step("s", x[3:], seq=4)  # seqs 4 and 5 again, then 6..8
    assert len(y) == 3
    np.testing.assert_array_equal(y, want[5:])
    assert len(engine.step("s", x[6:], seq=7)) == 0
    with pytest.raises(edge.DuplicateSample):
        engine.step("s", x[7], seq=8)


def test_a_value_the_normalised_float_input_cannot_hold_is_refused_not_poisoning_the_state(
    load,
):
    """cnn-gru-float32 normalises feature 1 with std 0.35: 3e38 (a float32) became inf in
    the model's input, the answer NaN, and the stream's state NaN for every later sample."""
    x = np.zeros((2, 3))
    x[1, 1] = 3e38
    engine, ref = load("cnn-gru-float32"), load("cnn-gru-float32")
    ref.step("s", x[0], seq=1)
    engine.step("s", x[0], seq=1)
    with pytest.raises(edge.InvalidSample, match="value 3e\\+38 of feature 1 is past"):
        engine.step("s", x[1], seq=2)  # the quick path of a stream's next sample
    out = engine.step_many([Chunk("s", x, 2), Chunk("t", x[0], 1)])
    assert "feature 1 is past" in str(out[0].error) and len(out[1].y) == 1
    batch = engine.step_batch(["s", "t"], x, seqs=[2, 2])  # the steady batch
    assert list(batch.errors) == [1] and len(batch.y_of(0)) == 1
    assert engine.last_seq("s") == 2
    ref.step("s", x[0], seq=2)  # what the steady batch applied to "s"
    np.testing.assert_array_equal(engine.step("s", x[0], seq=3), ref.step("s", x[0], seq=3))
    assert all(np.isfinite(a).all() for a in engine.state_of("s"))
    # 3e38 passes that check for a feature whose std (16) takes it into range; whether the
    # model's own arithmetic then overflows depends on its weights and kernels: refused if it
    # does, the state kept either way
    assert_refused_exactly_on_overflow(engine, ref, "s", np.array([3e38, 0, 0]), seq=4)


def same(a: list[np.ndarray] | None, b: list[np.ndarray] | None) -> bool:
    """Whether two ``state_of`` answers are equal, bit for bit (both None: no stream)."""
    if a is None or b is None:
        return a is b
    return all(np.array_equal(x, y) for x, y in zip(a, b))


FLOAT_MODES = ["clf-float32", "clf-float16", "cnn-gru-float32"]
# Bundles of a model made to overflow (``build_bundles.make_overflowing``) on feature 0 at
# OVERFLOW, inside their input checks: ai-edge-litert's XNNPACK kernels compute inf - inf
# (NaN), tflite-runtime 2.14's builtin kernels clamp to the largest float instead.
OVERFLOW_MODES = ["overflow-float32", "overflow-float16"]
OVERFLOW = 3e38
# The tests of each path need a step that overflows: the desktop interpreter's kernels.
XNNPACK = pytest.mark.desktop


def overflows(ref: edge.Engine, stream: str, x: np.ndarray) -> bool:
    """Whether the model itself, with no engine checks, steps ``ref``'s stream on one sample
    to an answer or state that is not finite."""
    model = ref.model
    state = ref.state_of(stream)
    states = model.zero_state() if state is None else [a.reshape(1, -1) for a in state]
    y, new = model.invoke(model.encode_x(x.reshape(1, -1)), states)
    return not all(np.isfinite(a).all() for a in [y, *new])


def assert_refused_exactly_on_overflow(
    engine: edge.Engine, ref: edge.Engine, stream: str, x: np.ndarray, seq: int
) -> None:
    """``engine`` and ``ref`` hold the same state: a sample the model overflows on is refused
    with the state kept, any other answered as ``ref`` answers it; the state stays finite."""
    if overflows(ref, stream, x):
        with pytest.raises(edge.InvalidSample, match="overflowed on this sample") as info:
            engine.step(stream, x, seq=seq)
        assert info.value.stream_id == stream and info.value.seq == seq
        assert engine.last_seq(stream) == ref.last_seq(stream)
    else:
        np.testing.assert_array_equal(engine.step(stream, x, seq=seq), ref.step(stream, x, seq))
    assert same(engine.state_of(stream), ref.state_of(stream))
    assert all(np.isfinite(a).all() for a in engine.state_of(stream) or [])


@pytest.mark.parametrize("name", FLOAT_MODES + OVERFLOW_MODES)
def test_a_float_step_is_refused_exactly_when_the_model_overflows(load, name):
    """Both interpreters: values past what the arithmetic holds, through the quick path of a
    stream's next sample, the steady batch and the general path."""
    engine, ref = load(name), load(name)
    f = engine.manifest.features
    x0 = samples(1, 0, f)[0]
    engine.step("s", x0, seq=1)
    ref.step("s", x0, seq=1)
    for value in [1e30, -1e30, OVERFLOW, -OVERFLOW, 1e20]:  # inside the input checks
        x = x0.copy()
        x[0] = value
        assert_refused_exactly_on_overflow(engine, ref, "s", x, ref.last_seq("s") + 1)


def overflowing(n: int, at: int, seed: int, f: int) -> np.ndarray:
    """n samples, the one at ``at`` with a value the float model overflows on."""
    x = samples(n, seed, f)
    x[at, 0] = OVERFLOW
    return x


@XNNPACK
@pytest.mark.parametrize("name", OVERFLOW_MODES)
def test_a_sample_a_float_model_overflows_on_is_refused_and_the_state_kept(load, name):
    """inf - inf inside the model: the answer and the new state were NaN, and every later
    sample of the stream was answered NaN (the NaN state also went into snapshots)."""
    engine, ref = load(name), load(name)
    f = engine.manifest.features
    x = overflowing(3, 1, 0, f)
    np.testing.assert_array_equal(engine.step("s", x[0], seq=1), ref.step("s", x[0], seq=1))
    with pytest.raises(edge.InvalidSample, match="overflowed on this sample") as info:
        engine.step("s", x[1], seq=2)  # the quick path of a stream's next sample
    assert info.value.stream_id == "s" and info.value.seq == 2
    assert engine.last_seq("s") == 1 and same(engine.state_of("s"), ref.state_of("s"))
    np.testing.assert_array_equal(engine.step("s", x[2], seq=2), ref.step("s", x[2], seq=2))
    with pytest.raises(edge.InvalidSample, match="values too large for the model"):
        engine.step("new", x[1])  # the general path: a new stream gets no state
    assert engine.state_of("new") is None and engine.counters.rejected == 2


@XNNPACK
def test_an_evicted_stream_whose_return_a_float_model_overflows_on_keeps_its_numbering(load):
    """A stream back from eviction whose first sample is refused keeps the numbering it
    came back with: what it was answered for before is still a duplicate."""
    engine = load("overflow-float32")
    x = overflowing(4, 1, 0, 3)
    engine.step("s", x[0], seq=1)
    engine.store.evict(["s"])
    with pytest.raises(edge.InvalidSample, match="overflowed on this sample"):
        engine.step("s", x[1], seq=2)
    with pytest.raises(edge.DuplicateSample):
        engine.step("s", x[2], seq=1)
    assert np.isfinite(engine.step("s", x[2], seq=2)).all() and engine.last_seq("s") == 2


@XNNPACK
def test_a_chunk_a_float_model_overflows_on_in_its_middle_is_refused_whole(load):
    """As a chunk with a NaN in its middle: refused whole, naming the sample, nothing applied."""
    engine, ref = load("overflow-float32"), load("overflow-float32")
    x = overflowing(5, 2, 1, 3)
    engine.step("s", x[:2], seq=1)
    ref.step("s", x[:2], seq=1)
    with pytest.raises(edge.InvalidSample, match=r"sample 2 of the chunk \(seq 5\)") as info:
        engine.step("s", x, seq=3)
    assert info.value.seq == 3 and engine.last_seq("s") == 2
    assert same(engine.state_of("s"), ref.state_of("s"))
    nan = x.copy()
    nan[2, 0] = np.nan
    with pytest.raises(edge.InvalidSample, match="NaN"):
        engine.step("s", nan, seq=3)
    assert engine.last_seq("s") == 2 and same(engine.state_of("s"), ref.state_of("s"))
    good = samples(5, 2, 3)
    np.testing.assert_array_equal(engine.step("s", good, seq=3), ref.step("s", good, seq=3))


@XNNPACK
def test_step_many_refuses_only_the_chunks_a_float_model_overflows_on(load):
    """A stream's later chunk in the same call goes on from the state before its refused one."""
    engine, ref = load("overflow-float32"), load("overflow-float32")
    x, big = samples(4, 3, 3), overflowing(3, 1, 4, 3)
    chunks = [
        Chunk("a", x[:2], 1),
        Chunk("b", big[1], 1),
        Chunk("c", x[2:]),
        Chunk("a", big, 3),
        Chunk("a", x[2:], 3),
    ]
    out = engine.step_many(chunks)
    assert [o.error is None for o in out] == [True, False, True, False, True]
    assert "overflowed on this sample" in str(out[1].error) and out[1].seq == 1
    assert "sample 1 of the chunk (seq 4)" in str(out[3].error)
    for o, c in zip(out, chunks):
        if o.error is None:
            np.testing.assert_array_equal(o.y, ref.step(c.stream, c.values, seq=c.seq))
    assert engine.state_of("b") is None and engine.last_seq("a") == 4
    assert all(same(engine.state_of(s), ref.state_of(s)) for s in "ac")
    assert engine.counters.rejected == 2 and engine.counters.samples == ref.counters.samples


@pytest.mark.parametrize("name", ["clf-int8", "clf-int16x8", "cnn-gru-int8"])
def test_integer_quantised_outputs_are_not_checked_for_overflow(load, name):
    """Their tensors cannot hold inf or NaN: the check costs them nothing."""
    engine = load(name)
    assert float_outputs(engine.model) == []
    x = np.zeros(engine.manifest.features)
    x[0] = 1e30
    assert np.isfinite(engine.step("s", x)).all()  # the quantised input saturates


def test_unsequenced_samples_only_when_allowed(load):
    assert load().step("s", samples(1, 0)[0]).shape == (4,)
    with pytest.raises(edge.MissingSeq):
        load(allow_unsequenced=False).step("s", samples(1, 0)[0])


def test_seq_wraps_around(load):
    x = samples(4, 0)
    engine = load()
    y = engine.step("s", x, seq=2**32 - 2)
    assert engine.last_seq("s") == 1
    np.testing.assert_array_equal(y, load().step("s", x))
    with pytest.raises(edge.DuplicateSample):
        engine.step("s", x[0], seq=2**32 - 1)


def test_restore_refuses_another_model(load, tmp_path):
    a = load("clf-int8")
    a.step("s", samples(2, 0), seq=1)
    a.snapshot(tmp_path / "a.bin")
    other = load("clf-float32")
    with pytest.raises(edge.SnapshotError, match="taken with model"):
        other.restore(tmp_path / "a.bin")
    other.step("keep", samples(1, 0)[0])
    other.restore(tmp_path / "a.bin", fresh_on_mismatch=True)
    assert other.stats()["streams"] == 0


def test_a_snapshot_that_cannot_be_written_is_a_snapshot_error_naming_the_path(load, tmp_path):
    engine = load("clf-int8")
    engine.step("s", samples(2, 0), seq=1)
    (tmp_path / "taken").mkdir()
    for bad in (tmp_path / "taken", tmp_path / "missing" / "x.bin"):
        with pytest.raises(edge.SnapshotError, match=f"{bad}: cannot write snapshot"):
            engine.snapshot(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary left
    assert list((tmp_path / "taken").iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        # written, then refused by every restore: the engine's table of evicted streams
        ({"departed": "my note"}, "extra key 'departed' is the engine's own"),
        # taken for the engine's list of recalled streams, and gone from restore's answer
        ({"recalled": ["s"]}, "extra key 'recalled' is the engine's own"),
        ({"when": float("nan")}, "extra is not plain JSON"),
        ({"what": object()}, "extra is not plain JSON"),
        # written as "1": restore gave back another dict
        ({1: "one"}, "extra must be a dict with string keys"),
        # dict() of them raised a bare TypeError or ValueError
        ([("a", 1)], "extra must be a dict with string keys"),
        ("ab", "extra must be a dict with string keys"),
    ],
    ids=["departed", "recalled", "nan", "object", "int-key", "list", "str"],
)
def test_a_snapshot_extra_that_restore_cannot_give_back_is_refused(load, tmp_path, extra, message):
    engine = load()
    engine.step("s", samples(2, 0), seq=1)
    path = tmp_path / "state.bin"
    with pytest.raises(edge.SnapshotError, match=f"{path}: {message}.*Nothing written"):
        engine.snapshot(path, extra=extra)
    assert list(tmp_path.iterdir()) == []
    engine.snapshot(path, extra={"note": "mine"})
    assert load().restore(path) == {"note": "mine"}


def test_a_snapshot_path_holding_a_nul_is_a_snapshot_error_both_ways(load, tmp_path):
    """The write and the read raised a bare ValueError ("embedded null byte")."""
    engine = load()
    engine.step("s", samples(1, 0))
    path = f"{tmp_path}/state\x00.bin"
    with pytest.raises(edge.SnapshotError, match=r"holds a NUL character. Nothing written"):
        engine.snapshot(path)
    with pytest.raises(edge.SnapshotError, match=r"cannot read snapshot: embedded null byte"):
        engine.restore(path)
    assert list(tmp_path.iterdir()) == []


def test_engines_that_carried_streams_over_keep_their_own_numbering(load):
    """``load_state_from`` shared the table of evicted streams: a stream back in one engine was
    forgotten by the other, which then stepped a sample it had applied a second time."""
    x = samples(4, 3)
    a = load(capacity=2)
    for s in ("s1", "s2", "s3"):  # s1 evicted, its numbering kept
        a.step(s, x[:3], seq=1)
    b = load(capacity=2)
    b.load_state_from(a)
    assert b.step_many([Chunk("s1", x[3], 4)])[0].restart
    again = a.step_many([Chunk("s1", x[1], 2)])[0]
    assert (again.duplicates, len(again.y)) == (1, 0)
    # a smaller capacity keeps the most recent streams, the others evicted as by restore
    c = load(capacity=1)
    c.load_state_from(a)
    assert a.store.streams == ["s3", "s1"] and c.store.streams == ["s1"]
    again = c.step_many([Chunk("s3", x[1], 2)])[0]
    assert (again.duplicates, len(again.y)) == (1, 0)


def test_restore_may_accept_another_model_with_the_same_layout(load, bundles, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(bundles / "clf-int8", other)
    m = json.loads((other / "manifest.json").read_text())
    m["source_name"] = "retrained"  # a different bundle...
    data = bytearray((other / "model.tflite").read_bytes())
    data += b"\0" * 8  # ...with a different sha256 and the same state layout
    (other / "model.tflite").write_bytes(bytes(data))
    import hashlib

    m["tflite_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (other / "manifest.json").write_text(json.dumps(m))
    a = load("clf-int8")
    a.step("s", samples(3, 0), seq=1)
    a.snapshot(tmp_path / "a.bin")
    b = edge.load(other)
    with pytest.raises(edge.SnapshotError, match="taken with model"):
        b.restore(tmp_path / "a.bin")
    b.restore(tmp_path / "a.bin", other_model_ok=True)
    assert b.last_seq("s") == 3 and states_equal(a, b, "s")


@pytest.mark.parametrize("cut", [0, 1, 4, 17])
def test_a_convolution_buffer_is_state_like_h(load, tmp_path, cut):
    """A causal Conv1D's past inputs are a state tensor: carried, snapshotted, restored, reset."""
    name = "cnn-gru-int8"
    m = load(name).manifest
    assert [(s.input, s.role, s.cell) for s in m.states] == [
        ("buf0", "buffer", "conv1d"),
        ("h0", "h", "gru"),
    ]
    x = samples(25, cut, m.features)
    straight = load(name)
    y_straight = straight.step("s", x, seq=1)
    first = load(name)
    if cut:
        first.step("s", x[:cut], seq=1)
    first.snapshot(tmp_path / "snap.bin")
    second = load(name)
    second.restore(tmp_path / "snap.bin")
    np.testing.assert_array_equal(second.step("s", x[cut:], seq=1 + cut), y_straight[cut:])
    assert states_equal(second, straight, "s")
    second.reset("s")
    np.testing.assert_array_equal(second.step("s", x[:5], seq=100), y_straight[:5])


def test_a_bundle_of_the_same_tflite_with_another_normalisation_is_another_model(
    load, bundles, tmp_path
):
    """The model id and the model a snapshot names were the .tflite's digest alone: a bundle
    of the same file with another input normalisation (or other labels) answers otherwise,
    yet published the same ``model`` id, and a strict ``restore`` took the other's snapshot
    as its own. Both now cover the manifest fields that change the answers."""
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(bundles / "clf-int8", other)
    m = json.loads((other / "manifest.json").read_text())
    m["input_normalization"]["mean"] = [v + 1.0 for v in m["input_normalization"]["mean"]]
    (other / "manifest.json").write_text(json.dumps(m))
    relabelled = tmp_path / "relabelled"
    shutil.copytree(bundles / "clf-int8", relabelled)
    m = json.loads((relabelled / "manifest.json").read_text())
    m["output"]["labels"] = list(reversed(m["output"]["labels"]))
    m["fidelity"] = {**m["fidelity"], "note": "verified again"}  # describes, changes nothing
    (relabelled / "manifest.json").write_text(json.dumps(m))
    a, b, c = load("clf-int8"), edge.load(other), edge.load(relabelled)
    assert a.manifest.tflite_sha256 == b.manifest.tflite_sha256 == c.manifest.tflite_sha256
    x = samples(3, 0)
    assert not np.array_equal(a.step("s", x, seq=1), b.step("s", x, seq=1))
    assert len({a.manifest.model_id, b.manifest.model_id, c.manifest.model_id}) == 3
    a.snapshot(tmp_path / "a.bin")
    with pytest.raises(edge.StateMismatch, match=f"this engine runs {b.manifest.model_id}"):
        edge.load(other).restore(tmp_path / "a.bin")
    again = load("clf-int8")
    again.restore(tmp_path / "a.bin")  # its own model's snapshot
    assert states_equal(a, again, "s")
    same = tmp_path / "same"  # a manifest changed only where it describes: the same model
    shutil.copytree(bundles / "clf-int8", same)
    m = json.loads((same / "manifest.json").read_text())
    m["interpreters"] = {**m["interpreters"], "note": "x"}
    m["quantization_choice"] = "int8: the smallest that passed"
    (same / "manifest.json").write_text(json.dumps(m))
    assert edge.load(same).manifest.model_id == a.manifest.model_id
    edge.load(same).restore(tmp_path / "a.bin")


@pytest.mark.parametrize(
    "model",
    [
        # tflite-runtime 2.14 crashed (SIGSEGV) on such bytes
        "garbage",
        "reg2-int8",
    ],
)
def test_a_model_the_interpreter_or_the_manifest_refuses_is_named(bundles, tmp_path, model):
    """A bundle whose .tflite matches its manifest's sha256 but cannot be opened (a model of
    ops this interpreter lacks, bytes that are no model) or is not the model the manifest
    describes: the error named neither the bundle nor the file (`litert could not open the
    model: The model is not a valid Flatbuffer buffer`), and a `reload` of the bundle at
    `model` said only that in its status and log."""
    import hashlib
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(bundles / "clf-int8", bundle)
    if model == "garbage":  # past the file identifier every .tflite has (checked before)
        data = np.random.default_rng(0).bytes(4) + b"TFL3" + np.random.default_rng(0).bytes(50_000)
    else:
        data = (bundles / model / "model.tflite").read_bytes()
    (bundle / "model.tflite").write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    m["tflite_sha256"] = hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(edge.EdgeError) as err:
        edge.load(bundle)
    assert str(err.value).startswith(f"{bundle / 'model.tflite'}: "), err.value
    # garbage: refused by edge.tflite_check before an interpreter reads it
    assert ("not a sound TFLite model" if model == "garbage" else "manifest says") in str(err.value)

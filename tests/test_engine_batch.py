"""The array path of the engine (``step_batch``), chunks of any length, and the tensor binding,
against real bundles in a real interpreter (runs in both environments)."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import edge
from edge import Chunk
from edge.binding import TensorBinding
from edge.state_store import NO_BOOT, NO_SEQ

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
QUANTIZED = ["clf-int8", "reg2-int8", "cnn-gru-int8"]


def samples(n: int, seed: int, f: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (n, f))


def same_state(a: edge.Engine, b: edge.Engine, stream: str) -> bool:
    sa, sb = a.state_of(stream), b.state_of(stream)
    if sa is None or sb is None:
        return sa is sb
    return all(np.array_equal(x, y) for x, y in zip(sa, sb))


@pytest.fixture
def load(bundles):
    def _load(name: str = "clf-int8", **kw) -> edge.Engine:
        return edge.load(bundles / name, **kw)

    return _load


# Messages of a few streams: (stream, k samples, seq offset from the stream's next seq, boot).
# Offsets below 0 replay samples already applied, above 0 skip some; boots change rarely.
MESSAGES = st.lists(
    st.tuples(
        st.integers(0, 4),
        st.integers(1, 5),
        st.sampled_from([0, 0, 0, 0, 1, 3, -1, -3]),
        st.sampled_from([None, None, None, 7, 8]),
    ),
    min_size=1,
    max_size=24,
)


def as_chunks(messages, seed: int, f: int) -> list[Chunk]:
    nxt = [1, 4, 1, 4, 1]  # s1 and s3 have had seqs 1..3
    out = []
    for i, (s, k, offset, boot) in enumerate(messages):
        seq = max(0, nxt[s] + offset)
        out.append(Chunk(f"s{s}", samples(k, seed + i, f), seq, boot))
        nxt[s] = max(nxt[s], seq + k)
    return out


@SETTINGS
@given(messages=MESSAGES, seed=st.integers(0, 999), name=st.sampled_from(QUANTIZED))
def test_a_batch_as_arrays_equals_its_chunks_one_call_each(load, messages, seed, name):
    """One ``step_batch`` call over many messages (streams repeated, replays, gaps, boots)
    gives exactly what the same messages give one call at a time."""
    batched, single = load(name, max_batch=4), load(name)
    f = batched.manifest.features
    warm = [Chunk(f"s{s}", samples(3, seed + 100 + s, f), 1, 7) for s in (1, 3)]
    for engine in (batched, single):  # two streams run already: replays of them come first
        engine.step_many(warm)
    chunks = as_chunks(messages, seed, f)
    got = batched.step_batch(
        [c.stream for c in chunks],
        np.concatenate([c.values for c in chunks]),
        counts=[len(c.values) for c in chunks],
        seqs=[c.seq for c in chunks],
        boots=[NO_BOOT if c.boot is None else c.boot for c in chunks],
    )
    for i, c in enumerate(chunks):
        (want,) = single.step_many([c])
        have = got.outcome(i)
        np.testing.assert_array_equal(have.y, want.y)
        assert (have.seq, have.duplicates, have.gap, have.late, have.reset, have.restart) == (
            want.seq,
            want.duplicates,
            want.gap,
            want.late,
            want.reset,
            want.restart,
        )
        assert type(have.error) is type(want.error)
    for s in {c.stream for c in chunks}:
        assert same_state(batched, single, s)
        assert batched.last_seq(s) == single.last_seq(s) and batched.boots(s) == single.boots(s)
    assert batched.counters.steps == single.counters.steps


@SETTINGS
@given(
    n=st.integers(1, 70),
    seed=st.integers(0, 999),
    gap_policy=st.sampled_from(["continue", "reset"]),
)
def test_one_sample_per_stream_equals_each_stream_alone(load, n, seed, gap_policy):
    """The service's common batch (every stream once, one sample each, some streams new, some
    skipping seqs) in one invoke, against each stream stepped alone."""
    batched, alone = load(gap_policy=gap_policy), load(gap_policy=gap_policy)
    rng = np.random.default_rng(seed)
    streams = [f"d{i}" for i in range(n)]
    warm = rng.random(n) < 0.7  # these already run; the rest start in the batch
    for s, w in zip(streams, warm):
        if w:
            x0 = samples(1, seed)[0]
            batched.step(s, x0, seq=10)
            alone.step(s, x0, seq=10)
    seqs = np.where(rng.random(n) < 0.8, 11, 11 + rng.integers(1, 4, n))
    x = samples(n, seed + 1)
    got = batched.step_batch(streams, x, seqs=seqs)
    assert batched.counters.invokes == alone.counters.invokes + 1
    for i, s in enumerate(streams):
        (want,) = alone.step_many([Chunk(s, x[i], int(seqs[i]))])
        np.testing.assert_array_equal(got.y_of(i), want.y)
        assert got.outcome(i).gap == want.gap and got.outcome(i).reset == want.reset
        assert same_state(batched, alone, s) and batched.last_seq(s) == alone.last_seq(s)


def test_a_sample_in_a_gap_the_stream_has_forgotten_is_a_duplicate_in_a_batch_too(load):
    """A stream remembers its last four gaps. Five gaps and then a sample from the first: sent
    one call at a time it is a plain duplicate; sent in one batch it was counted late, from a
    list of this call's gaps that had no such limit."""
    seqs = [1, 5, 10, 15, 20, 25, 3]  # gaps 2-4, 6-9, 11-14, 16-19, 21-24; 3 fell in the first
    x = samples(len(seqs), 0)
    batched, single = load(), load()
    got = batched.step_many([Chunk("s", x[i], q) for i, q in enumerate(seqs)])
    want = [single.step_many([Chunk("s", x[i], q)])[0] for i, q in enumerate(seqs)]
    assert (want[-1].duplicates, want[-1].late) == (1, 0)
    assert [(o.duplicates, o.late, o.gap) for o in got] == [
        (o.duplicates, o.late, o.gap) for o in want
    ]


def test_counts_whose_sum_wraps_around_64_bits_are_refused(load):
    """Counts of 2**62, 2**62, 2**62 and 2**62 + 1 add up to 1 in int64 arithmetic: the batch
    passed as one sample's and failed deep in NumPy with an IndexError."""
    big = 2**62
    with pytest.raises(edge.InvalidSample, match=r"counts add up to 18446744073709551617"):
        load().step_batch(["a", "b", "c", "d"], samples(1, 0), counts=[big, big, big, big + 1])


def test_a_long_recording_in_one_call_equals_it_in_pieces(load):
    """``step`` takes a chunk of any length: 100,000 samples at once, as an offline user
    streams a recording, equal bit for bit to the same samples 1,000 at a time."""
    x = samples(100_000, 5)
    whole, pieces = load(), load()
    y = whole.step("rec", x, seq=1)
    parts = [pieces.step("rec", x[i : i + 1000], seq=1 + i) for i in range(0, len(x), 1000)]
    assert y.shape == (100_000, whole.manifest.outputs)
    np.testing.assert_array_equal(y, np.concatenate(parts))
    assert same_state(whole, pieces, "rec") and whole.last_seq("rec") == 100_000
    assert whole.counters.invokes == 100_000  # one invoke per round, one round per sample


def test_chunks_of_different_lengths_share_rounds(load):
    """Streams with 1, 3 and 7 samples: 7 rounds, the batch shrinking as streams finish."""
    xs = [samples(k, k) for k in (1, 7, 3)]
    e, ref = load(), load()
    outs = e.step_many([Chunk(f"s{i}", x, seq=1) for i, x in enumerate(xs)])
    assert e.counters.invokes == 7
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(outs[i].y, ref.step(f"s{i}", x, seq=1))
        assert same_state(e, ref, f"s{i}")


@pytest.mark.parametrize("name", QUANTIZED)
def test_the_binding_follows_the_batch_size_up_and_down(load, name):
    """Tensors are re-bound only when the batch size changes (growing and shrinking), and a
    re-bound interpreter gives the same bits as a fresh one."""
    e, ref = load(name), load(name)
    binding = e.model.binding
    assert isinstance(binding, TensorBinding)  # both interpreters allow views of their tensors
    f = e.manifest.features
    sizes = [3, 3, 3, 17, 64, 64, 5, 1, 1, 40, 64, 2]
    seq = {}
    for j, n in enumerate(sizes):
        before = binding.rebinds
        streams = [f"s{i}" for i in range(n)]
        x = samples(n, j, f)
        seqs = [seq.get(s, 0) + 1 for s in streams]
        got = e.step_batch(streams, x, seqs=seqs)
        changed = j == 0 or sizes[j - 1] != n
        assert binding.rebinds == before + changed and binding.rows == n
        for i, s in enumerate(streams):
            np.testing.assert_array_equal(got.y_of(i)[0], ref.step(s, x[i], seq=seqs[i]))
            seq[s] = seqs[i]
    for s in seq:
        assert same_state(e, ref, s)


def test_model_invoke_still_works_beside_the_engine(load):
    """``StepModel.invoke`` (used by tools) shares the binding and returns copies."""
    e = load()
    m = e.model
    x = m.encode_x(samples(5, 1))
    y1, s1 = m.invoke(x, [np.repeat(z, 5, 0) for z in m.zero_state()])
    e.step_batch(["a", "b"], samples(2, 2), seqs=[1, 1])
    y2, s2 = m.invoke(x, [np.repeat(z, 5, 0) for z in m.zero_state()])
    np.testing.assert_array_equal(y1, y2)
    assert all(np.array_equal(a, b) for a, b in zip(s1, s2))


def test_refused_chunks_in_a_batch_change_nothing(load):
    e = load()
    e.step("ok", samples(1, 0)[0], seq=1)
    before = e.state_of("ok")
    x = samples(4, 1)
    x[1, 2] = np.nan
    x[2, 0] = 1e39
    got = e.step_batch(
        ["new", "bad-nan", "bad-range", "bad id\n"], x, seqs=[1, 1, 1, 1], boots=[NO_BOOT] * 4
    )
    assert got.errors[1].code == "invalid_sample" and "NaN" in str(got.errors[1])
    assert "float32 range" in str(got.errors[2]) and "stream id" in str(got.errors[3])
    assert 0 not in got.errors and len(got.y_of(0)) == 1
    assert all(e.state_of(s) is None for s in ("bad-nan", "bad-range", "bad id\n"))
    assert same_state(e, e, "ok") and all(
        np.array_equal(a, b) for a, b in zip(before, e.state_of("ok"))
    )
    assert e.counters.rejected == 3


def test_unsequenced_and_sequenced_arrays(load):
    e, ref = load(), load()
    x = samples(3, 9)
    got = e.step_batch(["a", "b", "c"], x, seqs=[NO_SEQ, 5, NO_SEQ])
    assert got.outcome(0).seq is None and got.outcome(1).seq == 5
    for i, (s, q) in enumerate([("a", None), ("b", 5), ("c", None)]):
        np.testing.assert_array_equal(got.y_of(i)[0], ref.step(s, x[i], seq=q))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"counts": [1, 2, 1]}, r"counts add up to 4, values have 3 rows"),
        ({"seqs": [1, 2]}, r"seqs has shape \(2,\), expected \(3,\)"),
        ({"seqs": [1.9, 2, 3]}, r"seqs must be integers, got float64"),
        ({"seqs": [1, 2, 3], "boots": ["x", 1, 2]}, r"boots must be integers"),
        ({"seqs": [1, 2, 3], "boots": [2**40, 1, 2]}, r"boot 1099511627776 is not an unsigned"),
        ({"seqs": [1, 2, 3], "boots": [-5, 1, 2]}, r"boot -5 is not an unsigned"),
        ({"counts": [1.0, 1, 1]}, r"counts must be integers"),
        ({"counts": [-1, 2, 2]}, r"count -1 of chunk 0 is negative"),
    ],
)
def test_malformed_batches_are_refused_whole(load, kwargs, message):
    with pytest.raises(edge.InvalidSample, match=message):
        load().step_batch(["a", "b", "c"], samples(3, 0), **kwargs)


def test_a_steady_batch_with_one_bad_value_refuses_only_that_chunk(load):
    """Known streams, next seqs (the steady case), one sample NaN: only it is refused."""
    e, ref = load(), load()
    streams = [f"k{i}" for i in range(5)]
    x0 = samples(5, 0)
    e.step_batch(streams, x0, seqs=[1] * 5)
    ref.step_batch(streams, x0, seqs=[1] * 5)
    x = samples(5, 1)
    x[3, 1] = np.inf
    got = e.step_batch(streams, x, seqs=[2] * 5)
    assert list(got.errors) == [3] and "NaN or Inf" in str(got.errors[3])
    assert e.last_seq("k3") == 1 and same_state(e, ref, "k3")
    for i in (0, 1, 2, 4):
        np.testing.assert_array_equal(got.y_of(i)[0], ref.step(streams[i], x[i], seq=2))
        assert same_state(e, ref, streams[i])


def test_a_steady_unsequenced_batch_refuses_what_any_batch_refuses(load):
    """Known streams without seq (the steady case): a seq below -1 was taken as 'no seq' and the
    sample applied, and the boots were not looked at, where the general path refuses both."""
    e = load()
    streams = ["a", "b"]
    e.step_batch(streams, samples(2, 0))
    got = e.step_batch(streams, samples(2, 1), seqs=np.array([-5, NO_SEQ]))
    assert list(got.errors) == [0] and "seq -5 is not an unsigned 32-bit" in str(got.errors[0])
    assert got.offsets.tolist() == [0, 0, 1]
    for bad in (-7, 2**32):
        with pytest.raises(edge.InvalidSample, match=f"boot {bad} is not an unsigned 32-bit"):
            e.step_batch(
                streams, samples(2, 2), seqs=np.array([NO_SEQ] * 2), boots=np.array([bad, NO_BOOT])
            )
    assert e.stats()["samples"] == 3


def test_an_engine_that_needs_seqs_refuses_unsequenced_chunks_beside_an_invalid_seq(load):
    """The check for chunks without seq looked at the lowest seq of the batch only: beside a
    seq of -5 it was not NO_SEQ, and the unsequenced chunk was applied."""
    e = load(allow_unsequenced=False)
    got = e.step_batch(["a", "b"], samples(2, 0), seqs=np.array([-5, NO_SEQ]))
    assert [type(got.errors[i]).__name__ for i in (0, 1)] == ["InvalidSample", "MissingSeq"]
    assert got.offsets.tolist() == [0, 0, 0] and e.state_of("b") is None


@pytest.mark.parametrize("name", ["clf-int8", "reg2-int8"])
def test_the_runner_binding_gives_the_same_bits_as_the_tensor_views(load, bundles, name):
    """The fallback for interpreters without tensor views (copies through the signature
    runner) on its own interpreter, against the bound views, growing and shrinking."""
    from edge.binding import RunnerBinding, bind
    from edge.manifest import read_bundle

    e = load(name)
    m = e.model
    manifest, content = read_bundle(bundles / name)
    interpreter, runner = m.backend.open(content, manifest.signature)
    names_in = [m.x_spec.name, *(s.name for s in m.state_in)]
    names_out = [m.y_spec.name, *(s.name for s in m.state_out)]
    views = bind(interpreter, runner, manifest.signature, names_in, names_out)
    details = {**runner.get_input_details(), **runner.get_output_details()}
    copies = RunnerBinding(
        runner,
        names_in,
        names_out,
        [np.dtype(details[k]["dtype"]) for k in [*names_in, *names_out]],
        [int(details[k]["shape"][-1]) for k in [*names_in, *names_out]],
    )
    assert isinstance(views, TensorBinding)
    for j, n in enumerate([4, 4, 9, 1, 4]):
        x = m.encode_x(samples(n, j, manifest.features))
        states = [np.repeat(z, n, 0) for z in m.zero_state()]
        got = []
        for b in (views, copies):
            b.bind(n)
            b.inputs[0][...] = x
            for dst, s in zip(b.inputs[1:], states):
                dst[...] = s
            b.invoke()
            got.append([o.copy() for o in b.outputs])
        assert all(np.array_equal(a, c) for a, c in zip(*got))
    assert views.rebinds == copies.rebinds == 4


def test_an_unhashable_stream_id_is_refused_like_any_invalid_one(load):
    e = load()
    outs = e.step_many([Chunk(["x"], samples(1, 0)[0], 1), Chunk("fine", samples(1, 1)[0], 1)])
    assert outs[0].error is not None and "invalid stream id" in str(outs[0].error)
    assert outs[1].error is None and len(outs[1].y) == 1


def test_a_stream_with_nothing_to_step_does_not_shift_the_others(load):
    """A replayed message first, then streams that come twice: only the applied samples are
    grouped by stream (a regression: the replayed stream once took a slot of its own)."""
    e, ref = load(), load()
    for engine in (e, ref):
        engine.step("old", samples(2, 0), seq=1)
    xs = [samples(k, 10 + k) for k in (1, 3, 1, 2)]
    chunks = [
        Chunk("old", xs[0], 2),  # a duplicate: nothing to step
        Chunk("a", xs[1], 1),
        Chunk("b", xs[2], 1),
        Chunk("a", xs[3], 4),
    ]
    outs = e.step_many(chunks)
    for c, out in zip(chunks, outs):
        (want,) = ref.step_many([c])
        np.testing.assert_array_equal(out.y, want.y)
        assert out.duplicates == want.duplicates
    for s in ("old", "a", "b"):
        assert same_state(e, ref, s)


def test_a_boot_is_an_unsigned_32_bit_integer_as_in_payloads(load):
    e = load()
    for boot in (-1, -5, 2**32, 1.5, True):
        (oc,) = e.step_many([Chunk("s", samples(1, 0)[0], 1, boot)])
        assert oc.error is not None and "boot" in str(oc.error)
    assert e.state_of("s") is None
    with pytest.raises(edge.InvalidSample, match="takes Chunk objects"):
        e.step_many([("s", samples(1, 0)[0])])


@pytest.mark.parametrize("steady", [True, False], ids=["steady", "general"])
@pytest.mark.parametrize(
    "bad, message",
    [
        (10**400, r"beyond the float32 range \(max \|x\| ~1e400\)"),
        (1 + 2j, r"\(1\+2j\) is complex"),
    ],
    ids=["huge", "complex"],
)
def test_a_batch_with_a_value_past_float_or_complex_is_refused_whole(load, steady, bad, message):
    """Values as Python objects (an int past the float range) or complex arrays: refused
    as an invalid sample, not an OverflowError or a cast that drops the imaginary part."""
    e = load()
    streams = ["a", "b"]
    e.step_batch(streams, samples(2, 0), seqs=[1, 1])
    before = [e.state_of(s) for s in streams]
    rows = samples(2, 1).tolist()
    rows[1][2] = bad
    values = np.array(rows) if isinstance(bad, complex) else rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(edge.InvalidSample, match=message):
            if steady:
                e.step_batch(streams, values, seqs=np.array([2, 2]))
            else:
                e.step_batch(streams, values, counts=[1, 1], seqs=[2, 2])
    assert [e.last_seq(s) for s in streams] == [1, 1]
    for s, st0 in zip(streams, before):
        assert all(np.array_equal(x, y) for x, y in zip(st0, e.state_of(s)))


@pytest.mark.parametrize("api", ["step_many", "step_batch"])
def test_a_batch_wider_than_the_capacity_is_refused_before_anything_changes(load, api):
    """More streams in one call than ``capacity``: refused whole (``ConfigError`` naming the
    count), with no stream evicted to give a returning one its row back and no sample, gap or
    duplicate counted."""
    engine = load(capacity=3, gap_policy="reset")
    x = samples(8, 9)
    for s in "abcd":  # d evicts a
        engine.step(s, x[:1], seq=1)
    engine.step("b", x[1:2], seq=5)  # a gap
    kept = {s: engine.state_of(s) for s in "bcd"}
    before = (engine.stats(), engine.store.streams, [engine.last_seq(s) for s in "abcd"])
    chunks = [Chunk(s, x[i : i + 1], 3) for i, s in enumerate("abcdefg")]  # a returns
    with pytest.raises(edge.ConfigError, match=r"^7 streams in one batch exceed .* capacity 3;"):
        if api == "step_many":
            engine.step_many(chunks)
        else:
            engine.step_batch([c.stream for c in chunks], x[:7], seqs=[3] * 7)
    assert (engine.stats(), engine.store.streams) == before[:2]
    assert [engine.last_seq(s) for s in "abcd"] == before[2]
    assert all(np.array_equal(engine.state_of(s)[0], kept[s][0]) for s in "bcd")
    # a batch of at most capacity streams still runs: a returns (restart), b's gap is counted
    outs = engine.step_many(chunks[:3])
    assert outs[0].restart and outs[1].gap == 0 and outs[1].duplicates == 1


# Between steady batches (every stream known, each its next seq): the same streams again, in
# another order, a subset, one stream stepped alone, a stream reset, evicted (as when idle) or
# removed; a batch with streams evicted or removed since is no steady one.
STEADY_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("batch"), st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True)
        ),
        st.tuples(st.just("again"), st.just(0)),
        st.tuples(st.sampled_from(["alone", "reset", "evict", "remove"]), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=16,
)


@SETTINGS
@given(ops=STEADY_OPS, seed=st.integers(0, 999), name=st.sampled_from(QUANTIZED))
@example(ops=[("evict", 0), ("remove", 0), ("batch", [0])], seed=0, name=QUANTIZED[0])
def test_steady_batches_of_changing_streams_equal_each_stream_alone(load, ops, seed, name):
    """Steady batches whose streams repeat, change, shrink, grow, or were reset, evicted or
    removed in between give exactly what each stream stepped alone gives: the same outputs,
    state, last seq, and least-recently-used order."""
    batched, alone = load(name), load(name)
    f = batched.manifest.features
    ids = [f"s{i}" for i in range(8)]
    nxt = dict.fromkeys(ids, 1)
    new = set(ids)  # unknown and not evicted: a batch gives them rows after the others
    last = ids
    for j, (op, arg) in enumerate([("batch", list(range(8))), *ops]):
        s = ids[arg] if isinstance(arg, int) else ""
        if op in ("batch", "again"):
            streams = last if op == "again" else [ids[i] for i in arg]
            x = samples(len(streams), seed + j, f)
            seqs = np.array([nxt[t] for t in streams], np.int64)
            got = batched.step_batch(list(streams), x, seqs=seqs)
            for i in sorted(range(len(streams)), key=lambda i: streams[i] in new):
                want = alone.step(streams[i], x[i], seq=nxt[streams[i]])
                np.testing.assert_array_equal(got.y_of(i)[0], want)
            for t in streams:
                nxt[t] += 1
            new -= set(streams)
            last = streams
        elif op == "alone":
            x1 = samples(1, seed + j, f)[0]
            np.testing.assert_array_equal(
                batched.step(s, x1, seq=nxt[s]), alone.step(s, x1, seq=nxt[s])
            )
            nxt[s] += 1
            new.discard(s)
        elif op == "reset":
            for e in (batched, alone):
                e.reset(s)
        elif op == "evict":
            for e in (batched, alone):
                e.store.evict([s])  # as when idle: numbered on once back
        else:
            for e in (batched, alone):
                e.store.remove(s)  # forgotten for good: it starts over
            nxt[s] = 1
            new.add(s)
        assert batched.store.streams == alone.store.streams
        for t in ids:
            assert same_state(batched, alone, t) and batched.last_seq(t) == alone.last_seq(t)


def test_steady_batches_across_the_end_of_the_seq_range_equal_each_stream_alone(load):
    """Seqs up to 2**32 - 1, the wrap to 0 and on, a seq past 32 bits, and a -1 beside real
    seqs, batch after batch of the same streams: what each stream stepped alone gives."""
    batched, alone = load(), load()
    streams = ["a", "b", "c"]
    top = 2**32
    for e in (batched, alone):
        for s, first in zip(streams, (5, 5, top - 2)):
            e.reset(s, next_seq=first)
    rounds = [
        [5, 5, top - 2],
        [6, 6, top - 1],
        [7, 7, top],  # past 32 bits
        [8, 8, 0],  # the wrap
        [9, 9, 1],
        [10, -1, 2],  # no seq beside real ones
        [11, 11, 3],
    ]
    for j, seqs in enumerate(rounds):
        x = samples(len(streams), j)
        got = batched.step_batch(streams, x, seqs=np.array(seqs, np.int64))
        for i, (s, q) in enumerate(zip(streams, seqs)):
            (want,) = alone.step_many([Chunk(s, x[i], None if q == -1 else q)])
            have = got.outcome(i)
            np.testing.assert_array_equal(have.y, want.y)
            assert type(have.error) is type(want.error) and have.gap == want.gap
        for s in streams:
            assert same_state(batched, alone, s) and batched.last_seq(s) == alone.last_seq(s)


@pytest.mark.desktop  # a model made to overflow (build_bundles.make_overflowing): XNNPACK
@pytest.mark.parametrize("max_batch", [256, 2])
def test_a_batch_refuses_only_the_streams_a_float_model_overflows_on(load, max_batch):
    """The steady batch, and one wider than ``max_batch`` (rounds in parts): the stream whose
    sample overflows the model is refused with its state kept, the others are answered."""
    e, ref = load("overflow-float32", max_batch=max_batch), load("overflow-float32")
    streams = [f"k{i}" for i in range(5)]
    x0 = samples(5, 0, 3)
    e.step_batch(streams, x0, seqs=[1] * 5)
    ref.step_batch(streams, x0, seqs=[1] * 5)
    x = samples(5, 1, 3)
    x[3, 0] = 3e38  # inside the input checks, past the model's float32 arithmetic
    got = e.step_batch(streams, x, seqs=[2] * 5)
    assert list(got.errors) == [3] and "overflowed on this sample" in str(got.errors[3])
    assert got.errors[3].stream_id == "k3" and got.errors[3].seq == 2
    assert e.last_seq("k3") == 1 and same_state(e, ref, "k3")
    for i in (0, 1, 2, 4):
        np.testing.assert_array_equal(got.y_of(i)[0], ref.step(streams[i], x[i], seq=2))
        assert same_state(e, ref, streams[i])
    x[3] = samples(1, 2, 3)[0]
    again = e.step_batch(streams, x, seqs=[3, 3, 3, 2, 3])
    assert not again.errors
    np.testing.assert_array_equal(again.y_of(3)[0], ref.step("k3", x[3], seq=2))
    assert same_state(e, ref, "k3")


@pytest.mark.desktop  # as above
def test_chunks_of_one_stream_after_one_a_float_model_overflows_on_step_from_before_it(load):
    e, ref = load("overflow-float32"), load("overflow-float32")
    x = samples(6, 3, 3)
    x[2, 0] = 3e38
    got = e.step_batch(["a", "b", "a"], x, counts=[2, 2, 2], seqs=[1, 1, 5])
    assert list(got.errors) == [1] and "sample 0 of the chunk (seq 1)" in str(got.errors[1])
    np.testing.assert_array_equal(got.y_of(0), ref.step("a", x[:2], seq=1))
    np.testing.assert_array_equal(got.y_of(2), ref.step("a", x[4:], seq=5))
    assert got.gap[2] == 2 and e.last_seq("a") == 6 and same_state(e, ref, "a")
    assert e.state_of("b") is None


def test_batches_of_ever_new_sizes_keep_no_memory_per_size(load):
    """The steady path kept its read-only outcome arrays for every batch size it ever saw:
    a service's micro-batches come in every size up to ``max_batch``, and it came to keep
    ``max_batch``**2 bytes (140 MB at ``max_batch`` 4096), and a view per size for the
    model's input. What they keep now is a batch's worth or two, whatever sizes come."""
    import dataclasses
    import tracemalloc

    n = 2000
    e = load(max_batch=n)
    streams = [f"s{i}" for i in range(n)]
    nxt = np.ones(n, np.int64)
    x = samples(n, 4)

    def step(k: int) -> edge.Batch:
        got = e.step_batch(streams[:k], x[:k], seqs=nxt[:k].copy())
        assert not got.errors and got.seq.tolist() == nxt[:k].tolist()
        nxt[:k] += 1
        return got

    step(n)  # every stream known
    full = step(n)  # the steady path, at the largest size
    one = sum(v.nbytes for v in vars(full).values() if isinstance(v, np.ndarray))
    assert dataclasses.is_dataclass(full) and one
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in range(1, n):
            step(k)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2 * one, f"{grown} bytes kept after {n - 1} batch sizes, a batch is {one}"

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import payloads
from edge.payloads import PayloadError

from . import hostile

NAMES = ["a", "b", "c"]


def test_json_single_and_multi():
    s = payloads.decode(b'{"seq": 7, "ts": 1.5, "values": [1, 2, 3]}', NAMES)
    assert (s.seq, s.ts, s.values.tolist()) == (7, 1.5, [[1, 2, 3]])
    s = payloads.decode(json.dumps({"seq": 1, "values": [[1, 2, 3], [4, 5, 6]]}).encode(), NAMES)
    assert s.values.shape == (2, 3) and s.ts is None


def test_binary_frame_roundtrip():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    s = payloads.decode(payloads.encode_frame(2**32 - 1, values, ts=10.25), NAMES)
    assert s.seq == 2**32 - 1 and s.ts == 10.25
    np.testing.assert_array_equal(s.values, values)
    assert payloads.decode(payloads.encode_frame(3, values[0]), NAMES).ts is None


def test_senml_pack():
    body = payloads.encode_senml(5, np.array([[1, 2, 3], [4, 5, 6]]), NAMES, ts=100.0, dt=0.1)
    s = payloads.decode(body, NAMES)
    assert s.seq == 5 and s.ts == 100.0 and s.values.tolist() == [[1, 2, 3], [4, 5, 6]]
    doc = [
        {"bn": "urn:dev:1/", "bt": 5.0, "n": "seq", "v": 1},
        {"n": "a", "v": 1},
        {"n": "b", "v": 2},
        {"n": "c", "v": 3},
        {"n": "temp", "v": 20},
    ]
    assert payloads.decode(json.dumps(doc).encode(), NAMES).values.tolist() == [[1, 2, 3]]


def test_content_type_overrides_detection():
    frame = payloads.encode_frame(1, np.zeros(3))
    assert payloads.decode(frame, NAMES, "application/vnd.edge-lstm.frame").seq == 1
    with pytest.raises(PayloadError) as err:
        payloads.decode(frame, NAMES, "text/plain")
    assert err.value.code == "bad_content_type"


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"{nope", "bad_json"),
        (b"\x07garbage", "bad_payload"),
        (b'{"seq": -1, "values": [1, 2, 3]}', "bad_seq"),
        (b'{"seq": 4294967296, "values": [1, 2, 3]}', "bad_seq"),
        (b'{"seq": true, "values": [1, 2, 3]}', "bad_seq"),
        (b'{"seq": 1}', "bad_values"),
        (b'{"seq": 1, "values": [1, 2]}', "wrong_shape"),
        (b'{"seq": 1, "values": [[1, 2, 3], [1, 2]]}', "bad_values"),
        (b'{"seq": 1, "values": ["x", 2, 3]}', "bad_values"),
        (b'{"seq": 1, "values": [1, NaN, 3]}', "not_finite"),
        (b'{"seq": 1, "values": [1, 1e999, 3]}', "not_finite"),
        (b'{"seq": 1, "ts": "now", "values": [1, 2, 3]}', "bad_ts"),
        (b'[{"n": "x", "v": 1}]', "bad_senml"),
        (b'[{"n": "a", "v": 1}]', "wrong_shape"),
        (b"[]", "bad_senml"),
        (payloads.encode_frame(1, np.zeros(3))[:-1], "wrong_shape"),
        (b"\x01\x00", "bad_frame"),
        (payloads.encode_frame(1, np.array([np.nan, 0, 0])), "not_finite"),
    ],
)
def test_bad_payloads_have_codes(payload, code):
    with pytest.raises(PayloadError) as err:
        payloads.decode(payload, NAMES)
    assert err.value.code == code and err.value.detail


def test_prediction_is_exact_and_labelled():
    y = np.array([[0.00390625, 0.99609375]], np.float32)
    doc = json.loads(payloads.prediction(3, None, y, "abc", ["no", "yes"], single=True, gap=2))
    assert doc == {
        "seq": 3,
        "y": [0.00390625, 0.99609375],
        "model": "abc",
        "label": "yes",
        "p": 0.99609375,
        "gap": 2,
    }
    assert not math.isnan(doc["p"])


# -- total decoding --------------------------------------------------------------------------

F6 = [f"f{i}" for i in range(6)]
HUGE = "9" * 400
ROW3 = "[1,2,3]"


def _code(payload: bytes, content_type: str | None = None, names=NAMES, **kw) -> str:
    with pytest.raises(PayloadError) as err:
        payloads.decode(payload, names, content_type, **kw)
    assert err.value.detail and len(err.value.detail) < 300
    return err.value.code


def _check_samples(s: payloads.Samples, f: int) -> None:
    """What the engine relies on for every Samples it is given."""
    assert isinstance(s, payloads.Samples)
    assert s.values.dtype == np.float64 and s.values.ndim == 2
    assert s.values.shape[0] >= 1 and s.values.shape[1] == f
    assert np.isfinite(s.values).all()
    assert s.ts is None or (type(s.ts) is float and 0 <= s.ts <= payloads.MAX_TS)
    for n in (s.seq, s.boot):
        assert n is None or (type(n) is int and 0 <= n < 2**32)


def _total(payload: bytes, names=NAMES, content_type: str | None = None) -> str:
    """Decode: Samples or PayloadError, nothing else (pytest reports any other exception)."""
    try:
        s = payloads.decode(payload, names, content_type)
    except PayloadError as exc:
        assert isinstance(exc.code, str) and exc.code and isinstance(exc.detail, str)
        return exc.code
    _check_samples(s, len(names))
    return "ok"


def _parse_or_refuse(body: bytes) -> None:
    try:
        payloads.parse_json(body)
    except PayloadError as exc:
        assert exc.code in ("bad_json", "too_deep") and exc.detail


@pytest.mark.parametrize(
    "payload, code",
    [
        # the field trial's reports
        (b'{"seq":1,"values":' + b"[" * 3000 + b"]" * 3000 + b"}", "too_deep"),
        (f'{{"seq":1,"values":[{HUGE},2,3]}}'.encode(), "not_finite"),
        (f'{{"seq":1,"ts":{HUGE},"values":{ROW3}}}'.encode(), "bad_ts"),
        (b'[{"bn": 5, "n": "f0", "v": 1}]', "bad_senml"),
        (b'{"a":' * 3000 + b"1" + b"}" * 3000, "too_deep"),
        # numbers
        (f'{{"seq":1,"values":[{"7" * 5000},2,3]}}'.encode(), "bad_json"),
        (f'{{"seq":{HUGE},"values":{ROW3}}}'.encode(), "bad_seq"),
        (b'{"seq":1,"values":[-1e400,2,3]}', "not_finite"),
        (b'{"seq":1,"values":[true,2,3]}', "bad_values"),
        (b'{"seq":1,"values":[null,2,3]}', "bad_values"),
        (b'{"seq":1,"values":["1","2","3"]}', "bad_values"),
        (b'{"seq":1,"values":{"a":1}}', "bad_values"),
        (b'{"seq":1,"values":"1,2,3"}', "bad_values"),
        (b'{"seq":1,"values":[]}', "wrong_shape"),
        (b'{"seq":1,"values":[[]]}', "wrong_shape"),
        (b'{"seq":1,"values":[[[1,2,3]]]}', "wrong_shape"),
        (b'{"seq":1,"values":[[1,2,3],4]}', "bad_values"),
        # timestamps
        (b'{"seq":1,"ts":1e300,"values":[1,2,3]}', "bad_ts"),
        (b'{"seq":1,"ts":-5,"values":[1,2,3]}', "bad_ts"),
        (b'{"seq":1,"ts":4102444800.5,"values":[1,2,3]}', "bad_ts"),
        (b'{"seq":1,"ts":1e400,"values":[1,2,3]}', "bad_ts"),
        (b'{"seq":1,"ts":NaN,"values":[1,2,3]}', "bad_ts"),
        (b'{"seq":1,"ts":true,"values":[1,2,3]}', "bad_ts"),
        # boot
        (b'{"seq":1,"boot":-1,"values":[1,2,3]}', "bad_boot"),
        (b'{"seq":1,"boot":4294967296,"values":[1,2,3]}', "bad_boot"),
        (b'{"seq":1,"boot":true,"values":[1,2,3]}', "bad_boot"),
        (b'{"seq":1,"boot":1.0,"values":[1,2,3]}', "bad_boot"),
        (b'{"seq":1,"boot":"1","values":[1,2,3]}', "bad_boot"),
        # SenML
        (b'[{"n": 5, "v": 1}]', "bad_senml"),
        (b'[{"bn": null, "n": "a", "v": 1}]', "bad_senml"),
        (b'[{"bt": "x", "n": "a", "v": 1}]', "bad_ts"),
        (b'[{"bt": true, "n": "a", "v": 1}]', "bad_ts"),
        (f'[{{"bt": {HUGE}, "n": "a", "v": 1}}]'.encode(), "bad_ts"),
        (f'[{{"n": "a", "t": {HUGE}, "v": 1}}]'.encode(), "bad_ts"),
        (b'[{"bt": 1e300, "n": "a", "v": 1}]', "bad_ts"),
        (b'[{"bt": 10, "n": "a", "t": -3e8, "v": 1}]', "bad_ts"),  # past relative times
        (b"[1, 2]", "bad_senml"),
        (b"[[]]", "bad_senml"),
        (b'[{"n":"a","v":"1"},{"n":"b","v":2},{"n":"c","v":3}]', "bad_senml"),
        (f'[{{"n":"a","v":{HUGE}}},{{"n":"b","v":2}},{{"n":"c","v":3}}]'.encode(), "not_finite"),
        (b'[{"n":"boot","v":-1},{"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3}]', "bad_boot"),
        (b'[{"n":"boot"},{"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3}]', "bad_boot"),
        # encodings
        (b"", "bad_payload"),
        (b"\x00\x00", "bad_payload"),
        (b'{"seq":1,"values":[1,2,3],"x":"\xff"}', "bad_json"),
        (b'{"seq":1,"values":[1,\x002,3]}', "bad_json"),
        ('{"seq":1,"values":[1,2,3]}'.encode("utf-16"), "bad_payload"),
        # frames
        (b"\x02" + bytes(10), "bad_frame"),
        (payloads.FRAME_HEAD.pack(1, 0, 1, 1, math.inf) + bytes(12), "bad_ts"),
        (payloads.FRAME_HEAD.pack(1, 0, 1, 1, -1.0) + bytes(12), "bad_ts"),
        (payloads.FRAME_HEAD.pack(1, 0, 1, 1, 1e300) + bytes(12), "bad_ts"),
        (payloads.FRAME_HEAD_V2.pack(2, 1, 2, 1, 5.0, 1) + bytes(12), "wrong_shape"),
        (payloads.encode_frame(1, np.zeros(3), boot=1)[:-1], "wrong_shape"),
        (payloads.encode_frame(1, np.array([0, np.inf, 0]), boot=1), "not_finite"),
        (payloads.FRAME_HEAD_V2.pack(2, 0xFE, 1, 1, 5.0, 1) + bytes(12), "bad_frame"),
        # a feature given twice for one time: which one is meant cannot be told
        (b'[{"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3},{"n":"a","v":99}]', "bad_senml"),
    ],
)
def test_hostile_payloads_have_codes(payload, code):
    assert _code(payload) == code


def test_details_name_the_value_briefly():
    with pytest.raises(PayloadError) as err:
        payloads.decode(f'{{"seq":1,"ts":{HUGE},"values":{ROW3}}}'.encode(), NAMES)
    assert "401-digit" in err.value.detail and len(err.value.detail) < 120
    with pytest.raises(PayloadError) as err:
        payloads.decode(b'{"seq":1,"ts":-5,"values":[1,2,3]}', NAMES)
    assert "-5" in err.value.detail
    with pytest.raises(PayloadError) as err:
        payloads.decode(b'{"seq":1,"values":["' + b"x" * 1000 + b'",2,3]}', NAMES)
    assert "xxx" in err.value.detail and len(err.value.detail) < 150


def test_depth_check_counts_only_structure_outside_strings():
    payloads.check_depth(b"[" * 8 + b"]" * 8, 8)
    with pytest.raises(PayloadError) as err:
        payloads.check_depth(b"[" * 9 + b"]" * 9, 8)
    assert err.value.code == "too_deep"
    payloads.check_depth(b'["' + b"[{" * 100 + b'"]', 2)
    payloads.check_depth(b'["\\"' + b"[" * 100 + b'"]', 2)  # escaped quote stays in the string
    payloads.check_depth(b'["\\\\\\"[[[[", "]"]', 1)
    with pytest.raises(PayloadError):  # "\\" ends in an escaped backslash: the string closes
        payloads.check_depth(b'["\\\\"' + b"[" * 10, 8)
    with pytest.raises(PayloadError):
        payloads.check_depth(b'{"a":"x\\u0022", "b":' + b"[" * 20, 8)
    assert _code(b'{"seq":1,"values":' + b"[{" * 4 + b"}]" * 4 + b"}") == "too_deep"


def _deepest(structure: bytes) -> int:
    """The nesting a bracket-by-bracket walk sees (a stray closer at the top counts nothing)."""
    depth = deepest = 0
    for c in structure:
        depth = depth + 1 if c in b"[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=40).map(lambda b: bytes(b"[]{}"[x % 4] for x in b)), st.integers(1, 9))
def test_depth_check_agrees_with_a_walk_over_any_brackets(structure, limit):
    """Balanced or not, mixed or not: refused exactly when some point nests deeper."""
    if _deepest(structure) > limit:
        with pytest.raises(PayloadError):
            payloads.check_depth(structure, limit)
    else:
        payloads.check_depth(structure, limit)


def test_max_depth_is_a_decode_keyword():
    doc = b'{"seq":1,"values":[[1,2,3]]}'  # depth 3
    assert payloads.decode(doc, NAMES, max_depth=3).seq == 1
    assert _code(doc, max_depth=2) == "too_deep"
    assert payloads.MAX_DEPTH == 8


def test_parse_json():
    assert payloads.parse_json(b'\xef\xbb\xbf{"cmd": "reset"}') == {"cmd": "reset"}
    assert payloads.parse_json(b'{"seq": ' + HUGE.encode() + b"}")["seq"] == int(HUGE)
    for bad, code in [
        (b"[" * 100, "too_deep"),
        (b'{"cmd": "\xff"}', "bad_json"),
        (b"", "bad_json"),
        (b'{"seq": ' + b"1" * 5000 + b"}", "bad_json"),
        ('{"cmd": "reset"}'.encode("utf-16"), "bad_json"),
    ]:
        with pytest.raises(PayloadError) as err:
            payloads.parse_json(bad)
        assert err.value.code == code
    with pytest.raises(PayloadError):
        payloads.parse_json(b"[[[1]]]", max_depth=2)


def test_bom_and_brackets_in_strings_are_accepted():
    s = payloads.decode(b'\xef\xbb\xbf{"seq":1,"values":[1,2,3]}', NAMES)
    assert s.seq == 1
    s = payloads.decode(b'{"seq":2,"note":"' + b"[" * 3000 + b'","values":[1,2,3]}', NAMES)
    assert s.seq == 2


@pytest.mark.parametrize(
    "content_type, kind",
    [
        ("application/json; charset=utf-8", "json"),
        (" APPLICATION/JSON ;;; x=\u00e9", "json"),
        ("application/senml+json;", "senml"),
        ("application/octet-stream; version=2", "binary"),
        ("", "json"),
        ("\u00e9/\u00e9", None),
        ("application/json\x00", None),
        (";", None),
        ("text/plain", None),
    ],
)
def test_content_types_with_parameters(content_type, kind):
    body = b'{"seq":1,"values":[1,2,3]}'
    if kind is None:
        assert _code(body, content_type) == "bad_content_type"
    else:
        assert payloads.detect(body, content_type) == kind


def test_content_type_forces_the_decoder():
    frame = payloads.encode_frame(1, np.zeros(3))
    assert _code(frame, "application/json") == "bad_json"
    assert _code(b'{"seq":1,"values":[1,2,3]}', "application/senml+json") == "bad_senml"
    assert _code(b"{}", "application/vnd.edge-lstm.frame") == "bad_frame"
    assert _code(b"", "application/octet-stream") == "bad_frame"
    assert _code(b"\x03" + frame[1:], "application/octet-stream") == "bad_frame"


# -- timestamps ------------------------------------------------------------------------------


def test_timestamp_bounds():
    for ts in (0, 0.0, 1.7e9, 4102444800, payloads.MAX_TS):
        s = payloads.decode(json.dumps({"seq": 1, "ts": ts, "values": [1, 2, 3]}).encode(), NAMES)
        assert s.ts == float(ts) and type(s.ts) is float
    nan_frame = payloads.encode_frame(1, np.zeros(3), ts=None)
    assert payloads.decode(nan_frame, NAMES).ts is None  # NaN in a frame means "no ts"
    assert payloads.decode(payloads.encode_frame(1, np.zeros(3), ts=0.0), NAMES).ts == 0.0
    with pytest.raises(PayloadError) as err:
        payloads.decode(payloads.encode_frame(1, np.zeros(3), ts=5e9), NAMES)
    assert err.value.code == "bad_ts" and "5000000000" in err.value.detail


def test_senml_times_are_checked_as_sums():
    ok = b'[{"bt":100,"n":"a","t":-50,"v":1},{"n":"b","t":-50,"v":2},{"n":"c","t":-50,"v":3}]'
    assert payloads.decode(ok, NAMES).ts == 50.0
    untimed = b'[{"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3}]'
    assert payloads.decode(untimed, NAMES).ts is None
    at_zero = b'[{"bt":0,"n":"a","v":1},{"n":"b","v":2},{"n":"c","v":3}]'
    assert payloads.decode(at_zero, NAMES).ts == 0.0


def test_a_senml_pack_timed_relative_to_now_is_read_in_its_order():
    """RFC 8428: times below 2**28 are relative to now, negative ones seconds ago, as a
    device without a clock sends them. Such a pack was refused ``bad_ts`` (outside 0 ..), and
    every sample of such a device was lost."""
    pack = [{"n": "seq", "v": 7}]
    for t, row in ((-1, (4, 5, 6)), (0, (7, 8, 9)), (-2.5, (1, 2, 3))):
        pack += [{"n": n, "t": t, "v": v} for n, v in zip(NAMES, row)]
    s = payloads.decode(json.dumps(pack).encode(), NAMES)
    assert (s.seq, s.ts) == (7, None)  # no absolute time: none said
    np.testing.assert_array_equal(s.values, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    with_base = [{"bt": -10, "n": "seq", "v": 1}, *pack[1:4]]
    assert payloads.decode(json.dumps(with_base).encode(), NAMES).ts is None
    mixed = [*pack[:4], {"bt": 1.7e9, "n": "a", "v": 1}, {"n": "b", "v": 2}, {"n": "c", "v": 3}]
    with pytest.raises(PayloadError) as err:
        payloads.decode(json.dumps(mixed).encode(), NAMES)
    assert err.value.code == "bad_ts" and "relative" in err.value.detail
    for t in (-(2.0**28) - 1, 5e9):
        far = [{"n": n, "t": t, "v": 1} for n in NAMES]
        assert _code(json.dumps(far).encode()) == "bad_ts"


# -- boot ------------------------------------------------------------------------------------


def test_samples_boot_defaults_to_none():
    s = payloads.Samples(1, None, np.zeros((1, 3)))
    assert s.boot is None


def test_boot_in_json_and_senml():
    s = payloads.decode(b'{"seq":1,"boot":4294967295,"values":[1,2,3]}', NAMES)
    assert s.boot == 2**32 - 1
    assert payloads.decode(b'{"seq":1,"boot":null,"values":[1,2,3]}', NAMES).boot is None
    assert payloads.decode(b'{"seq":1,"values":[1,2,3]}', NAMES).boot is None
    pack = [
        {"bn": "urn:dev:7/", "bt": 5.0, "n": "seq", "v": 9},
        {"n": "boot", "v": 4},
        {"n": "a", "v": 1},
        {"n": "b", "v": 2},
        {"n": "c", "v": 3},
    ]
    s = payloads.decode(json.dumps(pack).encode(), NAMES)
    assert (s.seq, s.boot, s.ts) == (9, 4, 5.0)
    body = payloads.encode_senml(3, np.array([[1, 2, 3]]), NAMES, ts=1.0, dt=0.1, boot=0)
    assert payloads.decode(body, NAMES).boot == 0
    plain = payloads.encode_senml(3, np.array([[1, 2, 3]]), NAMES, ts=1.0, dt=0.1)
    assert b"boot" not in plain


def test_frame_v1_bytes_unchanged_and_v2_layout():
    values = np.array([[1, 2, 3]], np.float32)
    v1 = payloads.encode_frame(7, values, ts=2.5)
    assert v1 == struct.pack("<BBHId", 1, 0, 1, 7, 2.5) + values.tobytes()
    v2 = payloads.encode_frame(7, values, ts=2.5, boot=9)
    assert v2 == struct.pack("<BBHIdI", 2, 1, 1, 7, 2.5, 9) + values.tobytes()
    assert payloads.FRAME_HEAD_V2.size == 20 and payloads.FRAME_HEAD.size == 16
    assert payloads.detect(v2) == "binary"
    s = payloads.decode(v2, NAMES)
    assert (s.seq, s.ts, s.boot) == (7, 2.5, 9)
    assert payloads.decode(v1, NAMES).boot is None
    no_boot = struct.pack("<BBHIdI", 2, 0, 1, 7, math.nan, 123) + values.tobytes()
    s = payloads.decode(no_boot, NAMES)
    assert (s.boot, s.ts) == (None, None)
    for version in (0, 3, 255):
        assert _code(bytes([version]) + v1[1:], "application/octet-stream") == "bad_frame"


# -- messages out ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b'{"seq": 6, "seq": 7, "values": [1, 2, 3, 4, 5, 6]}',
        b'{"seq": 6, "values": [1, 2, 3, 4, 5, 6], "values": [6, 5, 4, 3, 2, 1]}',
        b'{"s\\u0065q": 6, "seq": 7, "values": [1, 2, 3, 4, 5, 6]}',  # the same key, escaped
    ],
)
def test_a_key_named_twice_is_refused_not_read_as_the_last(payload):
    with pytest.raises(PayloadError, match="appears twice in one object") as exc:
        payloads.decode(payload, hostile.FEATURES)
    assert exc.value.code == "bad_json"


_ROW = [{"n": n, "v": 1.0} for n in NAMES]


@pytest.mark.parametrize(
    "pack, field",
    [
        ([{"n": "seq", "v": 1}, {"n": "seq", "v": 5}, *_ROW], "seq"),
        ([{"n": "seq", "v": 5}, *_ROW, {"n": "seq", "v": 5}], "seq"),  # the same value too
        ([{"bn": "dev/", "n": "seq", "v": 1}, {"n": "seq", "v": 2}, *_ROW], "seq"),
        ([{"n": "seq", "v": 1}, {"n": "boot", "v": 3}, {"n": "boot", "v": 9}, *_ROW], "boot"),
        ([{"n": "boot", "v": 3}, *_ROW, {"n": "boot", "v": 3}, {"n": "seq", "v": 1}], "boot"),
    ],
)
def test_a_senml_pack_naming_seq_or_boot_twice_is_refused(pack, field):
    """As a JSON sample naming a key twice: neither value is taken."""
    with pytest.raises(PayloadError, match=f"'{field}' is given twice") as exc:
        payloads.decode(json.dumps(pack).encode(), NAMES)
    assert exc.value.code == "bad_senml"


@pytest.mark.parametrize(
    "payload, key",
    [
        (b'{"cmd": "reset", "seq": 1, "seq": 2}', "seq"),
        (b'{"cmd": "reset", "boot": 1, "boot": 1}', "boot"),
        (b'{"cmd": "reset", "cmd": "snapshot"}', "cmd"),
        (b'{"cmd": "reset", "s\\u0065q": 1, "seq": 2}', "seq"),
    ],
)
def test_a_control_message_naming_a_key_twice_is_refused(payload, key):
    with pytest.raises(PayloadError, match=f"key '{key}' appears twice") as exc:
        payloads.parse_control(payload)
    assert exc.value.code == "bad_json"
    assert payloads.parse_control(b'{"cmd": "reset", "seq": 2}') == {"cmd": "reset", "seq": 2}


def test_key_names_inside_strings_are_not_keys():
    doc = b'{"seq": 6, "values": [1, 2, 3, 4, 5, 6], "note": "\\"seq\\": \\"values\\""}'
    assert payloads.decode(doc, hostile.FEATURES).seq == 6


def test_prediction_is_always_valid_json():
    y = np.array([[np.nan, 0.25, np.inf], [0.5, -np.inf, 0.125]], np.float32)
    for ts in (math.nan, math.inf, -math.inf):
        body = payloads.prediction(1, ts, y, "m", ["a", "b", "c"], single=False)
        doc = json.loads(body, parse_constant=pytest.fail)  # NaN/Infinity fail the test
        assert "ts" not in doc
    assert doc["y"] == [[None, 0.25, None], [0.5, None, 0.125]]
    assert doc["label"] == ["b", "a"] and doc["p"] == [0.25, 0.5]
    all_nan = np.full((1, 2), np.nan, np.float32)
    doc = json.loads(payloads.prediction(1, 3.0, all_nan, "m", ["a", "b"], single=True))
    assert doc["y"] == [None, None] and doc["label"] is None and doc["p"] is None
    assert doc["ts"] == 3.0


def test_a_prediction_from_its_batchs_outputs_is_the_one_from_its_own_rows():
    """The service converts a batch's outputs once and slices them per answer: the bytes are
    those of converting each answer's rows on their own, non-finite values included."""
    rng = np.random.default_rng(3)
    y = rng.normal(0, 2, (12, 3)).astype(np.float32)
    y[2, 1], y[5], y[7, 0], y[11, 2] = np.nan, np.nan, np.inf, -np.inf
    ys = payloads.Outputs.of(y)
    for start, stop in [(0, 1), (1, 4), (4, 6), (5, 6), (6, 12)]:
        single = stop - start == 1
        for labels in ((), ("a", "b", "c")):
            own = payloads.prediction(9, 2.5, y[start:stop], "m", labels, single=single)
            part = payloads.prediction(9, 2.5, ys.part(start, stop), "m", labels, single=single)
            assert part == own


def test_prediction_restart_and_boot():
    y = np.array([[0.5]], np.float32)
    doc = json.loads(payloads.prediction(1, None, y, "m", single=True, restart=True, boot=4))
    assert doc == {"seq": 1, "y": [0.5], "model": "m", "restart": True, "boot": 4}
    doc = json.loads(payloads.prediction(1, None, y, "m", single=True, boot=0))
    assert doc["boot"] == 0 and "restart" not in doc
    assert "boot" not in json.loads(payloads.prediction(1, None, y, "m", single=True))


def test_error_messages():
    doc = json.loads(payloads.error("bad_ts", "x" * 900, 3))
    assert doc == {"seq": 3, "error": "bad_ts", "detail": "x" * 500}
    doc = json.loads(payloads.error("late", "d", 3, {"count": 3, "id": "ab12cd"}))
    assert doc == {"seq": 3, "error": "late", "detail": "d", "count": 3, "id": "ab12cd"}
    doc = json.loads(payloads.error("c", "d", None, {"error": "x", "n": math.nan, "z": [math.inf]}))
    assert doc == {"seq": None, "error": "c", "detail": "d", "n": None, "z": [None]}
    odd = '\x00"\\\ud800\u2028</script>\n' * 40
    doc = json.loads(payloads.error("c", odd))
    assert doc["detail"] == odd[:500]
    doc = json.loads(payloads.error("c", "d", extra={"a": np.float32(0.5), "b": object()}))
    assert doc["a"] == 0.5 and isinstance(doc["b"], str)


# -- properties ------------------------------------------------------------------------------

_CONTENT_TYPES = (
    st.none()
    | st.text(max_size=30)
    | st.sampled_from(
        [*payloads.CONTENT_TYPES, "application/json; charset=utf-8", "APPLICATION/SENML+JSON"]
    )
)
_SCALARS = st.one_of(
    st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity", "1e400", "-1e999"]),
    st.sampled_from(["0", "-0", "1", "4294967295", "4294967296", "-1", HUGE, "-" + HUGE]),
    st.integers().map(str),
    st.integers(min_value=-(10**500), max_value=10**500).map(str),
    st.floats().map(lambda x: json.dumps(x)),
    st.tuples(st.integers(-9, 9), st.integers(-400, 400)).map(lambda t: f"{t[0]}e{t[1]}"),
    st.text(max_size=8).map(json.dumps),
    st.sampled_from(['"a"', '"b"', '"c"', '"seq"', '"boot"', '"urn:x/"']),
)
_TREES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.dictionaries(
            st.sampled_from(["seq", "ts", "boot", "values", "n", "v", "bn", "bt", "t", "x"]),
            inner,
            max_size=5,
        ).map(lambda d: "{" + ",".join(f'"{k}":{v}' for k, v in d.items()) + "}"),
    ),
    max_leaves=20,
)
_ROW = st.lists(_SCALARS, min_size=2, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@_SETTINGS
@given(st.binary(max_size=120), _CONTENT_TYPES)
def test_any_bytes_decode_or_refuse(payload, content_type):
    _total(payload, NAMES, content_type)


@_SETTINGS
@given(st.binary(max_size=80), st.sampled_from([b"\x01", b"\x02"]))
def test_any_frame_like_bytes_decode_or_refuse(rest, version):
    _total(version + rest, NAMES)


@_SETTINGS
@given(_TREES, _TREES, _TREES, _TREES, _ROW)
def test_any_json_tree_decodes_or_refuses(tree, seq, ts, boot, row):
    docs = [
        tree,
        f'{{"seq":1,"values":{tree}}}',
        f'{{"seq":{seq},"ts":{ts},"boot":{boot},"values":[{tree},1,2]}}',
        f'{{"seq":{seq},"ts":{ts},"boot":{boot},"values":{row}}}',
        f'{{"seq":1,"values":[{row},{row}]}}',
        f"[{tree}]",
        f'[{{"bn":{tree},"n":"a","v":1}}]',
        f'[{{"bn":"x/","bt":{ts},"n":{seq},"v":{tree},"t":{boot}}},{{"n":"b","v":2}}]',
        f'[{{"n":"seq","v":{seq}}},{{"n":"boot","v":{boot}}},{{"n":"a","v":{tree}}},'
        f'{{"n":"b","t":{ts},"v":1}},{{"n":"c","v":3}}]',
    ]
    for doc in docs:
        for content_type in (None, "application/json", "application/senml+json"):
            _total(doc.encode(), NAMES, content_type)
        _parse_or_refuse(doc.encode())


_U32 = st.integers(0, 2**32 - 1)
_BOOTS = st.none() | _U32
_TS = st.floats(0, payloads.MAX_TS - 10)


@_SETTINGS
@given(
    _U32,
    _BOOTS,
    st.none() | _TS,
    st.integers(1, 4).flatmap(
        lambda k: st.lists(
            st.lists(
                st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=3, max_size=3
            ),
            min_size=k,
            max_size=k,
        )
    ),
)
def test_frame_roundtrip(seq, boot, ts, rows):
    values = np.array(rows, np.float32)
    body = payloads.encode_frame(seq, values, ts, boot=boot)
    assert body[0] == (1 if boot is None else 2)
    s = payloads.decode(body, NAMES)
    assert (s.seq, s.ts, s.boot) == (seq, ts, boot)
    np.testing.assert_array_equal(s.values, values.astype(np.float64))


@_SETTINGS
@given(
    _U32,
    _BOOTS,
    _TS,
    st.lists(
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=3, max_size=3),
        min_size=1,
        max_size=4,
    ),
)
def test_senml_and_json_roundtrip(seq, boot, ts, rows):
    values = np.array(rows, np.float64)
    s = payloads.decode(payloads.encode_senml(seq, values, NAMES, ts, 0.5, boot=boot), NAMES)
    assert (s.seq, s.ts, s.boot) == (seq, ts, boot)
    np.testing.assert_array_equal(s.values, values)
    doc = {"seq": seq, "ts": ts, "values": rows}
    if boot is not None:
        doc["boot"] = boot
    s = payloads.decode(json.dumps(doc).encode(), NAMES)
    assert (s.seq, s.ts, s.boot) == (seq, ts, boot)
    np.testing.assert_array_equal(s.values, values)


# -- the hostile corpus ----------------------------------------------------------------------


def test_hostile_corpus_decodes_or_refuses():
    assert len(hostile.CASES) >= 40 and len({n for n, _ in hostile.CASES}) == len(hostile.CASES)
    codes = {}
    for name, body in hostile.CASES:
        codes[name] = _total(body, hostile.FEATURES)
        for content_type in ("application/json", "application/octet-stream"):
            _total(body, hostile.FEATURES, content_type)
    assert codes["field_values_3000_deep"] == "too_deep"
    assert codes["field_huge_int_in_ts"] == "bad_ts"
    assert codes["field_senml_bn_int"] == "bad_senml"
    assert codes["boot_negative"] == codes["boot_2_pow_32"] == "bad_boot"
    assert codes["brackets_in_string"] == "ok"
    assert all(codes[n] == "ok" for n in codes if n.startswith("valid_"))


def test_hostile_control_corpus_parses_or_refuses():
    for _, body in hostile.CONTROL_CASES:
        _parse_or_refuse(body)
    assert payloads.parse_json(dict(hostile.CONTROL_CASES)["reset"]) == {"cmd": "reset"}


def test_generated_payloads_decode_or_refuse():
    for i in range(12):
        _check_samples(payloads.decode(hostile.valid_payload(i), hostile.FEATURES), 6)
    bodies = list(hostile.generate(7, 5000))
    assert bodies[:50] == list(hostile.generate(7, 50))
    assert bodies[:50] != list(hostile.generate(8, 50))
    outcomes = {_total(body, hostile.FEATURES) for body in bodies}
    assert {"ok", "too_deep", "bad_json", "wrong_shape"} <= outcomes
    for body in bodies[:1000]:
        _parse_or_refuse(body)


def test_generate_accepts_a_valid_factory():
    bodies = list(hostile.generate(1, 100, valid=lambda i: b'{"seq":%d,"values":[1,2,3]}' % i))
    assert len(bodies) == 100
    for body in bodies:
        _total(body, NAMES)


def _outcome(payload: bytes) -> object:
    try:
        s = payloads.decode(payload, hostile.FEATURES)
    except payloads.PayloadError as exc:
        return ("refused", exc.code, exc.detail, exc.seq)
    return ("samples", s.seq, s.ts, s.boot, s.values.tobytes(), s.values.shape)


def test_the_c_json_codec_and_the_standard_library_give_the_same_results(monkeypatch):
    """orjson, when installed, only makes decoding faster: every hostile case, every mutated
    payload and every prediction come out the same as with the standard library alone."""
    assert payloads.orjson is not None, "orjson is part of the service extra"
    corpus = [p for _, p in hostile.CASES] + list(hostile.generate(11, 3000))
    corpus += [hostile._data(seq="12345678901234567", values="[1,2,3,4,5,1e400]")]
    fast = [_outcome(p) for p in corpus]
    y = np.array([[0.25, float("nan"), 1e-5, 3.4028234663852886e38]], np.float32)
    fast_out = payloads.prediction(7, 1.5, y, "m", ("a", "b", "c", "d"), single=True)
    monkeypatch.setattr(payloads, "orjson", None)
    assert [_outcome(p) for p in corpus] == fast
    slow_out = payloads.prediction(7, 1.5, y, "m", ("a", "b", "c", "d"), single=True)
    assert json.loads(fast_out) == json.loads(slow_out)


def test_floats_printed_in_full_are_read_by_the_c_codec():
    """Only an integer of 16 digits or more needs the standard library (orjson reads one
    beyond 64 bits as a float): the digits after a float's point are none, and a device
    printing its floats in full was decoded at a fifth of the speed."""
    full = (
        b'{"seq": 3, "ts": 1796104548.091172, '
        b'"values": [0.10490011715303971, -0.36159505490948474, 1.2345678901234567e-7]}'
    )
    assert payloads._parse(full, payloads.MAX_DEPTH) == (json.loads(full), True)
    for exact in (
        b'{"seq": 12345678901234567, "values": [1, 2, 3]}',
        b'{"seq": 1, "values": [-12345678901234567, 0.5, 1]}',
        b"12345678901234567",
        b'{"seq": 1, "values": [1.5, 12345678901234567.5, 1e+1234567890123456]}',
    ):
        assert payloads._parse(exact, payloads.MAX_DEPTH)[1] is False, exact


_ELEMENT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.just([]),
    st.just({}),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.lists(_ELEMENT, max_size=5),
        st.lists(st.lists(_ELEMENT, max_size=5), max_size=4),
        st.lists(
            st.lists(st.floats(-1e6, 1e6) | st.integers(-(2**70), 2**70), min_size=3, max_size=3),
            min_size=1,
            max_size=6,
        ),
        _ELEMENT,
    )
)
def test_plain_numbers_fast_path_equals_the_checked_path(values):
    """The one-scan path for plain numbers accepts exactly what the element-wise check accepts,
    with the same float64 values; everything else gets the element-wise path's error."""

    def outcome():
        try:
            return ("ok", payloads._values(values, 3, 5).tobytes())
        except PayloadError as exc:
            return ("refused", exc.code, exc.detail)

    fast = outcome()
    original = payloads._plain
    payloads._plain = lambda v, f, finite: None
    try:
        assert outcome() == fast
    finally:
        payloads._plain = original


def test_plain_numbers_fast_path_refuses_what_the_check_refuses():
    for values, code in [
        ([1.0, True, 3.0], "bad_values"),
        ([[1.0, 2.0, 3.0], [1.0, "2", 3.0]], "bad_values"),
        ([[1.0, 2.0, 3.0], [1.0, 2.0]], "bad_values"),
        ([1.0, 2.0, 10**400], "not_finite"),
        ([[1.0, 2.0, 3.0, 4.0]], "wrong_shape"),
    ]:
        with pytest.raises(PayloadError) as err:
            payloads._values(values, 3, None)
        assert err.value.code == code, values
    assert payloads._values([[1, 2, 3], [4.5, -0.0, 2**64]], 3, None).tolist() == [
        [1.0, 2.0, 3.0],
        [4.5, -0.0, float(2**64)],
    ]

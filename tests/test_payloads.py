import json
import math

import numpy as np
import pytest

from edge import payloads
from edge.payloads import PayloadError

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

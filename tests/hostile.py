"""Hostile payloads for a 6-feature model: named cases and a cheap deterministic mutator.

``CASES`` go to a data topic, ``CONTROL_CASES`` to a control topic; ``generate`` mutates valid
JSON, SenML and binary frames. Each entry of the corpus must end in ``Samples`` or a
``PayloadError`` (``parse_json``: a document or ``PayloadError``), never a crash. The field
trial's reports are here verbatim. Only stdlib, numpy and edge.payloads: this module runs in
the device-like environment too (no TensorFlow).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Iterator

import numpy as np

from edge.payloads import encode_frame, encode_senml

FEATURES = [f"f{i}" for i in range(6)]
ROW = [0.5, -1.25, 2.0, 3.5, 0.0, 1.0]
ROW_JSON = json.dumps(ROW)
TS = 1_700_000_000.0
HUGE = "9" * 400  # the field trial's 400-digit integer
TOO_MANY_DIGITS = "7" * 5000  # beyond Python's 4300-digit int-string limit: json raises

_V1 = struct.Struct("<BBHId")
_V2 = struct.Struct("<BBHIdI")


def _data(**fields: str) -> bytes:
    """A JSON data message with fields given as raw JSON text (so they can be anything)."""
    fields.setdefault("seq", "1")
    fields.setdefault("values", ROW_JSON)
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


def _senml(*records: str) -> bytes:
    return ("[" + ",".join(records) + "]").encode()


_FEATURE_RECORDS = ",".join(f'{{"n":"f{i}","v":{v}}}' for i, v in enumerate(ROW))
HUGE_V = f'"v":{HUGE}'
_BODY = np.asarray(ROW, "<f4").tobytes()


def _v1(k: int = 1, seq: int = 1, ts: float = TS, version: int = 1, body: bytes = _BODY) -> bytes:
    return _V1.pack(version, 0, k, seq, ts) + body


def _v2(k: int = 1, seq: int = 1, ts: float = TS, boot: int = 3, flags: int = 1) -> bytes:
    return _V2.pack(2, flags, k, seq, ts, boot) + _BODY


CASES: list[tuple[str, bytes]] = [
    # -- the field trial's reports
    ("field_values_3000_deep", _data(values="[" * 3000 + "]" * 3000)),
    ("field_values_3000_deep_unclosed", _data(values="[" * 3000)[:-1]),
    ("field_huge_int_in_values", _data(values=f"[{HUGE},1,2,3,4,5]")),
    ("field_huge_int_in_ts", _data(ts=HUGE)),
    ("field_senml_bn_int", b'[{"bn": 5, "n": "f0", "v": 1}]'),
    ("deep_object_nesting", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    ("deep_object_in_values", _data(values='{"a":' * 50 + "1" + "}" * 50)),
    ("deep_mixed_nesting", b'[{"a":' * 1500),
    ("nesting_one_over_limit", _data(values="[" * 8 + ROW_JSON + "]" * 8)),
    # -- brackets and quotes inside strings must not count as nesting (valid)
    ("brackets_in_string", _data(note='"' + "[" * 3000 + '"')),
    ("escaped_quote_then_brackets", _data(note='"\\"' + "[{" * 1000 + '\\\\"')),
    # -- numbers
    ("int_beyond_digit_limit_in_values", _data(values=f"[{TOO_MANY_DIGITS},1,2,3,4,5]")),
    ("int_beyond_digit_limit_in_seq", _data(seq=TOO_MANY_DIGITS)),
    ("huge_seq", _data(seq=HUGE)),
    ("huge_negative_seq", _data(seq="-" + HUGE)),
    ("float_overflow_in_values", _data(values="[1e400,1,2,3,4,5]")),
    ("negative_float_overflow_in_values", _data(values="[-1e400,1,2,3,4,5]")),
    ("nan_literal_in_values", _data(values="[NaN,1,2,3,4,5]")),
    ("infinity_literal_in_values", _data(values="[Infinity,1,2,3,4,5]")),
    ("seq_negative", _data(seq="-1")),
    ("seq_2_pow_32", _data(seq=str(2**32))),
    ("seq_float", _data(seq="1.0")),
    ("seq_bool", _data(seq="true")),
    ("seq_string", _data(seq='"1"')),
    ("seq_null", _data(seq="null")),
    # -- timestamps
    ("ts_1e300", _data(ts="1e300")),
    ("ts_negative", _data(ts="-5")),
    ("ts_after_2100", _data(ts="4102444801")),
    ("ts_1e400", _data(ts="1e400")),
    ("ts_nan_literal", _data(ts="NaN")),
    ("ts_string", _data(ts='"now"')),
    ("ts_bool", _data(ts="true")),
    ("ts_2_pow_63", _data(ts=str(2**63))),
    # -- boot
    ("boot_negative", _data(boot="-1")),
    ("boot_2_pow_32", _data(boot=str(2**32))),
    ("boot_huge", _data(boot=HUGE)),
    ("boot_bool", _data(boot="true")),
    ("boot_float", _data(boot="1.5")),
    ("boot_string", _data(boot='"7"')),
    ("boot_array", _data(boot="[1]")),
    # -- values of the wrong type or shape
    ("values_object", _data(values='{"f0":1}')),
    ("values_string", _data(values='"1,2,3,4,5,6"')),
    ("values_numeric_strings", _data(values='["1","2","3","4","5","6"]')),
    ("values_empty", _data(values="[]")),
    ("values_empty_rows", _data(values="[[],[]]")),
    ("values_ragged", _data(values=f"[{ROW_JSON},[1,2]]")),
    ("values_3d", _data(values=f"[[{ROW_JSON}]]")),
    ("values_mixed_rows", _data(values=f"[{ROW_JSON},1]")),
    ("values_bools", _data(values="[true,false,true,false,true,false]")),
    ("values_nulls", _data(values="[null,null,null,null,null,null]")),
    ("values_null", _data(values="null")),
    ("values_wrong_width", _data(values="[1,2,3,4,5]")),
    ("values_missing", b'{"seq":1}'),
    ("not_an_object", b"[1,2,3,4,5,6]"),
    # -- SenML
    ("senml_n_int", b'[{"n": 5, "v": 1}]'),
    ("senml_bn_list", b'[{"bn": ["a"], "n": "f0", "v": 1}]'),
    ("senml_bt_string", _senml('{"bt":"x","n":"seq","v":1}', _FEATURE_RECORDS)),
    ("senml_bt_huge", _senml(f'{{"bt":{HUGE},"n":"seq","v":1}}', _FEATURE_RECORDS)),
    ("senml_bt_1e400", _senml('{"bt":1e400,"n":"seq","v":1}', _FEATURE_RECORDS)),
    ("senml_t_huge", _senml(f'{{"bt":{TS},"n":"f0","t":{HUGE},"v":1}}')),
    ("senml_time_negative", _senml('{"bt":5,"n":"seq","v":1}', '{"n":"f0","t":-10,"v":1}')),
    ("senml_t_bool", _senml(f'{{"bt":{TS},"n":"f0","t":true,"v":1}}')),
    ("senml_v_huge", _senml('{"n":"seq","v":1}', _FEATURE_RECORDS.replace('"v":0.5', HUGE_V))),
    ("senml_v_string", _senml('{"n":"f0","v":"1"}')),
    ("senml_v_bool", _senml('{"n":"f0","v":true}')),
    ("senml_records_not_objects", b"[1, 2, 3]"),
    ("senml_nested_arrays", b"[[], [{}]]"),
    ("senml_empty", b"[]"),
    ("senml_seq_2_pow_32", _senml(f'{{"n":"seq","v":{2**32}}}', _FEATURE_RECORDS)),
    ("senml_seq_huge", _senml(f'{{"n":"seq","v":{HUGE}}}', _FEATURE_RECORDS)),
    ("senml_boot_negative", _senml('{"n":"seq","v":1}', '{"n":"boot","v":-1}', _FEATURE_RECORDS)),
    ("senml_boot_missing_v", _senml('{"n":"seq","v":1}', '{"n":"boot"}', _FEATURE_RECORDS)),
    ("senml_deep", b'[{"n":"f0","v":' + b"[" * 3000),
    # -- encodings and framing of the text
    ("empty", b""),
    ("whitespace_only", b"  \n\t "),
    ("nul_bytes", b"\x00" * 32),
    ("nul_inside_json", _data(values=ROW_JSON).replace(b"0.5", b"0\x005")),
    ("invalid_utf8", b'{"seq":1,"values":[1,2,3,4,5,6],"x":"\xff\xfe"}'),
    ("overlong_utf8", b'{"seq":1,"values":[1,2,3,4,5,6],"x":"\xc0\xaf"}'),
    ("lone_surrogate_escape", _data(note='"\\ud800"')),
    ("bom_then_json", b"\xef\xbb\xbf" + _data()),
    ("utf16_json", _data().decode().encode("utf-16")),
    ("utf32_json", _data().decode().encode("utf-32")),
    ("truncated_json", _data()[:-3]),
    ("trailing_garbage", _data() + b"}}}"),
    ("two_documents", _data() + _data()),
    # -- retained-looking garbage and last wills
    ("retained_online", b"online"),
    ("retained_offline", b"offline"),
    ("retained_lwt_object", b'{"status":"offline","ts":1700000000}'),
    ("json_string", b'"reset"'),
    ("json_null", b"null"),
    ("json_number", b"42"),
    ("json_true", b"true"),
    # -- 6 KB payloads
    ("6kb_whitespace", b"{" + b" " * 6144 + b'"seq":1,"values":' + ROW_JSON.encode() + b"}"),
    ("6kb_string_field", _data(note='"' + "x" * 6144 + '"')),
    ("6kb_many_rows", _data(values="[" + ",".join([ROW_JSON] * 170) + "]")),
    ("6kb_open_brackets", b"[" * 6144),
    ("6kb_random", random.Random(6).randbytes(6144)),
    # -- binary frames
    ("frame_v1_wrong_k", _v1(k=3)),
    ("frame_v1_k_zero", _v1(k=0, body=b"")),
    ("frame_v1_k_max_short_body", _v1(k=65535)),
    ("frame_v1_one_byte_short", _v1()[:-1]),
    ("frame_v1_one_byte_long", _v1() + b"\x00"),
    ("frame_v1_header_only_truncated", _v1()[:10]),
    ("frame_v1_inf_ts", _v1(ts=float("inf"))),
    ("frame_v1_negative_inf_ts", _v1(ts=float("-inf"))),
    ("frame_v1_huge_ts", _v1(ts=1e300)),
    ("frame_v1_negative_ts", _v1(ts=-5.0)),
    ("frame_v1_nan_value", _v1(body=np.array([np.nan, 0, 0, 0, 0, 0], "<f4").tobytes())),
    ("frame_v1_inf_value", _v1(body=np.array([np.inf, 0, 0, 0, 0, 0], "<f4").tobytes())),
    ("frame_version_0", _v1(version=0)),
    ("frame_version_3", _v1(version=3)),
    ("frame_v2_wrong_k", _v2(k=2)),
    ("frame_v2_wrong_length", _v2()[:-2]),
    ("frame_v2_v1_sized_header", _V1.pack(2, 1, 1, 1, TS) + _BODY),
    ("frame_v2_header_truncated", _v2()[:18]),
    ("frame_v2_inf_ts", _v2(ts=float("inf"))),
    ("frame_v2_huge_ts", _v2(ts=1e300)),
    ("frame_v2_boot_flag_clear", _v2(flags=0, boot=2**32 - 1)),
    ("frame_v2_reserved_flags", _v2(flags=0xFF)),
    ("frame_v1_only_version_byte", b"\x01"),
    ("frame_v2_only_version_byte", b"\x02"),
    # -- valid messages, for contrast
    ("valid_json", _data(ts=str(TS), boot="3")),
    ("valid_senml", encode_senml(1, np.array([ROW]), FEATURES, TS, 0.1, boot=3)),
    ("valid_frame_v1", encode_frame(1, np.array([ROW]), TS)),
    ("valid_frame_v2", encode_frame(1, np.array([ROW, ROW]), TS, boot=3)),
]

CONTROL_CASES: list[tuple[str, bytes]] = [
    ("reset", b'{"cmd": "reset"}'),
    ("reload", b'{"cmd": "reload"}'),
    ("deep_array", b"[" * 3000 + b"]" * 3000),
    ("deep_object", b'{"cmd":' * 3000 + b'"reset"' + b"}" * 3000),
    ("deep_unclosed", b'{"cmd":"reset","x":' + b"[" * 5000),
    ("deep_in_string_is_fine", b'{"cmd":"reset","note":"' + b"[" * 3000 + b'"}'),
    ("array", b'["reset"]'),
    ("string", b'"reset"'),
    ("null", b"null"),
    ("number", b"42"),
    ("true", b"true"),
    ("empty_object", b"{}"),
    ("unknown_cmd", b'{"cmd": "explode"}'),
    ("cmd_upper_case", b'{"cmd": "RESET"}'),
    ("cmd_list", b'{"cmd": ["reset"]}'),
    ("cmd_object", b'{"cmd": {"reset": true}}'),
    ("cmd_null", b'{"cmd": null}'),
    ("cmd_number", b'{"cmd": 1e400}'),
    ("cmd_nan", b'{"cmd": NaN}'),
    ("huge_int_seq", b'{"cmd": "reset", "seq": ' + HUGE.encode() + b"}"),
    ("huge_int_boot", b'{"cmd": "reset", "boot": ' + HUGE.encode() + b"}"),
    ("int_beyond_digit_limit", b'{"cmd": "reset", "seq": ' + TOO_MANY_DIGITS.encode() + b"}"),
    ("boot_negative", b'{"cmd": "reset", "boot": -1}'),
    ("cmd_6kb", b'{"cmd": "' + b"r" * 6144 + b'"}'),
    ("truncated", b'{"cmd": "reset"'),
    ("empty", b""),
    ("nul_bytes", b"\x00" * 16),
    ("invalid_utf8", b'{"cmd": "\xff"}'),
    ("bom", b'\xef\xbb\xbf{"cmd": "reset"}'),
    ("utf16", '{"cmd": "reset"}'.encode("utf-16")),
    ("lone_surrogate", b'{"cmd": "\\udc00"}'),
    ("binary_frame", encode_frame(1, np.array([ROW]))),
    ("duplicate_keys", b'{"cmd": "reset", "cmd": "reload"}'),
]


# -- mutation --------------------------------------------------------------------------------

_JUNK = [
    HUGE.encode(),
    TOO_MANY_DIGITS.encode(),
    b"1e400",
    b"-1e400",
    b"NaN",
    b"-Infinity",
    b"4294967296",
    b"-1",
    b"1e300",
    b"true",
    b"null",
    b'"x"',
    b"{}",
    b"[]",
    b'{"a":[1]}',
    b"\x00",
    b"\xff",
    b'\\"',
    b'"',
]
_DEPTHS = [1, 2, 7, 8, 9, 64, 3000]
_NUMBER_CHARS = frozenset(b"-+.eE0123456789")


def _flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    i = rng.randrange(len(data))
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]


def _poke(rng: random.Random, data: bytes) -> bytes:
    """A random byte early on: headers (frame version, k, seq) and JSON openers."""
    i = rng.randrange(min(len(data), 24) or 1)
    return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _duplicate(rng: random.Random, data: bytes) -> bytes:
    a, b = sorted((rng.randrange(len(data) + 1), rng.randrange(len(data) + 1)))
    return data[:b] + data[a:b] + data[b:]


def _delete(rng: random.Random, data: bytes) -> bytes:
    a, b = sorted((rng.randrange(len(data) + 1), rng.randrange(len(data) + 1)))
    return data[:a] + data[b:]


def _brackets(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    k = rng.choice(_DEPTHS)
    opener = rng.choice((b"[", b'{"a":', b"[{"))
    closer = b"]" if opener == b"[" else b""
    return data[:i] + opener * k + data[i:] + closer * k * rng.randrange(2)


def _junk(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.choice(_JUNK) + data[i:]


def _swap(rng: random.Random, data: bytes) -> bytes:
    """Replace the number (or token) at a random position by a value of another type."""
    i = rng.randrange(len(data) + 1)
    j = i
    while j < len(data) and data[j] in _NUMBER_CHARS:
        j += 1
    return data[:i] + rng.choice(_JUNK) + data[max(j, i + 1) :]


_MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [
    _flip,
    _flip,
    _poke,
    _truncate,
    _duplicate,
    _delete,
    _brackets,
    _junk,
    _swap,
    _swap,
]

_ROWS = [[round((i * 7 + j * 3) % 97 / 8 - 6, 3) for j in range(6)] for i in range(16)]
_ROWS_JSON = [json.dumps(r) for r in _ROWS]
_ROWS_F4 = [np.asarray(r, "<f4").tobytes() for r in _ROWS]
_SENML_ROWS = [  # two samples: row r at t=0, row r-1 at t=0.1
    ",".join(
        f'{{"n":"f{j}","t":{t},"v":{v}}}'
        for t, row in ((0, _ROWS[r]), (0.1, _ROWS[r - 1]))
        for j, v in enumerate(row)
    )
    for r in range(len(_ROWS))
]


def valid_payload(i: int) -> bytes:
    """The i-th valid message for a 6-feature model (seq = i), cycling through all formats."""
    seq = i % 2**32
    ts = TS + i * 0.1
    r = i % len(_ROWS)
    kind = i % 6
    if kind == 0:
        return b'{"seq":%d,"ts":%r,"values":%s}' % (seq, ts, _ROWS_JSON[r].encode())
    if kind == 1:
        rows = ",".join((_ROWS_JSON[r], _ROWS_JSON[r - 1]))
        return b'{"seq":%d,"ts":%r,"boot":%d,"values":[%s]}' % (seq, ts, i % 7, rows.encode())
    if kind in (2, 3):
        boot = b',{"n":"boot","v":%d}' % (i % 7) if kind == 3 else b""
        head = b'[{"bn":"urn:dev:%d/","bt":%r,"n":"seq","v":%d}%s,' % (i % 5, ts, seq, boot)
        return head + _SENML_ROWS[r].encode() + b"]"
    if kind == 4:
        return _V1.pack(1, 0, 1, seq, ts) + _ROWS_F4[r]
    return _V2.pack(2, 1, 2, seq, ts, i % 7) + _ROWS_F4[r] + _ROWS_F4[r - 1]


def generate(seed: int, n: int, valid: Callable[[int], bytes] | None = None) -> Iterator[bytes]:
    """n mutated payloads (1-3 cheap mutations of ``valid(i)`` each), the same for one seed."""
    rng = random.Random(seed)
    make = valid or valid_payload
    mutators = _MUTATORS
    for i in range(n):
        data = make(i)
        for _ in range(rng.randint(1, 3)):
            data = mutators[rng.randrange(len(mutators))](rng, data)
        yield data

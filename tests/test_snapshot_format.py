import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from edge import snapshot as fmt
from edge.errors import SnapshotError


def sample() -> fmt.Snapshot:
    return fmt.Snapshot(
        "ab" * 32,
        [["h0", 3, "int8", 0.1, 0], ["c0", 3, "float32", 0.0, 0]],
        ["dev-1", "dév/2"],
        np.array([5, -1]),
        [np.array([[1, 2, 3], [4, 5, 6]], np.int8), np.ones((2, 3), np.float32)],
        {"note": 1},
    )


def test_roundtrip(tmp_path):
    path = tmp_path / "s.bin"
    fmt.write_atomic(path, fmt.encode(sample()))
    got = fmt.read(path)
    assert got.streams == ["dev-1", "dév/2"] and got.extra == {"note": 1}
    np.testing.assert_array_equal(got.last_seq, [5, -1])
    np.testing.assert_array_equal(got.arrays[0], sample().arrays[0])
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:20], "too short|checksum"),
        (lambda b: b"NOTSNAP!" + b[8:], "bad magic"),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "checksum"),
        (lambda b: b[:8] + b"\x09\x00" + b[10:], "version 9"),
    ],
)
def test_damaged_files_are_refused(tmp_path, mutate, message):
    data = mutate(fmt.encode(sample()))
    with pytest.raises(SnapshotError, match=message):
        fmt.decode(data, "snap")


@pytest.mark.parametrize("kind", ["a FIFO", "a character device", "a directory"])
def test_a_snapshot_path_that_is_no_regular_file_is_refused_without_reading_it(tmp_path, kind):
    """A FIFO blocked ``read`` forever and ``/dev/zero`` was read until memory ran out: each
    is refused without a read, naming what it is (a directory too)."""
    path = tmp_path / "state.bin"
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a directory":
        path.mkdir()
    else:
        path = Path("/dev/zero")
    with pytest.raises(SnapshotError, match=f"{path}: cannot read snapshot: it is {kind}, not"):
        fmt.read(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(SnapshotError, match="nope.bin"):
        fmt.read(tmp_path / "nope.bin")


def resigned(data: bytes, header_edit) -> bytes:
    """Snapshot ``data`` with its header changed by ``header_edit``, its digest made again:
    intact as far as the digest can tell, as one of another writer or edited by hand would be."""
    _, version, _, hlen = fmt._HEAD.unpack_from(data)
    head = json.dumps(header_edit(json.loads(data[16 : 16 + hlen]))).encode()
    body = fmt._HEAD.pack(fmt.MAGIC, version, 0, len(head)) + head + data[16 + hlen : -32]
    return body + hashlib.sha256(body).digest()


def signed(header_edit) -> bytes:
    return resigned(fmt.encode(sample()), header_edit)


def edited(key, value):
    return lambda h: {**h, key: value}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: {k: v for k, v in h.items() if k != "model_sha256"}, "model_sha256 None is"),
        (edited("model_sha256", 7), "model_sha256 7 is not a string"),
        (edited("extra", "x"), "extra 'x' is not a JSON object"),
        (edited("extra", [1, 2]), r"extra \[1, 2\] is not a JSON object"),
        (edited("streams", ["dev-1", "dev-1"]), "stream 'dev-1' is listed twice"),
        (edited("streams", [1, 2]), r"streams \[1, 2\] is not a list of stream ids"),
        (edited("boot_history", 10**30), "boot_history 10{30} is not a whole number"),
        (edited("gap_slots", 1e300), "gap_slots 1e\\+300 is not a whole number"),
        (edited("gap_slots", -1), "gap_slots -1 is not a whole number"),
        (
            edited("state_layout", [["h0", 10**30, "int8", 0.1, 0], ["c0", 3, "float32", 0, 0]]),
            "state_layout 'h0' width 10{30} is not a whole number",
        ),
        (edited("state_layout", {"h0": 3}), "state_layout {'h0': 3} is not a list"),
        (lambda h: [h], "the header is list, not a JSON object"),
    ],
)
def test_a_signed_snapshot_with_a_header_of_the_wrong_shape_is_refused_naming_it(edit, message):
    """The digest only says the file is as it was written. A header of another writer, or
    edited and signed again, crashed the restore with a KeyError, TypeError or OverflowError
    (a traceback at start-up instead of the fallback to an older snapshot), and a stream
    listed twice was taken, one of its two states silently lost."""
    with pytest.raises(SnapshotError, match=f"snap: malformed snapshot content: {message}"):
        fmt.decode(signed(edit), "snap")


def test_a_signed_snapshot_header_as_written_is_read():
    """The re-signing of the test above changes nothing by itself."""
    got = fmt.decode(signed(lambda h: h), "snap")
    assert got.streams == ["dev-1", "dév/2"] and got.extra == {"note": 1}


def test_idle_seconds_are_kept_and_optional(tmp_path):
    """How long each stream had been idle is a header field an older edge-lstm ignores (the
    version stays); a snapshot without it reads as one that does not say."""
    snap = sample()
    assert fmt.decode(fmt.encode(snap)).idle is None
    snap.idle = np.array([12.5, 0.0])
    got = fmt.decode(fmt.encode(snap))
    np.testing.assert_array_equal(got.idle, [12.5, 0.0])
    assert fmt.encode(snap)[8:10] == b"\x02\x00"  # format version 2 still


@pytest.mark.parametrize(
    "idle, message",
    [([1.0], "not a list of 2 numbers"), ([1.0, -3.0], "negative"), (["a", 1.0], "malformed")],
)
def test_bad_idle_seconds_are_refused(idle, message):
    with pytest.raises(SnapshotError, match=message):
        fmt.decode(signed(edited("idle_seconds", idle)), "snap")


@pytest.mark.parametrize(
    "boots, gaps, message",
    [
        ([[-(2**63)], [-1]], [[[0, 0]], [[0, 0]]], f"boot id {-(2**63)} is outside -1\\.\\."),
        ([[2**32], [7]], [[[0, 0]], [[0, 0]]], f"boot id {2**32} is outside"),
        ([[1], [-1]], [[[4, -3]], [[0, 0]]], "gap -3 is outside 0\\.\\.4294967295"),
        ([[1], [-1]], [[[-(2**63), 2]], [[0, 0]]], f"gap {-(2**63)} is outside"),
    ],
)
def test_a_signed_snapshot_with_numbering_out_of_range_is_refused(boots, gaps, message):
    """Signed, so only the range tells: such ids and counts were restored as they were."""
    snap = sample()
    snap.boots, snap.gaps = np.array(boots, np.int64), np.array(gaps, np.int64)
    with pytest.raises(SnapshotError, match=f"snap: malformed snapshot content: {message}"):
        fmt.decode(fmt.encode(snap), "snap")
    snap.boots, snap.gaps = np.array([[3], [-1]], np.int64), np.array([[[4, 2]], [[0, 0]]])
    assert fmt.decode(fmt.encode(snap), "snap").boots.tolist() == [[3], [-1]]


def test_a_header_of_many_streams_is_the_json_of_one_call():
    """The header is encoded a slice of its long lists at a time (the writer lets the thread
    answering samples in between): the bytes are the ones one ``json.dumps`` writes."""
    n = 2 * fmt.SLICE + 7
    snap = fmt.Snapshot(
        "ab" * 32,
        [["h0", 2, "int8", 0.1, 0]],
        [f"dév-{i}" for i in range(n)],
        np.arange(n),
        [np.zeros((n, 2), np.int8)],
        {"lsn": 3, "reorder": {f"s{i}": [i, []] for i in range(n)}},
        idle=np.linspace(0, 99.9999, n),
    )
    data = fmt.encode(snap)
    (length,) = np.frombuffer(data, "<u4", 1, 12)
    header = data[16 : 16 + int(length)]
    assert header == json.dumps(json.loads(header)).encode()
    got = fmt.decode(data)
    assert got.streams == snap.streams and got.extra == snap.extra
    np.testing.assert_allclose(got.idle, np.round(snap.idle, 3))

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

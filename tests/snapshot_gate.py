"""``python -m tests.snapshot_gate GATE serve ...``: ``edge-lstm`` whose snapshot writes wait
at a gate, for tests of what a service does while one is being written (answers samples, is
killed, sees the write fail).

Before writing its n-th snapshot file (counted from 1) the process creates ``GATE.n`` and waits
until ``GATE.n.go`` exists; then it writes the file, or fails with EIO when that file says
``fail``. Everything else is the real service.
"""

from __future__ import annotations

import errno
import itertools
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from edge import snapshot


def gated(gate: str) -> None:
    write = snapshot.write_atomic
    count = itertools.count(1)

    def write_atomic(path: str | Path, data: bytes | Iterable[bytes | memoryview]) -> None:
        if Path(path).name.startswith("snap-"):
            n = next(count)
            Path(f"{gate}.{n}").touch()
            go = Path(f"{gate}.{n}.go")
            while not go.exists():  # held here as long as the test wants
                time.sleep(0.01)
            if go.read_text().strip() == "fail":
                raise OSError(errno.EIO, "Input/output error")
        write(path, data)

    snapshot.write_atomic = write_atomic


if __name__ == "__main__":
    gated(sys.argv.pop(1))
    from edge.cli import main

    raise SystemExit(main())

"""Peak memory of a restart's recovery, by the size of the log segment it reads.

    .venv/bin/python -m bench.recovery_memory [--samples N ...]

For each N: a state directory whose log holds N one-sample records of 1,000 streams (6
features), no snapshot; a fresh process recovers it (``Journal.recover``, as a start does)
and reports the segment's size, its peak RSS and its CPU time, beside the same for a log of
200 records: what the log costs is the difference. ``journal.SEGMENT_MAX`` bounds the segment
a restart can meet (a checkpoint is asked for past it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.errors import SnapshotError
from edge.journal import SEGMENT_MAX, Journal
from edge.wal import Record


def _no_snapshot(path: Path) -> None:
    raise SnapshotError(f"{path}: none")


def write(state: Path, n: int) -> int:
    j = Journal(state)
    j.recover(_no_snapshot)
    j.open()
    for i in range(0, n, 200):
        j.append(
            [
                Record(
                    f"s{k % 1000}", k // 1000 + 1, 1.5, np.full((1, 6), k, np.float32), lsn=k + 1
                )
                for k in range(i, min(i + 200, n))
            ]
        )
    j.close()
    return sum(p.stat().st_size for p in state.glob("wal-*"))


def read(state: Path) -> None:
    """Run in a fresh process: its peak RSS is the recovery's."""
    t0 = time.process_time()
    got = Journal(state).recover(_no_snapshot)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"entries": len(got.entries), "cpu_s": time.process_time() - t0, "rss_mb": rss})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[200, 175_000, 1_000_000])
    ap.add_argument("--read", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read:
        return read(args.read)
    print(f"SEGMENT_MAX {SEGMENT_MAX / 2**20:.0f} MiB")
    print("samples    segment MB  peak RSS MB  recovery CPU s")
    for n in args.samples:
        with tempfile.TemporaryDirectory() as tmp:
            size = write(Path(tmp) / "state", n)
            cmd = [sys.executable, "-m", "bench.recovery_memory", "--read", f"{tmp}/state"]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(f"{n:<10,} {size / 1e6:<11.1f} {got['rss_mb']:<12.0f} {got['cpu_s']:.1f}")


if __name__ == "__main__":
    main()

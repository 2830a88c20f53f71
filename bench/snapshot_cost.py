"""Where a checkpoint's time goes, piece by piece, for 1,000 and 10,000 streams.

    .venv/bin/python -m bench.snapshot_cost [BUNDLE] [--repeats N]

The pieces, in the order a checkpoint runs them: the carried entries written to the new log
segment and fsynced; the engine's state exported (array copies) with its idle times; the
header's JSON; the sha256 of the file; the write; the file's fsync; the rename and the
directory's fsync; the old generation's files removed. Also how long the answer path is held
by a checkpoint run in a background thread (``Journal.checkpoint(background=True)``): the part
the loop thread still runs, and the time one step of the engine takes while the write runs
beside it, against the same step with nothing beside it (the GIL the writer holds).
Medians of ``--repeats`` runs in milliseconds; the machine's other load shows in the spread.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import log, save
from edge import snapshot as snapfmt
from edge.engine import load
from edge.journal import Journal
from edge.wal import Mark

ROOT = Path(__file__).resolve().parent.parent


def _ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def pieces(engine: Any, work: Path) -> dict[str, float]:
    """One checkpoint's pieces, each timed alone."""
    t: dict[str, float] = {}
    seg = work / "wal.log"

    def carry() -> None:
        fd = os.open(seg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        os.write(fd, b"".join(snapfmt.MAGIC for _ in range(4)))
        os.fsync(fd)
        os.close(fd)

    t["carry_segment_fsync"], _ = _ms(carry)
    t["export_copy"], snap = _ms(lambda: engine.capture({"lsn": 1}, work / "snap.bin"))
    parts = iter(snapfmt.chunks(snap))
    t["header_json"], head = _ms(lambda: [next(parts), next(parts)])
    body = list(parts)
    data = [*head, *body]
    t["sha256"], _ = _ms(lambda: hashlib.sha256(b"".join(data[:-1])).digest())
    target = work / "snap.bin"
    tmp = work / ".snap.bin.tmp"
    f = open(tmp, "wb")  # noqa: SIM115 - timed piece by piece
    t["write"], _ = _ms(lambda: [f.write(p) for p in data] and f.flush())
    t["fsync"], _ = _ms(lambda: os.fsync(f.fileno()))
    f.close()

    def rename() -> None:
        os.replace(tmp, target)
        dfd = os.open(work, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)

    t["rename_dir_fsync"], _ = _ms(rename)
    t["drop_old_generation"], _ = _ms(lambda: target.unlink())
    t["bytes"] = float(sum(len(p) for p in data))
    return t


def overlap(engine: Any, work: Path, streams: int) -> dict[str, float]:
    """The loop thread's share of a background checkpoint, and one step's time with the
    write running beside it against the same step alone."""
    j = Journal(work / "state")
    j.recover(lambda p: {})
    j.append([Mark(0)])
    names = [f"s{i}" for i in range(min(streams, 256))]
    x = np.zeros((len(names), engine.manifest.features), np.float32)

    def step() -> float:
        ms, _ = _ms(lambda: engine.step_batch(names, x))
        return ms

    alone = [step() for _ in range(200)]
    t_start, _ = _ms(
        lambda: j.start_checkpoint(engine.take_snapshot, [Mark(0)], {"lsn": 1}, background=True)
    )
    beside = []
    while not j.pending_done():
        beside.append(step())
    t_finish, _ = _ms(j.finish)
    return {
        "loop_share_ms": t_start + t_finish,
        "step_alone_ms_median": statistics.median(alone),
        "step_alone_ms_max": max(alone),
        "step_beside_write_ms_median": statistics.median(beside) if beside else float("nan"),
        "step_beside_write_ms_max": max(beside) if beside else float("nan"),
        "steps_beside_write": float(len(beside)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle", nargs="?", default=str(ROOT / "build" / "bench" / "bundle-int8"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    results: dict[str, Any] = {"bundle": args.bundle, "repeats": args.repeats}
    for streams in (1_000, 10_000):
        engine = load(args.bundle, capacity=streams, max_batch=256)
        f = engine.manifest.features
        for lo in range(0, streams, 256):
            names = [f"s{i}" for i in range(lo, min(streams, lo + 256))]
            engine.step_batch(names, np.zeros((len(names), f), np.float32))
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="edge-lstm-snapcost-", dir=ROOT) as tmp:
                for k, v in {
                    **pieces(engine, Path(tmp)),
                    **overlap(engine, Path(tmp), streams),
                }.items():
                    runs.setdefault(k, []).append(v)
        log(f"{streams} streams (median / min / max of {args.repeats}, ms):")
        for k, v in runs.items():
            med = statistics.median(v)
            results[f"{streams}_{k}_median"] = med
            results[f"{streams}_{k}_min"] = min(v)
            log(f"  {k:32s} {med:10.2f} {min(v):10.2f} {max(v):10.2f}")
    path = save("snapshot_cost", results)
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

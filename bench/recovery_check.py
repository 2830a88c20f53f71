"""Post-mortem of a chaos run: does each recovery recompute what the live runtime published?

    python -m bench.recovery_check KEEP_DIR --bundle DIR [--reorder-ms 600]

``bench.chaos --keep KEEP_DIR`` copies the runtime's state directory just before every
``kill -9`` (``lives/NNN``) and writes every prediction it received (``predictions.jsonl``).
For each copy this recovers a processor in-process, exactly as the next start did, collects
every prediction the replay recomputes (also those the broker had acknowledged, which a
restart does not publish again) and compares it with what the live runtime published for the
same (stream, boot, seq). The first mismatches of each life are printed with the replayed log
entries of that stream around them: where replay and live processing part ways.

Exit code 0 when every recomputed prediction equals the published one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

Key = tuple[str, Any, int]


def published(path: Path) -> dict[Key, list[bytes]]:
    """(stream, boot, seq) -> the y of every prediction received for it, in arrival order."""
    out: dict[Key, list[bytes]] = defaultdict(list)
    for line in path.read_text().splitlines():
        stream, doc = json.loads(line)
        for key, y in expand(stream, doc):
            out[key].append(y)
    return out


def expand(stream: str, doc: dict[str, Any]) -> list[tuple[Key, bytes]]:
    y = np.asarray(doc["y"], dtype=np.float64)
    ys = y.reshape(1, -1) if y.ndim == 1 else y
    return [
        ((stream, doc.get("boot"), (int(doc["seq"]) + k) % 2**32), row.tobytes())
        for k, row in enumerate(ys)
    ]


def replay(state: Path, bundle: Path, reorder_ms: float) -> tuple[list[Any], list[Any]]:
    """Recover a processor from a copy of ``state``: (every prediction recomputed, entries)."""
    from edge import config
    from edge.journal import Journal
    from edge.metrics import Metrics
    from edge.mqtt_loop import open_engine
    from edge.processor import Processor

    work = Path(tempfile.mkdtemp(prefix="recovery-check-"))
    try:
        shutil.copytree(state, work / "state")
        cfg = config.load(
            None,
            env={},
            overrides={
                "model": str(bundle),
                "state_dir": str(work / "state"),
                "reorder_ms": reorder_ms,
            },
        )
        p = Processor(open_engine(cfg), cfg, Journal(cfg.state_dir), Metrics(), clock=lambda: 0.0)
        outs: list[Any] = []
        apply = p._apply

        def capture(r: Any) -> Any:
            got = apply(r)
            outs.extend(got)
            return got

        p._apply = capture  # type: ignore[method-assign]
        rec = p.recover()
        p.journal.close()
        return outs, rec.entries
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recovery_check", description=__doc__)
    ap.add_argument("keep", type=Path)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--reorder-ms", type=float, default=600.0)
    ap.add_argument("--show", type=int, default=3, help="mismatches shown per life")
    args = ap.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the replays' own answers are not news here
    live = published(args.keep / "predictions.jsonl")
    lives = sorted((args.keep / "lives").iterdir())
    bad_lives = 0
    for life in lives:
        outs, entries = replay(life, args.bundle, args.reorder_ms)
        mismatches = []
        n = 0
        for o in outs:
            if not o.topic.startswith("predictions/"):
                continue
            stream = o.topic.split("/", 1)[1]
            for key, y in expand(stream, json.loads(o.payload)):
                n += 1
                if key in live and y not in live[key]:
                    mismatches.append((key, o.lsn))
        print(
            f"{life.name}: {len(entries)} entries, {n} predictions recomputed, "
            f"{len(mismatches)} differ from what was published"
        )
        if not mismatches:
            continue
        bad_lives += 1
        for key, lsn in mismatches[: args.show]:
            print(f"   {key} (lsn {lsn})")
        stream = mismatches[0][0][0]
        first = mismatches[0][1]
        near = [e for e in entries if getattr(e, "stream", None) == stream]
        for e in near:
            if abs(getattr(e, "lsn", first) - first) < 400:
                fields = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
                fields.pop("values", None)
                print(f"      {type(e).__name__} {fields}")
    print(f"{bad_lives} of {len(lives)} recoveries differ")
    return 1 if bad_lives else 0


if __name__ == "__main__":
    sys.exit(main())

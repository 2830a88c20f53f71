"""Pi-class capacity of this runtime against another source tree's, in the same run.

    .venv/bin/python -m bench.host_capacity --against TREE [--bundle DIR]
        [--devices 140,200,280,360,440] [--rounds 2] [--rate 10] [--slowdown 4] [--seconds 6]

``firmware-sim host``'s trial (the runtime pinned to core 0 under a CPU quota of 1/slowdown
of it, the devices in processes of their own, the same judge: nothing missing, the last
tenth's median latency within 250 ms of the fastest early tenth) at fixed device counts, the
two runtimes alternating trial by trial, ``--rounds`` times: a search of one and then of the
other measured the machine's mood between them (200-300 devices on the same code). TREE is a
``git worktree add`` of an older commit; it must read the bundle (a tree older than format 3
refuses the example's softmax bundle: pass ``--bundle`` of a bundle both read).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench._common import example, log, save
from firmware_sim.host import trial


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--against", required=True, metavar="TREE", help="the other source tree")
    ap.add_argument("--bundle", help="bundle directory (default: the example model, int8)")
    ap.add_argument("--devices", default="140,200,280,360,440", help="device counts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=10.0, help="samples per second per device")
    ap.add_argument("--slowdown", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each trial")
    args = ap.parse_args()
    tree = Path(args.against)
    if not (tree / "edge" / "__init__.py").is_file():
        ap.error(f"--against {args.against}: no edge/ package there")
    try:
        counts = [int(c) for c in args.devices.split(",")]
    except ValueError:
        ap.error(f"--devices {args.devices!r}: not a comma-separated list of counts")
    bundle = Path(args.bundle) if args.bundle else example(1, 64)[1]
    runtimes: dict[str, Path | None] = {"this": None, "against": tree}
    trials: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for n in counts:
            for name, where in runtimes.items():
                t = trial(
                    bundle, n, args.rate, seconds=args.seconds, cores={0}, memory_mb=1024,
                    slowdown=args.slowdown, tree=where,
                )  # fmt: skip
                if t.get("notes"):
                    log(f"  {name}: {'; '.join(t['notes'])}")
                trials.append({"round": r + 1, "runtime": name, **t})
                log(
                    f"  round {r + 1}: {name:8s} {n:5d} devices x {args.rate:g} Hz: last tenth "
                    f"{t['latency_last_tenth_median_ms'] or 0:8.1f} ms, missing "
                    f"{t['predictions_missing']} -> "
                    f"{'keeps up' if t['kept_up_real_time'] else 'falls behind'}"
                )
    kept = {
        f"{name}_{n}": [
            bool(t["kept_up_real_time"])
            for t in trials
            if t["runtime"] == name and t["devices"] == n
        ]
        for name in runtimes
        for n in counts
    }
    print(f"{'devices':>8}  {'this: kept up':>14}  {'against: kept up':>17}")
    for n in counts:
        cells = [f"{sum(kept[f'{name}_{n}'])} of {len(kept[f'{name}_{n}'])}" for name in runtimes]
        print(f"{n:8d}  {cells[0]:>14}  {cells[1]:>17}")
    summary = {
        "bundle": str(bundle),
        "against": str(tree),
        "rate_hz": args.rate,
        "slowdown": args.slowdown,
        "kept_up": kept,
        "trials": trials,
    }
    save("host_capacity", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How many restart flags of evicted streams a fleet's churn takes from them.

    .venv/bin/python -m bench.restart_flags [--seed S]

For each (evicted, new) pair: that many random stream ids are evicted (flagged), then that
many ids new to the runtime arrive (each takes a flag if the table gives it one: a spurious
``restart``), then every evicted stream comes back (one without its flag is lost: its answers
from the zero state do not say ``restart``). Also the CPU time per flag set or taken, against
a plain Python set of the same ids (which holds every flag, and grows with the fleet).
"""

from __future__ import annotations

import argparse
import random
import time

from edge.restart_flags import RestartFlags

CASES = ((20_000, 20_000), (200_000, 50_000), (800_000, 200_000))


def trial(evicted: list[str], new: list[str]) -> tuple[int, int, float, float]:
    t0 = time.process_time()
    flags = RestartFlags()
    for s in evicted:
        flags.set(s)
    spurious = sum(flags.pop(s) for s in new)
    lost = sum(not flags.pop(s) for s in evicted)
    table = time.process_time() - t0
    t0 = time.process_time()
    plain: set[str] = set()
    plain.update(evicted)
    for s in new + evicted:
        plain.discard(s)
    return lost, spurious, table, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print("evicted    new        lost  spurious  us/op (table)  us/op (set)")
    for n_evicted, n_new in CASES:
        rnd = random.Random(args.seed)
        evicted = [f"{rnd.getrandbits(64):016x}" for _ in range(n_evicted)]
        new = [f"{rnd.getrandbits(64):016x}" for _ in range(n_new)]
        lost, spurious, table, plain = trial(evicted, new)
        ops = 2 * n_evicted + n_new
        print(
            f"{n_evicted:<10,} {n_new:<10,} {lost:<5} {spurious:<9} "
            f"{table / ops * 1e6:<14.2f} {plain / ops * 1e6:.2f}"
        )


if __name__ == "__main__":
    main()

"""``serve`` at a steady trickle: CPU per message and latency at paced rates, by ``max_wait_ms``.

    .venv/bin/python -m bench.trickle [--rates 400,1000,2500] [--waits 0,2,5] [--seconds 6]
                                      [--rounds 2]

Under a backlog ``serve`` steps large batches; sensors sending at a steady rate give it one
message per wake-up instead, and each costs a round of its own (thread switches, a log write,
a step, a publish). ``max_wait_ms`` lets a batch that is not full wait that long, from its
first message's arrival, for more. One ``serve`` per wait, side by side on one Mosquitto, each
pinned to core 0 and reading its own topic prefix; the paced publisher (QoS 1, 200 streams)
feeds one at a time, rates and waits interleaved, ``--rounds`` times. Printed per rate and wait:
CPU ms per message of the runtime process (median of rounds) and the p50 / p99 latency
publish -> prediction; and each wait's CPU as a ratio of ``max_wait_ms = 0`` in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import example, log, save
from bench.mqtt import Sink, cpu_seconds, messages, paced, start_runtime
from firmware_sim.broker import Broker

STREAMS = 200


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="400,1000,2500", help="messages per second")
    ap.add_argument("--waits", default="0,2,5", help="max_wait_ms values to compare")
    ap.add_argument("--seconds", type=float, default=6.0, help="per rate, wait and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bundle", help="bundle directory (default: the example model, int8)")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    waits = [float(w) for w in args.waits.split(",")]
    bundle = Path(args.bundle) if args.bundle else example()[1]
    got: dict[tuple[float, float], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-trickle-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker", embedded=False).start()
        try:
            sink = Sink(broker.url)
            rts = {
                w: start_runtime(
                    bundle,
                    broker.url,
                    work / f"state-{i}",
                    prefix=f"w{i}",
                    cores={0},
                    extra=("--max-wait-ms", str(w)),
                )
                for i, w in enumerate(waits)
            }
            seq = 1
            for r in range(args.rounds):
                for rate in rates:
                    for i, w in enumerate(waits):
                        rt = rts[w]
                        assert rt.proc is not None
                        count = int(rate * args.seconds)
                        sink.reset()
                        base = sink.n
                        c0 = cpu_seconds(rt.proc.pid)
                        paced(broker.url, messages(STREAMS, count, seq, f"w{i}"), rate)
                        sink.wait_for(base + count, 120)
                        c1 = cpu_seconds(rt.proc.pid)
                        seq += count // STREAMS + 10
                        lat = np.array(sink.latencies()) * 1000
                        row = (
                            (c1 - c0) / count * 1000,
                            float(np.percentile(lat, 50)),
                            float(np.percentile(lat, 99)),
                        )
                        got.setdefault((rate, w), []).append(row)
                        log(
                            f"round {r + 1}: {rate:.0f} msg/s, max_wait_ms {w:g}: "
                            f"{row[0]:.3f} CPU ms/msg, p50 {row[1]:.1f} ms, p99 {row[2]:.1f} ms"
                        )
            for rt in rts.values():
                rt.stop()
            sink.close()
        finally:
            broker.stop()
    results: dict[str, Any] = {"rounds": args.rounds, "seconds": args.seconds, "rows": []}
    print(
        f"{'msg/s':>7} {'wait ms':>8} {'CPU ms/msg':>11} {'vs wait 0':>10} {'p50 ms':>7} {'p99 ms':>7}"
    )
    for rate in rates:
        base_cpu = float(np.median([x[0] for x in got[(rate, waits[0])]]))
        for w in waits:
            a = np.array(got[(rate, w)])
            cpu, p50, p99 = (float(np.median(a[:, k])) for k in range(3))
            results["rows"].append(
                dict(
                    rate=rate,
                    max_wait_ms=w,
                    cpu_ms_per_msg=cpu,
                    vs_first=cpu / base_cpu,
                    p50_ms=p50,
                    p99_ms=p99,
                    rounds=a.tolist(),
                )
            )
            print(f"{rate:7.0f} {w:8g} {cpu:11.3f} {cpu / base_cpu:10.2f} {p50:7.1f} {p99:7.1f}")
    results["loadavg_1_5_15"] = list(os.getloadavg())
    log(f"saved {save('trickle', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

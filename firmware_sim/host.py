"""Pi-class host profile: does the runtime keep real time on one core with a memory cap?
And what is the largest device count at a given rate that it keeps up with?"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .broker import Broker
from .devices import Fleet
from .runtime import Runtime
from .scorer import Scorer, score


def trial(
    bundle: Path,
    devices: int,
    rate: float,
    *,
    seconds: float,
    cores: set[int],
    memory_mb: int,
    slowdown: float | None,
    batch: int = 1,
    drain: float = 5.0,
) -> dict[str, Any]:
    """One run of ``devices`` at ``rate``; answers still missing ``drain`` s after the last
    sample count as missing (and as not keeping up)."""
    import edge

    names = list(edge.load(bundle).manifest.feature_names)
    with tempfile.TemporaryDirectory(prefix="edge-lstm-host-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker").start()
        runtime = Runtime(
            bundle,
            broker.url,
            work / "state",
            protocol=broker.protocol,
            cores=cores,
            memory_mb=memory_mb,
            slowdown=slowdown,
            client_id="host-runtime",
        ).start()
        scorer = Scorer(broker.url)
        fleet = None
        try:
            scorer.wait_online("host-runtime", 30, runtime.alive)
            fleet = Fleet(
                broker.url,
                devices,
                rate,
                source="sine",
                connections=min(devices, 4),
                batch=batch,
                feature_names=names,
                features=len(names),
            )
            t0 = time.monotonic()
            log = fleet.run(seconds)
            scorer.wait(log, drain)
            r = score(scorer, log, time.monotonic() - t0)
            r.update(
                devices=devices,
                rate_hz=rate,
                offered_msgs_per_s=devices * rate / batch,
                runtime_peak_rss_mb=runtime.peak_rss_mb(),
                runtime_alive=runtime.alive(),
                notes=runtime.notes,
            )
            r["kept_up_real_time"] = bool(r["kept_up_real_time"] and runtime.alive())
            return r
        finally:
            if fleet:
                fleet.close()
            scorer.close()
            runtime.stop()
            broker.stop()


def search(
    bundle: Path,
    rate: float,
    *,
    seconds: float,
    cores: set[int],
    memory_mb: int,
    slowdown: float | None,
    start: int = 10,
    limit: int = 5000,
) -> dict[str, Any]:
    """Double the device count until real time is lost, then bisect a few times."""
    results = []

    def ok(n: int) -> bool:
        r = trial(
            bundle, n, rate, seconds=seconds, cores=cores, memory_mb=memory_mb, slowdown=slowdown
        )
        results.append(r)
        print(
            f"  {n:5d} devices x {rate:g} Hz: p95 {r.get('latency_p95_ms', float('nan')):8.1f} ms, "
            f"missing {r['predictions_missing']}, rss {r['runtime_peak_rss_mb'] or 0:.0f} MB -> "
            f"{'keeps up' if r['kept_up_real_time'] else 'falls behind'}",
            file=sys.stderr,
            flush=True,
        )
        return bool(r["kept_up_real_time"])

    good, bad, n = 0, None, start
    while n <= limit:
        if ok(n):
            good, n = n, n * 2
        else:
            bad = n
            break
    if bad is not None:
        for _ in range(3):
            mid = (good + bad) // 2
            if mid in (good, bad) or mid == 0:
                break
            if ok(mid):
                good = mid
            else:
                bad = mid
    return {
        "rate_hz": rate,
        "max_devices_real_time": good,
        "first_failing": bad,
        "cores": sorted(cores),
        "memory_mb": memory_mb,
        "slowdown": slowdown,
        "trials": results,
    }

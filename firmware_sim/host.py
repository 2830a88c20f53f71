"""Pi-class host profile: does the runtime keep real time on one core with a memory cap?
And what is the largest device count at a given rate that it keeps up with?"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Any

from .broker import Broker
from .devices import Fleet, Sent
from .errors import SimError
from .runtime import Runtime
from .scorer import Scorer, score

# Messages per second one fleet process publishes without falling behind itself (its
# scheduler, JSON and paho, in one interpreter): the devices are spread over enough processes
# that the load generator is never what a trial measures.
PER_PROCESS = 600
# Past this many fleet processes they contend for the CPUs, and a trial measures them, not the
# runtime (thousands of devices at a high rate spawned hundreds of interpreters).
MAX_PROCESSES = 4 * (os.cpu_count() or 1)


def fleet_processes(devices: int, rate: float, batch: int = 1) -> int:
    """How many processes ``run_fleet`` spreads ``devices`` at ``rate`` over."""
    return max(1, min(devices, round(devices * rate / batch / PER_PROCESS + 0.5)))


def offered_at_most(rate: float, batch: int = 1) -> int:
    """The most devices at ``rate`` that ``MAX_PROCESSES`` fleet processes offer."""
    n = max(1, int(MAX_PROCESSES * PER_PROCESS * batch / rate))
    while n > 1 and fleet_processes(n, rate, batch) > MAX_PROCESSES:
        n -= max(1, n // 1000)
    return n


def check_offered(devices: int, rate: float, batch: int = 1) -> None:
    """One line, before anything starts, for a load the fleet processes cannot offer."""
    parts = fleet_processes(devices, rate, batch)
    if parts > MAX_PROCESSES:
        top = offered_at_most(rate, batch)
        raise SimError(
            f"--devices {devices} at --rate {rate:g}: {devices * rate / batch:,.0f} msg/s "
            f"needs {parts} device processes ({PER_PROCESS} msg/s each), more than the "
            f"{MAX_PROCESSES} this machine runs without them falling behind: at most {top:,} "
            "devices at this rate"
        )


def _fleet_part(
    url: str, part: int, devices: int, rate: float, batch: int, names: list[str], seconds: float,
    ready: Any, go: Any, out: Any,
) -> None:  # fmt: skip
    """One process's share of the devices (streams ``dev{part}-*``); its log goes to ``out``."""
    try:
        fleet = Fleet(
            url,
            devices,
            rate,
            source="sine",
            connections=min(devices, 2),
            batch=batch,
            feature_names=names,
            features=len(names),
            prefix=f"dev{part}",
            seed=part,
        )
    except SimError as exc:
        ready.put(str(exc))
        return
    try:
        ready.put(None)
        go.wait()
        out.put(fleet.run(seconds))
    finally:
        fleet.close()


def run_fleet(
    url: str, devices: int, rate: float, batch: int, names: list[str], seconds: float
) -> tuple[list[Sent], float]:
    """``devices`` at ``rate`` for ``seconds``, spread over processes that start together:
    (every message sent, the monotonic time they started)."""
    check_offered(devices, rate, batch)
    parts = fleet_processes(devices, rate, batch)
    ctx = multiprocessing.get_context("spawn")  # not fork: this process runs threads
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    sizes = [devices // parts + (k < devices % parts) for k in range(parts)]
    procs = [
        ctx.Process(
            target=_fleet_part,
            args=(url, k, n, rate, batch, names, seconds, ready, go, out),
            daemon=True,
        )
        for k, n in enumerate(sizes)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            problem = _get(ready, procs, 120)
            if problem:
                raise SimError(problem)
        go.set()
        started = time.monotonic()
        log: list[Sent] = []
        for _ in procs:
            log += _get(out, procs, seconds + 120)
        return sorted(log, key=lambda m: m.created), started
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def _get(queue: Any, procs: list[Any], timeout: float) -> Any:
    """The next item of ``queue``; a fleet process that died says so, not a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise SimError(f"a device fleet process died (exit code {dead[0]})") from None
    raise SimError(f"the device fleet processes gave no answer within {timeout:.0f} s")


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
    tree: Path | None = None,
) -> dict[str, Any]:
    """One run of ``devices`` at ``rate``; answers still missing ``drain`` s after the last
    sample count as missing (and as not keeping up). ``tree``: the runtime of another source
    tree (``bench.host_capacity``)."""
    import edge

    names = list(edge.load(bundle).manifest.feature_names)
    with tempfile.TemporaryDirectory(prefix="edge-lstm-host-") as tmp:
        work = Path(tmp)
        # Everything started is stopped however the trial ends (Ctrl-C while the scorer
        # connects, a runtime that cannot start): the broker, the runtime and its cgroups.
        broker: Broker | None = None
        runtime: Runtime | None = None
        scorer: Scorer | None = None
        try:
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
                tree=tree,
            )
            runtime.start()
            scorer = Scorer(broker.url)
            scorer.wait_online("host-runtime", 30, runtime.alive, runtime.why_ended)
            log, t0 = run_fleet(broker.url, devices, rate, batch, names, seconds)
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
            if scorer is not None:
                scorer.close()
            if runtime is not None:
                runtime.stop()
            if broker is not None:
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
    """Double the device count until real time is lost, then bisect a few times (up to
    ``limit``, and what the fleet processes can offer at ``rate``)."""
    limit = min(limit, offered_at_most(rate))
    start = min(start, limit)
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

    # Doubling up to the limit, which is tried too: a search that stepped over it reported the
    # count before as the most kept up, "first failing: none", without running the limit.
    good, bad, n = 0, None, start
    while bad is None:
        if ok(n):
            good = n
            if n >= limit:
                break
            n = min(n * 2, limit)
        else:
            bad = n
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
        "search_limit_devices": limit,
        "cores": sorted(cores),
        "memory_mb": memory_mb,
        "slowdown": slowdown,
        "trials": results,
    }

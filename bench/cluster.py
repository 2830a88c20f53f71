"""NATS worker benchmark: CPU-seconds per sample with 1, 2 and 4 workers against ``serve``, and
failover time after ``kill -9`` of a worker, all in one run on this machine.

    .venv/bin/python -m bench.cluster [--streams 200] [--messages 50] [--repeat 3]
        [--workers 1,2,4] [--no-failover] [--bundle DIR]

CPU cost is the runtime processes' own CPU time (user + system, from /proc) between "ready" and
"every prediction received", divided by the samples answered; ``serve`` is measured in the same
run on the same samples (through Mosquitto), and each worker count is reported as a ratio of it.
Both get their input published while they run (the workers natively into JetStream, serve at
QoS 1 through Mosquitto); both answer every sample. Workers run with their default lease and
snapshot interval. Rounds are interleaved (serve, 1, 2, 4 workers, serve, ...); each ratio is
reported per round, as the median of rounds, and pooled (all rounds' CPU over all rounds'
samples: CPU time is counted in clock ticks of 10 ms). With each worker count go the workers' own
counters summed over its rounds: messages taken in (above the samples sent: partitions replayed),
partitions fenced (a lease not confirmed in time), answers recognised as sent before.
Failover: 2 workers, 40 streams at 10 Hz, the worker owning the most partitions is killed; the
figure is the time from the kill until every stream it owned has answered a sample sent after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import ROOT, example, log, save

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _bundle(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    test = ROOT / "build" / "test-bundles" / "clf-int8"
    return test if (test / "manifest.json").exists() else example()[1]


def _samples(streams: int, n: int, features: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"b{i}": rng.normal(size=(n, features)) for i in range(streams)}


async def _preload(url: str, samples: dict[str, np.ndarray]) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    n = len(next(iter(samples.values())))
    for k in range(n):
        futs = []
        for s, x in samples.items():
            body = json.dumps({"seq": k + 1, "values": x[k].tolist()}).encode()
            futs.append(js.publish(f"sensors.{s}.data", body))
        await asyncio.gather(*futs)
    await nc.close()


class NatsCount:
    """Counts predictions natively (predictions.>) and remembers the newest seq per stream."""

    def __init__(self) -> None:
        self.n = 0
        self.last: dict[str, tuple[int, float]] = {}

    async def run(self, url: str, until: asyncio.Event) -> None:
        import nats

        nc = await nats.connect(url)

        async def on(msg: Any) -> None:
            doc = json.loads(msg.data)
            y = np.asarray(doc["y"])
            self.n += 1 if y.ndim == 1 else len(y)
            self.last[msg.subject.split(".", 1)[1]] = (doc["seq"], time.monotonic())

        await nc.subscribe("predictions.>", cb=on)
        await until.wait()
        await nc.close()


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _workers_ready(url: str, ids: list[str], partitions: int, timeout: float = 120) -> None:
    import nats

    from edge.partitions import assignment

    plan = {i: [p for p, o in assignment(partitions, ids).items() if o == i] for i in ids}

    async def run() -> None:
        nc = await nats.connect(url)
        owned: dict[str, list[int]] = {}

        async def on(msg: Any) -> None:
            doc = json.loads(msg.data)
            owned[doc["runtime_id"]] = doc.get("partitions", [])

        await nc.subscribe("edge.status.*", cb=on)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(sorted(owned.get(i, [-1])) == plan[i] for i in ids):
                await nc.close()
                return
            await asyncio.sleep(0.1)
        await nc.close()
        raise RuntimeError(f"workers {ids} did not share the partitions: {owned}")

    asyncio.run(run())


def _status(url: str, ids: list[str]) -> dict[str, list[int]]:
    import nats

    async def run() -> dict[str, list[int]]:
        nc = await nats.connect(url)
        owned: dict[str, list[int]] = {}

        async def on(msg: Any) -> None:
            doc = json.loads(msg.data)
            owned[doc["runtime_id"]] = doc.get("partitions", [])

        await nc.subscribe("edge.status.*", cb=on)
        deadline = time.monotonic() + 10
        while set(owned) < set(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await nc.close()
        return owned

    return asyncio.run(run())


def bench_workers(
    bundle: Path, count: int, samples: dict[str, np.ndarray], tmp: Path, extra: dict[str, int]
) -> float:
    from tests.nats_helpers import NatsServer, WorkerProc

    srv = NatsServer(tmp / f"nats-{count}").start()
    ids = [f"w{i}" for i in range(count)]
    # the worker's own defaults (the test helper's are shorter, for quick failovers)
    defaults = ("--partitions", "16", "--lease-seconds", "3", "--snapshot-interval", "5")
    procs = [WorkerProc(bundle, srv.url, tmp / f"state-{count}", i, *defaults).start() for i in ids]
    try:
        _workers_ready(srv.url, ids, 16)
        total = sum(len(x) for x in samples.values())
        counter = NatsCount()
        cpu0 = sum(cpu_seconds(p.proc.pid) for p in procs if p.proc)

        async def run() -> None:
            done = asyncio.Event()
            task = asyncio.create_task(counter.run(srv.url, done))
            await asyncio.sleep(0.5)  # subscribed before the first answer can come
            await _preload(srv.url, samples)
            deadline = time.monotonic() + 300
            while counter.n < total and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            done.set()
            await task

        asyncio.run(run())
        cpu1 = sum(cpu_seconds(p.proc.pid) for p in procs if p.proc)
        if counter.n < total:
            raise RuntimeError(f"{count} workers answered {counter.n} of {total}")
        return (cpu1 - cpu0) / total
    finally:
        for p in procs:
            p.stop()
        srv.stop()
        # work beyond the samples: a lease not confirmed in time makes a worker drop a
        # partition and its next owner (maybe itself) replay it
        for st in (st for p in procs for st in p.final_stats()):
            for k in ("messages_in", "partitions_fenced", "answers_sent_before"):
                extra[k] = extra.get(k, 0) + int(st.get(k, 0))


def bench_serve(bundle: Path, samples: dict[str, np.ndarray], tmp: Path) -> float:
    from firmware_sim.broker import Broker
    from tests.mqtt_helpers import Collector, Publisher, Serve

    broker = Broker(tmp / "mosquitto", embedded=False)
    broker.start()
    rt = Serve(bundle, broker.url, tmp / "serve-state").start()
    col = Collector(broker.url)
    pub = Publisher(broker.url)
    try:
        _wait(col.online, 60, "serve online")
        pid = rt.proc.pid
        total = sum(len(x) for x in samples.values())
        cpu0 = cpu_seconds(pid)
        n = len(next(iter(samples.values())))
        for k in range(n):
            for s, x in samples.items():
                pub.send(s, k + 1, x[k : k + 1])
        _wait(lambda: len(col.of("predictions/")) >= total, 120, "serve's predictions")
        return (cpu_seconds(pid) - cpu0) / total
    finally:
        pub.close()
        col.close()
        rt.stop()
        broker.stop()


def bench_failover(bundle: Path, tmp: Path) -> dict[str, Any]:
    from tests.nats_helpers import NatsServer, WorkerProc

    srv = NatsServer(tmp / "nats-failover").start()
    ids = ["w0", "w1"]
    procs = {
        i: WorkerProc(bundle, srv.url, tmp / "state-failover", i, "--partitions", "16").start()
        for i in ids
    }
    streams = [f"f{i}" for i in range(40)]
    try:
        _workers_ready(srv.url, ids, 16)
        owned = _status(srv.url, ids)
        victim = max(ids, key=lambda i: len(owned.get(i, [])))
        from edge.partitions import partition

        moved = [s for s in streams if partition(s, 16) in owned[victim]]

        async def run() -> float:
            import nats

            nc = await nats.connect(srv.url)
            js = nc.jetstream()
            counter = NatsCount()
            done = asyncio.Event()
            task = asyncio.create_task(counter.run(srv.url, done))
            seq, killed_at, kill_seq = 0, 0.0, 0
            while True:
                seq += 1
                for s in streams:
                    body = json.dumps({"seq": seq, "values": [0.1] * 6}).encode()
                    await js.publish(f"sensors.{s}.data", body)
                if seq == 50:
                    procs[victim].kill()
                    killed_at, kill_seq = time.monotonic(), seq
                if killed_at and all(counter.last.get(s, (0, 0.0))[0] > kill_seq for s in moved):
                    back = max(counter.last[s][1] for s in moved) - killed_at
                    break
                if seq > 2000:
                    raise RuntimeError("moved streams never answered again")
                await asyncio.sleep(0.1)
            done.set()
            await task
            await nc.close()
            return back

        seconds = asyncio.run(run())
        return {
            "victim_partitions": len(owned[victim]),
            "moved_streams": len(moved),
            "seconds": seconds,
        }
    finally:
        for p in procs.values():
            p.stop()
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--messages", type=int, default=50, help="per stream")
    ap.add_argument(
        "--bundle", help="bundle directory (default: the test bundle, else the example)"
    )
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median, pooled)")
    ap.add_argument("--no-failover", action="store_true", help="CPU figures only")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    bundle = _bundle(args.bundle)
    import edge

    features = edge.load(bundle).manifest.features
    samples = _samples(args.streams, args.messages, features)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    results: dict[str, Any] = {"streams": args.streams, "messages_per_stream": args.messages}
    counts = [int(c) for c in args.workers.split(",")]
    serve: list[float] = []
    cost: dict[int, list[float]] = {c: [] for c in counts}
    extra: dict[int, dict[str, int]] = {c: {} for c in counts}
    try:
        for r in range(args.repeat):  # interleaved: serve, then each worker count, again
            log(f"round {r + 1}/{args.repeat}: serve ...")
            serve.append(bench_serve(bundle, samples, tmp / f"r{r}"))
            for count in counts:
                log(f"round {r + 1}/{args.repeat}: {count} worker(s) ...")
                cost[count].append(
                    bench_workers(bundle, count, samples, tmp / f"r{r}", extra[count])
                )
        results["rounds"] = args.repeat
        results["serve_cpu_ms_per_sample"] = [x * 1000 for x in serve]
        for count in counts:
            ratios = [c / s for c, s in zip(cost[count], serve, strict=True)]
            results[f"workers_{count}_cpu_ms_per_sample"] = [x * 1000 for x in cost[count]]
            results[f"workers_{count}_vs_serve"] = ratios
            results[f"workers_{count}_vs_serve_median"] = float(np.median(ratios))
            # pooled: all rounds' CPU over all rounds' samples (less tick noise than one round)
            results[f"workers_{count}_vs_serve_pooled"] = sum(cost[count]) / sum(serve)
            results[f"workers_{count}_counters"] = {
                **extra[count],
                "samples_sent": args.repeat * sum(len(x) for x in samples.values()),
            }
        results["loadavg_1_5_15"] = list(os.getloadavg())
        if not args.no_failover:
            log("failover ...")
            results["failover"] = bench_failover(bundle, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    log(f"saved {save('cluster', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

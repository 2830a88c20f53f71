"""How long `edge-lstm worker`'s answers stop when a NATS node of a 3-node cluster is killed.

    .venv/bin/python -m bench.nats_takeover --bundle BUNDLE [--runs 6] [--against TREE]

Per run: a 3-node cluster (R3 everywhere), three workers (8 partitions, 2 s leases, the
tests' settings), devices on a node that survives sending every stream's next sample at a
steady pace, an MQTT QoS 1 subscriber of the answers on that node. The node leading the
sensor stream (``--kill leases``: the lease bucket, whose loss lets every lease run out) is
killed with SIGKILL; the devices go on for ``--after`` seconds and stop. Measured from the
kill: when the last sample sent was answered over core NATS, as the workers send answers
(``last_answer_s``), and at the MQTT QoS 1 subscriber (``last_mqtt_qos1_s``, which also waits
for the listener's delivery from its store), the longest time no answer arrived there
(``longest_silence_s``); from what the workers logged after it, the leases they lost and
their takeovers (the longest, in ms; when the last one ended, ``last_takeover_s``).
``--against TREE`` runs the workers of another source tree (an older commit's worktree) in
alternate runs, this tree's first, for before/after figures taken under the same conditions.
A run that fails (a port taken meanwhile) is said and left out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np

from edge.nats_worker import LEASES
from tests.mqtt_helpers import ROOT, Collector, Publisher, wait_until
from tests.nats_helpers import NatsCollector, all_owned, start_cluster

PARTITIONS = 8
STREAMS = 12
WORKERS = ("w1", "w2", "w3")
TAKEN = re.compile(r"^(\S+ \S+) .*partition (\d+): taken over in (\d+) ms", re.M)


class Timed(Collector):
    """Each prediction's (stream, seq) with when it first arrived."""

    def __init__(self, broker: str) -> None:
        self.first: dict[tuple[str, int], float] = {}
        self.arrivals: list[float] = []
        self.times_lock = threading.Lock()
        super().__init__(broker, client_id="bench-collector")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.monotonic()
        super()._on_message(client, userdata, msg)
        if not msg.topic.startswith("predictions/"):
            return
        doc = json.loads(msg.payload)
        key = (msg.topic.split("/", 1)[1], int(doc["seq"]))
        with self.times_lock:
            self.first.setdefault(key, now)
            self.arrivals.append(now)


class TimedNats(NatsCollector):
    """The same over core NATS (``predictions.{stream}``), as the workers send them: the MQTT
    QoS 1 subscriber's answers also wait for its delivery from the listener's store, which a
    node's loss can hold up by itself."""

    def __init__(self, url: str) -> None:
        self.first: dict[tuple[str, int], float] = {}
        super().__init__(url)

    async def _run(self) -> None:
        import nats

        self._stop = asyncio.Event()
        nc = await nats.connect(self.url, max_reconnect_attempts=-1)

        async def on(msg: Any) -> None:
            key = (msg.subject.split(".", 1)[1], int(json.loads(msg.data)["seq"]))
            with self.lock:
                self.first.setdefault(key, time.monotonic())

        await nc.subscribe("predictions.>", cb=on)
        await nc.flush()
        self.ready.set()
        await self._stop.wait()
        await nc.close()


def start_worker(tree: Path, bundle: Path, urls: str, state: Path, wid: str) -> Any:
    cfg = state / "w.toml"
    cfg.write_text("reorder_ms = 120000\n")  # a lost live copy's store copy is waited for
    args = [sys.executable, "-m", "edge", "worker", "--model", str(bundle), "--nats", urls]
    args += ["--worker-id", wid, "--state-dir", str(state), "--lease-seconds", "2"]
    args += ["--snapshot-interval", "1", "--partitions", str(PARTITIONS), "--replicas", "3"]
    args += ["--config", str(cfg)]
    log = open(state / f"{wid}.log", "ab")  # noqa: SIM115 - the child keeps it
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, cwd=tree)
    log.close()
    return proc


def leader(urls: list[str], stream: str = "") -> str:
    """The name of the node leading ``stream`` (the sensor stream), "" while it has none."""
    import nats

    from edge.nats_worker import STREAM

    async def ask() -> str:
        nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=1)
        try:
            info = await nc.jetstream().stream_info(stream or STREAM)
            return str(info.cluster.leader or "") if info.cluster else ""
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(ask(), 10))
    except Exception:
        return ""


def one_run(
    tree: Path, bundle: Path, rate: float, before: float, after: float, kill: str
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="nats-takeover-"))
    nodes = start_cluster(root)
    urls = [n.url for n in nodes]
    state = root / "state"
    state.mkdir()
    procs = {w: start_worker(tree, bundle, ",".join(urls), state, w) for w in WORKERS}
    col: Timed | None = None
    pub: Publisher | None = None
    native: TimedNats | None = None
    try:
        found: list[str] = []
        target = "" if kill == "stream" else f"KV_{LEASES}"
        wait_until(lambda: bool(found.append(leader(urls, target)) or found[-1]), 180, "a leader")
        devices_on = next(n for n in nodes if n.name != found[-1])
        col = Timed(devices_on.mqtt_url)
        pub = Publisher(devices_on.mqtt_url, client_id="bench-devices")
        native = TimedNats(devices_on.url)
        wait_until(col.qos1_granted, 180, "QoS 1 subscriptions")
        wait_until(lambda: all_owned(col, list(WORKERS), PARTITIONS), 180, "shares owned")
        rng = np.random.default_rng(0)
        streams = [f"dev-{i}" for i in range(STREAMS)]
        for s in streams:
            pub.raw(f"sensors/{s}/control", b'{"cmd": "reset", "seq": 1}')
        seq, sent_at = 0, {}

        def tick() -> None:
            nonlocal seq
            seq += 1
            for s in streams:
                pub.send(s, seq, rng.normal(size=(1, 6)))
            sent_at[seq] = time.monotonic()

        t0 = time.monotonic()
        while time.monotonic() - t0 < before:
            tick()
            time.sleep(1 / rate)
        pub.flush(60)
        wait_until(
            lambda: all((s, seq) in col.first for s in streams), 120, "answers before the kill"
        )
        victim = next((n for n in nodes if n.name == leader(urls, target)), None)
        victim = victim if victim is not None and victim is not devices_on else None
        victim = victim or next(n for n in nodes if n is not devices_on)
        first_after = seq + 1
        logged = {w: len((state / f"{w}.log").read_text(errors="replace")) for w in WORKERS}
        killed, killed_at = time.monotonic(), time.time()
        victim.kill()
        while time.monotonic() - killed < after:
            tick()
            time.sleep(1 / rate)
        want = [(s, k) for s in streams for k in range(first_after, seq + 1)]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not all(
            k in col.first and k in native.first for k in want
        ):
            time.sleep(0.1)
        missing = [k for k in want if k not in col.first]
        with native.lock:
            sent = [native.first[k] for k in want if k in native.first]
        with col.times_lock:
            times = sorted(t for t in col.arrivals if t >= killed)
        gaps = [b - a for a, b in zip([killed, *times], times)]
        # what the workers said from the kill on
        logs = {w: (state / f"{w}.log").read_text(errors="replace")[logged[w] :] for w in WORKERS}
        found_taken = [m for text in logs.values() for m in TAKEN.finditer(text)]
        taken = [int(m[3]) for m in found_taken]
        stamps = [
            time.mktime(time.strptime(m[1].split(",")[0], "%Y-%m-%d %H:%M:%S")) for m in found_taken
        ]
        stamps = [t + int(m[1].split(",")[1]) / 1000 for t, m in zip(stamps, found_taken)]
        return {
            "last_answer_s": round(max(sent) - killed, 2) if sent else None,
            "missing": len(want) - len(sent),
            "last_mqtt_qos1_s": round(
                max(col.first[k] for k in want if k in col.first) - killed, 2
            ),
            "mqtt_qos1_missing": len(missing),
            "longest_silence_s": round(max(gaps), 2) if gaps else None,
            "leases_lost": sum(t.count("lease lost; dropping it") for t in logs.values()),
            "takeovers": len(taken),
            "takeover_ms_max": max(taken) if taken else None,
            "last_takeover_s": round(max(stamps) - killed_at, 2) if stamps else None,
            "takeovers_fenced": sum(t.count("; not taken") for t in logs.values()),
            "consumer_creates_repeated": sum(t.count("asking again") for t in logs.values()),
        }
    finally:
        for c in (pub, col, native):
            if c is not None:
                c.close()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for n in nodes:
            n.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=6, help="per tree")
    ap.add_argument("--against", type=Path, help="another source tree, run in alternate runs")
    ap.add_argument("--rate", type=float, default=10.0, help="samples a second per stream")
    ap.add_argument("--before", type=float, default=3.0, help="seconds sent before the kill")
    ap.add_argument("--after", type=float, default=3.0, help="seconds sent after the kill")
    ap.add_argument(
        "--kill",
        choices=("stream", "leases"),
        default="stream",
        help="the node leading the sensor stream, or the lease bucket (when that is a node "
        "the devices are not on; else another): every lease waits for its election",
    )
    args = ap.parse_args()
    trees = {"this": ROOT} | ({"against": args.against.resolve()} if args.against else {})
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for run in range(max(1, min(args.runs, 50))):
        for name, tree in trees.items():
            bundle = args.bundle.resolve()
            try:
                r = one_run(tree, bundle, args.rate, args.before, args.after, args.kill)
            except Exception as exc:  # a port taken meanwhile, a cluster that never formed
                print(json.dumps({"run": run, "tree": name, "failed": repr(exc)}), flush=True)
                continue
            results[name].append(r)
            print(json.dumps({"run": run, "tree": name, **r}), flush=True)
    for name, rs in results.items():
        for key in ("last_answer_s", "last_mqtt_qos1_s", "last_takeover_s"):
            got = sorted(r[key] for r in rs if r[key] is not None)
            median = f"{statistics.median(got):.1f}" if got else "n/a"
            print(f"{name} ({trees[name]}): {key}: {got} (median {median})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

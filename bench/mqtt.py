"""MQTT service benchmark against a local Mosquitto, side by side in one run.

    .venv/bin/python -m bench.mqtt [--quick]

1. Ceiling: a bare paho client that decodes each sample and publishes an echo (no inference).
   The runtime's sustained throughput with 1,000 streams is reported as a ratio of it.
2. Latency publish -> prediction at half the runtime's measured maximum throughput.
3. RSS of the runtime with 10,000 active streams.
4. Recovery after kill -9 at 1,000 msg/s offered: time from restart until the backlog is cleared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import paho.mqtt.client as mqtt

from bench._common import example, log, save
from firmware_sim.broker import Broker
from firmware_sim.mqtt import close_client
from firmware_sim.runtime import Runtime


def client(url: str, cid: str) -> mqtt.Client:
    u = urlparse(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.max_inflight_messages_set(2000)
    c.max_queued_messages_set(0)
    c.connect(str(u.hostname), int(u.port or 1883), 60)
    return c


class Sink:
    """Counts answers and their latency (from the ``ts`` the sample carried)."""

    def __init__(self, url: str) -> None:
        self.n = 0
        self.lat: list[float] = []
        self.lock = threading.Lock()
        self.c = client(url, f"bench-sink-{time.monotonic_ns()}")
        self.c.on_message = self._on
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.subscribe("predictions/#", 1)
        self.c.loop_start()
        ready.wait(5)

    def _on(self, c: Any, u: Any, msg: Any) -> None:
        now = time.time()
        ts = json.loads(msg.payload).get("ts")
        with self.lock:
            self.n += 1
            if ts:
                self.lat.append(now - ts)

    def wait_for(self, n: int, timeout: float) -> float:
        t0 = time.monotonic()
        while self.n < n and time.monotonic() - t0 < timeout:
            time.sleep(0.002)
        return time.monotonic()

    def close(self) -> None:
        close_client(self.c)


def echo_main(url: str) -> None:
    """The ceiling, in its own process like the runtime: receive, decode, answer. Nothing else."""
    c = client(url, "bench-echo")

    def on_message(cl: Any, u: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        stream = msg.topic.split("/")[1]
        answer = {"seq": doc["seq"], "ts": doc.get("ts"), "y": [0.0]}
        cl.publish(f"predictions/{stream}", json.dumps(answer), qos=1)

    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe("sensors/+/data", 1)
    print("ready", flush=True)
    c.loop_forever()


class Echo:
    def __init__(self, url: str) -> None:
        cmd = [sys.executable, "-m", "bench.mqtt", "--echo", url]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        time.sleep(0.3)  # subscribed

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def messages(streams: int, n: int, start_seq: int = 1) -> list[tuple[str, int, list[float]]]:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (n, 6)).round(4).tolist()
    return [(f"s{i % streams}", start_seq + i // streams, x[i]) for i in range(n)]


def flood(url: str, msgs: list[tuple[str, int, list[float]]], sink: Sink, base: int) -> float:
    """Publish everything as fast as paho lets us; messages per second until all answered."""
    pub = client(url, f"bench-pub-{time.monotonic_ns()}")
    pub.loop_start()
    t0 = time.monotonic()
    for stream, seq, values in msgs:
        pub.publish(f"sensors/{stream}/data", json.dumps({"seq": seq, "values": values}), qos=1)
    t1 = sink.wait_for(base + len(msgs), 120)
    close_client(pub)
    return (sink.n - base) / (t1 - t0)


def paced(
    url: str,
    msgs: list[tuple[str, int, list[float]]],
    rate: float,
    stop: threading.Event | None = None,
) -> int:
    pub = client(url, f"bench-paced-{time.monotonic_ns()}")
    pub.loop_start()
    t0 = time.monotonic()
    sent = 0
    for i, (stream, seq, values) in enumerate(msgs):
        if stop is not None and stop.is_set():
            break
        due = t0 + i / rate
        while (now := time.monotonic()) < due:
            time.sleep(min(due - now, 0.001))
        pub.publish(
            f"sensors/{stream}/data",
            json.dumps({"seq": seq, "ts": time.time(), "values": values}),
            qos=1,
        )
        sent += 1
    time.sleep(0.2)
    close_client(pub)
    return sent


def start_runtime(bundle: Path, url: str, state: Path) -> Runtime:
    """edge-lstm serve in its own process, returned once its retained status says online."""
    rt = Runtime(
        bundle,
        url,
        state,
        client_id="bench-runtime",
        reorder_ms=0,
        extra=("--log-level", "warning", "--snapshot-interval", "5"),
    ).start()
    seen = threading.Event()
    c = client(url, f"bench-status-{time.monotonic_ns()}")
    c.on_message = lambda cl, u, m: seen.set() if b'"online"' in m.payload else None
    c.subscribe("edge/status/bench-runtime", 1)
    c.loop_start()
    seen.wait(30)
    close_client(c)
    return rt


def rss_mb(rt: Runtime) -> float:
    assert rt.proc is not None
    for line in Path(f"/proc/{rt.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer messages")
    ap.add_argument("--echo", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        echo_main(args.echo)
        return 0
    n = 8000 if args.quick else 30000
    _, bundle = example(1, 64)
    results: dict[str, Any] = {"messages_per_flood": n, "streams": 1000}
    with tempfile.TemporaryDirectory(prefix="edge-lstm-bench-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker", embedded=False).start()
        url = broker.url
        try:
            log("ceiling: bare paho echo")
            sink = Sink(url)
            echo = Echo(url)
            results["ceiling_msgs_per_s"] = flood(url, messages(1000, n), sink, 0)
            echo.close()
            sink.close()

            log("runtime: sustained throughput with 1,000 streams")
            sink = Sink(url)
            rt = start_runtime(bundle, url, work / "state")
            rt_rate = flood(url, messages(1000, n), sink, 0)
            results["runtime_msgs_per_s"] = rt_rate
            results["throughput_ratio_vs_ceiling"] = rt_rate / results["ceiling_msgs_per_s"]

            half = rt_rate / 2
            log(f"latency at half the runtime's maximum: {half:.0f} msg/s")
            sink.lat.clear()
            base = sink.n
            count = int(half * (3 if args.quick else 6))
            paced(url, messages(1000, count, start_seq=10_000), half)
            sink.wait_for(base + count, 30)
            lat = np.array(sink.lat) * 1000
            results.update(
                latency_rate_msgs_per_s=half,
                latency_p50_ms=float(np.percentile(lat, 50)),
                latency_p99_ms=float(np.percentile(lat, 99)),
                latency_samples=len(lat),
            )

            log("RSS with 10,000 active streams")
            base = sink.n
            flood(url, messages(10_000, 10_000, start_seq=100_000), sink, base)
            results["rss_10k_streams_mb"] = rss_mb(rt)

            log("recovery after kill -9 at 1,000 msg/s offered")
            stop = threading.Event()
            offered = messages(1000, 1000 * 12, start_seq=200_000)
            base = sink.n
            feeder = threading.Thread(
                target=lambda: results.__setitem__(
                    "recovery_sent", paced(url, offered, 1000.0, stop)
                )
            )
            feeder.start()
            time.sleep(3)
            rt.kill9()
            time.sleep(1.0)  # down for a second: ~1,000 messages queue at the broker
            t_restart = time.monotonic()
            rt = start_runtime(bundle, url, work / "state")
            t_online = time.monotonic()
            # cleared when every message offered up to now is answered
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                offered_so_far = min(len(offered), int((time.monotonic() - t_restart + 4) * 1000))
                if sink.n - base >= offered_so_far - 50:
                    break
                time.sleep(0.01)
            results["recovery_restart_to_online_s"] = t_online - t_restart
            results["recovery_backlog_cleared_s"] = time.monotonic() - t_restart
            feeder.join()
            sink.wait_for(base + len(offered), 30)
            results["recovery_answers_vs_offered"] = (sink.n - base) / len(offered)
            rt.stop()
            sink.close()
        finally:
            broker.stop()
    path = save("mqtt", results)
    for k, v in results.items():
        print(f"  {k:36s} {v:,.3f}" if isinstance(v, float) else f"  {k:36s} {v}")
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MQTT service benchmark against a local Mosquitto, side by side in one run.

    .venv/bin/python -m bench.mqtt [--quick] [--rounds N] [--latency-rounds N]
        [--latency-streams N] [--against TREE]

1. Throughput per CPU-second of the process under test, each pinned to core 0 (the broker,
   the load and the sink to the other cores, when there are any): a bare paho
   echo (decode each sample, publish an answer at QoS 1: the fair ceiling of a paho service),
   ``serve`` over MQTT 5 and over 3.1.1 at 1 sample per message, and ``serve`` at 10 samples
   per message (as many messages per round as the others: its CPU time is long enough to
   measure in clock ticks to about 1%). The load comes from a pipelined raw-socket publisher (``bench.raw_mqtt``) so
   that the generator is never the limit. Rounds are interleaved; min and median are printed,
   ratios are of medians. 1,000 streams.
2. Latency publish -> prediction at half the runtime's measured maximum throughput, paced by
   the raw-socket publisher (a paho publisher lags at that rate, and its lag reads as latency),
   for whole snapshot intervals (``SNAPSHOT_SECONDS``): each holds one snapshot's pause.
   ``--against TREE`` runs a second ``serve`` from another source tree (``git worktree add``
   of an older commit) and alternates its windows with this one's, at the same rate;
   ``--latency-streams 10000`` gives the snapshot a size whose pause shows (with 1,000 streams
   it is a few ms, within this machine's noise).
3. RSS of the runtime with 10,000 active streams.
4. Recovery after kill -9 at 1,000 msg/s offered: time from restart until the backlog is cleared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from bench.raw_mqtt import RawPublisher
from firmware_sim.broker import Broker
from firmware_sim.mqtt import close_client
from firmware_sim.runtime import Runtime

# The runtime's snapshot interval here. The latency window is a whole number of them: a window
# shorter than one held the pause of a snapshot or not by chance, and its p99 was that pause
# (tens of ms) or not from one run to the next.
SNAPSHOT_SECONDS = 5


def client(url: str, cid: str, inflight: int = 2000) -> mqtt.Client:
    u = urlparse(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    c.connect(str(u.hostname), int(u.port or 1883), 60)
    return c


class Sink:
    """Counts answers and their latency (from the ``ts`` the sample carried), and errors, in a
    process of its own: in the benchmark's process it shared the interpreter lock with the
    paced publisher and the collector with TensorFlow's heap (full collections of 200-300 ms),
    and their turns read as the service's latency."""

    def __init__(self, url: str) -> None:
        cmd = [sys.executable, "-m", "bench.mqtt", "--sink", url]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        if self._ask("ready") != "ready":
            raise RuntimeError("the sink did not subscribe")

    def _ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the sink process ended (exit code {self.proc.wait()})")
        return line.strip()

    @property
    def n(self) -> int:
        return int(self._ask("n"))

    @property
    def errors(self) -> int:
        return int(self._ask("errors"))

    def reset(self) -> None:
        """Forget the latencies seen so far."""
        self._ask("reset")

    def latencies(self) -> list[float]:
        """Latencies in seconds since the last ``reset``."""
        return [float(v) for v in json.loads(self._ask("lat"))]

    def wait_for(self, n: int, timeout: float) -> float:
        t0 = time.monotonic()
        while self.n < n and time.monotonic() - t0 < timeout:
            time.sleep(0.005)
        return time.monotonic()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


def sink_main(url: str) -> None:
    """The sink's process: subscribes, then answers one line per command on stdin."""
    n = errors = 0
    lat: list[float] = []
    lock = threading.Lock()
    ready = threading.Event()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        nonlocal n, errors
        now = time.time()
        if msg.topic.startswith("errors/"):
            with lock:
                errors += 1
            log(f"  unexpected error answer: {msg.payload[:200]!r}")
            return
        ts = json.loads(msg.payload).get("ts")
        with lock:
            n += 1
            if ts:
                lat.append(now - ts)

    c = client(url, f"bench-sink-{time.monotonic_ns()}")
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.subscribe([("predictions/#", 1), ("errors/#", 1)])
    c.loop_start()
    for line in sys.stdin:
        with lock:
            cmd = line.strip()
            if cmd == "ready":
                print("ready" if ready.wait(5) else "timeout", flush=True)
            elif cmd == "n":
                print(n, flush=True)
            elif cmd == "errors":
                print(errors, flush=True)
            elif cmd == "reset":
                lat.clear()
                print("ok", flush=True)
            elif cmd == "lat":
                print(json.dumps(lat), flush=True)
    close_client(c)


def echo_main(url: str) -> None:
    """The ceiling, in its own process like the runtime: receive, decode, answer. Nothing else."""
    c = client(url, "bench-echo", inflight=0)  # as serve: paho rescans its in-flight list else

    def on_message(cl: Any, u: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        stream = msg.topic.split("/")[1]
        answer = {"seq": doc["seq"], "ts": doc.get("ts"), "y": [0.0]}
        cl.publish(f"predictions/{stream}", json.dumps(answer), qos=1)

    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe("echo/+/data", 1)
    print("ready", flush=True)
    c.loop_forever()


class Echo:
    def __init__(self, url: str, core: int) -> None:
        cmd = [sys.executable, "-m", "bench.mqtt", "--echo", url]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, preexec_fn=lambda: os.sched_setaffinity(0, {core})
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        time.sleep(0.3)  # subscribed

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def messages(
    streams: int, n: int, start_seq: int = 1, prefix: str = "v5"
) -> list[tuple[str, int, list[float]]]:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (n, 6)).round(4).tolist()
    return [(f"{prefix}/s{i % streams}/data", start_seq + i // streams, x[i]) for i in range(n)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def payloads(
    prefix: str, streams: int, n_msgs: int, per_msg: int, round_: int
) -> list[tuple[str, bytes]]:
    """``n_msgs`` messages round-robin over ``streams``, ``per_msg`` samples each, seqs
    continuing from earlier rounds."""
    rng = np.random.default_rng(round_)
    x = rng.normal(0, 3, (n_msgs, per_msg, 6)).round(4).tolist()
    base = round_ * -(-n_msgs // streams) * per_msg + 1
    out = []
    for i in range(n_msgs):
        seq = base + (i // streams) * per_msg
        values = x[i][0] if per_msg == 1 else x[i]
        doc = {"seq": seq, "ts": time.time(), "values": values}
        out.append((f"{prefix}/s{i % streams}/data", json.dumps(doc).encode()))
    return out


def cpu_round(
    url: str, pid: int, msgs: list[tuple[str, bytes]], sink: Sink, timeout: float
) -> tuple[float, float]:
    """(messages per CPU-second of ``pid``, messages per wall second) for one pipelined flood."""
    u = urlparse(url)
    pub = RawPublisher(str(u.hostname), int(u.port or 1883), f"bench-raw-{time.monotonic_ns()}")
    packets = pub.packets(msgs)
    base = sink.n
    c0, t0 = cpu_seconds(pid), time.monotonic()
    pub.send(packets)
    t1 = sink.wait_for(base + len(msgs), timeout)
    c1 = cpu_seconds(pid)
    pub.close()
    if sink.n - base < len(msgs) or sink.errors:
        raise RuntimeError(f"only {sink.n - base} of {len(msgs)} answered in {timeout:.0f} s")
    return len(msgs) / max(c1 - c0, 1e-9), len(msgs) / (t1 - t0)


def flood(url: str, msgs: list[tuple[str, int, list[float]]], sink: Sink, base: int) -> float:
    """Publish everything as fast as paho lets us; messages per second until all answered."""
    pub = client(url, f"bench-pub-{time.monotonic_ns()}")
    pub.loop_start()
    t0 = time.monotonic()
    for topic, seq, values in msgs:
        pub.publish(topic, json.dumps({"seq": seq, "values": values}), qos=1)
    t1 = sink.wait_for(base + len(msgs), 120)
    close_client(pub)
    return (sink.n - base) / (t1 - t0)


def paced(
    url: str,
    msgs: list[tuple[str, int, list[float]]],
    rate: float,
    stop: threading.Event | None = None,
) -> int:
    """Publish ``msgs`` at ``rate`` from the raw-socket publisher, each sample stamped as it
    goes out, in slices of a few milliseconds (until ``stop``). A paho publisher falls behind
    at the service's half load, and its own lag was read as the service's latency."""
    u = urlparse(url)
    pub = RawPublisher(str(u.hostname), int(u.port or 1883), f"bench-paced-{time.monotonic_ns()}")
    t0, sent = time.monotonic(), 0
    while sent < len(msgs) and not (stop is not None and stop.is_set()):
        due = min(len(msgs), int((time.monotonic() - t0) * rate) + 1)
        if due <= sent:
            time.sleep(0.002)
            continue
        now = time.time()
        part = [
            (topic, json.dumps({"seq": seq, "ts": now, "values": values}).encode())
            for topic, seq, values in msgs[sent:due]
        ]
        pub.sock.sendall(b"".join(pub.packets(part)))
        sent = due
    pub.wait_acked(sent, 30)
    pub.close()
    return sent


def start_runtime(
    bundle: Path,
    url: str,
    state: Path,
    protocol: str = "5",
    prefix: str = "v5",
    cores: set[int] | None = None,
    extra: tuple[str, ...] = (),
    tree: str | None = None,
) -> Runtime:
    """edge-lstm serve in its own process, returned once its retained status says online.
    It reads ``{prefix}/{stream}/data``, so that several can wait side by side."""
    cid = f"bench-runtime-{prefix}"
    rt = Runtime(
        bundle,
        url,
        state,
        protocol=protocol,
        client_id=cid,
        reorder_ms=0,
        cores=cores,
        tree=tree,
        extra=(
            "--log-level",
            "warning",
            "--snapshot-interval",
            str(SNAPSHOT_SECONDS),
            "--data-topic",
            f"{prefix}/{{stream}}/data",
            *extra,
        ),
    )
    rt.start()
    seen = threading.Event()
    c = client(url, f"bench-status-{time.monotonic_ns()}")
    c.on_message = lambda cl, u, m: seen.set() if b'"online"' in m.payload else None
    c.subscribe(f"edge/status/{cid}", 1)
    c.loop_start()
    seen.wait(30)
    close_client(c)
    return rt


def latency_window(
    url: str, sink: Sink, prefix: str, rate: float, count: int, start_seq: int, streams: int
) -> tuple[float, ...]:
    """(p50, p99, p99.9, max) in ms of ``count`` messages to ``streams`` streams of
    ``prefix`` at ``rate``."""
    sink.reset()
    base = sink.n
    msgs = messages(streams, count, start_seq=start_seq, prefix=prefix)
    paced(url, msgs, rate)
    sink.wait_for(base + count, 30)
    lat = np.array(sink.latencies()) * 1000
    return tuple(float(np.percentile(lat, q)) for q in (50, 99, 99.9, 100))


def rss_mb(rt: Runtime) -> float:
    assert rt.proc is not None
    for line in Path(f"/proc/{rt.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved throughput rounds")
    ap.add_argument("--throughput-only", action="store_true", help="part 1 only")
    ap.add_argument("--echo", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--sink", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument(
        "--against",
        metavar="TREE",
        help="also measure the latency of serve from another source tree (an older commit's "
        "worktree), its windows interleaved with this one's",
    )
    ap.add_argument("--latency-rounds", type=int, default=1, help="latency windows per runtime")
    ap.add_argument(
        "--latency-streams", type=int, default=1000, help="streams of the latency windows"
    )
    args = ap.parse_args()
    if args.echo:
        echo_main(args.echo)
        return 0
    if args.sink:
        sink_main(args.sink)
        return 0
    n = 6000 if args.quick else 20000
    rounds = args.rounds or (2 if args.quick else 3)
    _, bundle = example(1, 64)
    results: dict[str, Any] = {"messages_per_round": n, "streams": 1000, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="edge-lstm-bench-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker", embedded=False).start()
        url = broker.url
        # The load, the broker and the sink stay off the core under test: sharing it, they
        # took turns with the service, and their time slices read as its latency.
        rest = os.sched_getaffinity(0) - {0}
        if rest and broker.proc is not None:
            os.sched_setaffinity(0, rest)
            os.sched_setaffinity(broker.proc.pid, rest)
        try:
            log("throughput per CPU-second, each process pinned to core 0, interleaved rounds")
            sink = Sink(url)
            echo = Echo(url, core=0)
            rt = start_runtime(bundle, url, work / "state5", "5", "v5", {0})
            rt311 = start_runtime(bundle, url, work / "state311", "3.1.1", "v311", {0})
            assert rt.proc is not None and rt311.proc is not None
            cases = {  # name: (pid, topic prefix, samples per message)
                "echo": (echo.proc.pid, "echo", 1),
                "serve_mqtt5": (rt.proc.pid, "v5", 1),
                "serve_mqtt311": (rt311.proc.pid, "v311", 1),
                "serve_mqtt5_10_per_msg": (rt.proc.pid, "v5k", 10),
            }
            per_cpu: dict[str, list[float]] = {k: [] for k in cases}
            per_wall: dict[str, list[float]] = {k: [] for k in cases}
            for r in range(rounds):
                for name, (pid, prefix, k) in cases.items():
                    topic = "v5" if prefix == "v5k" else prefix
                    msgs = payloads(topic, 1000, n, k, r)  # as many messages: k x the samples
                    if prefix == "v5k":  # its own streams: seqs of its own
                        msgs = [(t.replace("/s", "/k", 1), p) for t, p in msgs]
                    cpu_rate, wall_rate = cpu_round(url, pid, msgs, sink, 300)
                    per_cpu[name].append(cpu_rate)
                    per_wall[name].append(wall_rate)
                    log(f"  round {r + 1}: {name:24s} {cpu_rate:8,.0f} msg/CPU-s")
            med = {k: statistics.median(v) for k, v in per_cpu.items()}
            for k, v in per_cpu.items():
                results[f"{k}_msgs_per_cpu_s_min"] = min(v)
                results[f"{k}_msgs_per_cpu_s_median"] = med[k]
            results["serve_mqtt5_10_per_msg_samples_per_cpu_s_median"] = (
                10 * med["serve_mqtt5_10_per_msg"]
            )
            results["ratio_serve_mqtt5_vs_echo"] = med["serve_mqtt5"] / med["echo"]
            results["ratio_serve_mqtt311_vs_echo"] = med["serve_mqtt311"] / med["echo"]
            rt_rate = statistics.median(per_wall["serve_mqtt5"])
            results["serve_mqtt5_msgs_per_wall_s_median"] = rt_rate
            echo.close()
            rt311.stop()
            if args.throughput_only:
                rt.stop()
                sink.close()
                return report(results)

            half = rt_rate / 2
            log(f"latency at half the runtime's maximum: {half:.0f} msg/s")
            count = int(half * SNAPSHOT_SECONDS * (1 if args.quick else 2))
            runs = {"": (rt, "v5")}
            if args.against:  # the same load, the windows interleaved
                old = start_runtime(bundle, url, work / "old", "5", "old", {0}, tree=args.against)
                runs["against_"] = (old, "old")
            streams = args.latency_streams
            for name, (_, prefix) in runs.items():  # every stream made, in both
                if streams > 1000 or name:
                    latency_window(url, sink, prefix, half, max(count, streams), 10_000, streams)
            lat: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
            for r in range(args.latency_rounds):
                for name, (_, prefix) in runs.items():
                    got = latency_window(url, sink, prefix, half, count, 20_000 + 1000 * r, streams)
                    lat[name].append(got)
                    log(
                        f"  round {r + 1}: {name or 'this'} p50 {got[0]:.1f} ms, p99 {got[1]:.1f}"
                        f" ms, p99.9 {got[2]:.1f} ms, max {got[3]:.1f} ms"
                    )
            results.update(latency_rate_msgs_per_s=half, latency_samples=count)
            results["latency_streams"] = streams
            for name, got in lat.items():
                for i, what in enumerate(("p50", "p99", "p99.9", "max")):
                    values = [g[i] for g in got]
                    results[f"{name}latency_{what}_ms"] = statistics.median(values)
                    results[f"{name}latency_{what}_ms_min"] = min(values)
                    results[f"{name}latency_{what}_ms_max"] = max(values)
            if args.against:
                old.stop()

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
            rt = start_runtime(bundle, url, work / "state5", "5", "v5", {0})
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
    return report(results)


def report(results: dict[str, Any]) -> int:
    path = save("mqtt", results)
    for k, v in results.items():
        print(f"  {k:48s} {v:,.3f}" if isinstance(v, float) else f"  {k:48s} {v}")
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

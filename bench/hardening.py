"""Hardening figures of ``edge-lstm serve`` against a real Mosquitto, each a named part.

    .venv/bin/python -m bench.hardening [--only NAME[,NAME]] [--out DIR] [--scale F]

fuzz      100,000 mutated payloads, every hostile case on data and control topics, interleaved
          with 5 good streams: crashes, good predictions missing or differing from the offline
          engine, answers per hostile message, wall time.
backlog   100,000 messages over 1,000 streams queued at the broker while the runtime is down,
          drained at start; then 100,000 more with the runtime up: drain / steady rate, peak
          RSS, every (stream, seq) answered, duplicates.
overload  ~5x the measured capacity for 60 s, with --overload block (all answered after the
          drain) and --overload drop-oldest --queue-size 1000 (every sample predicted or
          reported dropped); peak RSS.
streams   1,000,000 distinct stream ids, one message each, --capacity 100000: peak RSS, answers.
          The publishers keep at most 2,000 messages each unacknowledged, so the figure is the
          runtime's per-stream memory, not a broker flood (that is backlog's and overload's).
kill9     20 streams at ~1,000 msg/s for 20 s, kill -9 after 10 s and restart: duplicates vs the
          in-flight window, missing, differing.

Publishers run in their own processes; the runtime and the broker are real processes. RSS is
sampled from /proc/PID/status (VmRSS every 0.5 s, and VmHWM). ``--scale`` shrinks message
counts and durations for a quick look (the figures are only comparable at 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import numpy as np
import paho.mqtt.client as mqtt

from bench._common import BUILD, log
from edge.processor import INVALID_STREAM

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "build" / "test-bundles" / "clf-int8"  # --bundle overrides
RUNTIME_ID = "bench-hardening"
PARTS = ("fuzz", "backlog", "overload", "streams", "kill9")
_TABLE = [json.dumps(r) for r in np.random.default_rng(1).normal(0, 3, (64, 6)).round(4).tolist()]


def _client(url: str, cid: str, *, clean: bool = True) -> mqtt.Client:
    u = urlparse(url)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback brokers only"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(str(u.hostname), int(u.port or 1883), 60)
    return c


def _close(c: mqtt.Client) -> None:
    from firmware_sim.mqtt import close_client

    close_client(c)


def offline(samples: dict[str, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    """What the engine computes for each (stream, seq), fed in order from seq 1 in chunks of at
    most 1,000 (``tests.mqtt_helpers.offline`` steps all at once: more than a chunk may hold)."""
    import edge

    engine = edge.load(BUNDLE)
    out = {}
    for stream, x in samples.items():
        for i in range(0, len(x), 1000):
            y = engine.step(stream, x[i : i + 1000], seq=i + 1)
            for k, row in enumerate(y):
                out[(stream, i + k + 1)] = row
    return out


def good_values(seed: int, streams: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (streams, n, 6))


# -- publishers, each in its own process ------------------------------------------------------


def _seq_messages(spec: dict[str, Any]) -> Any:
    """Round-robin over ``streams`` (seq-major): message i is (streams[i % S], seq0 + i // S)."""
    streams: list[str] = spec["streams"]
    per, seq0 = spec["per_stream"], spec["seq0"]
    vals = good_values(spec["seed"], len(streams), per) if spec.get("seed") is not None else None
    ts = spec.get("ts", False)
    for j in range(per):
        for k, s in enumerate(streams):
            row = json.dumps(vals[k, j].tolist()) if vals is not None else _TABLE[(k + j) % 64]
            if ts:
                body = f'{{"seq":{seq0 + j},"ts":{time.time()!r},"values":{row}}}'
            else:
                body = f'{{"seq":{seq0 + j},"values":{row}}}'
            yield f"sensors/{s}/data", body.encode()


def _fuzz_messages(spec: dict[str, Any]) -> Any:
    from tests import hostile

    n, every = spec["n"], spec["good_every"]
    good = good_values(spec["seed"], spec["good_streams"], n // every + 1)
    cases = list(hostile.CASES)
    controls = list(hostile.CONTROL_CASES)
    gen = hostile.generate(spec["seed"], n)
    g = 0
    spread = max(1, n // (len(cases) + len(controls) + 1))
    for i, payload in enumerate(gen):
        yield f"sensors/h{i}/data", payload
        if i % spread == 0 and cases:
            k = len(hostile.CASES) - len(cases)
            yield f"sensors/c{k}/data", cases.pop(0)[1]
        elif i % spread == 0 and controls:
            k = len(hostile.CONTROL_CASES) - len(controls)
            body = controls.pop(0)[1]
            yield f"sensors/x{k}/control", body
            yield f"edge/control/{RUNTIME_ID}", body
        if i % every == 0:
            for s in range(spec["good_streams"]):
                row = json.dumps(good[s, g].tolist())
                yield f"sensors/good-{s}/data", b'{"seq":%d,"values":%s}' % (g + 1, row.encode())
            g += 1
    for k, (_, p) in enumerate(cases):  # whatever the spread did not place
        yield f"sensors/c{len(hostile.CASES) - len(cases) + k}/data", p


def publisher_main(url: str, cid: str, spec: dict[str, Any], out: Any) -> None:
    """Publish ``spec``'s messages at QoS 1, at most ``rate`` msg/s (0: as fast as it goes) and
    for at most ``duration`` s, then wait for every PUBACK. Reports counts and times."""
    c = _client(url, cid)
    acked = [0]
    lock = threading.Lock()

    def on_publish(*a: Any) -> None:
        with lock:
            acked[0] += 1

    c.on_publish = on_publish
    c.loop_start()
    gen = _fuzz_messages(spec) if spec.get("kind") == "fuzz" else _seq_messages(spec)
    rate, duration = spec.get("rate", 0.0), spec.get("duration", 0.0)
    # paho keys queued messages by a 16-bit id and reuses ids without checking: with more than
    # 65,535 unacknowledged, a new publish silently replaces a queued one (lost, never sent).
    window = min(spec.get("window", 20000), 60000)
    t0 = time.monotonic()
    sent = 0
    for topic, payload in gen:
        now = time.monotonic()
        if duration and now - t0 >= duration:
            break
        if rate:
            due = t0 + sent / rate
            if due > now:
                time.sleep(due - now)
        while sent - acked[0] > window:  # bounded publisher memory: let the broker catch up
            time.sleep(0.001)
        c.publish(topic, payload, qos=1)
        sent += 1
    t_sent = time.monotonic()
    deadline = t_sent + 300
    while acked[0] < sent and time.monotonic() < deadline:
        time.sleep(0.005)
    t_acked = time.monotonic()
    _close(c)
    out.put(
        {
            "cid": cid,
            "sent": sent,
            "acked": acked[0],
            "t0": t0,
            "t_sent": t_sent,
            "t_acked": t_acked,
        }
    )


class Publishers:
    """Publisher processes started together; ``join`` returns their reports."""

    def __init__(self, url: str, specs: list[dict[str, Any]], tag: str) -> None:
        ctx = mp.get_context("spawn")
        self.q = ctx.Queue()
        self.procs = [
            ctx.Process(target=publisher_main, args=(url, f"{tag}-{i}", s, self.q), daemon=True)
            for i, s in enumerate(specs)
        ]
        for p in self.procs:
            p.start()

    def join(self, timeout: float = 900) -> list[dict[str, Any]]:
        reports = []
        deadline = time.monotonic() + timeout
        for _ in self.procs:
            reports.append(self.q.get(timeout=max(1.0, deadline - time.monotonic())))
        for p in self.procs:
            p.join(10)
        return reports


def split_streams(streams: list[str], parts: int) -> list[list[str]]:
    return [streams[i::parts] for i in range(parts)]


# -- the receiving side ------------------------------------------------------------------------


class Collector:
    """Everything the runtime answers: per (stream, seq) prediction counts, y for some streams,
    errors (``dropped`` ones by (stream, seq)), answers per stream, and the retained status."""

    def __init__(self, url: str, keep_y: Callable[[str], bool] = lambda s: False) -> None:
        self.lock = threading.Lock()
        self.keep_y = keep_y
        self.reset()
        self.status: dict[str, str] = {}
        self.c = _client(url, f"bench-collector-{time.monotonic_ns()}", clean=False)
        self.c.on_message = self._on
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.subscribe(
            [("predictions/#", 1), ("errors/#", 1), ("replies/#", 1), ("edge/status/#", 1)]
        )
        self.c.loop_start()
        ready.wait(10)

    def reset(self) -> None:
        with self.lock:
            self.pred: Counter[tuple[str, int]] = Counter()
            self.ys: dict[tuple[str, int], list[np.ndarray]] = {}
            self.per_stream: Counter[str] = Counter()
            self.errors: Counter[str] = Counter()
            self.dropped: Counter[tuple[str, int | None]] = Counter()
            self.lat: list[float] = []
            self.n_pred = 0
            self.n_msgs = 0
            self.not_json = 0

    def _on(self, c: Any, u: Any, msg: Any) -> None:
        now = time.time()
        topic = msg.topic
        kind, _, stream = topic.partition("/")
        if kind == "edge":
            st = stream.rsplit("/", 1)[-1]
            try:
                self.status[st] = json.loads(msg.payload).get("state", "")
            except (ValueError, AttributeError):
                self.status[st] = msg.payload.decode(errors="replace")
            return
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            with self.lock:
                self.not_json += 1
                self.per_stream[stream] += 1
            return
        with self.lock:
            self.n_msgs += 1
            self.per_stream[stream] += 1
            if kind == "predictions":
                seq = doc["seq"]
                y = doc.get("y")
                rows = 1 if not y or not isinstance(y[0], list) else len(y)
                for k in range(rows):
                    self.pred[(stream, (seq + k) % 2**32)] += 1
                self.n_pred += 1
                if doc.get("ts"):
                    self.lat.append(now - doc["ts"])
                if self.keep_y(stream):
                    ya = np.asarray(y, np.float32).reshape(rows, -1)
                    for k in range(rows):
                        self.ys.setdefault((stream, seq + k), []).append(ya[k])
            elif kind == "errors":
                err = doc.get("error", "?")
                self.errors[err] += 1
                if err == "dropped":
                    self.dropped[(stream, doc.get("seq"))] += 1

    def online(self, rid: str = RUNTIME_ID) -> bool:
        return self.status.get(rid) == "online"

    def close(self) -> None:
        _close(self.c)


class RssSampler:
    """VmRSS every 0.5 s of whatever runtime process ``pid()`` names; VmHWM per process."""

    def __init__(self, pid: Callable[[], int | None]) -> None:
        self.pid = pid
        self.max_rss = 0.0
        self.hwm: dict[int, float] = {}
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                self.max_rss = max(self.max_rss, int(line.split()[1]) / 1024)
            elif line.startswith("VmHWM:"):
                self.hwm[pid] = int(line.split()[1]) / 1024

    def close(self) -> dict[str, float]:
        self.sample()
        self.stop.set()
        self.t.join(2)
        return {
            "peak_vmrss_sampled_mb": round(self.max_rss, 1),
            "peak_vmhwm_mb": round(max(self.hwm.values(), default=0.0), 1),
        }


# -- the runtime --------------------------------------------------------------------------------


class Service:
    """``edge-lstm serve`` with a fixed client id, restartable, with its RSS watched."""

    started: ClassVar[list[Service]] = []  # stopped by main() if a part fails half way

    def __init__(self, url: str, work: Path, col: Collector, *extra: str) -> None:
        Service.started.append(self)
        self.url, self.work, self.col, self.extra = url, work, col, extra
        self.rt: Any = None
        self.logs: list[str] = []
        self.exit_codes: list[int | str] = []
        self.rss = RssSampler(lambda: self.rt.proc.pid if self.rt and self.rt.proc else None)

    def start(self, wait_online: bool = True) -> Service:
        from firmware_sim.runtime import Runtime

        self.col.status.pop(RUNTIME_ID, None)
        self.rt = Runtime(
            BUNDLE,
            self.url,
            self.work / "state",
            client_id=RUNTIME_ID,
            reorder_ms=0,
            extra=("--stats-interval", "0", *self.extra),
        ).start()
        if wait_online and not wait_for(
            lambda: self.col.online(), 60, "runtime online", alive=self
        ):
            raise RuntimeError(f"the runtime did not come online: {self.output()[-1500:]}")
        return self

    def alive(self) -> bool:
        return bool(self.rt and self.rt.alive())

    def stop(self) -> int:
        rc = self.rt.stop()
        self.exit_codes.append(rc)
        return rc

    def kill9(self) -> None:
        self.rt.kill9()
        self.exit_codes.append("SIGKILL (ours)")

    def output(self) -> str:
        return self.rt.output() if self.rt else ""

    def log_summary(self) -> dict[str, Any]:
        text = self.output()
        lines = text.splitlines()
        return {
            "log_lines": len(lines),
            "tracebacks": text.count("Traceback"),
            "log_tail": [ln[:300] for ln in lines if " ERROR " in ln or "CRITICAL" in ln][-5:],
        }

    def close(self) -> dict[str, Any]:
        if self.alive():
            self.stop()
        return {**self.rss.close(), **self.log_summary(), "exit_codes": self.exit_codes}


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    progress: Callable[[], str] | None = None,
    alive: Service | None = None,
) -> bool:
    t0 = last = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if alive is not None and not alive.alive():
            log(f"  runtime died while waiting for {what}")
            return False
        if progress and time.monotonic() - last >= 10:
            last = time.monotonic()
            log(f"  [{time.monotonic() - t0:5.0f} s] {what}: {progress()}")
        time.sleep(0.02)
    log(f"  timed out after {timeout:.0f} s waiting for {what}")
    return False


def seq_specs(
    streams: list[str], per_stream: int, seq0: int, procs: int, **kw: Any
) -> list[dict[str, Any]]:
    return [
        {"streams": part, "per_stream": per_stream, "seq0": seq0, **kw}
        for part in split_streams(streams, procs)
    ]


def expected_keys(specs: list[dict[str, Any]], reports: list[dict[str, Any]]) -> set[Any]:
    """(stream, seq) of every message a publisher sent (round-robin, seq-major)."""
    keys = set()
    by_cid = sorted(reports, key=lambda r: int(r["cid"].rsplit("-", 1)[1]))
    for spec, rep in zip(specs, by_cid):
        s = spec["streams"]
        for i in range(rep["sent"]):
            keys.add((s[i % len(s)], spec["seq0"] + i // len(s)))
    return keys


# -- parts --------------------------------------------------------------------------------------


def part_fuzz(url: str, work: Path, scale: float) -> dict[str, Any]:
    from edge import payloads
    from tests import hostile

    n = int(100_000 * scale)
    every, n_good = 20, 5
    spec = {"kind": "fuzz", "n": n, "seed": 7, "good_every": every, "good_streams": n_good}
    col = Collector(url, keep_y=lambda s: s.startswith("good-"))
    svc = Service(url, work, col).start()
    t0 = time.monotonic()
    pubs = Publishers(url, [spec], "bench-fuzz")
    (rep,) = pubs.join()
    g = n // every + (1 if n % every else 0)
    samples = {f"good-{s}": v[:g] for s, v in enumerate(good_values(7, n_good, n // every + 1))}
    expected = offline(samples)

    n_cases, n_ctl = len(hostile.CASES), len(hostile.CONTROL_CASES)
    silent_ok = 0  # reload / snapshot on the runtime control topic are taken, not answered
    for _, p in hostile.CONTROL_CASES:
        try:
            doc = payloads.parse_control(p)  # as the service parses control messages
        except payloads.PayloadError:
            continue
        silent_ok += isinstance(doc, dict) and doc.get("cmd") in ("reload", "snapshot")
    hostile_streams = [f"h{i}" for i in range(n)] + [f"c{k}" for k in range(n_cases)]
    hostile_streams += [f"x{k}" for k in range(n_ctl)]

    def answered() -> int:
        with col.lock:
            return sum(1 for s in hostile_streams if col.per_stream[s] >= 1)

    def good_done() -> bool:
        with col.lock:
            return set(expected) <= set(col.ys)

    wait_for(
        lambda: good_done() and col.n_msgs >= len(hostile_streams),
        300,
        "answers",
        lambda: f"{col.n_msgs:,} answers",
        alive=svc,
    )
    wait_for(
        lambda: answered() >= len(hostile_streams),
        120,
        "an answer per hostile message",
        lambda: f"{answered():,} of {len(hostile_streams):,}",
        alive=svc,
    )
    time.sleep(1.0)
    wall = time.monotonic() - t0
    alive = svc.alive()
    with col.lock:
        missing = sorted(set(expected) - set(col.ys))
        differing = sum(
            1
            for k, ys in col.ys.items()
            for y in ys
            if k in expected and not np.array_equal(y, expected[k])
        )
        per = [col.per_stream[s] for s in hostile_streams]
        unanswered = [s for s in hostile_streams if col.per_stream[s] == 0]
        invalid = col.per_stream[INVALID_STREAM]
        errors = dict(col.errors.most_common(12))
        not_json = col.not_json
    res = {
        "hostile_sent": len(hostile_streams) + n_ctl,
        "generated": n,
        "cases_data": n_cases,
        "cases_control": n_ctl,
        "good_sent": g * n_good,
        "runtime_alive_at_end": alive,
        "runtime_crashes": 0 if alive else 1,
        "good_missing": len(missing),
        "good_differing": differing,
        "hostile_unanswered": len(unanswered),
        "unanswered_examples": unanswered[:5],
        "answers_per_hostile_msg_min": min(per),
        "answers_per_hostile_msg_mean": round(float(np.mean(per)), 3),
        "runtime_control_answers": invalid,
        "runtime_control_expected": n_ctl - silent_ok,
        "answers_not_json": not_json,
        "error_codes_top": errors,
        "publisher_msgs_per_s": round(rep["sent"] / (rep["t_sent"] - rep["t0"]), 1),
        "wall_s": round(wall, 1),
    }
    res.update(svc.close())
    if not alive:
        res["exit_codes"].append(svc.rt.proc.returncode)
    col.close()
    return res


def part_backlog(url: str, work: Path, scale: float) -> dict[str, Any]:
    n_streams, per = 1000, max(1, int(100 * scale))
    streams = [f"b{i}" for i in range(n_streams)]
    total = n_streams * per
    col = Collector(url)
    svc = Service(url, work, col).start()
    rc = svc.stop()  # the broker keeps our session (fixed client id, session expiry) and queues
    log(f"  runtime stopped (exit {rc}); publishing {total:,} while it is down")
    specs = seq_specs(streams, per, 1, 4, window=50000)
    t0 = time.monotonic()
    reps = Publishers(url, specs, "bench-backlog").join()
    pub_s = time.monotonic() - t0
    acked = sum(r["acked"] for r in reps)
    log(f"  {acked:,} acknowledged by the broker in {pub_s:.1f} s; starting the runtime")
    t_start = time.monotonic()
    svc.start(wait_online=False)
    ok = wait_for(
        lambda: len(col.pred) >= total,
        600,
        "backlog drain",
        lambda: f"{len(col.pred):,} of {total:,}",
        alive=svc,
    )
    drain_s = time.monotonic() - t_start
    drain_rate = total / drain_s if ok else len(col.pred) / drain_s
    log(f"  drained in {drain_s:.1f} s ({drain_rate:,.0f} msg/s); steady state now")
    wait_for(lambda: col.online(), 30, "runtime online", alive=svc)
    time.sleep(1.0)
    t1 = time.monotonic()
    specs2 = seq_specs(streams, per, per + 1, 4, window=50000)
    pubs = Publishers(url, specs2, "bench-steady")
    ok2 = wait_for(
        lambda: len(col.pred) >= 2 * total,
        600,
        "steady state answers",
        lambda: f"{len(col.pred) - total:,} of {total:,}",
        alive=svc,
    )
    reps2 = pubs.join()
    t1 = min(r["t0"] for r in reps2)  # from the first publish, not from process start
    steady_s = time.monotonic() - t1
    pub2_s = max(r["t_sent"] for r in reps2) - min(r["t0"] for r in reps2)
    steady_rate = total / steady_s if ok2 else (len(col.pred) - total) / steady_s
    time.sleep(1.0)
    want = {(s, q) for s in streams for q in range(1, 2 * per + 1)}
    with col.lock:
        got = dict(col.pred)
    res = {
        "messages_down": total,
        "messages_up": total,
        "streams": n_streams,
        "acked_by_broker": acked + sum(r["acked"] for r in reps2),
        "publish_while_down_s": round(pub_s, 1),
        "drain_s": round(drain_s, 1),
        "drain_msgs_per_s": round(drain_rate, 1),
        "steady_s": round(steady_s, 1),
        "steady_msgs_per_s": round(steady_rate, 1),
        "steady_publishers_msgs_per_s": round(total / pub2_s, 1),
        "drain_vs_steady": round(drain_rate / steady_rate, 3),
        "missing": len(want - set(got)),
        "duplicates": sum(v - 1 for v in got.values() if v > 1),
        "unexpected_keys": len(set(got) - want),
    }
    res.update(svc.close())
    col.close()
    return res


def measure_capacity(url: str, col: Collector, n: int, svc: Service) -> float:
    streams = [f"cap{i}" for i in range(200)]

    def answered() -> int:  # with drop-oldest, a message may be answered "dropped" instead
        return col.n_pred + sum(col.dropped.values())

    base = answered()
    t0 = time.monotonic()
    pubs = Publishers(url, seq_specs(streams, n // 200, 1, 3), "bench-cap")
    wait_for(
        lambda: answered() - base >= n, 120, "capacity", lambda: f"{answered() - base:,}", alive=svc
    )
    t1 = time.monotonic()
    reps = pubs.join()
    t0 = min(r["t0"] for r in reps)  # CLOCK_MONOTONIC: the same clock in every process
    return (answered() - base) / (t1 - t0)


def overload_mode(
    url: str, work: Path, mode: str, extra: tuple[str, ...], scale: float
) -> dict[str, Any]:
    duration = 60 * scale
    log(f"  overload {mode}")
    col = Collector(url)
    svc = Service(url, work / mode, col, *extra).start()
    cap = measure_capacity(url, col, max(2000, int(20000 * scale)), svc)
    time.sleep(1.0)
    col.reset()
    target = 5 * cap
    log(f"  capacity {cap:,.0f} msg/s; offering {target:,.0f} msg/s for {duration:.0f} s")
    procs = 4
    streams = [f"o{i}" for i in range(400)]
    per = int(target * duration / len(streams)) + 2
    specs = seq_specs(streams, per, 1, procs, rate=target / procs, duration=duration, window=60000)
    t0 = time.monotonic()
    pubs = Publishers(url, specs, f"bench-ovl-{mode}")
    t_end = t0 + duration + 5
    while time.monotonic() < t_end:
        time.sleep(min(10, max(0.1, t_end - time.monotonic())))
        log(
            f"  [{time.monotonic() - t0:5.0f} s] {col.n_pred:,} predictions, "
            f"{sum(col.dropped.values()):,} dropped reports, alive={svc.alive()}"
        )
    reps = pubs.join()
    flood_s = max(r["t_sent"] for r in reps) - min(r["t0"] for r in reps)
    sent = sum(r["sent"] for r in reps)
    acked = sum(r["acked"] for r in reps)
    keys = expected_keys(specs, reps)

    def accounted() -> int:
        with col.lock:
            got = set(col.pred)
            if mode != "block":
                got |= set(col.dropped)
        return len(keys & got)

    t_flood_end = time.monotonic()
    ok = wait_for(
        lambda: accounted() >= len(keys),
        900,
        "drain after the flood",
        lambda: f"{accounted():,} of {len(keys):,}",
        alive=svc,
    )
    drain_after = time.monotonic() - t_flood_end
    time.sleep(1.0)
    with col.lock:
        pred = set(col.pred) & keys
        drop = set(col.dropped) & keys
        dup_pred = sum(v - 1 for k, v in col.pred.items() if v > 1 and k in keys)
        drop_no_seq = sum(v for k, v in col.dropped.items() if k[1] is None)
    r = {
        "capacity_msgs_per_s": round(cap, 1),
        "offered_target_msgs_per_s": round(target, 1),
        "offered_achieved_msgs_per_s": round(sent / flood_s, 1),
        "published": sent,
        "acked_by_broker": acked,
        "predicted": len(pred),
        "dropped_reported": len(drop),
        "predicted_and_dropped": len(pred & drop),
        "dropped_reports_without_seq": drop_no_seq,
        "unaccounted": len(keys - pred - drop) if mode != "block" else len(keys - pred),
        "duplicate_predictions": dup_pred,
        "drain_after_flood_s": round(drain_after, 1),
        "all_accounted": ok,
    }
    r.update(svc.close())
    col.close()
    return r


def part_overload(url: str, work: Path, scale: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, extra in (
        ("block", ("--overload", "block")),
        ("drop-oldest", ("--overload", "drop-oldest", "--queue-size", "1000")),
    ):
        out[mode] = overload_mode(url, work, mode, extra, scale)
    return out


def part_streams(url: str, work: Path, scale: float) -> dict[str, Any]:
    n = int(1_000_000 * scale)
    col = Collector(url)
    svc = Service(url, work, col, "--capacity", "100000").start()
    streams = [f"s{i}" for i in range(n)]
    t0 = time.monotonic()
    # A steady stream of new ids, not a flood: Mosquitto 2.0.11 ignores Receive Maximum once
    # it queues for the runtime (bench.broker_flow), which would measure the broker instead.
    specs = seq_specs(streams, 1, 1, 3, window=2000)
    pubs = Publishers(url, specs, "bench-streams")
    ok = wait_for(
        lambda: len(col.pred) >= n,
        1200,
        "a prediction per stream",
        lambda: f"{len(col.pred):,} of {n:,}, VmRSS max {svc.rss.max_rss:.0f} MB",
        alive=svc,
    )
    wall = time.monotonic() - t0
    reps = pubs.join()
    time.sleep(1.0)
    with col.lock:
        got = set(col.pred)
        dups = sum(v - 1 for v in col.pred.values() if v > 1)
        errs = dict(col.errors)
    want = {(s, 1) for s in streams}
    res = {
        "streams": n,
        "acked_by_broker": sum(r["acked"] for r in reps),
        "predicted": len(got & want),
        "missing": len(want - got),
        "duplicates": dups,
        "errors": errs,
        "wall_s": round(wall, 1),
        "msgs_per_s": round(len(got & want) / wall, 1),
        "all_answered": ok,
    }
    res.update(svc.close())
    col.close()
    return res


def part_kill9(url: str, work: Path, scale: float) -> dict[str, Any]:
    rate, duration, n_streams = 1000.0, 20 * max(scale, 0.25), 20
    per = int(rate * duration / n_streams)
    streams = [f"k{i}" for i in range(n_streams)]
    col = Collector(url, keep_y=lambda s: s.startswith("k"))
    svc = Service(url, work, col).start()
    spec = {"streams": streams, "per_stream": per, "seq0": 1, "seed": 21, "ts": True, "rate": rate}
    t0 = time.monotonic()
    pubs = Publishers(url, [spec], "bench-kill9")
    time.sleep(duration / 2)
    with col.lock:
        lat_before = sorted(col.lat)
        answered_before = len(col.pred)
    svc.kill9()
    t_kill = time.monotonic()
    log(f"  kill -9 at {t_kill - t0:.1f} s after {answered_before:,} answers; restarting")
    svc.start(wait_online=False)
    (rep,) = pubs.join()
    samples = {s: v for s, v in zip(streams, good_values(21, n_streams, per))}
    expected = offline(samples)
    ok = wait_for(
        lambda: len(col.ys) >= len(expected),
        120,
        "every prediction",
        lambda: f"{len(col.ys):,} of {len(expected):,}",
        alive=svc,
    )
    time.sleep(1.0)
    with col.lock:
        got = {k: list(v) for k, v in col.ys.items()}
    missing = len(set(expected) - set(got))
    differing = sum(
        1
        for k, ys in got.items()
        for y in ys
        if k not in expected or not np.array_equal(y, expected[k])
    )
    dups = sum(len(v) - 1 for v in got.values())
    rtt_p50 = float(np.percentile(lat_before, 50)) if lat_before else float("nan")
    rtt_p99 = float(np.percentile(lat_before, 99)) if lat_before else float("nan")
    in_flight = rate * rtt_p99
    max_unacked = 10000
    window = min(max_unacked, max(1, int(np.ceil(in_flight))))
    res = {
        "sent": rep["sent"],
        "acked_by_broker": rep["acked"],
        "rate_msgs_per_s": rate,
        "rtt_p50_ms": round(rtt_p50 * 1000, 2),
        "rtt_p99_ms": round(rtt_p99 * 1000, 2),
        "in_flight_rate_x_rtt_p99": round(in_flight, 1),
        "max_unacked": max_unacked,
        "in_flight_window": window,
        "duplicates": dups,
        "duplicates_target_2x_window": 2 * window,
        "duplicates_within_target": dups <= 2 * window,
        "duplicates_within_2x_max_unacked": dups <= 2 * max_unacked,
        "missing": missing,
        "differing": differing,
        "all_answered": ok,
    }
    res.update(svc.close())
    col.close()
    return res


RUNNERS = {
    "fuzz": part_fuzz,
    "backlog": part_backlog,
    "overload": part_overload,
    "streams": part_streams,
    "kill9": part_kill9,
}

# (part, key, label, target) rows of the printed table
TABLE = [
    ("fuzz", "hostile_sent", "hostile messages sent", None),
    ("fuzz", "runtime_crashes", "runtime crashes", "0"),
    ("fuzz", "good_missing", "good predictions missing", "0"),
    ("fuzz", "good_differing", "good predictions differing", "0"),
    ("fuzz", "hostile_unanswered", "hostile messages unanswered", "0"),
    ("fuzz", "answers_per_hostile_msg_min", "answers per hostile msg (min)", ">= 1"),
    ("fuzz", "answers_per_hostile_msg_mean", "answers per hostile msg (mean)", None),
    ("fuzz", "runtime_control_answers", "runtime-control answers", None),
    ("fuzz", "runtime_control_expected", "runtime-control answers expected", None),
    ("fuzz", "wall_s", "wall time (s)", None),
    ("backlog", "drain_msgs_per_s", "drain rate (msg/s)", None),
    ("backlog", "steady_msgs_per_s", "steady rate (msg/s)", None),
    ("backlog", "drain_vs_steady", "drain / steady", ">= 0.9"),
    ("backlog", "peak_vmhwm_mb", "peak RSS VmHWM (MB)", "<= 150"),
    ("backlog", "peak_vmrss_sampled_mb", "peak VmRSS sampled (MB)", None),
    ("backlog", "missing", "(stream, seq) missing", "0"),
    ("backlog", "duplicates", "duplicate predictions", None),
    ("overload.block", "capacity_msgs_per_s", "block: capacity (msg/s)", None),
    ("overload.block", "offered_achieved_msgs_per_s", "block: offered (msg/s)", "5x cap"),
    ("overload.block", "acked_by_broker", "block: acked by broker", None),
    ("overload.block", "predicted", "block: predicted", "= acked"),
    ("overload.block", "drain_after_flood_s", "block: drain after flood (s)", None),
    ("overload.block", "peak_vmhwm_mb", "block: peak RSS VmHWM (MB)", "<= 150"),
    ("overload.drop-oldest", "capacity_msgs_per_s", "drop: capacity (msg/s)", None),
    ("overload.drop-oldest", "offered_achieved_msgs_per_s", "drop: offered (msg/s)", "5x cap"),
    ("overload.drop-oldest", "acked_by_broker", "drop: acked by broker", None),
    ("overload.drop-oldest", "predicted", "drop: predicted", None),
    ("overload.drop-oldest", "dropped_reported", "drop: reported dropped", None),
    ("overload.drop-oldest", "unaccounted", "drop: neither", "0"),
    ("overload.drop-oldest", "peak_vmhwm_mb", "drop: peak RSS VmHWM (MB)", "<= 150"),
    ("streams", "streams", "distinct streams", None),
    ("streams", "missing", "streams without a prediction", "0"),
    ("streams", "peak_vmhwm_mb", "peak RSS VmHWM (MB)", "<= 200"),
    ("streams", "peak_vmrss_sampled_mb", "peak VmRSS sampled (MB)", None),
    ("streams", "msgs_per_s", "rate (msg/s)", None),
    ("kill9", "duplicates", "duplicate predictions", "<= 2x window"),
    ("kill9", "in_flight_window", "in-flight window (msgs)", None),
    ("kill9", "rtt_p99_ms", "round trip p99 (ms)", None),
    ("kill9", "missing", "missing", "0"),
    ("kill9", "differing", "differing y", "0"),
]


def lookup(results: dict[str, Any], part: str, key: str) -> Any:
    node: Any = results
    for p in part.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node.get(key) if isinstance(node, dict) else None


def print_table(results: dict[str, Any]) -> None:
    print(f"  {'part':9s} {'figure':36s} {'value':>14s}  target")
    for part, key, label, target in TABLE:
        v = lookup(results, part, key)
        if v is None:
            continue
        s = f"{v:,.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else f"{v:,}"
        print(f"  {part.split('.')[0]:9s} {label:36s} {s:>14s}  {target or ''}")


def main() -> int:
    global BUNDLE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated parts of {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=BUILD, help="directory of hardening.json")
    ap.add_argument(
        "--scale",
        action="append",
        default=[],
        help="shrink counts and durations: F for every part, or NAME=F for one (repeatable)",
    )
    ap.add_argument("--bundle", type=Path, default=BUNDLE, help="6-feature bundle to serve")
    args = ap.parse_args()
    BUNDLE = args.bundle.resolve()
    parts = args.only.split(",") if args.only else list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    from firmware_sim.broker import Broker

    scales = dict.fromkeys(PARTS, 1.0)
    for item in args.scale:
        name, _, f = item.rpartition("=")
        for part in [name] if name else PARTS:
            if part not in PARTS:
                ap.error(f"--scale {item}: unknown part {part!r}")
            scales[part] = float(f)
    results: dict[str, Any] = {"bundle": str(BUNDLE)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hardening.json"
    with tempfile.TemporaryDirectory(prefix="edge-lstm-hardening-") as tmp:
        for name in parts:
            work = Path(tmp) / name
            broker = Broker(work / "broker", embedded=False).start()
            log(f"{name}: broker {broker.url}")
            t0 = time.monotonic()
            try:
                results[name] = RUNNERS[name](broker.url, work, scales[name])
            except Exception as exc:  # one part failing still leaves the others' figures
                log(f"{name} failed: {exc!r}")
                results[name] = {"error": repr(exc)}
            finally:
                for svc in Service.started:
                    if svc.alive():
                        svc.stop()
                Service.started.clear()
                broker.stop()
            results[name]["part_wall_s"] = round(time.monotonic() - t0, 1)
            results[name]["scale"] = scales[name]
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

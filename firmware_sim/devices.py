"""Simulated sensor devices that behave like firmware on the wire.

Each device samples on its own clock (rate, jitter), numbers samples with a u32 ``seq``,
batches ``k`` samples per message, and keeps a bounded store-and-forward buffer while it is
offline. Devices own a client id each, or share a few connections for load tests.
One scheduler thread drives them all from a heap of timed events.

A device may reboot (fault ``reboot``): its boot id changes (a per-device counter that starts
at a random u32, drawn afresh for each run: a run is a new boot of every device, so a runtime
that served an earlier run of the same seed takes the streams up again instead of refusing
their samples as duplicates; sent as ``"boot"`` when the fleet has ``boot_ids``), its seq
restarts at 1 and
its store-and-forward buffer is gone. Messages already in flight (a delayed, reordered or
duplicated send) still arrive, so the runtime sees some of the old boot after the new one; a
device without boot ids cannot be told apart from its old self, so its in-flight messages die
with the reboot instead (the runtime could only misjudge them).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import inspect
import itertools
import json
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge import payloads
from edge.errors import shown
from edge.topics import Template

from .errors import SimError
from .faults import INVALID, LOST_IN_REBOOT, FaultPlan, Injector
from .mqtt import Link, close_client, connect, link, new_client
from .sources import Source, maker

FORMATS = ("json", "senml", "binary")
BUFFER_LIMIT = 10_000  # messages a device stores while offline; the oldest go first
PROGRESS_S = 5.0  # seconds between progress lines while connecting
PRUNE_AT = 5000  # published messages a connection keeps track of before it drops the acknowledged
U32 = 2**32
# Whether this edge.payloads can put a boot id into SenML / binary frames (else a device that
# must carry its boot id speaks JSON).
BOOT_IN = {
    "senml": "boot" in inspect.signature(payloads.encode_senml).parameters,
    "binary": "boot" in inspect.signature(payloads.encode_frame).parameters,
    "json": True,
}
Key = tuple[str, int, int]  # (stream, epoch, seq): epoch counts the device's boots from 0


def digest(payload: bytes) -> bytes:
    """How a message is recognised on the wire (payloads carry a wall-clock ts: unique)."""
    return hashlib.blake2b(payload, digest_size=12).digest()


@dataclass
class Sent:
    """Ground truth of one message: what it carried and what happened to it."""

    stream: str
    seq: int
    values: np.ndarray
    labels: np.ndarray | None
    faults: list[str] = field(default_factory=list)
    created: float = 0.0
    published: float | None = None  # wall time of the first publish
    # handed to the client but never acknowledged by the broker (no PUBACK for any copy:
    # it went away); set when the fleet finishes
    unacked: bool = False
    epoch: int = 0  # which boot of its device, counted from 0
    boot: int | None = None  # the boot id on the wire (None: the device sends none)
    wire: bytes = b""  # digest of the payload as sent

    @property
    def keys(self) -> list[Key]:
        """(stream, epoch, seq) of every sample the message carries."""
        return [(self.stream, self.epoch, (self.seq + k) % U32) for k in range(len(self.values))]

    @property
    def valid(self) -> bool:
        return not set(self.faults) & set(INVALID)

    @property
    def delivered(self) -> bool:
        """The broker acknowledged it (PUBACK): handed to the client is not enough."""
        return self.published is not None and not self.unacked


FILES_PER_CONNECTION = 3  # paho's socket to the broker and the socket pair that wakes its loop
FILES_SPARE = 32  # the process's own: libraries, the scorer's connection, the results, a plot


def _check_open_files(n_conn: int, devices: int, connections: int) -> None:
    """Refused before anything starts: past the open-file limit a connection failed half-way
    through connecting the fleet, with a traceback ("Too many open files")."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = n_conn * FILES_PER_CONNECTION + FILES_SPARE
    if limit == resource.RLIM_INFINITY or need <= limit:
        return
    fit = (limit - FILES_SPARE) // FILES_PER_CONNECTION
    what = f"--devices {devices}" if connections <= 0 else f"--connections {connections}"
    fix = f"use --connections {fit} or fewer (devices share them), or " if fit >= 1 else ""
    raise SimError(
        f"{what}: {n_conn:,} MQTT connections need about {need:,} open files, this process "
        f"may open {limit:,}: {fix}raise the limit (ulimit -n)"
    )


class Connection:
    def __init__(
        self, url: str | Link, client_id: str, configure: Callable[[Any], None] | None = None
    ):
        try:
            self.client = new_client(url, client_id, clean_session=False)
        except OSError as exc:  # its socket pair: out of open files, say
            raise SimError(f"cannot make an MQTT client for {url}: {exc}") from exc
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.infos: list[Any] = []
        self._prune_at = PRUNE_AT
        if configure:
            configure(self.client)
        try:
            connect(self.client, url)
        except OSError as exc:
            raise SimError(f"broker {url} is unreachable: {exc}") from exc
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> Any:
        """Hand one message to the client; returns paho's MessageInfo (published on PUBACK)."""
        info = self.client.publish(topic, payload, qos=1)
        self.infos.append(info)
        if len(self.infos) > self._prune_at:
            self._forget_published()
        return info

    def _forget_published(self) -> None:
        """With the broker away few are published: the list is scanned again only once it
        doubled, not at every message (minutes of CPU for a device offline for a while)."""
        self.infos = [i for i in self.infos if not i._published]
        self._prune_at = max(PRUNE_AT, 2 * len(self.infos))

    def go_offline(self) -> None:
        close_client(self.client)

    def go_online(self) -> None:
        with contextlib.suppress(OSError):  # broker away: the network thread keeps retrying
            self.client.reconnect()
        self.client.loop_start()

    def pending(self) -> int:
        return sum(not i._published for i in self.infos)

    def close(self) -> None:
        close_client(self.client)


class Device:
    def __init__(
        self,
        stream: str,
        source: Source,
        conn: Connection,
        own_conn: bool,
        *,
        rate: float,
        batch: int,
        fmt: str,
        injector: Injector,
        jitter: float,
        rng: np.random.Generator,
        feature_names: list[str],
        boot_ids: bool = True,
        batch_max: int | None = None,
        boot_base: int = 0,
        topic: str | None = None,
    ) -> None:
        self.stream, self.source, self.conn, self.own_conn = stream, source, conn, own_conn
        self.rate, self.batch, self.fmt = rate, batch, fmt
        self.batch_max = batch_max or batch
        self.injector, self.jitter, self.rng = injector, jitter, rng
        self.names = feature_names
        self.seq = int(rng.integers(0, 1000))
        self.boot_ids = boot_ids
        self.boot = (int(rng.integers(0, U32)) + boot_base) % U32  # rng: seeded as before
        self.epoch = 0
        if boot_ids and not BOOT_IN[fmt] and injector.plan.rates.get("reboot", 0) > 0:
            self.fmt = "json"  # the only format that can carry its boot id here
        self.skew = 0.0
        self.offline = False
        self.buffer: deque[tuple[Sent, bytes]] = deque()
        self.topic = topic or f"sensors/{stream}/data"  # the runtime's data_topic

    @property
    def carries_boot(self) -> bool:
        return self.boot_ids and BOOT_IN[self.fmt]

    def take_batch(self) -> int:
        if self.batch_max <= self.batch:
            return self.batch
        return int(self.rng.integers(self.batch, self.batch_max + 1))

    def reboot(self) -> list[Sent]:
        """New boot id, seq from 1, buffer gone. Returns the messages that were lost."""
        self.epoch += 1
        self.boot = (self.boot + 1) % U32
        self.seq = 1
        self.skew = 0.0
        lost = [m for m, _ in self.buffer if m.published is None]
        for m in lost:
            m.faults.append(LOST_IN_REBOOT)
        self.buffer.clear()
        return lost

    def encode(self, msg: Sent, fault: str | None) -> bytes:
        ts = time.time() + self.skew
        values = msg.values
        if fault == "garbage":
            return bytes(self.rng.integers(0, 256, 24, dtype=np.uint8))
        if fault == "nan":
            values = values.copy()
            values[0, 0] = np.nan
        if fault == "wrong_features":
            values = values[:, :-1]
        boot = {"boot": msg.boot} if msg.boot is not None else {}
        if self.fmt == "binary":
            return payloads.encode_frame(msg.seq, values, ts, **boot)
        if self.fmt == "senml" and fault != "wrong_features":
            return payloads.encode_senml(msg.seq, values, self.names, ts, 1.0 / self.rate, **boot)
        rows = values.tolist()  # json writes NaN as NaN, which the runtime must refuse
        body = {"seq": msg.seq, "ts": ts, **boot, "values": rows[0] if len(rows) == 1 else rows}
        return json.dumps(body).encode()


class Fleet:
    """All devices, their connections and the scheduler thread."""

    def __init__(
        self,
        url: str | Link,
        devices: int,
        rate: float,
        *,
        source: str = "basicmotions",
        faults: FaultPlan | None = None,
        fmt: str = "json",
        batch: int | tuple[int, int] = 1,
        connections: int = 0,
        seed: int = 0,
        jitter: float = 0.05,
        features: int = 6,
        feature_names: list[str] | None = None,
        prefix: str = "dev",
        configure: Callable[[Any], None] | None = None,
        boot_ids: bool = True,
    ) -> None:
        """``fmt`` "mixed" gives device i the format ``FORMATS[i % 3]``; ``batch`` (lo, hi)
        draws each message's sample count from lo..hi."""
        lo, hi = (batch, batch) if isinstance(batch, int) else batch
        if devices < 1 or rate <= 0 or not 1 <= lo <= hi:
            raise SimError(
                f"need --devices >= 1, --rate > 0, --batch >= 1 (got {devices}, {rate}, {batch})"
            )
        if fmt not in (*FORMATS, "mixed"):
            raise SimError(f"--format {shown(fmt)} is not one of {', '.join(FORMATS)}, mixed")
        self.boot_ids = boot_ids
        self.plan = faults or FaultPlan()
        self.rate = rate
        self.log: list[Sent] = []
        self.lock = threading.Lock()
        names = feature_names or [f"f{i}" for i in range(features)]
        n_conn = devices if connections <= 0 else min(connections, devices)
        _check_open_files(n_conn, devices, connections)
        make = maker(source, seed, features)  # the source checked first, read once
        first = make(0)
        if first.features != len(names):
            raise SimError(
                f"--source gives {first.features} features, the model expects {len(names)}"
            )
        sources = [first]
        said = time.monotonic()
        for i in range(1, devices):
            sources.append(make(i))
            if time.monotonic() - said >= PROGRESS_S:  # a large fleet takes a while: say so
                said = time.monotonic()
                print(f"preparing: {i + 1:,} of {devices:,} devices", file=sys.stderr)
        self.conns: list[Connection] = []
        said = time.monotonic()
        try:
            for i in range(n_conn):
                self.conns.append(Connection(url, f"firmware-sim-{prefix}-{seed}-{i}", configure))
                if time.monotonic() - said >= PROGRESS_S:  # thousands take minutes: say so
                    said = time.monotonic()
                    print(f"connecting: {i + 1:,} of {n_conn:,} connections", file=sys.stderr)
        except SimError:
            self.close()
            raise
        self.devices = []
        boot_base = secrets.randbits(32)  # this run's boots: see the module's docstring
        data = Template(link(url).data_topic)
        for i, src in enumerate(sources):
            rng = np.random.default_rng([seed, i, 7])
            self.devices.append(
                Device(
                    f"{prefix}-{i}",
                    src,
                    self.conns[i % n_conn],
                    n_conn == devices,
                    rate=rate,
                    batch=lo,
                    batch_max=hi,
                    fmt=FORMATS[i % len(FORMATS)] if fmt == "mixed" else fmt,
                    injector=Injector(self.plan, rng),
                    jitter=jitter,
                    rng=rng,
                    feature_names=names,
                    boot_ids=boot_ids,
                    boot_base=boot_base,
                    topic=data.topic(f"{prefix}-{i}"),
                )
            )
        self.reboots = 0
        self._events: list[tuple[float, int, str, Callable[[], None]]] = []
        self._count = itertools.count()
        self.stop_event = threading.Event()
        # every publish: (message, its MessageInfo); paho sets ``_published`` on the PUBACK
        # (``is_published()`` raises for a message handed over while disconnected)
        self._handed: list[tuple[Sent, Any]] = []
        self._acked: set[int] = set()  # id() of messages acknowledged (the log keeps them)
        self._prune_at = 10000

    def _at(self, t: float, kind: str, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` at monotonic time ``t``; kind is "tick", "send" or "online"."""
        heapq.heappush(self._events, (t, next(self._count), kind, fn))

    def _tick(self, d: Device, t: float) -> None:
        rebooted = d.injector.roll("reboot")
        if rebooted:
            d.reboot()
            self.reboots += 1
        k = d.take_batch()
        values, labels = d.source.take(k)
        boot = d.boot if d.carries_boot else None
        msg = Sent(d.stream, d.seq, values, labels, created=time.time(), epoch=d.epoch, boot=boot)
        if rebooted:
            msg.faults.append("reboot")
        d.seq = (d.seq + k) % U32
        fault = d.injector.payload_fault()
        if fault:
            msg.faults.append(fault)
        with self.lock:
            self.log.append(msg)
        period = k / d.rate
        if fault != "drop":
            payload = d.encode(msg, fault)
            msg.wire = digest(payload)
            delay = 0.0
            if d.injector.roll("delay"):
                msg.faults.append("delay")
                delay = self.plan.delay_s
            if d.injector.roll("reorder"):
                msg.faults.append("reorder")
                delay = max(delay, period * (self.plan.reorder_window + 0.5))
            self._at(t + delay, "send", lambda: self._send(d, msg, payload))
            if d.injector.roll("duplicate"):
                msg.faults.append("duplicate")
                again = t + delay + period * float(d.rng.uniform(0, 3))
                self._at(again, "send", lambda: self._send(d, msg, payload))
        if not d.offline and d.injector.roll("disconnect"):
            msg.faults.append("disconnect")
            self._offline(d, t)
        if d.injector.roll("skew"):
            msg.faults.append("skew")
            d.skew = self.plan.skew_s
        nxt = t + period * (1 + d.jitter * float(d.rng.uniform(-1, 1)))
        self._at(nxt, "tick", lambda: self._tick(d, nxt))

    def _send(self, d: Device, msg: Sent, payload: bytes) -> None:
        if msg.epoch != d.epoch and (d.offline or not d.boot_ids):
            if msg.published is None:  # in flight when the device rebooted: gone with it
                msg.faults.append(LOST_IN_REBOOT)
            return
        if d.offline:
            if len(d.buffer) >= BUFFER_LIMIT:
                old, _ = d.buffer.popleft()
                old.faults.append("buffer_overflow")
            d.buffer.append((msg, payload))
            return
        self._handed.append((msg, d.conn.publish(d.topic, payload)))
        if len(self._handed) > self._prune_at:  # keep only what waits for its PUBACK
            self._acked.update(id(m) for m, info in self._handed if info._published)
            self._handed = [(m, info) for m, info in self._handed if not info._published]
            self._prune_at = max(10000, 2 * len(self._handed))  # a broker away: not each send
        if msg.published is None:
            msg.published = time.time()

    def _offline(self, d: Device, t: float) -> None:
        d.offline = True
        if d.own_conn:
            d.conn.go_offline()

        def back() -> None:
            if d.own_conn:
                d.conn.go_online()
            d.offline = False
            for item in sorted(d.buffer, key=lambda item: item[0].seq):  # in sample order
                self._send(d, *item)
            d.buffer.clear()

        self._at(t + self.plan.disconnect_s, "online", back)

    def run(self, duration: float, progress: Callable[[float], None] | None = None) -> list[Sent]:
        start = time.monotonic()
        rng = np.random.default_rng(1)
        for d in self.devices:  # stagger the first samples over one period
            first = start + float(rng.uniform(0, d.batch / d.rate))
            self._at(first, "tick", lambda d=d, first=first: self._tick(d, first))
        end = start + duration
        last_progress = 0.0
        while self._events and not self.stop_event.is_set():
            t, _, _, fn = self._events[0]
            now = time.monotonic()
            if t >= end or now >= end:  # behind its rate (or past the clock's resolution):
                break  # a device makes samples in real time, and so stops at --duration
            if t > now:
                self.stop_event.wait(min(t - now, 0.05))
                continue
            heapq.heappop(self._events)
            fn()
            if progress and now - last_progress > 0.25:
                progress(now - start)
                last_progress = now
        self._finish()
        return self.log

    def _finish(self) -> None:
        """Flush sends still scheduled (delays, reorders) and offline buffers, then wait for
        the broker to acknowledge everything."""
        events = sorted((t, n, fn) for t, n, kind, fn in self._events if kind != "tick")
        self._events.clear()
        for _, _, fn in events:
            fn()
        for d in self.devices:
            if d.offline:
                if d.own_conn:
                    d.conn.go_online()
                d.offline = False
                while d.buffer:
                    self._send(d, *d.buffer.popleft())
        deadline = time.monotonic() + 15
        while any(c.pending() for c in self.conns) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._acked.update(id(m) for m, info in self._handed if info._published)
        for m, _ in self._handed:  # any copy acknowledged: delivered
            m.unacked = id(m) not in self._acked
        self._handed.clear()

    def close(self) -> None:
        for c in self.conns:
            c.close()

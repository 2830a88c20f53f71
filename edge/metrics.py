"""Counters and latency histograms of the service, exposed as a stats dict and (optionally)
on a Prometheus endpoint. Plain Python; ``prometheus-client`` is imported only when the
endpoint is switched on."""

from __future__ import annotations

import bisect
import json
import logging
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("edge.service")
# The metrics endpoint: connections served at once (more are closed as they come), and how
# long one may wait for the client's next bytes. A client that connects and sends nothing (or
# a thousand of them) held a thread and a file descriptor each, for ever: with the usual limit
# of 1,024 descriptors, the service could no longer open a log segment or a broker connection.
HTTP_CONNECTIONS = 8
HTTP_TIMEOUT = 10.0
HTTP_DEADLINE = 20.0  # the longest a connection is served: a byte every 9 s is no scrape

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self.max = 0.0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1
        self.max = max(self.max, value)

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile, never above the largest value
        seen (so past the last bucket it is that value, not infinity)."""
        if not self.count:
            return 0.0
        target, seen = q * self.count, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target and i < len(self.buckets):
                return min(self.buckets[i], self.max)
        return self.max


class Metrics:
    COUNTERS = (
        "messages_in",
        "samples_in",
        "predictions_out",
        "dropped_overload",
        "acks",
        "wal_records",
        "snapshots",
        "reloads",
        "reconnects",
        "control",
        "republished",
        "wal_damaged",
        "snapshots_damaged",
        "storage_errors",
        "publish_retries",
        "publish_refused",
        "publish_failed",
        "sessions_lost",
        "subscriptions_downgraded",
        "reorder_voids_forgotten",
        "overlapping_runtimes",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: Counter[str] = Counter({name: 0 for name in self.COUNTERS})
        self.errors: Counter[str] = Counter()
        self.step_latency = Histogram()
        self.e2e_latency = Histogram()
        self._started = time.monotonic()
        self._last_snapshot = self._started  # or the start, before the first snapshot
        self.gauges: dict[str, Callable[[], float]] = {
            "snapshot_age_seconds": lambda: time.monotonic() - self._last_snapshot
        }
        # counters another object already keeps (the engine's): read, never copied
        self.derived_counters: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n
            if name == "snapshots":
                self._last_snapshot = time.monotonic()

    def saved(self) -> None:
        """The state on disk is current without a new snapshot (nothing changed since)."""
        with self.lock:
            self._last_snapshot = time.monotonic()

    def error(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = dict(self.counters)
            out["errors"] = dict(self.errors)
            out["step_latency_p50_ms"] = self.step_latency.quantile(0.5) * 1000
            out["step_latency_p99_ms"] = self.step_latency.quantile(0.99) * 1000
            out["e2e_latency_p50_ms"] = self.e2e_latency.quantile(0.5) * 1000
            out["e2e_latency_p99_ms"] = self.e2e_latency.quantile(0.99) * 1000
        # seconds between two stats on a clock NTP does not step (``ts`` is the wall clock)
        out["uptime_seconds"] = time.monotonic() - self._started
        out.update({k: f() for k, f in {**self.derived_counters, **self.gauges}.items()})
        return out

    @staticmethod
    def dumps(doc: Any) -> bytes:
        """Strict JSON (no NaN or Infinity, which e.g. JavaScript's JSON.parse rejects)."""
        return json.dumps(strict(doc), allow_nan=False).encode()

    def serve_prometheus(self, host: str, port: int) -> None:
        try:
            from prometheus_client import REGISTRY, make_wsgi_app
            from prometheus_client.core import (
                CounterMetricFamily,
                GaugeMetricFamily,
                HistogramMetricFamily,
            )
        except ImportError as exc:
            from .errors import ConfigError

            raise ConfigError(
                "metrics_port needs prometheus-client: pip install 'edge-lstm[service]'"
            ) from exc
        metrics = self

        class Collector:
            def collect(self) -> Iterator[Any]:
                with metrics.lock:
                    for name, value in metrics.counters.items():
                        yield CounterMetricFamily(
                            f"edge_lstm_{name}", name.replace("_", " "), value=value
                        )
                    errs = CounterMetricFamily(
                        "edge_lstm_errors", "errors by code", labels=["code"]
                    )
                    for code, value in metrics.errors.items():
                        errs.add_metric([code], value)
                    yield errs
                    for hname, h in (
                        ("step_latency_seconds", metrics.step_latency),
                        ("e2e_latency_seconds", metrics.e2e_latency),
                    ):
                        cum, buckets = 0, []
                        for b, c in zip([*map(str, h.buckets), "+Inf"], h.counts):
                            cum += c
                            buckets.append((b, cum))
                        yield HistogramMetricFamily(
                            f"edge_lstm_{hname}", hname, buckets=buckets, sum_value=h.sum
                        )
                for name, fn in metrics.derived_counters.items():
                    yield CounterMetricFamily(
                        f"edge_lstm_{name}", name.replace("_", " "), value=fn()
                    )
                for name, fn in metrics.gauges.items():
                    yield GaugeMetricFamily(f"edge_lstm_{name}", name.replace("_", " "), value=fn())

        REGISTRY.register(Collector())
        serve_http(host, port, make_wsgi_app(REGISTRY))


def serve_http(
    host: str,
    port: int,
    app: Any,
    connections: int = HTTP_CONNECTIONS,
    idle: float = HTTP_TIMEOUT,
    deadline: float = HTTP_DEADLINE,
) -> Any:
    """Serve the WSGI ``app`` on ``host:port`` in a thread of its own, at most
    ``connections`` clients at once (those beyond are closed at once), each given ``idle``
    seconds for its next bytes and ``deadline`` seconds in all: a client that never sends,
    never reads, or trickles its request a byte at a time, does not hold a thread and a
    descriptor for longer. Returns the server."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    slots = threading.BoundedSemaphore(connections)

    class Handler(WSGIRequestHandler):
        timeout = idle  # StreamRequestHandler's: each read and write of the connection

        def log_message(self, format: str, *args: Any) -> None:
            """No log line per scrape."""

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                self.shutdown_request(request)  # every slot taken: closed, nothing held
                return
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread started: it would never give the slot back
                slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            # Past the deadline the socket is shut: the handler's read or write ends at once.
            timer = threading.Timer(deadline, _shut, (request,))
            timer.daemon = True
            timer.start()
            try:
                super().process_request_thread(request, client_address)
            finally:
                timer.cancel()
                slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client that timed out or went away: its business, not a traceback on stderr.
            log.debug("metrics endpoint: a request from %s failed", client_address)

    httpd = make_server(host, port, app, Server, handler_class=Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed meanwhile: the request ended on its own
        return


def strict(doc: Any) -> Any:
    """JSON every parser takes: a NaN or infinity becomes null."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: strict(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [strict(v) for v in doc]
    return doc

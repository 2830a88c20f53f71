"""The deploy kit (edge/deploy/): secure Mosquitto config (TLS, passwords, ACL), systemd unit."""

import configparser
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from firmware_sim.broker import Broker as Mosquitto
from tests.mqtt_helpers import ROOT, Collector, Publisher, Serve, wait_until

pytestmark = pytest.mark.broker
DEPLOY = ROOT / "edge" / "deploy"
# /etc/mosquitto/mosquitto.conf of Debian 12's (and Raspberry Pi OS's) mosquitto package, but
# for its pid file and log file
DEBIAN_MOSQUITTO_CONF = """\
persistence true
persistence_location /var/lib/mosquitto/

include_dir /etc/mosquitto/conf.d
"""


def make_certs(d: Path) -> None:
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "server.crt",
        "-extfile",
        "ext.cnf",
    )


@pytest.fixture
def secure_broker(tmp_path):
    etc = tmp_path / "etc"
    (etc / "certs").mkdir(parents=True)
    make_certs(etc / "certs")
    pw = etc / "edge-lstm.passwd"
    for i, (user, password) in enumerate(
        [("edge-runtime", "r-secret"), ("dev-a", "a-secret"), ("dev-b", "b-secret")]
    ):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(pw), user, password], check=True)
    (etc / "edge-lstm.acl").write_text((DEPLOY / "edge-lstm.acl").read_text())
    conf = (DEPLOY / "mosquitto.conf").read_text()
    conf = conf.replace("/etc/mosquitto/", f"{etc}/").replace("/var/lib/mosquitto/", f"{tmp_path}/")
    broker = Mosquitto(tmp_path / "broker", embedded=False)
    port = broker.port
    conf = conf.replace("listener 8883", f"listener {port} 127.0.0.1")
    # installed as the kit says, in conf.d beside the main file Debian's mosquitto package ships
    (etc / "conf.d").mkdir()
    (etc / "conf.d" / "edge-lstm.conf").write_text(conf)
    debian = DEBIAN_MOSQUITTO_CONF.replace("/var/lib/mosquitto/", f"{tmp_path}/")
    debian = debian.replace("/etc/mosquitto/", f"{etc}/")
    broker.config = lambda: f"user root\nlog_dest stderr\n{debian}"  # type: ignore[method-assign]
    broker.start()
    yield broker, etc
    broker.stop()


def tls_as(etc: Path, user: str | None, password: str | None):
    def configure(client: mqtt.Client) -> None:
        client.tls_set(ca_certs=str(etc / "certs" / "ca.crt"))
        if user:
            client.username_pw_set(user, password)

    return configure


def refused(client: mqtt.Client, port: int) -> bool:
    try:
        client.connect("127.0.0.1", port, 5)
    except OSError:  # includes ssl.SSLError
        return True
    client.loop_start()
    try:
        wait_until(client.is_connected, 2, "connection")
        return False
    except AssertionError:
        return True
    finally:
        client.loop_stop()


def test_the_kits_mosquitto_conf_starts_in_conf_d_of_debians_mosquitto(secure_broker):
    """Installed as the kit says (/etc/mosquitto/conf.d/edge-lstm.conf), it must not repeat a
    setting Debian's own mosquitto.conf makes: mosquitto refuses a duplicate
    persistence_location and would not start."""
    broker, etc = secure_broker
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="kit-check")
    tls_as(etc, "edge-runtime", "r-secret")(client)
    assert not refused(client, broker.port)
    client.disconnect()


def test_tls_password_and_acl(bundles, secure_broker, tmp_path):
    broker, etc = secure_broker
    url = f"mqtt://127.0.0.1:{broker.port}"
    (tmp_path / "runtime.pw").write_text("r-secret\n")
    svc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge",
            "serve",
            "--model",
            str(bundles / "clf-int8"),
            "--broker",
            f"mqtts://127.0.0.1:{broker.port}",
            "--tls-ca",
            str(etc / "certs/ca.crt"),
            "--username",
            "edge-runtime",
            "--password-file",
            str(tmp_path / "runtime.pw"),
            "--client-id",
            "edge-runtime",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        dev_a = Collector(url, "dev-a-sub", configure=tls_as(etc, "dev-a", "a-secret"))
        dev_b = Collector(url, "dev-b-sub", configure=tls_as(etc, "dev-b", "b-secret"))
        pub_a = Publisher(url, "dev-a-pub", configure=tls_as(etc, "dev-a", "a-secret"))
        # Sent again until answered: the runtime may still be starting and subscribing (a
        # copy that arrives after the first was applied is only answered 'duplicate').
        deadline = time.monotonic() + 120
        while ("dev-a", 1) not in dev_a.predictions():
            assert time.monotonic() < deadline, "no prediction for dev-a's own sample"
            pub_a.send("dev-a", 1, np.zeros(6))
            pub_a.flush()
            for _ in range(40):
                if ("dev-a", 1) in dev_a.predictions():
                    break
                time.sleep(0.05)
        pub_a.send("dev-b", 1, np.zeros(6))  # into another device's topic: must be dropped
        pub_a.send("dev-a", 2, np.zeros(6))
        pub_a.flush()
        wait_until(lambda: ("dev-a", 2) in dev_a.predictions(), 20, "dev-a's second prediction")
        time.sleep(0.5)
        assert ("dev-b", 1) not in dev_b.predictions(), "dev-a wrote into dev-b's stream"
        assert not dev_b.of("predictions/dev-a"), "dev-b read dev-a's predictions"
        # anonymous, wrong-password and plain-TCP clients are refused
        for user, password, tls in (
            (None, None, True),
            ("dev-a", "wrong", True),
            ("dev-a", "a-secret", False),
        ):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"intruder-{user}-{tls}")
            if tls:
                tls_as(etc, user, password)(c)
            elif user:
                c.username_pw_set(user, password)
            assert refused(c, broker.port), (user, password, tls)
        for c in (dev_a, dev_b, pub_a):
            c.close()
    finally:
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(15) == 0


def test_systemd_unit_runs_the_service(bundles, broker, tmp_path):
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(DEPLOY / "edge-lstm.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/edge-lstm") and argv[1] == "serve"
    config = tmp_path / "edge-lstm.toml"
    config.write_text(
        f'[serve]\nmodel = "{bundles / "clf-int8"}"\nbroker = "{broker.url}"\n'
        'client_id = "edge-test"\nstats_interval = 0\n'
    )
    args = [a.replace("/etc/edge-lstm/edge-lstm.toml", str(config)) for a in argv[1:]]
    args = [a.replace("/var/lib/edge-lstm", str(tmp_path / "state")) for a in args]
    col = Collector(broker.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(col.online, 20, "runtime online")
        reload_signal = service["ExecReload"].split()[1].lstrip("-")
        proc.send_signal(getattr(signal, "SIG" + reload_signal))
        wait_until(lambda: len(col.of("edge/status/edge-test")) >= 2, 10, "status after reload")
        assert "state kept" in col.of("edge/status/edge-test")[-1][1]["reload"]
    finally:
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, service["KillSignal"]))
        rc = proc.wait(float(service["TimeoutStopSec"]))
    assert rc == 0 and time.monotonic() - t0 < float(service["TimeoutStopSec"])
    assert col.of("edge/status/edge-test")[-1][1]["state"] == "offline"
    col.close()


@pytest.mark.parametrize("unit_file", ["edge-lstm.service", "edge-lstm-worker.service"])
def test_a_refused_start_is_not_started_again_by_its_unit(unit_file, tmp_path):
    """A configuration the runtime refuses (exit 2, one line) was started again every 2 s
    under ``Restart=always``, for good: a log line every 2 s and never a failed unit. The
    unit's own command, run with a configuration naming a bundle that is not there, exits
    with a status the unit does not restart; a crash or exit 1 is still restarted."""
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(DEPLOY / unit_file)
    service = unit["Service"]
    assert service["Restart"] == "always"
    kept_down = {int(s) for s in service.get("RestartPreventExitStatus", "").split()}
    assert 1 not in kept_down
    argv = shlex.split(service["ExecStart"])
    config = tmp_path / "edge-lstm.toml"
    config.write_text(
        f'model = "{tmp_path / "no-bundle"}"\nbroker = "mqtt://127.0.0.1:1"\n'
        '[worker]\nnats = "nats://127.0.0.1:1"\n'
    )
    args = [a if not a.startswith("/etc/") else str(config) for a in argv[1:]]
    args = [a if not a.startswith("/var/lib/") else str(tmp_path / "state") for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=120
    )
    assert "no-bundle" in done.stderr, done.stderr
    assert done.returncode in kept_down, (done.returncode, done.stderr)


def test_a_subscription_the_broker_refuses_is_said_not_served_deaf(bundles, tmp_path):
    """A broker's ACL may refuse a subscription (here mosquitto's dynamic security plugin
    refuses the sensors' topics to anonymous clients): the runtime must not say `online` and
    wait for messages that never arrive, but say `degraded`, naming the filter."""
    plugins = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    assert plugins, "mosquitto's dynamic security plugin is missing (Debian package mosquitto)"
    import json

    security = tmp_path / "dynsec.json"
    deny = {"acltype": "subscribePattern", "topic": "sensors/#", "priority": 0, "allow": False}
    allow_all = dict.fromkeys(
        ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"), True
    )
    anonymous = {"groupname": "anonymous", "roles": [{"rolename": "no-sensors"}], "clients": []}
    security.write_text(
        json.dumps(
            {
                "defaultACLAccess": allow_all,
                "clients": [],
                "groups": [anonymous],
                "anonymousGroup": "anonymous",
                "roles": [{"rolename": "no-sensors", "acls": [deny]}],
            }
        )
    )
    extra = f"plugin {plugins[0]}\nplugin_opt_config_file {security}\n"
    broker = Mosquitto(tmp_path / "broker", extra=extra, embedded=False).start()
    col = Collector(broker.url)
    svc = Serve(bundles / "clf-int8", broker.url, tmp_path / "state").start()
    try:
        status = lambda: col.of("edge/status/edge-test")  # noqa: E731
        wait_until(lambda: status() and status()[-1][1]["state"] == "degraded", 60, "degraded")
        reason = status()[-1][1]["reason"]
        assert "refused the subscription" in reason and "'sensors/+/data'" in reason
    finally:
        svc.stop()
        col.close()
        broker.stop()


def test_a_status_the_brokers_acl_refuses_is_named_in_the_log(bundles, tmp_path):
    """Mosquitto answers a publish its ACL denies with PUBACK 'not authorized' and closes the
    connection: the runtime reconnects again and again. Its log must name the refused topic
    (it blamed a second `serve` with the same client id)."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite #\n\nuser edge-runtime\ntopic read sensors/#\n")
    broker = Mosquitto(tmp_path / "broker", extra=f"acl_file {acl}\n", embedded=False).start()
    svc = Serve(bundles / "clf-int8", broker.url, tmp_path / "state", "--username", "edge-runtime")
    svc.start()
    try:
        refused = "the broker refused our message"
        wait_until(lambda: refused in svc.log_path.read_text(), 60, "the refusal in the log")
        line = next(s for s in svc.log_path.read_text().splitlines() if refused in s)
        assert "edge/status/edge-test" in line and "ACL" in line
    finally:
        svc.stop()
        broker.stop()


def test_a_broker_without_retained_messages_is_served_with_an_unretained_status(bundles, tmp_path):
    """A broker configured without retained messages (mosquitto `retain_available false`)
    refuses a connection whose will is retained, for ever: the runtime never served. It
    connects again with its will and status unretained, and answers."""
    broker = Mosquitto(tmp_path / "broker", extra="retain_available false\n", embedded=False)
    broker.start()

    class WithDiscovery(Collector):
        FILTERS = (*Collector.FILTERS, ("homeassistant/#", 1))

    col = WithDiscovery(broker.url)
    svc = Serve(bundles / "clf-int8", broker.url, tmp_path / "state", "--ha-discovery", "true")
    svc.start()
    pub = Publisher(broker.url)
    try:
        wait_until(lambda: col.online(), 60, "online")
        pub.send("dev-1", 1, np.zeros(6))
        wait_until(lambda: ("dev-1", 1) in col.predictions(), 60, "an answer")
        wait_until(lambda: col.of("homeassistant/"), 60, "the discovery messages")
        pub.send("dev-1", 2, np.zeros(6))  # the discovery messages cost no connection
        wait_until(lambda: ("dev-1", 2) in col.predictions(), 60, "a second answer")
        log = svc.log_path.read_text()
        assert "keeps no retained messages" in log and "disconnected" not in log
        svc.stop()
        wait_until(
            lambda: col.of("edge/status/edge-test")[-1][1]["state"] == "offline", 60, "offline"
        )
    finally:
        svc.stop()
        pub.close()
        col.close()
        broker.stop()


def test_answers_on_a_topic_the_brokers_acl_refuses_do_not_hold_up_the_others(bundles, tmp_path):
    """Mosquitto refuses a publish its ACL denies and closes the connection; the client sends
    every answer in flight again when it reconnects, the next refused one closes it again,
    and the reconnect backoff grows: one stream whose predictions topic is denied held up
    every other stream's answers for minutes, for as long as it sent."""
    acl = tmp_path / "acl"
    acl.write_text(
        "topic readwrite sensors/#\ntopic readwrite edge/#\ntopic readwrite errors/#\n"
        "topic readwrite replies/#\ntopic readwrite predictions/a\ntopic read predictions/#\n"
    )
    broker = Mosquitto(tmp_path / "broker", extra=f"acl_file {acl}\n", embedded=False).start()
    col = Collector(broker.url)
    svc = Serve(bundles / "clf-int8", broker.url, tmp_path / "state", "--reorder-ms", "0")
    svc.start()
    pub = Publisher(broker.url)
    try:
        wait_until(col.online, 60, "online")
        for seq in range(1, 51):
            pub.send("a", seq, np.zeros(6))
            pub.send("b", seq, np.zeros(6))
        pub.flush()
        # well inside the time 50 reconnects with backoff take (minutes)
        wait_until(lambda: ("a", 50) in col.predictions(), 60, "stream a's answers")
        assert sorted(s for k, s in col.predictions() if k == "a") == list(range(1, 51))
        assert not any(k == "b" for k, _ in col.predictions())
        assert "the broker refused the" in svc.log_path.read_text()
    finally:
        svc.stop()
        pub.close()
        col.close()
        broker.stop()

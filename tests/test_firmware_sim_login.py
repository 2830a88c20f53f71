"""firmware-sim against a secured broker (login, TLS with client certificates) and a runtime
on other topics than the defaults, configured by serve's own configuration file."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware_sim.broker import Broker

TOPICS = {
    "data_topic": "plant/{stream}/samples",
    "prediction_topic": "plant/{stream}/answer",
    "error_topic": "plant/{stream}/refused",
    "status_topic": "site/status/{runtime_id}",
}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=edge-lstm test CA", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext, cwd=d)  # fmt: skip


@dataclass
class Secured:
    broker: Broker
    url: str
    config: Path
    dir: Path


@pytest.fixture
def secured(tmp_path: Path, bundles: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Secured]:
    """Mosquitto with TLS (client certificates required) and a password file, no anonymous
    logins; and serve's configuration file for it, with topics of its own."""
    for name in ("PASSWORD", "PASSWORD_FILE", "USERNAME", "BROKER", "TLS_CA"):
        monkeypatch.delenv(f"EDGE_LSTM_{name}", raising=False)
    d = tmp_path / "secrets"
    d.mkdir()
    make_certificates(d)
    passwd = d / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), "sim", "s3cret"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd.chmod(0o600)
    (d / "password").write_text("s3cret\n")
    extra = (
        "allow_anonymous false\n"
        f"password_file {passwd}\n"
        f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n"
        "require_certificate true\n"
    )
    broker = Broker(tmp_path / "broker", embedded=False, extra=extra).start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    config = tmp_path / "edge-lstm.toml"
    keys = {
        "model": str(bundles / "clf-int8"),
        "broker": url,
        "username": "sim",
        "password_file": str(d / "password"),
        "tls_ca": str(d / "ca.crt"),
        "tls_cert": str(d / "client.crt"),
        "tls_key": str(d / "client.key"),
        "state_dir": str(tmp_path / "state"),
        **TOPICS,
    }
    config.write_text("[serve]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    try:
        yield Secured(broker, url, config, d)
    finally:
        broker.stop()


@pytest.mark.broker
def test_a_run_on_a_secured_broker_and_other_topics_is_scored(bundles, secured, tmp_path):
    """firmware-sim had no login nor client certificate, and published on sensors/{stream}/data
    only: a gateway configured as deployed could not be checked before it was."""
    from edge.config import load
    from firmware_sim.cli import main
    from firmware_sim.mqtt import Link
    from firmware_sim.runtime import Runtime
    from firmware_sim.scorer import Scorer

    link = Link.of(load(secured.config, {}, serving=False))
    assert link.password == "s3cret" and link.data_topic == TOPICS["data_topic"]
    bundle = bundles / "clf-int8"
    # the runtime firmware-sim starts is given the same broker, login, TLS and topics
    runtime = Runtime(bundle, link, tmp_path / "state", client_id="rt").start()
    try:
        waiter = Scorer(link, client_id="waiter")
        try:
            waiter.wait_online("rt", 60, runtime.alive, runtime.why_ended)
        finally:
            waiter.close()
        args = ["run", "--config", str(secured.config), "--devices", "2", "--rate", "10"]
        args += ["--duration", "2", "--bundle", str(bundle), "--out", str(tmp_path / "o")]
        assert main(args) == 0
        r = json.loads((tmp_path / "o" / "score.json").read_text())
        assert r["predictions_missing"] == 0 and r["errors_by_code"] == {}, r
        assert r["wrong_predictions"] == 0 and r["predictions_received"] > 0, r
    finally:
        assert runtime.stop() == 0, runtime.output()[-2000:]


@pytest.mark.broker
def test_a_wrong_password_is_one_line_naming_the_refusal(secured, tmp_path, capsys):
    from firmware_sim.cli import main

    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    args = ["run", "--config", str(secured.config), "--password-file", str(wrong)]
    args += ["--devices", "1", "--duration", "1", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"firmware-sim: error: broker {secured.url} refused the connection: Not authorized"
    ], err


@pytest.mark.broker
def test_a_client_certificate_of_another_ca_is_refused_in_one_line(secured, tmp_path, capsys):
    """The broker wants a certificate its CA signed: the file's is overridden by another."""
    from firmware_sim.cli import main

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2",
             "-subj", "/CN=rogue", cwd=tmp_path)  # fmt: skip
    args = ["run", "--config", str(secured.config), "--devices", "1", "--duration", "1"]
    args += ["--tls-cert", str(tmp_path / "rogue.crt"), "--tls-key", str(tmp_path / "rogue.key")]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"firmware-sim: error: broker {secured.url} "), err
    assert "without answering it" in err[0] and "client certificate" in err[0], err


def _config(tmp_path: Path, **keys: str) -> Path:
    path = tmp_path / "edge-lstm.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    return path


@pytest.mark.parametrize(
    "keys, options, message",
    [
        ({}, ["--tls-ca", "missing-ca.pem"], "tls_ca = 'missing-ca.pem': file not found"),
        ({"tls_ca": "nowhere/ca.pem"}, [], "tls_ca = 'nowhere/ca.pem': file not found"),
        (
            {},
            ["--username", "u", "--password-file", "BADPW"],
            "password_file = 'BADPW': cannot read",
        ),
        (
            {"username": "u", "password_file": "missing"},
            [],
            "password_file = 'missing': file not found",
        ),
        ({}, ["--password-file", "PW"], "needs a user name: --username"),
        (
            {"data_topic": "plant/samples"},
            [],
            "data_topic: topic template 'plant/samples' must hold",
        ),
        ({"prediction_topic": "out/+/{stream}"}, [], "prediction_topic: topic template"),
        ({"status_topic": "site/#"}, [], "status_topic = 'site/#'"),
        ({"broker": "http://x"}, [], "broker = 'http://x'"),
        ({}, ["--tls-cert", "CA"], "tls_cert = 'CA'"),
    ],
)
def test_bad_login_tls_and_topic_values_are_one_line_naming_them(
    tmp_path, monkeypatch, capsys, keys, options, message
):
    from firmware_sim.cli import main

    for name in ("PASSWORD", "PASSWORD_FILE", "USERNAME", "TLS_CA", "DATA_TOPIC"):
        monkeypatch.delenv(f"EDGE_LSTM_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    Path("BADPW").write_bytes(b"\xff\xfe not UTF-8")
    Path("PW").write_text("secret\n")
    Path("CA").write_text("no certificate\n")
    config = _config(tmp_path, **{"broker": "mqtt://127.0.0.1:9", **keys})
    args = ["run", "--config", str(config), *options, "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_broker_or_config_run_says_what_it_needs(capsys, tmp_path, monkeypatch):
    from firmware_sim.cli import main

    monkeypatch.delenv("EDGE_LSTM_BROKER", raising=False)
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["firmware-sim: error: --broker URL or --config FILE.toml is required"], err


def test_the_password_is_read_as_serve_reads_it(tmp_path, capsys):
    """password_file (option, variable or key) before a password; never a command-line value."""
    from firmware_sim.cli import broker_link, parser

    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "pw2").write_text("from-option\n")
    config = _config(tmp_path, broker="mqtt://127.0.0.1:9", username="u", password="from-key")

    def password(*options: str, env: dict[str, str] | None = None) -> str:
        args = parser().parse_args(["run", "--config", str(config), *options])
        return broker_link(args, env or {}).password

    assert password() == "from-key"
    assert password(env={"EDGE_LSTM_PASSWORD": "from-env"}) == "from-env"
    assert password(env={"EDGE_LSTM_PASSWORD_FILE": str(tmp_path / "pw")}) == "from-file"
    assert password("--password-file", str(tmp_path / "pw2")) == "from-option"
    for given in (["--password", "hunter2"], ["--password=hunter2"]):
        with pytest.raises(SystemExit):  # not taken for --password-file hunter2
            parser().parse_args(["run", "--config", str(config), *given])
        err = capsys.readouterr().err
        assert "no password on the command line" in err and "hunter2" not in err, err


def test_the_runtime_started_is_given_the_same_broker_and_topics_but_no_password_argument(
    tmp_path,
):
    from firmware_sim.mqtt import Link
    from firmware_sim.runtime import Runtime

    link = Link("mqtts://127.0.0.1:9", "u", "s3cret", "ca.pem", "c.pem", "k.pem", **TOPICS)
    rt = Runtime(tmp_path / "b", link, tmp_path / "state", config=tmp_path / "edge-lstm.toml")
    cmd = " ".join(rt.cmd)
    assert "s3cret" not in cmd and rt.password == "s3cret"
    for option in ("--broker mqtts://127.0.0.1:9", "--username u", "--tls-ca ca.pem"):
        assert option in cmd
    for option in ("--tls-cert c.pem", "--tls-key k.pem", f"--config {tmp_path}/edge-lstm.toml"):
        assert option in cmd
    for key, template in TOPICS.items():
        assert f"--{key.replace('_', '-')} {template}" in cmd


@pytest.mark.parametrize(
    "template, topic, runtime",
    [
        ("edge/status/{runtime_id}", "edge/status/rt", "rt"),
        ("edge/status/{runtime_id}", "edge/status/rt/x", None),
        ("site/rt-{runtime_id}/state", "site/rt-a/state", "a"),
        ("site/state", "site/state", ""),  # one topic: the payload names the runtime
        ("site/state", "site/other", None),
    ],
)
def test_status_topics_of_a_template(template, topic, runtime):
    from firmware_sim.mqtt import StatusTopic

    assert StatusTopic(template).runtime(topic) == runtime

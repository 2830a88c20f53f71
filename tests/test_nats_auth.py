"""``edge-lstm worker``'s ways of logging in to NATS besides a password: a token file
(``nats_token_file``), an nkey seed file (``nats_nkey``) and a credentials file of a NATS
account (``nats_creds``: a user JWT and its seed). Checked at start without a server, and used
against real nats-server processes: token and nkey users in ``authorization {}``, and an
operator whose account JWT is preloaded (``resolver: MEMORY``), the JWTs signed here with
nkeys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.nats_auth import connect_options
from tests.mqtt_helpers import offline, wait_until
from tests.nats_helpers import NatsServer, WorkerProc

nkeys = pytest.importorskip("nkeys", reason="the cluster extra installs nkeys")


# -- keys, JWTs and credentials files, made as nsc makes them ------------------------------------


def keypair(prefix: int) -> tuple[str, Any]:
    """(seed, key pair) of a new nkey of the kind ``prefix`` (nkeys.PREFIX_BYTE_USER, ...)."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed.decode(), nkeys.from_seed(bytearray(seed))


def public(kp: Any) -> str:
    return str(kp.public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(signer: Any, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (v2) of ``subject``, signed by ``signer``: what nats-server checks."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": _b64(os.urandom(16)).upper(),
        "iat": int(time.time()),
        "iss": public(signer),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    body = _b64(json.dumps(claims).encode())
    return f"{header}.{body}.{_b64(signer.sign(f'{header}.{body}'.encode()))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def user_creds(account: Any, name: str = "worker") -> str:
    """The text of a .creds file of a new user of ``account``, as `nsc generate creds` writes."""
    seed, user = keypair(nkeys.PREFIX_BYTE_USER)
    token = jwt(account, public(user), name, {"type": "user", "pub": {}, "sub": {}, **UNLIMITED})
    return (
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- the checks at start, without a server -------------------------------------------------------


def _refused(said: str, *args: str, **kw: Any) -> None:
    with pytest.raises(ConfigError) as exc:
        connect_options(*args, **kw)
    assert said in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


def test_each_way_gives_nats_py_its_argument(tmp_path: Path) -> None:
    seed, _ = keypair(nkeys.PREFIX_BYTE_USER)
    _, account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    creds = write(tmp_path / "w.creds", user_creds(account))
    nk = write(tmp_path / "w.nk", seed + "\n")
    token = write(tmp_path / "token", "  s3cret\n")
    assert connect_options() == {}
    assert connect_options(creds) == {"user_credentials": creds}
    assert connect_options(nkey=nk) == {"nkeys_seed": nk}
    assert connect_options(token_file=token) == {"token": "s3cret"}
    # serve's user and password stay theirs when none of these is given
    assert connect_options(username="edge", servers=["nats://u:p@h:4222"]) == {}


def test_a_file_missing_unreadable_or_empty_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    for key, kw in (
        ("nats_creds", {"creds": missing}),
        ("nats_nkey", {"nkey": missing}),
        ("nats_token_file", {"token_file": missing}),
    ):
        _refused(f"{key} = {missing!r}: file not found", **kw)
    _refused(f"nats_token_file = {str(tmp_path)!r}: cannot read it: ", token_file=str(tmp_path))
    empty = write(tmp_path / "empty", " \n\n")
    _refused(f"nats_token_file = {empty!r}: the file is empty", token_file=empty)
    _refused("a path cannot hold a NUL character", token_file="a\0b")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    _refused(f"nats_token_file = {str(binary)!r}: not UTF-8 text", token_file=str(binary))


def test_more_than_one_way_of_logging_in_is_refused(tmp_path: Path) -> None:
    token = write(tmp_path / "token", "t\n")
    seed, _ = keypair(nkeys.PREFIX_BYTE_USER)
    nk = write(tmp_path / "w.nk", seed)
    _refused(
        f"nats_nkey = {nk!r} and nats_token_file = {token!r}: more than one way of logging in",
        nkey=nk,
        token_file=token,
    )
    _refused(
        f"nats_token_file = {token!r} and username = 'edge': more than one way",
        token_file=token,
        username="edge",
    )
    _refused(
        "and credentials in a server URL: more than one way",
        nkey=nk,
        servers=["nats://127.0.0.1:4222", "nats://t0ken@127.0.0.1:4223"],
    )


def test_a_file_that_is_no_seed_or_no_creds_is_named(tmp_path: Path) -> None:
    seed, user = keypair(nkeys.PREFIX_BYTE_USER)
    _, account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    pub = write(tmp_path / "w.pub", public(user) + "\n")
    _refused(f"nats_nkey = {pub!r}: a public key (U...), not its seed", nkey=pub)
    acc_seed, _ = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    wrong = write(tmp_path / "acc.nk", acc_seed)
    _refused(f"nats_nkey = {wrong!r}: no user seed; an nkey user seed starts with 'SU'", nkey=wrong)
    bad = write(tmp_path / "bad.nk", seed[:-3] + "AAA")  # its checksum fails
    _refused(f"nats_nkey = {bad!r}: not a valid nkey user seed", nkey=bad)
    # a .creds file: both blocks, a JWT in the one and a user seed in the other
    good = user_creds(account)
    jwt_line, creds_seed = (good.split(b + "-----\n")[1].split("\n")[0] for b in ("JWT", "SEED"))
    assert creds_seed.startswith("SU") and jwt_line.count(".") == 2
    for text, said in (
        ("token\n", "not a NATS credentials file"),
        (good.split("-----BEGIN USER NKEY SEED")[0], "not a NATS credentials file"),
        (good.replace(jwt_line, "nojwt"), "the line after '-----BEGIN NATS USER JWT-----' is no"),
        (good.replace(creds_seed, public(user)), "a public key (U...), not its seed"),
        (good.replace(creds_seed, creds_seed[:-3] + "AAA"), "not a valid nkey user seed"),
        (good.replace("\n", "\r\n"), "has Windows line ends (CRLF)"),
    ):
        creds = write(tmp_path / "w.creds", text)
        _refused(f"nats_creds = {creds!r}: {said}", creds)
    creds = write(tmp_path / "w.creds", good)
    assert connect_options(creds) == {"user_credentials": creds}


def test_the_worker_exits_2_naming_a_bad_file(bundles: Path, tmp_path: Path) -> None:
    """From the command line and from the [worker] table, before NATS is reached."""
    token = write(tmp_path / "token", "t\n")
    conf = tmp_path / "w.toml"
    conf.write_text(f'[worker]\nnats_token_file = "{tmp_path / "gone"}"\n')
    cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
    cmd += ["--nats", "nats://127.0.0.1:1", "--state-dir", str(tmp_path / "s")]
    for extra, said in (
        (["--nats-token-file", str(tmp_path)], f"nats_token_file = {str(tmp_path)!r}: cannot"),
        (["--nats-creds", token], f"nats_creds = {token!r}: not a NATS credentials file"),
        (["--nats-nkey", token], f"nats_nkey = {token!r}: no user seed"),
        (["--config", str(conf)], "nats_token_file = "),
        (
            ["--nats-nkey", token, "--nats-token-file", token],
            "more than one way of logging in to NATS",
        ),
    ):
        r = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[worker]\nnats_creds = ["a"]\n')
    r = subprocess.run([*cmd, "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "[worker] nats_creds = ['a'] is not a str" in r.stderr


# -- against nats-server -------------------------------------------------------------------------


class _AuthServer(NatsServer):
    """A nats-server whose configuration ends with ``auth`` (an authorization block, or an
    operator and its resolver)."""

    def __init__(self, directory: Path, auth: str) -> None:
        super().__init__(directory)
        self.auth = auth

    def config(self) -> str:
        return super().config() + self.auth


def token_server(directory: Path, token: str) -> NatsServer:
    return _AuthServer(directory, f'authorization {{\n  token: "{token}"\n}}\n').start()


def nkey_server(directory: Path, user: Any) -> NatsServer:
    auth = f"authorization {{\n  users = [ {{ nkey: {public(user)} }} ]\n}}\n"
    return _AuthServer(directory, auth).start()


def operator_server(directory: Path, account: Any) -> NatsServer:
    """nats-server in operator mode (as with NATS accounts, nsc, Synadia): it trusts the
    operator's JWT, which signed the account's, which JetStream is enabled for."""
    _, operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    limits = {
        **UNLIMITED,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    }
    account_jwt = jwt(operator, public(account), "edge", {"type": "account", "limits": limits})
    _, system = keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs the system account
    system_jwt = jwt(operator, public(system), "SYS", {"type": "account", "limits": UNLIMITED})
    auth = (
        f"operator: {jwt(operator, public(operator), 'op', {'type': 'operator'})}\n"
        f"system_account: {public(system)}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {public(account)}: {account_jwt}\n"
        f"  {public(system)}: {system_jwt}\n}}\n"
    )
    return _AuthServer(directory, auth).start()


async def _answer(url: str, connect: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
    """A sample of stream dev-1 published to JetStream as a device does natively, and the
    prediction the worker answers it with."""
    import nats

    nc = await nats.connect(url, **connect)
    try:
        got: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def on(msg: Any) -> None:
            if not got.done():
                got.set_result(json.loads(msg.data))

        await nc.subscribe("predictions.dev-1", cb=on)
        await nc.flush()
        body = json.dumps({"seq": 1, "values": x.tolist()})
        await nc.jetstream().publish("sensors.dev-1.data", body.encode(), timeout=30)
        return await asyncio.wait_for(got, 60)
    finally:
        await nc.close()


def _answers_a_sample(
    bundles: Path, tmp_path: Path, server: NatsServer, flag: str, path: str, client: Any
) -> None:
    """A worker started with ``flag path`` takes its partitions and answers a sample as the
    engine does offline."""
    w = WorkerProc(bundles / "clf-int8", server.url, tmp_path / "s", "w1", flag, path)
    try:
        w.start()
        assert w.proc is not None
        up = "taken over in"
        wait_until(lambda: up in w.log() or w.proc.poll() is not None, 120, "up or ended")
        assert up in w.log(), w.log()[-2000:]
        x = np.random.default_rng(0).normal(size=(1, 6))  # clf-int8's 6 features
        want = offline(bundles / "clf-int8", {"dev-1": x})[("dev-1", 1)]
        doc = asyncio.run(_answer(server.url, client, x))
        assert doc["seq"] == 1, doc
        np.testing.assert_array_equal(np.asarray(doc["y"], np.float32).reshape(-1), want)
    finally:
        assert w.stop() == 0, w.log()[-2000:]
    assert "stopped cleanly" in w.log()


def _refused_at_start(bundles: Path, tmp_path: Path, server: NatsServer, *args: str) -> str:
    cmd = [sys.executable, "-m", "edge", "worker", "--model", str(bundles / "clf-int8")]
    cmd += ["--nats", server.url, "--state-dir", str(tmp_path / "s"), "--worker-id", "w1"]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    said = f"NATS at {server.url} refused the connection: nats: 'Authorization Violation'"
    assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return r.stderr


@pytest.mark.broker
def test_a_token_file_logs_in_and_a_wrong_token_is_refused(bundles: Path, tmp_path: Path) -> None:
    server = token_server(tmp_path / "nats", "s3cret-token")
    try:
        right = write(tmp_path / "token", "s3cret-token\n")
        client = {"token": "s3cret-token"}
        _answers_a_sample(bundles, tmp_path, server, "--nats-token-file", right, client)
        wrong = write(tmp_path / "wrong", "other-token\n")
        said = _refused_at_start(bundles, tmp_path, server, "--nats-token-file", wrong)
        assert "other-token" not in said
    finally:
        server.stop()


@pytest.mark.broker
def test_an_nkey_seed_logs_in_and_another_is_refused(bundles: Path, tmp_path: Path) -> None:
    seed, user = keypair(nkeys.PREFIX_BYTE_USER)
    server = nkey_server(tmp_path / "nats", user)
    try:
        right = write(tmp_path / "w.nk", seed + "\n")
        client = {"nkeys_seed_str": seed}
        conf = tmp_path / "w.toml"  # the [worker] key, as the flag
        conf.write_text(f'[worker]\nnats_nkey = "{right}"\n')
        _answers_a_sample(bundles, tmp_path, server, "--config", str(conf), client)
        other, _ = keypair(nkeys.PREFIX_BYTE_USER)
        wrong = write(tmp_path / "other.nk", other + "\n")
        _refused_at_start(bundles, tmp_path, server, "--nats-nkey", wrong)
    finally:
        server.stop()


@pytest.mark.broker
def test_a_creds_file_of_an_account_logs_in_and_another_accounts_is_refused(
    bundles: Path, tmp_path: Path
) -> None:
    _, account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    server = operator_server(tmp_path / "nats", account)
    try:
        right = write(tmp_path / "w.creds", user_creds(account))
        client = {"user_credentials": write(tmp_path / "client.creds", user_creds(account, "c"))}
        _answers_a_sample(bundles, tmp_path, server, "--nats-creds", right, client)
        _, stranger = keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # an account the server does not know
        wrong = write(tmp_path / "other.creds", user_creds(stranger))
        _refused_at_start(bundles, tmp_path, server, "--nats-creds", wrong)
    finally:
        server.stop()


def test_nats_clients_close_failing_after_the_socket_is_gone_is_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """nats-py closes a refused connection in a task nobody awaits; once the server has
    dropped the socket, that close fails `Connection lost`, which asyncio printed as a
    traceback at the worker's exit. The worker's handler turns that one into a debug line
    and leaves every other unretrieved error to asyncio's report."""
    import gc
    import logging

    from nats.aio.client import Client

    from edge.nats_worker import _unawaited_close

    class LostSocket:
        def writelines(self, data: Any) -> None:
            pass

        async def drain(self) -> None:
            raise ConnectionResetError("Connection lost")

        def close(self) -> None:
            pass

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(_unawaited_close)
        nc = Client()
        nc._current_server, nc._transport = object(), LostSocket()
        nc._pending, nc._pending_data_size, nc._flush_queue = [b"PING"], 4, asyncio.Queue()
        tasks = [asyncio.create_task(nc._close(Client.CLOSED, False))]

        async def other() -> None:
            raise ConnectionResetError("not the client's close")

        tasks.append(asyncio.create_task(other()))
        while not all(t.done() for t in tasks):  # done() leaves their errors unretrieved
            await asyncio.sleep(0)
        tasks.clear()
        gc.collect()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    closed = "NATS client's close after the connection was lost: "
    closed += "ConnectionResetError('Connection lost')"
    assert ("edge.worker", "DEBUG", closed) in said, said
    unretrieved = [m for name, lvl, m in said if lvl == "ERROR" and name == "asyncio"]
    assert len(unretrieved) == 1 and "not the client's close" in caplog.text, said


@pytest.mark.broker
def test_credentials_revoked_while_the_worker_runs_are_said_and_it_stops(
    bundles: Path, tmp_path: Path
) -> None:
    """A server that stops taking the worker's token (its configuration reloaded) says
    `Authorization Violation` and closes the connection, which nats-py then never opens
    again: the worker went on, every round failing `connection closed`, saying nowhere why,
    even once the token was taken again. It says so and stops (exit 1): systemd starts it
    again, and a refusal at that start is exit 2 with the server's words."""
    import signal

    with _token_worker(bundles, tmp_path) as (server, token, w):
        conf = server.dir / "nats.conf"
        conf.write_text(conf.read_text().replace("first-t0ken", "second-t0ken"))
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)  # a reload: the token is no longer taken
        _stops_refused(w)
        _refused_at_start(bundles, tmp_path, server, "--nats-token-file", token)


@pytest.mark.broker
def test_a_server_restarted_without_the_workers_user_is_said_and_the_worker_stops(
    bundles: Path, tmp_path: Path
) -> None:
    """A restart, not a reload: the connection is lost, not closed by a refusal, and nats-py
    reconnects for good, refused every half second; the worker retried for ever with a
    warning at each. It stops once each server has refused it REFUSED_ROUNDS times in a
    row."""
    with _token_worker(bundles, tmp_path) as (server, _, w):
        server.stop()
        server.auth = server.auth.replace("first-t0ken", "second-t0ken")
        server.start()
        _stops_refused(w)
        assert "NATS refused 3 reconnections in a row: nats: 'Authorization Violation'" in w.log()


@contextlib.contextmanager
def _token_worker(bundles: Path, tmp_path: Path) -> Iterator[tuple[_AuthServer, str, WorkerProc]]:
    """A nats-server taking the token ``first-t0ken``, its token file, and a worker logged in
    with it, holding partitions; both stopped at the end."""
    server = token_server(tmp_path / "nats", "first-t0ken")
    assert isinstance(server, _AuthServer)
    token = write(tmp_path / "token", "first-t0ken\n")
    w = WorkerProc(bundles / "clf-int8", server.url, tmp_path / "s", "w1")
    w.args += ["--nats-token-file", token]
    try:
        w.start()
        assert w.proc is not None
        wait_until(lambda: "taken over in" in w.log() or w.proc.poll() is not None, 120, "up")
        assert w.proc.poll() is None, w.log()[-2000:]
        yield server, token, w
    finally:
        w.stop()
        server.stop()


def _stops_refused(w: WorkerProc) -> None:
    """``w`` stops (exit 1) saying the server refused its credentials, in one line."""
    assert w.proc is not None
    assert w.proc.wait(60) == 1, w.log()[-3000:]
    said = "(the server refused this worker's credentials); stopping"
    errors = [line for line in w.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(said), w.log()[-3000:]
    assert "ERROR edge.worker: NATS " in errors[0] and "Traceback" not in w.log()
    assert "partitions left to their leases' end: exit 1" in w.log()
    assert "t0ken" not in w.log()

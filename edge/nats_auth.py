"""The worker's ways of logging in to NATS besides a user and password: a credentials file
(``.creds``: a user JWT and its nkey seed, what NATS accounts and ``nsc`` hand out), an nkey
seed file, and a token kept in a file. Each is checked at start, one line naming the bad value:
nats-py reads them only as it connects, and then loops for good on a ``.creds`` file without
a JWT, or stops with a traceback on a seed it cannot decode."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError, shown

JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
KEYS = ("nats_creds", "nats_nkey", "nats_token_file")


def _read(name: str, path: str) -> str:
    """The text of the file ``name = path``, or one line saying why it cannot be read."""
    if "\0" in path:
        raise ConfigError(f"{name} = {shown(path)}: a path cannot hold a NUL character")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{name} = {shown(path)}: file not found") from None
    except OSError as exc:
        raise ConfigError(
            f"{name} = {shown(path)}: cannot read it: {exc.strerror or exc}"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{name} = {shown(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _nkeys(name: str, path: str) -> Any:
    try:
        import nkeys
    except ImportError:
        raise ConfigError(
            f"{name} = {shown(path)}: nats-py needs the Python package nkeys for it: "
            "pip install 'edge-lstm[cluster]' (or nkeys)"
        ) from None
    return nkeys


def _check_seed(name: str, path: str, seed: str) -> None:
    """``seed`` an nkey user seed (``SU...``) that decodes: nats-py would fail on it only as
    it connects, with a traceback."""
    if not seed.startswith("SU"):
        what = "a public key (U...), not its seed" if seed.startswith("U") else "no user seed"
        raise ConfigError(
            f"{name} = {shown(path)}: {what}; an nkey user seed starts with 'SU' "
            "(made by `nk -gen user` or `nsc`)"
        )
    nkeys = _nkeys(name, path)
    try:
        raw = base64.b32decode(seed + "=" * (-len(seed) % 8))
        # nkeys does not check the checksum: a seed mistyped signs as another key, and the
        # server says only "authorization violation"
        if raw[-2:] != nkeys.crc16_checksum(raw[:-2]):
            raise ValueError("its checksum does not match")
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except Exception as exc:  # nkeys' own errors and binascii's
        why = str(exc) if isinstance(exc, ValueError) and str(exc) else type(exc).__name__
        raise ConfigError(f"{name} = {shown(path)}: not a valid nkey user seed ({why})") from None


def _check_creds(path: str, text: str) -> None:
    """A ``.creds`` file as nats-py reads it: the line after ``BEGIN NATS USER JWT`` is the
    JWT, the line after ``BEGIN USER NKEY SEED`` the seed."""
    name = "nats_creds"
    if "\r" in text:  # nats-py cuts one character off each line: a '\r' stays in the JWT
        raise ConfigError(
            f"{name} = {shown(path)}: has Windows line ends (CRLF); save it with '\\n' line ends"
        )
    lines = text.split("\n")
    blocks = {}
    for i, line in enumerate(lines):
        for begin in (JWT_BEGIN, SEED_BEGIN):
            if begin in line and begin not in blocks:
                blocks[begin] = lines[i + 1].strip() if i + 1 < len(lines) else ""
    if JWT_BEGIN not in blocks or SEED_BEGIN not in blocks:
        raise ConfigError(
            f"{name} = {shown(path)}: not a NATS credentials file (it needs a "
            f"'{JWT_BEGIN}' and a '{SEED_BEGIN}' block, as `nsc generate creds` writes)"
        )
    jwt = blocks[JWT_BEGIN]
    if jwt.count(".") != 2 or not all(jwt.split(".")):
        raise ConfigError(
            f"{name} = {shown(path)}: the line after '{JWT_BEGIN}' is no JWT (header.claims.sig)"
        )
    _check_seed(name, path, blocks[SEED_BEGIN])


def connect_options(
    creds: str = "",
    nkey: str = "",
    token_file: str = "",
    *,
    username: str = "",
    servers: Sequence[str] = (),
) -> dict[str, Any]:
    """The keyword arguments of ``nats.connect`` for ``nats_creds``, ``nats_nkey`` or
    ``nats_token_file`` (at most one), each file read and checked now; ``{}`` for none.
    ``username`` (serve's key, with ``password_file``) and credentials in a server URL are
    other ways: one of them beside these is refused, as nats-py would send both and the server
    take one of its choosing."""
    given = [(n, v) for n, v in zip(KEYS, (creds, nkey, token_file)) if v]
    if not given:
        return {}
    others = [f"{n} = {shown(v)}" for n, v in given]
    if username:
        others.append(f"username = {shown(username)}")
    if any(urlparse(url).username is not None for url in servers):
        others.append("credentials in a server URL")
    if len(others) > 1:
        raise ConfigError(
            f"{' and '.join(others)}: more than one way of logging in to NATS; give one"
        )
    name, path = given[0]
    text = _read(name, path)
    if name == "nats_token_file":
        token = text.strip()
        if not token:
            raise ConfigError(f"{name} = {shown(path)}: the file is empty (no token)")
        return {"token": token}
    if name == "nats_nkey":
        _check_seed(name, path, text.strip())
        return {"nkeys_seed": path}
    _check_creds(path, text)
    return {"user_credentials": path}

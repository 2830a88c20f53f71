"""Small paho helpers shared by the emulator, the scorer and the tests."""

from __future__ import annotations

import contextlib
import re
import ssl
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from edge.config import FIELDS, ServiceConfig, broker_address
from edge.errors import ConfigError, shown
from edge.topics import Template

from .errors import SimError


def _default(name: str) -> str:
    return str(FIELDS[name].default)


@dataclass(frozen=True)
class Link:
    """How to reach a runtime's broker and where that runtime reads and answers: its URL,
    login and TLS files, and its topic templates (``serve``'s keys of the same names).
    ``str()`` of it is the URL, as errors name the broker."""

    url: str
    username: str = ""
    password: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    data_topic: str = _default("data_topic")
    prediction_topic: str = _default("prediction_topic")
    error_topic: str = _default("error_topic")
    status_topic: str = _default("status_topic")

    def __str__(self) -> str:
        return self.url

    @property
    def tls(self) -> bool:
        """TLS as ``serve`` decides it: a CA file given, or an ``mqtts://`` URL."""
        return bool(self.tls_ca) or self.url.startswith("mqtts:")

    @classmethod
    def of(cls, cfg: ServiceConfig) -> Link:
        """The link of a configuration ``edge.config.load`` checked; the password read as
        ``serve`` reads it (``password_file``'s, else ``password``)."""
        try:
            password = cfg.login_password()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"password_file = {shown(cfg.password_file)}: cannot read it: {why}"
            ) from None
        return cls(
            url=cfg.broker,
            username=cfg.username,
            password=password,
            tls_ca=cfg.tls_ca,
            tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key,
            data_topic=cfg.data_topic,
            prediction_topic=cfg.prediction_topic,
            error_topic=cfg.error_topic,
            status_topic=cfg.status_topic,
        )

    def serve_args(self) -> list[str]:
        """``edge-lstm serve``'s options for the same broker and topics (the password goes by
        its environment variable, never on a command line)."""
        out = ["--broker", self.url]
        for name in (
            "username",
            "tls_ca",
            "tls_cert",
            "tls_key",
            "data_topic",
            "prediction_topic",
            "error_topic",
            "status_topic",
        ):
            value = getattr(self, name)
            if value:
                out += ["--" + name.replace("_", "-"), value]
        return out


def link(url: str | Link) -> Link:
    return url if isinstance(url, Link) else Link(url)


class StatusTopic:
    """``status_topic``'s template: its subscription filter, and the runtime id of a topic."""

    def __init__(self, template: str) -> None:
        levels = template.split("/")
        self.filter = "/".join("+" if "{runtime_id}" in lv else lv for lv in levels)
        head, sep, tail = template.partition("{runtime_id}")
        self.fixed = not sep  # one topic, whatever the runtime: its id is the payload's
        pattern = re.escape(head) + ("([^/]+)" + re.escape(tail) if sep else "")
        self._re = re.compile(pattern.replace(re.escape("{runtime_id}"), "[^/]+"))

    def runtime(self, topic: str) -> str | None:
        """The runtime id a status topic names (``""``: a fixed topic), None: no status."""
        m = self._re.fullmatch(topic)
        if m is None:
            return None
        return "" if self.fixed else m.group(1)


def templates(lk: Link) -> tuple[Template, Template, StatusTopic]:
    """The prediction, error and status templates of a link."""
    return Template(lk.prediction_topic), Template(lk.error_topic), StatusTopic(lk.status_topic)


def new_client(url: str | Link, client_id: str, **kw: Any) -> Any:
    """A paho client for the broker at ``url`` (``mqtt://``, ``mqtts://`` with the system's
    CA certificates, or ``unix:///PATH``: the URLs ``edge-lstm serve`` takes), logged in and
    with TLS as a ``Link`` says."""
    lk = link(url)
    transport, _, _ = broker_address(lk.url, "--broker")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, transport=transport, **kw
    )
    if lk.username:
        client.username_pw_set(lk.username, lk.password or None)
    if lk.tls:
        client.tls_set(
            ca_certs=lk.tls_ca or None,
            certfile=lk.tls_cert or None,
            keyfile=lk.tls_key or None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    return client


def connect(client: Any, url: str | Link, keepalive: int = 30) -> None:
    """``client.connect`` to the broker at ``url`` (its host and port, or its socket). A TLS
    handshake that fails (a certificate the CA does not sign, a host name it does not name)
    is a SimError saying so."""
    lk = link(url)
    _, host, port = broker_address(lk.url, "--broker")
    try:
        client.connect(host, port, keepalive)
    except ssl.SSLError as exc:
        raise SimError(f"broker {lk.url}: the TLS handshake failed: {exc}") from None


def close_client(client: Any) -> None:
    """Disconnect, stop the network thread, and release every socket.

    paho's ``loop_start`` opens a socket pair per call that ``loop_stop`` leaves open; the
    private reset is the only way to close it (otherwise: ResourceWarnings at exit).
    """
    client.disconnect()
    # paho's network thread clears ``_thread`` when it ends on its own (after the disconnect
    # above), which can happen between loop_stop's check and its join: stopped already.
    with contextlib.suppress(AttributeError):
        client.loop_stop()
    client._reset_sockets()

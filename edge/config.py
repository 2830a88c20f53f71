"""Service configuration: defaults < TOML file < ``EDGE_LSTM_*`` environment < command line.

Every key is a field below; ``edge-lstm serve --help`` is generated from the same list.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError, shown

ENV_PREFIX = "EDGE_LSTM_"
# The one default reorder window: serve, the demo, firmware-sim and the chaos bench all use it.
REORDER_MS_DEFAULT = 600.0
# The longest reconnect delay: a thread waits at most ``threading.TIMEOUT_MAX`` seconds, and
# the first delay is ``reconnect_min`` with up to 25% of jitter. A longer one raised
# OverflowError in the network thread, which then stopped: serve ran on, connected to nothing.
LONGEST_RECONNECT = threading.TIMEOUT_MAX / 1.25
# Past these a setting stops meaning what it says: a batch waits until it is full, a gap is
# never given up on, the write-ahead log is never folded into a snapshot.
UPPER_BOUNDS = {
    "max_wait_ms": 3_600_000,
    "reorder_ms": 3_600_000,
    "snapshot_interval": 86_400,
    "stats_interval": 86_400,
}


def _opt(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ServiceConfig:
    model: str = _opt("", "bundle directory made by lstm-convert (required)")
    broker: str = _opt(
        "mqtt://127.0.0.1:1883",
        "broker URL: mqtt://HOST:PORT, mqtts://HOST:PORT or unix:///PATH (a unix socket)",
    )
    client_id: str = _opt(
        "", "MQTT client id; fixed, so the broker keeps our session (default: edge-lstm-HOSTNAME)"
    )
    runtime_id: str = _opt("", "id in status/stats topics (default: the client id)")
    protocol: str = _opt("5", "MQTT protocol version", ["5", "3.1.1"])
    session_expiry: int = _opt(
        86400, "seconds the broker keeps our session and queue while we are away (MQTT 5)"
    )
    keepalive: int = _opt(30, "MQTT keep-alive in seconds")
    username: str = _opt("", "broker user name")
    password: str = _opt("", "broker password (prefer password_file)")
    password_file: str = _opt("", "file holding the broker password")
    tls_ca: str = _opt("", "CA certificate file; enables TLS")
    tls_cert: str = _opt("", "client certificate file (TLS client auth)")
    tls_key: str = _opt("", "client private key file (TLS client auth)")
    data_topic: str = _opt("sensors/{stream}/data", "topic template of samples in")
    control_topic: str = _opt(
        "sensors/{stream}/control", 'topic template of per-stream control ({"cmd": "reset"})'
    )
    prediction_topic: str = _opt("predictions/{stream}", "topic template of predictions out")
    error_topic: str = _opt("errors/{stream}", "topic template of errors out")
    status_topic: str = _opt(
        "edge/status/{runtime_id}", "retained online/offline status (last will)"
    )
    stats_topic: str = _opt("edge/stats/{runtime_id}", "periodic statistics")
    reply_topic: str = _opt(
        "replies/{stream}", "topic template of answers to per-stream control messages"
    )
    runtime_control_topic: str = _opt(
        "edge/control/{runtime_id}", 'runtime control ({"cmd": "reload"} or "snapshot")'
    )
    state_dir: str = _opt("edge-state", "directory of the snapshot and the write-ahead log")
    snapshot_interval: float = _opt(
        30.0, "seconds between snapshots (the write-ahead log covers the rest)"
    )
    durability: str = _opt(
        "process",
        "'process': survive kill -9 (write before ack); 'power': also fsync the log before ack",
        ["process", "power"],
    )
    queue_size: int = _opt(
        10000,
        "messages taken from the broker before they are acknowledged (MQTT 5 Receive Maximum; with 3.1.1 set the broker's max_inflight_messages)",
    )
    overload: str = _opt(
        "block",
        "when messages arrive faster than they are answered: 'block' (the broker holds the backlog, lossless) or 'drop-oldest' (the oldest queued messages are answered 'dropped' and counted)",
        ["block", "drop-oldest"],
    )
    max_unacked: int = _opt(
        10000,
        "answers published but not yet acknowledged by the broker; past it no new messages are taken",
    )
    max_batch: int = _opt(256, "messages per micro-batch")
    max_wait_ms: float = _opt(
        2.0,
        "longest a message waits for others to fill its micro-batch (at a steady 1,000 msg/s, 2 ms cut the CPU per message by a third); 0 takes what is queued (lowest latency)",
    )
    max_payload_bytes: int = _opt(65536, "larger payloads are refused with error 'too_large'")
    max_samples_per_message: int = _opt(
        1024, "more samples in one message are refused (at most 65535)"
    )
    gap_policy: str = _opt(
        "continue",
        "on a seq gap: continue (the answer says 'gap'), reset the stream (it also says 'restart'), or reject",
        ["continue", "reset", "reject"],
    )
    restart_gap: int = _opt(
        0,
        "a seq more than this many behind the stream's last one restarts the stream, for devices that send no 'boot' (0 = off: it is a duplicate)",
    )
    reorder_ms: float = _opt(
        REORDER_MS_DEFAULT,
        "hold samples that arrive ahead of a gap this long, waiting for the gap to fill; a sample lost for good delays its stream's next answers by this much (0 = off: late arrivals are answered 'late')",
    )
    capacity: int = _opt(
        100000, "most streams kept; least recently used beyond it restart at zero state"
    )
    idle_timeout: float = _opt(0.0, "seconds after which an idle stream is forgotten (0 = never)")
    stats_interval: float = _opt(10.0, "seconds between stats messages (0 = off)")
    metrics_port: int = _opt(0, "Prometheus metrics port (0 = off)")
    ha_discovery: bool = _opt(
        False,
        "announce each stream's prediction to Home Assistant (MQTT discovery, retained; removed when the stream is evicted)",
    )
    ha_prefix: str = _opt("homeassistant", "Home Assistant's discovery prefix")
    metrics_host: str = _opt("127.0.0.1", "Prometheus metrics bind address")
    backend: str = _opt(
        "auto",
        "interpreter: auto, litert, tflite or tensorflow",
        ["auto", "litert", "tflite", "tensorflow"],
    )
    kernel_mismatch: str = _opt(
        "refuse",
        "when the interpreter's kernel set (e.g. litert-xnnpack) is not one the bundle was verified with: 'refuse' to start, or 'warn' and run anyway (results differ from the verified ones)",
        ["refuse", "warn"],
    )
    reconnect_min: float = _opt(0.5, "first reconnect delay, seconds (doubles with jitter)")
    reconnect_max: float = _opt(30.0, "longest reconnect delay, seconds")
    log_level: str = _opt("info", "log level", ["debug", "info", "warning", "error"])

    def __post_init__(self) -> None:
        """Each value of its field's type (a float finite): ``load`` converts what it reads,
        a configuration made in Python is taken as it is. A NaN passes every range check of
        ``validate`` and then holds samples, or snapshots, never or always."""
        for f in dataclasses.fields(self):
            value, typ = getattr(self, f.name), str(f.type)
            if typ == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok = ok and math.isfinite(value)
            elif typ == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, {"bool": bool, "str": str}[typ])
            if not ok:
                kind = {"float": "finite number", "str": "string"}.get(typ, typ)
                raise ConfigError(f"{f.name} = {shown(value)} is not a valid {kind}")

    @property
    def unix(self) -> bool:
        """The broker is reached on a unix socket (``unix:///PATH``): ``host`` is its path."""
        return urlparse(self.broker).scheme == "unix"

    @property
    def host(self) -> str:
        u = urlparse(self.broker)
        return u.path if u.scheme == "unix" else str(u.hostname)

    @property
    def port(self) -> int:
        u = urlparse(self.broker)
        if u.scheme == "unix":
            return 1883  # not used, but paho wants one
        return u.port or (8883 if u.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca) or urlparse(self.broker).scheme == "mqtts"

    def login_password(self) -> str:
        """The password to log in with (``serve``'s broker, the worker's NATS):
        ``password_file``'s, else ``password``."""
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password


FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}


def _convert(name: str, value: Any, where: str | None = None) -> Any:
    """``value`` as the field's type, or ConfigError naming it and ``where`` it was set."""
    typ = FIELDS[name].type
    try:
        if typ in ("bool", bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ in ("int", int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ in ("float", float):
            if isinstance(value, bool) or not math.isfinite(number := float(value)):
                raise ValueError
            return number
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError  # a TOML array, table or date is no name, path or topic
        return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = {"float": "finite number", "str": "string"}.get(str(typ), str(typ))
        source = f" ({where})" if where else ""
        raise ConfigError(f"{name} = {shown(value)}{source} is not a valid {kind}") from None


def load(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    tables: Mapping[str, Any] | None = None,
    serving: bool = True,
) -> ServiceConfig:
    """``tables``: what ``read_toml`` read of ``file`` already (the worker reads it once for
    its [worker] table and this, so that a file changed meanwhile cannot give it two).
    ``serving`` False: read for a client of the runtime's broker (``firmware-sim``), which
    needs no model."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # a key's file or environment variable, for its errors
    if file:
        values.update(_serve_table(read_toml(Path(file)) if tables is None else tables, file))
        where = dict.fromkeys(values, f"in {file}")
    env = os.environ if env is None else env
    for name in FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name], where[name] = env[key], key
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            where.pop(name, None)  # an option of the command line: its name is the key's
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        named = f"{file}: " if file else ""
        raise ConfigError(f"{named}unknown configuration key(s): {', '.join(unknown)}")
    cfg = ServiceConfig(**{k: _convert(k, v, where.get(k)) for k, v in values.items()})
    return validate(cfg, serving)


def _check_tls(cfg: ServiceConfig) -> None:
    """Certificate files that load: found wrong at connect time, they stopped the service
    with a traceback after its state was opened."""
    import ssl

    if cfg.tls_ca:
        try:
            ssl.create_default_context(cafile=cfg.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls_ca = {shown(cfg.tls_ca)}: not a usable CA certificate: {exc}"
            ) from None
    if cfg.tls_cert or cfg.tls_key:
        if not cfg.tls_cert:
            raise ConfigError("tls_key needs tls_cert")
        asked: list[bool] = []

        def passphrase() -> bytes:
            # without a callback OpenSSL asks on the terminal: a prompt at every start on
            # a console, `[Errno 22] Invalid argument` under systemd
            asked.append(True)
            return b""

        try:
            ssl.create_default_context().load_cert_chain(
                cfg.tls_cert, cfg.tls_key or None, password=passphrase
            )
        except (OSError, ssl.SSLError) as exc:
            if asked:
                raise ConfigError(
                    f"tls_key = {shown(cfg.tls_key or cfg.tls_cert)}: the private key is "
                    "encrypted (it has a passphrase), which a service cannot type in; give an "
                    "unencrypted copy (`openssl pkey -in KEY -out KEY.plain`), readable only by "
                    "the service's user"
                ) from None
            raise ConfigError(
                f"tls_cert = {shown(cfg.tls_cert)} / tls_key = {shown(cfg.tls_key)}: not a usable "
                f"certificate and key: {exc}"
            ) from None


def _check_topics(cfg: ServiceConfig) -> None:
    """Topics the service publishes to or subscribes with: no wildcards where MQTT forbids
    them (a will topic with one makes the broker refuse every connection), no two alike."""
    from .topics import Template, shared_subscription

    streams = {
        name: getattr(cfg, name)
        for name in (
            "data_topic",
            "control_topic",
            "prediction_topic",
            "error_topic",
            "reply_topic",
        )
    }
    runtime = {
        name: getattr(cfg, name)
        for name in ("status_topic", "stats_topic", "runtime_control_topic")
    }
    for name, template in {**streams, **runtime}.items():
        shared_subscription(name, template)
    for name, template in streams.items():
        try:
            Template(template)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    for name, template in runtime.items():
        topic = template.replace("{runtime_id}", "x")
        if not template or any(c in topic for c in "+#\0") or "{" in topic or "}" in topic:
            raise ConfigError(
                f"{name} = {shown(template)}: expected a topic, '{{runtime_id}}' its only placeholder, "
                "no '+' or '#'"
            )
    inputs = ("data_topic", "control_topic", "runtime_control_topic")
    outputs = ("prediction_topic", "error_topic", "reply_topic", "status_topic", "stats_topic")
    pairs = [
        (a, b, "a message on a topic both match would be read twice, as either")
        for a, b in itertools.combinations(inputs, 2)
    ]
    pairs += [
        (a, b, "their subscribers could not tell one from the other")
        for a, b in itertools.combinations(outputs, 2)
    ]
    pairs += [
        (a, b, "the service would read what it publishes as input, without end")
        for a in outputs
        for b in inputs
    ]
    for a, b, why in pairs:
        if _overlap(getattr(cfg, a), getattr(cfg, b)):
            raise ConfigError(
                f"{a} = {shown(getattr(cfg, a))} overlaps {b} = {shown(getattr(cfg, b))}: {why}"
            )


def _mqtt_string(name: str, text: str) -> None:
    """What an MQTT string can carry: at most 65,535 bytes of UTF-8 without U+0000. Else the
    client fails at every connect, with a traceback or a refusal that names nothing."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    if size < 0 or size > 65535 or "\0" in text:
        raise ConfigError(
            f"{name} = {shown(text, 40)}: MQTT carries at most "
            "65,535 bytes of UTF-8 text without NUL characters"
        )


def _overlap(a: str, b: str) -> bool:
    """Whether one topic can match both templates (a placeholder stands for any level)."""
    la, lb = a.split("/"), b.split("/")
    wild = ("{stream}", "{runtime_id}")
    return len(la) == len(lb) and all(x == y or x in wild or y in wild for x, y in zip(la, lb))


def read_toml(path: Path) -> dict[str, Any]:
    """The tables of a configuration file (serve's and the worker's), or one line naming it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except ValueError as exc:  # a TOMLDecodeError, or (a plain ValueError, a traceback until it
        # was caught) an integer of more digits than Python converts
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return data


def _serve_table(data: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """serve's keys of a configuration file's tables."""
    section = data.get("serve", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [serve] must be a table")
    if "serve" not in data and isinstance(data.get("worker"), dict):  # shared with the worker
        section = {k: v for k, v in data.items() if k != "worker"}
    if "serve" in data:  # [worker] belongs to edge-lstm worker; nothing else is read
        unknown = sorted(set(data) - {"serve", "worker"})
        if unknown:
            raise ConfigError(f"{path}: unknown table(s) or key(s) beside [serve]: {unknown}")
    return dict(section)


def broker_address(url: str, what: str) -> tuple[str, str, int]:
    """``(transport, host, port)`` of a broker URL as paho takes them: ``("tcp", HOST, PORT)``
    of ``mqtt://HOST:PORT`` / ``mqtts://HOST:PORT``, ``("unix", PATH, 1883)`` of
    ``unix:///PATH``. The one parser of ``serve``, ``top`` and ``firmware-sim``; a bad URL is a
    ConfigError of one line that starts with ``what`` (``broker =``, ``--broker``)."""
    try:
        u = urlparse(url)
        port = u.port
    except ValueError as exc:  # a port out of range, an unclosed [ of an IPv6 address
        raise ConfigError(f"{what} {shown(url)}: {exc}") from None
    if u.scheme == "unix":
        if u.netloc or not u.path.startswith("/") or u.query or u.fragment:
            raise ConfigError(
                f"{what} {shown(url)}: expected unix:///PATH, the socket's absolute path"
            )
        return "unix", u.path, 1883  # paho wants a port; a socket has none
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(
            f"{what} {shown(url)}: expected mqtt://HOST:PORT, mqtts://HOST:PORT or unix:///PATH"
        )
    if port == 0:
        raise ConfigError(f"{what} {shown(url)}: port 0 is not a broker's port")
    try:
        u.hostname.encode("idna")  # what the resolver does: a label over 63 characters fails
    except UnicodeError as exc:
        raise ConfigError(
            f"{what} {shown(url)}: host {shown(u.hostname)} is no host name: {exc}"
        ) from None
    return "tcp", u.hostname, port or (8883 if u.scheme == "mqtts" else 1883)


def validate(cfg: ServiceConfig, serving: bool = True) -> ServiceConfig:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name} = {shown(value)} is not one of {', '.join(choices)}")
    if serving and not cfg.model:
        raise ConfigError("model is required (--model DIR)")
    transport, _, _ = broker_address(cfg.broker, "broker =")
    if transport == "unix" and (cfg.tls_ca or cfg.tls_cert):
        raise ConfigError(
            f"broker = {shown(cfg.broker)}: no TLS over a unix socket; leave tls_ca and "
            "tls_cert empty (the socket's file permissions guard it)"
        )
    if not cfg.state_dir.strip():
        raise ConfigError("state_dir is empty: name a directory (it is created if missing)")
    for name in ("model", "state_dir", "password_file", "tls_ca", "tls_cert", "tls_key"):
        if "\0" in getattr(cfg, name):  # a TOML "\u0000": the state_dir's mkdir raised ValueError
            raise ConfigError(
                f"{name} = {shown(getattr(cfg, name))}: a path cannot hold a NUL character"
            )
    positive = (
        "queue_size",
        "max_unacked",
        "max_batch",
        "max_payload_bytes",
        "max_samples_per_message",
        "capacity",
        "keepalive",
        "snapshot_interval",
        "reconnect_min",
        "reconnect_max",
    )
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} = {shown(getattr(cfg, name))} must be > 0")
    for name in (
        "max_wait_ms",
        "reorder_ms",
        "idle_timeout",
        "stats_interval",
        "metrics_port",
        "restart_gap",
    ):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} = {shown(getattr(cfg, name))} must be >= 0")
    for name, top in (
        ("keepalive", 65535),  # MQTT's two-byte field
        ("session_expiry", 2**32 - 1),  # MQTT 5's four-byte field
        ("metrics_port", 65535),
        *UPPER_BOUNDS.items(),
    ):
        if not 0 <= getattr(cfg, name) <= top:
            raise ConfigError(f"{name} = {shown(getattr(cfg, name))} must be in 0..{top}")
    if cfg.reconnect_max > LONGEST_RECONNECT:
        raise ConfigError(
            f"reconnect_max = {cfg.reconnect_max:g} must be at most {LONGEST_RECONNECT:.4g} "
            "seconds (the longest a thread can wait)"
        )
    if cfg.reconnect_min > cfg.reconnect_max:
        raise ConfigError(
            f"reconnect_min = {cfg.reconnect_min} must not exceed reconnect_max = {cfg.reconnect_max}"
        )
    if cfg.metrics_port and not cfg.metrics_host.strip():
        raise ConfigError("metrics_host is empty: give the address to serve metrics on")
    _check_topics(cfg)
    if cfg.queue_size > 65535:
        raise ConfigError(f"queue_size = {cfg.queue_size} must be <= 65535 (MQTT Receive Maximum)")
    if cfg.max_unacked > 60000:
        raise ConfigError(f"max_unacked = {cfg.max_unacked} must be <= 60000 (MQTT message ids)")
    if cfg.max_samples_per_message > 65535:  # the log's (and the binary frame's) u16 count
        raise ConfigError(
            f"max_samples_per_message = {cfg.max_samples_per_message} must be <= 65535 "
            "(the write-ahead log's limit)"
        )
    if cfg.restart_gap >= 2**31:
        raise ConfigError(f"restart_gap = {cfg.restart_gap} must be < 2**31")
    if cfg.max_batch > cfg.capacity:
        raise ConfigError(f"max_batch {cfg.max_batch} must not exceed capacity {cfg.capacity}")
    prefix = cfg.ha_prefix
    if (
        not prefix
        or any(c in prefix for c in "+#\0")
        or prefix.startswith("/")
        or prefix.endswith("/")
    ):
        raise ConfigError(f"ha_prefix = {shown(prefix)}: expected a topic like 'homeassistant'")
    for name in ("tls_ca", "tls_cert", "tls_key", "password_file"):
        path = getattr(cfg, name)
        try:
            found = not path or Path(path).is_file()
        except OSError as exc:  # a name too long for the file system: was a traceback
            raise ConfigError(f"{name} = {shown(path)}: {exc.strerror}") from None
        if not found:
            raise ConfigError(f"{name} = {shown(path)}: file not found")
    _check_tls(cfg)
    client_id = cfg.client_id or f"edge-lstm-{socket.gethostname()}"
    for name, text in (("client_id", client_id), ("username", cfg.username)):
        _mqtt_string(name, text)
    runtime_id = cfg.runtime_id or client_id
    if any(c in runtime_id for c in "/+#\0") or not runtime_id.strip():
        raise ConfigError(
            f"runtime_id = {shown(runtime_id)} (the client id unless set) must be one topic level "
            "without '+' or '#'"
        )
    return dataclasses.replace(cfg, client_id=client_id, runtime_id=runtime_id)


def add_arguments(parser: Any) -> None:
    """One ``--key`` flag per configuration key, with its help and default."""
    for f in dataclasses.fields(ServiceConfig):
        flag = "--" + f.name.replace("_", "-")
        env = f"env {ENV_PREFIX}{f.name.upper()}"
        said = any(w in f.metadata["help"] for w in ("(default: ", "(required)"))
        # a key whose help says its default in words: '' there means "not set", not the default
        help_text = f"{f.metadata['help']} [{env if said else f'default: {f.default!r}; {env}'}]"
        choices = f.metadata.get("choices")
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
            choices=choices,
            help=help_text,
        )

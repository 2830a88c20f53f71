"""``edge-lstm worker``: the same ``Processor`` as ``serve``, fed from NATS JetStream partitions.

JetStream resources (created idempotently by every worker on start):

* stream ``EDGE_SENSORS`` on ``sensors.*.data`` / ``sensors.*.control`` (what NATS's MQTT
  listener makes of ``sensors/{stream}/data``), whose subject transform stores each message as
  ``in.{partition}.{stream}.{kind}``: the partition function is nats-server's own
  ``{{partition(P,1)}}``, and P is fixed once the stream exists;
* key-value bucket ``edge_leases`` with a TTL of ``lease_seconds``: ``w.{worker}`` says a worker
  is alive, ``p.{partition}`` says who owns a partition. A lease is taken with ``create`` (only
  when absent) and renewed with ``update`` against the revision we hold, so two workers never
  both believe they own a partition; a worker killed stops renewing and its leases expire;
* object store ``edge_snapshots``: per partition, the newest two snapshots, each with the
  stream sequence it covers (``edge.partition_snapshot``);
* key-value bucket ``edge_answered``: ``p.{partition}`` is the stream sequence up to which
  every answer was stored and sent, so that a replay, however late, does not send them again;
* per owned partition, a durable pull consumer ``edge-p{partition}`` that the owner re-creates
  on taking the partition over, starting after the sequence its snapshot covers.

Devices' MQTT QoS 1 publishes reach the stream twice: live (the listener's core publish, lost
while the stream elects a leader, though the listener has sent its PUBACK) and copied from the
listener's own store ``$MQTT_msgs`` (a stream source: durable, since the PUBACK waits for that
store); the worker steps the first copy and passes over its twin (``edge.partitions.Twins``).

Per partition the owner runs a ``Processor`` over a scratch journal (its write-ahead log is what
``handle`` needs before it returns True; the replayable log that moves with the partition is the
JetStream stream itself). A message is acknowledged to JetStream only after ``handle`` logged it.
Answers go out on ``predictions.{stream}`` / ``errors.{stream}`` (``predictions/{stream}`` for
MQTT QoS 0 subscribers and NATS subscribers) and are stored in ``$MQTT_msgs`` with a message id
naming the message answered (MQTT QoS 1 subscribers: delivered at QoS 1, and once, since the
answer to a replayed message has the same id); past the store's duplicate window, the answered
mark keeps a replay from sending them again. A new owner restores the partition's snapshot
and replays the stream from the sequence after it, so state moves with the partition and every
(stream, seq) is stepped on exactly one state.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import early_signals, systemd_notify, wal
from . import partition_snapshot as psnap
from . import snapshot as snapfmt
from .config import UPPER_BOUNDS, ServiceConfig
from .engine import Engine, load
from .errors import SHOWN_CHARS, ConfigError, EdgeError, SnapshotError, TransportError
from .errors import shown as bounded
from .jetstream import PullFeed, StorePublisher
from .journal import Journal
from .metrics import Metrics
from .model import StepModel
from .nats_auth import connect_options
from .outbox import Outbound
from .partitions import (
    MAX_PARTITIONS,
    MQTT_QOS_HEADER,
    MQTT_STORE,
    MQTT_STORE_PREFIX,
    READ_TOPIC,
    SENSOR_SUBJECTS,
    Twins,
    answer_id,
    assignment,
    check_partitions,
    filter_subject,
    mqtt_source_transforms,
    partition,
    stored_to_topic,
    stream_to_token,
    topic_to_subject,
    transform_dest,
    transform_partitions,
)
from .processor import InARow, Inbound, Processor
from .state_lock import StateLock

log = logging.getLogger("edge.worker")

STREAM = "EDGE_SENSORS"
WORKER_ID = re.compile(r"[A-Za-z0-9_-]+")
USERINFO = re.compile(r"^([^:/]*://)[^/]*@")  # user:password@ or token@ of a server URL
MAX_LEASE_SECONDS = 3600.0  # a lease that long would keep a dead worker's partitions an hour
REFUSALS_BEFORE_LOOKING = 5  # refused pull requests in a row before checking the consumer
LEASES = "edge_leases"
SNAPSHOTS = "edge_snapshots"
ANSWERED = "edge_answered"
LAYOUT = "partitions"  # key of the answered bucket: the partition count, and the one before
CONNECT_SECONDS = 15.0  # to reach NATS at start; later outages are waited out
REFUSED_ROUNDS = 3  # reconnections refused at every server in a row before the worker stops
AUTHORIZATION = "authorization violation"  # nats-server's refusal of a client's credentials
CREDENTIALS = " (the server refused this worker's credentials)"  # said as the worker stops
NO_TLS = "does not require tls"  # ``_tls_only_client``'s refusal of a server
IN_USE_OTHERWISE = 10058  # ... a stream of that name exists with another configuration
NO_STORAGE = 10023  # JetStream's error code: insufficient resources (its storage is full)
NOT_CLUSTERED = 10074  # JetStream's error code: replicas > 1 on a server without a cluster
READY_SECONDS = 60.0  # for JetStream to accept the resources at start (a forming cluster)
# room left in a message for its headers (a stored answer's message id and MQTT QoS, ...)
ANSWER_HEADROOM = 512
SNAPSHOT_CHUNK = 128 * 1024  # bytes per message of a stored snapshot (nats-py's default)
STOP_SECONDS = 5.0  # longest wait for each step of a clean stop
CONSUMER_SECONDS = 60.0  # for NATS to confirm a partition's new consumer (an election)
READ_TRIES = 3  # reads of a snapshot object that its writer replaces meanwhile
UNREADABLE_SECONDS = 60.0  # a snapshot NATS cannot read waits for it this long at most
BUSY_WAIT = 0.25  # seconds a partition waits for messages while samples are held
IDLE_WAIT = 1.0  # ... and with nothing held
# A partition whose scratch log takes no batch for this long (its directory unwritable, or
# full of something else): the worker hands its partitions over and stops, exit 1. Kept, they
# would wait for good while other workers could step them (the assignment gives them to this
# worker as long as it is alive).
STORAGE_SECONDS = 10.0
# How often the owner of partition 0 looks for chunks of the snapshot store that no object
# names (a put cut short by a kill, two puts of one name at once, a purge that failed): each
# is removed once two looks this far apart (at least a lease) found it unnamed and unchanged (a
# put in progress names its chunks, or adds to them, well within that).
SWEEP_SECONDS = 60.0
# How often an owner looks for consumers of its partitions that earlier takeovers left (one
# listing of the stream's consumers: every balancing round, it cost an idle worker and its
# nats-server about a fifth more CPU).
STALE_CONSUMER_SECONDS = 10.0
# Takeovers a balancing round runs at once (see ``Worker._take``): enough for a worker's
# share of the default 16 partitions among two, few enough that a lone worker taking hundreds
# does not open as many snapshot reads and consumer creates on NATS at once.
TAKEOVERS_AT_ONCE = 8


@dataclass(frozen=True)
class WorkerOptions:
    servers: list[str]
    worker_id: str
    partitions: int = 16
    lease_seconds: float = 3.0
    snapshot_interval: float = 5.0
    replicas: int = 1
    stats_interval: float = 10.0
    # at most one way of logging in besides serve's username / password_file (nats_auth)
    creds: str = ""  # nats_creds: a .creds file (user JWT + nkey seed)
    nkey: str = ""  # nats_nkey: an nkey user seed file
    token_file: str = ""  # nats_token_file: a file holding a token

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("nats: at least one server URL is needed")
        for url in self.servers:
            if not url.startswith(("nats://", "tls://")) or len(url.split("://", 1)[1]) == 0:
                raise ConfigError(f"nats server {bounded(shown(url))}: expected nats://HOST:PORT")
        check_partitions(self.partitions)
        if not WORKER_ID.fullmatch(self.worker_id):  # a key of the lease bucket, a subject token
            raise ConfigError(
                f"worker_id {bounded(self.worker_id)}: needs letters, digits, '-' or '_' only"
            )
        lease = self.lease_seconds
        number = isinstance(lease, (int, float)) and not isinstance(lease, bool)
        if not number or not 1 <= lease <= MAX_LEASE_SECONDS:  # NaN fails too
            raise ConfigError(
                f"lease_seconds = {bounded(self.lease_seconds)} must be in 1..{MAX_LEASE_SECONDS:g}"
            )
        self._check_intervals()
        if isinstance(self.replicas, bool) or self.replicas not in (1, 3, 5):
            raise ConfigError(f"replicas = {bounded(self.replicas)} must be 1, 3 or 5")

    def _check_intervals(self) -> None:
        """Bounded as serve's, here where every worker's options pass (the command line's,
        and a program's own): a finite snapshot interval of 1e300 never folded the journal
        into a snapshot, a stats interval of 1e300 never reported."""
        for name, lowest in (("snapshot_interval", "above 0"), ("stats_interval", "")):
            value, top = getattr(self, name), UPPER_BOUNDS[name]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value <= top or (lowest and value == 0):  # NaN fails
                extra = f" and {lowest}" if lowest else ""
                raise ConfigError(f"{name} = {bounded(value)} must be in 0..{top}{extra}")

    def shown(self) -> str:
        """The servers as a log line or an error may show them: without credentials."""
        return ",".join(cut(shown(url)) for url in self.servers)


def cut(text: str) -> str:
    """``text`` as it is, or cut as ``edge.errors.shown`` cuts a value too long to repeat."""
    return text if len(text) <= SHOWN_CHARS else bounded(text)


def shown(url: str) -> str:
    """``url`` without the user, password or token it may carry (``nats://***@HOST:PORT``)."""
    return USERINFO.sub(r"\1***@", url)


def mqtt_source(partitions: int) -> Any:
    """The stream's copy of the MQTT listener's store of devices' QoS 1 publishes."""
    from nats.js import api

    return api.StreamSource(
        name=MQTT_STORE,
        subject_transforms=[
            api.SubjectTransform(src=src, dest=dest)
            for src, dest in mqtt_source_transforms(partitions)
        ],
    )


def _discarding_limits(config: Any) -> list[str]:
    """A stream's limits past which it refuses every new message (discard ``new``)."""
    from nats.js import api

    if config.discard != api.DiscardPolicy.NEW:
        return []
    limits = ("max_msgs", "max_bytes", "max_msgs_per_subject")
    return [f"{k} = {getattr(config, k)}" for k in limits if (getattr(config, k) or 0) > 0]


def _removing_limits(config: Any) -> list[str]:
    """A stream's limits past which it removes its oldest messages (discard ``old``)."""
    from nats.js import api

    if config.discard == api.DiscardPolicy.NEW:
        return []
    limits = ("max_msgs", "max_bytes", "max_age", "max_msgs_per_subject")
    return [f"{k} = {getattr(config, k)}" for k in limits if (getattr(config, k) or 0) > 0]


def discard_problem(config: Any) -> str | None:
    """Why the sensor stream loses devices' samples without a report, if it does: with a limit
    and discard ``new``, JetStream refuses every message past the limit, and NATS's MQTT
    listener has acknowledged the device's publish by then (the worker makes the stream without
    limits; messages an operator's limits remove with discard ``old`` are reported)."""
    set_ = _discarding_limits(config)
    if not set_:
        return None
    return (
        f"stream {STREAM} discards new messages past its limits ({', '.join(set_)}): devices' "
        "samples past them are acknowledged and lost without a report; set its discard "
        "policy to old (what it removes is reported) or remove the limits"
    )


def _size_limit(config: Any, max_payload: int) -> int:
    """A stream's ``max_msg_size`` when it refuses messages the server takes (0: it does not)."""
    size = getattr(config, "max_msg_size", None) or 0
    return size if 0 < size < max_payload else 0


def size_problem(config: Any, max_payload: int) -> str | None:
    """Why the sensor stream loses devices' samples without a report, if it does: a message
    larger than its ``max_msg_size`` is refused, live and as a copy from the MQTT listener's
    store (whose copying then stalls on it), after the listener acknowledged the device's
    publish (the worker makes the stream without that limit)."""
    size = _size_limit(config, max_payload)
    if not size:
        return None
    return (
        f"stream {STREAM} refuses messages larger than its max_msg_size = {size} bytes (the "
        f"server takes {max_payload}): devices' samples larger than that are acknowledged and "
        "lost without a report; remove the limit"
    )


def store_size_problem(config: Any, max_payload: int) -> str | None:
    """Why the MQTT listener's store cannot take some answers, if it cannot: one larger than
    its ``max_msg_size`` is refused, and sent again for good."""
    size = _size_limit(config, max_payload)
    if not size:
        return None
    return (
        f"stream {MQTT_STORE} (NATS's MQTT store) refuses messages larger than its "
        f"max_msg_size = {size} bytes (the server takes {max_payload}): answers larger than "
        "that are refused and sent again for good; remove the limit"
    )


def sealed_problem(config: Any, store: bool = False) -> str | None:
    """Why a stream of the group takes nothing more, if it does: a sealed stream refuses every
    message (and cannot be unsealed). The sensor stream's refusals come after the MQTT
    listener acknowledged the device's publish: lost without a report; the listener's store
    refuses every answer, which the worker sends again for good."""
    if not getattr(config, "sealed", False):
        return None
    if store:
        return (
            f"stream {MQTT_STORE} (NATS's MQTT store) is sealed: every answer is refused and "
            "sent again for good; delete it (the MQTT listener makes it again)"
        )
    return (
        f"stream {STREAM} is sealed: it refuses every message, and devices' samples are "
        "acknowledged and lost without a report; make the stream again"
    )


def retention_problem(config: Any) -> str | None:
    """Why the sensor stream loses devices' samples at a takeover, if it does: with interest
    or work-queue retention JetStream removes a message once its consumer acknowledged it (and
    when the consumer is deleted, as each takeover does), while a new owner replays the
    partition from its snapshot, which covers less: what lies between is lost without a report
    (the worker makes the stream with limits retention)."""
    from nats.js import api

    retention = config.retention
    if retention is None or retention == api.RetentionPolicy.LIMITS:
        return None
    name = getattr(retention, "value", retention)
    return (
        f"stream {STREAM} has {name} retention: it removes messages once they are "
        "acknowledged or their consumer is deleted, and a partition taken over is replayed "
        "from its snapshot: the samples in between are lost without a report; make the "
        "stream again with limits retention"
    )


def store_discard_problem(config: Any) -> str | None:
    """Why the MQTT listener's store cannot take the answers, if it cannot: with a limit and
    discard ``new`` it refuses every one past the limit, and the worker sends it again for
    good (the listener, and the worker when it is missing, make it without limits)."""
    set_ = _discarding_limits(config)
    if not set_:
        return None
    return (
        f"stream {MQTT_STORE} (NATS's MQTT store) discards new messages past its limits "
        f"({', '.join(set_)}): answers past them are refused and sent again for good; "
        "remove the limits"
    )


def _has_mqtt_source(config: Any) -> bool:
    return any(s.name == MQTT_STORE for s in config.sources or [])


def source_problem(config: Any, partitions: int) -> str | None:
    """How the stream's copy of the MQTT listener's store differs from the one the worker
    makes, if it does (an operator's edit): removed, a QoS 1 publish whose live copy is lost
    (a stream electing its leader) is lost too, acknowledged; with other transforms or a
    filter, copies land in partitions whose state does not know their streams."""
    ours = {(src, dest) for src, dest in mqtt_source_transforms(partitions)}
    found = [s for s in config.sources or [] if s.name == MQTT_STORE]
    if not found:
        return f"stream {STREAM} no longer copies {MQTT_STORE} (its source was removed)"
    for source in found:
        pairs = {(t.src, t.dest) for t in source.subject_transforms or []}
        if pairs != ours or source.filter_subject or source.opt_start_seq:
            return (
                f"stream {STREAM}'s copy of {MQTT_STORE} was edited (transforms "
                f"{bounded(sorted(pairs))}, filter {bounded(source.filter_subject)})"
            )
    return None


def with_mqtt_source(config: Any, partitions: int) -> Any:
    """``config`` with the copy of the MQTT listener's store as the worker makes it."""
    others = [s for s in config.sources or [] if s.name != MQTT_STORE]
    config.sources = [*others, mqtt_source(partitions)]
    return config


async def ensure_resources(js: Any, opts: WorkerOptions) -> tuple[Any, Any, Any]:
    """Create the stream, the buckets and the snapshot store, unless they exist; a stream
    made with another partition count is refused (P is fixed at creation)."""
    from nats.js import api
    from nats.js.errors import BadRequestError, NotFoundError

    try:
        await js.stream_info(MQTT_STORE)
    except NotFoundError:
        # Made here as the MQTT listener makes it (it uses one that exists), so that the
        # stream's copy from it runs from the first publish: JetStream retries a source whose
        # origin is missing only after a back-off, and this store keeps a message only while a
        # consumer (the copy) is there to take it.
        with contextlib.suppress(BadRequestError):  # the listener made it meanwhile
            await js.add_stream(
                api.StreamConfig(
                    name=MQTT_STORE,
                    subjects=[MQTT_STORE_PREFIX + ">"],
                    retention=api.RetentionPolicy.INTEREST,
                    storage=api.StorageType.FILE,
                    num_replicas=opts.replicas,
                )
            )
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        info = None
    if info is not None:
        tr = info.config.subject_transform
        dest = tr.dest if tr is not None else None
        if dest != transform_dest(opts.partitions):
            made = transform_partitions(dest)
            what = f"{made} partitions" if made is not None else f"subject transform {dest!r}"
            raise ConfigError(
                f"partitions = {opts.partitions}, but stream {STREAM} was made with {what}: "
                "partitions are fixed at creation "
                "(start with the stream's partition count, or delete the stream)"
            )
        if not _has_mqtt_source(info.config):  # made by a version that only captured
            await js.update_stream(with_mqtt_source(info.config, opts.partitions))
            log.info("stream %s now also sources %s", STREAM, MQTT_STORE)
        elif problem := source_problem(info.config, opts.partitions):
            await js.update_stream(with_mqtt_source(info.config, opts.partitions))
            log.error("%s; made again", problem)
    else:
        await js.add_stream(
            api.StreamConfig(
                name=STREAM,
                subjects=list(SENSOR_SUBJECTS),
                subject_transform=api.SubjectTransform(
                    src="sensors.*.*", dest=transform_dest(opts.partitions)
                ),
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=opts.replicas,
                sources=[mqtt_source(opts.partitions)],
            )
        )
        log.info("created stream %s with %d partitions", STREAM, opts.partitions)
    await _check_lease(js, opts)
    try:
        name = LEASES
        kv = await js.create_key_value(
            bucket=LEASES, ttl=opts.lease_seconds, history=1, replicas=opts.replicas
        )
        name = SNAPSHOTS
        store = await js.create_object_store(SNAPSHOTS, replicas=opts.replicas)
        name = ANSWERED
        answered = await js.create_key_value(bucket=ANSWERED, history=1, replicas=opts.replicas)
    except BadRequestError as exc:
        if exc.err_code != IN_USE_OTHERWISE:
            raise
        if name == LEASES:  # made by a worker started at the same moment: with another lease?
            await _check_lease(js, opts)
        raise ConfigError(
            f"{name}: exists with another configuration than the worker makes (history 1, "
            f"replicas = {opts.replicas}): start with the group's replicas, or delete it with "
            "no worker running"
        ) from exc
    return kv, store, answered


async def _check_lease(js: Any, opts: WorkerOptions) -> None:
    """Every worker of a group must use the same lease: the lease bucket's TTL."""
    from nats.js.errors import NotFoundError

    try:
        leases = await js.stream_info(f"KV_{LEASES}")
    except NotFoundError:
        return
    ttl = leases.config.max_age
    if ttl is not None and abs(ttl - opts.lease_seconds) > 1e-3:
        raise ConfigError(
            f"lease_seconds = {opts.lease_seconds:g}, but the lease bucket {LEASES} was made "
            f"with {ttl:g}: every worker must use the same (or delete the bucket, with no "
            "worker running, to change it)"
        )


def _unavailable() -> tuple[type[BaseException], ...]:
    """Errors of a NATS that cannot answer now (a timeout is an ``OSError``), not of what it
    holds."""
    from nats.errors import (
        ConnectionClosedError,
        ConnectionReconnectingError,
        NoRespondersError,
        StaleConnectionError,
    )
    from nats.js.errors import ServerError, ServiceUnavailableError

    return (
        OSError,
        ConnectionClosedError,
        ConnectionReconnectingError,
        NoRespondersError,
        StaleConnectionError,
        ServerError,
        ServiceUnavailableError,
    )


def _tls_only_client() -> Any:
    """nats-py's client, refusing a server whose INFO does not require TLS before anything
    else is sent. Given a TLS context, nats-py upgrades only a connection whose server says
    ``tls_required``, and otherwise sends its CONNECT, password or token included, in plain
    text: to a server without TLS configured, or to whatever answers in its place."""
    from nats.aio.client import Client
    from nats.errors import Error

    class TlsOnly(Client):
        async def _process_info(
            self, info: dict[str, Any], initial_connection: bool = False
        ) -> None:
            server = self._current_server
            websocket = server is not None and server.uri.scheme == "wss"  # TLS below it
            if initial_connection and not websocket and not info.get("tls_required"):
                where = server.uri.netloc if server is not None else "?"
                raise Error(
                    f"nats: the server at {where} does not require TLS, and the worker is given "
                    "tls_ca or tls_cert: nothing was sent to it (configure the server's tls "
                    "block, or remove the worker's TLS keys)"
                )
            await super()._process_info(info, initial_connection)

    return TlsOnly()


def _authorization_error() -> type[BaseException]:
    from nats.errors import AuthorizationError

    return AuthorizationError


def _unawaited_close(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """nats-py closes a connection the server refused in a task nobody awaits. When the
    server has already dropped the socket, that close fails `Connection lost` and asyncio
    printed its traceback after the worker had said why it stops: one debug line instead.
    Every other unhandled error keeps asyncio's own report."""
    from nats.aio.client import Client

    task = context.get("future")
    coro = task.get_coro() if isinstance(task, asyncio.Task) else None
    code = getattr(coro, "cr_code", None)
    if isinstance(context.get("exception"), ConnectionError) and code is Client._close.__code__:
        log.debug("NATS client's close after the connection was lost: %r", context["exception"])
        return
    loop.default_exception_handler(context)


def _why(exc: BaseException) -> str:
    """An exception as a log line: nats-py's API errors print as ``ServiceUnavailableError()``
    unless their description is asked for."""
    description = getattr(exc, "description", None)
    return f"{type(exc).__name__}: {description}" if description else repr(exc)


def discard(path: Path) -> None:
    """Remove a partition's scratch copy: its directory, or whatever else has its name (a file
    a file-system repair left, a symlink), which would keep the partition from being taken."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        with contextlib.suppress(OSError):  # then making the directory says why
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def partition_engine(model: StepModel, cfg: ServiceConfig) -> Engine:
    """One engine per partition, all sharing the loaded interpreter (it keeps no state)."""
    return Engine(
        model,
        gap_policy=cfg.gap_policy,
        allow_unsequenced=False,
        capacity=cfg.capacity,
        idle_timeout=None,
        restart_gap=cfg.restart_gap,
    )


def inbound(msg: Any, redelivered: bool = False) -> Inbound | None:
    topic = stored_to_topic(msg.subject)
    if topic is None:
        return None
    meta = msg.metadata
    return Inbound(
        topic,
        bytes(msg.data),
        mid=meta.sequence.stream,
        received=time.monotonic(),
        redelivered=redelivered or meta.num_delivered > 1,
    )


class Fenced(Exception):
    """A partition this worker was taking or holding is another worker's now."""


Takeover = tuple[int, int]  # (when the lease bucket was made, in µs; the lease's revision)
LARGEST_SEQ = 2**64 - 1  # JetStream's sequences are unsigned 64-bit numbers


def recorded(doc: Any, key: str, top: int, default: int | None = None) -> int:
    """A whole number 0..``top`` of a record read back from JetStream, else ValueError naming
    it: another writer's or a hand-edited one may hold anything JSON does, and ``int()`` raised
    OverflowError on Infinity or 1e400 (a crash, where unreadable records are written again or
    ignored), truncated 1.5 and took a negative number."""
    return whole(doc[key] if default is None else doc.get(key, default), key, top)


def whole(value: Any, what: str, top: int = LARGEST_SEQ) -> int:
    """``value`` if it is a whole number 0..``top``, else ValueError naming it (cut): what a
    record or a server's reply holds is JSON, anything JSON holds (see ``recorded``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{what} {bounded(value)} is not a whole number in 0..{top}")
    return value


def consumer_name(p: int, lease: Takeover) -> str:
    """Partition ``p``'s consumer as the owner that took it with ``lease`` makes it: each
    takeover makes a consumer of its own, so that a worker whose lease ran out (stopped past
    it) and goes on can pull from, acknowledge on, delete or make again only its own. The
    revision counts in one lease bucket: one made again (deleted by an operator) counts from 1,
    and its takeovers come after every one of the bucket before it."""
    return f"edge-p{p}-{lease[0]}-{lease[1]}"


def consumer_lease(name: str, p: int) -> Takeover | None:
    """The takeover a consumer of partition ``p`` was made by ((0, 0): ``edge-p{p}``, of a
    version that named one consumer per partition); None: no consumer of the partition."""
    if name == f"edge-p{p}":
        return (0, 0)
    head = f"edge-p{p}-"
    parts = name[len(head) :].split("-") if name.startswith(head) else []
    if len(parts) != 2 or not all(x.isdigit() for x in parts):
        return None
    return int(parts[0]), int(parts[1])


@dataclass
class Partition:
    """One owned partition: its processor, its consumer, how far the stream is covered."""

    number: int
    processor: Processor
    directory: Path
    covered: int = 0  # last stream sequence handled
    snapshotted: int = 0  # stream sequence the last uploaded snapshot covers
    generation: int = 0  # of the last uploaded snapshot
    feed: PullFeed | None = None  # once subscribed
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    mids: int = 0
    replay_until: int = 0  # earlier owners' answered mark at the takeover (see _pump)
    answered: int = 0  # every answer to a message up to this stream sequence was sent
    stream: str = ""  # the incarnation of the stream ``covered`` counts in (see _stream_state)
    twins: Twins = field(default_factory=Twins)
    last_snapshot: float = field(default_factory=time.monotonic)
    remake: bool = False  # its consumer delivered another partition's messages
    lease: Takeover = (0, 0)  # of the lease this owner took it with: names its consumer
    # the stream sequence of the partition's next message, known to be in the stream and not
    # yet delivered (0: none known); looked up only while the stream has limits (see _gone)
    expect: int = 0
    # idle evictions (the store's count) the last uploaded snapshot holds: one it does not yet
    # hold is only in the scratch log, and a next owner's replay would not make it
    evictions: int = 0

    @property
    def consumer(self) -> str:
        return consumer_name(self.number, self.lease)


class Worker:
    def __init__(self, cfg: ServiceConfig, opts: WorkerOptions) -> None:
        self.cfg, self.opts = cfg, opts
        # read and checked before the model is loaded: a bad one is refused at once (exit 2)
        self.auth = connect_options(
            opts.creds, opts.nkey, opts.token_file, username=cfg.username, servers=opts.servers
        )
        for key, kind in (("data_topic", "data"), ("control_topic", "control")):
            # The stream captures sensors.*.data / sensors.*.control, read back as these
            # topics: another template answered every sample bad_topic, or read none.
            read = READ_TOPIC.replace("{kind}", kind)
            if getattr(cfg, key) != read:
                raise ConfigError(
                    f"{key} = {bounded(getattr(cfg, key))}: a worker reads {read} only (NATS "
                    f"subject sensors.{{stream}}.{kind}); remove {key} from its configuration"
                )
        self.metrics = Metrics()
        engine = load(
            cfg.model,
            backend=None if cfg.backend == "auto" else cfg.backend,
            max_batch=cfg.max_batch,
        )
        self.model = engine.model
        self.root = Path(cfg.state_dir) / f"worker-{opts.worker_id}"
        self.lock = StateLock(self.root, f"state_dir of worker {opts.worker_id}")
        self.owned: dict[int, Partition] = {}
        self.leases: dict[int, int] = {}  # partition -> revision of our lease
        # partition -> when the request that last created or renewed our lease was sent
        self.renewed: dict[int, float] = {}
        self.stopping = asyncio.Event()
        self.nc: Any = None
        self.js: Any = None
        self.kv: Any = None
        self.answered: Any = None
        self.store: Any = None
        self.stored: StorePublisher | None = None  # once connected
        self.mqtt_store = False  # whether the MQTT listener's store exists (it makes it itself)
        self.stream_id = ""  # when the stream was created (see _stream_state)
        self.seen: set[str] = set()  # the incarnations of the stream this process has seen
        self.unreadable: dict[int, float] = {}  # partition -> when its snapshot read first failed
        self.relaid = 0  # the partition count before this incarnation of the stream (_layout)
        # per counter, the stream's setting that loses messages (discard-new limits, retention
        # other than limits, max_msg_size, sealed) as last said, so that each is said once
        self.stream_problems: dict[str, str | None] = {}
        self.lease_bucket: Any = None  # the lease bucket's configuration, read each round
        self.limited = False  # whether the stream has limits that remove old messages
        self.full_said = -math.inf  # when JetStream's want of storage was last said (_no_room)
        self.failure: str | None = None  # why the worker stops on its own (exit 1)
        self.connect_error = ""  # the last error of the first connection to NATS
        self.refusals = 0  # ... the times a server refused our credentials then
        self.refusal = ""  # ... the last such refusal
        self.denied = ""  # the last permissions violation the server said
        self.nats_errors = InARow(log, "NATS")  # the client's, as it tries a server again
        self.renewals_failed = InARow(log, "lease renewal failed")  # NATS away
        self.rounds_failed = InARow(log, "balancing round failed")  # ... the same
        self.refused = asyncio.Event()  # ... as many times as there are servers
        # chunk subjects of the snapshot store no object named at the last look -> their last
        # sequence then (see _sweep_chunks)
        self.unnamed: dict[str, int] = {}
        self.swept = time.monotonic()
        self.consumers_looked = time.monotonic()  # see _remove_stale_consumers

    # -- JetStream resources ----------------------------------------------------------------

    async def ensure_resources(self) -> None:
        self.kv, self.store, self.answered = await ensure_resources(self.js, self.opts)
        self.stream_id, _, _ = await self._stream_state()
        self.seen.add(self.stream_id)
        self.relaid = await self._layout()

    async def _lease_epoch(self) -> int:
        """When the lease bucket was made, in µs: its revisions count from there. Read before
        a lease is taken, every round that takes one: the bucket may have been made again
        (an operator deleted it) without this worker seeing it missing."""
        created = (await self.js.stream_info(f"KV_{LEASES}")).created
        if created is None:
            return 0
        utc = datetime.timezone.utc
        created = created if created.tzinfo else created.replace(tzinfo=utc)
        unix = datetime.datetime(1970, 1, 1, tzinfo=utc)
        return int((created - unix) // datetime.timedelta(microseconds=1))

    async def _layout(self) -> int:
        """The partition count before this incarnation of the stream, when it was made with
        another one (0: the same, or not known): the partitions' snapshots of the old count
        hold streams that are now in other partitions. Recorded in the answered bucket, since
        a partition of the new count may have no snapshot to say so."""
        from nats.js.errors import KeyNotFoundError

        count, value = 0, b""
        try:
            value = (await self.answered.get(LAYOUT)).value or b""
            doc = json.loads(value)
            count = recorded(doc, "partitions", MAX_PARTITIONS)
            before = recorded(doc, "before", MAX_PARTITIONS, default=0)
            if count == self.opts.partitions:
                return before if doc.get("stream") == self.stream_id else 0
        except KeyNotFoundError:  # not recorded yet (a new group): written below
            pass
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            log.warning(
                "partition count record %s = %s unreadable (%s); written again",
                LAYOUT,
                bounded(value),
                exc,
            )
            count = 0
        doc = {"partitions": self.opts.partitions, "before": count, "stream": self.stream_id}
        await self.answered.put(LAYOUT, json.dumps(doc).encode())
        return count

    async def _stream_state(self) -> tuple[str, int, int]:
        """(when the stream was created, its first and last sequence): a stream deleted and
        made anew counts its sequences from 1 again, so a position in the old one means
        nothing; messages before the first were removed (a purge, limits set on the stream)."""
        info = await self.js.stream_info(STREAM)
        created = info.created.isoformat() if info.created else ""
        state = info.state
        first = whole(state.first_seq, f"stream {STREAM} info: first_seq")
        return created, first, whole(state.last_seq, f"stream {STREAM} info: last_seq")

    # -- partitions -------------------------------------------------------------------------

    def _fresh_processor(self, p: int) -> tuple[Processor, Path]:
        directory = self.root / f"p{p}"
        discard(directory)
        directory.mkdir(parents=True)
        journal = Journal(directory, scratch=True)
        engine = partition_engine(self.model, self.cfg)
        proc = Processor(engine, self.cfg, journal, self.metrics, lsn_from_mid=True)
        # What the snapshot holds for reordering waits only while the stream can deliver what
        # it waits for: from the partition's first pull (``_pump``), not while it is taken
        # over (snapshots fetched, the consumer made), which can outlast ``reorder_ms``.
        proc.pause()
        return proc, directory

    async def _snapshots(self, p: int) -> list[psnap.PartitionSnapshot]:
        """This partition's intact snapshots in JetStream, newest first.

        A read NATS cannot answer now (a timeout while JetStream elects after a node's loss,
        the connection away) is not damage: taken as such, the partition was restored from
        the older slot (more to replay) or the stream's start, and where the stream's limits
        had removed that start its streams' state was given up. The takeover fails instead
        and the next round tries it again, for ``UNREADABLE_SECONDS``; a slot unreadable for
        longer (its chunks lost) is passed over, named."""
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        found: list[psnap.PartitionSnapshot] = []
        for slot in (0, 1):
            name = psnap.object_name(p, slot)
            try:
                data = await self._get(name)
            except (NotFoundError, ObjectNotFoundError):
                continue  # this slot was never written: nothing to restore from it
            except _unavailable() as exc:
                since = self.unreadable.setdefault(p, time.monotonic())
                if time.monotonic() - since < UNREADABLE_SECONDS:
                    raise TransportError(
                        f"partition {p}: snapshot {name} cannot be read now ({_why(exc)}); "
                        "the takeover is tried again"
                    ) from exc
                log.error(
                    "partition %d: snapshot %s unreadable for %.0f s (%s): restored without it",
                    p,
                    name,
                    UNREADABLE_SECONDS,
                    _why(exc),
                )
                self.metrics.inc("snapshots_unreadable")
                continue
            except Exception as exc:  # a damaged object: the other slot, or the stream start
                log.error("partition %d: snapshot %s unreadable: %r", p, name, exc)
                self.metrics.inc("snapshots_damaged")
                continue
            try:
                snap = psnap.unpack(data)
            except EdgeError as exc:
                log.error("partition %d: snapshot %s: %s", p, name, exc)
                self.metrics.inc("snapshots_damaged")
                continue
            if snap.partition != p:  # intact, but not this partition's state or position
                log.error(
                    "partition %d: snapshot %s holds partition %d; not restored",
                    p,
                    name,
                    snap.partition,
                )
                self.metrics.inc("snapshots_damaged")
                continue
            found.append(snap)
        self.unreadable.pop(p, None)
        return sorted(found, key=lambda s: s.generation, reverse=True)

    async def _restore(self, p: int) -> Partition:
        """The partition's newest usable snapshot, or an empty state replaying from the start.

        A snapshot of an earlier incarnation of the stream (deleted and made anew) keeps its
        streams' state, but the new stream is read from its start."""
        stream_id, first_seq, last_seq = await self._stream_state()
        part, passed = await self._restore_snapshot(p, stream_id, last_seq)
        if part is None:
            proc, directory = self._fresh_processor(p)
            proc.recover()
            proc.journal.open()
            log.info("partition %d: no snapshot; replaying from the start of the stream", p)
            # its snapshots come after those of another partition count passed over, and
            # after any a worker whose lease ran out may still write (see _restore_snapshot)
            part = Partition(p, proc, directory, stream=stream_id, generation=passed + 1)
            if self.relaid or passed:  # its streams' state is in the old count's snapshots
                part.processor.assume_lost(
                    f"partition {p}: the stream was made again with another partition count "
                    f"({self.opts.partitions}), and the state of its streams stays behind"
                )
                self.metrics.inc("partitions_relaid")
            elif self.seen - {stream_id}:
                # The stream was made anew while this worker ran, and no snapshot of the
                # partition is left (a nats-server back without its JetStream store): the
                # stream from its start is not its streams' history.
                part.processor.assume_lost(
                    f"partition {p}: stream {STREAM} was made anew and no snapshot of the "
                    "partition is left: the state of its streams is lost"
                )
                self.metrics.inc("history_lost")
        self.seen.add(stream_id)
        if first_seq > part.covered + 1:
            part.processor.assume_lost(
                f"partition {p}: stream {STREAM} begins at sequence {first_seq}, its messages "
                f"after {part.covered} (what the state covers) up to there were removed"
            )
            self.metrics.inc("history_lost")
        return part

    def _other_layout(self, snap: psnap.PartitionSnapshot, proc: Processor) -> str | None:
        """Why a snapshot holds the streams of another partition count (the stream deleted and
        made again with another ``partitions``): restored, a stream that moved to another
        partition was stepped there from the zero state without a word, and its old state
        stayed here, stale, for a later change back."""
        count = self.opts.partitions
        if self.relaid and snap.stream != self.stream_id:
            return f"taken with {self.relaid} partitions, the stream now has {count}"
        if snap.partitions:
            if snap.partitions != count:
                return f"taken with {snap.partitions} partitions, the stream has {count}"
            return None
        for stream in proc.engine.store.streams:  # written before the count was recorded
            q = partition(stream_to_token(stream), count)
            if q != snap.partition:
                return f"it holds stream {stream!r}, which is partition {q} of {count}"
        return None

    async def _restore_snapshot(
        self, p: int, stream_id: str, last_seq: int
    ) -> tuple[Partition | None, int]:
        """The partition from its newest usable snapshot, or None; and the newest generation
        of those of another partition count passed over (0: none was)."""
        passed = 0
        for snap in await self._snapshots(p):
            proc, directory = self._fresh_processor(p)
            snap.write_into(directory)
            try:
                rec = proc.recover()
            except ConfigError as exc:  # another model's (or a later version's): not ours
                # A worker of another bundle that joined before the group's first snapshot:
                # replaying the stream from its start would answer it all again with this
                # model and write over the group's snapshots. It stops as it is refused at start.
                raise self._refusal(p, snap, self._foreign(snap) or str(exc)) from None
            if rec.damaged_snapshots or rec.damage or not rec.generation:
                log.error("partition %d: snapshot generation %d unusable", p, snap.generation)
                self.metrics.inc("snapshots_damaged")
                continue
            other = self._other_layout(snap, proc)
            if other:
                log.error(
                    "partition %d: snapshot generation %d is of another partition count (%s); "
                    "not restored",
                    p,
                    snap.generation,
                    other,
                )
                passed = max(passed, snap.generation)
                continue
            proc.journal.open()
            covered = snap.covered
            if (snap.stream and snap.stream != stream_id) or covered > last_seq:
                log.warning(
                    "partition %d: snapshot generation %d was taken on stream %s created %s "
                    "(up to sequence %d); the stream was made anew (created %s, last sequence "
                    "%d): reading it from its start, the streams keep their state",
                    p,
                    snap.generation,
                    STREAM,
                    cut(snap.stream or "before"),
                    covered,
                    stream_id,
                    last_seq,
                )
                self.metrics.inc("streams_made_anew")
                covered = 0
            log.info(
                "partition %d: restored snapshot generation %d covering stream sequence %d",
                p,
                snap.generation,
                covered,
            )
            part = Partition(
                p,
                proc,
                directory,
                covered=covered,
                snapshotted=covered,
                # One generation left out: a worker that held the partition before, its lease
                # run out while it was stopped, may still write the next one (resumed between
                # its lease check and the write). The new owner's are never of that
                # generation: the stale one, of a lower one, is never restored before them.
                generation=snap.generation + 1,
                stream=stream_id,
            )
            if covered:  # the stream it covers goes on: twins of what it covers may come
                part.twins.load(snap.twins)
            return part, passed
        return None, passed

    async def _consumer_names(self) -> list[str]:
        """The names of the stream's consumers."""
        from nats.js.errors import APIError

        found: list[str] = []
        while True:  # in pages (1,024 names each)
            reply = await self.nc.request(
                f"$JS.API.CONSUMER.NAMES.{STREAM}",
                json.dumps({"offset": len(found)}).encode(),
                timeout=STOP_SECONDS,
            )
            doc = json.loads(reply.data)
            if not isinstance(doc, dict) or not isinstance(doc.get("consumers") or [], list):
                raise ValueError(f"consumer names reply {bounded(reply.data)} is not a page")
            if "error" in doc:
                APIError.from_error(doc["error"])  # raises its class (NotFoundError, ...)
                raise APIError(description=str(doc["error"]))
            names = [str(n) for n in doc.get("consumers") or []]
            found += names
            total = whole(doc.get("total", 0), "consumer names reply: total")
            if not names or len(found) >= total:
                return found

    async def _consumers(self, p: int) -> dict[str, Takeover]:
        """The consumers of partition ``p`` (name -> the lease revision it was made under)."""
        found: dict[str, Takeover] = {}
        for name in await self._consumer_names():
            rev = consumer_lease(name, p)
            if rev is not None:
                found[name] = rev
        return found

    async def _remove_stale_consumers(self) -> None:
        """Delete the consumers of our partitions made by earlier takeovers. A worker stopped
        past its lease inside a takeover and killed right after making its consumer leaves
        one that nothing reads: it held its position (and the server's resources) until the
        partition's next takeover, which may be weeks away. Only older ones: a later one is
        either a new owner's (the partition is going) or a leftover ``_subscribe`` sees."""
        from nats.js.errors import NotFoundError

        names = await self._consumer_names()
        for part in list(self.owned.values()):
            for name in names:
                lease = consumer_lease(name, part.number)
                if lease is None or lease >= part.lease or not self.holds(part.number):
                    continue
                with contextlib.suppress(NotFoundError):  # deleted meanwhile
                    await self.js.delete_consumer(STREAM, name)
                log.warning(
                    "partition %d: removed consumer %s of an earlier takeover", part.number, name
                )
                self.metrics.inc("stale_consumers_removed")

    async def _subscribe(self, part: Partition) -> None:
        """Make the partition's consumer of this takeover, after the consumers of earlier ones
        (see consumer_name), from what the partition covers. One of a later takeover
        means the partition is another worker's: ``Fenced``, nothing touched."""
        from nats.js import api
        from nats.js.errors import NotFoundError

        durable = part.consumer
        found = await self._consumers(part.number)
        found[durable] = part.lease  # edited to another filter, it is not listed
        later = sorted(name for name, rev in found.items() if rev > part.lease)
        if later and not await self._still_ours(part.number):
            raise Fenced(f"partition {part.number}: taken over since (consumer {later[0]})")
        # (Else a leftover named as if later: of a lease bucket made on a server whose clock
        # was ahead. Deleted below with the earlier ones: the lease says no one took it since.)
        for name in sorted(found, key=found.__getitem__):
            with contextlib.suppress(NotFoundError):  # never made, or deleted meanwhile
                await self.js.delete_consumer(STREAM, name)
        config = api.ConsumerConfig(
            # one ack per batch (the last message), as the batch is handled in order
            ack_policy=api.AckPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=4 * self.cfg.max_batch,
            num_replicas=self.opts.replicas,
        )
        if part.covered:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = part.covered + 1
        config.durable_name = durable
        config.filter_subject = filter_subject(part.number)
        await self._add_consumer(part, config)
        later = sorted(
            n for n, rev in (await self._consumers(part.number)).items() if rev > part.lease
        )
        if later and not await self._still_ours(part.number):
            # a later owner made its own meanwhile (we were stopped past our lease)
            with contextlib.suppress(Exception):  # the next takeover deletes it otherwise
                await self.js.delete_consumer(STREAM, durable)
            raise Fenced(f"partition {part.number}: taken over since (consumer {later[0]})")
        part.feed = PullFeed(self.nc, STREAM, durable, self.cfg.max_batch)
        await part.feed.start()

    async def _add_consumer(self, part: Partition, config: Any) -> None:
        """Make the partition's consumer, asking again while NATS has not confirmed it (the
        same configuration: the server answers for the one it made). With a node of the
        cluster dead, a replicated consumer is confirmed once its group has elected a leader,
        which took longer than a request waits on a loaded machine: the takeover failed, the
        next one deleted that consumer and made another, election and all: a partition went
        unowned for tens of seconds, longer while elections outlasted the wait."""
        from nats.errors import TimeoutError as NatsTimeout

        deadline = time.monotonic() + CONSUMER_SECONDS
        while True:
            try:
                await self.js.add_consumer(STREAM, config=config, timeout=STOP_SECONDS)
                return
            except NatsTimeout:
                if time.monotonic() >= deadline or not self.holds(part.number):
                    raise
                log.warning(
                    "partition %d: consumer %s not confirmed by NATS yet (electing?); asking again",
                    part.number,
                    config.durable_name,
                )
                self.metrics.inc("consumer_creates_repeated")

    async def _still_ours(self, p: int) -> bool:
        """Whether the server holds our lease on ``p`` now: a later takeover took it first."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(f"p.{p}")
        except KeyNotFoundError:  # ran out (or deleted): another worker may take it now
            return False
        return p in self.leases and entry.value == self.opts.worker_id.encode()

    async def acquire(self, p: int, lease: Takeover) -> None:
        t0 = time.monotonic()
        part = await self._restore(p)
        part.lease = lease
        try:
            # What earlier owners answered: in the replay, a duplicate up to there was
            # reported already (or is the partition's own). Past it nothing was answered, also
            # what they acknowledged (killed before they sent the answers): a device's
            # duplicate there is reported, as no one did.
            part.answered = part.replay_until = await self._read_answered(part)
            part.processor.sent_before = part.answered  # stepped again, not answered again
            await self._subscribe(part)
        except BaseException:
            part.processor.journal.close()
            shutil.rmtree(part.directory, ignore_errors=True)
            raise
        self.owned[p] = part
        part.task = asyncio.create_task(self._pump(part), name=f"partition-{p}")
        self.metrics.inc("partitions_acquired")
        log.info("partition %d: taken over in %.0f ms", p, (time.monotonic() - t0) * 1000)

    async def _stop_partitions(self, parts: list[Partition]) -> None:
        """Stop their loops (each finishes the batch in hand), then forget them."""
        for part in parts:
            part.stop.set()
            if part.feed is not None:
                part.feed.wake()
        tasks = [p.task for p in parts if p.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_SECONDS)
            for t in late:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for part in parts:
            if part.feed is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(part.feed.stop(), STOP_SECONDS)
            part.processor.journal.close()
            self.owned.pop(part.number, None)

    async def release(self, parts: list[Partition]) -> None:
        """Hand partitions over cleanly: stop them, snapshot them, then give up the leases.
        All at once: one after another, a NATS outage cost each partition its timeouts in
        turn, and a stop of a few partitions outlasted what systemd waits before SIGKILL."""
        await self._stop_partitions(parts)
        await asyncio.gather(*(self._hand_over(part) for part in parts))

    async def _hand_over(self, part: Partition) -> None:
        try:
            await asyncio.wait_for(self._checkpoint(part, force=True), STOP_SECONDS)
        except Exception as exc:  # the next owner replays from the older snapshot
            log.warning("partition %d: final snapshot failed: %s", part.number, exc)
        shutil.rmtree(part.directory, ignore_errors=True)  # its state is in JetStream
        revision = self.leases.pop(part.number, None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.kv.delete(f"p.{part.number}", last=revision), STOP_SECONDS)
        log.info("partition %d: released", part.number)

    async def lose(self, part: Partition) -> None:
        """Our lease is gone (expired, or taken): stop at once, keep nothing."""
        log.warning("partition %d: lease lost; dropping it", part.number)
        self.metrics.inc("partitions_lost")
        if part.task is not None:
            part.task.cancel()
        await self._stop_partitions([part])
        shutil.rmtree(part.directory, ignore_errors=True)

    # -- the partition loop -----------------------------------------------------------------

    def holds(self, p: int) -> bool:
        """Whether our lease on ``p`` is surely still ours: held, and renewed less than 3/4
        of a lease ago (the bucket expires it a full lease after the renewal was stored). A
        lease whose renewals fail (NATS failing over) runs out in the bucket while we cannot
        hear it, and another worker may take the partition then: a loop that went on
        fetching and acknowledging from the re-created consumer would take messages from the
        new owner."""
        renewed = self.renewed.get(p)
        return (
            p in self.leases
            and renewed is not None
            and time.monotonic() - renewed < self.opts.lease_seconds * 0.75
        )

    async def _resubscribe(self, part: Partition) -> None:
        """Pull requests keep being refused: if the consumer (or the whole stream) is gone,
        make them again and go on from what the partition covers (from the start of a stream
        made anew). A consumer that is there was refusing for a passing reason."""
        from nats.js.errors import NotFoundError

        assert part.feed is not None
        refusal, part.feed.refusals = part.feed.refusal, 0
        try:
            await self.js.consumer_info(STREAM, part.consumer)
            return  # it is there: the refusals were passing (a leadership change, ...)
        except NotFoundError:
            log.error(
                "partition %d: its consumer is gone (pull requests refused: %s); making it again",
                part.number,
                refusal,
            )
            self.metrics.inc("consumers_made_again")
        await self.ensure_resources()  # the stream too, if it went
        if self.stream_id != part.stream:
            log.error(
                "partition %d: stream %s was made anew; reading it from its start",
                part.number,
                STREAM,
            )
            self.metrics.inc("streams_made_anew")
            part.covered, part.stream = 0, self.stream_id
        with contextlib.suppress(Exception):
            await part.feed.stop()
        await self._subscribe(part)

    async def _pump(self, part: Partition) -> None:
        proc = part.processor
        while not part.stop.is_set():
            feed = part.feed
            assert feed is not None, "subscribed before the loop starts"
            # Held samples and answers to send again need the loop soon; otherwise it only
            # wakes for messages (or to snapshot and check its lease now and then).
            busy = len(proc.reorder) or proc.outbox.queued
            if not self.holds(part.number):
                # Before any pull request: a lease that ran out while the loop was busy (the
                # process stopped, answers waiting for NATS) may be another worker's now, and
                # the consumer of this name its own. Messages a request took from it would not
                # be acknowledged here, and the new owner's acknowledgement of later ones (ack
                # policy all) would cover them: lost.
                log.warning("partition %d: lease not confirmed; stopping", part.number)
                self.metrics.inc("partitions_fenced")
                return
            try:
                if feed.refusals >= REFUSALS_BEFORE_LOOKING:
                    await self._resubscribe(part)
                    continue
                if part.remake:
                    with contextlib.suppress(Exception):
                        await feed.stop()
                    await self._subscribe(part)
                    part.remake = False
                    continue
                msgs = await feed.take(
                    BUSY_WAIT if busy else IDLE_WAIT, lambda: self.holds(part.number)
                )
                proc.resume()
            except Fenced as exc:  # a later owner made its consumer: the partition is its
                log.warning("%s; stopping", exc)
                self.metrics.inc("partitions_fenced")
                return
            except Exception as exc:  # reconnecting: try again shortly
                proc.pause()  # nothing arrives meanwhile: waits stand still
                log.warning("partition %d: pull request failed: %r", part.number, exc)
                await asyncio.sleep(0.2)
                continue
            if not self.holds(part.number):
                # not acknowledged: redelivered to whoever owns the partition next
                log.warning("partition %d: lease not confirmed; stopping", part.number)
                self.metrics.inc("partitions_fenced")
                return
            mine = filter_subject(part.number)[:-1]
            if any(not m.subject.startswith(mine) for m in msgs):
                # Its consumer edited (another filter): stepped here, another partition's
                # messages would be answered from the wrong state, and twice; the messages
                # of this one may wait behind the filter. The consumer is made again.
                log.error(
                    "partition %d: its consumer delivers messages of other partitions (%s; "
                    "edited?): not stepped here, the consumer is made again",
                    part.number,
                    bounded(next(m.subject for m in msgs if not m.subject.startswith(mine))),
                )
                self.metrics.inc("consumers_made_again")
                msgs = [m for m in msgs if m.subject.startswith(mine)]
                part.remake = True
            if msgs:
                await self._gone(part, msgs)
            batch: list[Inbound] = []
            # What this partition's state took in already, delivered again: also as a first
            # delivery by a server that lost its consumers' newest acknowledgements (killed)
            handled = max(part.replay_until, part.covered)
            forgotten = part.twins.forgotten
            for m in msgs:
                twin = part.twins.admit(m.subject, m.data, m.headers)
                if twin is None:
                    continue  # an MQTT publish's second copy, the first one stepped
                if twin:
                    self.metrics.inc("mqtt_store_copies_stepped")
                # the replay after a takeover, up to what earlier owners answered: a
                # duplicate there was reported already, or is the partition's own
                item = inbound(m, m.metadata.sequence.stream <= handled)
                if item is None:
                    log.error(
                        "partition %d: unexpected subject %s", part.number, bounded(m.subject)
                    )
                else:
                    batch.append(item)
            if part.twins.forgotten != forgotten:
                self._twins_let_go(part, part.twins.forgotten - forgotten)
            if msgs:
                since = time.monotonic()
                while not proc.handle(batch):  # the scratch journal is unwritable
                    if part.stop.is_set():
                        return  # not acknowledged: delivered to the next owner
                    if not self.holds(part.number):
                        # Another worker may own it now: its directory is no reason for this
                        # worker to stop (and its other partitions with it). Not acknowledged.
                        log.warning("partition %d: lease not confirmed; stopping", part.number)
                        self.metrics.inc("partitions_fenced")
                        return
                    if time.monotonic() - since >= STORAGE_SECONDS:
                        self._unwritable(part)
                        return
                    await self._snapshot(part, force=True)  # a new generation frees its log
                    await asyncio.sleep(1.0)
                if not self.holds(part.number):  # lost while handling: the next owner replays
                    log.warning("partition %d: lease not confirmed; stopping", part.number)
                    self.metrics.inc("partitions_fenced")
                    return
                await msgs[-1].ack()  # only now: the processor has logged them
                part.covered = max(part.covered, *(m.metadata.sequence.stream for m in msgs))
                self.metrics.inc("acks", len(msgs))
            proc.tick()
            if proc.engine.store.stats.evicted_idle != part.evictions:
                # Streams forgotten as idle: in the partition's snapshot before any answer
                # goes out. Killed before it, the next owner restored an older snapshot that
                # still held them and answered their next messages from the old state, where
                # this owner had said ``restart``: answers that hang on a crash.
                await self._snapshot(part, force=True)
                if proc.engine.store.stats.evicted_idle != part.evictions:
                    await asyncio.sleep(0.2)  # NATS failing over: the answers wait for it
                    continue
            await self._publish(part)
            crowded = "checkpoint" in proc.requests  # the log takes what its disk has left
            if crowded or time.monotonic() - part.last_snapshot >= self.opts.snapshot_interval:
                proc.requests.discard("checkpoint")
                await self._snapshot(part, force=crowded)

    def _twins_let_go(self, part: Partition, n: int) -> None:
        """Copies whose twin was awaited past ``Twins.capacity``: counted, said once."""
        first = not self.metrics.counters["mqtt_twins_forgotten"]
        self.metrics.inc("mqtt_twins_forgotten", n)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "partition %d: mqtt_twins_forgotten: %d MQTT publishes stepped whose second copy "
            "had not come among the %d awaited; such a copy that still comes is stepped again "
            "(answered as a duplicate when it carries a seq)%s",
            part.number,
            n,
            part.twins.capacity,
            " (said once)" if first else "",
        )

    async def _gone(self, part: Partition, msgs: list[Any]) -> None:
        """Whether the stream's limits (``max_msgs``, ``max_bytes``, ``max_age`` with discard
        old, an operator's) removed messages of the partition before they were delivered: the
        consumer passes over them without a word. The message known to come next, not among
        these and behind them, was removed: reported as at a takeover (every stream's next
        answer says ``restart``). Then the next one is looked up, while messages wait behind
        these; only while the stream has such limits."""
        first = msgs[0].metadata.sequence.stream
        if part.expect and part.covered < part.expect < first:
            part.processor.assume_lost(
                f"partition {part.number}: stream {STREAM}'s limits removed what it had yet to "
                f"read between sequences {part.expect} and {first - 1}"
            )
            self.metrics.inc("history_lost")
        part.expect = 0
        last = msgs[-1].metadata
        if not self.limited or not last.num_pending:
            return
        # not idle while looked up: a balancing round would move its position past the
        # removal the look-up is about to find (``_caught_up``)
        part.expect = last.sequence.stream + 1
        part.expect = await self._next_of(part, last.sequence.stream)

    async def _next_of(self, part: Partition, seq: int) -> int:
        """The sequence of the partition's message after ``seq`` (one was pending when ``seq``
        was delivered), or one known removed, for ``_gone``; 0: not known (NATS away). Limits
        remove the oldest messages first, so once the stream begins past ``seq + 1`` the
        message pending then may be gone before the look-up found it (the look-up finds the
        one after it, or none): then ``seq + 1`` is reported, as what was removed may have
        been the partition's. The stream is in that state only when the partition lags by
        about what the limits keep: what it is about to read is being removed."""
        from nats.js.errors import NotFoundError

        subject = filter_subject(part.number)
        try:
            found = await self.js.get_msg(STREAM, seq=seq + 1, subject=subject, next=True)
            expect = whole(found.seq or 0, f"stream {STREAM} message: seq")
        except NotFoundError:  # every pending one removed meanwhile
            expect = 0
        except Exception as exc:  # NATS away: not watched
            log.debug("partition %d: next message not looked up: %r", part.number, exc)
            return 0
        try:
            # read after the look-up: a stream that still begins at or before seq + 1 had
            # removed nothing after ``seq`` when the look-up ran
            first = (await self._stream_state())[1]
        except Exception as exc:  # NATS away: what the look-up found, as before
            log.debug("partition %d: stream's first sequence not read: %r", part.number, exc)
            return expect
        return seq + 1 if first > seq + 1 else expect

    def _no_room(self, exc: BaseException) -> bool:
        """Whether a refusal says JetStream's storage is full; said (an error line, counter
        ``jetstream_full``) at most once a minute while it lasts. Every write of the group
        (answers, snapshots, leases, devices' samples) is refused until it has room: the
        warnings of each would not say why (a snapshot's refusal reads
        ``ServiceUnavailableError()``)."""
        code = getattr(exc, "err_code", None)
        full = code == NO_STORAGE or "insufficient resources" in str(exc)
        if full and time.monotonic() - self.full_said >= 60.0:
            self.full_said = time.monotonic()
            log.error(
                "JetStream is out of storage (insufficient resources): answers, snapshots, "
                "leases and devices' samples are refused until it has room (nats-server's "
                "jetstream max_file_store / max_memory_store, or the disk of its store_dir)"
            )
            self.metrics.inc("jetstream_full")
        return full

    def _unwritable(self, part: Partition) -> None:
        """``part`` cannot log: the worker stops (``run`` returns 1), handing every partition
        over, so that the others take them; systemd starts it again, and at that start a
        directory it cannot write is refused (exit 2)."""
        if self.failure is None:
            self.failure = (
                f"partition {part.number}: cannot write its log in {str(part.directory)!r} for "
                f"{STORAGE_SECONDS:g} s ({part.processor.degraded}); stopping, so that other "
                "workers take the partitions over"
            )
            log.error("%s", self.failure)
        self.stopping.set()

    async def _snapshot(self, part: Partition, *, force: bool = False) -> None:
        try:
            await self._checkpoint(part, force=force)
        except Fenced as exc:  # the loop stops at its next lease check
            log.warning("%s", exc)
        except Exception as exc:  # NATS failing over: the next interval tries again
            self._no_room(exc)
            log.warning("partition %d: snapshot failed: %s", part.number, _why(exc))
            self.metrics.inc("snapshot_failures")

    async def _publish(self, part: Partition) -> None:
        """Each answer stored in the MQTT listener's store with a message id naming the message
        it answers (MQTT QoS 1 subscriptions take it from there: once, since a replay after a
        failover computes the same id), then sent as core NATS (NATS subscribers, MQTT QoS 0
        subscriptions), then the answered mark, all in one write to the server. A replay passes
        over what the mark covers; past it, the core copy goes out again even when the store
        already holds the answer, since an owner killed between the two did not send it. The
        header marks the core copy as a QoS 1 publish, so that a QoS 1 subscription passes
        over it, as for a device's own QoS 1 publish."""
        outbox = part.processor.outbox
        outs = outbox.take()
        if part.answered:  # a replay: what an owner before us marked as sent is not sent again
            sent: list[Outbound] = []
            rest: list[Outbound] = []
            for o in outs:
                (sent if o.lsn and o.lsn <= part.answered else rest).append(o)
            if sent:
                outs = rest
                self._done(part, sent)
                self.metrics.inc("answers_sent_before", len(sent))
        if not outs:
            await self._mark_answered(part)
            return
        outs = [self._fit(part, o) for o in outs]
        items: list[tuple[str, bytes, dict[str, str] | None]] = []
        for o in outs:
            subject = topic_to_subject(o.topic)
            headers = None
            if self.mqtt_store:
                mid = answer_id(part.stream, o.lsn, subject, o.payload)
                headers = {MQTT_QOS_HEADER: "1", "Nats-Msg-Id": mid}
            items.append((subject, o.payload, headers))
        try:
            if self.mqtt_store:
                assert self.stored is not None, "connected before partitions run"
                stored = [(MQTT_STORE_PREFIX + s, b, h or {}) for s, b, h in items]
                duplicate = await self.stored.publish(stored, STOP_SECONDS)
                self.metrics.inc("answers_stored_before", sum(duplicate))
            if not self.holds(part.number):
                # The lease ran out while the store answered (the process stopped, NATS slow):
                # a new owner may have replayed these messages, found no mark for them and
                # sent their core copies already. Neither copies nor mark from here: the
                # partition is dropped, and its next owner sends them.
                outbox.retry(outs)
                return
            for subject, payload, headers in items:
                await self.nc.publish(subject, payload, headers=headers)
        except asyncio.CancelledError:  # a hand-over that waited no longer: its snapshot
            outbox.retry(outs)  # carries them (they were no longer in the outbox it reads)
            raise
        except Exception as exc:  # NATS failing over: all of them again on the next round
            self._no_room(exc)
            log.warning("partition %d: answers not confirmed, sending again: %r", part.number, exc)
            self.metrics.inc("answer_retries")
            outbox.retry(outs)
            await asyncio.sleep(0.2)
            return
        self._done(part, outs)
        # Behind the core copies on the connection: the server has the mark only if it has
        # them. Written out now, not at a later turn of the loop.
        await self._mark_answered(part)
        try:
            await self.nc.flush()
        except Exception as exc:  # the client sends its buffer after a reconnect
            log.warning("partition %d: answers sent, not confirmed: %r", part.number, exc)

    def _fit(self, part: Partition, o: Outbound) -> Outbound:
        """An answer the server would refuse (larger than its ``max_payload``): a report."""
        if len(o.payload) <= int(self.nc.max_payload) - ANSWER_HEADROOM:
            return o
        limit = f"the NATS server's max_payload ({self.nc.max_payload} bytes)"
        report = part.processor.unsendable(o, limit)
        part.processor.outbox.replace(o, report)
        return report

    @staticmethod
    def _done(part: Partition, outs: list[Outbound]) -> None:
        for o in outs:
            part.mids += 1
            part.processor.outbox.sent(part.mids, o)
            part.processor.outbox.acked(part.mids)

    async def _mark_answered(self, part: Partition) -> None:
        """Record how far every answer went out, for a replay after the store's duplicate
        window. A core publish into the bucket's stream: no round trip per batch. Lost (NATS
        failing over), the mark is only behind, and a replay may send answers twice, never
        fewer."""
        mark = part.processor.answered()
        if mark > part.answered:
            if not self.holds(part.number):
                # The lease ran out (the process stopped, in an acknowledgement, say): a new
                # owner may have written its own mark since, further on; this one, written
                # over it, would make the next replay send its answers again.
                return
            part.answered = mark
            doc = json.dumps({"stream": part.stream, "lsn": mark}).encode()
            await self.nc.publish(f"$KV.{ANSWERED}.p.{part.number}", doc)

    async def _read_answered(self, part: Partition) -> int:
        """The mark of earlier owners on this incarnation of the stream; 0 when there is none."""
        from nats.js.errors import KeyNotFoundError

        key, value = f"p.{part.number}", b""
        try:
            value = (await self.answered.get(key)).value or b""
            doc = json.loads(value)
            return recorded(doc, "lsn", LARGEST_SEQ) if doc.get("stream") == part.stream else 0
        except KeyNotFoundError:
            return 0
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            log.warning(
                "partition %d: answered mark %s = %s unreadable (%s); ignored",
                part.number,
                key,
                bounded(value),
                exc,
            )
            return 0

    async def _checkpoint(self, part: Partition, *, force: bool = False) -> None:
        part.last_snapshot = time.monotonic()
        if part.covered == part.snapshotted and not force:
            return
        proc = part.processor
        if not proc.checkpoint():
            return
        evictions = proc.engine.store.stats.evicted_idle
        journal = proc.journal
        gen = part.generation + 1
        blob = psnap.PartitionSnapshot(
            part.number,
            gen,
            part.covered,
            journal.path("snap", journal.generation).read_bytes(),
            journal.path("wal", journal.generation).read_bytes(),
            part.stream,
            part.twins.export(),
            self.opts.partitions,
        ).pack()
        if not self.holds(part.number):
            # The lease ran out (the process stopped, NATS slow): another worker may own the
            # partition, and this state is older than its. Written over the new owner's
            # newest snapshot, the next takeover would step the partition back to it.
            raise Fenced(f"partition {part.number}: lease not confirmed; no snapshot written")
        await self._put(psnap.object_name(part.number, gen % 2), blob)
        part.generation, part.snapshotted = gen, part.covered
        part.evictions = evictions
        self.metrics.inc("snapshots")

    async def _get(self, name: str) -> bytes:
        """An object of the snapshot store, read again when it is written anew meanwhile (by
        its owner, or a worker whose lease ran out while it was stopped): the store removes
        the old object's chunks once the new ones are in, and nats-py's ``get`` waits for the
        chunks of the object it was first told about for good. Raises a timeout error when
        every try finds the chunks it looks for gone (the object written again each time)."""
        for _ in range(READ_TRIES):
            info = await self.store.get_info(name)
            if not info.size:
                return b""
            sub = await self.js.subscribe(f"$O.{SNAPSHOTS}.C.{info.nuid}", ordered_consumer=True)
            data = bytearray()
            try:
                while len(data) < info.size:
                    data += (await sub.next_msg(timeout=STOP_SECONDS)).data
            except asyncio.TimeoutError:  # its chunks went: that object was written anew
                log.info("snapshot %s written anew while read; reading it again", name)
                continue
            finally:
                with contextlib.suppress(Exception):  # the server drops the consumer anyway
                    await sub.unsubscribe()
            return bytes(data)  # its own checksum says whether it is whole
        raise asyncio.TimeoutError(
            f"snapshot {name}: written anew each of {READ_TRIES} times it was read"
        )

    async def _put(self, name: str, blob: bytes) -> None:
        """Into the snapshot store, in chunks the server takes: nats-py's default (128 kB) is
        refused by a server with a smaller ``max_payload``, every time."""
        from nats.js import api

        chunk = max(1024, min(SNAPSHOT_CHUNK, int(self.nc.max_payload) - ANSWER_HEADROOM))
        options = api.ObjectMetaOptions(max_chunk_size=chunk)
        await self.store.put(name, blob, meta=api.ObjectMeta(name=name, options=options))

    def _sweep_due(self) -> bool:
        """Whether the owner of partition 0 looks for stray chunks now: every ``SWEEP_SECONDS``,
        and never sooner than a lease apart. An owner stopped in the middle of a snapshot's put
        for longer than the two looks apart, and not past its lease (a long one), lost that
        snapshot's chunks, found unnamed and unchanged twice; one stopped past its lease may
        have lost the partition, and its put is another owner's to replace."""
        every = max(SWEEP_SECONDS, self.opts.lease_seconds)
        return time.monotonic() - self.swept >= every

    async def _sweep_chunks(self) -> None:
        """Remove the snapshot store's chunks that no object names. nats-py writes an object's
        chunks under a new id, then its description, then removes the chunks of the object it
        replaced: a worker killed before the description leaves the new chunks, one killed (or
        cut off) before the removal the old ones, and two workers writing one name at once
        (one of them stopped past its lease) leave the chunks of the description that lost.
        Nothing else ever removes them: the store grew by a snapshot each time, for good. A
        chunk subject is removed when two looks ``_sweep_due`` apart found it unnamed and
        unchanged: a put in progress names its chunks or adds to them before the second."""
        stream, metas, chunks = f"OBJ_{SNAPSHOTS}", f"$O.{SNAPSHOTS}.M.", f"$O.{SNAPSHOTS}.C."
        named: set[str] = set()
        info = await self.js.stream_info(stream, subjects_filter=metas + ">")
        for subject in info.state.subjects or {}:  # descriptions first: then their chunks
            doc = json.loads((await self.js.get_last_msg(stream, subject)).data or b"{}")
            if isinstance(doc, dict) and doc.get("nuid") and not doc.get("deleted"):
                named.add(str(doc["nuid"]))
        info = await self.js.stream_info(stream, subjects_filter=chunks + ">")
        unnamed: dict[str, int] = {}
        for subject in info.state.subjects or {}:
            if subject[len(chunks) :] in named:
                continue
            last = whole((await self.js.get_last_msg(stream, subject)).seq or 0, f"{subject}: seq")
            if self.unnamed.get(subject) == last:
                await self.js.purge_stream(stream, subject=subject)
                log.info("snapshot store: removed chunks no object names (%s)", subject)
                self.metrics.inc("snapshot_chunks_removed")
            else:
                unnamed[subject] = last
        self.unnamed = unnamed

    # -- leases -----------------------------------------------------------------------------

    async def _renew_lease(self, p: int, rev: int) -> None:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        sent = time.monotonic()
        try:
            new = await self.kv.update(f"p.{p}", self.opts.worker_id.encode(), last=rev)
        except (KeyWrongLastSequenceError, KeyNotFoundError) as exc:
            log.warning("partition %d: lease renewal refused: %r", p, exc)
            if self.leases.get(p) == rev:
                del self.leases[p]  # the balancing round drops the partition
            return
        if self.leases.get(p) == rev:
            self.leases[p] = new
            self.renewed[p] = sent

    async def _renew(self) -> None:
        """Say we are alive and renew every lease we hold, on its own clock: a slow takeover
        elsewhere in this worker must not let our other leases run out. All renewals go out
        at once: one after the other, each waited for a turn of an event loop busy with
        partitions' batches, they took longer than a lease under load (seen: a lone worker
        fencing and re-acquiring its own partitions, replaying a third of its input). Nor does
        a round wait for the last one's answers: one renewal answered late (its request
        waited out, NATS failing over) held every other lease back, and the worker fenced
        all its partitions. A lease whose renewal is still on its way is not renewed again
        (its revision would be refused, and the lease dropped)."""
        member = f"w.{self.opts.worker_id}"
        pending: dict[Any, asyncio.Task[Any]] = {}  # "w" or (partition, revision) -> renewal
        failed: list[BaseException] = []

        def start(key: Any, call: Callable[[], Coroutine[Any, Any, Any]]) -> None:
            if key in pending:
                return

            def done(task: asyncio.Task[Any]) -> None:
                pending.pop(key, None)
                if not task.cancelled() and (exc := task.exception()) is not None:
                    failed.append(exc)
                elif not task.cancelled():  # NATS answers again
                    self.renewals_failed.over()

            pending[key] = asyncio.create_task(call())
            pending[key].add_done_callback(done)

        try:
            while not self.stopping.is_set():
                if self.nc is not None and self.nc.is_closed:
                    # closed for good, and nats-py may not have said so: its close ends
                    # before the closed callback when the socket is already gone
                    await self._nats_closed()
                    break
                start("w", lambda: self.kv.put(member, json.dumps({"ts": time.time()}).encode()))
                for p, rev in list(self.leases.items()):
                    start((p, rev), functools.partial(self._renew_lease, p, rev))
                if failed:  # NATS unreachable for a moment: the leases say so
                    self._no_room(failed[0])
                    # four rounds a lease: a server away for a day was 100,000 lines
                    self.renewals_failed(str(failed[0]), f"lease renewal failed ({len(failed)})")
                    failed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.opts.lease_seconds / 4)
        finally:
            for task in list(pending.values()):
                task.cancel()

    async def _members(self) -> set[str]:
        """The live workers: ``w.{id}`` keys whose newest entry is not a delete marker. Read
        from the bucket's stream state and direct gets, not ``kv.keys()``: that creates a
        watcher (a consumer) per call, which a cluster keeps for minutes after it is stopped
        (seen: 1,000 after 4 minutes of 3 workers, then "maximum consumers limit reached")."""
        from nats.js.errors import KeyNotFoundError

        prefix = f"$KV.{LEASES}.w."
        info = await self.js.stream_info(f"KV_{LEASES}", subjects_filter=prefix + ">")
        self.lease_bucket = info.config  # for _keep_lease_ttl
        members: set[str] = set()
        for subject in info.state.subjects or {}:
            key = subject[len(prefix) - 2 :]
            try:
                await self.kv.get(key)
            except KeyNotFoundError:  # deleted (a clean stop) or expired meanwhile
                continue
            members.add(key[2:])
        return members

    async def _balance(self) -> None:
        """Drop partitions whose lease is gone, release what another live worker should own,
        take what is free and ours by the rendezvous assignment."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        kv = self.kv
        members = await self._members() | {self.opts.worker_id}
        plan = assignment(self.opts.partitions, members)
        for p, part in list(self.owned.items()):
            if part.task is not None and part.task.done() and not part.task.cancelled():
                # A loop that stopped, its lease unconfirmed (or dead of a bug): hand the
                # partition on rather than sit on it.
                if part.task.exception() is not None:
                    log.error("partition %d stopped: %r", p, part.task.exception())
                self.leases.pop(p, None)
            if p not in self.leases:
                await self.lose(part)
        give = [part for p, part in self.owned.items() if plan.get(p) != self.opts.worker_id]
        if give:
            await self.release(give)
        epoch: int | None = None  # of the lease bucket the leases below are taken in
        taking: list[tuple[int, Takeover]] = []
        for p, owner in plan.items():
            if owner != self.opts.worker_id or p in self.owned or self.stopping.is_set():
                continue
            if epoch is None:  # before the lease: a bucket made again after it has not got it
                epoch = await self._lease_epoch()
            sent = time.monotonic()
            try:
                self.leases[p] = await kv.create(f"p.{p}", self.opts.worker_id.encode())
                self.renewed[p] = sent
            except KeyWrongLastSequenceError:
                continue  # still held: by a worker handing it over, or one whose lease runs out
            except KeyNotFoundError:
                # Held when asked for, gone when the client looked whether it was a delete
                # marker: it ran out meanwhile (not a deleted bucket). Taken next round.
                continue
            taking.append((p, (epoch, self.leases[p])))
        if taking:
            await self._take(taking)

    async def _take(self, taking: list[tuple[int, Takeover]]) -> None:
        """Take over these partitions (their leases held), ``TAKEOVERS_AT_ONCE`` at a time.
        One after another, each waited out its own timeouts while NATS failed over (a
        snapshot read, its consumer's creation while JetStream elected: 5 s each): a worker
        whose leases all ran out in a node's loss answered again only tens of seconds later.
        A fenced takeover is dropped; any other error is raised once every other takeover
        has ended (taken or dropped), so none is left half done."""
        slots = asyncio.Semaphore(TAKEOVERS_AT_ONCE)

        async def take(p: int, lease: Takeover) -> None:
            async with slots:
                if self.stopping.is_set():  # not begun: given back, as a stop gives back leases
                    revision = self.leases.pop(p, None)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(
                            self.kv.delete(f"p.{p}", last=revision), STOP_SECONDS
                        )
                    return
                try:
                    await self.acquire(p, lease)
                except Fenced as exc:  # stopped past the lease while taking it: another's now
                    log.warning("%s; not taken", exc)
                    self.metrics.inc("takeovers_fenced")
                    self.leases.pop(p, None)
                except BaseException:
                    self.leases.pop(p, None)
                    raise

        ended = await asyncio.gather(*(take(p, x) for p, x in taking), return_exceptions=True)
        failed = [(p, x) for (p, _), x in zip(taking, ended) if isinstance(x, BaseException)]
        for p, exc in failed[1:]:  # the first is raised: the round says it
            log.warning("partition %d: takeover failed: %r", p, exc)
        if failed:
            raise failed[0][1]

    # -- running ----------------------------------------------------------------------------

    async def _find_mqtt_store(self) -> None:
        """The MQTT listener creates its store when the first MQTT client connects."""
        from nats.js.errors import NotFoundError

        if self.mqtt_store:
            return
        try:
            await self.js.stream_info(MQTT_STORE)
        except NotFoundError:
            return
        self.mqtt_store = True
        log.info("answers are also stored in %s (MQTT QoS 1 subscriptions)", MQTT_STORE)

    async def _check_discard(self) -> None:
        """Limits with discard ``new``, a retention other than limits, a ``max_msg_size`` put
        on the stream, or the stream sealed, while the group runs: said once. Its copy of the
        MQTT listener's store removed or edited: made again as the worker makes it. A
        subject transform edited to another partition count: stored under it, every stream
        lands in another partition, whose state knows nothing of it (answered from the zero
        state without a word), so the worker stops as it refuses to start (exit 2)."""
        info = await self.js.stream_info(STREAM)
        config = info.config
        transform = config.subject_transform
        dest = transform.dest if transform is not None else None
        if dest != transform_dest(self.opts.partitions):
            raise ConfigError(
                f"stream {STREAM} was edited to subject transform {bounded(dest)}, not "
                f"{transform_dest(self.opts.partitions)!r}: its messages no longer land in the "
                f"partitions whose state they need; put it back, or delete the stream and "
                "start the workers with the new partition count"
            )
        problem = source_problem(config, self.opts.partitions)
        if problem:
            await self.js.update_stream(with_mqtt_source(config, self.opts.partitions))
            log.error("%s; made again", problem)
            self.metrics.inc("mqtt_source_made_again")
            config = (await self.js.stream_info(STREAM)).config
        self.limited = bool(_removing_limits(config))
        for counter, problem in (
            ("stream_discards_new", discard_problem(config)),
            ("stream_retention_removes", retention_problem(config)),
            ("stream_refuses_large", size_problem(config, int(self.nc.max_payload))),
            ("stream_sealed", sealed_problem(config)),
        ):
            if problem and problem != self.stream_problems.get(counter):
                log.error("%s", problem)
                self.metrics.inc(counter)
            self.stream_problems[counter] = problem
        if self.limited:
            await self._caught_up(whole(info.state.last_seq, f"stream {STREAM} info: last_seq"))

    async def _keep_lease_ttl(self) -> None:
        """The lease bucket's TTL edited under a running group (a stream edit): without one, or
        a longer one, a killed worker's leases did not run out, and its partitions waited for
        it for good (or that long). Put back to ``lease_seconds``, which every worker of the
        group shares (``_check_lease``)."""
        config = self.lease_bucket
        ttl = (config.max_age or 0) if config is not None else self.opts.lease_seconds
        if abs(ttl - self.opts.lease_seconds) <= 1e-3:
            return
        assert config is not None
        log.error(
            "lease bucket %s: its TTL was edited to %gs, not lease_seconds = %g: a dead "
            "worker's partitions would wait %s; put back",
            LEASES,
            ttl,
            self.opts.lease_seconds,
            f"{ttl:g} s" if ttl else "for good",
        )
        config.max_age = self.opts.lease_seconds
        await self.js.update_stream(config)
        self.metrics.inc("lease_ttl_put_back")

    async def _caught_up(self, last: int) -> None:
        """On a stream whose limits remove old messages, move what each idle partition covers
        up to ``last`` (read before): its consumer has nothing pending or unacknowledged, so
        every message of the partition up to there was handled. Else a partition without
        messages of its own for a while covers a sequence the limits have removed since (the
        other partitions' messages), and its next owner took that for lost history: every
        stream of the partition said ``restart`` with nothing lost."""
        from nats.js.errors import NotFoundError

        for part in list(self.owned.values()):
            if part.covered >= last or part.stop.is_set():
                continue
            try:
                ci = await self.js.consumer_info(STREAM, part.consumer)
            except NotFoundError:  # made again by its loop
                continue
            # (not past a removal it has yet to report: see _gone)
            idle = not ci.num_pending and not ci.num_ack_pending and not part.expect
            if idle and self.holds(part.number):
                part.covered = max(part.covered, last)

    async def _make_again(self, exc: Exception) -> None:
        """A bucket or store of the group is gone. Without the lease bucket no worker can say
        it is alive or hold a partition, and every partition of the group stopped for good;
        without the answered marks or the snapshot store, marks and snapshots went nowhere
        (the marks without a word: a replay would send answers again) until a restart. Made
        again (with the stream, if it went too); partitions are then taken as at a start."""
        log.error("balancing round failed: %s; making the group's resources again", exc)
        self.metrics.inc("resources_made_again")
        try:
            await self.ensure_resources()
        except Exception as again:  # tried again at the next round
            log.warning("making the group's resources again failed: %s", again)

    async def _say(self, state: str) -> None:
        doc = {
            "state": state,
            "runtime_id": self.opts.worker_id,
            "model": self.model.manifest.model_id,
            "kernels": self.model.kernels,
            "partitions": sorted(self.owned),
            "ts": time.time(),
        }
        await self._send(f"edge.status.{self.opts.worker_id}", json.dumps(doc).encode())

    async def _send(self, subject: str, payload: bytes) -> None:
        """A status or stats message, which nothing waits for. While NATS is away its client
        keeps what is published in a buffer of 2 MB and refuses more once it is full: a long
        outage must be waited out, not end the worker."""
        try:
            await self.nc.publish(subject, payload)
        except Exception as exc:
            log.debug("%s not sent: %r", subject, exc)

    def stats(self) -> dict[str, Any]:
        return {
            **self.metrics.snapshot(),
            "worker_id": self.opts.worker_id,
            "partitions": sorted(self.owned),
            "streams": sum(len(p.processor.engine.store) for p in self.owned.values()),
            "ts": time.time(),
        }

    async def _nats_error(self, exc: Exception) -> None:
        said = str(exc) or type(exc).__name__
        # The client tries a server away again every half second, each an error: logged as
        # serve logs a broker away (the same in a row at 1-3, 10 and every 100th).
        self.nats_errors(said, note="the same again is logged at attempt 10 and every 100th")
        if "permissions violation" in said.lower():
            self.denied = said
        credentials = AUTHORIZATION in said.lower()
        refused = credentials or NO_TLS in said.lower()
        if refused:
            self.refusal = said  # kept: the server's closing the connection follows it
            self.refusals += 1  # in a row: a connection made sets it to 0
        if self.nc is None:  # the first connection: its error says why it is not made
            self.connect_error = said
            # the client would try the same for good; one server of several may still take it
            if self.refusals >= len(self.opts.servers):
                self.refused.set()
        elif refused and self.refusals >= REFUSED_ROUNDS * len(self.opts.servers):
            # Revoked credentials whose connection the server reset before its refusal was
            # read: nats-py reconnects, refused every half second for good. As when it closes.
            said += CREDENTIALS if credentials else ""
            self._stop_on_nats(f"NATS refused {self.refusals} reconnections in a row: {said}")

    async def _nats_reconnected(self) -> None:
        self.refusals = 0

    async def _nats_closed(self) -> None:
        """The client closed the connection for good while the worker runs: the server
        refused its credentials (they were revoked, a token or user removed from its
        configuration, a reload) or said another error it closes on. nats-py then never
        connects again, and the worker went on with every round failing `connection closed`,
        never saying why, even once the credentials were taken again. It says why and stops
        (exit 1, so that systemd starts it again: a refusal at that start is exit 2, the
        server's words)."""
        if self.nc is None:  # the start's own
            return
        err = self.nc.last_error
        said = "no error said" if err is None else str(err) or type(err).__name__
        if isinstance(err, _authorization_error()):
            said += CREDENTIALS
        self._stop_on_nats(f"NATS closed the connection for good: {said}")

    def _stop_on_nats(self, why: str) -> None:
        if self.stopping.is_set():  # our own close, or said already
            return
        self.failure = f"{why}; stopping"
        log.error("%s", self.failure)
        self.stopping.set()

    def _usable_root(self) -> None:
        """The worker's scratch journals need a directory it can write: one it cannot would
        join the group and take partitions it then never steps (``serve`` starts degraded
        there, the broker keeping the messages; a worker's share would wait for good)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # A name of its own: a copy of the same unit started at the same moment probes
            # the same directory, and would remove a shared name under us (then "No such file
            # or directory" instead of the lock's "in use by another process").
            fd, name = tempfile.mkstemp(prefix=".probe-", dir=self.root)
            os.close(fd)
            Path(name).unlink()
        except OSError as exc:
            raise ConfigError(
                f"state_dir {bounded(self.cfg.state_dir)}: the worker cannot keep its scratch "
                f"journals in {bounded(str(self.root))}: {exc.strerror or exc}"
            ) from None

    def _foreign(self, snap: psnap.PartitionSnapshot) -> str | None:
        """Why a partition snapshot holds another model's state (another state layout, or
        logged samples of another feature count: what ``serve`` refuses in a state_dir)."""
        try:
            state = snapfmt.decode(snap.snapshot)
        except SnapshotError:
            return None  # damaged: restoring falls back to the other slot or the stream
        layout = [list(x) for x in self.model.manifest.state_layout()]
        if state.state_layout != layout:
            return f"its state layout {state.state_layout} differs from this model's {layout}"
        features = self.model.manifest.features
        for entry in wal.scan(snap.segment):
            if isinstance(entry, wal.Record) and entry.values.shape[-1] != features:
                width = entry.values.shape[-1]
                return f"it holds samples of {width} features, this model takes {features}"
        return None

    async def _refuse_foreign_snapshots(self) -> None:
        """A worker of another model must not join the group: it would replay every
        partition from the stream's start into its own state, answer with errors, and write
        its snapshots over the group's. Refused at start, nothing touched."""
        for p in range(self.opts.partitions):
            try:
                snaps = await self._snapshots(p)
            except TransportError as exc:  # checked again when the partition is taken over
                log.warning("%s", exc)
                continue
            for snap in snaps[:1]:
                problem = self._foreign(snap)
                if problem:
                    raise self._refusal(p, snap, problem)

    @staticmethod
    def _refusal(p: int, snap: psnap.PartitionSnapshot, problem: str) -> ConfigError:
        return ConfigError(
            f"partition {p}'s snapshot (generation {snap.generation}) in JetStream holds the "
            f"state of another model: {problem}; run the group's workers with the bundle that "
            f"wrote it, or delete the object store {SNAPSHOTS!r} to start the group from the "
            "stream's start"
        )

    async def run(self) -> int:
        asyncio.get_running_loop().set_exception_handler(_unawaited_close)
        self._usable_root()
        self.lock.acquire()
        for left in self.root.glob("p*"):  # scratch copies of partitions held before
            if left.name[1:].isdigit():
                discard(left)
        try:
            return await self._run()
        finally:
            self.lock.release()

    def _login(self) -> dict[str, Any]:
        """``serve``'s keys of the broker's TLS and login (``tls_ca``, ``tls_cert``,
        ``tls_key``, ``username``, ``password_file``) for NATS: read from the same file and
        environment, and checked as ``serve`` checks them, they were ignored without a word
        (a server with TLS then failed `certificate verify failed`)."""
        import ssl

        cfg = self.cfg
        kw: dict[str, Any] = {}
        if cfg.tls_ca or cfg.tls_cert:
            tls = ssl.create_default_context(cafile=cfg.tls_ca or None)
            if cfg.tls_cert:
                tls.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
            kw["tls"] = tls
        if cfg.username:
            kw["user"] = cfg.username
            kw["password"] = cfg.login_password()
        return {**kw, **self.auth}  # nats_creds, nats_nkey or nats_token_file

    async def _run(self) -> int:
        from nats.aio.client import Client as NatsClient
        from nats.js.errors import NotFoundError

        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
            # Started, for systemd: the configuration, model and state_dir are taken (one the
            # worker cannot use failed the start itself) and SIGTERM is a clean stop. Not once
            # NATS is reached: that waits up to CONNECT_SECONDS, JetStream READY_SECONDS more.
            systemd_notify.notify("READY=1")
        if set(early_signals.take()) - {signal.SIGHUP}:  # arrived while the process started
            self.stopping.set()
        login = self._login()
        client = _tls_only_client() if "tls" in login else NatsClient()
        options: dict[str, Any] = dict(
            servers=self.opts.servers,
            name=f"edge-lstm-{self.opts.worker_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            error_cb=self._nats_error,  # one line each, not the library's traceback
            closed_cb=self._nats_closed,
            reconnected_cb=self._nats_reconnected,
            **login,
        )
        connecting = asyncio.ensure_future(client.connect(**options))
        ends = [asyncio.ensure_future(e.wait()) for e in (self.refused, self.stopping)]
        # nats-py retries a first connection as long as reconnects are allowed: bounded here,
        # and ended at once when the server refuses the credentials (tried again for good),
        # or by a SIGTERM.
        await asyncio.wait(
            [connecting, *ends], timeout=CONNECT_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        for end in ends:
            end.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.wait([connecting])
            if self.stopping.is_set():
                log.info("stopped before NATS was reached")
                return 0
            why = self.connect_error
            if self.refused.is_set():
                raise ConfigError(
                    f"NATS at {self.opts.shown()} refused the connection: {self.refusal}"
                )
            last = f" (last error: {why})" if why else ""
            raise ConfigError(f"cannot reach NATS at {self.opts.shown()}: timed out{last}")
        try:
            connecting.result()
            self.nc = client
            self.refusals = 0  # one server of several may have refused it
        except Exception as exc:
            raise ConfigError(
                f"cannot reach NATS at {self.opts.shown()}: {str(exc) or type(exc).__name__}"
            ) from exc
        info = getattr(self.nc, "_server_info", None) or {}
        if info and not info.get("jetstream"):
            raise ConfigError(
                f"nats-server at {self.nc.connected_url.netloc if self.nc.connected_url else '?'} "
                "has no JetStream: start it with -js (or a jetstream {} block)"
            )
        self.js = self.nc.jetstream()
        self.stored = StorePublisher(self.nc)
        await self.stored.start()
        deadline = time.monotonic() + READY_SECONDS
        while True:  # a cluster that is still electing its JetStream leaders says so: wait
            try:
                await self.ensure_resources()
                break
            except ConfigError:
                raise
            except Exception as exc:
                if getattr(exc, "err_code", None) == NOT_CLUSTERED:  # no waiting changes that
                    raise ConfigError(
                        f"replicas = {self.opts.replicas}: nats-server at {self.opts.shown()} "
                        "runs without a cluster (JetStream: replicas > 1 not supported in "
                        "non-clustered mode); use replicas = 1 there"
                    ) from exc
                if self.denied:  # the server drops what its permissions deny: no answer
                    raise ConfigError(
                        f"JetStream at {self.opts.shown()}: the server denies this worker's "
                        f"user what the worker needs ({self.denied}); allow it JetStream's "
                        "API and the subjects the worker uses"
                    ) from exc
                if time.monotonic() > deadline:
                    raise ConfigError(f"JetStream at {self.opts.shown()}: {exc}") from exc
                log.warning("JetStream not ready yet: %r", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
                if self.stopping.is_set():  # SIGTERM while waiting: nothing taken yet
                    log.info("stopped before JetStream was ready")
                    await self.nc.close()
                    return 0
        stream_config = (await self.js.stream_info(STREAM)).config
        self.limited = bool(_removing_limits(stream_config))
        store_config = (await self.js.stream_info(MQTT_STORE)).config
        largest = int(self.nc.max_payload)
        problem = sealed_problem(stream_config) or sealed_problem(store_config, store=True)
        problem = problem or retention_problem(stream_config) or discard_problem(stream_config)
        problem = problem or size_problem(stream_config, largest)
        problem = problem or store_discard_problem(store_config)
        problem = problem or store_size_problem(store_config, largest)
        if problem:
            raise ConfigError(problem)
        await self._refuse_foreign_snapshots()
        log.info(
            "worker %s: %d partitions, model %s",
            self.opts.worker_id,
            self.opts.partitions,
            self.model.manifest.model_id,
        )
        interval = self.opts.lease_seconds / 3
        renewing = asyncio.create_task(self._renew(), name="leases")
        last_stats = time.monotonic()
        try:
            while not self.stopping.is_set():
                try:
                    await self._find_mqtt_store()
                    await self._balance()
                    # written to without an answer; the MQTT listener's store, which it makes
                    # only when it starts, holds every device's QoS 1 publish before its PUBACK
                    stores = [f"KV_{ANSWERED}", f"OBJ_{SNAPSHOTS}"]
                    for name in stores + [MQTT_STORE] * self.mqtt_store:
                        await self.js.stream_info(name)
                    await self._check_discard()
                    await self._keep_lease_ttl()
                    if time.monotonic() - self.consumers_looked >= STALE_CONSUMER_SECONDS:
                        self.consumers_looked = time.monotonic()
                        await self._remove_stale_consumers()
                    # one worker of the group: the owner of partition 0
                    if 0 in self.owned and self._sweep_due():
                        self.swept = time.monotonic()
                        try:
                            await self._sweep_chunks()
                        except Exception as exc:  # (a chunk removed meanwhile) the next look
                            log.warning("snapshot store: looking for stray chunks: %r", exc)
                except ConfigError:  # the stream edited into one the workers cannot serve
                    raise
                except NotFoundError as exc:  # a bucket deleted (an operator's clean-up)
                    await self._make_again(exc)
                except Exception as exc:  # NATS unreachable for a moment: the leases say so
                    self._no_room(exc)
                    self.rounds_failed(str(exc))
                else:
                    self.rounds_failed.over()
                await self._say("online")  # every round: core NATS keeps no retained status
                now = time.monotonic()
                if self.opts.stats_interval and now - last_stats >= self.opts.stats_interval:
                    last_stats = now
                    await self._send(
                        f"edge.stats.{self.opts.worker_id}", self.metrics.dumps(self.stats())
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), interval)
            await self.release(list(self.owned.values()))
            renewing.cancel()
            with contextlib.suppress(Exception):
                await self.kv.delete(f"w.{self.opts.worker_id}")
            await self._say("offline")
            if self.failure is not None:  # said when it was found
                if not self.nc.is_connected:  # nothing could be handed over
                    log.warning("stopped, its partitions left to their leases' end: exit 1")
                else:
                    log.warning("stopped, its partitions handed over: exit 1")
                return 1
            log.info("stopped cleanly: %s", self.metrics.dumps(self.stats()).decode())
            return 0
        finally:
            for part in list(self.owned.values()):
                if part.task is not None:
                    part.task.cancel()
            try:
                await self.nc.drain()
            except Exception as exc:  # NATS away (a stop during an outage): nothing to drain to
                log.debug("drain: %r", exc)
                try:
                    await self.nc.close()
                except OSError as lost:  # the socket already gone: nothing to flush to
                    log.debug("close: %r", lost)

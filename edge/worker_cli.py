"""``edge-lstm worker``: arguments and start-up of a NATS JetStream worker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

from . import config, early_signals
from .errors import ConfigError, shown

WORKER_DESCRIPTION = """\
Join a group of workers that share the sensor streams of a NATS JetStream server or cluster:
every stream belongs to one of P partitions (a hash of its id), each partition is processed by
one live worker at a time, and a partition's state moves with it when a worker stops or dies.
Devices publish MQTT to NATS's MQTT listener (sensors/{stream}/data) or natively
(sensors.{stream}.data); answers come out on predictions/{stream} and errors/{stream}.

The processing keys of `serve` (reorder_ms, gap_policy, max_batch, ...) are read from the
TOML file (--config, top level or a [serve] table); the worker's own keys from its [worker]
table (nats, partitions, worker_id, lease_seconds, snapshot_interval, replicas,
stats_interval, nats_creds, nats_nkey, nats_token_file). As for serve, the processing keys are
also environment variables (EDGE_LSTM_REORDER_MS, ...): the command line wins over the
environment, which wins over the file. serve's keys of TLS and login (tls_ca, tls_cert,
tls_key, username, password_file) are the NATS server's: TLS is used where the server requires
it (a tls block in its configuration). Instead of a user and password, one of nats_creds (a
.creds file of a NATS account: user JWT and nkey seed), nats_nkey (an nkey seed file) or
nats_token_file (a file holding a token) logs in to NATS.
"""

WORKER_KEYS = {
    "nats": str,
    "partitions": int,
    "worker_id": str,
    "lease_seconds": float,
    "snapshot_interval": float,
    "replicas": int,
    "stats_interval": float,
    "nats_creds": str,
    "nats_nkey": str,
    "nats_token_file": str,
}


def add_worker_parser(sub: Any) -> None:
    w = sub.add_parser(
        "worker",
        help="run a worker on NATS JetStream (partitioned, with failover)",
        description=WORKER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument(
        "--model",
        metavar="BUNDLE",
        help="bundle directory made by lstm-convert (required, here or in --config)",
    )
    w.add_argument(
        "--nats",
        metavar="URL[,URL...]",
        help="NATS servers, e.g. nats://127.0.0.1:4222 (required, here or in --config)",
    )
    w.add_argument(
        "--partitions",
        type=int,
        metavar="P",
        help="partition count, fixed when the stream is created [default: 16]",
    )
    w.add_argument("--worker-id", metavar="ID", help="this worker's id [default: the host name]")
    w.add_argument("--config", metavar="FILE.toml", help="configuration file")
    w.add_argument("--state-dir", metavar="DIR", help="scratch directory of the partitions' logs")
    w.add_argument(
        "--lease-seconds",
        type=float,
        metavar="S",
        help="a dead worker's partitions move after this long [default: 3]",
    )
    w.add_argument(
        "--snapshot-interval",
        type=float,
        metavar="S",
        help="seconds between a partition's snapshots in JetStream [default: 5]",
    )
    w.add_argument(
        "--replicas", type=int, metavar="R", help="JetStream replicas (1, 3 or 5) [default: 1]"
    )
    w.add_argument(
        "--nats-creds",
        metavar="FILE",
        help="NATS credentials file (.creds: user JWT and nkey seed, as nsc writes it)",
    )
    w.add_argument("--nats-nkey", metavar="FILE", help="file holding an nkey user seed (SU...)")
    w.add_argument(
        "--nats-token-file",
        metavar="FILE",
        help="file holding the NATS token (never the token itself on the command line)",
    )
    w.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="[default: info]"
    )


def _worker_table(tables: dict[str, Any], path: str) -> dict[str, Any]:
    """The worker keys of the TOML file's ``tables``; its processing keys are
    ``config.load``'s to read."""
    worker = tables.get("worker", {})
    if not isinstance(worker, dict):
        raise ConfigError(f"{path}: [worker] must be a table")
    unknown = sorted(set(worker) - set(WORKER_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown [worker] key(s): {', '.join(unknown)}")
    for key, typ in WORKER_KEYS.items():
        if key in worker and (
            isinstance(worker[key], bool) or not isinstance(worker[key], (typ, int))
        ):
            raise ConfigError(
                f"{path}: [worker] {key} = {shown(worker[key])} is not a {typ.__name__}"
            )
    return dict(worker)


def worker(args: argparse.Namespace) -> int:
    early_signals.catch()  # SIGHUP is ignored from here on: a worker has nothing to reload
    from .nats_worker import Worker, WorkerOptions

    # read once: a file changed between two reads would give the worker two configurations
    tables = config.read_toml(Path(args.config)) if args.config else {}
    wk = _worker_table(tables, args.config) if args.config else {}
    for key in WORKER_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            wk[key] = value
    cli = {"model": args.model, "state_dir": args.state_dir, "log_level": args.log_level}
    # as for serve (the command line wins over the environment, which wins over the file),
    # and named as serve names them: a bad key of the file with the file's name
    cfg = config.load(args.config, overrides=cli, tables=tables)
    servers = [u.strip() for u in str(wk.get("nats") or "").split(",") if u.strip()]
    if not servers:
        raise ConfigError("nats is required (--nats nats://HOST:PORT[,...])")
    opts = WorkerOptions(
        servers=servers,
        worker_id=str(
            wk["worker_id"] if "worker_id" in wk else socket.gethostname().replace(".", "-")
        ),
        partitions=int(wk.get("partitions", 16)),
        lease_seconds=float(wk.get("lease_seconds", 3.0)),
        snapshot_interval=float(wk.get("snapshot_interval", 5.0)),
        replicas=int(wk.get("replicas", 1)),
        stats_interval=float(wk.get("stats_interval", cfg.stats_interval)),
        creds=str(wk.get("nats_creds", "")),
        nkey=str(wk.get("nats_nkey", "")),
        token_file=str(wk.get("nats_token_file", "")),
    )
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(Worker(cfg, opts).run())

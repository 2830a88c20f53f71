"""``edge-lstm serve``: arguments (generated from ``edge.config``) and start-up."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from . import config, early_signals
from .manifest import read_bundle

SERVE_DESCRIPTION = """\
Run the MQTT service: subscribe to sample topics, keep h/C per stream, publish a prediction
per message. Every option below is also a key of the TOML file (--config, top level or a
[serve] table) and an environment variable; the command line wins over the environment,
which wins over the file.
"""


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="run the MQTT service",
        description=SERVE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", metavar="FILE.toml", help="configuration file")
    config.add_arguments(s)


def serve(args: argparse.Namespace) -> int:
    early_signals.catch()
    overrides = {k: getattr(args, k) for k in config.FIELDS}
    cfg = config.load(args.config, overrides=overrides)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)  # e.g. a kernel-set mismatch accepted with "warn"
    # A bundle that cannot be read is refused before the state directory is made: a
    # mistyped --model would leave an empty one behind at every try.
    read_bundle(cfg.model)
    from .mqtt_loop import MqttService

    return MqttService(cfg).run()

"""``edge-lstm serve`` arguments (the service itself lives in ``edge.service``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the MQTT service (not built yet)")
    s.add_argument("--model", help="bundle directory")
    s.add_argument("--broker", help="mqtt://HOST:PORT")


def serve(args: argparse.Namespace) -> int:
    print("edge-lstm serve: the MQTT service is not built yet", file=sys.stderr)
    return 2

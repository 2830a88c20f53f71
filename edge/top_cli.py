"""The MQTT and terminal side of ``edge-lstm top`` (the view itself is ``edge.top``)."""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .config import broker_address
from .errors import ConfigError, shown
from .top import TopView, fit

CLEAR = "\033[H\033[2J"  # cursor home, clear screen: only on a terminal
MAX_BEHIND = 10_000  # messages waiting to be drawn; past this, a flood is dropped (counted)

Item = tuple[str | None, bytes | None]


class Inbox:
    """Messages from paho's network thread to the drawing one. Anyone may publish on the
    topics, faster than a terminal draws: past ``limit`` waiting they are dropped and
    counted (shown under the table), not kept without bound. A refusal (payload None) is
    never dropped."""

    def __init__(self, limit: int = MAX_BEHIND) -> None:
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self.limit = limit
        self.lock = threading.Lock()
        self.dropped = 0

    def put(self, item: Item) -> None:
        if item[1] is not None and self.queue.qsize() >= self.limit:
            with self.lock:
                self.dropped += 1
            return
        self.queue.put(item)

    def get(self, timeout: float) -> Item:
        return self.queue.get(timeout=timeout)

    def take_dropped(self) -> int:
        """How many were dropped since the last call."""
        with self.lock:
            n, self.dropped = self.dropped, 0
        return n


def _prefix(template: str, name: str) -> str:
    head, sep, tail = template.partition("{runtime_id}")
    if not sep or tail or not head.endswith("/") or any(c in head for c in "+#\0"):
        raise ConfigError(
            f"--{name} {shown(template)}: expected a topic ending in /{{runtime_id}}, no '+' or '#'"
        )
    return head


def _quiet_stdout(out: Any) -> None:
    """Point stdout at /dev/null after its reader went away: Python's flush at exit would
    fail on the closed pipe again and print a traceback."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def run_top(args: argparse.Namespace, out: Any = None) -> int:
    import paho.mqtt.client as paho

    mqtt: Any = paho
    out = out or sys.stdout
    transport, host, port = broker_address(args.broker, "--broker")
    if args.count < 0:
        raise ConfigError(f"--count {args.count}: must be >= 0")
    if not args.timeout >= 0:  # NaN too
        raise ConfigError(f"--timeout {args.timeout}: must be a number >= 0")
    rid = args.runtime_id
    if rid != "+" and (not rid or any(c in rid for c in "/+#\0")):
        raise ConfigError(
            f"--runtime-id {shown(rid)}: one topic level without '+' or '#', or + for all"
        )
    stats_prefix = _prefix(args.stats_topic, "stats-topic")
    status_prefix = _prefix(args.status_topic, "status-topic")
    view = TopView(stats_prefix, status_prefix)
    # (topic, payload); the topic None: not UTF-8, skipped; the payload None: the broker
    # refused the connection, or no broker answered it (the topic says why)
    inbox = Inbox()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"edge-lstm-top-{uuid.uuid4().hex[:8]}",
        transport=transport,
    )
    if args.password_file and not args.username:
        raise ConfigError("--password-file needs --username")
    if args.username:
        try:
            password = Path(args.password_file).read_text().strip() if args.password_file else None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--password-file {shown(args.password_file)}: {exc}") from None
        client.username_pw_set(args.username, password)
    if transport == "unix" and args.tls_ca:
        raise ConfigError(
            f"--broker {shown(args.broker)}: no TLS over a unix socket; leave --tls-ca out"
        )
    if args.tls_ca or args.broker.startswith("mqtts:"):
        try:
            client.tls_set(ca_certs=args.tls_ca or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--tls-ca {shown(args.tls_ca)}: not a usable CA certificate: {exc}"
            ) from None

    answered = threading.Event()  # a CONNACK came once: later drops are reconnected quietly

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            answered.set()
            c.subscribe([(stats_prefix + args.runtime_id, 0), (status_prefix + args.runtime_id, 0)])
        else:  # a wrong user name or password: paho would retry it for ever, silently
            inbox.put((f"the broker {args.broker} refused us: {reason}", None))

    def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not answered.is_set():  # no CONNACK: no MQTT broker there (another service on
            # that port, TLS without mqtts://), which paho would retry for ever, silently
            inbox.put(
                (
                    f"{args.broker} ended the connection without answering as an MQTT broker "
                    f"does ({reason}): is a broker listening there, with or without TLS?",
                    None,
                )
            )

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # an exception here would end paho's network thread
            topic = None
        inbox.put((topic, bytes(msg.payload)))

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        print(f"edge-lstm: error: cannot reach the broker {args.broker}: {exc}", file=sys.stderr)
        return 1
    client.loop_start()
    tty = out.isatty()
    updates, last = 0, time.monotonic()
    try:
        while not args.count or updates < args.count:
            try:
                topic, payload = inbox.get(timeout=0.5)
            except queue.Empty:
                if args.timeout and time.monotonic() - last > args.timeout:
                    said = (
                        f"no stats on {stats_prefix + args.runtime_id} from {args.broker}"
                        if answered.is_set()
                        else f"{args.broker} has not answered the connection as an MQTT broker does"
                    )
                    print(f"edge-lstm: {said} for {args.timeout:g} s", file=sys.stderr)
                    return 1
                continue
            for _ in range(inbox.take_dropped()):
                view.skip("while top was behind")
            if payload is None:
                print(f"edge-lstm: error: {topic}", file=sys.stderr)
                return 1
            if topic is None:
                view.skip("a topic that is not UTF-8")
                continue
            rid = view.update(topic, payload)
            if rid is None or not topic.startswith(stats_prefix):
                continue
            updates += 1
            last = time.monotonic()
            frame = view.render()
            try:
                if tty:  # redrawn in place: no more than the terminal holds
                    size = shutil.get_terminal_size()
                    frame = fit(frame, size.columns, size.lines - 2)
                    out.write(CLEAR + time.strftime("%H:%M:%S ") + args.broker + "\n" + frame)
                    out.write("\n")
                else:
                    out.write(frame + "\n\n")
                out.flush()
            except BrokenPipeError:  # `edge-lstm top | head`: the reader is done, so are we
                _quiet_stdout(out)
                return 0
    finally:
        client.loop_stop()
        client.disconnect()
    return 0

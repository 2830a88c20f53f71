"""The two JetStream exchanges the worker makes per message, without nats-py's per-message
tasks, futures and dataclasses.

``PullFeed``: a standing pull request on one consumer, messages taken as they arrive. nats-py's
``fetch`` costs a task, a timer and a uuid per message, and when nothing is waiting it holds its
request open until the whole batch is there or the timeout passes, so it must be called with
short timeouts, two requests each time, all the time (most of an idle worker's CPU). Here one
request per consumer stays outstanding: the server pushes each message to our inbox as it is
stored, a callback appends it, and ``take`` hands over whatever has arrived. A new request goes
out when the previous one is used up, expired, refused, or has not been heard of for longer than
it could live (a request lost with a server that went away).

``StorePublisher``: stored publishes in batches (below).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import TransportError, shown

log = logging.getLogger("edge.worker")

EXPIRES = 5.0  # seconds a pull request lives on the server
BACKOFF = 0.2  # after a refusal (consumer deleted, leadership change): do not spin


class PullFeed:
    def __init__(self, nc: Any, stream: str, durable: str, batch: int) -> None:
        self.nc, self.batch = nc, batch
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox: str = nc.new_inbox()
        self._sub: Any = None
        self._arrived: list[Any] = []
        self._ready = asyncio.Event()
        self._left = 0  # messages the outstanding request may still bring
        self._sent = 0.0  # when it was sent
        self._refused = 0.0  # when the server last refused a request
        self.refusals = 0  # refused requests since the last message: the consumer may be gone
        self.refusal = ""  # the last refusal's status and description, for the log

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def wake(self) -> None:
        """End a ``take`` that is waiting (the partition is being stopped)."""
        self._ready.set()

    async def _on(self, msg: Any) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._arrived.append(msg)
            self._left -= 1
            self.refusals = 0
        elif status != "100":  # 408 expired, 409 refused (...), 404: this request is over
            self._left = 0
            if status != "408":
                self._refused = time.monotonic()
                self.refusals += 1
                self.refusal = f"{status} {msg.headers.get('Description', '')}".strip()
                log.debug("pull request on %s: %s %s", self.subject, status, msg.headers)
        else:
            return  # an idle heartbeat
        self._ready.set()

    async def _request(self) -> None:
        body = {"batch": self.batch, "expires": int(EXPIRES * 1e9)}
        await self.nc.publish(self.subject, json.dumps(body).encode(), reply=self.inbox)
        self._left, self._sent = self.batch, time.monotonic()

    async def take(self, wait: float, allowed: Callable[[], bool] | None = None) -> list[Any]:
        """What has arrived, waiting up to ``wait`` seconds for the first message. A new pull
        request goes out only while ``allowed()`` says so (the partition's lease is held): the
        consumer of that name may be a new owner's, whose messages a request would take."""
        now = time.monotonic()
        if self._left <= 0 or now - self._sent > EXPIRES + 2.0:
            if now - self._refused < BACKOFF:
                await asyncio.sleep(BACKOFF)
            if allowed is not None and not allowed():
                msgs, self._arrived = self._arrived, []
                return msgs
            await self._request()
        if not self._arrived:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)
        self._ready.clear()
        msgs, self._arrived = self._arrived, []
        return msgs


@dataclass(eq=False)
class _Batch:
    left: int
    duplicate: list[bool]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


class StorePublisher:
    """Stored publishes in batches, their acknowledgements read by one subscription.

    nats-py's ``publish_async`` costs a future, a semaphore, a random token and a parsed
    ``PubAck`` dataclass per message; here a batch waits for one event, and an acknowledgement
    is only parsed for the ``duplicate`` flag (JetStream's duplicate window saw the message
    id before) or an error."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox() + "."
        self._batches: dict[int, _Batch] = {}
        self._next = 0

    async def start(self) -> None:
        await self.nc.subscribe(self.prefix + "*.*", cb=self._on)

    async def _on(self, msg: Any) -> None:
        n, _, i = msg.subject[len(self.prefix) :].partition(".")
        ours = n.isdecimal() and i.isdecimal() and len(n) + len(i) < 40  # (else not our reply)
        batch = self._batches.get(int(n)) if ours else None
        if batch is None or batch.done.is_set():
            return  # late: its batch gave up waiting (it is sent again)
        status = msg.headers.get("Status") if msg.headers else None
        data = msg.data
        if status is not None:  # 503: no stream takes this subject (or none has a leader)
            batch.error = f"status {status} {msg.headers.get('Description', '')}".strip()
        elif data.startswith(b'{"error"'):
            batch.error = data.decode(errors="replace")
        elif int(i) >= len(batch.duplicate):
            return  # not one we sent
        elif b'"duplicate"' in data:  # parsed only when it may say so (rare)
            try:  # nats-server writes `"duplicate": true`
                batch.duplicate[int(i)] = json.loads(data).get("duplicate") is True
            except (ValueError, AttributeError, RecursionError):
                batch.error = f"acknowledgement {shown(data)} unreadable"
        batch.left -= 1
        if batch.left <= 0 or batch.error:
            batch.done.set()

    async def publish(
        self, items: list[tuple[str, bytes, dict[str, str]]], timeout: float
    ) -> list[bool]:
        """Store every (subject, payload, headers); for each, whether it was a duplicate.
        Raises ``TransportError`` (refused) or ``asyncio.TimeoutError`` (not all answered)."""
        n = self._next
        self._next += 1
        batch = _Batch(len(items), [False] * len(items))
        self._batches[n] = batch
        try:
            for i, (subject, payload, headers) in enumerate(items):
                await self.nc.publish(
                    subject, payload, reply=f"{self.prefix}{n}.{i}", headers=headers
                )
            await asyncio.wait_for(batch.done.wait(), timeout)
        finally:
            del self._batches[n]
        if batch.error:
            raise TransportError(batch.error)
        return batch.duplicate

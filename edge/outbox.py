"""Answers on their way to the broker, and how far all of them have been acknowledged.

Every answer carries the log sequence number (lsn) of the message it answers. The transport
publishes what ``take`` hands it, within a window of unacknowledged messages (paho refuses new
publishes past 65,535 outstanding and says so only in a return code), reports each publish's
message id with ``sent`` (or hands the answer back with ``retry``) and each broker
acknowledgement with ``acked``. ``watermark`` is the highest lsn up to which every answer was
acknowledged: the service logs it, so that after a crash only answers above it are published
again. Pure logic: no paho, no clock.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)  # made per message: not frozen, whose __init__ costs 5x
class Outbound:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    lsn: int = 0  # of the message answered; 0 for messages that answer nothing (status)


class Outbox:
    def __init__(self, window: int = 10_000) -> None:
        self.window = window
        self._queue: deque[Outbound] = deque()  # not yet handed to the transport
        self._sent: dict[int, Outbound] = {}  # message id -> answer awaiting its PUBACK
        self._open: Counter[int] = Counter()  # lsn -> answers not yet acknowledged
        self._heap: list[int] = []  # lsns with open answers (lazy deletion)
        self.refused = 0  # acknowledged by the broker with a failure reason code
        self.open_bytes = 0  # topics and payloads of the answers a checkpoint carries over

    def __len__(self) -> int:
        """Answers not yet acknowledged: queued, in flight, or handed back for a retry."""
        return len(self._queue) + len(self._sent)

    @property
    def in_flight(self) -> int:
        return len(self._sent)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def put(self, outs: Iterable[Outbound]) -> None:
        for o in outs:
            if o.qos and o.lsn:
                if not self._open[o.lsn]:
                    heapq.heappush(self._heap, o.lsn)
                self._open[o.lsn] += 1
                self.open_bytes += len(o.topic) + len(o.payload)
            self._queue.append(o)

    def take(self) -> list[Outbound]:
        """As many queued answers as the window allows, oldest first."""
        n = min(len(self._queue), max(0, self.window - len(self._sent)))
        return [self._queue.popleft() for _ in range(n)]

    def sent(self, mid: int, out: Outbound) -> None:
        if out.qos:
            self._sent[mid] = out
        else:
            self.discard(out)

    def retry(self, outs: Iterable[Outbound]) -> None:
        """Answers the transport could not hand to its client: first in line again."""
        self._queue.extendleft(reversed(list(outs)))

    def replace(self, old: Outbound, new: Outbound) -> None:
        """``new`` (taken already, same lsn) goes out in place of ``old``."""
        if old.qos and old.lsn:
            self.open_bytes += len(new.topic) + len(new.payload) - len(old.topic) - len(old.payload)

    def acked(self, mid: int, failed: bool = False) -> Outbound | None:
        """The answer the broker acknowledged (or refused), None when ``mid`` is none of ours."""
        out = self._sent.pop(mid, None)
        if out is None:
            return None
        self.refused += failed
        self.discard(out)
        return out

    def discard(self, out: Outbound) -> None:
        """An answer that is done with (acknowledged, or one that can never be sent)."""
        if out.qos and out.lsn:
            self.open_bytes -= len(out.topic) + len(out.payload)
            self._open[out.lsn] -= 1
            if not self._open[out.lsn]:
                del self._open[out.lsn]

    def watermark(self, last_lsn: int, held_from: int | None = None) -> int:
        """Highest lsn <= ``last_lsn`` with every answer up to it acknowledged; messages from
        ``held_from`` on are still held (their answers are yet to come)."""
        while self._heap and self._heap[0] not in self._open:
            heapq.heappop(self._heap)
        if len(self._heap) > 2 * len(self._open) + 1024:  # an old answer still open: compact
            self._heap = sorted(self._open)
        mark = self._heap[0] - 1 if self._heap else last_lsn
        if held_from is not None:
            mark = min(mark, held_from - 1)
        return mark

    def unacknowledged(self) -> list[Outbound]:
        """Every answer not yet acknowledged, in lsn order (what a checkpoint carries over)."""
        return sorted([*self._sent.values(), *self._queue], key=lambda o: o.lsn)

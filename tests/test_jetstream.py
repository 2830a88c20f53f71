"""``edge.jetstream``'s lean pull and stored-publish exchanges against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.errors import TransportError
from edge.jetstream import PullFeed, StorePublisher
from tests.nats_helpers import NatsServer

pytestmark = [pytest.mark.broker]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path / "nats").start()
    yield s
    s.stop()


async def _connect(url: str) -> tuple[Any, Any]:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="T", subjects=["t.>"]))
    return nc, js


def test_store_publisher_says_which_ids_the_stream_had_seen(nats_server: NatsServer) -> None:
    async def run() -> None:
        nc, js = await _connect(nats_server.url)
        pub = StorePublisher(nc)
        await pub.start()
        items = [(f"t.{i}", b"x", {"Nats-Msg-Id": f"id-{i}"}) for i in range(50)]
        assert await pub.publish(items, 10) == [False] * 50
        again = [items[3], ("t.new", b"y", {"Nats-Msg-Id": "id-new"}), items[49]]
        assert await pub.publish(again, 10) == [True, False, True]
        assert (await js.stream_info("T")).state.messages == 51
        with pytest.raises(TransportError, match="503"):  # no stream takes the subject
            await pub.publish([("nowhere.x", b"z", {})], 10)
        await nc.close()

    asyncio.run(run())


def test_pull_feed_hands_over_what_arrived_and_waits_when_nothing_did(
    nats_server: NatsServer,
) -> None:
    async def run() -> None:
        from nats.js import api

        nc, js = await _connect(nats_server.url)
        await js.add_consumer(
            "T", api.ConsumerConfig(durable_name="c", ack_policy=api.AckPolicy.ALL)
        )
        feed = PullFeed(nc, "T", "c", batch=4)
        await feed.start()
        assert await feed.take(0.2) == []  # nothing stored: waited, and no error
        for i in range(10):
            await js.publish(f"t.{i}", str(i).encode())
        got: list[Any] = []
        for _ in range(200):  # each take returns what arrived; batch 4 needs 3 requests
            got += await feed.take(0.5)
            if len(got) >= 10:
                break
        assert [m.data for m in got] == [str(i).encode() for i in range(10)]
        await got[-1].ack()
        # the consumer deleted under the feed (a new owner re-created it): refused requests
        # are retried after a pause, and a re-created consumer is read again
        await js.delete_consumer("T", "c")
        assert await feed.take(0.3) == []
        await js.add_consumer(
            "T",
            api.ConsumerConfig(
                durable_name="c",
                ack_policy=api.AckPolicy.ALL,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=10,
            ),
        )
        for _ in range(200):
            again = await feed.take(0.5)
            if again:
                break
        assert [m.data for m in again] == [b"9"]
        await feed.stop()
        await nc.close()

    asyncio.run(run())

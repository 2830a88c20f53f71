"""What a kill -9 of the sensor stream's leader node does to devices' MQTT QoS 1 publishes.

    .venv/bin/python -m bench.nats_node_loss [--messages N]

A 3-node cluster (R3 everywhere, the listener's stores too), the worker's resources created as
a worker does; one paho device on a node that survives publishes N QoS 1 messages at a steady
pace and the leader's node is killed a third of the way in. Counted afterwards: publishes the
listener acknowledged, and which of them the stream holds as a live copy (the listener's core
publish), as a copy from the listener's store ($MQTT_msgs, the stream's source), or neither.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nats
import paho.mqtt.client as mqtt

from edge.mqtt_loop import delivered
from edge.nats_worker import STREAM, WorkerOptions, ensure_resources
from edge.partitions import SOURCE_HEADER
from tests.nats_helpers import NatsServer, start_cluster


async def measure(nodes: list[NatsServer], n: int) -> dict[str, object]:
    urls = [x.url for x in nodes]
    nc = await nats.connect(servers=urls)
    js = nc.jetstream()
    deadline = time.monotonic() + 120
    while True:  # the cluster elects its JetStream leaders first
        try:
            await ensure_resources(js, WorkerOptions(urls, "bench", partitions=8, replicas=3))
            leader = (await js.stream_info(STREAM)).cluster.leader
            if leader:
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)
    victim = next(x for x in nodes if x.name == leader)
    dev = next(x for x in nodes if x is not victim)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev", clean_session=False)
    c.max_inflight_messages_set(200)
    c.connect("127.0.0.1", dev.mqtt_port)
    c.loop_start()
    await asyncio.sleep(1)
    infos, sent_at, killed_at = [], [], 0.0
    for i in range(n):
        body = json.dumps({"seq": i // 10 + 1, "values": [0] * 6})
        infos.append(c.publish(f"sensors/d{i % 10}/data", body, qos=1))
        sent_at.append(time.monotonic())
        if i == n // 3:
            killed_at = time.monotonic()
            victim.kill()
        await asyncio.sleep(0.004)
    t0 = time.monotonic()
    while not all(delivered(x) for x in infos) and time.monotonic() - t0 < 120:
        await asyncio.sleep(0.1)
    acked = [i for i, x in enumerate(infos) if delivered(x)]
    live: set[tuple[str, int]] = set()
    copied: set[tuple[str, int]] = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:  # until the copies from the store stop coming
        try:
            total = (await js.stream_info(STREAM)).state.messages
            await asyncio.sleep(3)
            if (await js.stream_info(STREAM)).state.messages == total:
                break
        except Exception:
            await asyncio.sleep(1)
    sub = await js.subscribe("in.>", stream=STREAM, ordered_consumer=True)
    for _ in range(total):
        m = await sub.next_msg(10)
        key = (m.subject.split(".")[2], json.loads(m.data)["seq"])
        (copied if SOURCE_HEADER in (m.headers or {}) else live).add(key)
    await nc.close()
    c.loop_stop()
    keys = [(f"d{i % 10}", i // 10 + 1) for i in range(n)]
    lost_live = [i for i in acked if keys[i] not in live]
    window = [sent_at[i] - killed_at for i in lost_live]
    return {
        "publishes": n,
        "acknowledged": len(acked),
        "acknowledged_without_live_copy": len(lost_live),
        "live_copies_lost_from_s_after_kill": round(min(window), 2) if window else None,
        "live_copies_lost_until_s_after_kill": round(max(window), 2) if window else None,
        "acknowledged_without_copy_from_store": sum(keys[i] not in copied for i in acked),
        "acknowledged_in_neither": sum(
            keys[i] not in copied and keys[i] not in live for i in acked
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nats-node-loss-"))
    nodes = start_cluster(root)
    try:
        print(json.dumps(asyncio.run(measure(nodes, args.messages)), indent=2))
    finally:
        for x in nodes:
            x.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

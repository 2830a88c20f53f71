"""When is a device's MQTT QoS 1 publish to NATS's MQTT listener stored in JetStream?

    .venv/bin/python -m bench.nats_puback

Publishes one message at a time (paho, QoS 1, waiting for each PUBACK) and reads the stream's
message count just before and right after: how often the message was already stored when the
PUBACK arrived; then a QoS 1 publish to a subject no stream captures.
"""

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nats
import paho.mqtt.client as mqtt

from edge.nats_worker import STREAM, WorkerOptions, ensure_resources
from tests.nats_helpers import NatsServer


async def measure(srv: NatsServer) -> None:
    nc = await nats.connect(srv.url)
    js = nc.jetstream()
    await ensure_resources(js, WorkerOptions([srv.url], "x"))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev")
    c.connect("127.0.0.1", srv.mqtt_port)
    c.loop_start()
    stored_at_ack = 0
    N = 300
    lat = []
    for i in range(N):
        before = (await js.stream_info(STREAM)).state.messages
        t0 = time.perf_counter()
        info = c.publish(
            f"sensors/d{i % 7}/data", json.dumps({"seq": i + 1, "values": [0] * 6}), qos=1
        )
        info.wait_for_publish(5)
        lat.append(time.perf_counter() - t0)
        after = (await js.stream_info(STREAM)).state.messages
        stored_at_ack += after == before + 1
    lat.sort()
    print(
        json.dumps(
            {
                "publishes": N,
                "stored_when_puback_arrived": stored_at_ack,
                "puback_ms_p50": lat[N // 2] * 1000,
                "puback_ms_p99": lat[int(N * 0.99)] * 1000,
            }
        )
    )
    # no stream capturing the subject: is the publish still acknowledged?
    info = c.publish("nostream/x", b"1", qos=1)
    info.wait_for_publish(5)
    print("puback without a capturing stream:", info.is_published())
    c.loop_stop()
    await nc.close()


def main() -> int:
    import tempfile

    srv = NatsServer(Path(tempfile.mkdtemp()) / "nats").start()
    try:
        asyncio.run(measure(srv))
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

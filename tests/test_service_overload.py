"""The overload policies of the MQTT callback: pure queue logic, no broker involved."""

import threading
from dataclasses import dataclass

from edge import config
from edge.mqtt_loop import MqttService


@dataclass
class Msg:
    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    properties: object = None


def service(bundles, tmp_path, **overrides):
    cfg = config.load(
        None,
        env={},
        overrides={
            "model": str(bundles / "clf-int8"),
            "broker": "mqtt://127.0.0.1:1",
            "state_dir": str(tmp_path / "state"),
            "queue_size": 2,
            **overrides,
        },
    )
    svc = MqttService(cfg)
    acked = []
    svc.client.ack = lambda mid, qos: acked.append(mid)
    return svc, acked


def test_drop_oldest_keeps_the_newest_and_counts(bundles, tmp_path):
    svc, acked = service(bundles, tmp_path, overload="drop-oldest")
    for mid in range(1, 6):
        svc._on_message(None, None, Msg("sensors/a/data", b"{}", mid))
    assert [svc.queue.get_nowait().mid for _ in range(2)] == [4, 5]
    assert acked == [1, 2, 3]  # given up on: acknowledged so the broker does not resend
    assert svc.metrics.counters["dropped_overload"] == 3
    svc.wal.close()


def test_block_waits_for_room_and_never_drops(bundles, tmp_path):
    svc, acked = service(bundles, tmp_path, overload="block")
    for mid in (1, 2):
        svc._on_message(None, None, Msg("sensors/a/data", b"{}", mid))
    done = threading.Event()
    t = threading.Thread(
        target=lambda: (svc._on_message(None, None, Msg("sensors/a/data", b"{}", 3)), done.set())
    )
    t.start()
    assert not done.wait(0.3)  # the network thread is held: the broker keeps the rest
    assert svc.queue.get_nowait().mid == 1
    assert done.wait(2)
    t.join()
    assert [svc.queue.get_nowait().mid for _ in range(2)] == [2, 3]
    assert acked == [] and svc.metrics.counters["dropped_overload"] == 0
    svc.wal.close()

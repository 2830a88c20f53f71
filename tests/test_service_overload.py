"""The paho callbacks never block, whatever the backlog: the broker keeps it, not us."""

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
    dup: bool = False


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
    return MqttService(cfg)


def test_on_message_only_appends_and_leaves_a_flood_to_the_broker(bundles, tmp_path):
    svc = service(bundles, tmp_path)  # queue_size 2: the broker may send 2 unacknowledged
    for mid in range(1, 20001):  # a broker ignoring Receive Maximum
        svc._on_message(None, None, Msg("sensors/a/data", b"{}", mid, dup=mid % 2 == 0))
    # Twice the Receive Maximum is taken; the rest stays unacknowledged, the broker's.
    assert [m.mid for m in svc.inbox] == [1, 2, 3, 4] and svc.wake.is_set()
    assert (svc.inbox[0].redelivered, svc.inbox[1].redelivered) == (False, True)
    assert svc.shedding and svc.shed == 19996
    svc.inbox.popleft()  # room again, but nothing may overtake what was left to the broker
    svc._on_message(None, None, Msg("sensors/a/data", b"{}", 20001))
    assert len(svc.inbox) == 3 and svc.shed == 19997
    svc.processor.journal.close()


def test_drop_oldest_takes_only_the_newest(bundles, tmp_path):
    svc = service(bundles, tmp_path, overload="drop-oldest")
    for mid in range(1, 6):
        svc._on_message(None, None, Msg("sensors/a/data", b"{}", mid))
    dropped, batch = svc._take()
    assert [m.mid for m in dropped] == [1, 2, 3] and [m.mid for m in batch] == [4, 5]
    svc.processor.journal.close()

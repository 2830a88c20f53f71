"""Does the broker keep to the Receive Maximum a subscriber asks for?

    .venv/bin/python -m bench.broker_flow [--receive-maximum 1000] [--messages 60000]

The runtime relies on the broker to hold a backlog (MQTT 5 Receive Maximum; for 3.1.1 the
broker's ``max_inflight_messages``). This starts a local Mosquitto, floods a manually
acknowledging subscriber from three publishers, and has the subscriber acknowledge in
batches with a one-second pause every 2,000 messages (as the runtime does while its answers
wait for PUBACKs). It reports the most messages the subscriber ever held unacknowledged,
against the limit it asked for, for MQTT 5 and for 3.1.1 with ``max_inflight_messages``.
Mosquitto 2.0.11 (Debian 12) keeps the limit until it has queued messages for the client,
and not after.

Exit code 0 when the broker kept to the limit in every case, 1 when it did not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware_sim.broker import Broker

from ._common import log


def flood(url: str, protocol: str, limit: int, messages: int) -> int:
    """The most messages held unacknowledged by one subscriber at any time."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    held: deque[int] = deque()
    peak = [0]

    def on_message(c: Any, u: Any, m: Any) -> None:
        held.append(m.mid)
        peak[0] = max(peak[0], len(held))

    v5 = protocol == "5"
    sub = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"flow-sub-{protocol}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=True,
    )
    sub.on_message = on_message
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = limit
        props.SessionExpiryInterval = 3600
        sub.connect(host, int(port), 60, clean_start=False, properties=props)
    else:
        sub.connect(host, int(port), 60)
    sub.loop_start()
    sub.subscribe(f"flow/{protocol}/#", 1)
    time.sleep(0.5)
    per = messages // 3

    def publisher(k: int) -> None:
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"flow-pub-{protocol}-{k}")
        pub.max_inflight_messages_set(0)
        pub.connect(host, int(port), 60)
        pub.loop_start()
        infos = [pub.publish(f"flow/{protocol}/{k}/{i}", b"x" * 50, qos=1) for i in range(per)]
        for info in infos:
            info.wait_for_publish(60)
        pub.loop_stop()
        pub.disconnect()

    threads = [threading.Thread(target=publisher, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    done, deadline = 0, time.monotonic() + 180
    while done < 3 * per and time.monotonic() < deadline:
        batch = [held.popleft() for _ in range(min(len(held), 100))]
        time.sleep(0.003)
        if done and done % 2000 < len(batch):
            time.sleep(1.0)  # acknowledgements pause, reading goes on
        for mid in batch:
            sub.ack(mid, 1)
        done += len(batch)
    sub.loop_stop()
    sub.disconnect()
    return peak[0]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.broker_flow", description=__doc__)
    ap.add_argument("--receive-maximum", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=60000)
    args = ap.parse_args()
    if not 1 <= args.receive_maximum <= 65535 or args.messages < 3:
        print("need 1 <= --receive-maximum <= 65535 and --messages >= 3", file=sys.stderr)
        return 2
    kept = True
    for protocol in ("5", "3.1.1"):
        work = Path(tempfile.mkdtemp(prefix="broker-flow-"))
        # the broker-side limit is the only one 3.1.1 has (the later line overrides "0")
        extra = f"max_inflight_messages {args.receive_maximum}\n" if protocol == "3.1.1" else ""
        broker = Broker(work, embedded=False, extra=extra)
        broker.start()
        try:
            peak = flood(broker.url, protocol, args.receive_maximum, args.messages)
        finally:
            broker.stop()
        ok = peak <= args.receive_maximum
        kept &= ok
        what = "Receive Maximum" if protocol == "5" else "max_inflight_messages"
        log(
            f"MQTT {protocol}: {what} {args.receive_maximum:,}, most held unacknowledged "
            f"{peak:,} ({'kept' if ok else 'NOT kept'})"
        )
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())

"""Home Assistant MQTT discovery: each stream's prediction appears as a sensor.

With ``ha_discovery = true`` the service publishes one retained discovery message per sensor
(``{prefix}/sensor/{node}/{object}/config``): for a classifier the predicted label and its
probability (percent), for a regressor one sensor per output value. Home Assistant reads the
state from the prediction topic with a value template and the availability from the retained
status topic. A stream that is evicted (least recently used past ``capacity``, or idle past
``idle_timeout``) has its sensors removed with an empty retained message, as the discovery
protocol has it. So are the sensors a previous run left retained under this runtime's node
that this one does not hold (streams evicted or outputs changed while it was down, or a
removal cut off by a crash): the transport reads them back at each connect (``filter``).
New sensors are announced ``PER_ROUND`` streams a round (a second) at most: after a broker
lost them all, thousands at once were a burst of megabytes ahead of every prediction. Removals
go out as many streams' worth a round, in their order: thousands of streams forgotten at once,
or a ``reload`` that changes every stream's sensors, were as long a burst.

Pure logic: ``Announcer.reconcile`` turns the set of live streams into the messages to publish;
the transport publishes them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._version import __version__
from .config import ServiceConfig
from .manifest import Manifest

_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
# Streams announced per ``reconcile`` of the service (once a second): the discovery messages
# of thousands of streams at once (about 1.6 kB a stream, after a broker lost them) were
# megabytes in one burst, beyond the broker's queue and ahead of every prediction.
PER_ROUND = 100

# Templates tolerate both prediction shapes: one sample (y: [O], label: str, p: float) and
# several samples in one message (y: [[O], ...], label: [str], p: [float]); the last counts.
LABEL_TEMPLATE = "{{ value_json.label if value_json.label is string else value_json.label | last }}"
P_TEMPLATE = (
    "{{ ((value_json.p if value_json.p is number else value_json.p | last) * 100) | round(1) }}"
)
Y_TEMPLATE = "{{{{ (value_json.y if value_json.y[0] is number else value_json.y | last)[{i}] }}}}"

ATTRIBUTES_TEMPLATE = "{{ {'seq': value_json.seq, 'model': value_json.model} | tojson }}"


def object_id(text: str) -> str:
    """A discovery topic level: only ``[a-zA-Z0-9_-]``. Other characters become ``_``, and a
    short hash of ``text`` is appended then, so that ``dev.1`` and ``dev_1`` (both valid
    stream ids) never share a sensor."""
    safe = _UNSAFE.sub("_", text)
    if safe == text:
        return text
    return f"{safe}_{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Discovery:
    topic: str
    payload: bytes  # empty: remove the sensor


def sensor_configs(
    stream: str,
    manifest: Manifest,
    *,
    runtime_id: str,
    prediction_topic: str,
    status_topic: str,
    prefix: str = "homeassistant",
) -> list[tuple[str, dict[str, object]]]:
    """(discovery topic, config) of every sensor of one stream."""
    node = object_id(runtime_id)
    base = object_id(stream)
    # Nothing of one model beyond its sensors (the model id is each prediction's ``model``
    # attribute): a reload that keeps them changes no discovery message, and no stream shows
    # the old model while it waits for its paced announcement.
    device = {
        "identifiers": [f"edge-lstm-{node}-{base}"],
        "name": stream,
        "model": f"edge-lstm {manifest.output_kind}",
        "manufacturer": "edge-lstm",
        "sw_version": __version__,
    }
    common: dict[str, object] = {
        "state_topic": prediction_topic,
        "availability": [
            {
                "topic": status_topic,
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "json_attributes_topic": prediction_topic,
        "json_attributes_template": ATTRIBUTES_TEMPLATE,
        "device": device,
        "origin": {"name": "edge-lstm", "sw_version": __version__},
        "qos": 1,
    }
    sensors: list[tuple[str, dict[str, object]]] = []
    if manifest.output_kind == "classifier" and manifest.labels:
        sensors.append(
            (
                "label",
                {
                    "name": "prediction",
                    "value_template": LABEL_TEMPLATE,
                    "icon": "mdi:label-outline",
                },
            )
        )
        sensors.append(
            (
                "probability",
                {
                    "name": "probability",
                    "value_template": P_TEMPLATE,
                    "unit_of_measurement": "%",
                    "state_class": "measurement",
                    "suggested_display_precision": 1,
                },
            )
        )
    else:
        for i in range(manifest.outputs):
            sensors.append(
                (
                    f"y{i}",
                    {
                        "name": f"y{i}" if manifest.outputs > 1 else "value",
                        "value_template": Y_TEMPLATE.format(i=i),
                        "state_class": "measurement",
                    },
                )
            )
    out = []
    for suffix, extra in sensors:
        uid = f"edge-lstm-{node}-{base}-{suffix}"
        topic = f"{prefix}/sensor/{node}/{base}_{suffix}/config"
        out.append((topic, {**common, **extra, "unique_id": uid}))
    return out


class Announcer:
    """Keeps Home Assistant's sensors in step with the service's live streams."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        runtime_id: str,
        prediction_template: str,
        status_topic: str,
        prefix: str = "homeassistant",
        per_round: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.per_round = per_round  # streams announced per reconcile at most (None: all)
        self.waiting = 0  # live streams left to announce by the last reconcile
        self.removing: dict[str, None] = {}  # topics to remove, in order, paced as announcements
        self.runtime_id = runtime_id
        self.prediction_template = prediction_template
        self.status_topic = status_topic
        self.prefix = prefix
        self.announced: dict[str, list[str]] = {}  # stream -> its discovery topics
        self.unsent: set[str] = set()  # streams a discovery message of was not sent
        self.again: set[str] = set()  # streams announced again at the next reconcile

    def _configs(self, stream: str) -> list[tuple[str, dict[str, object]]]:
        return sensor_configs(
            stream,
            self.manifest,
            runtime_id=self.runtime_id,
            prediction_topic=self.prediction_template.replace("{stream}", stream),
            status_topic=self.status_topic,
            prefix=self.prefix,
        )

    @property
    def filter(self) -> str:
        """The topic filter of every sensor this runtime can have announced."""
        return f"{self.prefix}/sensor/{object_id(self.runtime_id)}/+/config"

    @property
    def filters(self) -> list[str]:
        """``filter``, and the filter of the node edge-lstm 0.1.0 named this runtime's id as
        when that differs (``_`` for the characters a topic level cannot hold, no hash): the
        sensors it left retained there are read back too, else they stayed in Home Assistant
        beside the new ones after an upgrade, every stream twice."""
        earlier = f"{self.prefix}/sensor/{_UNSAFE.sub('_', self.runtime_id)}/+/config"
        return [self.filter] if earlier == self.filter else [self.filter, earlier]

    def ours(self, topic: str, payload: bytes) -> bool:
        """Whether a retained sensor read back (under one of ``filters``) is this runtime's:
        any under its node; under 0.1.0's name for it, which another runtime's id can be
        (``edge.test`` was ``edge_test``), only one available with this runtime's status."""
        if topic.startswith(self.filter.removesuffix("+/config")):
            return True
        try:
            doc = json.loads(payload)
            return any(a.get("topic") == self.status_topic for a in doc["availability"])
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return False

    def reconcile(self, streams: Iterable[str], found: Iterable[str] = ()) -> list[Discovery]:
        """Discovery messages for streams new since the last call (``per_round`` of them at
        most: the others at the next calls, ``waiting`` says how many), removals for streams
        gone and for the ``found`` topics (retained sensors read back from the broker) that no
        stream held now has. Call it with every stream the service holds state for."""
        live = set(streams)
        for stream in sorted(set(self.announced) - live):
            self._remove(self.announced.pop(stream))
            self.unsent.discard(stream)  # gone: nothing to send again (a fleet churns for months)
        fresh = sorted(live - set(self.announced) | (live & self.again))
        cut = len(fresh) if self.per_round is None else self.per_round
        now, later = fresh[:cut], fresh[cut:]
        self.again &= set(later)
        self.waiting = len(later)
        if found := set(found):  # a stream still to be announced keeps its sensors meanwhile
            mine = {t for topics in self.announced.values() for t in topics}
            mine.update(t for s in now + later for t, _ in self._configs(s))
            self._remove(sorted(found - mine))
        announced: list[Discovery] = []
        for stream in now:
            configs = self._configs(stream)
            self.announced[stream] = [t for t, _ in configs]
            for topic, config in configs:
                self.removing.pop(topic, None)  # back before its removal went out
                announced.append(Discovery(topic, json.dumps(config).encode()))
        return self.removals() + announced

    def _remove(self, topics: Iterable[str]) -> None:
        """Queue the removal of ``topics`` (sent by ``reconcile``, paced)."""
        self.removing.update(dict.fromkeys(topics))

    def removals(self) -> list[Discovery]:
        """The next queued removals: ``per_round`` streams' worth of sensors at most (a round
        of ``reconcile``'s; also sent alone as the service stops)."""
        cut = len(self.removing)
        if self.per_round is not None:
            cut = self.per_round * max(1, len(self._configs("-")))
        topics = list(self.removing)[:cut]
        for topic in topics:
            del self.removing[topic]
        return [Discovery(t, b"") for t in topics]

    def not_sent(self, topics: Iterable[str]) -> list[str]:
        """The discovery messages of ``topics`` were not sent (over the broker's maximum
        packet size): their streams are announced again after the next connection, maybe to
        a broker that takes them. Returns those streams."""
        lost = set(topics)
        streams = sorted(s for s, ts in self.announced.items() if lost & set(ts))
        self.unsent.update(streams)
        return streams

    def reconnected(self, everything: bool) -> None:
        """A new connection: the streams whose messages were not sent are announced again at
        the next reconcile, and every stream when ``everything`` (the broker kept no session
        for us: it may have restarted without persistence, its retained sensors lost)."""
        self.again |= set(self.announced) if everything else self.unsent
        self.unsent.clear()

    def model_changed(self, manifest: Manifest) -> list[Discovery]:
        """A reloaded model may change the sensors (labels, outputs): every stream announced
        again, paced, its sensors the new model has not removed (paced too); until its turn,
        a stream keeps those it shares with the new model. A model whose sensors are the same
        (a retrained model, another quantisation) changes no discovery message: none sent."""
        before = self._configs("-")  # a stream's configs differ from another's in names only
        self.manifest = manifest
        if self._configs("-") == before:
            return []
        for stream, topics in self.announced.items():
            new = {t for t, _ in self._configs(stream)}
            self._remove(t for t in topics if t not in new)
            self.announced[stream] = [t for t in topics if t in new]
        self.again |= set(self.announced)
        return self.reconcile(list(self.announced))


def announcer_for(cfg: ServiceConfig, manifest: Manifest) -> Announcer | None:
    """The service's announcer, or None when ``ha_discovery`` is off."""
    if not cfg.ha_discovery:
        return None
    return Announcer(
        manifest,
        runtime_id=cfg.runtime_id,
        prediction_template=cfg.prediction_topic,
        status_topic=cfg.status_topic.replace("{runtime_id}", cfg.runtime_id),
        prefix=cfg.ha_prefix,
        per_round=PER_ROUND,
    )


def publish(client: Any, messages: Iterable[Discovery], retain: bool = True) -> list[str]:
    """Retained, QoS 1: Home Assistant finds them whenever it (re)connects (``retain``
    False: the broker keeps no retained messages). Returns the topics of the messages not
    sent because they are larger than the broker takes (its maximum packet size)."""
    from paho.mqtt.enums import MQTTErrorCode

    too_large = []
    for m in messages:
        info = client.publish(m.topic, m.payload, qos=1, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE:
            too_large.append(m.topic)
    return too_large

"""Topic templates: ``sensors/{stream}/data`` <-> subscription filter and stream id."""

from __future__ import annotations

import re
from typing import TypeVar

from .errors import ConfigError, shown

PLACEHOLDER = "{stream}"
CACHED = 16384  # topics remembered per template: a fleet's topics repeat with every message
V = TypeVar("V")
CACHED_LENGTH = 512  # longer topics (never a valid stream's) are matched, not remembered
# Prefixes of a shared subscription (MQTT 5's, and EMQX's older one): not a topic of ours.
SHARED_PREFIXES = ("$share/", "$queue/")


def shared_subscription(name: str, template: str) -> None:
    """Refuse a template that names a shared subscription. Its messages come under the topic
    without the prefix (every sample was answered ``bad_topic``, and gone from the group),
    and a group spreads one stream's samples over its runtimes, each stepping its share
    from a state of its own: answers wrong, and nothing would say so."""
    if template.startswith(SHARED_PREFIXES):
        raise ConfigError(
            f"{name} = {shown(template)} is a shared subscription ($share/ or $queue/), "
            "no topic to publish on; and one runtime must read every message of a stream, "
            "in order, to step its state; give each runtime streams (a topic template) of "
            "its own, or use edge-lstm worker, which hands each stream to one worker"
        )


class Template:
    def __init__(self, template: str) -> None:
        levels = template.split("/")
        if template.count(PLACEHOLDER) != 1 or PLACEHOLDER not in levels:
            raise ConfigError(
                f"topic template {shown(template)} must hold '{PLACEHOLDER}' once, as a whole level"
            )
        if any(c in template for c in "+#\0"):
            raise ConfigError(f"topic template {shown(template)} must not contain '+', '#' or NUL")
        self.template = template
        self.index = levels.index(PLACEHOLDER)
        self.levels = levels
        self.filter = "/".join("+" if lv == PLACEHOLDER else lv for lv in levels)
        self._streams: dict[str, str | None] = {}
        self._topics: dict[str, str] = {}

    def stream(self, topic: str) -> str | None:
        """The stream id of a topic, or None when it does not match the template."""
        if topic in self._streams:  # remembered: None for a topic that does not match
            return self._streams[topic]
        return _remember(self._streams, topic, self._match(topic))

    def _match(self, topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        for i, (got, want) in enumerate(zip(parts, self.levels)):
            if i != self.index and got != want:
                return None
        sid = parts[self.index]
        return sid if valid_stream_id(sid) else None

    def topic(self, stream: str) -> str:
        topic = self._topics.get(stream)
        if topic is not None:
            return topic
        return _remember(self._topics, stream, self.template.replace(PLACEHOLDER, stream))


def _remember(cache: dict[str, V], key: str, value: V) -> V:
    """``value``, kept under ``key`` when the key is short; the cache starts over when full."""
    if len(key) <= CACHED_LENGTH:
        if len(cache) >= CACHED:
            cache.clear()
        cache[key] = value
    return value


_STREAM_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


def valid_stream_id(sid: str) -> bool:
    return bool(_STREAM_RE.fullmatch(sid))  # not ``$``, which also matches before a final \n


def runtime_filter(template: str) -> str | None:
    """The filter matching every runtime's topic of ``template`` (``edge/status/{runtime_id}``
    -> ``edge/status/+``), or None where ``{runtime_id}`` is not one whole level."""
    levels = template.split("/")
    if levels.count("{runtime_id}") != 1 or template.count("{runtime_id}") != 1:
        return None
    return "/".join("+" if lv == "{runtime_id}" else lv for lv in levels)


def overlap(a: str, b: str) -> bool:
    """Whether some topic matches both templates (``{stream}`` matches any one level)."""
    x, y = Template(a).levels, Template(b).levels
    return len(x) == len(y) and all(
        p == q or PLACEHOLDER in (p, q) for p, q in zip(x, y, strict=True)
    )

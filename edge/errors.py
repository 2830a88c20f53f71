"""The one error hierarchy of ``edge``.

::

    EdgeError
    ├── BackendError        no usable interpreter, or the interpreter failed
    ├── BundleError         manifest missing/invalid, sha256 mismatch, self-test failed
    ├── SnapshotError       unreadable, corrupt, wrong format or wrong model
    ├── ConfigError         bad configuration value
    ├── TransportError      the message broker refused what we sent
    └── SampleError         a sample the engine refuses; state and last seq are untouched
        ├── InvalidSample   wrong shape, non-numeric, NaN/Inf, oversized
        ├── DuplicateSample seq <= last seen (a redelivery)
        ├── SequenceGap     seq jumped and the gap policy is "reject"
        ├── StaleSample     from an earlier boot of the device than the stream's current one
        └── MissingSeq      no seq, and the engine is configured for sequenced streams

Dependency errors are wrapped (``raise BundleError(...) from exc``) so callers catch one type.
"""

from __future__ import annotations

import math
from typing import Any

SHOWN_CHARS = 80  # how much of a bad value an error message repeats


class EdgeError(Exception):
    """Base of every error raised by ``edge``."""


class BackendError(EdgeError):
    pass


class BundleError(EdgeError):
    pass


class SnapshotError(EdgeError):
    pass


class StateMismatch(SnapshotError):
    """A sound snapshot of another model or state layout: not damage, and not ours to drop."""


class NewerFormat(StateMismatch):
    """A sound snapshot in a format of a later version: not damage, and not ours to drop."""


class ConfigError(EdgeError):
    pass


class TransportError(EdgeError):
    pass


class SampleError(EdgeError):
    """A refused sample. ``code`` is the stable short name published on ``errors/{stream}``."""

    code = "invalid_sample"

    def __init__(self, message: str, *, stream_id: str | None = None, seq: int | None = None):
        super().__init__(message)
        self.stream_id = stream_id
        self.seq = seq

    def __str__(self) -> str:
        where = []
        if self.stream_id is not None:
            where.append(f"stream {shown(self.stream_id)}")
        if self.seq is not None:  # an invalid stream's seq is not checked: it may be anything
            where.append(f"seq {_seq_text(self.seq)}")
        prefix = f"{', '.join(where)}: " if where else ""
        return prefix + super().__str__()


class InvalidSample(SampleError):
    code = "invalid_sample"


class DuplicateSample(SampleError):
    code = "duplicate"


class SequenceGap(SampleError):
    code = "gap"


class StaleSample(SampleError):
    code = "stale"


class MissingSeq(SampleError):
    code = "missing_seq"


def _seq_text(seq: Any) -> str:
    """A seq as it reads (``5``, numpy's too), or ``shown`` of one too long to repeat."""
    try:
        text = str(seq)
    except ValueError:  # an int past Python's int-to-str limit
        return shown(seq)
    return text if len(text) <= SHOWN_CHARS else shown(seq)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr`` of a bad value, cut to about ``limit`` chars so hostile input gives a short line.

    Never raises: a huge int exceeds Python's int-to-str limit, a deep list its recursion limit.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"<{'-' if value < 0 else ''}{digits}-digit integer>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"

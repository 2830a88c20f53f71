"""edge: the device runtime. Keeps LSTM state per stream and steps it one sample at a time.

>>> import edge
>>> engine = edge.load("bundle/")
>>> y = engine.step("dev-1", [0.1, 0.2, 0.3, 0.0, 0.0, 0.0])

Never imports TensorFlow unless it is explicitly chosen as the (heavy) fallback backend.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BackendError,
    BundleError,
    ConfigError,
    DuplicateSample,
    EdgeError,
    InvalidSample,
    MissingSeq,
    NewerFormat,
    SampleError,
    SequenceGap,
    SnapshotError,
    StaleSample,
    StateMismatch,
    TransportError,
)

if TYPE_CHECKING:
    from .engine import Batch, Chunk, Engine, Outcome, load
    from .manifest import Manifest

# Imported at their first use (NumPy, an interpreter's modules: seconds on a Pi), so that
# ``edge-lstm serve`` takes the signals sent to it while it starts before it imports them.
_LAZY = {
    "Batch": "engine",
    "Chunk": "engine",
    "Engine": "engine",
    "Outcome": "engine",
    "load": "engine",
    "Manifest": "manifest",
}

__all__ = [
    "BackendError",
    "Batch",
    "BundleError",
    "Chunk",
    "ConfigError",
    "DuplicateSample",
    "EdgeError",
    "Engine",
    "InvalidSample",
    "Manifest",
    "MissingSeq",
    "NewerFormat",
    "Outcome",
    "SampleError",
    "SequenceGap",
    "SnapshotError",
    "StaleSample",
    "StateMismatch",
    "TransportError",
    "__version__",
    "load",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule, as ``edge.snapshot`` was once ``edge`` was imported
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

"""edge: the device runtime. Keeps LSTM state per stream and steps it one sample at a time.

>>> import edge
>>> engine = edge.load("bundle/")
>>> y = engine.step("dev-1", [0.1, 0.2, 0.3, 0.0, 0.0, 0.0])

Never imports TensorFlow unless it is explicitly chosen as the (heavy) fallback backend.
"""

from ._version import __version__
from .engine import Batch, Chunk, Engine, Outcome, load
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
from .manifest import Manifest

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

"""Interpreter backends, chosen at run time.

Order for ``auto``: ai-edge-litert, then tflite-runtime, then ``tensorflow.lite`` (the heavy
fallback, with a warning). ``EDGE_LSTM_BACKEND`` or an explicit argument overrides the order.
TensorFlow is imported only when that fallback is actually chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import BackendError

BACKENDS = ("litert", "tflite", "tensorflow")
ENV_VAR = "EDGE_LSTM_BACKEND"
INSTALL_HINT = (
    "install one interpreter: pip install 'edge-lstm[litert]' (ai-edge-litert, 64-bit, numpy 2) "
    "or pip install 'edge-lstm[tflite]' (tflite-runtime 2.14, numpy<2, also 32-bit Arm)"
)


class SignatureRunner(Protocol):
    """What the engine needs from an interpreter: call one signature with named tensors."""

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def get_input_details(self) -> dict[str, dict[str, Any]]: ...

    def get_output_details(self) -> dict[str, dict[str, Any]]: ...


@dataclass(frozen=True)
class Backend:
    name: str
    version: str
    make_interpreter: Callable[..., Any]

    def runner(self, model_content: bytes, signature: str, num_threads: int = 1) -> SignatureRunner:
        try:
            interp = self.make_interpreter(model_content=model_content, num_threads=num_threads)
            runner: SignatureRunner = interp.get_signature_runner(signature)
        except Exception as exc:  # the interpreters raise ValueError/RuntimeError freely
            raise BackendError(f"{self.name} could not open the model: {exc}") from exc
        return runner

    def op_names(self, model_content: bytes) -> list[str]:
        interp = self.make_interpreter(model_content=model_content)
        return [str(op["op_name"]) for op in interp._get_ops_details()]


def _load(name: str) -> Backend:
    if name == "litert":
        mod = importlib.import_module("ai_edge_litert.interpreter")
        version = _dist_version("ai-edge-litert")
    elif name == "tflite":
        mod = importlib.import_module("tflite_runtime.interpreter")
        version = _dist_version("tflite-runtime")
    elif name == "tensorflow":
        warnings.warn(
            "using tensorflow.lite as the interpreter: the heavy fallback. " + INSTALL_HINT,
            RuntimeWarning,
            stacklevel=3,
        )
        tf = importlib.import_module("tensorflow")  # heavy fallback
        mod = tf.lite
        version = str(tf.__version__)
    else:
        raise BackendError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return Backend(name, version, mod.Interpreter)


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def available() -> list[str]:
    """Backends whose module can be imported here (TensorFlow is only looked up, not imported)."""
    found = []
    for name, module in (
        ("litert", "ai_edge_litert"),
        ("tflite", "tflite_runtime"),
        ("tensorflow", "tensorflow"),
    ):
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


_cache: dict[str, Backend] = {}


def select(choice: str | None = None, env: Mapping[str, str] | None = None) -> Backend:
    """Pick the interpreter: explicit choice, else ``$EDGE_LSTM_BACKEND``, else auto order."""
    env = os.environ if env is None else env
    choice = (choice or env.get(ENV_VAR) or "auto").strip().lower()
    order = BACKENDS if choice == "auto" else (choice,)
    if choice != "auto" and choice not in BACKENDS:
        raise BackendError(f"unknown backend {choice!r}; choose one of auto, {', '.join(BACKENDS)}")
    errors = []
    for name in order:
        if name in _cache:
            return _cache[name]
        if choice == "auto" and name == "tensorflow" and "tensorflow" not in available():
            errors.append("tensorflow: not installed")
            continue
        try:
            backend = _load(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        _cache[name] = backend
        return backend
    raise BackendError(f"no TFLite interpreter is importable ({'; '.join(errors)}); {INSTALL_HINT}")

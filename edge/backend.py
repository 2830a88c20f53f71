"""Interpreter backends, chosen at run time.

Order for ``auto``: ai-edge-litert, then tflite-runtime, then ``tensorflow.lite`` (the heavy
fallback, with a warning). ``EDGE_LSTM_BACKEND`` or an explicit argument overrides the order.
TensorFlow is imported only when that fallback is actually chosen.

The interpreter alone does not decide the bits of an int8 model: its *kernel set* does.
ai-edge-litert runs int8 through its default XNNPACK delegate, tflite-runtime 2.14 through its
built-in kernels, and an int8 step model feeds its rounded state back, so one LSB between two
kernel sets grows over a stream. ``kernel_set`` names what a loaded interpreter really runs:

- ``<interpreter>-xnnpack`` when the XNNPACK delegate took the graph (a ``DELEGATE`` node in the
  execution plan). Its int8 state was measured bit-exact between x86-64 and aarch64
  (``scripts/test-arm`` keeps checking it), so the name carries no machine. (The one op of
  our graphs XNNPACK does not take, an int8 softmax, is applied by the runtime instead:
  ``edge.softmax``.)
- ``<interpreter>-builtin-<machine>`` otherwise: the built-in kernels differ between x86-64 and
  aarch64 (up to 2 output steps measured), so the machine is part of the name.

``<interpreter>`` is ``litert``, ``tflite-<major.minor>`` or ``tensorflow``. XNNPACK can also be
silently absent (no readable ``/sys`` or ``/proc/cpuinfo``): the name then says ``builtin``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from .errors import BackendError, shown
from .stderr_filter import interpreter_lines

BACKENDS = ("litert", "tflite", "tensorflow")
ENV_VAR = "EDGE_LSTM_BACKEND"
INSTALL_HINT = (
    "install one interpreter: pip install 'edge-lstm[litert]' (ai-edge-litert, 64-bit, numpy 2) "
    "or pip install 'edge-lstm[tflite]' (tflite-runtime 2.14, numpy<2, Python 3.10/3.11)"
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
    builtin_resolver: Any = None  # OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    builtin_only: bool = False  # default delegates (XNNPACK) switched off

    @property
    def family(self) -> str:
        """The interpreter part of a kernel-set name: litert, tflite-2.14, tensorflow."""
        if self.name == "tflite":
            return "tflite-" + ".".join(self.version.split(".")[:2])
        return self.name

    def builtin(self) -> Backend:
        """The same interpreter with its default delegates off: only the built-in kernels."""
        if self.builtin_resolver is None:
            raise BackendError(f"{self.name} {self.version} cannot switch its delegates off")
        return replace(self, builtin_only=True)

    def open(
        self, model_content: bytes, signature: str, num_threads: int = 1
    ) -> tuple[Any, SignatureRunner]:
        """(interpreter, signature runner); the interpreter is kept to read its execution plan."""
        kwargs: dict[str, Any] = {"model_content": model_content, "num_threads": num_threads}
        if self.builtin_only:
            kwargs["experimental_op_resolver_type"] = self.builtin_resolver
        try:
            with interpreter_lines():
                interp = self.make_interpreter(**kwargs)
                # No interp.allocate_tensors() here: tflite-runtime 2.14 applies its default
                # delegate there but not in the signature runner's, so calling it would turn a
                # float model's built-in kernel set into XNNPACK's (other bits).
                runner: SignatureRunner = interp.get_signature_runner(signature)
        except Exception as exc:  # the interpreters raise ValueError/RuntimeError freely
            # one line: TFLite ends with "Registration failed." after the line saying why
            why = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise BackendError(f"{self.name} could not open the model: {why}") from exc
        return interp, runner

    def runner(self, model_content: bytes, signature: str, num_threads: int = 1) -> SignatureRunner:
        return self.open(model_content, signature, num_threads)[1]

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
        raise BackendError(
            f"unknown backend {shown(name)}; choose one of auto, {', '.join(BACKENDS)}"
        )
    resolver = getattr(
        getattr(mod, "OpResolverType", None), "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None
    )
    if resolver is None and name == "tensorflow":
        resolver = mod.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Backend(name, version, mod.Interpreter, resolver)


def kernel_set_name(family: str, delegated: bool, machine: str) -> str:
    """See the module docstring: XNNPACK sets are machine-independent, built-in ones are not."""
    return f"{family}-xnnpack" if delegated else f"{family}-builtin-{machine}"


def machine() -> str:
    """The CPU architecture as Python names it: x86_64, aarch64, armv7l."""
    return platform.machine().lower() or "unknown"


def kernel_set(backend: Backend, interpreter: Any) -> str:
    """The kernel set a loaded interpreter runs. Read after the first invoke: delegates are
    applied lazily, and tflite-runtime's signature runner applies them only then."""
    try:
        ops = interpreter._get_ops_details()
    except Exception as exc:  # a private API: say so rather than guess
        raise BackendError(f"{backend.name} does not show its execution plan: {exc}") from exc
    delegated = any(str(op.get("op_name")) == "DELEGATE" for op in ops)
    return kernel_set_name(backend.family, delegated, machine())


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
    if choice is not None and not isinstance(choice, str):  # 5 raised AttributeError (strip)
        raise BackendError(
            f"backend {shown(choice)} is not a name; choose one of auto, {', '.join(BACKENDS)}"
        )
    choice = (choice or env.get(ENV_VAR) or "auto").strip().lower()
    order = BACKENDS if choice == "auto" else (choice,)
    if choice != "auto" and choice not in BACKENDS:
        raise BackendError(
            f"unknown backend {shown(choice)}; choose one of auto, {', '.join(BACKENDS)}"
        )
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

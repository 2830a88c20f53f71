"""Open a model in a short child process before this process opens it.

The sha256 of a bundle proves its model is the file the manifest was written for, not that the
file is a sound model: a ``model.tflite`` cut off or damaged before its sha256 was recomputed
(damaged storage, a hand-edited bundle) passes every check of ``edge.manifest``. ai-edge-litert
runs the flatbuffer verifier on such bytes and refuses them, but tflite-runtime 2.14 reads
them unchecked and dies of SIGSEGV while opening the interpreter, allocating or invoking it:
``edge-lstm serve`` and ``worker`` ended without a word, and a ``reload`` killed the running
service.

So a model is first opened by a child (this same Python, running ``main`` below) that
does what ``StepModel`` does (open, check the signature, bind, one step from zero state) and
steps a batch of two more. Only when it exits 0 is the model opened here; a child killed by a
signal becomes a ``BundleError`` naming the signal. Whatever the interpreter does with the
bytes, this process survives it. A model that passed is remembered for the life of the process
(by its sha256, the manifest's model id and the interpreter), so a reload of the same bundle
costs no second child.

Protocol: the child reads one JSON line (manifest, backend name, delegate switch, threads,
max_batch) and then the model's bytes from stdin; it exits 0 when the model loaded and
stepped, or 3 with ``<ErrorClass>\\t<message>`` on stdout when ``edge`` refused it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from .errors import BackendError, BundleError, ConfigError, EdgeError

if TYPE_CHECKING:
    from .backend import Backend
    from .manifest import Manifest

TIMEOUT = 300.0  # seconds; a sound step model opens in well under one, even on a Pi Zero
REFUSED = 3  # the child's exit status when edge refused the model (message on stdout)
ERRORS: dict[str, type[EdgeError]] = {
    "BundleError": BundleError,
    "BackendError": BackendError,
    "ConfigError": ConfigError,
}

# ``python -c``, not ``-m edge.trial_load``: edge's __init__ imports this module already, and
# runpy warns when it runs a module found in sys.modules
CHILD = "import sys; from edge.trial_load import main; sys.exit(main())"

_passed: set[tuple[str, ...]] = set()


def check(
    manifest: Manifest, content: bytes, backend: Backend, num_threads: int, max_batch: int
) -> None:
    """Raise ``BundleError``/``BackendError`` unless ``content`` opens and steps in a child."""
    key = (
        hashlib.sha256(content).hexdigest(),
        manifest.model_sha256,
        backend.name,
        backend.version,
        str(backend.builtin_only),
        str(num_threads),
        str(max_batch),
    )
    if key in _passed:
        return
    header = {
        "manifest": manifest.to_dict(),
        "backend": backend.name,
        "builtin_only": backend.builtin_only,
        "num_threads": num_threads,
        "max_batch": max_batch,
    }
    env = dict(os.environ)
    # the child imports the same edge as this process, wherever this one found it
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.pop("NOTIFY_SOCKET", None)  # systemd's, for the service alone
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD],
            input=json.dumps(header).encode() + b"\n" + content,
            capture_output=True,
            timeout=TIMEOUT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BundleError(
            f"{backend.name} could not open the model: {backend.name} {backend.version} did not "
            f"open and step it within {TIMEOUT:.0f} s in a trial process; the file is damaged "
            "or no model for this interpreter"
        ) from exc
    except OSError as exc:
        raise BackendError(
            f"cannot start a trial process ({sys.executable}) to open the model: {exc}"
        ) from exc
    code = done.returncode
    if code == 0:
        _passed.add(key)
        return
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise BundleError(
            f"{backend.name} could not open the model: {backend.name} {backend.version} died of "
            f"{name} opening or stepping it in a trial process, so the file is damaged (cut off "
            "or overwritten) though its sha256 is the manifest's tflite_sha256; copy or "
            "convert the bundle again"
        )
    if code == REFUSED:
        kind, _, message = done.stdout.decode("utf-8", "replace").strip().partition("\t")
        raise ERRORS.get(kind, BundleError)(message)
    last = [ln.strip() for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    raise BundleError(
        f"{backend.name} {backend.version} failed opening the model in a trial process "
        f"(exit status {code}): {last[-1] if last else 'no message'}"
    )


def main() -> int:
    """The child: open and step the model given on stdin; see the module's docstring."""
    import numpy as np

    from .backend import select
    from .manifest import parse
    from .model import StepModel

    data = sys.stdin.buffer.read()
    line, _, content = data.partition(b"\n")
    try:
        header = json.loads(line)
        manifest = parse(header["manifest"])
        backend = select(header["backend"])
        if header["builtin_only"]:
            backend = backend.builtin()
        model = StepModel(
            manifest,
            content,
            backend,
            max_batch=header["max_batch"],
            num_threads=header["num_threads"],
            trial=False,
        )
        rows = min(2, model.max_batch)
        x = model.encode_x(np.zeros((rows, manifest.features)))
        model.invoke(x, [np.repeat(s, rows, axis=0) for s in model.zero_state()])
    except EdgeError as exc:
        sys.stdout.write(f"{type(exc).__name__}\t{' '.join(str(exc).split())}\n")
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())

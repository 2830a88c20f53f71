"""The scorer's offline run, computed in the kernel set of the runtime it talks to.

Two kernel sets (XNNPACK in ai-edge-litert, the built-in kernels of tflite-runtime 2.14) give
int8 streams that drift apart, so exactness is judged against an offline run in the very
kernel set the runtime reported in its status (``"kernels"``). It is run in this Python when
one of its interpreters gives that set (with or without its default delegates), else in the
device-like Python (``$EDGE_LSTM_DEVICE_PYTHON`` or ``.venv-device`` beside the project) as
``python -m firmware_sim.offline``. This module needs only ``edge`` and numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# (stream key, first seq, values [k, F]) in the order the runtime applied them
Chunks = Sequence[tuple[str, int | None, np.ndarray]]
# per chunk: (seq of the first applied sample, y [applied, O])
Answers = list[tuple[int | None, np.ndarray]]


def device_python() -> str | None:
    env = os.environ.get("EDGE_LSTM_DEVICE_PYTHON")
    if env:
        return env
    guess = ROOT / ".venv-device" / "bin" / "python"
    return str(guess) if guess.exists() else None


def step_chunks(engine: Any, chunks: Chunks) -> Answers:
    from edge.engine import Chunk

    outcomes = engine.step_many([Chunk(s, v, q) for s, q, v in chunks])
    return [(oc.seq, oc.y) for oc in outcomes]


def engine_in(bundle: Path, kernels: str | None) -> Any | None:
    """An engine of this Python that computes with ``kernels`` (None: the default one)."""
    import edge
    from edge.backend import available

    if kernels is None:
        return edge.load(bundle, kernel_mismatch="allow")
    family = kernels.split("-")[0]
    if family not in available():
        return None
    with warnings.catch_warnings():  # tf.lite's deprecation warning
        warnings.simplefilter("ignore")
        engine = edge.load(
            bundle,
            backend=family,
            builtin_kernels="-builtin-" in kernels,
            kernel_mismatch="allow",
        )
    return engine if engine.model.kernels == kernels else None


def run(bundle: Path, chunks: Chunks, kernels: str | None) -> tuple[Answers, str, str | None]:
    """(answers, kernel set used, why it is not the one asked for or None)."""
    engine = engine_in(bundle, kernels)
    if engine is not None:
        return step_chunks(engine, chunks), engine.model.kernels, None
    python = device_python()
    if python is not None:
        answers, used = in_python(python, bundle, chunks, kernels or "")
        if used == kernels:
            return answers, used, None
    fallback = engine_in(bundle, None)
    why = (
        f"no interpreter here computes with the runtime's kernel set {kernels!r} "
        "(set EDGE_LSTM_DEVICE_PYTHON to a Python that has it): exactness is judged against "
        f"{fallback.model.kernels!r} and differences are expected"
    )
    return step_chunks(fallback, chunks), fallback.model.kernels, why


def in_python(python: str, bundle: Path, chunks: Chunks, kernels: str) -> tuple[Answers, str]:
    with tempfile.TemporaryDirectory(prefix="edge-lstm-offline-") as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        save_chunks(inp, chunks)
        proc = subprocess.run(
            [python, "-m", "firmware_sim.offline", str(bundle), str(inp), str(out), kernels],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode != 0:  # one line: the last a traceback writes names the exception
            lines = proc.stderr.strip().splitlines()
            why = lines[-1][-300:] if lines else f"exit code {proc.returncode}"
            return [], f"(failed: {why})"
        with np.load(out, allow_pickle=False) as z:
            seqs, ends, y = z["seqs"], np.cumsum(z["lengths"]), z["y"]
            used = str(z["kernels"])
    answers: Answers = [
        (None if s < 0 else int(s), y[e - n : e])
        for s, e, n in zip(seqs, ends, np.diff(np.concatenate([[0], ends])))
    ]
    return answers, used


def save_chunks(path: Path, chunks: Chunks) -> None:
    np.savez(
        path,
        streams=np.asarray([s for s, _, _ in chunks], dtype=str),
        seqs=np.asarray([-1 if q is None else q for _, q, _ in chunks], dtype=np.int64),
        lengths=np.asarray([len(v) for _, _, v in chunks], dtype=np.int64),
        values=np.concatenate([np.asarray(v, np.float64) for _, _, v in chunks])
        if chunks
        else np.empty((0, 0)),
    )


def load_chunks(path: Path) -> list[tuple[str, int | None, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        ends = np.cumsum(z["lengths"])
        starts = ends - z["lengths"]
        return [
            (str(s), None if q < 0 else int(q), z["values"][a:b])
            for s, q, a, b in zip(z["streams"], z["seqs"], starts, ends)
        ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_sim.offline", description=__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("chunks", type=Path, help=".npz written by save_chunks")
    p.add_argument("out", type=Path)
    p.add_argument("kernels", help="kernel set to compute with ('' for the default)")
    args = p.parse_args(argv)
    engine = engine_in(args.bundle, args.kernels or None)
    if engine is None:
        print(f"no interpreter here computes with {args.kernels!r}", file=sys.stderr)
        return 2
    answers = step_chunks(engine, load_chunks(args.chunks))
    width = engine.manifest.outputs
    np.savez(
        args.out,
        seqs=np.asarray([-1 if s is None else s for s, _ in answers], dtype=np.int64),
        lengths=np.asarray([len(y) for _, y in answers], dtype=np.int64),
        y=np.concatenate([y for _, y in answers]) if answers else np.empty((0, width)),
        kernels=np.asarray(engine.model.kernels),
    )
    print(json.dumps({"kernels": engine.model.kernels}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Closed-loop streams through a bundle, raw outputs out: the bits a kernel set computes.

Used to compare kernel sets and machines bit for bit (``lstm-convert`` runs it in every
interpreter it can reach, ``scripts/test-arm`` under emulated Arm CPUs, the scorer in the
runtime's kernel set). Each sequence is its own stream from the zero state, all streams
advance together one batched invoke per step, and the state is fed back exactly as the
runtime feeds it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .engine import FLOAT32_MAX, Engine, input_bounds, out_of_bounds
from .errors import BundleError, shown
from .outfile import KINDS, regular_target, replace_whole


def run(engine: Engine, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: [N, T, F] raw sensor units -> (y [N, T, O], state [N, T, S]) as the model's raw
    tensors (int8 codes for an int8 bundle), state being every state tensor side by side."""
    model = engine.model
    f = engine.manifest.features
    shape = list(np.shape(x))
    if np.asarray(x).dtype.kind not in "biuf":
        raise BundleError(f"replay input of dtype {np.asarray(x).dtype} is not real numbers")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[-1] != f or not x.shape[0] or not x.shape[1]:
        raise BundleError(f"replay input has shape {shape}, expected [N, T, {f}], N, T >= 1")
    if not np.abs(x).max() <= FLOAT32_MAX:  # NaN fails this too: as the engine refuses it
        raise BundleError("replay input holds NaN, Inf or values beyond the float32 range")
    bounds = input_bounds(model)
    if bounds is not None and out_of_bounds(x.reshape(-1, f), bounds).any():
        raise BundleError(
            "replay input holds values past what the model's float32 input holds once "
            "normalised: the engine refuses them"
        )
    n, t, _ = x.shape
    states = [np.repeat(z, n, axis=0) for z in model.zero_state()]
    ys, ss = [], []
    for k in range(t):
        y, states = model.invoke(model.encode_x(x[:, k]), states)
        ys.append(y)
        ss.append(np.concatenate(states, axis=1))
    return np.stack(ys, axis=1), np.stack(ss, axis=1)


def run_file(engine: Engine, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every array of ``inputs`` replayed: ``NAME/y`` and ``NAME/state`` for each ``NAME``."""
    out: dict[str, np.ndarray] = {}
    for name, x in inputs.items():
        try:
            out[f"{name}/y"], out[f"{name}/state"] = run(engine, x)
        except BundleError as exc:
            raise BundleError(f"array {shown(name)}: {exc}") from None
    return out


# How a zip archive (an .npz; empty, it is its end record alone) and a .npy begin.
NUMPY_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")
# What a file without it is refused as: NumPy calls it "pickled (object) data" and advises
# allow_pickle, a CSV file too (no option reads it, none should).
NOT_NPZ = "not a NumPy .npz archive (as numpy.savez writes it): text, CSV or a pickle is not read"


def open_input(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (a link to one included). The open
    of a FIFO waits for a writer for ever, and an .npz is read by seeking, which neither a
    FIFO nor a device does: they are refused, and the open never blocks."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"it is {KINDS.get(stat.S_IFMT(mode), 'not a regular file')}")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def replay_command(
    bundle: str, inputs: Path, out: Path, backend: str | None, builtin_kernels: bool
) -> dict[str, Any]:
    """``edge-lstm replay``: no kernel-set check (comparing kernel sets is the point); the
    kernel set that ran is written beside the outputs. ``out`` must be a regular file or
    not exist yet; a link to one is followed, and kept (see ``edge/outfile.py``)."""
    from .engine import load

    engine = load(bundle, backend=backend, builtin_kernels=builtin_kernels, kernel_mismatch="allow")
    target = regular_target(out, BundleError, "--out ")
    if not target.parent.is_dir():
        raise BundleError(f"--out {out}: expected a file in an existing directory")
    try:
        # opened here, not by np.load: it leaves its own file open when the zip is unreadable
        with open_input(inputs) as f:
            head = f.read(6)
            f.seek(0)
            if not head.startswith(NUMPY_MAGIC):
                raise ValueError(NOT_NPZ if head else "the file is empty")
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("one array (.npy), not an .npz archive of named arrays")
            with z:
                arrays = {}
                for k in z.files:
                    try:
                        arrays[k] = z[k]
                    except ValueError as exc:  # an object array: which of them, said
                        raise ValueError(f"array {shown(k)}: {exc}") from exc
    except Exception as exc:  # a damaged file raises what the part that trips on it raises:
        # OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError
        raise BundleError(f"{inputs}: not a readable .npz of [N, T, F] arrays: {exc}") from exc
    if not arrays:
        raise BundleError(f"{inputs}: holds no arrays to replay")
    try:
        result = run_file(engine, arrays)
    except BundleError as exc:
        raise BundleError(f"{inputs}: {exc}") from None
    info = {
        "kernels": engine.model.kernels,
        "backend": engine.model.backend.name,
        "backend_version": engine.model.backend.version,
        "streams": {k: list(v.shape) for k, v in arrays.items()},
    }
    arrays_out: dict[str, Any] = {**result, "info": np.asarray(json.dumps(info))}

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez(f, **arrays_out)

    replace_whole(out, save, BundleError, "--out ")
    return info

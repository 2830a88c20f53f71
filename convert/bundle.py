"""The bundle directory: model.tflite + manifest.json + report, written all or nothing."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edge.backend import select
from edge.errors import shown
from edge.manifest import (
    FORMAT,
    MANIFEST_LIMIT,
    MANIFEST_NAME,
    Manifest,
    StateTensor,
    TensorSpec,
)
from edge.outfile import new_mode

from . import quantize, step_graph
from .errors import ConvertError
from .spec import ModelSpec

MODEL_NAME = "model.tflite"
# Everything ``convert`` ever writes into a bundle: replacing a directory deletes it whole, so
# it is replaced only if it holds nothing else.
BUNDLE_FILES = frozenset({MODEL_NAME, MANIFEST_NAME, "report.json", "report.png"})


def describe(
    content: bytes,
    spec: ModelSpec,
    *,
    mode: str,
    normalize_in_graph: bool,
    labels: list[str],
    feature_names: list[str],
    feature_units: list[str],
    sample_rate_hz: float | None,
) -> Manifest:
    """The manifest of a converted step model, read back from the model's own signature."""
    backend = select()
    runner = backend.runner(content, "serving_default")
    details = {**runner.get_input_details(), **runner.get_output_details()}
    tensors = {}
    for name, d in details.items():
        scale, zp = d.get("quantization", (0.0, 0))
        dtype = np.dtype(d["dtype"]).name
        if dtype != "float32" and not float(scale) >= np.finfo(np.float32).tiny:
            raise ConvertError(
                f"--quant {mode}: TFLite gave tensor {shown(name)} the scale {float(scale):g}, "
                "which "
                "no runtime can use: its values on --calib are constant (an output always 0?); "
                "check the model, or try another --quant mode"
            )
        tensors[name] = TensorSpec(
            name,
            dtype,
            int(d["shape"][-1]),
            float(scale) if dtype != "float32" else 0.0,
            int(zp) if dtype != "float32" else 0,
        )
    states = tuple(
        StateTensor(s.name, s.output, s.width, s.role, s.layer, s.cell) for s in spec.states
    )
    kind = "classifier" if labels or spec.final_activation == "softmax" else "regressor"
    if kind == "classifier" and not labels:
        labels = [f"class_{i}" for i in range(spec.outputs)]
    extra: dict[str, Any] = {
        "source_name": spec.name,
        "input_normalization": None
        if normalize_in_graph or spec.norm_mean is None
        else {"mean": spec.norm_mean.tolist(), "std": spec.norm_std.tolist()},  # type: ignore[union-attr]
        "normalization": "graph" if normalize_in_graph else "runtime",
        "state_requantization": any(
            (tensors[i].scale, tensors[i].zero_point) != (tensors[o].scale, tensors[o].zero_point)
            for i, o, _ in step_graph.state_names(spec)
        ),
    }
    return Manifest(
        model_file=MODEL_NAME,
        tflite_sha256=hashlib.sha256(content).hexdigest(),
        source_sha256=spec.source_sha256,
        quantization=mode,
        signature="serving_default",
        input="x",
        output="y",
        feature_names=tuple(feature_names),
        feature_units=tuple(feature_units),
        output_kind=kind,
        labels=tuple(labels),
        states=states,
        tensors=tensors,
        sample_rate_hz=sample_rate_hz,
        extra=extra,
        output_activation="softmax" if quantize.runtime_softmax(spec, mode) else "linear",
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def check_replaceable(out: Path) -> None:
    """Refuse an ``out`` whose replacement would delete anything but an earlier bundle: a
    directory is replaced whole, so a file merely named manifest.json (a web app's, say) must
    not be taken for a bundle's, nor may a bundle's directory hold the user's other files."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    try:
        entries = sorted(out.iterdir())
    except OSError as exc:
        raise ConvertError(f"{out}: cannot list the output directory: {exc}") from exc
    if not entries:
        return
    if (why := _not_a_bundle(out / MANIFEST_NAME)) is not None:
        raise ConvertError(
            f"{out}: not empty and not a bundle ({MANIFEST_NAME} {why}); refusing to overwrite it"
        )
    foreign = [
        p.name + ("/" if stat.S_ISDIR(p.lstat().st_mode) else "")
        for p in entries
        if p.name not in BUNDLE_FILES or stat.S_ISDIR(p.lstat().st_mode)
    ]
    if foreign:
        raise ConvertError(
            f"{out}: a bundle, but it also holds {', '.join(foreign)}, which no bundle "
            "contains; refusing to overwrite it (move them out first)"
        )


def _not_a_bundle(mpath: Path) -> str | None:
    """Why ``mpath`` is not an edge-lstm manifest, or None if it is. Only the ``format`` field
    is asked for: a bundle of an older or newer format version may still be replaced."""
    try:
        st = mpath.lstat()
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_size > MANIFEST_LIMIT:
            return f"is {st.st_size} bytes, more than any manifest"
        data = json.loads(mpath.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return "is missing"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"is unreadable: {exc}"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        return f"has format {shown(found)}, not {FORMAT!r}"
    return None


def exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``): a reader, or a
    kill -9, finds either both as they were or both swapped. False where the C library or the
    file system cannot do it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def put_in_place(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an ``out`` there before ends up at ``tmp`` (for the caller to
    delete). Never a moment without one whole bundle at ``out`` where the file system can swap
    the two in one step; else two renames, and an interrupt between them puts the old back."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if exchange(tmp, out):
        return
    aside = out.with_name(f".{out.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(out, aside)
        os.replace(tmp, out)
    except BaseException:  # an interrupt may land before, between or after the two
        if not out.exists() and aside.exists():
            os.replace(aside, out)
        raise
    os.replace(aside, tmp)


def remove_abandoned(out: Path) -> None:
    """The staging directories of conversions into ``out`` that were killed (-9, a power cut:
    nothing removed them) go; each conversion holds a lock on its own while it runs."""
    prefix = f".{out.name}.staging-"
    try:
        found = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return  # nothing to tidy where nothing can be listed; the conversion says why
    for path in found:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or no directory of ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # locked: a conversion still running
        finally:
            os.close(fd)


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temp directory beside ``out`` that replaces it only if the block succeeds."""
    out = out.resolve()
    check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        os.chmod(tmp, new_mode(out, 0o777))  # mkdtemp's 0700 would shut out the service's user
        lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConvertError(f"{out}: cannot write the output directory: {exc}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ours while we run; see remove_abandoned
        remove_abandoned(out)
        try:
            yield tmp
            put_in_place(tmp, out)  # tmp then holds the earlier bundle, if any
        except OSError as exc:  # a full disk, most likely: the staging directory goes
            raise ConvertError(f"{out}: cannot write the bundle: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)

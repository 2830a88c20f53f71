"""The bundle directory: model.tflite + manifest.json + report, written all or nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edge.backend import select
from edge.manifest import MANIFEST_NAME, Manifest, StateTensor, TensorSpec

from . import quantize, step_graph
from .errors import ConvertError
from .spec import ModelSpec

MODEL_NAME = "model.tflite"


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


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temp directory beside ``out`` that replaces it only if the block succeeds."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ConvertError(f"{out}: not empty and not a bundle; refusing to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ConvertError(f"{out}: cannot write the output directory: {exc}") from exc
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

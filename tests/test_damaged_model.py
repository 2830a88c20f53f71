"""A model.tflite damaged before its manifest's sha256 was made (cut off, bytes overwritten):
the sha256 matches, so only opening the model tells. tflite-runtime 2.14 reads such bytes
unchecked and died of SIGSEGV in ``edge.load``, taking ``serve``, ``worker`` and a running
service's reload with it. Each must be refused with a one-line ``EdgeError`` naming the file,
or load and answer; never end the process. Both guards are tried: the structural check of
``edge.tflite_check`` (``read_bundle``), and with it switched off the trial load in a child
process (``edge.trial_load``), which must hold on its own against whatever the check misses."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge
from tests.mqtt_helpers import ROOT

BUNDLE = "clf-int8"


def _damaged(bundles: Path, tmp_path: Path, damage) -> Path:
    """A copy of the int8 classifier with ``damage(bytes) -> bytes`` applied to its model and
    the manifest's sha256 made for the damaged bytes."""
    b = tmp_path / "bundle"
    shutil.copytree(bundles / BUNDLE, b)
    data = damage((b / "model.tflite").read_bytes())
    (b / "model.tflite").write_bytes(data)
    m = json.loads((b / "manifest.json").read_text())
    m["tflite_sha256"] = hashlib.sha256(data).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _root(data: bytes) -> int:
    return _u32(data, 0)


def _vtable(data: bytes) -> int:
    return _root(data) - int.from_bytes(data[_root(data) : _root(data) + 4], "little", signed=True)


def _field(data: bytes, index: int) -> int:
    """Where the Model table's field ``index`` is (1 operator_codes, 2 subgraphs, 4 buffers)."""
    vt = _vtable(data)
    return _root(data) + int.from_bytes(data[vt + 4 + 2 * index : vt + 6 + 2 * index], "little")


def _flip(where):
    def damage(data: bytes) -> bytes:
        out = bytearray(data)
        out[where(data)] ^= 0xFF
        return bytes(out)

    return damage


CUTS = {
    "header-8": lambda d: d[:8],  # the root offset and file identifier only
    "header-12": lambda d: d[:12],
    "root-table": lambda d: d[: _root(d) + 8],
    "quarter": lambda d: d[: len(d) // 4],
    "middle": lambda d: d[: len(d) // 2],
    "three-quarters": lambda d: d[: 3 * len(d) // 4],
    "end-64": lambda d: d[:-64],
    "end-16": lambda d: d[:-16],
    "end-1": lambda d: d[:-1],
}
FLIPS = {
    "root-offset-low": _flip(lambda d: 0),
    "root-offset-high": _flip(lambda d: 2),
    "vtable-offset": _flip(lambda d: _root(d)),
    "vtable-size": _flip(lambda d: _vtable(d)),
    "vtable-entry": _flip(lambda d: _vtable(d) + 6),
    "operator-codes-offset": _flip(lambda d: _field(d, 1) + 1),
    "subgraphs-offset": _flip(lambda d: _field(d, 2) + 1),
    "buffers-offset": _flip(lambda d: _field(d, 4) + 1),
    "subgraphs-count": _flip(lambda d: _field(d, 2) + _u32(d, _field(d, 2)) + 1),
    "buffers-count": _flip(lambda d: _field(d, 4) + _u32(d, _field(d, 4)) + 2),
    "middle-byte": _flip(lambda d: len(d) // 2),
}


@pytest.mark.parametrize("guard", ["check", "trial"])
@pytest.mark.parametrize("damage", [*CUTS.values(), *FLIPS.values()], ids=[*CUTS, *FLIPS])
def test_a_damaged_model_is_refused_naming_the_file_or_loads_and_answers(
    bundles, tmp_path, monkeypatch, damage, guard
):
    b = _damaged(bundles, tmp_path, damage)
    if guard == "trial":
        monkeypatch.setattr("edge.tflite_check.problem", lambda data: None)
    try:
        engine = edge.load(b)
    except edge.EdgeError as exc:
        text = str(exc)
        assert text.startswith(f"{b / 'model.tflite'}: ") and "\n" not in text, text
        return
    x = np.random.default_rng(1).normal(size=(5, engine.manifest.features))
    y = engine.step("s", x)
    assert y.shape == (5, engine.manifest.outputs) and np.isfinite(y).all()


@pytest.mark.parametrize("damage", ["middle", "subgraphs-offset"])
def test_the_check_names_what_is_damaged_and_where(bundles, tmp_path, damage):
    b = _damaged(bundles, tmp_path, {**CUTS, **FLIPS}[damage])
    with pytest.raises(edge.BundleError) as err:
        edge.load(b)
    text = str(err.value)
    assert text.startswith(f"{b / 'model.tflite'}: not a sound TFLite model (model."), text
    assert "past the end of the " in text and "-byte file" in text, text


def test_every_test_bundle_passes_the_check(bundles):
    """The check refuses no sound model: every bundle the converter made (Keras and PyTorch,
    every quantisation mode)."""
    from edge.tflite_check import problem

    models = sorted(bundles.glob("*/model.tflite"))
    assert len(models) >= 10
    for model in models:
        assert problem(model.read_bytes()) is None, model


def test_serve_of_a_damaged_model_is_one_line_naming_the_file(bundles, broker, tmp_path):
    """A cut-off model whose sha256 matches ended ``serve`` with SIGSEGV and not a word. It is
    refused before the state directory is made, as a bundle that cannot be read is."""
    b = _damaged(bundles, tmp_path, CUTS["middle"])
    argv = ["--model", str(b), "--broker", broker.url, "--state-dir", str(tmp_path / "state")]
    out = subprocess.run(
        [sys.executable, "-m", "edge", "serve", *argv],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, (out.returncode, out.stderr)
    assert f"{b / 'model.tflite'}: not a sound TFLite model" in err[0] and "error" in err[0], err
    assert not (tmp_path / "state").exists()


def test_a_worker_of_a_damaged_model_is_one_line_naming_the_file(bundles, tmp_path):
    """``edge-lstm worker`` opens the bundle before it connects to NATS: it died of SIGSEGV."""
    b = _damaged(bundles, tmp_path, FLIPS["buffers-offset"])
    cmd = [sys.executable, "-m", "edge", "worker", "--model", str(b)]
    cmd += ["--nats", "nats://127.0.0.1:1", "--state-dir", str(tmp_path / "state")]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, (out.returncode, out.stderr)
    assert f"{b / 'model.tflite'}: not a sound TFLite model" in err[0], err

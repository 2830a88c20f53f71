"""Shared by the benchmarks: cached example bundles, RSS, timing, result tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
LABELS = ["Badminton", "Running", "Standing", "Walking"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def example(layers: int = 1, units: int = 64, epochs: int | None = None) -> tuple[Path, Path]:
    """(keras model, int8 bundle) of the example network, trained and converted once."""
    from convert.train import EPOCHS, train_example

    epochs = epochs or EPOCHS
    d = BUILD / f"example-l{layers}-h{units}-e{epochs}"
    model, bundle = d / "model.keras", d / "bundle-int8"
    if not (bundle / "manifest.json").exists():
        log(f"building {d.name} (cached for later runs)")
        train_example(model, epochs=epochs, units=units, layers=layers, progress=False)
        convert_example(model, bundle)
    return model, bundle


def convert_example(model: Path, out: Path, mode: str = "int8") -> None:
    """Convert and verify an example model with the calibration and test data saved beside it."""
    from convert.pipeline import run_convert

    run_convert(
        model,
        model.with_suffix(".calib.npy"),
        out,
        mode=mode,
        labels=LABELS,
        data_path=model.with_suffix(".test.npz"),
        progress=lambda m: None,
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_call(fn: Callable[[], Any], *, min_time: float = 0.5, repeats: int = 5) -> float:
    """Seconds per call: best of ``repeats`` runs of at least ``min_time`` each."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time / 5:
            break
        n *= 2
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def in_device_env(code: str, *args: str) -> dict[str, Any]:
    from convert.verify import device_python

    python = device_python()
    if python is None:
        return {
            "error": "no device-like Python (run scripts/test once, or set EDGE_LSTM_DEVICE_PYTHON)"
        }
    out = subprocess.run(
        [python, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-400:]}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def save(name: str, results: dict[str, Any]) -> Path:
    path = BUILD / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path

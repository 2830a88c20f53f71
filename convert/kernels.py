"""Fidelity in every kernel set that can be reached, and how each differs from the reference.

An int8 step model feeds its rounded state back, so kernel sets (XNNPACK, the built-in kernels
of ai-edge-litert, those of tflite-runtime 2.14) that differ by one LSB drift apart over a
stream. Each reachable kernel set replays the same closed-loop streams (``edge.replay``: the
held-out sequences, and the long drift stream) and is judged on its own against the float
model with the targets of ``verify``; its raw outputs are also compared with the reference
kernel set (what ``edge.load`` picks here). The sets that meet every target the reference
meets are the ones the manifest lists as verified; the runtime refuses the others.

tflite-runtime 2.14 cannot share an environment with TensorFlow (numpy<2), so it runs in the
device-like Python (``verify.device_python``) through ``edge-lstm replay``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edge
from edge import replay
from edge.backend import available
from edge.children import ending_with_us
from edge.manifest import Manifest
from edge.model import output_decoder

from . import verdict

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """The raw outputs one kernel set computed for every stream set."""

    kernels: str
    interpreter: str  # "ai-edge-litert 2.1.0"
    outputs: dict[str, np.ndarray]  # NAME/y, NAME/state


DIST = {"litert": "ai-edge-litert", "tflite": "tflite-runtime", "tensorflow": "tensorflow"}


def in_process(bundle: Path, streams: dict[str, np.ndarray]) -> tuple[list[Run], dict[str, str]]:
    """Every interpreter of this Python, with its default kernels and with the built-in ones."""
    runs: list[Run] = []
    failed: dict[str, str] = {}
    for name in ("litert", "tflite", "tensorflow"):
        if name not in available():
            continue
        for builtin in (False, True):
            label = f"{name}{' (built-in kernels)' if builtin else ''}"
            try:
                with warnings.catch_warnings():  # tf.lite's own deprecation warning
                    warnings.simplefilter("ignore")
                    eng = edge.load(
                        bundle, backend=name, builtin_kernels=builtin, kernel_mismatch="allow"
                    )
            except Exception as exc:  # report, do not stop: the summary says which failed
                failed[label] = str(exc)
                continue
            if any(r.kernels == eng.model.kernels for r in runs):
                continue  # e.g. int16x8: XNNPACK takes nothing, default == built-in
            b = eng.model.backend
            runs.append(
                Run(eng.model.kernels, f"{DIST[b.name]} {b.version}", replay.run_file(eng, streams))
            )
    return runs, failed


def device_env() -> dict[str, str]:
    """The device interpreter runs this checkout's ``edge``; an installed converter must not
    lend it its own site-packages (their NumPy 2 breaks tflite-runtime there)."""
    if not (ROOT / "pyproject.toml").exists():  # installed, not a checkout
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def failure(proc: subprocess.CompletedProcess[str]) -> str:
    """Why a command of the device Python failed, in one line: the last line it wrote to
    stderr (a traceback's names the exception), or its exit code when it wrote nothing."""
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else f"exit code {proc.returncode}, nothing on stderr"


def in_device_python(
    bundle: Path, streams: dict[str, np.ndarray], python: str, timeout: float = 600
) -> Run:
    """tflite-runtime 2.14 in the device-like environment, through ``edge-lstm replay``.
    The child ends with this process, however it ends; its directory (named by our process
    id) is removed by the next check if a kill -9 left it."""
    remove_stale_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, **streams)
        cmd = [python, "-m", "edge", "replay", str(bundle), "--input", str(inp), "--out", str(out)]
        cmd += ["--backend", "tflite"]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=device_env(),
            preexec_fn=ending_with_us(),
        )
        if proc.returncode != 0:
            raise RuntimeError(failure(proc))
        with np.load(out, allow_pickle=False) as z:
            outputs = {k: z[k] for k in z.files if k != "info"}
            info = json.loads(str(z["info"]))
    return Run(info["kernels"], f"tflite-runtime {info['backend_version']}", outputs)


TMP_PREFIX = "edge-lstm-kernels-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-[a-z0-9_]+")


def remove_stale_dirs() -> None:
    """Remove the directories of earlier checks whose process is gone: a converter killed
    with kill -9 ran no cleanup. Only ours (our user, named with a process id) are touched."""
    for d in Path(tempfile.gettempdir()).glob(TMP_PREFIX + "*"):
        m = _TMP_NAME.fullmatch(d.name)
        try:
            if not m or d.stat().st_uid != os.getuid() or _running(int(m.group(1))):
                continue
        except OSError:  # gone meanwhile, or not ours to look at: nothing to remove
            continue
        shutil.rmtree(d, ignore_errors=True)  # best effort: a leftover of a killed run


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now has that id
        return True
    return True


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, Any]:
    """Bit identity of two runs, and how far apart their outputs are in output steps."""
    ya = np.concatenate([a[k].reshape(-1) for k in sorted(a) if k.endswith("/y")])
    yb = np.concatenate([b[k].reshape(-1) for k in sorted(b) if k.endswith("/y")])
    sa = np.concatenate([a[k].reshape(-1) for k in sorted(a) if k.endswith("/state")])
    sb = np.concatenate([b[k].reshape(-1) for k in sorted(b) if k.endswith("/state")])
    dy = np.abs(ya.astype(np.float64) - yb.astype(np.float64))
    ds = np.abs(sa.astype(np.float64) - sb.astype(np.float64))
    return {
        "bit_identical": bool(dy.max() == 0 and ds.max() == 0),
        "outputs": int(ya.size),
        "state_values": int(sa.size),
        "max_output_diff": float(dy.max()),  # raw units: quantisation steps for int8/int16
        "max_state_diff": float(ds.max()),
        "differing_outputs": float((dy > 0).mean()),
    }


def figures(
    manifest: Manifest,
    y_parity: np.ndarray,
    y_float: np.ndarray,
    labels: np.ndarray | None,
    y_long: np.ndarray,
    y_long_float: np.ndarray,
    targets: dict[str, Any],
    drift_floor: float,
    sequence_output: bool = True,
) -> dict[str, Any]:
    """The task figures and checks of ``verify`` for one kernel set's dequantised outputs
    (labels aligned as the verdict aligns them: one per sequence against the last step); the
    checks are the verdict's gates, so a kernel set passes where the reference set would."""
    par: dict[str, Any] = {"max_abs_error": float(np.abs(y_parity - y_float).max())}
    err = np.abs(y_long - y_long_float).max(-1)
    tenth = max(1, len(err) // 10)
    second, last = float(err[tenth : 2 * tenth].mean()), float(err[-tenth:].mean())
    dr: dict[str, Any] = {
        "steps": len(err),
        "max_abs_error": float(err.max()),
        "second_10pct_mean_error": second,
        "last_10pct_mean_error": last,
        "no_drift": last <= targets["drift_ratio"] * second + drift_floor,
    }
    checks = {"no_drift": bool(dr["no_drift"])}
    if manifest.output_kind == "classifier":
        par["top1_agreement"] = float((y_parity.argmax(-1) == y_float.argmax(-1)).mean())
        dr["top1_agreement"] = float((y_long.argmax(-1) == y_long_float.argmax(-1)).mean())
        checks["top1_agreement"] = par["top1_agreement"] >= targets["top1_agreement"]
        if targets.get("regime") == "continuous":  # else reported only, as in the verdict
            checks["long_stream_top1_agreement"] = dr["top1_agreement"] >= targets["top1_agreement"]
    if labels is not None:
        n, t, o = y_float.shape
        where = verdict.label_alignment(labels, manifest.output_kind, n, t, o, sequence_output)
        yf, yq = (y_float[:, -1], y_parity[:, -1]) if where == "last" else (y_float, y_parity)
        if manifest.output_kind == "classifier":
            lab = verdict.class_index(labels, where, o)
            acc_f = float((yf.argmax(-1) == lab).mean())
            acc_q = float((yq.argmax(-1) == lab).mean())
            key = "accuracy_last_step" if where == "last" else "accuracy"
            par.update({f"{key}_float": acc_f, f"{key}_bundle": acc_q})
            checks["accuracy_within_1pt"] = acc_f - acc_q <= targets["max_accuracy_drop"] + 1e-9
        else:
            target = labels.astype(np.float64).reshape(yf.shape)
            rmse_f = float(np.sqrt(((yf - target) ** 2).mean()))
            rmse_q = float(np.sqrt(((yq - target) ** 2).mean()))
            par["rmse_ratio"] = rmse_q / rmse_f
            checks["rmse_within_5pct"] = par["rmse_ratio"] <= targets["max_rmse_ratio"] + 1e-12
    if manifest.output_kind != "classifier":
        dr["rmse_vs_float_rel"] = float(
            np.sqrt(((y_long - y_long_float) ** 2).mean()) / max(float(y_long_float.std()), 1e-12)
        )
    return {"parity": par, "drift": dr, "checks": checks, "passed": all(checks.values())}


def verify_kernel_sets(
    bundle: Path,
    manifest: Manifest,
    streams: dict[str, np.ndarray],
    y_float: dict[str, np.ndarray],
    labels: np.ndarray | None,
    dev_python: str | None,
    targets: dict[str, Any],
    drift_floor: float,
    sequence_output: bool = True,
) -> dict[str, Any]:
    """``streams``: {"parity": [N, T, F], "long": [1, L, F]}; ``y_float``: the float model's
    outputs for both; ``sequence_output`` False: the source returns the last step only.
    Returns the manifest's ``kernels`` record (plus ``unavailable``)."""
    runs, failed = in_process(bundle, streams)
    if dev_python is None:
        failed["tflite"] = "not available (set EDGE_LSTM_DEVICE_PYTHON)"
    else:
        try:
            runs.append(in_device_python(bundle, streams, dev_python))
        except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
            failed["tflite"] = str(exc)
    if not runs:
        return {"reference": "", "verified": [], "sets": {}, "unavailable": failed}
    ref = runs[0]
    decode = output_decoder(manifest)
    sets: dict[str, Any] = {}
    for r in runs:
        if r.kernels in sets:
            continue  # the device Python may reach a kernel set this one has too
        deq = {k: decode(r.outputs[f"{k}/y"]).astype(np.float64) for k in streams}
        fig = figures(
            manifest,
            deq["parity"],
            y_float["parity"],
            labels,
            deq["long"][0],
            y_float["long"][0],
            targets,
            drift_floor,
            sequence_output,
        )
        sets[r.kernels] = {
            "interpreter": r.interpreter,
            **fig,
            "vs_reference": compare(r.outputs, ref.outputs),
        }
    # Verified: measured, and every target the reference kernel set meets is met here too (a
    # target that the model misses in every kernel set is the converter's verdict, not the
    # kernels'; its exit code says so).
    met = [c for c, ok in sets[ref.kernels]["checks"].items() if ok]
    return {
        "reference": ref.kernels,
        "verified": [k for k, v in sets.items() if all(v["checks"].get(c) for c in met)],
        "sets": sets,
        "unavailable": failed,
    }

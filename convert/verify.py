"""Fidelity of a bundle against the float reference, as the runtime will run it.

Checks: per-step parity on held-out sequences, closed-loop drift over one long stream with the
state fed back exactly as ``edge`` feeds it, an op audit, and load-and-run in every interpreter
that can be reached (in-process, plus a device-like Python given by ``--device-python``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import edge
from edge.backend import available
from edge.children import ending_with_us
from edge.cli import probe_inputs
from edge.errors import shown
from edge.manifest import read_bundle

from . import kernels, quantize, reference, verdict
from .errors import ConvertError, VerificationFailed
from .spec import ModelSpec

FORBIDDEN_OPS = {
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "fused LSTM op",
    "BIDIRECTIONAL_SEQUENCE_LSTM": "fused LSTM op",
    "LSTM": "fused LSTM op",
    "WHILE": "control flow",
    "IF": "control flow",
    "VAR_HANDLE": "resource variable",
    "READ_VARIABLE": "resource variable",
    "ASSIGN_VARIABLE": "resource variable",
    "CALL_ONCE": "resource variable initialiser",
    "CUSTOM": "custom/Flex (Select TF) op",
}
DRIFT_ABS_FLOOR = verdict.DRIFT_ABS_FLOOR  # the no-drift rule is the verdict's


class FloatModel(Protocol):
    """The source model itself as the float reference (an ONNX graph in onnxruntime); without
    one, the NumPy reference of the spec is the float model."""

    def run(self, xs: np.ndarray) -> np.ndarray:
        """[N, T, F] sequences from zero state -> per-step outputs [N, T, O]."""
        ...

    def describe(self) -> dict[str, Any]: ...


def float_outputs(spec: ModelSpec, xs: np.ndarray, float_model: FloatModel | None) -> np.ndarray:
    if float_model is not None:
        return float_model.run(xs)
    y, _, _ = reference.run(spec, xs)
    return y


def op_audit(content: bytes) -> dict[str, Any]:
    from tensorflow.lite.python import schema_py_generated as fb

    model = fb.Model.GetRootAsModel(content, 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        name = names.get(code, str(code))
        if name == "CUSTOM" and oc.CustomCode():
            name = f"CUSTOM:{oc.CustomCode().decode()}"
        codes.append((name, oc.Version()))
    counts: dict[str, int] = {}
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for k in range(sg.OperatorsLength()):
            name = codes[sg.Operators(k).OpcodeIndex()][0]
            counts[name] = counts.get(name, 0) + 1
    forbidden = sorted(
        f"{n} ({FORBIDDEN_OPS[n.split(':')[0]]})"
        for n, _ in codes
        if n.split(":")[0] in FORBIDDEN_OPS
    )
    return {
        "ops": {n: {"version": v, "count": counts.get(n, 0)} for n, v in sorted(codes)},
        "subgraphs": model.SubgraphsLength(),
        "forbidden": forbidden,
        "passed": not forbidden and model.SubgraphsLength() == 1,
    }


def parity(
    engine: edge.Engine,
    spec: ModelSpec,
    x: np.ndarray,
    labels: np.ndarray | None,
    y_float: np.ndarray,
) -> tuple[dict[str, Any], np.ndarray]:
    """Every sequence as its own stream, all streams batched per step."""
    n, t, _ = x.shape
    streams = [f"verify-{i}" for i in range(n)]
    outs = engine.step_many([edge.Chunk(s, x[i]) for i, s in enumerate(streams)])
    for s in streams:
        engine.store.remove(s)
    y_q = np.stack([o.y for o in outs]).astype(np.float64)
    res: dict[str, Any] = {"sequences": int(n), "steps": int(n * t)}
    res.update(
        verdict.task_metrics(
            y_float,
            y_q,
            labels,
            kind=engine.manifest.output_kind,
            sequence_output=spec.sequence_output,
        )
    )
    if engine.manifest.output_kind == "classifier":
        agree = y_q.argmax(-1) == y_float.argmax(-1)
        res["per_class_agreement"] = {
            lab: float(agree[y_float.argmax(-1) == k].mean())
            if (y_float.argmax(-1) == k).any()
            else None
            for k, lab in enumerate(engine.manifest.labels)
        }
    return res, y_q


def tensor_saturation(
    engine: edge.Engine, x_in: np.ndarray, y_float: np.ndarray, states: list[np.ndarray]
) -> dict[str, Any]:
    """Of every integer signature tensor, the share of float values on ``--data`` that its
    range cannot hold (the input as the model receives it, the output, every state)."""
    m = engine.manifest
    values = {m.input: x_in, m.output: y_float}
    for (name, _), s in zip(m.state_names, states):
        values[name] = s
    roles = {s.input: s.role for s in m.states} | {m.input: "x", m.output: "y"}
    out: dict[str, Any] = {}
    for name, v in values.items():
        t = m.tensors[name]
        sat = verdict.saturation(v, t.dtype, t.scale, t.zero_point)
        if sat is not None:
            out[name] = {**sat, "role": roles[name]}
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == 0 else float("inf"))


def periodic_stream(x: np.ndarray, steps: int) -> np.ndarray:
    """>= ``steps`` samples made of one block of concatenated sequences repeated a multiple of
    ten times, so the first and last 10% see the same inputs and differ only by drift. The
    block is at most a tenth of ``steps`` long (a long recording is cut there: the stream is
    one stream anyway), so long sequences do not make the stream ten of them."""
    per_tenth = max(1, steps // 10 // x.shape[1])
    pick = np.random.default_rng(0).permutation(len(x))[:per_tenth]  # mixed classes, fixed
    block = x[np.sort(pick)].reshape(-1, x.shape[-1])[: -(-steps // 10)]
    reps = 10 * -(-steps // (10 * len(block)))
    return np.tile(block, (reps, 1))


def drift(
    engine: edge.Engine,
    spec: ModelSpec,
    x: np.ndarray,
    steps: int,
    progress: Callable[[str], None],
    max_ratio: float = verdict.Targets.max_drift_ratio,
    float_model: FloatModel | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """One stream, never reset, state fed back exactly as the runtime does it."""
    long = periodic_stream(x, steps)
    steps = len(long)
    y_float = float_outputs(spec, long[None], float_model)[0]
    model = engine.model
    state = model.zero_state()
    y_q = np.empty_like(y_float)
    sat = [0] * len(state)
    limits = [
        (np.iinfo(s.dtype).min, np.iinfo(s.dtype).max) if s.dtype != np.float32 else None
        for s in state
    ]
    t0 = time.perf_counter()
    for k in range(steps):
        y_raw, state = model.invoke(model.encode_x(long[k : k + 1]), state)
        y_q[k] = model.decode_y(y_raw)[0]
        for j, (s, lim) in enumerate(zip(state, limits)):
            if lim is not None:
                sat[j] += int(((s == lim[0]) | (s == lim[1])).sum())
        if k and k % 5000 == 0:
            progress(f"  drift: {k}/{steps} steps")
    elapsed = time.perf_counter() - t0
    err = np.abs(y_q - y_float).max(-1)
    tenth = max(1, steps // 10)
    first, last = float(err[:tenth].mean()), float(err[-tenth:].mean())
    # The first tenth starts from the zero state, a regime of its own; the second tenth sees
    # the same inputs as the last with a carried state, so the two differ only by drift.
    second = float(err[tenth : 2 * tenth].mean())
    res: dict[str, Any] = {
        "steps": steps,
        "first_10pct_mean_error": first,
        "last_10pct_mean_error": last,
        "drift_ratio": _ratio(last, first),
        "second_10pct_mean_error": second,
        "drift_ratio_steady": _ratio(last, second),
        "max_abs_error": float(err.max()),
        "state_saturation": {
            name: sat[j] / (steps * state[j].shape[1])
            for j, (name, _) in enumerate(engine.manifest.state_names)
        },
        "us_per_step": elapsed / steps * 1e6,
    }
    res["no_drift"] = last <= max_ratio * second + DRIFT_ABS_FLOOR
    if engine.manifest.output_kind == "classifier":
        res["top1_agreement"] = float((y_q.argmax(-1) == y_float.argmax(-1)).mean())
    else:
        res["rmse_vs_float_rel"] = float(
            np.sqrt(((y_q - y_float) ** 2).mean()) / max(y_float.std(), 1e-12)
        )
    return res, err


def probe(engine: edge.Engine) -> np.ndarray:
    return engine.step("probe", probe_inputs(engine.manifest.features))


def device_python() -> str | None:
    """A Python with tflite-runtime 2.14 (the device-like environment), if one is configured."""
    env = os.environ.get("EDGE_LSTM_DEVICE_PYTHON")
    if env:
        if shutil.which(env) is None:
            raise ConvertError(f"EDGE_LSTM_DEVICE_PYTHON={shown(env)}: no such executable")
        return env
    guess = Path(__file__).resolve().parent.parent / ".venv-device" / "bin" / "python"
    return str(guess) if guess.exists() else None


device_env = kernels.device_env  # one rule for every call into the device Python


def interpreters(bundle: Path, reference_y: np.ndarray, dev_python: str | None) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in ("litert", "tensorflow"):
        if name not in available():
            res[name] = {"status": "not installed"}
            continue
        try:
            with warnings.catch_warnings():  # tf.lite's own deprecation warning
                warnings.simplefilter("ignore")
                eng = edge.load(bundle, backend=name, kernel_mismatch="allow")
            y = probe(eng)
            res[name] = {
                "status": "passed",
                "version": eng.model.backend.version,
                "probe_max_diff": float(np.abs(y - reference_y).max()),
            }
        except Exception as exc:  # report, do not stop: the summary says which failed
            res[name] = {"status": "failed", "error": str(exc)}
    if dev_python is None:
        res["tflite"] = {"status": "not available (set EDGE_LSTM_DEVICE_PYTHON)"}
        return res
    cmd = [dev_python, "-m", "edge", "inspect", str(bundle), "--json", "--backend", "tflite"]
    cmd += ["--kernel-mismatch", "warn"]  # the kernel sets are judged by ``kernels``
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            env=device_env(),
            preexec_fn=ending_with_us(),  # a killed converter leaves no check running
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        res["tflite"] = {"status": "failed", "error": str(exc)}
        return res
    if proc.returncode != 0:
        res["tflite"] = {"status": "failed", "error": kernels.failure(proc)}
        return res
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        y = np.asarray(info["probe_y"])
    except (ValueError, IndexError, KeyError) as exc:
        res["tflite"] = {
            "status": "failed",
            "error": f"unreadable inspect output: {exc}: "
            f"{shown(proc.stdout[-300:], 400)} {shown(proc.stderr[-300:], 400)}",
        }
        return res
    res["tflite"] = {
        "status": "passed",
        "version": info["backend_version"],
        "probe_max_diff": float(np.abs(y - reference_y).max()),
    }
    return res


def verify(
    bundle: Path,
    spec: ModelSpec,
    data: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    targets: verdict.Targets | None = None,
    dev_python: str | None = None,
    progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    float_model: FloatModel | None = None,
) -> dict[str, Any]:
    """``float_model``: the source model as the float reference (default: the NumPy reference
    of ``spec``, which also gives the states and normalised inputs either way)."""
    targets = targets or verdict.Targets()
    t0 = time.perf_counter()
    engine = edge.load(bundle, kernel_mismatch="allow")  # refuses a model it cannot open
    _, content = read_bundle(bundle)  # the manifest's model_file, checked as loaded
    audit = op_audit(content)
    progress(f"  parity on {len(data)} sequences x {data.shape[1]} steps")
    # A bundle that ends at the logits (the runtime applies the softmax): the reference stops
    # there too, once, for the output tensor's range; the float outputs are their softmax.
    softmax = engine.manifest.output_activation == "softmax"
    y_tensor, states, xn = reference.run(quantize.logits(spec) if softmax else spec, data)
    y_float = reference.activate(y_tensor, "softmax") if softmax else y_tensor
    if float_model is not None:
        y_float = float_model.run(data)
    par, y_q = parity(engine, spec, data, labels, y_float)
    progress(f"  closed-loop drift over {targets.long_steps} steps")
    dr, err = drift(
        engine, spec, data, targets.long_steps, progress, targets.max_drift_ratio, float_model
    )
    progress("  interpreters")
    interp = interpreters(bundle, probe(engine), dev_python)
    progress("  closed loop in every kernel set")
    long = periodic_stream(data, targets.long_steps)
    y_long = float_outputs(spec, long[None], float_model)
    kern = kernels.verify_kernel_sets(
        bundle,
        engine.manifest,
        {"parity": data, "long": long[None]},
        {"parity": y_float, "long": y_long},
        labels,
        dev_python,
        {
            "top1_agreement": targets.min_agreement,
            "drift_ratio": targets.max_drift_ratio,
            "max_accuracy_drop": targets.max_accuracy_drop,
            "max_rmse_ratio": targets.max_rmse_ratio,
            "regime": targets.regime,
        },
        DRIFT_ABS_FLOOR,
        spec.sequence_output,
    )
    report = {
        "bundle": str(bundle),
        "quantization": engine.manifest.quantization,
        "source": float_model.describe()
        if float_model is not None
        else {"format": "keras", "float_reference": "the NumPy reference of the model's layers"},
        "normalization": engine.manifest.extra.get("normalization"),
        "tflite_bytes": len(content),
        "op_audit": audit,
        "parity": par,
        "drift": dr,
        "saturation": tensor_saturation(
            engine,
            data if engine.manifest.extra.get("normalization") == "graph" else xn,
            y_tensor if softmax else y_float,  # the values the output tensor holds
            states,
        ),
        "interpreters": interp,
        "kernel_sets": kern,
        "targets": targets.to_dict(),
        "seconds": time.perf_counter() - t0,
    }
    report["gates"] = verdict.gates(report, targets)
    report["checks"] = verdict.checks(report, targets)
    report["advice"] = verdict.advice(report, targets)
    report["_long_error"] = err  # for the plot; dropped before JSON
    report["_y"] = (y_q, y_float)
    return report


def hard_failures(report: dict[str, Any]) -> list[str]:
    out = []
    if report["op_audit"]["forbidden"]:
        out.append(f"forbidden ops: {', '.join(report['op_audit']['forbidden'])}")
    for name, v in report["interpreters"].items():
        if v["status"] == "failed":
            out.append(f"the bundle failed to run in {name}: {v['error']}")
    return out


def save(report: dict[str, Any], directory: Path) -> None:
    from . import report as plot

    clean = {k: v for k, v in report.items() if not k.startswith("_")}
    (directory / "report.json").write_text(json.dumps(clean, indent=2) + "\n")
    plot.plot(report, directory / "report.png")


def fidelity_summary(report: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "max_abs_error",
        "mean_abs_error",
        "top1_agreement",
        "accuracy_float",
        "accuracy_bundle",
        "rmse_float",
        "rmse_bundle",
        "rmse_ratio",
        "rmse_vs_float_rel",
    )
    par, dr = report["parity"], report["drift"]
    return {
        "parity": {k: par[k] for k in keep if k in par},
        "drift": {
            k: dr[k]
            for k in (
                "steps",
                "drift_ratio",
                "drift_ratio_steady",
                "first_10pct_mean_error",
                "second_10pct_mean_error",
                "last_10pct_mean_error",
                "top1_agreement",
            )
            if k in dr
        },
        "checks": report["checks"],
    }


def raise_on_hard_failures(report: dict[str, Any]) -> None:
    bad = hard_failures(report)
    if bad:
        raise VerificationFailed("; ".join(bad))

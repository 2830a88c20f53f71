"""The verdict: task metrics of float and bundle on ``--data``, the gates, and what to try.

Pure NumPy, no TensorFlow. The gates are the task's: a regressor's RMSE against its targets,
a classifier's accuracy against its labels and its per-step top-1 agreement with the float
model, and no drift over a long stream. Long-stream agreement gates only models meant to run
unreset (``regime="continuous"``); a model reset between sequences gets it reported.

Many-to-one meaning: after ``t`` samples a stream's output is the model's prediction on that
``t``-sample prefix, so a label per sequence (``y[N]``, ``y[N, 1]``, ``y[N, O]``) is compared
with the output after the sequence's last sample, and a label per step (``y[N, T]``,
``y[N, T, O]``) with every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge.errors import shown

from .errors import ConvertError

REGIMES = ("sequences", "continuous")
# The drift stream is held in memory with its float reference, and stepped once per kernel
# set: 100x the default is hours, not a memory error after the conversion.
MAX_LONG_STEPS = 1_000_000


@dataclass(frozen=True)
class Targets:
    """The thresholds of the verdict (every one a command-line option)."""

    max_rmse_ratio: float = 1.05
    max_accuracy_drop: float = 0.01
    min_agreement: float = 0.98
    max_drift_ratio: float = 1.2
    max_saturation: float = 0.001
    regime: str = "sequences"
    long_steps: int = 10_000

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ConvertError(f"--regime {shown(self.regime)} is not one of {', '.join(REGIMES)}")
        for name in ("max_rmse_ratio", "max_drift_ratio"):
            if not getattr(self, name) >= 1.0:
                raise ConvertError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        for name in ("max_accuracy_drop", "min_agreement", "max_saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConvertError(
                    f"--{name.replace('_', '-')} {getattr(self, name)} must be in [0, 1]"
                )
        if self.long_steps < 100:
            raise ConvertError(f"--long-steps {self.long_steps} must be >= 100")
        if self.long_steps > MAX_LONG_STEPS:
            raise ConvertError(f"--long-steps {self.long_steps} must be <= {MAX_LONG_STEPS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_alignment(
    labels: np.ndarray, kind: str, n: int, t: int, outputs: int, sequence_output: bool = True
) -> str:
    """'step' (a label per step) or 'last' (a label per sequence); a bad shape is exit 2."""
    shape = tuple(labels.shape)
    if not shape or shape[0] != n:
        raise ConvertError(f"--data: labels 'y' have shape {list(shape)}, expected {n} rows")
    if labels.dtype.kind not in "biuf" or not np.isfinite(labels).all():
        raise ConvertError(
            f"--data: labels 'y' ({labels.dtype}) must be finite numbers: class indices, "
            "one-hot rows or targets"
        )
    if kind == "classifier":
        per_step = {(n, t), (n, t, outputs)}
        per_seq = {(n,), (n, 1), (n, outputs)}
    else:
        per_step = {(n, t, outputs)} | ({(n, t)} if outputs == 1 else set())
        per_seq = {(n, outputs)} | ({(n,)} if outputs == 1 else set())
    if shape in per_seq and shape in per_step:
        return "step" if sequence_output else "last"
    if shape in per_seq:
        return "last"
    if shape in per_step:
        return "step"
    ok = " / ".join(str(list(s)) for s in sorted(per_seq | per_step, key=len))
    hint = ""
    if kind == "regressor" and outputs > 1 and shape in {(n,), (n, t)}:
        hint = (
            " (class indices? a classifier without a softmax at its end is taken for a "
            "regressor: give --labels)"
        )
    raise ConvertError(
        f"--data: labels 'y' have shape {list(shape)}; for this {kind} with {outputs} outputs "
        f"expected {ok}{hint}"
    )


def class_index(labels: np.ndarray, where: str, outputs: int) -> np.ndarray:
    """Integer class labels from indices or one-hot rows."""
    one_hot_ndim = 2 if where == "last" else 3
    if labels.ndim == one_hot_ndim and labels.shape[-1] == outputs:
        rows = labels.reshape(-1, outputs)
        one_hot = np.isin(rows, (0, 1)).all(-1) & (rows.sum(-1) == 1)
        if outputs > 1 and not one_hot.all():
            bad = int(np.flatnonzero(~one_hot)[0])
            raise ConvertError(
                f"--data: labels 'y' are not one-hot (row {bad} is {rows[bad].tolist()}): for "
                "a multi-label model (several classes at once), convert it without --labels: it "
                "is then judged per output, by RMSE"
            )
        return np.asarray(labels.argmax(-1))
    n = labels.shape[0]
    if (labels != np.round(labels)).any():
        raise ConvertError("--data: labels 'y' must be whole class indices (or one-hot rows)")
    index = labels.reshape((n,) if where == "last" else (n, -1)).astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= outputs):
        bad = int(index[(index < 0) | (index >= outputs)][0])
        raise ConvertError(f"--data: label {bad} is not a class of this model (0..{outputs - 1})")
    return index


def task_metrics(
    y_float: np.ndarray,
    y_bundle: np.ndarray,
    labels: np.ndarray | None,
    *,
    kind: str,
    sequence_output: bool,
) -> dict[str, Any]:
    """Figures of float and bundle on ``--data``: y [N, T, O] per step (all steps streamed)."""
    n, t, o = y_float.shape
    res: dict[str, Any] = {
        "sequence_output": sequence_output,
        "max_abs_error": float(np.abs(y_bundle - y_float).max()),
        "mean_abs_error": float(np.abs(y_bundle - y_float).mean()),
    }
    if kind == "classifier":
        agree = y_bundle.argmax(-1) == y_float.argmax(-1)
        res["top1_agreement"] = float(agree.mean())
        res["top1_agreement_last_step"] = float(agree[:, -1].mean())
    else:
        res["rmse_vs_float"] = float(np.sqrt(((y_bundle - y_float) ** 2).mean()))
        res["rmse_vs_float_rel"] = res["rmse_vs_float"] / max(float(y_float.std()), 1e-12)
    if labels is None:
        res["labels"] = "none"
        return res
    where = label_alignment(labels, kind, n, t, o, sequence_output)
    res["labels"] = "per sequence (output after the last sample)" if where == "last" else "per step"
    yf, yb = (y_float[:, -1], y_bundle[:, -1]) if where == "last" else (y_float, y_bundle)
    if kind == "classifier":
        lab = class_index(labels, where, o)
        acc_f = float((yf.argmax(-1) == lab).mean())
        acc_b = float((yb.argmax(-1) == lab).mean())
        res.update(accuracy_float=acc_f, accuracy_bundle=acc_b, accuracy_drop=acc_f - acc_b)
    else:
        target = labels.astype(np.float64).reshape(yf.shape)
        rmse_f = float(np.sqrt(((yf - target) ** 2).mean()))
        rmse_b = float(np.sqrt(((yb - target) ** 2).mean()))
        res.update(rmse_float=rmse_f, rmse_bundle=rmse_b, rmse_ratio=_ratio(rmse_b, rmse_f))
    return res


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == 0 else float("inf"))


def saturation(
    values: np.ndarray, dtype: str, scale: float, zero_point: int
) -> dict[str, float] | None:
    """How much of ``values`` falls outside what an integer tensor can represent."""
    if dtype == "float32":
        return None
    lo_q, hi_q = (-128, 127) if dtype == "int8" else (-32768, 32767)
    lo, hi = (lo_q - zero_point) * scale, (hi_q - zero_point) * scale
    v = np.asarray(values, np.float64)
    # half a step beyond the end still rounds onto the last code: not clipped
    out = (v < lo - scale / 2) | (v > hi + scale / 2)
    return {
        "range_min": float(lo),
        "range_max": float(hi),
        "data_min": float(v.min()),
        "data_max": float(v.max()),
        "clipped": float(out.mean()),
    }


# Errors below this are rounding noise; a ratio of noise means nothing (the no-drift gate).
DRIFT_ABS_FLOOR = 1e-3


def gates(report: dict[str, Any], targets: Targets) -> dict[str, dict[str, Any]]:
    """Every check beside the figure it reads and the limit it applies (report.json "gates").

    ``figure`` names the measured value's place in the report, ``rule`` and ``limit`` say what
    it must meet; ``gated`` is false for a figure that is reported, not judged (long-stream
    agreement of a model meant to be reset). A missing figure (no labels, a regressor) has no
    entry. ``checks`` is derived from this, so the two can never disagree.
    """
    par, dr = report["parity"], report["drift"]
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, figure: str, value: Any, rule: str, limit: Any, gated: bool = True) -> None:
        tol = 1e-9  # a figure equal to its limit up to float rounding meets it
        passed = (
            value >= limit - tol
            if rule == ">="
            else value <= limit + tol
            if rule == "<="
            else value
        )
        out[name] = {
            "figure": figure,
            "measured": value,
            "rule": rule,
            "limit": limit,
            "passed": bool(passed),
            "gated": gated,
        }

    add("op_audit", "op_audit.passed", bool(report["op_audit"]["passed"]), "is true", True)
    add(
        "interpreters",
        "interpreters.*.status",
        all(v["status"] != "failed" for v in report["interpreters"].values()),
        "is true",
        True,
    )
    second = dr.get("second_10pct_mean_error")
    if second is not None and "last_10pct_mean_error" in dr:
        # the same rule as verify.drift's ``no_drift``: max_drift_ratio x the 2nd tenth's error
        add(
            "no_drift",
            "drift.last_10pct_mean_error",
            float(dr["last_10pct_mean_error"]),
            "<=",
            targets.max_drift_ratio * float(second) + DRIFT_ABS_FLOOR,
        )
    else:
        add("no_drift", "drift.no_drift", bool(dr["no_drift"]), "is true", True)
    if "rmse_ratio" in par:
        add("rmse_ratio", "parity.rmse_ratio", par["rmse_ratio"], "<=",
            targets.max_rmse_ratio)  # fmt: skip
    if "accuracy_drop" in par:
        add("accuracy", "parity.accuracy_bundle", par["accuracy_bundle"], ">=",
            par["accuracy_float"] - targets.max_accuracy_drop)  # fmt: skip
    if "top1_agreement" in par:
        add("top1_agreement", "parity.top1_agreement", par["top1_agreement"], ">=",
            targets.min_agreement)  # fmt: skip
    if "top1_agreement" in dr:
        add("long_stream_top1_agreement", "drift.top1_agreement", dr["top1_agreement"], ">=",
            targets.min_agreement, gated=targets.regime == "continuous")  # fmt: skip
    if report.get("kernel_sets", {}).get("sets"):  # each reachable kernel set meets what the
        kern = report["kernel_sets"]  # reference set meets
        add("kernel_sets", "kernel_sets.verified", set(kern["verified"]) == set(kern["sets"]),
            "is true", True)  # fmt: skip
    return out


def checks(report: dict[str, Any], targets: Targets) -> dict[str, bool]:
    """The gates' outcomes; a figure that is only reported is not among them."""
    return {k: g["passed"] for k, g in gates(report, targets).items() if g["gated"]}


def advice(report: dict[str, Any], targets: Targets) -> list[str]:
    """One line per failed gate or warning: what failed, by how much, and what to try."""
    par, dr, ch = report["parity"], report["drift"], report["checks"]
    mode = report["quantization"]
    lighter = mode in ("int8", "int8-float-head", "int8-float-cell", "int16x8", "float16")
    other = {
        "int8": "--quant int8-float-cell, --quant int8-float-head, --quant int16x8 "
        "(or --quant auto)",
        "int8-float-head": "--quant int16x8 (or --quant auto)",
        "int8-float-cell": "--quant int16x8 (or --quant auto)",
        "int16x8": "--quant float16 (or --quant auto)",
        "float16": "--quant float32",
    }.get(mode, "")
    graph_norm = report.get("normalization") == "graph"
    # An int8 cell state clips by choice (``quantize.choose_c_range``): not a calibration gap.
    clipped = {
        k: v["clipped"]
        for k, v in report.get("saturation", {}).items()
        if v and v["clipped"] > targets.max_saturation and v.get("role") != "c"
    }
    out = []
    cal_hint = (
        "; calibration data does not cover --data ("
        + ", ".join(f"{k} {v:.2%} clipped" for k, v in clipped.items())
        + "): calibrate on data spanning the operating range"
        if clipped
        else ""
    )
    norm_hint = (
        "; the model normalises inside the graph: try --normalization runtime" if graph_norm else ""
    )
    try_other = f": try {other}" if lighter else ""
    if not ch.get("rmse_ratio", True):
        out.append(
            f"RMSE {par['rmse_bundle']:.4g} is x{par['rmse_ratio']:.3f} of float "
            f"{par['rmse_float']:.4g} (limit x{targets.max_rmse_ratio}){try_other}"
            f"{norm_hint}{cal_hint}"
        )
    if not ch.get("accuracy", True):
        out.append(
            f"accuracy {par['accuracy_bundle']:.2%} vs float {par['accuracy_float']:.2%} "
            f"(limit -{targets.max_accuracy_drop:.1%}){try_other}{norm_hint}{cal_hint}"
        )
    if not ch.get("top1_agreement", True):
        out.append(
            f"per-step top-1 agreement {par['top1_agreement']:.2%} < "
            f"{targets.min_agreement:.0%}{try_other}"
            f"{'' if mode == 'float32' else ', or --per-channel'}{norm_hint}{cal_hint}"
        )
    if not ch.get("long_stream_top1_agreement", True):
        out.append(
            f"long-stream top-1 agreement {dr['top1_agreement']:.2%} < "
            f"{targets.min_agreement:.0%} over {dr['steps']} unreset steps{try_other}"
        )
    if not ch["no_drift"]:
        out.append(
            f"the error grows over a long stream (last 10% {dr['last_10pct_mean_error']:.3g} vs "
            f"2nd 10% {dr['second_10pct_mean_error']:.3g}, limit x{targets.max_drift_ratio})"
            + (
                (": try " if mode == "float16" else ": the state clips its range; try ")
                + (
                    other
                    if mode in ("int16x8", "float16")  # int16x8 itself is no remedy there
                    else ("--quant int8-float-cell, " if mode == "int8" else "")
                    + "--quant int16x8 or --quant auto"
                )
                if lighter
                else ""
            )
        )
    if ch.get("kernel_sets") is False:
        kern = report["kernel_sets"]
        bad = ", ".join(sorted(set(kern["sets"]) - set(kern["verified"])))
        out.append(
            f"kernel set(s) {bad} miss targets that {kern['reference']} meets: a device running "
            "them would not compute what was verified; try another --quant mode"
        )
    if clipped and not out:
        out.append(
            "warning: "
            + ", ".join(f"{k} {v:.2%}" for k, v in clipped.items())
            + " of values on --data fall outside the bundle's ranges (clipped): calibrate on "
            "data spanning the operating range"
        )
    if par.get("labels") == "none":
        out.append(
            "note: --data has no labels 'y': the task metric (accuracy or RMSE against targets) "
            "was not checked; give an .npz with 'x' and 'y'"
        )
    return out

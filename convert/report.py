"""The fidelity plot: error over the long stream with the no-drift gate's limit, and agreement
(per class and overall) on a zoomed axis with the gate's limit, so 0.98 and 0.995 look
different (or y vs float for regressors). Every limit drawn is the one in report["gates"],
i.e. the one the verdict applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure(report: dict[str, Any]) -> Any:
    """The figure of report.png (a matplotlib Figure; the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err = np.asarray(report["_long_error"], dtype=float)
    dr = report["drift"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    w = max(1, len(err) // 200)
    smooth = np.convolve(err, np.ones(w) / w, mode="valid")
    a.plot(err, lw=0.3, alpha=0.4, label="per step")
    a.plot(np.arange(len(smooth)) + w // 2, smooth, lw=1.2, label=f"mean of {w}")
    n, tenth = len(err), max(1, len(err) // 10)
    second, last = dr.get("second_10pct_mean_error"), dr.get("last_10pct_mean_error")
    gates = report.get("gates", {})
    drift_gate = gates.get("no_drift", {})
    limit = drift_gate.get("limit") if drift_gate.get("rule") == "<=" else None
    if second is not None and last is not None:
        a.hlines(second, tenth, 2 * tenth, colors="k", lw=2, label=f"2nd 10% mean {second:.3g}")
        a.hlines(last, n - tenth, n, colors="C2", lw=2, label=f"last 10% mean {last:.3g}")
        if limit is not None:
            ok = "ok" if drift_gate["passed"] else "FAILED"
            a.hlines(
                limit, n - tenth, n, colors="C3", ls="--", lw=1.5,
                label=f"no-drift limit {limit:.3g} ({ok})",
            )  # fmt: skip
    a.set(
        title=f"{report['quantization']}: |y - float| over one {n}-step stream",
        xlabel="step",
        ylabel="max abs error",
    )
    a.legend(fontsize=7)
    per_class = report["parity"].get("per_class_agreement")
    step_gate, long_gate = gates.get("top1_agreement"), gates.get("long_stream_top1_agreement")
    if per_class:
        names = [*per_class, "all"]
        overall = report["parity"]["top1_agreement"]
        values = np.array([*(per_class[k] or 0.0 for k in per_class), overall])
        shown = [float(values.min())]
        shown += [g["limit"] for g in (step_gate, long_gate) if g]
        shown += [long_gate["measured"]] if long_gate else []
        low = min(shown)
        floor = max(0.0, low - max(0.01, (1 - low) * 0.25))
        colours = ["C0"] * (len(names) - 1) + ["C1"]
        bars = b.bar(names, values, color=colours)
        b.bar_label(bars, labels=[f"{v:.4f}" for v in values], fontsize=8)
        if step_gate:
            b.axhline(step_gate["limit"], color="C3", ls="--", lw=1,
                      label=_gate_label("per-step gate ('all')", step_gate))  # fmt: skip
        if long_gate:
            b.axhline(long_gate["measured"], color="C2", lw=1,
                      label=f"long stream {long_gate['measured']:.4f} "
                      + ("(gated)" if long_gate["gated"] else "(reported, not gated)"))  # fmt: skip
        b.set(
            title="top-1 agreement with float (held-out parity; zoomed axis)",
            ylim=(floor, 1.0 + (1 - floor) * 0.08),
        )
        b.legend(fontsize=7, loc="lower right")
    else:
        y_q, y_f = report["_y"]
        b.scatter(y_f.ravel(), y_q.ravel(), s=1, alpha=0.3)
        lo, hi = float(np.min(y_f)), float(np.max(y_f))
        b.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = float")
        rmse = gates.get("rmse_ratio")
        b.set(
            title="bundle y vs float y"
            + (f"; RMSE x{rmse['measured']:.3f}, {_gate_label('gate', rmse)}" if rmse else ""),
            xlabel="float",
            ylabel="bundle",
        )
        b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _gate_label(what: str, gate: dict[str, Any]) -> str:
    """e.g. "per-step gate ('all') >= 0.98: ok"."""
    return f"{what} {gate['rule']} {gate['limit']:g}: {'ok' if gate['passed'] else 'FAILED'}"

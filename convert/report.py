"""The fidelity plot: error over the long stream (with the drift check's limit when the report
carries it), and agreement per class on an axis that shows the difference between 0.98 and
0.995 (or y vs float for regressors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot(report: dict[str, Any], path: Path) -> None:
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
    limit = report.get("_drift_limit")
    if second is not None and last is not None:
        a.hlines(second, tenth, 2 * tenth, colors="k", lw=2, label=f"2nd 10% mean {second:.3g}")
        a.hlines(last, n - tenth, n, colors="C2", lw=2, label=f"last 10% mean {last:.3g}")
        if limit is not None:
            ok = "ok" if dr.get("no_drift") else "FAILED"
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
    target = report.get("_top1_target")
    if per_class:
        names = list(per_class)
        values = np.array([per_class[k] or 0.0 for k in names])
        low = min(float(values.min()), target or 1.0)
        floor = max(0.0, low - max(0.01, (1 - low) * 0.25))
        bars = b.bar(names, values, color="C0")
        b.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
        if target is not None:
            b.axhline(target, color="C3", ls="--", lw=1, label=f"long-stream target {target:g}")
        if "top1_agreement" in dr:
            b.axhline(dr["top1_agreement"], color="C2", lw=1,
                      label=f"long stream {dr['top1_agreement']:.4f}")  # fmt: skip
        b.set(
            title="top-1 agreement with float per class (held-out parity)",
            ylim=(floor, 1.0 + (1 - floor) * 0.08),
        )
        b.legend(fontsize=7, loc="lower right")
    else:
        y_q, y_f = report["_y"]
        b.scatter(y_f.ravel(), y_q.ravel(), s=1, alpha=0.3)
        lo, hi = float(np.min(y_f)), float(np.max(y_f))
        b.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = float")
        b.set(title="bundle y vs float y", xlabel="float", ylabel="bundle")
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

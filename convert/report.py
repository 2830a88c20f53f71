"""The fidelity plot: error over the long stream, and agreement per class (or y vs float)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err = report["_long_error"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    w = max(1, len(err) // 200)
    smooth = np.convolve(err, np.ones(w) / w, mode="valid")
    a.plot(err, lw=0.3, alpha=0.4, label="per step")
    a.plot(np.arange(len(smooth)) + w // 2, smooth, lw=1.2, label=f"mean of {w}")
    a.set(
        title=f"{report['quantization']}: |y - float| over one {len(err)}-step stream",
        xlabel="step",
        ylabel="max abs error",
    )
    a.legend()
    per_class = report["parity"].get("per_class_agreement")
    if per_class:
        names = list(per_class)
        b.bar(names, [per_class[n] or 0 for n in names])
        b.set(title="top-1 agreement with float, per class", ylim=(0, 1.05))
    else:
        y_q, y_f = report["_y"]
        b.scatter(y_f.ravel(), y_q.ravel(), s=1, alpha=0.3)
        b.set(title="bundle y vs float y", xlabel="float", ylabel="bundle")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

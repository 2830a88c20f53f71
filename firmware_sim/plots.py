"""score.png: latency on a log scale, and every stream as one row of a compact heat map.

The grid is pure NumPy (``stream_grid``, tested on its own); matplotlib is imported only to
draw, so a machine without it still gets its score.json.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .devices import Key, Sent

# Cell codes of the heat map, in legend order.
CELLS = (
    "prediction = label",
    "prediction != label",
    "no label",
    "no prediction",
    "nothing due (invalid or lost)",
)
RIGHT, WRONG, UNLABELLED, MISSING, SKIPPED = range(len(CELLS))
CELL_COLOURS = ("#4caf50", "#e53935", "#90a4ae", "#212121", "#ffffff")


@dataclass(frozen=True)
class StreamGrid:
    streams: list[str]
    cells: np.ndarray  # [streams, samples] of cell codes, SKIPPED past a stream's end
    faults: list[tuple[int, int, str]]  # (row, column, fault kind) of each faulty message


def stream_grid(
    log: Sequence[Sent], predicted: Mapping[Key, Any], wanted: set[Key] | None = None
) -> StreamGrid:
    """One row per stream, one column per sample in the order the device made them (boots one
    after another). ``predicted``: key -> predicted class index (or None for a regressor);
    ``wanted``: keys a prediction was due for (default: every valid sample that was sent)."""
    by_stream: dict[str, list[Sent]] = {}
    for m in sorted(log, key=lambda m: (m.stream, m.epoch, m.created)):
        by_stream.setdefault(m.stream, []).append(m)
    streams = sorted(by_stream, key=natural)
    width = max((sum(len(m.values) for m in ms) for ms in by_stream.values()), default=0)
    cells = np.full((len(streams), max(width, 1)), SKIPPED, dtype=np.int8)
    faults: list[tuple[int, int, str]] = []
    for row, stream in enumerate(streams):
        col = 0
        for m in by_stream[stream]:
            labels = m.labels if m.labels is not None else [None] * len(m.values)
            for c, kind in ((col, f) for f in m.faults):
                faults.append((row, c, kind))
            for key, label in zip(m.keys, labels):
                due = (m.valid and m.delivered) if wanted is None else key in wanted
                if key in predicted:
                    guess = predicted[key]
                    if label is None or guess is None:
                        cells[row, col] = UNLABELLED
                    else:
                        cells[row, col] = RIGHT if int(guess) == int(label) else WRONG
                elif due:
                    cells[row, col] = MISSING
                col += 1
    return StreamGrid(streams, cells, faults)


def natural(name: str) -> list[Any]:
    """Sort key: dev-2 before dev-10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def latency_bins(latency_ms: np.ndarray, n: int = 40) -> np.ndarray:
    """Log-spaced bin edges covering every latency, so the tail is as visible as the bulk."""
    positive = latency_ms[latency_ms > 0]
    lo = max(float(positive.min()) if len(positive) else 1.0, 0.01)
    hi = max(float(latency_ms.max()) if len(latency_ms) else 10.0, lo * 10)
    return np.geomspace(lo, hi * 1.01, n + 1)


def plot_score(
    path: Path,
    latency_ms: np.ndarray,
    grid: StreamGrid,
    verdict: str,
    percentiles: Mapping[str, float],
) -> None:
    import matplotlib.pyplot as plt

    fig = score_figure(latency_ms, grid, verdict, percentiles)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def score_figure(
    latency_ms: np.ndarray, grid: StreamGrid, verdict: str, percentiles: Mapping[str, float]
) -> Any:
    """The figure of score.png (a matplotlib Figure; the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows = len(grid.streams)
    height = min(12.0, 3.5 + 0.12 * rows)
    fig, (a, b) = plt.subplots(
        1, 2, figsize=(14, height), gridspec_kw={"width_ratios": [1, 2.2]}, squeeze=True
    )
    if len(latency_ms):
        a.hist(np.clip(latency_ms, 0.01, None), bins=latency_bins(latency_ms), color="#1976d2")
        a.set_xscale("log")
        a.set_yscale("log")
        for name, value in percentiles.items():
            a.axvline(value, color="k", ls="--", lw=0.8)
            a.annotate(
                f"{name} {value:.0f} ms",
                (value, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
    else:
        a.text(0.5, 0.5, "no predictions", ha="center", transform=a.transAxes)
    a.set(title="publish -> prediction latency", xlabel="ms (log scale)", ylabel="predictions")
    cmap = ListedColormap(list(CELL_COLOURS))
    if grid.cells.size:
        b.imshow(
            grid.cells,
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            vmin=-0.5,
            vmax=len(CELLS) - 0.5,
        )
    else:  # an empty image has no extent: matplotlib warns of a singular transformation
        b.text(0.5, 0.5, "no samples", ha="center", transform=b.transAxes)
    if grid.faults:
        kinds = sorted({k for _, _, k in grid.faults})
        markers = dict(zip(kinds, "v^<>osDpPh*H8d"))  # filled markers only
        for kind in kinds:
            pts = np.array([(c, r) for r, c, k in grid.faults if k == kind])
            b.scatter(pts[:, 0], pts[:, 1], marker=markers[kind], s=14, c="#ffb300", ec="k", lw=0.3)
        fault_handles = [
            plt.Line2D([], [], ls="", marker=markers[k], mfc="#ffb300", mec="k", label=k)
            for k in kinds
        ]
    else:
        fault_handles = []
    b.set_yticks(range(rows), grid.streams, fontsize=6 if rows > 30 else 8)
    b.set(
        title="every stream, every sample: prediction vs label; markers: injected faults",
        xlabel="sample (in the order the device made them)",
    )
    legend = [Patch(color=c, label=n) for n, c in zip(CELLS, CELL_COLOURS) if n != CELLS[SKIPPED]]
    b.legend(
        handles=legend + fault_handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=7,
        frameon=False,
    )
    fig.suptitle(verdict, fontsize=11)
    fig.tight_layout()
    return fig

"""report.png and score.png: the lines and markers a reader needs are really drawn."""

from __future__ import annotations

import numpy as np
import pytest

from convert import report as report_plot
from convert import verdict
from firmware_sim.devices import Sent
from firmware_sim.plots import score_figure, stream_grid

pytestmark = pytest.mark.desktop  # matplotlib is a desktop extra


def _classifier_report(top1: float) -> dict:
    rng = np.random.default_rng(0)
    err = np.abs(rng.normal(0.01, 0.002, 2000))
    tenth = len(err) // 10
    r = {
        "quantization": "int8",
        "op_audit": {"passed": True},
        "interpreters": {"litert": {"status": "passed"}},
        "parity": {
            "top1_agreement": top1,
            "per_class_agreement": {"a": 0.999, "b": top1, "c": 0.995},
        },
        "drift": {
            "no_drift": True,
            "steps": len(err),
            "top1_agreement": 0.991,
            "second_10pct_mean_error": float(err[tenth : 2 * tenth].mean()),
            "last_10pct_mean_error": float(err[-tenth:].mean()),
        },
        "_long_error": err,
    }
    r["gates"] = verdict.gates(r, verdict.Targets())
    return r


def _hlines(ax) -> dict[str, float]:
    """label -> y of every horizontal line and line collection on ``ax``."""
    out = {}
    for line in ax.get_lines():
        y = np.unique(line.get_ydata())
        if len(y) == 1:
            out[line.get_label()] = float(y[0])
    for coll in ax.collections:
        segs = coll.get_segments() if hasattr(coll, "get_segments") else []
        if len(segs) == 1 and segs[0][0][1] == segs[0][-1][1]:
            out[coll.get_label()] = float(segs[0][0][1])
    return out


def test_report_png_draws_the_gates_limits_on_a_readable_axis():
    import matplotlib.pyplot as plt

    r = _classifier_report(0.985)
    fig = report_plot.figure(r)
    drift_ax, agree_ax = fig.axes[:2]
    lines = _hlines(drift_ax)
    (label,) = [k for k in lines if k.startswith("no-drift limit")]
    assert lines[label] == pytest.approx(r["gates"]["no_drift"]["limit"]) and "(ok)" in label
    lines = _hlines(agree_ax)
    (label,) = [k for k in lines if k.startswith("per-step gate")]
    assert lines[label] == 0.98 and label.endswith(">= 0.98: ok")
    assert any(k.startswith("long stream 0.9910 (reported, not gated)") for k in lines)
    assert [t.get_text() for t in agree_ax.get_xticklabels()] == ["a", "b", "c", "all"]
    lo, hi = agree_ax.get_ylim()
    # 0.98 and 0.995 lie at least a tenth of the axis apart (a 0-1 axis gives 1.5%)
    assert lo < 0.98 and hi >= 1.0 and (0.995 - 0.98) / (hi - lo) > 0.1
    plt.close(fig)
    failing = _classifier_report(0.975)
    fig = report_plot.figure(failing)
    assert any(k.endswith(">= 0.98: FAILED") for k in _hlines(fig.axes[1]))
    plt.close(fig)


def test_report_png_of_a_regressor_names_its_rmse_gate():
    import matplotlib.pyplot as plt

    r = _classifier_report(0.99)
    del (
        r["parity"]["per_class_agreement"],
        r["parity"]["top1_agreement"],
        r["drift"]["top1_agreement"],
    )
    r["parity"].update(rmse_float=1.0, rmse_bundle=1.07, rmse_ratio=1.07)
    r["gates"] = verdict.gates(r, verdict.Targets())
    y = np.linspace(0, 1, 50)[None, :, None]
    r["_y"] = (y + 0.01, y)
    fig = report_plot.figure(r)
    assert fig.axes[1].get_title().endswith("RMSE x1.070, gate <= 1.05: FAILED")
    plt.close(fig)


def test_score_png_log_latency_every_stream_and_fault_markers():
    import matplotlib.pyplot as plt

    log = []
    for dev in range(12):  # more streams than a handful of panels would show
        for seq in range(1, 6):
            faults = ["drop"] if (dev, seq) == (3, 2) else ["reorder"] if seq == 4 else []
            log.append(
                Sent(
                    f"dev-{dev}",
                    seq,
                    np.zeros((1, 2)),
                    np.array([seq % 2]),
                    faults,
                    created=seq,
                    published=1.0,
                    epoch=0,
                )
            )
    predicted = {(m.stream, 0, m.seq): 1 for m in log}
    grid = stream_grid(log, predicted)
    latency = np.concatenate([np.full(500, 20.0), [900.0, 1500.0]])  # a tail of two
    fig = score_figure(latency, grid, "verdict: EXACT", {"p50": 20.0, "p99": 900.0})
    hist_ax, grid_ax = fig.axes[:2]
    assert hist_ax.get_xscale() == "log" and hist_ax.get_yscale() == "log"
    heights = [p.get_height() for p in hist_ax.patches]
    edges = [p.get_x() + p.get_width() for p in hist_ax.patches]
    assert max(edges) >= 1500 and sum(heights) == len(latency)
    assert {t.get_text() for t in hist_ax.texts} >= {"p50 20 ms", "p99 900 ms"}
    (image,) = grid_ax.get_images()
    assert image.get_array().shape == (12, 5)
    assert [t.get_text() for t in grid_ax.get_yticklabels()] == [f"dev-{i}" for i in range(12)]
    legend = {t.get_text() for t in grid_ax.get_legend().get_texts()}
    assert {"drop", "reorder"} <= legend
    marked = sum(len(c.get_offsets()) for c in grid_ax.collections)
    assert marked == 12 + 1  # one reorder per stream, one drop
    assert fig.get_suptitle() == "verdict: EXACT"
    plt.close(fig)

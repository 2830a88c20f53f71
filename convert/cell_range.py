"""The int8 cell-state range, chosen on the int8 graph itself.

``quantize.choose_c_range`` ranks ranges by the float reference with only its state rounded:
cheap, but blind to everything else the int8 graph rounds (gates, products, the update), and on
small LSTM classifiers the range it ranked first was often not the one whose bundle agreed
best with the float model. Measured on 1-layer nn.LSTM classifiers of 16 and 32 units: the
search's +-6 agreed on 96.6-97.6% of held-out steps, +-3 or +-4 on 98.6-99.5%, and the order of
the candidates on the calibration sequences was their order on the held-out ones. So the
search's choice and its neighbours are converted, streamed over the calibration data, and
judged as the verdict judges the bundle: per-step top-1 agreement for a classifier, RMSE
against the float outputs for a regressor. A few conversions of a fraction of a second each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

import edge
from edge.errors import EdgeError

from . import quantize, reference
from .errors import ConvertError
from .spec import ModelSpec

MODES = ("int8", "int8-float-head")  # the modes whose cell state is int8
# Candidates around the search's choice: within these factors of it, per cell.
BELOW, ABOVE = 0.5, 1.5
# A classifier's candidates whose disagreement on the calibration sequences is within this of
# the least are tied, and the output error decides among them: a 1-layer nn.LSTM classifier's
# +-2 disagreed on 2 of 4000 steps fewer than its +-4, had 1.3x its mean |dy| and 1.6x its
# disagreement on the long stream, and on held-out recordings agreed on 98.0% of the steps.
AGREEMENT_NOISE = 0.001

Build = Callable[[quantize.Calibration], Path]  # converts with these ranges, gives the bundle


@dataclasses.dataclass(frozen=True)
class Choice:
    ranges: list[tuple[float, float]]  # every state's, the cells' chosen
    searched: list[float]  # per cell, the bound choose_c_range gave
    chosen: list[float]
    # per candidate: the cells' bounds and per run its errors (a classifier's disagreement and
    # mean |dy|, a regressor's RMSE against float), or why it could not be made
    tried: list[dict[str, object]]

    def said(self) -> str:
        chosen, searched = (
            ", ".join(f"+-{c:g}" for c in cs) for cs in (self.chosen, self.searched)
        )
        return f"cell-state range {chosen} (the search's: {searched})"

    def describe(self) -> dict[str, object]:
        return {"searched": self.searched, "chosen": self.chosen, "tried": self.tried}


def choose(
    spec: ModelSpec,
    cal: quantize.Calibration,
    calib: np.ndarray,
    build: Build,
    *,
    regime: str,
) -> Choice:
    """One round over the cells, in layer order: each cell's candidates with the others at
    their best so far; the search's own choice wins ties."""
    cells = [k for k, s in enumerate(spec.states) if s.role == "c"]
    runs = _runs(spec, calib, regime)
    scores: dict[tuple[float, ...], tuple[float, ...]] = {}
    failed: dict[tuple[float, ...], str] = {}
    classifier = False

    def score(ranges: list[tuple[float, float]]) -> tuple[float, ...] | None:
        """The errors of the bundle with these ranges; None for one that could not be made
        or opened (the search's own choice raises: there is nothing to fall back to)."""
        nonlocal classifier
        key = _key(ranges, cells)
        if key in failed:
            return None
        if key not in scores:
            try:
                engine = edge.load(
                    build(dataclasses.replace(cal, ranges=ranges)), kernel_mismatch="allow"
                )
            except (ConvertError, EdgeError) as exc:
                if ranges == cal.ranges:
                    raise
                failed[key] = str(exc)
                return None
            classifier = engine.manifest.output_kind == "classifier"
            errors = []
            for x, y_float in runs:
                outs = engine.step_many([edge.Chunk(f"s{i}", x[i]) for i in range(len(x))])
                y = np.stack([o.y for o in outs]).astype(np.float64)
                errors.append(_error(y, y_float, classifier))
                if classifier:  # the output error breaks ties
                    errors.append(float(np.abs(y - y_float).mean()))
            scores[key] = tuple(errors)
        return scores[key]

    best = list(cal.ranges)
    for k in cells:
        c0 = best[k][1]
        cands = [c0] + [c for c in quantize.C_CANDIDATES if BELOW * c0 <= c <= ABOVE * c0]
        options = [[(-c, c) if j == k else r for j, r in enumerate(best)] for c in cands]
        made = [o for o in options if score(o) is not None]
        judged = {_key(o, cells): _judged(scores[_key(o, cells)], scores, classifier) for o in made}
        if classifier:  # disagreements a few steps apart are a tie: the output error decides
            least = min(j[0] for j in judged.values())
            judged = {
                k: (max(j[0] - least - AGREEMENT_NOISE, 0.0), j[1]) for k, j in judged.items()
            }
        best = min(made, key=lambda o: judged[_key(o, cells)])
    tried: list[dict[str, object]] = [
        {"cells": list(key), "error": list(errs)} for key, errs in scores.items()
    ]
    tried += [{"cells": list(key), "failed": why} for key, why in failed.items()]
    return Choice(best, [cal.ranges[k][1] for k in cells], [best[k][1] for k in cells], tried)


def _key(ranges: list[tuple[float, float]], cells: list[int]) -> tuple[float, ...]:
    return tuple(ranges[k][1] for k in cells)


def _runs(spec: ModelSpec, calib: np.ndarray, regime: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(sequences [N, T, F], float outputs [N, T, O]) streamed per candidate, about
    ``SEARCH_STEPS`` steps each, as in ``choose_c_range``: calibration sequences from a zero
    state, and the sequences back to back as one stream; only the stream where the model runs
    unreset."""
    steps = quantize.SEARCH_STEPS
    long = calib.reshape(1, -1, calib.shape[-1])[:, :steps]
    runs = [] if regime == "continuous" else [calib[: max(1, steps // calib.shape[1]), :steps]]
    return [(x, reference.run(spec, x)[0]) for x in [*runs, long]]


def _error(y: np.ndarray, y_float: np.ndarray, classifier: bool) -> float:
    if classifier:
        return float((y.argmax(-1) != y_float.argmax(-1)).mean())
    return float(np.sqrt(((y - y_float) ** 2).mean()))


def _judged(
    errors: tuple[float, ...], scores: dict[tuple[float, ...], tuple[float, ...]], classifier: bool
) -> tuple[float, ...]:
    """A classifier's disagreement on the first run (the one its agreement gate reads: the
    sequences, or the stream where it runs unreset), then its output error there. A
    regressor's worst RMSE over the runs, each relative to the best any candidate got on that
    run, so that neither run pays much for the other (as in ``choose_c_range``)."""
    if classifier:
        return errors[0], errors[1]
    best = np.min(np.array(list(scores.values())), axis=0)
    return (max(e / max(b, 1e-12) for e, b in zip(errors, best)),)

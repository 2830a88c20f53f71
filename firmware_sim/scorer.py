"""Judge a run end to end: match every prediction and error to what was sent by
``(stream, seq)``, and compare with an offline run of the same bundle."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import paho.mqtt.client as mqtt

from .devices import Sent
from .errors import SimError
from .mqtt import close_client

U32 = 2**32


class Scorer:
    def __init__(
        self, url: str, client_id: str = "firmware-sim-scorer", configure: Any = None
    ) -> None:
        u = urlparse(url)
        self.lock = threading.Lock()
        self.predictions: list[tuple[str, dict[str, Any], float]] = []
        self.errors: list[tuple[str, dict[str, Any], float]] = []
        self.status: dict[str, str] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(
            [("predictions/#", 1), ("errors/#", 1), ("edge/status/#", 1)]
        )
        if configure:
            configure(self.client)
        try:
            self.client.connect(str(u.hostname), int(u.port or 1883), 30)
        except OSError as exc:
            raise SimError(f"broker {url} is unreachable: {exc}") from exc
        self.client.loop_start()
        if not ready.wait(10):
            raise SimError(f"broker {url}: no answer to our subscription within 10 s")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.time()
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic.startswith("edge/status/"):
            self.status[msg.topic.rsplit("/", 1)[1]] = str(doc.get("state"))
            return
        stream = msg.topic.split("/", 1)[1]
        with self.lock:
            (self.predictions if msg.topic.startswith("predictions/") else self.errors).append(
                (stream, doc, now)
            )

    def received(self) -> dict[tuple[str, int], list[tuple[np.ndarray, float]]]:
        """(stream, seq) -> every (y, arrival time) received for it."""
        out: dict[tuple[str, int], list[tuple[np.ndarray, float]]] = {}
        with self.lock:
            items = list(self.predictions)
        for stream, doc, t in items:
            y = np.asarray(doc["y"], np.float32)
            for k, row in enumerate(y.reshape(1, -1) if y.ndim == 1 else y):
                out.setdefault((stream, (doc["seq"] + k) % U32), []).append((row, t))
        return out

    def wait(self, log: Sequence[Sent], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want = expected_keys(log)
        while time.monotonic() < deadline and not want - late_keys(self, log)[0] <= set(
            self.received()
        ):
            time.sleep(0.05)

    def wait_online(self, runtime_id: str, timeout: float, alive: Any = None) -> None:
        deadline = time.monotonic() + timeout
        while self.status.get(runtime_id) != "online":
            if time.monotonic() > deadline or (alive is not None and not alive()):
                raise SimError(f"the runtime {runtime_id!r} did not come online within {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        close_client(self.client)


def expected_keys(log: Sequence[Sent]) -> set[tuple[str, int]]:
    return {key for m in log if m.valid and m.delivered for key in m.keys}


def overtaken(log: Sequence[Sent]) -> set[tuple[str, int]]:
    """Ground truth: samples first published after a later sample of their stream."""
    out: set[tuple[str, int]] = set()
    newest: dict[str, int] = {}
    for m in sorted((m for m in log if m.delivered), key=lambda m: m.published or 0.0):
        if m.stream in newest and m.seq < newest[m.stream]:
            out.update(m.keys)
        newest[m.stream] = max(m.seq, newest.get(m.stream, m.seq))
    return out


def late_keys(scorer: Scorer, log: Sequence[Sent]) -> tuple[set[tuple[str, int]], int]:
    """Samples the runtime reported as late (given up on, a later one already applied) that
    really were overtaken on the wire: expected loss. Claims without that are not excused.
    Returns (excused samples, unfounded claims)."""
    claimed = {
        (stream, doc.get("seq")) for stream, doc, _ in scorer.errors if doc.get("error") == "late"
    }
    behind = overtaken(log)
    excused: set[tuple[str, int]] = set()
    unfounded = 0
    for m in log:
        if (m.stream, m.seq) in claimed:
            keys = set(m.keys)
            excused |= keys & behind
            unfounded += not keys & behind
    return excused, unfounded


def offline(
    bundle: Path,
    log: Sequence[Sent],
    skip: set[tuple[str, int]] = frozenset(),  # type: ignore[assignment]
) -> dict[tuple[str, int], np.ndarray]:
    """The same bundle fed the delivered samples of each stream in seq order (less ``skip``:
    the late ones the runtime rightly dropped)."""
    import edge
    from edge.engine import Chunk

    engine = edge.load(bundle)
    chunks = sorted(
        (m for m in log if m.valid and m.delivered and (m.stream, m.seq) not in skip),
        key=lambda m: (m.stream, m.created),
    )
    out: dict[tuple[str, int], np.ndarray] = {}
    outcomes = engine.step_many([Chunk(m.stream, m.values, m.seq) for m in chunks])
    for m, oc in zip(chunks, outcomes):
        for k, row in enumerate(oc.y):
            out[(m.stream, (oc.seq + k) % U32)] = row  # type: ignore[operator]
    return out


def latencies_s(
    got: dict[tuple[str, int], list[tuple[np.ndarray, float]]], log: Sequence[Sent]
) -> np.ndarray:
    """Publish -> first prediction, in seconds, in the order the samples were published."""
    sent_at = {key: m.published for m in log if m.published for key in m.keys}
    return np.array(
        [
            lat
            for _, lat in sorted(
                (sent_at[k], ys[0][1] - sent_at[k]) for k, ys in got.items() if k in sent_at
            )
        ]
    )


def score(
    scorer: Scorer,
    log: Sequence[Sent],
    duration: float,
    bundle: Path | None = None,
    classes: Sequence[str] = (),
    float_y: dict[tuple[str, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    got = scorer.received()
    late, unfounded = late_keys(scorer, log)
    want = expected_keys(log) - late
    labels = {
        key: int(lab) for m in log if m.labels is not None for key, lab in zip(m.keys, m.labels)
    }
    faults = Counter(f for m in log for f in m.faults)
    invalid_delivered = sum(1 for m in log if m.delivered and not m.valid)
    latencies = latencies_s(got, log)
    r: dict[str, Any] = {
        "devices": len({m.stream for m in log}),
        "messages_created": len(log),
        "messages_delivered": sum(m.delivered for m in log),
        "samples_delivered_valid": len(want),
        "faults_injected": dict(faults),
        "predictions_received": len(got),
        "predictions_missing": len(want - set(got)),
        "late_beyond_reorder_window": len(late),
        "late_claims_unfounded": unfounded,
        "missing_examples": sorted(want - set(got))[:5],
        "duplicate_predictions": sum(len(v) - 1 for v in got.values()),
        "unexpected_predictions": len(set(got) - want - late),
        "errors_received": len(scorer.errors),
        "errors_expected_at_least": invalid_delivered,
        "duration_s": duration,
        "throughput_predictions_per_s": len(got) / duration if duration else 0.0,
    }
    if len(latencies):
        p50, p95, p99 = np.percentile(latencies * 1000, [50, 95, 99])
        r.update(latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99)
    # Real time means no backlog builds up: the last tenth of the run is answered about as
    # fast as the first. (Held-back samples behind a gap wait in both tenths alike.)
    tenth = max(1, len(latencies) // 10)
    first = float(np.median(latencies[:tenth])) * 1000 if len(latencies) else float("inf")
    last = float(np.median(latencies[-tenth:])) * 1000 if len(latencies) else float("inf")
    r.update(latency_first_tenth_median_ms=first, latency_last_tenth_median_ms=last)
    r["kept_up_real_time"] = bool(r["predictions_missing"] == 0 and last <= first + 250)
    if bundle is not None:
        ref = offline(bundle, log, late)
        diffs = [float(np.abs(ys[0][0] - ref[k]).max()) for k, ys in got.items() if k in ref]
        wrong = [
            k
            for k, ys in got.items()
            if k in ref and any(not np.array_equal(y, ref[k]) for y, _ in ys)
        ]
        r["wrong_predictions"] = len(wrong)
        r["wrong_examples"] = wrong[:5]
        r["max_abs_diff_vs_offline"] = max(diffs, default=0.0)
        if labels:
            keys = [k for k in got if k in labels and k in ref]
            truth = np.array([labels[k] for k in keys])
            r["accuracy_runtime"] = (
                float(np.mean([got[k][0][0].argmax() == labels[k] for k in keys])) if keys else None
            )
            r["accuracy_offline"] = (
                float(np.mean([ref[k].argmax() == t for k, t in zip(keys, truth)]))
                if keys
                else None
            )
            if float_y is not None:
                fk = [k for k in keys if k in float_y]
                r["agreement_with_float"] = (
                    float(np.mean([got[k][0][0].argmax() == float_y[k].argmax() for k in fk]))
                    if fk
                    else None
                )
    r["classes"] = list(classes)
    return r


def table(r: dict[str, Any]) -> str:
    rows = []
    for key, value in r.items():
        if key in ("classes",) or (key.endswith("_examples") and not value):
            continue
        if isinstance(value, float):
            value = f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
        rows.append(f"  {key.replace('_', ' '):34s} {value}")
    return "\n".join(rows)


def save(r: dict[str, Any], scorer: Scorer, log: Sequence[Sent], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out / "score.json", out / "score.png"
    jpath.write_text(json.dumps(r, indent=2, default=str) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = scorer.received()
    lat = latencies_s(got, log) * 1000
    streams = sorted({m.stream for m in log if m.labels is not None})[:4]
    fig = plt.figure(figsize=(13, 4.5))
    grid = fig.add_gridspec(max(1, len(streams)), 2)
    a = fig.add_subplot(grid[:, 0])
    a.hist(lat, bins=50)
    a.set(title="publish -> prediction latency", xlabel="ms", ylabel="predictions")
    classes = r.get("classes") or []
    for i, stream in enumerate(streams):
        b = fig.add_subplot(grid[i, 1])
        keys = [
            (key[1], int(lab))
            for m in log
            if m.stream == stream and m.labels is not None
            for key, lab in zip(m.keys, m.labels)
        ]
        xs = np.arange(len(keys))
        pred = [got[(stream, s)][0][0].argmax() if (stream, s) in got else np.nan for s, _ in keys]
        b.plot(xs, [lab for _, lab in keys], "k-", lw=1.5, label="true")
        b.plot(xs, np.array(pred, dtype=float), ".", ms=3, label="predicted")
        b.set_ylabel(stream, rotation=0, ha="right", va="center")
        if classes:
            b.set_yticks(range(len(classes)), classes, fontsize=7)
        if i == 0:
            b.set_title("per-stream timeline: true label (line) and prediction (dots)")
        if i < len(streams) - 1:
            b.set_xticklabels([])
    if streams:
        b.set_xlabel("sample")
    fig.tight_layout()
    fig.savefig(ppath, dpi=90)
    plt.close(fig)
    return jpath, ppath

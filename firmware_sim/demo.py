"""``firmware-sim demo``: the whole pipeline on this machine, live, then the score."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .broker import Broker
from .devices import Fleet, Key, Sent
from .errors import SimError
from .faults import FaultPlan
from .runtime import Runtime
from .scorer import PLOT_SKIPPED, Scorer, save, score, table
from .verdict import verdict

RUNTIME_ID = "firmware-sim-runtime"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_LSTM_CACHE", Path.home() / ".cache" / "edge-lstm")) / "demo"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def example_bundle(cache: Path) -> tuple[Path, Path]:
    """(keras model, int8 bundle), trained and converted on first use only."""
    model, bundle = cache / "model.keras", cache / "bundle-int8"
    # a bundle converted before kernel sets were recorded would be refused: convert again
    manifest = bundle / "manifest.json"
    if manifest.exists() and model.exists() and "kernels" in json.loads(manifest.read_text()):
        return model, bundle
    try:
        from convert.pipeline import run_convert
        from convert.train import train_example
    except ImportError as exc:
        raise SimError(
            f"no cached bundle in {cache} and the converter is not installed: pip install 'edge-lstm[convert]'"
        ) from exc
    say(f"first run: training the example model and converting it into {cache} (cached)")
    info = train_example(model)
    run_convert(
        model,
        info["calib"],
        bundle,
        labels=info["classes"],
        data_path=info["test"],
        sample_rate_hz=info["sample_rate_hz"],
        feature_names=info["features"],
    )
    return model, bundle


def float_reference(model: Path, log: list[Sent]) -> dict[Key, np.ndarray] | None:
    """The float model over each boot's delivered samples in order (for agreement)."""
    try:
        from convert import intake, reference
    except ImportError:
        return None
    spec = intake.read_spec(model)
    out: dict[Key, np.ndarray] = {}
    for stream, epoch in sorted({(m.stream, m.epoch) for m in log}):
        msgs = [
            m for m in log if m.stream == stream and m.epoch == epoch and m.valid and m.delivered
        ]
        if not msgs:
            continue
        x = np.concatenate([m.values for m in msgs])
        y, _, _ = reference.run(spec, x[None])
        keys = [key for m in msgs for key in m.keys]
        out.update({key: y[0, i] for i, key in enumerate(keys)})
    return out


def run_demo(
    *,
    duration: float,
    devices: int,
    rate: float,
    faults: str | None,
    fmt: str,
    out: Path,
    embedded: bool | None,
    progress: bool = True,
    boot_ids: bool = True,
) -> dict[str, Any]:
    import edge

    from .cli import check_reboots

    plan = FaultPlan.parse(faults)
    check_reboots(plan, boot_ids, None)
    model, bundle = example_bundle(cache_dir())
    manifest = edge.load(bundle).manifest
    with tempfile.TemporaryDirectory(prefix="edge-lstm-demo-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker", embedded=embedded).start()
        say(f"broker: {broker.kind} on {broker.url}")
        runtime = scorer = fleet = None
        try:
            runtime = Runtime(
                bundle, broker.url, work / "state", protocol=broker.protocol, client_id=RUNTIME_ID
            ).start()
            scorer = Scorer(broker.url)
            scorer.wait_online(RUNTIME_ID, 30, runtime.alive)
            say(
                f"runtime: edge-lstm serve, model {manifest.model_id} ({manifest.quantization}), online"
            )
            fleet = Fleet(
                broker.url,
                devices,
                rate,
                faults=plan,
                fmt=fmt,
                feature_names=list(manifest.feature_names),
                boot_ids=boot_ids,
            )
            say(
                f"devices: {devices} replaying BasicMotions test recordings at {rate:g} Hz for {duration:g} s"
                + (f", faults {dict(plan.rates)}" if plan.rates else "")
            )
            bar = _progress(duration, fleet, scorer) if progress else None
            t0 = time.monotonic()
            log = fleet.run(duration, bar)
            scorer.wait(log, 15)
            elapsed = time.monotonic() - t0
            if bar:
                bar(duration, final=True)
            r = score(scorer, log, elapsed, bundle, manifest.labels, float_reference(model, log))
            r["broker"] = broker.kind
            jpath, ppath = save(r, scorer, log, out)
            print("\n" + table(r))
            print(f"\nscore: {jpath}\nplot:  {ppath or PLOT_SKIPPED}")
            print(verdict(r))
            return r
        finally:
            for part in (fleet, scorer):
                if part is not None:
                    part.close()
            if runtime is not None:
                runtime.stop()
            broker.stop()


def _progress(duration: float, fleet: Fleet, scorer: Scorer) -> Any:
    """A live bar on a terminal; plain lines every 10 s when output is redirected (no
    carriage returns or escape codes in a log file) or tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        last = [-10.0]

        def plain(elapsed: float, final: bool = False) -> None:
            if final or elapsed - last[0] >= 10:
                last[0] = elapsed
                say(
                    f"streaming {min(elapsed, duration):.0f}/{duration:g} s: sent {len(fleet.log)}, "
                    f"predicted {len(scorer.predictions)}, errors {len(scorer.errors)}"
                )

        return plain

    bar = tqdm(total=round(duration), unit="s", desc="streaming", file=sys.stderr)

    def update(elapsed: float, final: bool = False) -> None:
        got = scorer.predictions
        bar.n = round(min(elapsed, duration))
        bar.set_postfix(
            sent=len(fleet.log), predicted=len(got), errors=len(scorer.errors), refresh=False
        )
        bar.refresh()
        if final:
            bar.close()

    return update

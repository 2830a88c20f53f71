"""``firmware-sim demo``: the whole pipeline on this machine, live, then the score."""

from __future__ import annotations

import hashlib
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
from .scorer import Scorer, save, score, table
from .verdict import verdict

RUNTIME_ID = "firmware-sim-runtime"
WORKER_IDS = ("demo-w1", "demo-w2")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_LSTM_CACHE", Path.home() / ".cache" / "edge-lstm")) / "demo"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def example_bundle(cache: Path) -> tuple[Path, Path]:
    """(keras model, int8 bundle), trained and converted on first use only."""
    model, bundle = cache / "model.keras", cache / "bundle-int8"
    if cached(cache):
        return model, bundle
    import fcntl

    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / ".lock", "a")  # noqa: SIM115 - held until the example is made
    except OSError as exc:
        raise SimError(f"cannot write the demo's cache {cache}: {exc.strerror}") from exc
    with lock:
        # Two demos started at once on a fresh machine trained into the same files: the
        # second waits for the first's example, and uses it.
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another demo is making the example model in {cache}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if cached(cache):
            return model, bundle
        return _train_example(cache, model, bundle)


def _train_example(cache: Path, model: Path, bundle: Path) -> tuple[Path, Path]:
    try:
        import keras  # noqa: F401 - train_example needs it, and imports it only once it runs

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


def cached(cache: Path) -> bool:
    """Whether ``cache`` holds a current example: a bundle converted before kernel sets were
    recorded would be refused; a model trained before train-example trained on streams (no
    replay accuracy in model.json) lags behind activity changes, and one trained before the
    settle weights (no ``training.settle``) misreads the quiet last seconds of a recording.
    The bundle must be converted from ``model.keras``: a demo stopped while converting a model
    it had trained again leaves the earlier bundle beside it."""
    manifest, info_path = cache / "bundle-int8" / "manifest.json", cache / "model.json"
    try:
        info = json.loads(info_path.read_text())
        described = json.loads(manifest.read_text())
        model_sha256 = hashlib.sha256((cache / "model.keras").read_bytes()).hexdigest()
        return (
            described.get("source_sha256") == model_sha256
            and "kernels" in described
            and "test_accuracy_replay" in info
            and "settle" in info.get("training", {})
        )
    except (OSError, ValueError, AttributeError):
        return False


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
    cluster: bool = False,
) -> dict[str, Any]:
    """``cluster``: nats-server and two ``edge-lstm worker`` processes instead of a broker and
    ``edge-lstm serve``; one worker is killed half-way, and the score must stay exact."""
    import edge

    plan = FaultPlan.parse(faults)
    if plan.rates.get("reboot", 0) > 0 and not boot_ids:  # the demo has no --restart-gap
        raise SimError(
            "demo: --faults reboot needs the devices' boot ids (drop --no-boot-ids); devices "
            "without them: firmware-sim run --restart-gap N against a runtime with that setting"
        )
    model, bundle = example_bundle(cache_dir())
    try:
        manifest = edge.load(bundle).manifest
    except edge.EdgeError as exc:  # a damaged cache: say how to get a sound one
        raise SimError(
            f"the cached example bundle is damaged ({exc}): remove {cache_dir()} and run the "
            "demo again to train and convert it anew"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="edge-lstm-demo-") as tmp:
        work = Path(tmp)
        broker: Any = None
        runtime: Runtime | None = None
        workers: list[Any] = []
        scorer = fleet = None
        try:
            if cluster:
                from .cluster import LocalNats, WorkerProcess

                broker = LocalNats(work / "nats").start()
                url = broker.mqtt_url
                say(f"broker: nats-server (JetStream, MQTT listener on {url})")
                for w in WORKER_IDS:  # each kept as it starts: all stopped if one fails
                    workers.append(WorkerProcess(bundle, broker.url, work / "state", w))
                    workers[-1].start()
                scorer = Scorer(url)
                for w in workers:
                    scorer.wait_online(w.id, 90, w.alive)
                say(
                    f"runtime: {len(workers)} edge-lstm workers ({', '.join(WORKER_IDS)}), "
                    f"model {manifest.model_id} ({manifest.quantization}), online; "
                    f"{workers[0].id} is killed (kill -9) half-way"
                )
            else:
                broker = Broker(work / "broker", embedded=embedded).start()
                url = broker.url
                say(f"broker: {broker.kind} on {broker.url}")
                runtime = Runtime(  # before it starts: stopped even if starting fails
                    bundle, url, work / "state", protocol=broker.protocol, client_id=RUNTIME_ID
                )
                runtime.start()
                scorer = Scorer(url)
                scorer.wait_online(RUNTIME_ID, 30, runtime.alive, runtime.why_ended)
                say(
                    f"runtime: edge-lstm serve, model {manifest.model_id} ({manifest.quantization}), online"
                )
            fleet = Fleet(
                url,
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
            bar = progress_bar(duration, fleet, scorer) if progress else None
            killed: list[float] = []

            def tick(elapsed: float, final: bool = False) -> None:
                if workers and not killed and elapsed >= duration / 2:
                    workers[0].kill()
                    killed.append(elapsed)
                    say(f"\nkilled worker {workers[0].id} (kill -9) at {elapsed:.1f} s")
                if bar:
                    bar(elapsed, final)

            t0 = time.monotonic()
            log = fleet.run(duration, tick)
            scorer.wait(log, 15 + 15 * bool(workers))
            elapsed = time.monotonic() - t0
            if bar:
                bar(duration, final=True)
            r = score(scorer, log, elapsed, bundle, manifest.labels, float_reference(model, log))
            if cluster:
                r["broker"] = "nats-server"
                r["workers"] = list(WORKER_IDS)
                r["worker_killed_at_s"] = killed[0] if killed else None
            else:
                r["broker"] = broker.kind
            jpath, plot = save(r, scorer, log, out)
            print("\n" + table(r))
            if killed:
                print(
                    f"\nworker {workers[0].id} killed (kill -9) at {killed[0]:.1f} s of {duration:g} s"
                )
            print(f"\nscore: {jpath}\nplot:  {plot}")
            print(verdict(r))
            return r
        finally:
            for part in (fleet, scorer):
                if part is not None:
                    part.close()
            if runtime is not None:
                runtime.stop()
            for w in workers:
                w.stop()
            if broker is not None:
                broker.stop()


def progress_bar(duration: float, fleet: Fleet, scorer: Scorer) -> Any:
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

"""Engine benchmark: cost per stream-step against its peers and against sliding-window re-runs,
memory, load time.

    .venv/bin/python -m bench.engine [--quick] [--peers-only]

Peers (``bench.peers``), same weights, same inputs, CPU time per call in interleaved rounds
(min and median of the rounds), at 1, 16, 64 and 256 streams: a NumPy float32 LSTM step
vectorised over streams, and onnxruntime with a one-step ONNX LSTM when onnx and onnxruntime
are installed. The engine is measured with ai-edge-litert here and with tflite-runtime 2.14 in
the device-like environment (``.venv-device``), against the same NumPy peer there.

Every ratio compares figures measured in this same run on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np

import edge
from bench import peers
from bench._common import BUILD, example, in_device_env, log, per_call, rss_bytes, save
from edge import Chunk

WINDOW = 100
BATCHES = (1, 16, 64, 256)


def stream_step_costs(bundle: Path, min_time: float) -> dict[str, float]:
    """Microseconds per stream-step: one stream via step(), and N streams per step_many()."""
    engine = edge.load(bundle)
    f = engine.manifest.features
    rng = np.random.default_rng(0)
    x1 = rng.normal(0, 2, f)
    single = per_call(lambda: engine.step("solo", x1), min_time=min_time)
    out = {"single_stream_step_us": single * 1e6}
    for n in BATCHES:
        streams = [f"s{i}" for i in range(n)]
        xs = rng.normal(0, 2, (n, f))
        items = [Chunk(s, xs[i]) for i, s in enumerate(streams)]
        sec = per_call(lambda items=items: engine.step_many(items), min_time=min_time)
        out[f"batched_{n}_us_per_stream_step"] = sec / n * 1e6
    return out


def batch_strategies(bundle: Path, min_time: float) -> dict[str, float]:
    """How to feed micro-batches of varying size: one runner that follows each batch's shape
    (what edge does), or one runner per power-of-two bucket with the batch padded up."""
    from edge.manifest import read_bundle

    engine = edge.load(bundle)
    model = engine.model
    _, content = read_bundle(bundle)
    sizes = [3, 17, 64, 5, 40, 9]  # a realistic mix of micro-batch sizes
    rng = np.random.default_rng(2)
    feeds = []
    for n in sizes:
        x = model.encode_x(rng.normal(0, 2, (n, engine.manifest.features)))
        feeds.append((x, [np.repeat(z, n, axis=0) for z in model.zero_state()]))
    runners = {b: model.backend.runner(content, engine.manifest.signature) for b in (4, 16, 32, 64)}

    def resize() -> None:
        for x, st in feeds:
            model.invoke(x, st)

    def buckets() -> None:
        for x, st in feeds:
            b = next(b for b in runners if b >= len(x))
            pad = b - len(x)
            feed = {model.x_spec.name: np.concatenate([x, np.repeat(x[:1], pad, axis=0)])}
            for spec, a in zip(model.state_in, st):
                feed[spec.name] = np.concatenate([a, np.repeat(a[:1], pad, axis=0)])
            runners[b](**feed)

    return {
        "mixed_batches_resize_us": per_call(resize, min_time=min_time) * 1e6,
        "mixed_batches_buckets_us": per_call(buckets, min_time=min_time) * 1e6,
    }


def window_baselines(model_path: Path, min_time: float) -> dict[str, float]:
    """What users do today: re-run the whole 100-sample window on every message."""
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    model = keras.models.load_model(model_path, compile=False)
    f = model.inputs[0].shape[-1]
    fixed_in = keras.Input((WINDOW, f), batch_size=1)
    fixed = keras.Model(fixed_in, model(fixed_in))
    conv = tf.lite.TFLiteConverter.from_keras_model(fixed)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its SavedModel
        content = conv.convert()
    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    window = np.random.default_rng(1).normal(0, 2, (1, WINDOW, f)).astype(np.float32)

    def tflite_window() -> None:
        interp.set_tensor(inp["index"], window)
        interp.invoke()
        interp.get_tensor(outp["index"])

    ops = sorted({d["op_name"] for d in interp._get_ops_details()})
    return {
        "window_tflite_us_per_message": per_call(tflite_window, min_time=min_time) * 1e6,
        "window_keras_predict_us_per_message": per_call(
            lambda: model.predict(window, verbose=0), min_time=min_time, repeats=3
        )
        * 1e6,
        "window_tflite_ops": ", ".join(ops),  # type: ignore[dict-item]
    }


def memory(bundle: Path, streams: int) -> dict[str, float]:
    engine = edge.load(bundle, capacity=streams)
    f = engine.manifest.features
    x = np.zeros(f)
    before = rss_bytes()
    for start in range(0, streams, 1024):
        engine.step_many(
            [Chunk(f"device-{i:06d}", x, seq=1) for i in range(start, min(streams, start + 1024))]
        )
    after = rss_bytes()
    return {
        "streams": streams,
        "state_arena_MB": engine.store.nbytes() / 1e6,
        "state_bytes_per_stream": engine.store.nbytes() / streams,
        "rss_growth_MB": (after - before) / 1e6,
        "rss_bytes_per_stream": (after - before) / streams,
        "rss_total_MB": after / 1e6,
    }


LOAD_CODE = """
import json, sys, time
t0 = time.perf_counter()
import edge
t1 = time.perf_counter()
e = edge.load(sys.argv[1])
y = e.step("s", [0.0] * e.manifest.features)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_to_first_prediction_s": t2 - t1,
                  "backend": e.model.backend.name + " " + e.model.backend.version,
                  "tensorflow_imported": "tensorflow" in sys.modules}))
"""


PEERS_CODE = """
import json, sys
from pathlib import Path
from bench.peers import compare, load_weights
r = compare(Path(sys.argv[1]), load_weights(Path(sys.argv[2])), rounds=int(sys.argv[3]),
            min_time=float(sys.argv[4]))
print(json.dumps(r))
"""
TARGETS = (  # (streams, engine contender, peer): the engine's figure must not exceed the peer's
    ("64", "engine_step_batch_seq", "numpy"),
    ("64", "engine_step_batch_seq", "onnxruntime"),
    ("1", "engine_step", "numpy"),
)


def peer_costs(model_path: Path, bundle: Path, quick: bool) -> dict[str, object]:
    """The engine against its peers with the same weights, here (ai-edge-litert) and in the
    device-like environment (tflite-runtime 2.14)."""
    weights = peers.keras_weights(model_path)
    path = BUILD / f"{bundle.parent.name}-weights.npz"
    peers.save_weights(path, weights)
    rounds, min_time = (5, 0.02) if quick else (9, 0.05)
    out: dict[str, object] = {
        "desktop": peers.compare(bundle, weights, rounds=rounds, min_time=min_time)
    }
    log("  the same in the device-like environment (tflite-runtime 2.14)")
    out["device"] = in_device_env(PEERS_CODE, str(bundle), str(path), str(rounds), str(min_time))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="shorter timings, 20k streams")
    ap.add_argument("--peers-only", action="store_true", help="only the engine against its peers")
    args = ap.parse_args()
    min_time = 0.1 if args.quick else 0.5
    results: dict[str, object] = {}
    model_path, bundle = example(1, 64)
    log("[example H=64] the engine against its peers (same weights, interleaved)")
    results["peers example H=64"] = peer_costs(model_path, bundle, args.quick)
    if args.peers_only:
        path = save("engine-peers", results)
        report_peers(results)
        log(f"results: {path}")
        return 0
    models = {"example H=64": example(1, 64), "2-layer H=64": example(2, 64, epochs=40)}
    for name, (model_path, bundle) in models.items():
        log(f"[{name}] stream-step costs")
        r: dict[str, object] = dict(stream_step_costs(bundle, min_time))
        r.update(batch_strategies(bundle, min_time))
        log(f"[{name}] sliding-window baselines")
        r.update(window_baselines(model_path, min_time))
        per_msg_single = r["single_stream_step_us"]
        per_msg_batched = r["batched_64_us_per_stream_step"]
        for base in ("window_tflite", "window_keras_predict"):
            cost = r[f"{base}_us_per_message"]
            r[f"{base}_ratio_vs_single_stream"] = cost / per_msg_single  # type: ignore[operator]
            r[f"{base}_ratio_vs_batched_64"] = cost / per_msg_batched  # type: ignore[operator]
        results[name] = r
    _, bundle = models["example H=64"]
    n = 20_000 if args.quick else 100_000
    log(f"memory with {n} streams")
    results["memory"] = memory(bundle, n)
    log("edge.load to first prediction in the device-like environment")
    t0 = time.perf_counter()
    results["device_load"] = in_device_env(LOAD_CODE, str(bundle))
    results["device_load"]["process_wall_s"] = time.perf_counter() - t0  # type: ignore[index]
    path = save("engine", results)
    report(results)
    log(f"results: {path}")
    return 0


def report_peers(results: dict[str, object]) -> None:
    """Per stream-step (us, min / median of the rounds) and the engine's ratios to its peers."""
    for name, both in results.items():
        if not name.startswith("peers"):
            continue
        for where, r in both.items():  # type: ignore[attr-defined]
            if "error" in r:
                print(f"\n== {name}, {where}: not measured: {r['error']}")
                continue
            print(
                f"\n== {name}, {where}: {r['backend']} ({r['kernels']}); onnxruntime: {r['onnxruntime']}"
            )
            print("  us per stream-step, min / median")
            for n in ("1", "16", "64", "256"):
                row = r[n]
                cells = "  ".join(
                    f"{k} {v['min']:.2f} / {v['median']:.2f}"
                    for k, v in row.items()
                    if k != "ratios"
                )
                print(f"  {n:>4} streams: {cells}")
            for n in ("1", "64"):
                for k, v in r[n]["ratios"].items():
                    print(f"  {n:>4} streams: {k:45s} {v:.2f}")
            for n, mine, peer in TARGETS:
                key = f"{mine}/{peer} (median)"
                if key in r[n]["ratios"]:
                    v = r[n]["ratios"][key]
                    verdict = "met" if v <= 1 else "NOT met"
                    print(f"  target {mine} <= {peer} at {n} stream(s): {v:.2f} -> {verdict}")


def report(results: dict[str, object]) -> None:
    report_peers(results)
    for name, r in results.items():
        if name.startswith("peers"):
            continue
        print(f"\n== {name}")
        for k, v in r.items():  # type: ignore[attr-defined]
            print(f"  {k:45s} {v:,.2f}" if isinstance(v, float) else f"  {k:45s} {v}")


if __name__ == "__main__":
    raise SystemExit(main())

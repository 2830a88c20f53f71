"""Raw invoke of the step graph: the layout before (per gate an input and a recurrent matmul
plus a broadcast bias ADD) against the current one, converted from the same weights.

    .venv/bin/python -m bench.step_graph [--quick] [--batch 64] [--mode int8] [--layers 1|2]

Both graphs come from the example model (H=64, F=6) and one calibration, each converted and
verified by the converter (``run_convert``: parity, drift, every reachable kernel set), so the
table shows speed and fidelity side by side. Timing: ``interpreter.invoke()`` alone on a
resized [batch, .] input, one thread, CPU time of the calling thread, the two graphs
interleaved round by round; min and median over the rounds, in microseconds per stream-step.
Kernel sets: ai-edge-litert with its default XNNPACK delegate, ai-edge-litert with the
built-in kernels, and tflite-runtime 2.14 in the device-like Python (its built-in kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import BUILD, convert_example, example, in_device_env, log, save

LAYOUTS = ("before", "after")


def _interpreter(kind: str, path: str) -> Any:
    if kind == "tflite-2.14":
        from tflite_runtime.interpreter import Interpreter

        return Interpreter(model_path=path, num_threads=1)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if kind == "litert-builtin":
        return Interpreter(
            model_path=path,
            num_threads=1,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    return Interpreter(model_path=path, num_threads=1)


def _prepared(kind: str, path: str, batch: int) -> tuple[Any, bool]:
    """An interpreter with every input resized to ``batch`` rows of fixed random values; and
    whether a delegate took the graph (XNNPACK shows as a DELEGATE node after an invoke)."""
    it = _interpreter(kind, path)
    for d in it.get_input_details():
        it.resize_tensor_input(d["index"], [batch, int(d["shape"][-1])])
    it.allocate_tensors()
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        shape = (batch, int(d["shape"][-1]))
        if np.dtype(d["dtype"]).kind == "i":
            a = rng.integers(-60, 60, shape)
        else:
            a = rng.normal(0, 0.5, shape)
        it.set_tensor(d["index"], a.astype(d["dtype"]))
    it.invoke()
    delegated = any(op["op_name"] == "DELEGATE" for op in it._get_ops_details())
    return it, delegated


def time_invokes(
    kind: str, paths: list[str], *, batch: int, rounds: int, calls: int
) -> list[dict[str, Any]]:
    """Per model: min and median over ``rounds`` of CPU microseconds per stream-step, the
    models taking turns every round (load drifts hit them alike)."""
    its = [_prepared(kind, p, batch) for p in paths]
    per_round: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for k, (it, _) in enumerate(its):
            t0 = time.thread_time_ns()
            for _ in range(calls):
                it.invoke()
            per_round[k].append((time.thread_time_ns() - t0) / calls / batch / 1e3)
    return [
        {"delegated": d, "min_us": min(v), "median_us": float(np.median(v)), "rounds": v}
        for (_, d), v in zip(its, per_round)
    ]


def _device_main() -> None:
    """Entry point in the device-like Python: ``kind batch rounds calls path...``."""
    kind, batch, rounds, calls, *paths = sys.argv[1:]
    out = time_invokes(kind, paths, batch=int(batch), rounds=int(rounds), calls=int(calls))
    print(json.dumps(out))


DEVICE_CODE = "from bench.step_graph import _device_main; _device_main()"


def time_kernel_sets(
    models: dict[str, str], *, batch: int, rounds: int, calls: int
) -> dict[str, Any]:
    """``time_invokes`` of every model (name -> .tflite path) in ai-edge-litert with XNNPACK and
    with its built-in kernels, and in tflite-runtime 2.14 in the device-like Python:
    kernel set -> model name -> figures (or ``{"error": ...}`` where that Python is missing)."""
    names, paths = list(models), list(models.values())
    out: dict[str, Any] = {}
    for kind in ("litert-xnnpack", "litert-builtin"):
        log(f"timing {kind}")
        res = time_invokes(kind, paths, batch=batch, rounds=rounds, calls=calls)
        out[kind] = dict(zip(names, res))
    log("timing tflite-2.14 (device-like Python)")
    dev: Any = in_device_env(
        DEVICE_CODE, "tflite-2.14", str(batch), str(rounds), str(calls), *paths
    )
    out["tflite-2.14"] = dev if isinstance(dev, dict) and "error" in dev else dict(zip(names, dev))
    return out


def per_gate_lstm(
    layer: Any, tf: Any, c: Any, scale: float | None = None, *, bias_with_h: bool = False
) -> Any:
    """The LSTM layer as the step graph built it before: per gate x W_g + h U_g + b_g, i.e. two
    FULLY_CONNECTEDs, an ADD, and an ADD of the broadcast bias."""
    from convert.step_graph import tf_activation

    parts = (layer.kernel, layer.recurrent, layer.bias)
    w = {g: [c(np.ascontiguousarray(layer.gate(g, m))) for m in parts] for g in "ifco"}
    act, ract = tf_activation(layer.activation), tf_activation(layer.recurrent_activation)

    def lstm(inp: Any, st: list[Any], pin: Any) -> tuple[Any, list[Any]]:
        h, cell = st
        z = {g: tf.matmul(inp, kx) + tf.matmul(h, kh) + b for g, (kx, kh, b) in w.items()}
        cell = pin(1, ract(z["f"]) * cell + ract(z["i"]) * act(z["c"]))
        h = pin(0, ract(z["o"]) * act(cell))
        return h, [h, cell]

    return lstm


def build_variants(mode: str, layers: int, fresh: bool) -> dict[str, Path]:
    """Both layouts of the example model, converted and verified (cached unless ``fresh``)."""
    from unittest import mock

    from convert import step_graph

    model, _ = example(layers, 64) if layers == 1 else example(layers, 64, epochs=40)
    out = {}
    for layout in LAYOUTS:
        d = BUILD / "step-graph" / f"l{layers}-{layout}-{mode}"
        if fresh or not (d / "manifest.json").exists():
            log(f"converting the example model ({mode}, layout {layout})")
            before = layout == "before"
            with (
                mock.patch.object(step_graph, "_lstm_fn", per_gate_lstm)
                if before
                else nullcontext()
            ):
                convert_example(model, d, mode)
        out[layout] = d
    return out


def fidelity(bundle: Path) -> dict[str, Any]:
    """The converter's own figures for a bundle (report.json)."""
    r = json.loads((bundle / "report.json").read_text())
    par, dr = r["parity"], r["drift"]
    sets = r["kernel_sets"]["sets"]
    return {
        "ops": {k: v["count"] for k, v in r["op_audit"]["ops"].items()},
        "tflite_bytes": r["tflite_bytes"],
        "parity_top1": par.get("top1_agreement"),
        "parity_mean_abs_error": par["mean_abs_error"],
        "drift_top1": dr.get("top1_agreement"),
        "drift_mean_error_last_10pct": dr["last_10pct_mean_error"],
        "checks_passed": all(r["checks"].values()),
        "kernel_sets_verified": sorted(k for k, v in sets.items() if v["passed"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--batch", type=int, default=64, help="streams per invoke (default 64)")
    ap.add_argument("--mode", default="int8", help="quantisation mode (default int8)")
    ap.add_argument("--layers", type=int, default=1, help="1: the example; 2: two stacked LSTMs")
    ap.add_argument("--fresh", action="store_true", help="convert again, ignore the cache")
    args = ap.parse_args()
    if args.batch < 1:
        print(f"bench.step_graph: --batch {args.batch} must be >= 1", file=sys.stderr)
        return 2
    if args.layers not in (1, 2):
        print(f"bench.step_graph: --layers {args.layers} must be 1 or 2", file=sys.stderr)
        return 2
    rounds, calls = (5, 100) if args.quick else (15, 200)
    bundles = build_variants(args.mode, args.layers, args.fresh)
    paths = [str(bundles[k] / "model.tflite") for k in LAYOUTS]
    results: dict[str, Any] = {
        "batch": args.batch,
        "mode": args.mode,
        "layers": args.layers,
        "rounds": rounds,
        "calls_per_round": calls,
        "fidelity": {k: fidelity(bundles[k]) for k in LAYOUTS},
    }
    results["timing"] = time_kernel_sets(
        dict(zip(LAYOUTS, paths)), batch=args.batch, rounds=rounds, calls=calls
    )
    path = save(f"step_graph-l{args.layers}-{args.mode}", results)
    print(report(results))
    log(f"results: {path}")
    return 0


def report(results: dict[str, Any]) -> str:
    lines = [
        f"raw invoke, {results['layers']}-layer example, {results['batch']} streams, "
        f"{results['mode']}, "
        f"{results['rounds']} interleaved rounds: CPU us per stream-step",
        "",
        "| kernel set | before min / median | after min / median | after / before (median) |",
        "| --- | --- | --- | --- |",
    ]
    for kind, r in results["timing"].items():
        if "error" in r:
            lines.append(f"| {kind} | not run: {r['error']} | | |")
            continue
        b, a = r["before"], r["after"]
        lines.append(
            f"| {kind}{' (delegate)' if a['delegated'] else ''} | {b['min_us']:.2f} / "
            f"{b['median_us']:.2f} | {a['min_us']:.2f} / {a['median_us']:.2f} | "
            f"{a['median_us'] / b['median_us']:.2f} |"
        )
    lines += [
        "",
        "| layout | ops | parity top-1 | drift top-1 | drift error (last 10%) | checks | "
        "kernel sets verified |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, f in results["fidelity"].items():
        ops = ", ".join(f"{n} {c}" for n, c in f["ops"].items())
        lines.append(
            f"| {k} | {ops} | {f['parity_top1']} | {f['drift_top1']} | "
            f"{f['drift_mean_error_last_10pct']:.4g} | {'all pass' if f['checks_passed'] else 'FAIL'}"
            f" | {len(f['kernel_sets_verified'])}: {', '.join(f['kernel_sets_verified'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

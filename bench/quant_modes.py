"""Every ``--quant`` mode of the example model side by side: bundle size, fidelity, raw speed.

    .venv/bin/python -m bench.quant_modes [--quick] [--batch 64] [--fresh]

Each mode is converted and verified by the converter (``run_convert``: the task metrics on the
held-out recordings, parity, drift, every reachable kernel set); the table reads its figures
from ``report.json``. Timing is ``bench.step_graph``'s: ``interpreter.invoke()`` alone on a
resized [batch, .] input, one thread, CPU time of the calling thread, every mode's model
interleaved round by round; the median over the rounds in microseconds per stream-step, in
ai-edge-litert (XNNPACK, built-in kernels) and tflite-runtime 2.14 in the device-like Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench._common import BUILD, convert_example, example, log, save
from bench.step_graph import time_kernel_sets
from convert.quantize import AUTO_ORDER


def build(mode: str, fresh: bool) -> Path:
    model, _ = example()
    d = BUILD / "quant-modes" / mode
    if fresh or not (d / "report.json").exists():
        log(f"converting the example model ({mode})")
        convert_example(model, d, mode)
    return d


def figures(bundle: Path) -> dict[str, Any]:
    r = json.loads((bundle / "report.json").read_text())
    par = r["parity"]
    return {
        "tflite_bytes": r["tflite_bytes"],
        "accuracy_float": par.get("accuracy_float"),
        "accuracy_bundle": par.get("accuracy_bundle"),
        "top1_agreement": par.get("top1_agreement"),
        "mean_abs_error": par["mean_abs_error"],
        "max_abs_error": par["max_abs_error"],
        "checks_passed": all(r["checks"].values()),
        "kernel_sets_verified": sorted(
            k for k, v in r["kernel_sets"]["sets"].items() if v["passed"]
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--batch", type=int, default=64, help="streams per invoke (default 64)")
    ap.add_argument("--fresh", action="store_true", help="convert again, ignore the cache")
    args = ap.parse_args()
    if args.batch < 1:
        print(f"bench.quant_modes: --batch {args.batch} must be >= 1", file=sys.stderr)
        return 2
    rounds, calls = (5, 100) if args.quick else (15, 200)
    bundles = {m: build(m, args.fresh) for m in AUTO_ORDER}
    results: dict[str, Any] = {
        "batch": args.batch,
        "rounds": rounds,
        "calls_per_round": calls,
        "fidelity": {m: figures(b) for m, b in bundles.items()},
        "timing": time_kernel_sets(
            {m: str(b / "model.tflite") for m, b in bundles.items()},
            batch=args.batch,
            rounds=rounds,
            calls=calls,
        ),
    }
    path = save("quant_modes", results)
    print(report(results))
    log(f"results: {path}")
    return 0


def report(results: dict[str, Any]) -> str:
    kinds = list(results["timing"])
    lines = [
        f"example model, {results['batch']} streams per invoke, {results['rounds']} interleaved "
        "rounds; speed: median CPU us per stream-step",
        "",
        "| mode | bytes | accuracy float / bundle | per-step top-1 agreement | mean / max \\|dy\\| "
        "| " + " | ".join(kinds) + " | verdict |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in kinds) + " | --- |",
    ]
    for mode, f in results["fidelity"].items():
        speed = []
        for kind in kinds:
            t = results["timing"][kind]
            speed.append("not run" if "error" in t else f"{t[mode]['median_us']:.2f}")
        lines.append(
            f"| {mode} | {f['tflite_bytes']:,} | {f['accuracy_float']:.1%} / "
            f"{f['accuracy_bundle']:.1%} | {f['top1_agreement']:.2%} | "
            f"{f['mean_abs_error']:.4f} / {f['max_abs_error']:.3f} | " + " | ".join(speed) + " | "
            f"{'pass' if f['checks_passed'] else 'FAIL'} ({len(f['kernel_sets_verified'])} kernel "
            "sets) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

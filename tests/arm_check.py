"""Closed-loop streams of every test bundle, compared bit for bit between x86 and emulated Arm.

Used by ``scripts/test-arm``:

    python -m tests.arm_check inputs BUNDLES IN_DIR [--steps 2000]
    python -m tests.arm_check replay BUNDLES IN_DIR OUT_DIR [--backend litert|tflite]
    python -m tests.arm_check compare OUT_ROOT REPORT.json

``replay`` runs in one process for all bundles (Python start-up under emulation costs seconds)
and needs only ``edge`` and numpy. ``compare`` reads ``OUT_ROOT/<machine label>/<interpreter>/``
and fails unless ai-edge-litert (XNNPACK) gives the same bits on every CPU as on x86.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE = "x86_64"
MUST_MATCH = "litert"  # the recommended device interpreter: XNNPACK, bit-exact across machines


def bundle_names(bundles: Path) -> list[str]:
    return sorted(p.parent.name for p in bundles.glob("*/manifest.json"))


def make_inputs(bundles: Path, out: Path, steps: int) -> None:
    """Each bundle's 8 held-out sequences, repeated into 8 streams of ``steps`` samples."""
    out.mkdir(parents=True, exist_ok=True)
    for name in bundle_names(bundles):
        with np.load(bundles / name / "expected.npz") as z:
            x = z["x"]
        reps = -(-steps // x.shape[1])
        np.savez(out / f"{name}.npz", streams=np.tile(x, (1, reps, 1))[:, :steps])


def replay_all(bundles: Path, inputs: Path, out: Path, backend: str) -> None:
    import edge
    from edge import replay

    out.mkdir(parents=True, exist_ok=True)
    for name in bundle_names(bundles):
        engine = edge.load(bundles / name, backend=backend, kernel_mismatch="allow")
        with np.load(inputs / f"{name}.npz") as z:
            y, state = replay.run(engine, z["streams"])
        # what the runtime publishes: dequantised, or the runtime's softmax of int8 logits
        np.savez(out / f"{name}.npz", y=y, state=state, published=engine.model.decode_y(y))
        info = {"kernels": engine.model.kernels, "quantization": engine.manifest.quantization}
        (out / f"{name}.json").write_text(json.dumps(info))
        print(f"{name}: {engine.model.kernels}", file=sys.stderr, flush=True)


def compare(root: Path) -> dict[str, Any]:
    """{interpreter: {machine: {bundle: {...}}}} against the x86 run of the same interpreter."""
    table: dict[str, Any] = {}
    for interp_dir in sorted(root.glob(f"{REFERENCE}/*")):
        interp = interp_dir.name
        for machine_dir in sorted(p for p in root.iterdir() if p.name != REFERENCE):
            for ref_file in sorted(interp_dir.glob("*.npz")):
                name = ref_file.stem
                got = machine_dir / interp / f"{name}.npz"
                row: dict[str, Any]
                if not got.exists():
                    row = {"status": "missing"}
                else:
                    with np.load(ref_file) as a, np.load(got) as b:
                        dy = np.abs(a["y"].astype(np.float64) - b["y"].astype(np.float64))
                        ds = np.abs(a["state"].astype(np.float64) - b["state"].astype(np.float64))
                        same = np.array_equal(a["published"], b["published"])
                        row = {
                            "bit_exact": bool(dy.max() == 0 and ds.max() == 0 and same),
                            "published_bit_exact": bool(same),
                            "outputs": int(dy.size),
                            "state_values": int(ds.size),
                            "steps": int(a["y"].shape[1]),
                            "max_output_diff": float(dy.max()),
                            "max_state_diff": float(ds.max()),
                            "kernels": json.loads((got.with_suffix(".json")).read_text())[
                                "kernels"
                            ],
                        }
                        x86 = json.loads(ref_file.with_suffix(".json").read_text())
                        row["x86_kernels"] = x86["kernels"]
                        row["quantization"] = x86.get("quantization", "")
                table.setdefault(interp, {}).setdefault(machine_dir.name, {})[name] = row
    return table


def markdown(table: dict[str, Any]) -> str:
    lines = [
        "| interpreter | CPU | bundle | kernel set (Arm) | vs x86 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for interp, machines in table.items():
        for machine, rows in machines.items():
            for name, r in rows.items():
                if r.get("status") == "missing":
                    verdict, kern = "missing", "-"
                elif r["bit_exact"]:
                    verdict = (
                        f"bit-exact ({r['outputs']} outputs, {r['state_values']} state values)"
                    )
                    kern = r["kernels"]
                elif r["max_state_diff"] == 0:
                    verdict = f"state bit-exact; y up to {r['max_output_diff']:g} apart"
                    kern = r["kernels"]
                else:
                    verdict = (
                        f"max diff {r['max_output_diff']:g} in y, {r['max_state_diff']:g} in state"
                    )
                    kern = r["kernels"]
                lines.append(f"| {interp} | {machine} | {name} | {kern} | {verdict} |")
    return "\n".join(lines)


def failures(table: dict[str, Any]) -> list[str]:
    """ai-edge-litert's int8 bundles under XNNPACK: the same kernel set on Arm, and the state,
    the output tensor and the published values (after the runtime's softmax, for a classifier)
    bit-exact."""
    bad = []
    for interp, machines in table.items():
        for machine, rows in machines.items():
            for name, r in rows.items():
                if r.get("status") == "missing":
                    bad.append(f"{interp} {machine} {name}: no output")
                    continue
                if not (interp == MUST_MATCH and r["x86_kernels"].endswith("xnnpack")):
                    continue
                if r["quantization"] != "int8":
                    continue  # float: ~1e-7 apart between machines, reported
                if r["kernels"] != r["x86_kernels"]:
                    bad.append(f"{machine} {name}: kernel set {r['kernels']} on Arm")
                elif not r["bit_exact"]:
                    bad.append(
                        f"{machine} {name}: {r['kernels']} differs from x86 by "
                        f"{r['max_state_diff']:g} in the state, {r['max_output_diff']:g} in y"
                        + ("" if r["published_bit_exact"] else ", and in the published values")
                    )
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.arm_check")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inputs")
    i.add_argument("bundles", type=Path)
    i.add_argument("out", type=Path)
    i.add_argument("--steps", type=int, default=2000)
    r = sub.add_parser("replay")
    r.add_argument("bundles", type=Path)
    r.add_argument("inputs", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--backend", default="litert")
    c = sub.add_parser("compare")
    c.add_argument("root", type=Path)
    c.add_argument("report", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "inputs":
        make_inputs(args.bundles, args.out, args.steps)
    elif args.cmd == "replay":
        replay_all(args.bundles, args.inputs, args.out, args.backend)
    else:
        table = compare(args.root)
        args.report.write_text(json.dumps(table, indent=2) + "\n")
        args.report.with_suffix(".md").write_text(markdown(table) + "\n")
        print(markdown(table))
        bad = failures(table)
        for line in bad:
            print(f"NOT BIT-EXACT: {line}", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``edge-lstm``: the device runtime's command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import EdgeError


def probe_inputs(features: int, steps: int = 64) -> np.ndarray:
    """A fixed input sequence, identical on every machine, to compare interpreters by."""
    t = np.arange(steps)[:, None]
    return np.asarray(np.sin(0.3 * t + np.arange(features)[None, :]), dtype=np.float64)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-lstm",
        description="Streaming LSTM runtime: keeps h/C per stream, steps one sample at a time.",
    )
    p.add_argument("--version", action="version", version="edge-lstm 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    i = sub.add_parser(
        "inspect",
        help="print a bundle's manifest and run a quick self-test",
        description="Load DIR (manifest + sha256 checked), run a 64-step probe "
        "stream and print what was found.",
    )
    i.add_argument("bundle", help="bundle directory made by lstm-convert")
    i.add_argument(
        "--backend",
        default=None,
        help="interpreter: auto (default), litert, tflite or tensorflow; or set EDGE_LSTM_BACKEND",
    )
    i.add_argument(
        "--kernel-mismatch",
        choices=["refuse", "warn"],
        default="refuse",
        help="when the interpreter's kernel set is not one the bundle was verified with: "
        "refuse (default) or warn and run anyway",
    )
    i.add_argument("--json", action="store_true", help="machine-readable output")
    r = sub.add_parser(
        "replay",
        help="run recorded streams through a bundle and write the raw outputs",
        description="Replay every [N, T, F] array of IN.npz through DIR, each row a stream from "
        "zero state, and write the model's raw outputs and states (NAME/y, NAME/state) to "
        "OUT.npz with the kernel set that computed them: to compare interpreters and machines "
        "bit for bit. Runs on any kernel set (this is how kernel sets are compared).",
    )
    r.add_argument("bundle", help="bundle directory made by lstm-convert")
    r.add_argument("--input", required=True, help="IN.npz of float [N, T, F] arrays")
    r.add_argument("--out", required=True, help="OUT.npz to write")
    r.add_argument("--backend", default=None, help="interpreter, as for inspect")
    r.add_argument(
        "--builtin-kernels",
        action="store_true",
        help="switch the interpreter's default delegates (XNNPACK) off",
    )
    from .service_cli import add_serve_parser

    add_serve_parser(sub)
    return p


def run_command(
    p: argparse.ArgumentParser,
    commands: Mapping[str, Callable[[argparse.Namespace], int]],
    argv: Sequence[str] | None,
) -> int:
    """The shared shape of our three CLIs: help without a command, exit 2 and one line on
    stderr for any ``EdgeError``, 130 on Ctrl-C."""
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    try:
        return commands[args.command](args)
    except EdgeError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    from .service_cli import serve

    return run_command(parser(), {"inspect": inspect, "serve": serve, "replay": replay}, argv)


def replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .replay import replay_command

    info = replay_command(
        args.bundle, Path(args.input), Path(args.out), args.backend, args.builtin_kernels
    )
    print(json.dumps(info))
    return 0


def inspect(args: argparse.Namespace) -> int:
    from .engine import load

    t0 = time.perf_counter()
    engine = load(args.bundle, backend=args.backend, kernel_mismatch=args.kernel_mismatch)
    load_s = time.perf_counter() - t0
    m = engine.manifest
    y = engine.step("probe", probe_inputs(m.features))
    info = {
        "bundle": args.bundle,
        "backend": engine.model.backend.name,
        "backend_version": engine.model.backend.version,
        "kernels": engine.model.kernels,
        "load_seconds": load_s,
        "manifest": m.to_dict(),
        "probe_y": y.tolist(),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"bundle      {args.bundle}")
    print(f"model       {m.model_id} ({m.quantization}), source {m.extra.get('source_name', '?')}")
    print(f"features    {m.features}: {', '.join(m.feature_names)}")
    print(
        f"output      {m.output_kind}, {m.outputs} values"
        + (f": {', '.join(m.labels)}" if m.labels else "")
    )
    print(
        "state       "
        + ", ".join(f"{s.input} ({s.cell} {s.role}) {s.width}" for s in m.states)
        + f"; {sum(z.nbytes for z in engine.model.zero_state())} bytes per stream"
    )
    print(
        f"interpreter {engine.model.backend.name} {engine.model.backend.version}, "
        f"loaded in {load_s * 1000:.0f} ms"
    )
    verified = m.verified_kernels
    print(
        f"kernels     {engine.model.kernels}; verified with "
        + (", ".join(verified) if verified is not None else "(not recorded)")
    )
    fid = m.fidelity.get("parity", {})
    if fid:
        print("fidelity    " + ", ".join(f"{k} {v:.4g}" for k, v in fid.items()))
    print(f"self-test   64-step probe ok, last y = {np.round(y[-1], 4).tolist()}")
    return 0

"""``lstm-convert``: Keras or ONNX (PyTorch) LSTM -> verified step-model bundle.

Exit codes: 0 ok, 1 bundle written but a fidelity check failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edge.cli import quiet_tensorflow, run_command, sigterm_interrupts, version_text
from edge.errors import shown

from . import train as train_defaults
from .errors import ConvertError
from .quantize import AUTO_ORDER, MODES
from .verdict import MAX_LONG_STEPS, REGIMES, Targets

EPILOG = """\
examples:
  lstm-convert train-example --out build/example/model.keras
  lstm-convert convert build/example/model.keras --calib build/example/model.calib.npy \\
      --data build/example/model.test.npz --out build/example/bundle-int8 \\
      --labels Badminton,Running,Standing,Walking --sample-rate 10
  lstm-convert verify build/example/bundle-int8 --model build/example/model.keras \\
      --data build/example/model.test.npz
"""


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty name in {shown(text)}")
    twice = sorted({t for t in items if items.count(t) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{shown(twice[0])} appears twice in {shown(text)}")
    return items


def _out_dir(text: str) -> str:
    """A bundle directory to (re)place: never empty, never the directory we run in (or one
    holding it), which replacing would pull from under the shell."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name the bundle directory to write")
    path, here = Path(text).resolve(), Path.cwd().resolve()
    if path == here or path in here.parents:
        raise argparse.ArgumentTypeError(
            f"{shown(text)} is the current directory or holds it; name a directory of its own"
        )
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lstm-convert",
        description="Turn a trained Keras or ONNX (e.g. PyTorch nn.LSTM / nn.GRU exported with "
        "torch.onnx.export) LSTM into a verified TFLite step model (one time step, explicit h/C "
        "state) with a manifest and a fidelity report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_text("lstm-convert"))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser(
        "convert",
        help="convert and verify a model into a bundle directory",
        description="Convert MODEL (.keras or .onnx) into DIR (model.tflite, manifest.json, "
        "report.json, report.png). DIR is never half-written: it is built in a temporary "
        "directory and renamed into place, and an existing DIR is replaced only when it is "
        "empty or an earlier bundle. Exit 0 ok, 1 bundle written but a gate failed, 2 bad input.",
    )
    c.add_argument(
        "model",
        metavar="MODEL",
        help="trained model: Keras (.keras, or legacy .h5) or ONNX (.onnx, as torch.onnx.export "
        "writes nn.LSTM / nn.GRU models; onnxruntime running it is the float reference)",
    )
    c.add_argument(
        "--calib",
        required=True,
        help="calibration sequences: float32 [N, T, F] .npy, or .npz with key 'x', in "
        "the model's input units (also for an ONNX model whose input is [time, batch, features])",
    )
    c.add_argument(
        "--out", metavar="DIR", required=True, type=_out_dir, help="bundle directory to write"
    )
    c.add_argument(
        "--quant",
        default="int8",
        choices=[*MODES, "auto"],
        help="quantisation mode (default: int8, full integer with int8 state I/O; "
        "int8-float-head: int8 with float output layers; int8-float-cell: int8 with the LSTM "
        "cell state and its update in float); 'auto' tries "
        + ", ".join(AUTO_ORDER)
        + " in that order (smallest bundle first), skips a mode the model has no part for, "
        "and keeps the first that meets every target of the verdict, saying why",
    )
    c.add_argument("--labels", type=_csv, help="class labels, comma separated (classifiers)")
    c.add_argument("--sample-rate", type=float, help="sensor sample rate in Hz (for the manifest)")
    c.add_argument("--feature-names", type=_csv, help="feature names, comma separated")
    c.add_argument(
        "--data",
        help="held-out sequences for verification (.npy, or .npz with 'x' "
        "and optional labels 'y'); default: the calibration data",
    )
    c.add_argument(
        "--normalization",
        choices=["runtime", "graph"],
        default="runtime",
        help="where a Normalization layer runs: 'runtime' (float, before int8 "
        "quantisation; default, better fidelity) or 'graph' (inside the model)",
    )
    _verdict_options(c)
    c.add_argument(
        "--per-channel",
        action="store_true",
        help="per-channel weight scales for int8/int16x8 (larger file; default: one "
        "scale per gate weight tensor)",
    )
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    v = sub.add_parser(
        "verify",
        help="re-run the fidelity checks on a bundle",
        description="Re-run parity, drift, op audit and interpreter checks on DIR. Exit 0 "
        "when every gate holds, 1 when one failed, 2 bad input.",
    )
    v.add_argument("bundle", metavar="DIR", help="bundle directory")
    v.add_argument("--data", required=True, help="sequences (.npy, or .npz with 'x' and 'y')")
    v.add_argument(
        "--model",
        required=True,
        help="the source model, .keras or .onnx (the float reference); its sha256 must match",
    )
    _verdict_options(v, "exit 1 when a gate fails on --data")
    v.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    t = sub.add_parser(
        "train-example",
        help="train the example IMU model (BasicMotions)",
        description="Train Normalization -> LSTM(64) -> Dense(4, softmax) per step "
        "on the shipped BasicMotions recordings, first one recording at a time, then on "
        "continuous streams of recordings back to back (the regime the runtime runs it in; "
        "docs/training.md); writes MODEL.keras, MODEL.calib.npy, MODEL.test.npz and MODEL.json.",
    )
    t.add_argument(
        "--out", metavar="MODEL.keras", required=True, help="model file to write (.keras)"
    )
    t.add_argument(
        "--epochs",
        type=int,
        default=train_defaults.EPOCHS,
        help="epochs on streams; the best on held-out streams is kept "
        f"(default {train_defaults.EPOCHS})",
    )
    t.add_argument(
        "--pretrain-epochs",
        type=int,
        default=train_defaults.PRETRAIN_EPOCHS,
        help=f"epochs on single recordings first (default {train_defaults.PRETRAIN_EPOCHS})",
    )
    t.add_argument("--seed", type=int, default=7, help="seeds everything (default 7)")
    return p


def _verdict_options(
    p: argparse.ArgumentParser,
    note: str = "exit 0 when every gate holds on --data; 1 when a bundle was written but a gate "
    "failed",
) -> None:
    """The thresholds of the verdict; defaults in ``convert.verdict.Targets``."""
    d = Targets()
    g = p.add_argument_group("verdict", note)
    g.add_argument(
        "--max-rmse-ratio",
        type=float,
        default=d.max_rmse_ratio,
        help="regressors: bundle RMSE against the targets / float RMSE "
        f"(default {d.max_rmse_ratio})",
    )
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=d.max_accuracy_drop,
        help="classifiers: float accuracy minus bundle accuracy, as a fraction "
        f"(default {d.max_accuracy_drop})",
    )
    g.add_argument(
        "--min-agreement",
        type=float,
        default=d.min_agreement,
        help=f"classifiers: per-step top-1 agreement with float (default {d.min_agreement})",
    )
    g.add_argument(
        "--max-drift-ratio",
        type=float,
        default=d.max_drift_ratio,
        help="closed-loop error of the last 10%% of a long stream over the 2nd 10%% "
        f"(default {d.max_drift_ratio})",
    )
    g.add_argument(
        "--max-saturation",
        type=float,
        default=d.max_saturation,
        help="share of values on --data an integer tensor may clip before a warning "
        f"(default {d.max_saturation})",
    )
    g.add_argument(
        "--regime",
        choices=REGIMES,
        default=d.regime,
        help="'sequences' (default): streams are reset between sequences, long-stream "
        "agreement is reported; 'continuous': streams run unreset, it is a gate too",
    )
    g.add_argument(
        "--long-steps",
        type=int,
        default=d.long_steps,
        help=f"length of the closed-loop drift stream, 100..{MAX_LONG_STEPS} "
        f"(default {d.long_steps})",
    )


def _targets(args: argparse.Namespace) -> Targets:
    return Targets(
        max_rmse_ratio=args.max_rmse_ratio,
        max_accuracy_drop=args.max_accuracy_drop,
        min_agreement=args.min_agreement,
        max_drift_ratio=args.max_drift_ratio,
        max_saturation=args.max_saturation,
        regime=args.regime,
        long_steps=args.long_steps,
    )


def main(argv: Sequence[str] | None = None) -> int:
    quiet_tensorflow()
    commands = dict.fromkeys(("convert", "verify", "train-example"), _run)
    with sigterm_interrupts():
        return run_command(parser(), commands, argv)


def _run(args: argparse.Namespace) -> int:
    # Every command needs TensorFlow: without it, say so before anything is written.
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    if args.command == "train-example":
        from .train import train_example

        if args.epochs < 1:
            raise ConvertError(f"--epochs {args.epochs} must be >= 1")
        if args.pretrain_epochs < 0:
            raise ConvertError(f"--pretrain-epochs {args.pretrain_epochs} must be >= 0")
        if not 0 <= args.seed < 2**32:  # NumPy's and Keras's seeds
            raise ConvertError(f"--seed {args.seed} must be in 0..4294967295")
        info = train_example(
            args.out, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, seed=args.seed
        )
        print(f"wrote {info['model']} (+ calib {info['calib']}, test {info['test']})")
        print(
            f"test accuracy: each recording from the zero state: last step "
            f"{info['test_accuracy_last_step']:.2%}, every step "
            f"{info['test_accuracy_all_steps']:.2%}; recordings back to back (every step) "
            f"{info['test_accuracy_replay']:.2%}"
        )
        return 0
    targets = _targets(args)
    from . import pipeline

    if args.command == "convert":
        report = pipeline.run_convert(
            args.model,
            args.calib,
            args.out,
            mode=args.quant,
            labels=args.labels,
            sample_rate_hz=args.sample_rate,
            feature_names=args.feature_names,
            data_path=args.data,
            normalization=args.normalization,
            targets=targets,
            per_channel=args.per_channel,
        )
    else:
        report = pipeline.run_verify(args.bundle, args.model, args.data, targets=targets)
    print(pipeline.dumps(report) if args.json else pipeline.summary(report))
    if args.command == "convert":  # with --json, stdout holds the report alone
        print(
            f"wrote {args.out} in {report['convert_seconds']:.1f} s",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0 if all(report["checks"].values()) else 1


def console() -> int:
    """The console script: ``main`` with TensorFlow's start-up lines kept off stderr."""
    quiet_tensorflow(filter_stderr=True)
    return main()

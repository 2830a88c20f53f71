"""``edge-lstm``: the device runtime's command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import early_signals
from ._version import __version__
from .errors import ConfigError, EdgeError

if TYPE_CHECKING:
    import numpy as np

# Optional dependencies by top-level module, with the extra that installs them: a command that
# needs one of these on a machine without it says so in one line instead of a traceback.
OPTIONAL_MODULES = {
    "tensorflow": "convert",
    "keras": "convert",
    "onnx": "convert",
    "onnxruntime": "convert",
    "matplotlib": "sim",
    "tqdm": "sim",
    "amqtt": "sim",
    "prometheus_client": "service",
    "ai_edge_litert": "litert",
    "tflite_runtime": "tflite",
    "nats": "cluster",
}


# Every file the kit writes is named: the kit grew files the help never mentioned.
DEPLOY_KIT_DESCRIPTION = """\
Write the deploy kit that ships with this installation into DIR (made if needed), and say
where each file goes:
  edge-lstm.service         systemd unit of edge-lstm serve (systemctl reload: SIGHUP)
  edge-lstm.toml            example configuration of serve
  mosquitto.conf            Mosquitto: TLS listener, password file, persistent sessions
  edge-lstm.acl             Mosquitto ACL: each device writes only its own topics
  grafana-dashboard.json    Grafana dashboard of the Prometheus metrics
  nats-server.conf          nats-server with JetStream and MQTT, for edge-lstm worker
  edge-lstm-worker.service  systemd unit of edge-lstm worker
A DIR that holds any of these already is refused (exit 2, nothing written) unless --force.
Written whole or not at all: a target that is not a regular file (a directory, a FIFO...)
is refused before anything is written; a link is followed and kept.
"""


def version_text(prog: str) -> str:
    """``PROG VERSION`` from the installed package's metadata (the source tree's version when
    run from a checkout that is not installed)."""
    from importlib import metadata

    try:
        version = metadata.version("edge-lstm")
    except metadata.PackageNotFoundError:
        version = __version__
    return f"{prog} {version}"


def quiet_tensorflow(*, filter_stderr: bool = False) -> None:
    """Keep TensorFlow's start-up chatter (oneDNN notes, absent-GPU errors, absl warnings) off
    the terminal of the commands that may import it; a user's own setting wins.
    ``filter_stderr`` (console entry points only) also drops the lines TensorFlow writes
    before its log level applies (``EDGE_LSTM_TF_LOGS=1`` keeps them)."""
    import logging
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if filter_stderr:
        from . import stderr_filter

        stderr_filter.install()
    for name in ("tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


def missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """The one-line message for an optional dependency that is not installed, else None."""
    top = (exc.name or "").split(".")[0]
    extra = OPTIONAL_MODULES.get(top)
    if extra is None:
        return None
    return f"this needs {top}, which is not installed here: pip install 'edge-lstm[{extra}]'"


def probe_inputs(features: int, steps: int = 64) -> np.ndarray:
    """A fixed input sequence, identical on every machine, to compare interpreters by."""
    import numpy as np

    t = np.arange(steps)[:, None]
    return np.asarray(np.sin(0.3 * t + np.arange(features)[None, :]), dtype=np.float64)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-lstm",
        description="Streaming LSTM runtime: keeps h/C per stream, steps one sample at a time.",
    )
    p.add_argument("--version", action="version", version=version_text("edge-lstm"))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    i = sub.add_parser(
        "inspect",
        help="print a bundle's manifest and run a quick self-test",
        description="Load DIR (manifest + sha256 checked), run a 64-step probe "
        "stream and print what was found.",
    )
    i.add_argument("bundle", metavar="DIR", help="bundle directory made by lstm-convert")
    i.add_argument(
        "--backend",
        default=None,
        help="interpreter: auto (default), litert, tflite or tensorflow; or set EDGE_LSTM_BACKEND",
    )
    i.add_argument(
        "--kernel-mismatch",
        choices=["refuse", "warn"],
        default=None,
        help="when the interpreter's kernel set is not one the bundle was verified with: "
        "refuse (default) or warn and run anyway; or set EDGE_LSTM_KERNEL_MISMATCH",
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
    r.add_argument("bundle", metavar="DIR", help="bundle directory made by lstm-convert")
    r.add_argument(
        "--input", metavar="IN.npz", required=True, help="IN.npz of float [N, T, F] arrays"
    )
    r.add_argument(
        "--out",
        metavar="OUT.npz",
        required=True,
        help="OUT.npz to write: a new or regular file (a link is followed and kept; a device, "
        "FIFO or directory is refused)",
    )
    r.add_argument("--backend", default=None, help="interpreter, as for inspect")
    r.add_argument(
        "--builtin-kernels",
        action="store_true",
        help="switch the interpreter's default delegates (XNNPACK) off",
    )
    from .service_cli import add_serve_parser

    add_serve_parser(sub)
    k = sub.add_parser(
        "deploy-kit",
        help="write the systemd units, example configuration, Mosquitto and NATS configuration",
        description=DEPLOY_KIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument("directory", metavar="DIR", help="directory to write (created if needed)")
    k.add_argument("--force", action="store_true", help="overwrite files already in DIR")
    t = sub.add_parser(
        "top",
        help="live view of running services (streams, rates, errors, latency)",
        description="Subscribe to the stats and status topics of every edge-lstm serve on "
        "a broker and show one line per runtime, refreshed as stats arrive (every "
        "stats_interval seconds of the service).",
    )
    t.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        help="mqtt://HOST:PORT, mqtts://HOST:PORT or unix:///PATH (default mqtt://127.0.0.1:1883)",
    )
    t.add_argument("--runtime-id", default="+", help="one runtime id (default: all)")
    t.add_argument("--stats-topic", default="edge/stats/{runtime_id}", help="as the service's")
    t.add_argument("--status-topic", default="edge/status/{runtime_id}", help="as the service's")
    t.add_argument("--username", default="", help="broker user name")
    t.add_argument("--password-file", default="", help="file holding the broker password")
    t.add_argument("--tls-ca", default="", help="CA certificate file; enables TLS")
    t.add_argument(
        "--count",
        type=int,
        default=0,
        help="stop after this many stats updates (0: run until Ctrl-C)",
    )
    t.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="give up (exit 1) when no stats arrive for this many seconds (0: wait forever)",
    )
    from .worker_cli import add_worker_parser

    add_worker_parser(sub)
    return p


def run_command(
    p: argparse.ArgumentParser,
    commands: Mapping[str, Callable[[argparse.Namespace], int]],
    argv: Sequence[str] | None,
) -> int:
    """The shared shape of our three CLIs: help without a command, exit 2 and one line on
    stderr for any ``EdgeError`` or a missing optional dependency, 130 on Ctrl-C."""
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    try:
        return commands[args.command](args)
    except EdgeError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_dependency(exc)
        if message is None:
            raise
        print(f"{p.prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    from .service_cli import serve
    from .worker_cli import worker

    commands = {
        "inspect": inspect,
        "serve": serve,
        "replay": replay,
        "deploy-kit": deploy_kit,
        "top": top,
        "worker": worker,
    }
    return run_command(parser(), commands, argv)


def console() -> int:
    """The console script: ``main`` with the interpreters' start-up line kept off stderr
    (ai-edge-litert and tflite-runtime write "Created TensorFlow Lite XNNPACK delegate for
    CPU." from C++, and ``inspect``, ``serve``, ``replay`` and ``worker`` make interpreters).
    The services take SIGTERM, SIGINT and SIGHUP from here on, before NumPy and the runtime
    are imported (seconds on a Pi), which a ``systemctl reload`` or stop may come during."""
    if sys.argv[1:2] in (["serve"], ["worker"]):
        early_signals.catch()
    from . import stderr_filter

    quiet_tensorflow()
    stderr_filter.catch_interpreter_lines()
    return main()


def _raise_interrupt(_number: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a command that writes files the way Ctrl-C does, so that its temporary
    files go: by default SIGTERM kills the process outright and leaves them behind."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .replay import replay_command

    for flag, value in (("--input", args.input), ("--out", args.out)):
        if not value:  # Path("") is ".": an empty --out was called "--out . is a directory"
            raise ConfigError(f"{flag} is empty: name a .npz file")
        if value == "-":  # not standard input or output: a file named "-" was written
            raise ConfigError(
                f"{flag} -: replay reads and writes .npz files, not standard input or output "
                "(which carries its summary); name a file (./- for one called -)"
            )
    with sigterm_interrupts():
        info = replay_command(
            args.bundle, Path(args.input), Path(args.out), args.backend, args.builtin_kernels
        )
    print(json.dumps(info))
    return 0


def deploy_kit(args: argparse.Namespace) -> int:
    from .deploy_kit import NEXT_STEPS, write_kit

    if not args.directory.strip():
        raise ConfigError("DIR is empty: name the directory to write the kit into")
    with sigterm_interrupts():
        written = write_kit(args.directory, force=args.force)
    for path in written:
        print(f"wrote {path}")
    # commands to paste into a shell: a directory with a space or a quote is one word there
    print(NEXT_STEPS.format(d=shlex.quote(args.directory)))
    return 0


def top(args: argparse.Namespace) -> int:
    from .top_cli import run_top

    return run_top(args)


def inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from .engine import load

    t0 = time.perf_counter()
    policy = args.kernel_mismatch or os.environ.get("EDGE_LSTM_KERNEL_MISMATCH") or "refuse"
    engine = load(args.bundle, backend=args.backend, kernel_mismatch=policy)
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
        from .metrics import strict

        print(json.dumps(strict(info), allow_nan=False))  # a manifest may hold a NaN
        return 0
    print(f"bundle      {args.bundle}")
    print(f"model       {m.model_id} ({m.quantization}), source {m.extra.get('source_name', '?')}")
    print(f"features    {m.features}: {', '.join(m.feature_names)}")
    print(
        f"output      {m.output_kind}, {m.outputs} values"
        + (f": {', '.join(m.labels)}" if m.labels else "")
        + ("; the runtime applies the softmax" if m.output_activation == "softmax" else "")
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
    fid = m.fidelity.get("parity")
    figures = fid.items() if isinstance(fid, dict) else ()
    shown = [f"{k} {v:.4g}" for k, v in figures if isinstance(v, (int, float))]
    if shown:  # numbers only: the manifest is hand-editable
        print("fidelity    " + ", ".join(shown))
    last = np.round(y[-1].astype(np.float64), 4).tolist()
    print(f"self-test   64-step probe ok, last y = {last}")
    return 0

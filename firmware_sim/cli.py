"""firmware-sim: emulated sensor devices, the Pi-class host profile and the demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.cli import quiet_tensorflow, run_command, version_text
from edge.config import broker_address
from edge.errors import ConfigError, shown
from edge.sequencing import HALF

from .errors import SimError
from .results import replace_file, results_dir
from .verdict import passed

if TYPE_CHECKING:
    from .mqtt import Link

SCORE_FILES = ("score.json", "score.png")
MAX_BATCH = 1024  # the service's max_samples_per_message default
MAX_SLOWDOWN = 100  # per core: cgroup's least CPU quota (1 ms) of its default period (100 ms)
# Every device is made up front (its source, clock and state), before the first sends:
# 10**9 of them filled memory before any error.
MAX_DEVICES = 10_000
NONE_KEYS = ("slowdown", "first_failing")  # host's figures whose None means "none"


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices",
        type=_count(1, MAX_DEVICES),
        default=20,
        help=f"simulated devices (default 20, at most {MAX_DEVICES})",
    )
    p.add_argument(
        "--rate", type=_positive, default=10.0, help="samples per second per device (default 10)"
    )
    p.add_argument(
        "--duration", type=_positive, default=30.0, help="seconds to stream (default 30)"
    )
    p.add_argument(
        "--faults",
        help="fault rates, e.g. drop=0.01,duplicate=0.02,reorder=0.01 or all=0.01; "
        "kinds: drop, duplicate, reorder, delay, disconnect, nan, garbage, wrong_features, skew, "
        "reboot",
    )
    p.add_argument(
        "--format",
        default="json",
        choices=["json", "senml", "binary", "mixed"],
        help="payload format (mixed: each device one of the three; default json)",
    )
    p.add_argument(
        "--boot-ids",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="devices send a per-boot id, so the runtime sees their reboots (default on)",
    )
    p.add_argument(
        "--out",
        default="sim-results",
        help="directory for score.json and score.png (default sim-results)",
    )


def _login_args(p: argparse.ArgumentParser) -> None:
    """The runtime's broker as ``edge-lstm serve`` is configured for it: its file, login and
    TLS. Options given override the file; ``EDGE_LSTM_*`` variables are read as serve reads
    them (a password only from EDGE_LSTM_PASSWORD or a file, never from the command line)."""
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="edge-lstm serve's configuration file: the broker, login, TLS files and topic "
        "templates of the runtime under test (the options below override it)",
    )
    p.add_argument("--username", help="broker user name (serve's username)")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the broker password (serve's password_file; else the "
        "EDGE_LSTM_PASSWORD_FILE or EDGE_LSTM_PASSWORD environment variable, or the file's keys)",
    )
    # else argparse takes --password for an abbreviation of --password-file, and shows the
    # password back as a file name not found
    p.add_argument("--password", nargs="?", action=_NoPassword, help=argparse.SUPPRESS)
    p.add_argument(
        "--tls-ca",
        dest="tls_ca",
        metavar="FILE",
        help="CA certificate file; enables TLS (serve's tls_ca)",
    )
    p.add_argument(
        "--tls-cert",
        dest="tls_cert",
        metavar="FILE",
        help="client certificate file, for TLS client auth (serve's tls_cert)",
    )
    p.add_argument(
        "--tls-key",
        dest="tls_key",
        metavar="FILE",
        help="client private key file, unencrypted (serve's tls_key)",
    )


class _NoPassword(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        parser.error(
            "--password: no password on the command line (any user sees it in ps): use "
            "--password-file FILE or EDGE_LSTM_PASSWORD"
        )


def broker_link(args: argparse.Namespace, env: Any = None) -> Link:
    """The ``Link`` to the runtime's broker: serve's loader reads ``--config`` and the
    environment, and checks what it took (files that exist and load, topic templates)."""
    from edge.config import load

    from .mqtt import Link

    env = os.environ if env is None else env
    if not args.broker and not args.config and "EDGE_LSTM_BROKER" not in env:
        raise SimError("--broker URL or --config FILE.toml is required")
    overrides = {
        "broker": args.broker,
        "username": args.username,
        "password_file": args.password_file,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }
    cfg = load(args.config, env, overrides, serving=False)
    if (cfg.password or cfg.password_file) and not cfg.username:
        raise SimError(
            "a broker password (password_file or password) needs a user name: --username"
        )
    return Link.of(cfg)


def _broker(text: str) -> str:
    """A broker URL ``edge-lstm serve`` takes: mqtt://, mqtts:// or unix:///PATH."""
    try:
        broker_address(text, "")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return text


def _positive(text: str) -> float:
    """A finite number > 0 (NaN passed every '<= 0' check and hung a run)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{shown(text)}: expected a positive number")
    return value


def _count(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{shown(text)}: expected a whole number >= {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{shown(text)}: expected {low}..{high}")
        return value

    return parse


def _restart_gap(text: str) -> int | None:
    """The runtime's ``restart_gap``, as it takes it: 0 (off, as without the option) up to
    2**31 - 1. A value the runtime cannot have judged the run by restarts it never makes."""
    value = _count(0)(text)
    if value >= HALF:
        raise argparse.ArgumentTypeError(
            f"{shown(text)}: expected the runtime's restart_gap, 0..{HALF - 1} (0: off)"
        )
    return value or None


# A kernel set's name as edge.backend.kernel_set_name makes it.
KERNEL_SET = re.compile(r"(litert|tensorflow|tflite-\d+\.\d+)-(xnnpack|builtin-[A-Za-z0-9_]+)")


def _kernel_set(text: str) -> str:
    """A typo was noticed only when the run was scored, and judged against another set."""
    if not KERNEL_SET.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{shown(text)}: expected a kernel set such as litert-xnnpack, litert-builtin-x86_64 or "
            "tflite-2.14-builtin-aarch64"
        )
    return text


def _batch(text: str) -> int | tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        batch = (int(lo), int(hi)) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)}: expected N or LO-HI") from None
    low, high = batch if isinstance(batch, tuple) else (batch, batch)
    if low > high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO-HI with LO <= HI")
    if not 1 <= low <= high <= MAX_BATCH:
        raise argparse.ArgumentTypeError(
            f"{shown(text)}: samples per message must be 1..{MAX_BATCH}"
        )
    return batch


def check_reboots(plan: Any, boot_ids: bool, restart_gap: int | None) -> None:
    """Devices without boot ids that reboot can only be recognised by a runtime that treats a
    large seq jump back as a restart: refuse the combination unless it does."""
    if plan.rates.get("reboot", 0) > 0 and not boot_ids and restart_gap is None:
        raise SimError(
            "--faults reboot with --no-boot-ids needs --restart-gap N (the runtime's setting): "
            "without a boot id only a seq jump back of more than N tells a reboot"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="firmware-sim", description=__doc__)
    p.add_argument("--version", action="version", version=version_text("firmware-sim"))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="run simulated devices against a broker and score the answers",
        description="Stream from N simulated devices to a broker where edge-lstm serve "
        "runs, then score every prediction and error by (stream, seq).",
    )
    r.add_argument(
        "--broker",
        type=_broker,
        help="mqtt://HOST:PORT, mqtts://HOST:PORT or unix:///PATH (loopback or your own test "
        "hosts); needed unless --config gives it",
    )
    _login_args(r)
    r.add_argument(
        "--source",
        default="basicmotions",
        help="basicmotions[:test|train] (real IMU recordings, with labels), sine, walk, noise, "
        "steps, or a .npy/.csv file of [N, F] samples",
    )
    r.add_argument(
        "--bundle", help="the bundle the runtime serves: enables exactness and accuracy scoring"
    )
    r.add_argument(
        "--kernels",
        type=_kernel_set,
        help="kernel set of the offline run that judges exactness (default: the one the "
        "runtime reports in its status, e.g. tflite-2.14-builtin-x86_64 for a device install)",
    )
    r.add_argument(
        "--batch", type=_batch, default=1, help="samples per message, N or LO-HI (default 1)"
    )
    r.add_argument(
        "--restart-gap",
        type=_restart_gap,
        help="the runtime's --restart-gap: how it notices reboots of devices without boot ids "
        "(needed with --no-boot-ids and reboot faults; 0: off, as the runtime's)",
    )
    r.add_argument(
        "--connections",
        type=_count(0),
        default=0,
        help="0: one MQTT connection (client id) per device; N: devices share N connections",
    )
    r.add_argument(
        "--seed", type=_count(0), default=0, help="seeds sources, clocks and faults (default 0)"
    )
    _device_args(r)
    d = sub.add_parser(
        "demo",
        help="the whole pipeline on this machine (what scripts/demo runs)",
        description="Train and convert the example model if none is cached, start a broker "
        "(Mosquitto, or an embedded one), edge-lstm serve and devices replaying real IMU "
        "recordings; show live progress, then the score. Ctrl-C stops it cleanly.",
    )
    _device_args(d)
    d.add_argument(
        "--embedded-broker",
        action="store_true",
        help="use the embedded broker even if Mosquitto exists",
    )
    d.add_argument(
        "--cluster",
        action="store_true",
        help="a local nats-server (JetStream, MQTT listener) and 2 edge-lstm workers instead "
        "of a broker and serve; one worker is killed (kill -9) half-way "
        "(needs the cluster extra)",
    )
    h = sub.add_parser(
        "host",
        help="Pi-class host profile: real-time capacity on one core",
        description="Run edge-lstm serve pinned to CPU cores with a memory cap (and an "
        "optional CPU slow-down), and find the largest device count that keeps real time: "
        "its figures as a table (--json: as JSON), every trial in OUT/host.json.",
    )
    h.add_argument("--bundle", required=True, help="bundle directory")
    h.add_argument("--rate", type=_positive, default=10.0, help="samples per second per device")
    h.add_argument(
        "--devices", type=_count(1, MAX_DEVICES), help="one trial at this count instead of a search"
    )
    h.add_argument(
        "--cores", default="0", help="CPU cores for the runtime, e.g. 0 or 0,1 (default 0)"
    )
    h.add_argument(
        "--memory-mb", type=int, default=1024, help="memory cap for the runtime (default 1024)"
    )
    h.add_argument(
        "--slowdown", type=float, help="CPU slow-down factor, e.g. 3 (needs a writable cgroup)"
    )
    h.add_argument(
        "--seconds", type=_positive, default=6.0, help="length of each trial (default 6)"
    )
    h.add_argument(
        "--out", default="sim-results", help="directory for host.json (default sim-results)"
    )
    h.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON (host.json's figures without the trials) instead of "
        "a table",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    quiet_tensorflow()
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C: the broker, runtime and devices started are stopped.
        signal.signal(signal.SIGTERM, _interrupt)
    return run_command(parser(), {"demo": demo, "run": run, "host": host}, argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.cluster and args.embedded_broker:
        raise SimError("--cluster runs nats-server: it does not go with --embedded-broker")
    results_dir(args.out, *SCORE_FILES)

    r = run_demo(
        duration=args.duration,
        devices=args.devices,
        rate=args.rate,
        faults=args.faults,
        fmt=args.format,
        out=Path(args.out),
        embedded=True if args.embedded_broker else None,
        boot_ids=args.boot_ids,
        cluster=args.cluster,
    )
    return 0 if passed(r) and r.get("wrong_predictions", 0) == 0 else 1


def run(args: argparse.Namespace) -> int:
    from .devices import Fleet
    from .faults import FaultPlan
    from .scorer import Scorer, save, score, table
    from .verdict import verdict

    broker = broker_link(args)  # checked before anything starts
    names, features, bundle, classes = None, 6, None, ()
    if args.bundle:
        from edge.manifest import read_bundle

        manifest = read_bundle(args.bundle)[0]  # the runtime may run on other kernels
        names, features, bundle, classes = (
            list(manifest.feature_names),
            manifest.features,
            Path(args.bundle),
            manifest.labels,
        )
    results_dir(args.out, *SCORE_FILES)
    plan = FaultPlan.parse(args.faults)
    check_reboots(plan, args.boot_ids, args.restart_gap)
    fleet = Fleet(
        broker,
        args.devices,
        args.rate,
        source=args.source,
        faults=plan,
        fmt=args.format,
        batch=args.batch,
        connections=args.connections,
        seed=args.seed,
        features=features,
        feature_names=names,
        boot_ids=args.boot_ids,
    )
    try:
        scorer = Scorer(broker)
    except SimError:
        fleet.close()
        raise
    try:
        from .demo import progress_bar

        bar = progress_bar(args.duration, fleet, scorer)
        t0 = time.monotonic()
        log = fleet.run(args.duration, bar)
        scorer.wait(log, 15, args.restart_gap)
        bar(args.duration, final=True)
        r = score(
            scorer,
            log,
            time.monotonic() - t0,
            bundle,
            classes,
            restart_gap=args.restart_gap,
            kernels=args.kernels,
        )
        jpath, plot = save(r, scorer, log, Path(args.out))
        print(table(r))
        print(f"\nscore: {jpath}\nplot:  {plot}")
        print(verdict(r))
        return 0 if passed(r) else 1
    finally:
        fleet.close()
        scorer.close()


def host(args: argparse.Namespace) -> int:
    from .host import check_offered, search, trial

    try:
        cores = {int(c) for c in args.cores.split(",")}
    except ValueError:
        raise SimError(f"--cores {shown(args.cores)}: expected numbers like 0 or 0,1") from None
    usable = os.sched_getaffinity(0)
    if not cores <= usable:
        have = ",".join(map(str, sorted(usable)))
        raise SimError(f"--cores {shown(args.cores)}: this machine lets us use CPUs {have}")
    top = MAX_SLOWDOWN * len(cores)
    if args.slowdown is not None and not (
        math.isfinite(args.slowdown) and 1 <= args.slowdown <= top
    ):
        raise SimError(
            f"--slowdown {args.slowdown:g}: expected a factor from 1 to {top:g} (a CPU quota of "
            "at least 1 ms per 100 ms period on each core, the kernel's least)"
        )
    if args.memory_mb < 0:
        raise SimError(f"--memory-mb {args.memory_mb}: expected >= 0 (0: no cap)")
    if args.devices:
        check_offered(args.devices, args.rate)
    out = results_dir(args.out, "host.json")
    common = dict(
        seconds=args.seconds, cores=cores, memory_mb=args.memory_mb, slowdown=args.slowdown
    )
    if args.devices:
        r = trial(Path(args.bundle), args.devices, args.rate, **common)  # type: ignore[arg-type]
    else:
        r = search(Path(args.bundle), args.rate, **common)  # type: ignore[arg-type]
    text = json.dumps(r, indent=2, default=str) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / "host.json", lambda tmp: tmp.write_text(text))
    summary = {k: v for k, v in r.items() if k != "trials"}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    from .scorer import table

    # None of these says there was none (no slow-down, no count that failed), not n/a
    print(table({k: "none" if v is None and k in NONE_KEYS else v for k, v in summary.items()}))
    print(f"\nresults: {out / 'host.json'}")
    return 0


def console() -> int:
    """The console script: ``main`` with TensorFlow's start-up lines kept off stderr."""
    quiet_tensorflow(filter_stderr=True)
    return main()

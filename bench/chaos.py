"""Chaos bench: the whole pipeline under faults for a while, then an exact score.

    python -m bench.chaos --minutes 30 --bundle DIR --out DIR      # --minutes 2: smoke run

A real Mosquitto with persistence and a real ``edge-lstm serve`` subprocess (``--reorder-ms``
as in the demo, snapshots every few seconds) serve simulated devices (mixed JSON / SenML /
binary, 1-3 samples per message) while this bench:

- kills the runtime with SIGKILL every 15-25 s and starts it again,
- restarts the broker every ~2 minutes (SIGTERM: it saves its persistence file),
- sends poison: the devices' NaN / garbage / wrong-feature-count faults plus hostile
  payloads on streams of their own (tests/hostile.py's ``CASES`` when present),
- lets devices duplicate (5 %), reorder and delay messages, disconnect and reboot,
- fills the runtime's state directory (a 64 MiB tmpfs) for ~20 s once.

Then the faults stop, everything drains, the runtime gets SIGTERM, and every prediction is
scored against an offline run of the same bundle (``firmware_sim.scorer``).

Losses are told apart with a witness: a second persistent subscriber to the sample topics.
A sample whose message the witness never received and which the runtime reported as skipped
(the ``gap`` of a later prediction) was lost by the broker, not by the runtime.

Exit code 0 when nothing was lost or wrong and the runtime never crash-looped, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import REORDER_MS_DEFAULT
from firmware_sim.broker import Broker
from firmware_sim.devices import Fleet
from firmware_sim.faults import FaultPlan
from firmware_sim.runtime import Runtime
from firmware_sim.scorer import Scorer, Witness, save, score

from ._common import ROOT, log

RUNTIME_ID = "chaos-runtime"
DEVICE_FAULTS = (
    "duplicate=0.05,reorder=0.02,delay=0.01,disconnect=0.001,reboot=0.001,"
    "nan=0.004,garbage=0.004,wrong_features=0.004"
)
HOSTILE_SHARE = 0.008  # hostile messages per device message (with the above: ~2 % poison)
CRASH_LOOP_S = 10.0  # a runtime that dies on its own this soon after starting is looping
MAX_RESTARTS = 50  # after this many crashes the bench stops restarting the runtime
FILL_S = 20.0  # length of the full-disk episode
TMPFS_MB = 64

FALLBACK_HOSTILE = [
    ("values_3000_deep_unclosed", b'{"seq":1,"values":' + b"[" * 3000),
    ("huge_int_in_values", b'{"seq":1,"values":[' + b"9" * 400 + b",1,2,3,4,5]}"),
    ("huge_int_seq", b'{"seq":' + b"9" * 400 + b',"values":[1,2,3,4,5,6]}'),
    ("senml_bn_number", b'[{"bn":5,"n":"seq","v":1},{"n":"f0","v":1}]'),
]


def hostile_cases() -> tuple[list[tuple[str, bytes]], str]:
    cases = list(FALLBACK_HOSTILE)
    try:
        from tests.hostile import CASES  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return cases, "built-in list"
    return cases + [(str(n), bytes(p)) for n, p in CASES], "tests/hostile.py CASES + built-in list"


def fast_reconnect(client: Any) -> None:
    client.reconnect_delay_set(0.2, 2)


class Supervisor:
    """The runtime process: kills on request, restarts after crashes, samples its memory."""

    def __init__(self, runtime: Runtime, keep: Path | None = None) -> None:
        self.rt = runtime
        self.keep = keep  # copies of the state directory as each kill left it
        self.lock = threading.Lock()
        self.started_at = 0.0
        self.kills = 0
        self.crashes: list[dict[str, Any]] = []
        self.events: list[tuple[float, str]] = []  # wall time, what
        self.crash_loops = 0
        self.max_rss_mb = 0.0
        self.max_hwm_mb = 0.0
        self.gave_up = False
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        self._start()
        self.thread.start()

    def _start(self) -> None:
        self.rt.start()
        self.started_at = time.monotonic()

    def kill9_and_restart(self) -> None:
        with self.lock:
            if self.rt.alive():
                self._sample()
                self.rt.kill9()
                self.kills += 1
                self.events.append((time.time(), "kill -9"))
                if self.keep is not None:
                    dest = self.keep / "lives" / f"{self.kills:03d}"
                    shutil.copytree(
                        self.rt.state_dir, dest, ignore=shutil.ignore_patterns("filler.bin")
                    )
            if not self.gave_up:
                self._start()

    def ensure_running(self) -> None:
        with self.lock:
            if not self.rt.alive() and not self.gave_up:
                self._start()

    def _sample(self) -> None:
        mem = self.rt.vm_status()
        self.max_rss_mb = max(self.max_rss_mb, mem.get("VmRSS", 0.0))
        self.max_hwm_mb = max(self.max_hwm_mb, mem.get("VmHWM", 0.0))

    def _watch(self) -> None:
        while not self.stop_event.wait(1.0):
            with self.lock:
                self._sample()
                proc = self.rt.proc
                if proc is None or proc.poll() is None or self.gave_up:
                    continue
                lived = time.monotonic() - self.started_at
                self.crashes.append({"rc": proc.returncode, "after_s": round(lived, 1)})
                self.events.append((time.time(), f"crash rc {proc.returncode}"))
                self.crash_loops += lived < CRASH_LOOP_S
                log(f"runtime exited on its own (rc {proc.returncode}) after {lived:.1f} s")
                self.rt._log.close()
                if len(self.crashes) >= MAX_RESTARTS:
                    self.gave_up = True
                    log(f"runtime crashed {len(self.crashes)} times: not restarting it again")
                    continue
                self._start()

    def stop(self) -> int:
        self.stop_event.set()
        self.thread.join(5)
        with self.lock:
            self._sample()
            return self.rt.stop()


class Disk:
    """The runtime's state directory on a small tmpfs, and the filler that makes it full."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False
        self.note = ""
        self.filler = path / "filler.bin"

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.note = "not root: no tmpfs for the state directory, full-disk episode skipped"
            return
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(self.path)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode == 0:
            self.mounted = True
        else:
            self.note = f"mount refused ({out.stderr.strip()[:200]}): full-disk episode skipped"

    def fill(self) -> int:
        """Write zeros until the filesystem is full; returns the bytes written."""
        chunk = b"\0" * 2**20
        written = 0
        with open(self.filler, "wb", buffering=0) as f:
            for _ in range(TMPFS_MB * 2):  # bounded: the tmpfs holds at most TMPFS_MB
                try:
                    written += f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            with contextlib.suppress(OSError):  # fill the last partial megabyte too
                while f.write(b"\0" * 4096):
                    written += 4096
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def unmount(self) -> None:
        self.free()
        if not self.mounted:
            return
        for args in (["umount", str(self.path)], ["umount", "-l", str(self.path)]):
            if subprocess.run(args, capture_output=True).returncode == 0:
                self.mounted = False
                return
        log(f"could not unmount {self.path}")


class Hostile:
    """Hostile payloads on streams of their own, at a steady rate, from one client."""

    def __init__(self, url: str, per_s: float, seed: int) -> None:
        import paho.mqtt.client as mqtt

        from firmware_sim.mqtt import close_client

        self.close_client = close_client
        self.cases, self.source = hostile_cases()
        self.per_s = per_s
        self.rng = np.random.default_rng([seed, 99])
        self.sent: Counter[str] = Counter()
        u = url.rsplit("/", 1)[-1]
        host, port = u.split(":")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chaos-hostile")
        fast_reconnect(self.client)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, int(port), 30)
        self.client.loop_start()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hostile", daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(float(self.rng.exponential(1 / self.per_s))):
            name, payload = self.cases[int(self.rng.integers(len(self.cases)))]
            self.client.publish(f"sensors/hostile-{self.sent.total() % 4}/data", payload, qos=1)
            self.sent[name] += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.close_client(self.client)


def log_groups(text: str, top: int = 25) -> dict[str, int]:
    """The runtime's WARNING / ERROR / CRITICAL lines, with numbers and quoted values masked,
    grouped and counted."""
    groups: Counter[str] = Counter()
    for line in text.splitlines():
        m = re.search(r" (WARNING|ERROR|CRITICAL) (\S+): (.*)", line)
        if not m:
            continue
        msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", m.group(3))
        msg = re.sub(r"\d+(\.\d+)?", "N", msg)[:160]
        groups[f"{m.group(1)} {m.group(2)}: {msg}"] += 1
    groups["Traceback (any level)"] = text.count("Traceback (most recent call last)")
    if not groups["Traceback (any level)"]:
        del groups["Traceback (any level)"]
    return dict(groups.most_common(top))


def evidence(
    path: Path,
    r: dict[str, Any],
    scorer: Scorer,
    fleet_log: list[Any],
    events: list[tuple[float, str]],
) -> None:
    """For the first streams with a lost or wrong sample: what was sent and what came back,
    in time order, to look into without running again."""
    keys = [
        *r.get("missing_examples", []),
        *r.get("wrong_examples", []),
        *r.get("stale_in_order_examples", []),
    ]
    streams = list(dict.fromkeys(k[0] for k in keys))[:3]
    doc: dict[str, Any] = {"events": [{"t": t, "what": what} for t, what in events]}
    for stream in streams:
        sent = [
            {
                "epoch": m.epoch,
                "boot": m.boot,
                "seq": m.seq,
                "k": len(m.values),
                "faults": m.faults,
                "published": m.published,
            }
            for m in fleet_log
            if m.stream == stream
        ]
        with scorer.lock:
            got = [
                {"t": t, **{k: v for k, v in d.items() if k not in ("y", "p", "label")}}
                for s, d, t in (*scorer.predictions, *scorer.errors)
                if s == stream
            ]
        doc[stream] = {"sent": sent, "answers": sorted(got, key=lambda a: a["t"])}
    if streams:
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def commit_of(path: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(path), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return out.stdout.strip()[:100]


def run(args: argparse.Namespace) -> int:
    import edge

    bundle = Path(args.bundle)
    manifest = edge.load(bundle).manifest
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="edge-lstm-chaos-"))
    disk = Disk(work / "state")
    broker = Broker(work / "broker", persistence=True, embedded=False)
    parts: list[Any] = []
    sup: Supervisor | None = None
    fleet: Fleet | None = None
    counts = Counter[str]()
    episode: dict[str, Any] = {}
    statuses: list[str] = []
    try:
        disk.mount()
        if disk.note:
            log(disk.note)
        broker.start()
        log(f"broker: mosquitto (persistence) on {broker.url}; work dir {work}")
        runtime = Runtime(
            bundle,
            broker.url,
            disk.path,
            client_id=RUNTIME_ID,
            reorder_ms=args.reorder_ms,
            extra=("--snapshot-interval", str(args.snapshot_interval)),
        )
        scorer = Scorer(broker.url, "chaos-scorer", fast_reconnect, persistent=True)
        parts.append(scorer)
        witness = Witness(broker.url, "chaos-witness")
        parts.append(witness)
        keep = Path(args.keep) if args.keep else None
        if keep is not None:
            shutil.rmtree(keep / "lives", ignore_errors=True)
        sup = Supervisor(runtime, keep)
        sup.start()
        scorer.wait_online(RUNTIME_ID, 60, runtime.alive)
        plan = FaultPlan.parse(args.faults)
        fleet = Fleet(
            broker.url,
            args.devices,
            args.rate,
            source="basicmotions",
            faults=plan,
            fmt="mixed",
            batch=(1, 3),
            seed=args.seed,
            feature_names=list(manifest.feature_names),
            features=manifest.features,
            prefix="chaos",
            configure=fast_reconnect,
        )
        msgs_per_s = args.devices * args.rate / 2
        hostile = Hostile(broker.url, max(0.1, HOSTILE_SHARE * msgs_per_s), args.seed)
        parts.append(hostile)
        log(
            f"{args.devices} devices at {args.rate:g} Hz for {args.minutes:g} min, faults "
            f"{args.faults}; hostile payloads ({hostile.source}) at {hostile.per_s:.1f}/s; "
            f"runtime killed every 15-25 s, broker restarted every ~{args.broker_every:g} s"
        )
        t0 = time.monotonic()
        fleet_log: list[Any] = []
        failed: list[BaseException] = []

        def run_fleet() -> None:
            try:
                fleet_log.extend(fleet.run(duration))
            except BaseException as exc:  # the score would be empty: say so, fail the run
                failed.append(exc)
                raise

        runner = threading.Thread(target=run_fleet, name="fleet", daemon=True)
        runner.start()
        hostile.thread.start()
        calm_at = t0 + duration - 5  # no new faults in the last seconds: a clean handover
        next_kill = t0 + float(rng.uniform(15, 25))
        next_broker = t0 + min(args.broker_every, duration / 2) + float(rng.uniform(-10, 10))
        disk_at = t0 + duration * 0.35 if disk.mounted and not args.no_disk else None
        next_report = t0 + 30
        while runner.is_alive():
            now = time.monotonic()
            if now >= next_kill and now < calm_at:
                sup.kill9_and_restart()
                next_kill = now + float(rng.uniform(15, 25))
                next_broker = max(next_broker, now + 3)
            if now >= next_broker and now < calm_at:
                broker.restart()
                counts["broker_restarts"] += 1
                sup.events.append((time.time(), "broker restarted"))
                next_broker = now + args.broker_every + float(rng.uniform(-10, 10))
                next_kill = max(next_kill, now + 3)
            if disk_at is not None and now >= disk_at and "filled_at" not in episode:
                episode["bytes"] = disk.fill()
                episode["filled_at"] = round(now - t0, 1)
                sup.events.append((time.time(), "disk full"))
                log(f"state dir full ({episode['bytes'] / 2**20:.1f} MiB of filler)")
            filled = "filled_at" in episode and "freed_at" not in episode
            if filled and (now >= t0 + episode["filled_at"] + FILL_S or now >= calm_at):
                disk.free()
                episode["freed_at"] = round(now - t0, 1)
                sup.events.append((time.time(), "disk freed"))
                log("state dir freed")
            with scorer.lock:
                states = [d.get("state", "?") for _, d, _ in scorer.status_log]
            statuses = states
            if now >= next_report:
                next_report += 30
                log(
                    f"[{now - t0:5.0f} s] messages {len(fleet.log)}, predictions "
                    f"{len(scorer.predictions)}, errors {len(scorer.errors)}, kills {sup.kills}, "
                    f"broker restarts {counts['broker_restarts']}, reboots {fleet.reboots}, "
                    f"crashes {len(sup.crashes)}, status {states[-1] if states else '?'}, "
                    f"rss {sup.max_rss_mb:.0f} MiB"
                )
            time.sleep(0.1)
        runner.join()
        if failed:
            log(f"the simulated devices failed ({failed[0]!r}): no score for this run")
            return 1
        disk.free()
        hostile.stop()
        sup.ensure_running()
        fault_s = time.monotonic() - t0
        log(f"faults over after {fault_s:.0f} s; draining")
        drain = time.monotonic()
        scorer.wait(fleet_log, args.drain_s)
        drained_s = time.monotonic() - drain
        time.sleep(1)
        final_rc = sup.stop()
        time.sleep(1)
        log("scoring against an offline run of the bundle")
        r = score(
            scorer,
            fleet_log,
            fault_s,
            bundle,
            manifest.labels,
            witnessed=witness.witnessed(),
        )
        with scorer.lock:
            statuses = [d.get("state", "?") for _, d, _ in scorer.status_log]
        report = summary(r, args, sup, counts, episode, disk, fleet, hostile, statuses)
        report["samples_sent"] = sum(len(m.values) for m in fleet_log if m.delivered)
        report.update(
            drain_s=round(drained_s, 1),
            final_sigterm_rc=final_rc,
            runtime_log_warnings=log_groups(runtime.output()),
            commit=commit_of(ROOT),
        )
        save(r, scorer, fleet_log, out)
        if keep is not None:  # for bench.recovery_check
            with scorer.lock, open(keep / "predictions.jsonl", "w") as f:
                f.writelines(json.dumps([s, d]) + "\n" for s, d, _ in scorer.predictions)
        evidence(out / "evidence.json", r, scorer, fleet_log, sup.events)
        (out / "chaos.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(table(report))
        print(f"\nreport: {out / 'chaos.json'}  score: {out / 'score.json'}")
        ok = report["lost"] == 0 and report["wrong"] == 0 and report["crash_loops"] == 0
        return 0 if ok else 1
    finally:
        if fleet is not None:
            fleet.stop_event.set()
        for part in reversed(parts):
            with contextlib.suppress(Exception):
                part.stop() if isinstance(part, Hostile) else part.close()
        if fleet is not None:
            fleet.close()
        if sup is not None:
            sup.stop_event.set()
            with contextlib.suppress(Exception):
                sup.rt.stop(5)
        broker.stop()
        if args.keep:  # the runtime's state directory and log, for a post-mortem
            shutil.copytree(disk.path, Path(args.keep) / "state", dirs_exist_ok=True)
            shutil.copy(runtime.log_path, Path(args.keep) / "runtime.log")
        disk.unmount()
        if not disk.mounted:
            shutil.rmtree(work, ignore_errors=True)


def summary(
    r: dict[str, Any],
    args: argparse.Namespace,
    sup: Supervisor,
    counts: Counter[str],
    episode: dict[str, Any],
    disk: Disk,
    fleet: Fleet,
    hostile: Hostile,
    statuses: list[str],
) -> dict[str, Any]:
    codes = r.get("errors_by_code", {})
    degraded = sum(1 for a, b in zip(["online", *statuses], statuses) if b == "degraded" != a)
    return {
        "minutes": args.minutes,
        "devices": args.devices,
        "rate_hz": args.rate,
        "seed": args.seed,
        "device_faults": args.faults,
        "messages_sent": r["messages_delivered"],
        "samples_sent": 0,
        "lost": r["lost"],
        "lost_by_broker": r["lost_by_broker"],
        "missing_examples": r.get("missing_examples", []),
        "wrong": r.get("wrong_predictions", 0) + r["unexpected_predictions"],
        "wrong_values": r.get("wrong_predictions", 0),
        "unexpected_predictions": r["unexpected_predictions"],
        "wrong_examples": r.get("wrong_examples", []),
        "stale_answers": codes.get("stale", 0),
        "stale_samples_excused": r["stale"],
        "stale_claims_unfounded": r["stale_claims_unfounded"],
        "stale_published_before_newer_boot": r["stale_published_before_newer_boot"],
        "stale_in_order_never_predicted": r["stale_in_order_never_predicted"],
        "stale_messages_expected": r["stale_messages_expected"],
        "late_answers": codes.get("late", 0),
        "late_samples_excused": r["late_beyond_reorder_window"],
        "late_claims_unfounded": r["late_claims_unfounded"],
        "duplicate_answers": codes.get("duplicate", 0),
        "duplicate_predictions": r["duplicate_predictions"],
        "inconsistent_predictions": r["inconsistent_predictions"],
        "restarts": r["restarts"],
        "restarts_expected": r["restarts_expected"],
        "errors_by_code": codes,
        "runtime_crashes": len(sup.crashes),
        "crash_loops": sup.crash_loops,
        "crash_details": sup.crashes[:10],
        "max_rss_mb": round(sup.max_rss_mb, 1),
        "max_vmhwm_mb": round(sup.max_hwm_mb, 1),
        "latency_p50_ms": r.get("latency_p50_ms"),
        "latency_p99_ms": r.get("latency_p99_ms"),
        "kills": sup.kills,
        "broker_restarts": counts["broker_restarts"],
        "reboots": fleet.reboots,
        "disk_episodes": 1 if "filled_at" in episode else 0,
        "disk_episode": episode or disk.note or "skipped (--no-disk)",
        "degraded_episodes_seen": degraded,
        "final_status": statuses[-1] if statuses else None,
        "hostile_sent": hostile.sent.total(),
        "device_faults_injected": r["faults_injected"],
        "predictions_other_streams": r["predictions_other_streams"],
        "accuracy_runtime": r.get("accuracy_runtime"),
    }


def table(report: dict[str, Any]) -> str:
    rows = []
    for key, value in report.items():
        if isinstance(value, dict) and key == "runtime_log_warnings":
            rows.append("  runtime log, WARNING and above (grouped):")
            rows += [f"    {n:6d}  {line}" for line, n in value.items()] or ["    none"]
            continue
        if isinstance(value, float):
            value = f"{value:.2f}"
        rows.append(f"  {key.replace('_', ' '):28s} {value}")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the fault phase")
    p.add_argument("--bundle", required=True, help="bundle directory (6 features)")
    p.add_argument("--out", default=str(ROOT / "build" / "bench" / "chaos"), help="results")
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--rate", type=float, default=10.0, help="samples per second per device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", default=DEVICE_FAULTS, help="device fault rates per message")
    p.add_argument("--broker-every", type=float, default=120.0, help="seconds between restarts")
    p.add_argument("--reorder-ms", type=float, default=REORDER_MS_DEFAULT)
    p.add_argument("--snapshot-interval", type=float, default=5.0)
    p.add_argument("--drain-s", type=float, default=180.0, help="longest wait for the backlog")
    p.add_argument("--no-disk", action="store_true", help="skip the full-disk episode")
    p.add_argument("--keep", metavar="DIR", help="copy the runtime's state directory and log here")
    return p


def main() -> int:
    args = parser().parse_args()
    if args.minutes <= 0 or args.devices < 1 or args.rate <= 0:
        print("need --minutes > 0, --devices >= 1, --rate > 0", file=sys.stderr)
        return 2

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return run(args)
    except KeyboardInterrupt:
        log("interrupted: processes stopped, tmpfs unmounted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

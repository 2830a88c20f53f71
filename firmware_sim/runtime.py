"""Start ``edge-lstm serve`` as a child process, optionally inside a Pi-class envelope:
pinned to some cores, with a memory cap and a CPU slow-down (cgroup v1/v2 when writable)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge.children import ending_with_us

from .mqtt import Link, link

CGROUP_V1 = Path("/sys/fs/cgroup")


RUN_OTHER_TREE = "from edge.cli import main; raise SystemExit(main())"


class Runtime:
    def __init__(
        self,
        bundle: Path,
        url: str | Link,
        state_dir: Path,
        *,
        protocol: str = "5",
        client_id: str = "firmware-sim-runtime",
        reorder_ms: float | None = None,
        cores: set[int] | None = None,
        memory_mb: int | None = None,
        slowdown: float | None = None,
        extra: tuple[str, ...] = (),
        python: str | None = None,
        tree: str | Path | None = None,
        config: str | Path | None = None,
    ) -> None:
        """``url``: a ``Link`` gives serve its login, TLS files and topic templates too (its
        password by serve's environment variable); ``config``: serve's configuration file,
        which the options given here override."""
        # ``tree``: the runtime of another source tree (an older commit's worktree, for a
        # before/after benchmark), its ``edge`` first on the path
        run = (
            ["-m", "edge"]
            if tree is None
            else ["-c", f"import sys; sys.path.insert(0, {str(tree)!r}); {RUN_OTHER_TREE}"]
        )
        self.cmd = [
            python or sys.executable,  # e.g. a device-like install's Python
            *run,
            "serve",
            "--model",
            str(bundle),
            *(link(url).serve_args()),
            *(() if config is None else ("--config", str(config))),
            "--state-dir",
            str(state_dir),
            "--protocol",
            protocol,
            "--client-id",
            client_id,
            "--stats-interval",
            "0",
            *(() if reorder_ms is None else ("--reorder-ms", str(reorder_ms))),
            *extra,
        ]
        self.password = link(url).password
        self.cores, self.memory_mb, self.slowdown = cores, memory_mb, slowdown
        self.state_dir = state_dir
        self.log_path = state_dir.parent / "runtime.log"
        self.cgroups: list[Path] = []
        self.notes: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def _limit(self) -> None:  # runs in the child before exec
        if self.cores:
            os.sched_setaffinity(0, self.cores)
        if self.memory_mb and not self.cgroups:
            cap = self.memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def start(self) -> Runtime:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        if self.password:  # serve reads a password_file before a password: none given here
            env.pop("EDGE_LSTM_PASSWORD_FILE", None)
            env["EDGE_LSTM_PASSWORD"] = self.password
        self._cgroup_setup()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=ending_with_us(self._limit),
            env=env,
        )
        for cg in self.cgroups:
            (cg / "cgroup.procs").write_text(str(self.proc.pid))
        return self

    def _cgroup_setup(self) -> None:
        """Slow-down by CPU quota and memory cap by cgroup, where this machine lets us."""
        name = f"edge-lstm-sim-{os.getpid()}"
        if self.slowdown and self.slowdown > 1:
            cg = CGROUP_V1 / "cpu" / name
            try:
                cg.mkdir()
            except OSError as exc:
                self.notes.append(
                    f"CPU slow-down unsupported here ({exc.strerror}); ran at full speed"
                )
            else:
                try:
                    period = int((cg / "cpu.cfs_period_us").read_text())
                    (cg / "cpu.cfs_quota_us").write_text(
                        str(int(period * len(self.cores or {0}) / self.slowdown))
                    )
                    self.cgroups.append(cg)
                except (OSError, ValueError) as exc:
                    with contextlib.suppress(OSError):  # made here and left behind for good
                        cg.rmdir()
                    self.notes.append(
                        f"CPU slow-down unsupported here ({getattr(exc, 'strerror', exc)}); "
                        "ran at full speed"
                    )
        if self.memory_mb:
            cg = CGROUP_V1 / "memory" / name
            try:
                cg.mkdir()
                try:
                    (cg / "memory.limit_in_bytes").write_text(str(self.memory_mb * 2**20))
                except OSError:
                    with contextlib.suppress(OSError):  # made here: not left behind
                        cg.rmdir()
                    raise
                self.cgroups.append(cg)
            except OSError:
                self.notes.append("memory cap by RLIMIT_AS (address space), no memory cgroup here")

    def vm_status(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak) of the running process, in MiB; empty when it is gone."""
        out: dict[str, float] = {}
        if self.proc is None or self.proc.poll() is not None:
            return out
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(rest.split()[0]) / 1024
        except (OSError, ValueError, IndexError):
            return {}
        return out

    def peak_rss_mb(self) -> float | None:
        return self.vm_status().get("VmHWM")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code; killed (-9) only past ``timeout``. A clean stop takes
        well under a second, at most about 12 s by design (3 s of draining, the last
        checkpoint, 2 s of Home Assistant sensor removals, 2 s for the offline status, 5 s for
        the network); the rest is room for a loaded machine, so that only a hang is reported
        as one."""
        rc = 0
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    rc = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    rc = self.proc.wait()
            else:
                rc = self.proc.returncode
        if getattr(self, "_log", None) is not None:  # also when it failed to start
            self._log.close()
        for cg in self.cgroups:
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        self.cgroups = []
        return rc

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def why_ended(self) -> str:
        """The last line the runtime wrote (its one-line error), else how its process ended."""
        lines = [line.strip() for line in self.output().splitlines() if line.strip()]
        if lines:
            return lines[-1][-300:]
        rc = None if self.proc is None else self.proc.poll()
        if rc is not None and rc < 0:
            return f"killed by signal {-rc} without a word (-9: a memory cap, say)"
        return f"exit code {rc} without a word"

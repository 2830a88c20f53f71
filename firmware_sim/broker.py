"""A broker for the demo and the tests: Mosquitto when its binary exists, else an embedded
pure-Python broker (amqtt, MQTT 3.1.1 only; fine for a demo, not for speed or reliability).

    python -m firmware_sim.broker --port 1883     # the embedded broker on its own
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from edge.children import ending_with_us

from .errors import SimError

INSTALL_HINT = "install Mosquitto (sudo apt-get install mosquitto) or pip install 'edge-lstm[sim]'"


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_line(log: Path) -> str:
    """A child's log's last line (a traceback's last is its error), for a one-line error: the
    log itself is in a working directory removed as the command ends."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError as exc:
        return f"its log is unreadable: {exc.strerror}"
    return lines[-1].strip()[:300] if lines else "it wrote nothing"


def listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the socket listening on loopback ``port``; None where
    /proc cannot tell."""
    try:
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError):  # no IPv6 here
                for line in Path(table).read_text().splitlines()[1:]:
                    f = line.split()
                    if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                        inodes.add(f"socket:[{f[9]}]")
        if not inodes:
            return None
        fds = Path(f"/proc/{pid}/fd")
        return any(os.readlink(fd) in inodes for fd in fds.iterdir())
    except (OSError, ValueError, IndexError):
        return None


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimError(
                f"the broker exited at start (exit code {proc.returncode}): {last_line(log)}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            time.sleep(0.05)
            continue
        if listens(proc.pid, port) is not False:
            return
        # Another process took the port between free_port and the broker's start: that
        # listener is not our broker (ours is about to exit, "Address already in use").
        time.sleep(0.05)
    raise SimError(f"the broker did not listen on 127.0.0.1:{port} within {timeout} s")


class Broker:
    """A broker process on a free loopback port; ``protocol`` says what it speaks."""

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = False,
        extra: str = "",
        embedded: bool | None = None,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistence = persistence
        self.extra = extra
        self.binary = None if embedded else find_mosquitto()
        if self.binary is None and embedded is False:
            raise SimError(f"no mosquitto binary: {INSTALL_HINT}")
        self.protocol = "5" if self.binary else "3.1.1"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def kind(self) -> str:
        return "mosquitto" if self.binary else "embedded amqtt (MQTT 3.1.1)"

    def config(self) -> str:
        return (
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    # started as root, mosquitto would switch to user 'mosquitto', which cannot write
                    # a persistence file into our directory: stay who we are
                    f"user {getpass.getuser()}",
                    "allow_anonymous true",
                    "set_tcp_nodelay true",  # else Nagle + delayed ACKs add up to ~40 ms per hop
                    "max_queued_messages 0",
                    "max_inflight_messages 0",
                    f"persistence {'true' if self.persistence else 'false'}",
                    f"persistence_location {self.dir}/",
                    "autosave_interval 1",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                ]
            )
            + "\n"
            + self.extra
        )

    def start(self) -> Broker:
        log = self.dir / "broker.log"
        if self.binary:
            conf = self.dir / "mosquitto.conf"
            conf.write_text(self.config())
            cmd = [self.binary, "-c", str(conf)]
        else:
            try:
                import amqtt  # noqa: F401
            except ImportError as exc:
                raise SimError(f"no broker available: {INSTALL_HINT}") from exc
            cmd = [sys.executable, "-m", "firmware_sim.broker", "--port", str(self.port)]
        self._log = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=ending_with_us()
        )
        try:
            wait_listening(self.port, self.proc, log)
        except BaseException:  # not listening, or Ctrl-C: nothing left running, nor open
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # mosquitto saves its persistence file on SIGTERM
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()


def run_embedded(port: int) -> None:
    import asyncio
    import logging

    from amqtt.broker import Broker as AmqttBroker

    logging.basicConfig(level=logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = AmqttBroker(config)
        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="embedded MQTT 3.1.1 broker (amqtt) on loopback")
    ap.add_argument("--port", type=int, default=1883)
    run_embedded(ap.parse_args().port)

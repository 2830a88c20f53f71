"""``edge-lstm deploy-kit DIR``: the files a device installation needs, from the package.

They ship inside the wheel (``edge/deploy/``), so a device installed from a wheel or a git URL
has them without a checkout. Nothing is overwritten unless asked, and the kit is written whole
or not at all: every target is checked before anything is written, the files are renamed
into place only once all of them are written (and synced), and the renames are done all or
none: a rename that fails puts back the files replaced before it, and Ctrl-C or SIGTERM waits
until the last rename is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError, shown
from .outfile import regular_target

NEXT_STEPS = """\
next steps (as root), see README "Installing on a device":
  useradd --system --no-create-home --shell /usr/sbin/nologin edge-lstm   # the unit's User=
  cp -r BUNDLE /opt/edge-lstm/bundle                  # the bundle made by lstm-convert
  # the broker's TLS files: /etc/mosquitto/certs/ca.crt, server.crt, server.key
  mosquitto_passwd -c /etc/mosquitto/edge-lstm.passwd edge-runtime   # asks for PASSWORD
  mosquitto_passwd /etc/mosquitto/edge-lstm.passwd dev-1             # one user per device
  install -m 644 {d}/mosquitto.conf /etc/mosquitto/conf.d/edge-lstm.conf
  install -m 644 {d}/edge-lstm.acl /etc/mosquitto/edge-lstm.acl
  systemctl restart mosquitto
  install -D -m 644 {d}/edge-lstm.toml /etc/edge-lstm/edge-lstm.toml
  (umask 027; echo 'PASSWORD' > /etc/edge-lstm/broker.password)
  chgrp edge-lstm /etc/edge-lstm/broker.password
  install -m 644 {d}/edge-lstm.service /etc/systemd/system/edge-lstm.service
  systemctl daemon-reload && systemctl enable --now edge-lstm
  # Grafana: Dashboards -> Import {d}/grafana-dashboard.json, with your Prometheus data source
  # workers on NATS JetStream instead of serve (docs/cluster.md); on each NATS node:
  #   install -D -m 644 {d}/nats-server.conf /etc/nats/nats-server.conf
  # on each worker host, with the bundle as model in /etc/edge-lstm/worker.toml:
  #   install -m 644 {d}/edge-lstm-worker.service /etc/systemd/system/edge-lstm-worker.service
  #   systemctl daemon-reload && systemctl enable --now edge-lstm-worker"""


def kit_files() -> dict[str, bytes]:
    """Name -> content of every file of the kit, as installed with the package."""
    root = resources.files("edge") / "deploy"
    return {
        entry.name: entry.read_bytes()
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.is_file() and not entry.name.startswith((".", "_"))
    }


def write_kit(directory: str | Path, *, force: bool = False) -> list[Path]:
    """Write the kit into ``directory`` (created if needed), whole or not at all: every target
    is checked first (an existing one must be a regular file, and is replaced only with
    ``force``; a link is followed and kept), every file is then written to a temporary name
    beside its target, and only when all are written are they renamed into place."""
    target = Path(directory)
    files = kit_files()
    if not files:
        raise ConfigError("the deploy kit is missing from this installation of edge-lstm")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{shown(str(target))} exists and is not a directory")
    try:
        real = {name: regular_target(target / name, ConfigError) for name in files}
    except ConfigError as exc:
        raise ConfigError(f"{exc}; nothing written") from None
    clash = [name for name in files if os.path.lexists(target / name)]
    if clash and not force:
        raise ConfigError(f"{target}: {', '.join(clash)} already there; pass --force to overwrite")
    # Made here (the kit's directory and any parent missing), deepest first: taken away again
    # when the kit is not written, as a full disk leaves it, not left behind empty.
    created: list[Path] = []
    folder = target
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    staged: dict[str, str] = {}
    done = False
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            staged[name] = _stage(real[name], content)
        with _signals_held():  # an interrupt lands before the first rename or after the last
            _replace_all(staged, real)
        done = True
    except OSError as exc:
        raise ConfigError(f"cannot write the deploy kit into {shown(str(target))}: {exc}") from exc
    finally:
        for tmp in staged.values():
            Path(tmp).unlink(missing_ok=True)
        if not done:
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return [target / name for name in files]


def _stage(target: Path, content: bytes) -> str:
    """``content`` in a temporary file beside ``target``, on disk (a power loss after the
    rename finds the new file whole, not an empty one where the old was)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:  # a full disk, Ctrl-C, SIGTERM: no hidden half-written file left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _replace_all(staged: dict[str, str], real: dict[str, Path]) -> None:
    """Rename every staged file over its target, or none: a rename that fails puts the files
    replaced before it back (the old contents are read first; kit files are small)."""
    old = {name: _read(real[name]) for name in staged}
    replaced: list[str] = []
    try:
        for name in list(staged):
            os.replace(staged[name], real[name])
            del staged[name]
            replaced.append(name)
    except OSError:
        for name in replaced:
            with contextlib.suppress(OSError):  # the first error is the one reported
                was = old[name]
                if was is None:
                    real[name].unlink()
                else:
                    os.replace(_stage(real[name], was), real[name])
        raise
    for folder in {real[name].parent for name in replaced}:
        _sync_dir(folder)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _sync_dir(folder: Path) -> None:
    """The renames in ``folder`` on disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened for reading: the renames stand anyway
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory: nothing more can be done
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are acted on (as their handlers then say)
    once it is done. Handlers, not a signal mask: a signal sent to the process is taken by
    any of its threads that does not block it, and its Python handler runs in this one."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: set outside Python, cannot be set back
            previous[sig] = signal.signal(sig, lambda n, _f: caught.append(n))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(caught):
            handler = previous[number]
            if callable(handler):
                handler(number, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)

"""``edge-lstm deploy-kit DIR``: the files a device installation needs, from the package.

They ship inside the wheel (``edge/deploy/``), so a device installed from a wheel or a git URL
has them without a checkout. Nothing is overwritten unless asked, and the kit is written whole
or not at all: every target is checked before anything is written, and the files are renamed
into place only once all of them are written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from importlib import resources
from pathlib import Path

from .errors import ConfigError
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
  systemctl daemon-reload && systemctl enable --now edge-lstm"""


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
        raise ConfigError(f"{str(target)!r} exists and is not a directory")
    try:
        real = {name: regular_target(target / name, ConfigError) for name in files}
    except ConfigError as exc:
        raise ConfigError(f"{exc}; nothing written") from None
    clash = [name for name in files if os.path.lexists(target / name)]
    if clash and not force:
        raise ConfigError(f"{target}: {', '.join(clash)} already there; pass --force to overwrite")
    created = not target.exists()
    staged: dict[str, str] = {}
    done = False
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            fd, staged[name] = tempfile.mkstemp(prefix=f".{name}.", dir=real[name].parent)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.chmod(staged[name], 0o644)
        for name in files:  # the kit is complete on disk: only renames from here on
            os.replace(staged.pop(name), real[name])
        done = True
    except OSError as exc:
        raise ConfigError(f"cannot write the deploy kit into {str(target)!r}: {exc}") from exc
    finally:
        for tmp in staged.values():
            Path(tmp).unlink(missing_ok=True)
        if created and not done:
            with contextlib.suppress(OSError):
                target.rmdir()
    return [target / name for name in files]

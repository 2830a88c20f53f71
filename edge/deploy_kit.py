"""``edge-lstm deploy-kit DIR``: the files a device installation needs, from the package.

They ship inside the wheel (``edge/deploy/``), so a device installed from a wheel or a git URL
has them without a checkout. Nothing is overwritten unless asked, and each file is written to
a temporary name and renamed into place, so none is ever half-written.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path

from .errors import ConfigError

NEXT_STEPS = """\
next steps (as root), see README "Installing on a device":
  install -m 644 {d}/mosquitto.conf /etc/mosquitto/conf.d/edge-lstm.conf
  install -m 644 {d}/edge-lstm.acl /etc/mosquitto/edge-lstm.acl
  install -D -m 644 {d}/edge-lstm.toml /etc/edge-lstm/edge-lstm.toml
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
    """Write the kit into ``directory`` (created if needed); refuses to replace existing files
    unless ``force``, before writing anything."""
    target = Path(directory)
    files = kit_files()
    if not files:
        raise ConfigError("the deploy kit is missing from this installation of edge-lstm")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{str(target)!r} exists and is not a directory")
    clash = [name for name in files if (target / name).exists()]
    if clash and not force:
        raise ConfigError(f"{target}: {', '.join(clash)} already there; pass --force to overwrite")
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for name, content in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            written.append(target / name)
    except OSError as exc:
        raise ConfigError(f"cannot write the deploy kit into {str(target)!r}: {exc}") from exc
    return written

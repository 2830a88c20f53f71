"""The ``--out`` directory of ``run``, ``demo`` and ``host``: checked before anything starts
(a run's results would otherwise be lost at its end), and every file in it replaced whole or
not at all."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edge.errors import shown
from edge.outfile import regular_target, replace_whole

from .errors import SimError


def results_dir(text: str, *names: str) -> Path:
    """``--out``: a directory, or one that can be made (it is made when the results are
    written), where each of ``names`` is a new or a regular file."""
    out = Path(text)
    if not text.strip():
        raise SimError("--out is empty: name a directory for the results")
    if out.exists() and not out.is_dir():
        raise SimError(f"--out {shown(text)} is not a directory: name a directory for the results")
    there = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not there.is_dir():
        raise SimError(
            f"--out {shown(text)}: cannot make the directory: {there} is not a directory"
        )
    if not os.access(there, os.W_OK | os.X_OK):
        raise SimError(f"--out {shown(text)}: {there} is not writable")
    for name in names:
        regular_target(out / name, SimError, "--out ")
    return out


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` ``path`` whole or not at all (``edge.outfile.replace_whole``)."""
    replace_whole(path, write, SimError, "--out ")

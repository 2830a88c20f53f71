"""Loader for the UEA/UCR ``.ts`` format and the shipped BasicMotions IMU recordings.

Pure NumPy (no TensorFlow) so that ``firmware_sim`` can replay the recordings too.
Data: the UEA multivariate time-series classification archive, "BasicMotions".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHANNELS = ("acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z")
UNITS = ("raw", "raw", "raw", "raw", "raw", "raw")
SAMPLE_RATE_HZ = 10.0
DATA_DIR = Path(__file__).parent / "data"  # package data, installed with the project


@dataclass(frozen=True)
class Recordings:
    x: np.ndarray  # [N, T, F] float32
    labels: np.ndarray  # [N] int index into classes
    classes: tuple[str, ...]


def parse_ts(text: str, where: str = "<ts>") -> tuple[np.ndarray, list[str]]:
    """Parse equal-length ``.ts`` data: one case a line, channels split by ':', label last."""
    rows, labels, in_data = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            in_data = in_data or line.lower().startswith("@data")
            continue
        if not in_data:
            raise ValueError(f"{where}:{n}: data line before @data")
        *channels, label = line.split(":")
        try:
            rows.append([[float(v) for v in ch.split(",")] for ch in channels])
        except ValueError as exc:
            raise ValueError(f"{where}:{n}: {exc}") from exc
        labels.append(label.strip())
    if not rows:
        raise ValueError(f"{where}: no data lines")
    lengths = {len(ch) for r in rows for ch in r}
    if len(lengths) != 1 or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{where}: recordings of unequal length or channel count")
    return np.asarray(rows, np.float32).transpose(0, 2, 1), labels  # [N, T, F]


def basicmotions(split: str) -> Recordings:
    """``split`` is "train" or "test"; classes sorted by name for a stable label order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    name = f"BasicMotions_{split.upper()}.ts"
    text = (DATA_DIR / name).read_text(encoding="utf-8")
    x, names = parse_ts(text, name)
    classes = tuple(sorted(set(names)))
    return Recordings(x, np.asarray([classes.index(c) for c in names]), classes)


def input_file(path: str | Path, label: str = "", missing: str = "file not found") -> Path:
    """``path`` if it is a regular file (a link to one included); else one line: ``missing``
    when nothing is there, or what is there instead (a directory; a FIFO would block the read)."""
    import stat

    from edge.outfile import KINDS

    from .errors import ConvertError

    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ConvertError(f"{label}{p}: {missing}") from None
    except OSError as exc:
        raise ConvertError(f"{label}{p}: cannot look at it: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ConvertError(f"{label}{p} is {kind}, not a file to read")
    return p


def load_array(path: str | Path, key: str = "x") -> np.ndarray:
    """A float array from .npy, or .npz with ``key``; errors name the file."""
    from edge.replay import NOT_NPZ, NUMPY_MAGIC

    p = Path(path)
    try:
        # opened here, not by np.load: it leaves its own file open when the zip is unreadable
        with p.open("rb") as f:
            head = f.read(6)
            f.seek(0)
            if p.suffix == ".npz":
                if not head.startswith(NUMPY_MAGIC):
                    raise ValueError(NOT_NPZ)
                z = np.load(f, allow_pickle=False)
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("one array (.npy), not an .npz archive of named arrays")
                with z:
                    files = z.files
                    if key in files:
                        try:
                            return np.asarray(z[key])
                        except ValueError as exc:  # an object array: which one, said
                            raise ValueError(f"array {key!r}: {exc}") from exc
            else:
                if head != b"\x93NUMPY" and not head.startswith(b"PK\x03\x04"):
                    # NumPy's words for it: "pickled (object) data", of a CSV file too
                    raise ValueError(
                        "not a NumPy array file (.npy, as numpy.save writes it): text, CSV or "
                        "a pickle is not read"
                    )
                loaded = np.load(f, allow_pickle=False)
                if isinstance(loaded, np.lib.npyio.NpzFile):  # an .npz named otherwise
                    with loaded:
                        raise ValueError(
                            f"an .npz archive of named arrays ({sorted(loaded.files)}), not one "
                            "array (.npy): name it .npz"
                        )
                return np.asarray(loaded)
    except Exception as exc:  # a damaged file raises what the part that trips on it raises:
        # ValueError (object arrays), OSError, EOFError, zipfile.BadZipFile, zlib.error,
        # tokenize.TokenError (a garbled header), ...
        raise ValueError(f"{p}: cannot read: {exc}") from exc
    raise ValueError(f"{p}: no array named {key!r} (has {sorted(files)})")

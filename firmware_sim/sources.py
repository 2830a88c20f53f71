"""Where simulated samples come from: real recordings, synthetic signals, user files.

Every source is seeded per device, so a run is reproducible.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convert.datasets import basicmotions  # pure NumPy, no TensorFlow
from edge.errors import shown

from .errors import SimError

SYNTHETIC = ("sine", "walk", "noise", "steps")
SYNTHETIC_LENGTH = 20_000  # samples of a synthetic signal before it loops


@dataclass
class Source:
    """An endless sample stream: ``data`` [N, F] played from ``start`` and looped."""

    data: np.ndarray
    labels: np.ndarray | None  # [N] label index per sample, or None
    classes: tuple[str, ...]
    start: int = 0
    rows: np.ndarray | None = None  # the rows of ``data`` in this device's order (shared data)
    # A signal computed from the sample's index instead of read from ``data`` (which then
    # only has its width): ``length`` samples, looped
    wave: Callable[[np.ndarray], np.ndarray] | None = None
    length: int = 0

    @property
    def features(self) -> int:
        return int(self.data.shape[1])

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.wave is not None:
            n = self.length
        else:
            n = len(self.data) if self.rows is None else len(self.rows)
        idx = (self.start + np.arange(k)) % n
        self.start = int((self.start + k) % n)
        if self.wave is not None:
            return self.wave(idx), None
        if self.rows is not None:
            idx = self.rows[idx]
        return self.data[idx], None if self.labels is None else self.labels[idx]


def make(spec: str, device: int, seed: int, features: int = 6) -> Source:
    """``basicmotions`` (test split), ``basicmotions:train``, a synthetic kind, or a file."""
    return maker(spec, seed, features)(device)


def maker(spec: str, seed: int, features: int = 6) -> Callable[[int], Source]:
    """``make`` for many devices: a recording set or a file is read (and checked) once, and
    its samples are shared by every device's source, each in its own order or from its own
    start (read again for every device, a fleet of thousands took minutes and gigabytes)."""
    name, _, arg = spec.partition(":")
    if name == "basicmotions":
        if arg not in ("", "test", "train"):
            raise SimError(
                f"--source {shown(spec)}: the split is 'test' or 'train', not {shown(arg)}"
            )
        rec = basicmotions(arg or "test")
        count, length = rec.x.shape[:2]
        data = rec.x.reshape(-1, rec.x.shape[-1]).astype(np.float64)
        labels = np.repeat(rec.labels, length)
        data.flags.writeable = labels.flags.writeable = False
        steps = np.arange(length, dtype=np.int32)

        def recordings(device: int) -> Source:
            rng = np.random.default_rng([seed, device])
            order = rng.permutation(count)  # each device plays the recordings in its own order
            rows = (order[:, None] * length + steps).reshape(-1).astype(np.int32)
            return Source(data, labels, rec.classes, rows=rows)

        return recordings
    if name in ("sine", "steps"):  # computed as taken: a fleet holds no table per device
        return lambda device: waves(name, features, np.random.default_rng([seed, device]))
    if name in ("noise", "walk"):  # drawn as taken, from a generator rewound at each loop
        return lambda device: drawn(name, features, seed, device)
    path = Path(spec)
    if not path.is_file():
        raise SimError(
            f"--source {shown(spec)}: not a file, and not one of basicmotions[:train|test], "
            f"{', '.join(SYNTHETIC)}"
        )
    data = load_file(path)
    data.flags.writeable = False

    def from_file(device: int) -> Source:
        rng = np.random.default_rng([seed, device])
        return Source(data, None, (), start=int(rng.integers(len(data))))

    return from_file


def waves(kind: str, features: int, rng: np.random.Generator) -> Source:
    """``synthetic``'s sine or steps (the same draws, the same samples), each sample computed
    from its index when taken: a table of 20,000 samples per device was most of a large
    fleet's memory (a gigabyte per thousand devices)."""
    n = SYNTHETIC_LENGTH
    if kind == "sine":
        freq = rng.uniform(0.05, 2.0, (3, features))
        phase = rng.uniform(0, 2 * np.pi, (3, features))
        amp = rng.uniform(0.2, 2.0, (3, features))

        def sine(idx: np.ndarray) -> np.ndarray:
            t = idx[:, None] / 10.0
            return sum(amp[i] * np.sin(2 * np.pi * freq[i] * t + phase[i]) for i in range(3))  # type: ignore[return-value]

        wave = sine
    else:
        levels = rng.normal(0, 2, (n // 50 + 1, features))

        def wave(idx: np.ndarray) -> np.ndarray:
            return levels[idx // 50]

    return Source(np.empty((0, features)), None, (), wave=wave, length=n)


class _Drawn:
    """``synthetic``'s noise or walk drawn in order as the samples are taken (the same
    generator, the same draws, the same sums): per device a generator and the walk's last
    value, not a table of 20,000 samples (a gigabyte per thousand devices). At the end of
    the loop the generator is seeded again, so the signal loops as the table did."""

    def __init__(self, kind: str, features: int, seed: int, device: int) -> None:
        self.kind, self.features, self.seed, self.device = kind, features, seed, device
        self.rewind()

    def rewind(self) -> None:
        self.rng = np.random.default_rng([self.seed, self.device])
        self.last = np.zeros(self.features)
        self.at = 0

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.features))
        done = 0
        while done < len(idx):
            if int(idx[done]) != self.at:  # only ever taken in order, from 0
                raise AssertionError(f"sample {int(idx[done])} taken out of order at {self.at}")
            k = min(len(idx) - done, SYNTHETIC_LENGTH - self.at)
            if self.kind == "noise":
                out[done : done + k] = self.rng.normal(0, 1, (k, self.features))
            else:
                steps = self.rng.normal(0, 0.1, (k, self.features))
                steps[0] += self.last  # the table's running sum, added in the same order
                out[done : done + k] = np.cumsum(steps, axis=0)
                self.last = out[done + k - 1].copy()
            done += k
            self.at += k
            if self.at == SYNTHETIC_LENGTH:
                self.rewind()
        return out


def drawn(kind: str, features: int, seed: int, device: int) -> Source:
    return Source(
        np.empty((0, features)),
        None,
        (),
        wave=_Drawn(kind, features, seed, device),
        length=SYNTHETIC_LENGTH,
    )


def synthetic(kind: str, features: int, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n)[:, None] / 10.0
    if kind == "sine":
        freq = rng.uniform(0.05, 2.0, (3, features))
        phase = rng.uniform(0, 2 * np.pi, (3, features))
        amp = rng.uniform(0.2, 2.0, (3, features))
        return sum(amp[i] * np.sin(2 * np.pi * freq[i] * t + phase[i]) for i in range(3))  # type: ignore[no-any-return]
    if kind == "walk":
        return np.cumsum(rng.normal(0, 0.1, (n, features)), axis=0)
    if kind == "noise":
        return rng.normal(0, 1, (n, features))
    levels = rng.normal(0, 2, (n // 50 + 1, features))
    return np.repeat(levels, 50, axis=0)[:n]


def load_file(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            with path.open("rb") as f:
                head = f.read(6)
                if head != b"\x93NUMPY":  # NumPy's words for the rest, a CSV file too:
                    # "pickled (object) data", load it with allow_pickle (none should)
                    raise SimError(
                        f"--source {path}: not a NumPy array file (.npy, as numpy.save writes "
                        "it): an .npz, text or a pickle is not read"
                        if head
                        else f"--source {path}: cannot read: the file is empty"
                    )
                f.seek(0)
                data = np.load(f, allow_pickle=False)
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM is no value
                reader = csv.reader(f)
                lines = [(reader.line_num, r) for r in reader if r]
            rows = [r for _, r in lines]
            if rows and not _numeric(rows[0]):
                if len(rows) == 1:  # a header alone, or numbers not separated by commas
                    raise SimError(
                        f"--source {path}: no row of comma-separated numbers; its one line is "
                        f"{shown(','.join(rows[0]))}"
                    )
                lines, rows = lines[1:], rows[1:]  # header
            for line, row in lines:  # NumPy's words name no line ("inhomogeneous shape")
                if len(row) != len(rows[0]):
                    raise SimError(
                        f"--source {path}: line {line} has {len(row)} values, line "
                        f"{lines[0][0]} has {len(rows[0])}"
                    )
                if not _numeric(row):
                    raise SimError(
                        f"--source {path}: line {line} is not comma-separated numbers: "
                        f"{shown(','.join(row))}"
                    )
            data = np.asarray(rows, dtype=np.float64)
        else:
            raise SimError(f"--source {path}: expected a .npy or .csv file")
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty .npy
        raise SimError(f"--source {path}: cannot read: {exc or 'the file is empty'}") from exc
    except MemoryError as exc:  # the array its header says is larger than the memory left
        raise SimError(f"--source {path}: does not fit in the memory left: {exc}") from exc
    if data.dtype.kind not in "biuf":
        raise SimError(f"--source {path}: expected numbers, got an array of {data.dtype}")
    if data.ndim == 3:
        data = data.reshape(-1, data.shape[-1])
    if data.ndim != 2 or not len(data):
        raise SimError(
            f"--source {path}: expected finite numbers [N, F] or [N, T, F], got shape {list(data.shape)}"
        )
    data = data.astype(np.float64)
    if (bad := ~(np.abs(data) <= np.finfo(np.float32).max)).any():  # as the runtime refuses
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise SimError(
            f"--source {path}: sample {row}, feature {col} is {data[row, col]:g}: every value "
            "must be a finite number within float32's range"
        )
    return data


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
        return True
    except ValueError:
        return False

"""Fixtures: a real Mosquitto per test, and real bundles shared by the two environments.

The desktop environment (TensorFlow) trains and converts the test models once per session and
writes them to ``$EDGE_LSTM_TEST_BUNDLES``; the device-like environment (tflite-runtime, no
TensorFlow) runs the same ``edge`` tests against those files.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.broker import Broker as Mosquitto

HAS_TF = importlib.util.find_spec("tensorflow") is not None
ROOT = Path(__file__).resolve().parent.parent
BUNDLE_DIR = Path(os.environ.get("EDGE_LSTM_TEST_BUNDLES", ROOT / "build" / "test-bundles"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker", embedded=False)
    m.start()
    yield m
    m.stop()


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker", persistence=True, embedded=False)
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def bundles() -> Path:
    """Directory of test bundles: built here with TensorFlow, or read from a desktop run."""
    if HAS_TF:
        from tests.build_bundles import build_all

        build_all(BUNDLE_DIR)
    elif not (BUNDLE_DIR / "complete").exists():
        pytest.fail(
            f"no test bundles in {BUNDLE_DIR}: the device-like run uses the bundles the desktop "
            "run builds; run scripts/test (desktop suite first)"
        )
    return BUNDLE_DIR


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``mounts`` on every test that mounts a file system: the emulated Arm guest has no
    mount(8), and deselects them."""
    for item in items:
        if "small_disk" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.mounts)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs, mounted as root), to fill up or make read-only."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass  # full: that is what this helper is for


@pytest.fixture
def service(bundles: Path, broker: Mosquitto, tmp_path: Path) -> Iterator[Any]:
    """``start(*flags, url=None, state=None)`` runs ``edge-lstm serve`` on the int8 example
    bundle as a child process; every one started is stopped at the end."""
    from tests.mqtt_helpers import Serve

    started = []

    def start(*args: str, url: str | None = None, state: Path | None = None) -> Any:
        s = Serve(bundles / "clf-int8", url or broker.url, state or tmp_path / "state", *args)
        started.append(s.start())
        return s

    yield start
    for s in started:
        s.stop()

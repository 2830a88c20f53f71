"""Fixtures: a real Mosquitto per test, and real bundles shared by the two environments.

The desktop environment (TensorFlow) trains and converts the test models once per session and
writes them to ``$EDGE_LSTM_TEST_BUNDLES``; the device-like environment (tflite-runtime, no
TensorFlow) runs the same ``edge`` tests against those files.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

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

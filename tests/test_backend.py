import re
import subprocess
import sys

import pytest

from edge import backend
from edge.errors import BackendError


def test_explicit_unknown_backend_is_named():
    with pytest.raises(BackendError, match="'onnx'"):
        backend.select("onnx")


@pytest.mark.parametrize("choice", [5, ["litert"]], ids=str)
def test_a_backend_that_is_no_name_is_refused_naming_it(choice):
    """``edge.load(bundle, backend=5)`` raised AttributeError ('int' object has no 'strip')."""
    with pytest.raises(BackendError, match=rf"backend {re.escape(repr(choice))} is not a name"):
        backend.select(choice)


def test_env_var_overrides_auto():
    first = backend.available()[0]
    assert backend.select(None, env={backend.ENV_VAR: first}).name == first


def test_auto_prefers_the_light_interpreters():
    chosen = backend.select("auto", env={})
    assert chosen.name == next(b for b in ("litert", "tflite") if b in backend.available())


def test_missing_backend_error_names_the_install_commands():
    missing = next(b for b in ("litert", "tflite") if b not in backend.available())
    with pytest.raises(BackendError, match="pip install 'edge-lstm\\[litert\\]'"):
        backend.select(missing)
    # scripts/check-platforms: neither interpreter has wheels for 32-bit Arm (README's table)
    assert "32-bit" not in backend.INSTALL_HINT and "Python 3.10/3.11" in backend.INSTALL_HINT


def test_a_model_the_interpreter_cannot_open_is_one_line_naming_why():
    """TFLite says why on one line and then "Registration failed." on the next: the last line,
    all that one-line reports (``lstm-convert``'s device-like check) kept, named no op."""
    why = (
        "Didn't find op for builtin opcode 'LOG' version '2'. An older version of this builtin "
        "might be supported. Are you using an old TFLite binary with a newer model?\n"
        "Registration failed.\n"
    )

    def make_interpreter(**_kwargs):
        raise ValueError(why)

    b = backend.Backend("tflite", "2.14.0", make_interpreter)
    with pytest.raises(BackendError) as err:
        b.open(b"", "serving_default")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert "opcode 'LOG' version '2'" in message and message.endswith("Registration failed.")


def test_import_edge_never_imports_tensorflow(bundles):
    code = (
        "import sys, edge; e = edge.load(sys.argv[1]); e.step('s', [0.0] * 6); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bundles / "clf-int8")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_the_environment_runs_the_interpreter_it_is_meant_to():
    """scripts/test says which interpreter each environment must end up with."""
    import os

    import numpy as np

    expected = os.environ.get("EDGE_LSTM_EXPECT_BACKEND", backend.available()[0])
    assert backend.select().name == expected
    if expected == "tflite":  # the device-like environment: what a Pi installs
        assert "tensorflow" not in backend.available()
        assert np.__version__.startswith("1.")

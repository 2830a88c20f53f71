"""The numeric contract: a bundle runs only on a kernel set it was verified with.

Runs in both environments: the desktop one gets ai-edge-litert with XNNPACK, the device-like
one tflite-runtime 2.14 with its built-in kernels, and the converter verified both.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

import edge
from edge import backend, replay
from edge.errors import BundleError
from edge.kernels import KernelMismatchWarning, mismatch
from edge.manifest import parse, read_bundle

BUNDLE = "clf-int8"


def expected_kernels() -> str:
    """What this environment must get for an int8 bundle (scripts/test sets the backend)."""
    name = os.environ.get("EDGE_LSTM_EXPECT_BACKEND", backend.available()[0])
    if name == "litert":
        return "litert-xnnpack"
    chosen = backend.select(name)
    return backend.kernel_set_name(chosen.family, False, backend.machine())


def edited(src, dst, change):
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return dst


def test_names_say_interpreter_kernels_and_for_builtin_kernels_the_machine():
    assert backend.kernel_set_name("litert", True, "aarch64") == "litert-xnnpack"
    assert backend.kernel_set_name("tflite-2.14", False, "x86_64") == "tflite-2.14-builtin-x86_64"


def test_the_runtime_detects_its_kernel_set_and_it_is_a_verified_one(bundles):
    e = edge.load(bundles / BUNDLE)
    assert e.model.kernels == expected_kernels()
    assert e.model.kernels in e.manifest.verified_kernels
    assert e.manifest.kernels["reference"] == "litert-xnnpack"


def test_a_float_bundle_runs_the_kernel_set_each_interpreter_takes_by_default(bundles):
    """ai-edge-litert gives a float model to XNNPACK; tflite-runtime 2.14's signature runner
    never applies its default delegate, so the device keeps its built-in kernels. Loading must
    not change that (a whole-interpreter allocation would apply XNNPACK there: other bits than
    the ones the converter verified)."""
    chosen = backend.select(os.environ.get("EDGE_LSTM_EXPECT_BACKEND"))
    e = edge.load(bundles / "clf-float32")
    delegated = chosen.name != "tflite"
    assert e.model.kernels == backend.kernel_set_name(chosen.family, delegated, backend.machine())
    assert e.model.kernels in e.manifest.verified_kernels


def test_switching_the_delegates_off_is_seen_in_the_execution_plan(bundles):
    chosen = backend.select()
    e = edge.load(bundles / BUNDLE, builtin_kernels=True, kernel_mismatch="allow")
    name = backend.kernel_set_name(chosen.family, False, backend.machine())
    assert e.model.kernels == name
    # The converter verified the built-in kernels of every interpreter it reached, on its own
    # machine: elsewhere (the Arm check) they are another kernel set, and refused.
    if name in e.manifest.verified_kernels:
        edge.load(bundles / BUNDLE, builtin_kernels=True)
    else:
        with pytest.raises(BundleError, match=f"kernel set '{name}'"):
            edge.load(bundles / BUNDLE, builtin_kernels=True)


def test_a_bundle_verified_with_other_kernels_is_refused_naming_both(bundles, tmp_path):
    other = edited(
        bundles / BUNDLE, tmp_path / "b", lambda d: d["kernels"].update(verified=["xyz-kernels"])
    )
    got = expected_kernels()
    with pytest.raises(BundleError) as err:
        edge.load(other)
    msg = str(err.value)
    assert "\n" not in msg and repr(got) in msg and "'xyz-kernels'" in msg
    assert "kernel_mismatch" in msg


def test_warn_runs_the_bundle_and_says_so_loudly(bundles, tmp_path):
    other = edited(
        bundles / BUNDLE, tmp_path / "b", lambda d: d["kernels"].update(verified=["xyz-kernels"])
    )
    with pytest.warns(KernelMismatchWarning, match="xyz-kernels"):
        e = edge.load(other, kernel_mismatch="warn")
    assert e.step("s", [0.0] * 6).shape == (4,)
    with pytest.raises(BundleError, match="kernel_mismatch 'maybe'"):
        edge.load(other, kernel_mismatch="maybe")


def test_inspect_takes_the_kernel_mismatch_policy_from_the_environment_as_serve_does(
    bundles, tmp_path, monkeypatch, capsys
):
    from edge.cli import main

    other = edited(
        bundles / BUNDLE, tmp_path / "b", lambda d: d["kernels"].update(verified=["xyz-kernels"])
    )
    assert main(["inspect", str(other)]) == 2
    assert "xyz-kernels" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_LSTM_KERNEL_MISMATCH", "warn")
    with pytest.warns(KernelMismatchWarning, match="xyz-kernels"):
        assert main(["inspect", str(other)]) == 0
    assert main(["inspect", str(other), "--kernel-mismatch", "refuse"]) == 2  # the flag wins


def test_an_old_manifest_without_kernel_sets_is_refused_unless_accepted(bundles, tmp_path):
    old = edited(bundles / BUNDLE, tmp_path / "old", lambda d: d.pop("kernels"))
    with pytest.raises(BundleError, match="records no verified kernel set"):
        edge.load(old)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        edge.load(old, kernel_mismatch="warn")
    assert any(issubclass(w.category, KernelMismatchWarning) for w in seen)


def test_mismatch_is_pure_logic(bundles):
    m = edge.load(bundles / BUNDLE).manifest
    assert mismatch(m, m.kernels["reference"]) is None
    assert "'nope'" in str(mismatch(m, "nope"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda k: k.update(verified="litert-xnnpack"), "field 'verified' has the wrong type"),
        (lambda k: k.update(verified=[""]), "kernels.verified must list"),
        (lambda k: k.update(reference="nope"), "kernels.reference 'nope'"),
        (lambda k: k.pop("reference"), "missing field 'reference'"),
    ],
)
def test_bad_kernel_records_are_named(bundles, edit, message):
    d = json.loads((bundles / BUNDLE / "manifest.json").read_text())
    edit(d["kernels"])
    with pytest.raises(BundleError, match=message):
        parse(d)


def test_inspect_and_serve_refuse_with_one_line(bundles, tmp_path):
    other = edited(
        bundles / BUNDLE, tmp_path / "b", lambda d: d["kernels"].update(verified=["xyz-kernels"])
    )
    for args in (
        ["inspect", str(other)],
        [
            "serve",
            "--model",
            str(other),
            "--broker",
            "mqtt://127.0.0.1:9",
            "--state-dir",
            str(tmp_path / "s"),
        ],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=120
        )
        # the interpreter's own INFO line about XNNPACK is not ours
        lines = [x for x in out.stderr.strip().splitlines() if not x.startswith("INFO: ")]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "'xyz-kernels'" in lines[0] and repr(expected_kernels()) in lines[0]
    out = subprocess.run(
        [sys.executable, "-m", "edge", "inspect", str(other), "--kernel-mismatch", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "KernelMismatchWarning" in out.stderr, out.stderr


def test_replay_gives_the_runtimes_bits(bundles, tmp_path):
    """edge-lstm replay computes exactly what the engine answers, and names the kernel set."""
    with np.load(bundles / BUNDLE / "expected.npz") as z:
        x = z["x"][:3, :40]
    e = edge.load(bundles / BUNDLE)
    y_raw, state = replay.run(e, x)
    assert state.shape == (3, 40, 32) and state.dtype == np.int8
    for i in range(3):
        np.testing.assert_array_equal(e.model.decode_y(y_raw[i]), e.step(f"s{i}", x[i]))
    np.savez(tmp_path / "in.npz", a=x)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge",
            "replay",
            str(bundles / BUNDLE),
            "--input",
            str(tmp_path / "in.npz"),
            "--out",
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kernels"] == expected_kernels()
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_array_equal(z["a/y"], y_raw)
        np.testing.assert_array_equal(z["a/state"], state)


@pytest.mark.desktop
def test_an_installed_converter_lends_the_device_python_no_site_packages(tmp_path, monkeypatch):
    """From a checkout the device Python runs the checkout's edge; from an installed wheel
    ROOT is site-packages, whose NumPy 2 would break tflite-runtime there (found by
    scripts/walkthrough: tflite-2.14 went unverified and serve refused the bundle)."""
    from convert import kernels, verify

    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert kernels.device_env()["PYTHONPATH"] == str(kernels.ROOT)
    monkeypatch.setattr(kernels, "ROOT", tmp_path)  # no pyproject.toml: an installed package
    assert "PYTHONPATH" not in kernels.device_env()
    assert verify.device_env is kernels.device_env


def test_int8_classifier_publishes_the_softmax_of_its_logits(bundles):
    """The graph ends at the logits (XNNPACK takes no int8 SOFTMAX and the built-in one rounds
    per machine); the published values are their softmax, to float32 resolution."""
    e = edge.load(bundles / BUNDLE)
    assert e.manifest.output_activation == "softmax"
    interp, _ = e.model.backend.open(read_bundle(bundles / BUNDLE)[1], "serving_default", 1)
    ops = {d["op_name"] for d in interp._get_ops_details()}
    assert "SOFTMAX" not in ops and "FULLY_CONNECTED" in ops
    with np.load(bundles / BUNDLE / "expected.npz") as z:
        x = z["x"][:3, :40]
    y_raw, _ = replay.run(e, x)
    spec = e.model.y_spec
    z = (y_raw.astype(np.float64) - spec.zero_point) * spec.scale
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    for i in range(3):
        got = e.step(f"p{i}", x[i])
        np.testing.assert_allclose(got, want[i], rtol=0, atol=1e-7)


@pytest.mark.desktop
def test_the_kernel_check_of_a_killed_converter_ends_with_it_and_its_directory_goes_next_time(
    tmp_path,
):
    """lstm-convert killed (kill -9) while the device Python replayed the kernel streams: the
    `edge-lstm replay` child ran on, and its /tmp/edge-lstm-kernels-* directory stayed for
    good. The child now ends with the converter, and the next check removes the directory."""
    import signal
    import time

    pid_file, tmp = tmp_path / "child.pid", tmp_path / "tmp"
    tmp.mkdir()
    fake = tmp_path / "device-python"  # a device Python that replays for ever
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 3600\n")
    fake.chmod(0o755)
    script = (
        "import sys\nfrom pathlib import Path\nimport numpy as np\n"
        "from convert.kernels import in_device_python\n"
        "in_device_python(Path('b'), {'a': np.zeros(3)}, sys.argv[1])\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(kernels_root())}
    conv = subprocess.Popen([sys.executable, "-c", script, str(fake)], env=env)
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None:
            assert time.monotonic() < deadline and conv.poll() is None
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            child = int(text) if text else None
            time.sleep(0.05)  # polling for the file, not synchronising on time
        conv.send_signal(signal.SIGKILL)
        conv.wait(60)
        deadline = time.monotonic() + 60
        while alive(child):
            assert time.monotonic() < deadline, "the device Python outlived the converter"
            time.sleep(0.05)
        child = None
        left = list(tmp.glob("edge-lstm-kernels-*"))
        assert len(left) == 1  # kill -9: nothing of the converter ran
        fake.write_text("#!/bin/sh\nexit 3\n")
        cmd = [sys.executable, "-c", script, str(fake)]
        again = subprocess.run(cmd, env=env, text=True, capture_output=True)
        assert "exit code 3" in again.stderr
        assert list(tmp.glob("edge-lstm-kernels-*")) == []
    finally:
        if conv.poll() is None:
            conv.kill()
            conv.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


def kernels_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def alive(pid):
    """Whether a process that is not our child still runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

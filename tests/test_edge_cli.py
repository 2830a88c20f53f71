"""``edge-lstm``: inspect, and the refusals of ``serve`` before it touches the network."""

import json
import subprocess
import sys

import pytest

from edge.cli import main


def test_inspect_human_and_json(bundles, capsys):
    assert main(["inspect", str(bundles / "clf-int8")]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "32 bytes per stream" in out and "self-test" in out
    assert main(["inspect", str(bundles / "clf-int8"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["probe_y"]) == 64 and info["manifest"]["quantization"] == "int8"


def test_inspect_of_a_missing_bundle_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a bundle directory" in err[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "model is required"),
        (["--model", "m", "--broker", "tcp://x"], "broker = 'tcp://x'"),
        (["--model", "m", "--max-batch", "0"], "max_batch = 0 must be > 0"),
        (["--model", "m", "--gap-policy", "maybe"], "invalid choice: 'maybe'"),
        (["--model", "m", "--config", "/nonexistent.toml"], "cannot read the configuration"),
    ],
)
def test_serve_refuses_bad_configuration(args, needle):
    out = subprocess.run(
        [sys.executable, "-m", "edge", "serve", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and needle in out.stderr, out.stderr


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "edge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout and "serve" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "edge", "serve", "--help"], capture_output=True, text=True
    )
    for key in ("--reorder-ms", "--durability", "--tls-ca", "EDGE_LSTM_MAX_BATCH", "--overload"):
        assert key in out.stdout

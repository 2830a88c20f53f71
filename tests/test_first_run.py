"""What a first run shows: serve against a broker that is not there, the score of a run on a
machine without matplotlib, the verdict line and the plot's grid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from firmware_sim.broker import free_port
from firmware_sim.devices import Sent
from firmware_sim.plots import MISSING, RIGHT, SKIPPED, UNLABELLED, WRONG, stream_grid
from firmware_sim.verdict import verdict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.broker
def test_serve_says_it_cannot_reach_the_broker_and_keeps_trying(bundles, tmp_path):
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--model", str(bundles / "clf-int8"),
         "--broker", url, "--state-dir", str(tmp_path / "state"), "--client-id", "unreach",
         "--reconnect-min", "0.05", "--reconnect-max", "0.1"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "attempt 3" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    tries = [ln for ln in lines if "cannot reach the broker" in ln]
    assert len(tries) == 3, text
    assert all(f"{url} (connection refused); retrying, attempt" in ln for ln in tries), text
    assert "interpreter " in text  # the start-up line names the interpreter it chose
    assert proc.returncode == 0 and "Traceback" not in text + rest


@pytest.mark.broker
@pytest.mark.parametrize("matplotlib", [pytest.param(True, marks=pytest.mark.desktop), False])
def test_a_run_keeps_its_score_without_matplotlib(service, broker, bundles, tmp_path, matplotlib):
    from tests.mqtt_helpers import Collector, wait_until

    service()
    col = Collector(broker.url)
    wait_until(col.online, 60, "runtime online")  # subscribed: no sample published into the void
    col.close()
    block = "" if matplotlib else "sys.modules['matplotlib'] = None\n"
    out_dir = tmp_path / "out"
    argv = ["run", "--broker", broker.url, "--devices", "2", "--duration", "2",
            "--bundle", str(bundles / "clf-int8"), "--out", str(out_dir)]  # fmt: skip
    code = f"import sys\n{block}from firmware_sim.cli import main\nsys.exit(main({argv!r}))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    score = json.loads((out_dir / "score.json").read_text())
    assert score["predictions_missing"] == 0 and score["predictions_received"] > 0
    assert out.stdout.strip().splitlines()[-1] == verdict(score)
    assert out.stdout.strip().splitlines()[-1].startswith("verdict: EXACT")
    if matplotlib:
        assert (out_dir / "score.png").stat().st_size > 10_000
    else:
        assert "plot:  skipped: matplotlib is not installed" in out.stdout
        assert "pip install 'edge-lstm[sim]'" in out.stdout
        assert not (out_dir / "score.png").exists()


def test_verdict_line():
    base = {"predictions_received": 1000, "predictions_missing": 0, "wrong_predictions": 0,
            "accuracy_runtime": 0.9312, "latency_p99_ms": 41.6}  # fmt: skip
    assert verdict(base) == (
        "verdict: EXACT: all 1,000 predictions equal the offline run; accuracy 93.1%, "
        "p99 latency 42 ms"
    )
    bad = {
        **base,
        "wrong_predictions": 3,
        "predictions_missing": 2,
        "late_beyond_reorder_window": 5,
    }
    assert verdict(bad).startswith(
        "verdict: NOT EXACT: 3 of 1,000 predictions differ from the offline run, "
        "2 expected predictions missing;"
    )
    assert "5 samples late" in verdict(bad)
    unref = {"predictions_received": 10, "predictions_missing": 0}
    assert verdict(unref) == "verdict: no offline reference (run with --bundle to judge exactness)"


def test_verdict_without_a_bundle_says_what_is_missing():
    """Without --bundle a run whose runtime answered nothing (none serving, another topic)
    exited 1 with the verdict 'no offline reference', as if all had gone well but exactness."""
    unanswered = {"predictions_received": 0, "predictions_missing": 20}
    assert verdict(unanswered) == (
        "verdict: NOT ALL ANSWERED: 20 expected predictions missing; no offline reference "
        "(run with --bundle to judge exactness)"
    )


def sent(stream, seq, labels, faults=(), delivered=True, epoch=0):
    lab = np.array(labels) if labels[0] is not None else None
    return Sent(
        stream, seq, np.zeros((len(labels), 2)), lab, list(faults),
        created=seq + 100 * epoch, published=1.0 if delivered else None, epoch=epoch,
    )  # fmt: skip


def test_stream_grid_shows_every_stream_and_fault():
    log = [
        sent("b", 1, [0, 1]),
        sent("b", 3, [1], faults=["reorder"]),
        sent("a", 1, [2], faults=["nan"]),  # invalid: nothing due
        sent("a", 2, [2], faults=["drop"], delivered=False),  # never delivered: nothing due
        sent("a", 3, [3]),  # due but not predicted
        sent("c", 1, [None]),  # no labels (a regressor's stream)
    ]
    predicted = {("b", 0, 1): 0, ("b", 0, 2): 0, ("b", 0, 3): 1, ("c", 0, 1): None}
    g = stream_grid(log, predicted)
    assert g.streams == ["a", "b", "c"]
    assert g.cells.tolist() == [
        [SKIPPED, SKIPPED, MISSING],
        [RIGHT, WRONG, RIGHT],
        [UNLABELLED, SKIPPED, SKIPPED],
    ]
    assert sorted(g.faults) == [(0, 0, "nan"), (0, 1, "drop"), (1, 2, "reorder")]


@pytest.mark.broker
def test_a_snapshot_command_is_answered_in_the_status(service, broker):
    from tests.mqtt_helpers import Collector, Publisher, wait_until

    service("--snapshot-interval", "3600")
    col = Collector(broker.url)
    wait_until(col.online, 60, "runtime online")
    pub = Publisher(broker.url)
    pub.raw("edge/control/edge-test", b'{"cmd": "snapshot"}')
    pub.flush()

    def answered() -> bool:
        return any(d.get("snapshot") == "done" for _, d in col.of("edge/status/edge-test"))

    wait_until(answered, 60, "the snapshot answer")
    last = [d for _, d in col.of("edge/status/edge-test") if d.get("snapshot")][-1]
    assert last["state"] == "online" and last["snapshot_ts"] > 0
    pub.close()
    col.close()


def _manifest_of(model: bytes, **fields) -> str:
    import hashlib

    return json.dumps({"source_sha256": hashlib.sha256(model).hexdigest(), **fields})


def test_the_demo_cache_is_current_only_with_a_stream_trained_model(tmp_path):
    from firmware_sim.demo import cached

    (tmp_path / "bundle-int8").mkdir()
    (tmp_path / "model.keras").write_bytes(b"PK")
    (tmp_path / "bundle-int8" / "manifest.json").write_text(_manifest_of(b"PK", kernels={}))
    assert not cached(tmp_path)  # no model.json
    (tmp_path / "model.json").write_text('{"test_accuracy_last_step": 1.0}')
    assert not cached(tmp_path)  # trained before train-example trained on streams
    (tmp_path / "model.json").write_text('{"test_accuracy_replay": 0.9}')
    assert not cached(tmp_path)  # trained on streams before the settle weights
    (tmp_path / "model.json").write_text(
        '{"test_accuracy_replay": 0.9, "training": {"settle": 25}}'
    )
    assert cached(tmp_path)
    (tmp_path / "bundle-int8" / "manifest.json").write_text(_manifest_of(b"PK"))
    assert not cached(tmp_path)  # converted before kernel sets were recorded


def test_the_demo_cache_is_not_current_when_its_bundle_was_converted_from_another_model(
    tmp_path,
):
    """A demo that trained the example again (an earlier recipe's cache) and was stopped
    while converting kept the earlier bundle beside the new model: the next demo took the
    two for one example, served the old bundle and judged it against the new float model."""
    from firmware_sim.demo import cached

    (tmp_path / "bundle-int8").mkdir()
    manifest = _manifest_of(b"PK an earlier model", kernels={})
    (tmp_path / "bundle-int8" / "manifest.json").write_text(manifest)
    (tmp_path / "model.keras").write_bytes(b"PK the model trained again")
    (tmp_path / "model.json").write_text(
        '{"test_accuracy_replay": 0.9, "training": {"settle": 25}}'
    )
    assert not cached(tmp_path)
    (tmp_path / "model.keras").write_bytes(b"PK an earlier model")
    assert cached(tmp_path)


@pytest.mark.broker
def test_the_walkthrough_shows_why_serve_did_not_connect(bundles, broker, tmp_path):
    """``scripts/walkthrough --bundle DIR`` with a bundle converted where tflite-runtime was
    not reachable (no EDGE_LSTM_DEVICE_PYTHON) waited a minute and ended with a bare "serve
    did not connect": the device install's serve had refused the bundle at once, in a line
    it did not show. Its wait for serve ends when serve exits and shows serve's own error;
    a serve that connects passes."""
    import shutil

    from firmware_sim.offline import device_python

    python = device_python() or sys.executable  # tflite-runtime 2.14, as the walkthrough's
    unverified = tmp_path / "unverified"
    shutil.copytree(bundles / "clf-int8", unverified)
    manifest = unverified / "manifest.json"
    doc = json.loads(manifest.read_text())
    kernels = doc["kernels"]
    kernels["verified"] = [k for k in kernels["verified"] if not k.startswith("tflite")]
    kernels["sets"] = {k: v for k, v in kernels["sets"].items() if not k.startswith("tflite")}
    manifest.write_text(json.dumps(doc))
    wait = (
        'source scripts/_serve.sh; "$1" -m edge serve --model "$2" --broker "$3" '
        '--state-dir "$4" >"$4.log" 2>&1 & pid=$!; trap "kill $pid 2>/dev/null; wait $pid" EXIT; '
        'await_serve "$4.log" $pid 600'
    )

    def walk(bundle: Path, state: Path) -> subprocess.CompletedProcess[str]:
        args = ["bash", "-c", wait, "-", python, str(bundle), broker.url, str(state)]
        return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)

    refused = walk(unverified, tmp_path / "refused")
    assert refused.returncode == 1, refused.stderr
    assert "serve exited before connecting" in refused.stderr, refused.stderr
    assert f"{unverified}: this runtime computes with kernel set 'tflite-2.14" in refused.stderr
    served = walk(bundles / "clf-int8", tmp_path / "served")
    assert served.returncode == 0, served.stderr

"""firmware_sim: sources and faults (pure), the fault-storm end-to-end run through a real
Mosquitto, the demo itself, and its refusals of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from firmware_sim.errors import SimError
from firmware_sim.faults import KINDS, FaultPlan
from firmware_sim.sources import make
from tests.mqtt_helpers import ROOT


def test_sources_are_seeded_and_labelled(tmp_path):
    a, b = make("basicmotions", 3, seed=1), make("basicmotions", 3, seed=1)
    np.testing.assert_array_equal(a.take(150)[0], b.take(150)[0])
    x, labels = make("basicmotions", 4, seed=1).take(100)
    assert x.shape == (100, 6) and labels is not None and len(set(labels.tolist())) == 1
    for kind in ("sine", "walk", "noise", "steps"):
        assert make(kind, 0, 0, features=3).take(5)[0].shape == (5, 3)
    np.save(tmp_path / "x.npy", np.ones((4, 10, 2)))
    assert make(str(tmp_path / "x.npy"), 0, 0).features == 2
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,4\n")
    assert make(str(tmp_path / "x.csv"), 0, 0).take(3)[0].shape == (3, 2)


@pytest.mark.parametrize(
    "spec, message", [("nope.npy", "not a file"), ("basicmotions:val", "split")]
)
def test_bad_sources(spec, message):
    with pytest.raises((SimError, ValueError), match=message):
        make(spec, 0, 0)


def test_fault_plan_parsing():
    assert FaultPlan.parse("all=0.1").rates == {k: 0.1 for k in KINDS}
    assert FaultPlan.parse("drop=0.5, nan=0").rates == {"drop": 0.5, "nan": 0.0}
    for bad in ("drop", "drop=2", "melt=0.1", "drop=x"):
        with pytest.raises(SimError):
            FaultPlan.parse(bad)


@pytest.mark.broker
def test_every_fault_at_once_loses_and_corrupts_nothing(bundles, broker, tmp_path):
    """Drop, duplicate, reorder, delay, disconnect, NaN, garbage, wrong count and skew, all
    enabled: every delivered sample answered, each exactly as the offline run of the bundle."""
    from firmware_sim.devices import Fleet
    from firmware_sim.runtime import Runtime
    from firmware_sim.scorer import Scorer, score

    bundle = bundles / "clf-int8"
    runtime = Runtime(bundle, broker.url, tmp_path / "state", client_id="rt").start()
    scorer = Scorer(broker.url)
    try:
        scorer.wait_online("rt", 30, runtime.alive)
        plan = FaultPlan.parse("all=0.03,reboot=0")
        fleet = Fleet(
            broker.url,
            8,
            20.0,
            faults=plan,
            seed=5,
            feature_names=["f0", "f1", "f2", "f3", "f4", "f5"],
        )
        log = fleet.run(6.0)
        scorer.wait(log, 20)
        fleet.close()
        r = score(scorer, log, 6.0, bundle, ["a", "b", "c", "d"])
    finally:
        scorer.close()
        assert runtime.stop() == 0, runtime.output()[-2000:]
    injected = r["faults_injected"]
    assert set(injected) >= set(KINDS) - {"skew", "reboot"}, injected
    assert r["predictions_missing"] == 0, r["missing_examples"]
    assert r["late_claims_unfounded"] == 0
    assert r["wrong_predictions"] == 0, r["wrong_examples"]
    assert r["unexpected_predictions"] == 0
    assert r["errors_received"] >= r["errors_expected_at_least"] > 0
    assert abs(r["accuracy_runtime"] - r["accuracy_offline"]) <= 0.01


@pytest.mark.desktop
@pytest.mark.broker
def test_demo_runs_and_scores(bundles, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_LSTM_CACHE": str(tmp_path / "cache")}
    cache = tmp_path / "cache" / "demo"
    cache.mkdir(parents=True)
    # the cached example stands in for the first-run training (tested elsewhere)
    import shutil

    shutil.copytree(bundles / "clf-int8", cache / "bundle-int8")
    shutil.copy(bundles / "src" / "clf" / "model.keras", cache / "model.keras")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "demo",
            "--duration",
            "4",
            "--devices",
            "10",
            "--out",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "predictions missing                0" in out.stdout
    r = json.loads((tmp_path / "res" / "score.json").read_text())
    assert r["predictions_received"] == r["samples_delivered_valid"] > 300
    assert r["wrong_predictions"] == 0 and r["kept_up_real_time"]
    assert (tmp_path / "res" / "score.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--broker", "mqtt://127.0.0.1:9", "--duration", "1"], "unreachable"),
        (["run", "--broker", "mqtt://127.0.0.1:9", "--source", "missing.csv"], "not a file"),
        (["run", "--broker", "mqtt://127.0.0.1:9", "--faults", "explode=1"], "explode"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "firmware_sim", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


@pytest.mark.broker
def test_bundle_and_source_feature_counts_must_agree(bundles, broker, capsys):
    from firmware_sim.cli import main

    code = main(
        ["run", "--broker", broker.url, "--bundle", str(bundles / "reg2-int8"), "--duration", "1"]
    )
    assert code == 2
    assert "--source gives 6 features, the model expects 3" in capsys.readouterr().err


@pytest.mark.broker
def test_pi_profile_trial_on_one_core(bundles):
    from firmware_sim.host import trial

    r = trial(bundles / "clf-int8", 5, 10.0, seconds=2.0, cores={0}, memory_mb=1024, slowdown=2.0)
    assert r["runtime_alive"] and r["kept_up_real_time"], r
    assert r["predictions_missing"] == 0 and r["runtime_peak_rss_mb"] > 10

"""firmware_sim: sources and faults (pure), the fault-storm end-to-end run through a real
Mosquitto, the demo itself, and its refusals of bad input."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from firmware_sim.errors import SimError
from firmware_sim.faults import KINDS, FaultPlan
from firmware_sim.sources import make
from tests.mqtt_helpers import ROOT, wait_until


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


@pytest.mark.parametrize("header", ["", "a,b\n"], ids=["no header", "header"])
def test_a_csv_source_saved_with_a_byte_order_mark_keeps_its_first_row(tmp_path, header):
    """A spreadsheet's 'CSV UTF-8' begins with a byte order mark: its first value read as
    '\ufeff1', no number, so a first row of numbers was taken for a header and dropped."""
    path = tmp_path / "x.csv"
    path.write_text(header + "1,2\n3,4\n", encoding="utf-8-sig")
    source = make(str(path), 0, 0)
    np.testing.assert_array_equal(source.data, [[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize(
    "spec, message", [("nope.npy", "not a file"), ("basicmotions:val", "split")]
)
def test_bad_sources(spec, message):
    with pytest.raises((SimError, ValueError), match=message):
        make(spec, 0, 0)


def test_source_files_that_hold_no_numbers_are_named(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    for name, message in (("empty.npy", "cannot read"), ("text.npy", "expected numbers")):
        with pytest.raises(SimError, match=f"--source {tmp_path / name}: .*{message}"):
            make(str(tmp_path / name), 0, 0)


@pytest.mark.parametrize(
    "text, why",
    [
        ("t,a,b\n0,1,2\n\n1,2\n", "line 4 has 2 values, line 2 has 3"),
        ("0,1,2\n1,,3\n", "line 2 is not comma-separated numbers: '1,,3'"),
    ],
    ids=["ragged", "empty cell"],
)
def test_a_csv_source_with_a_bad_row_names_its_line(tmp_path, text, why):
    """A row of another length was refused in NumPy's words ("setting an array element with
    a sequence. The requested array has an inhomogeneous shape ..."), an empty cell as
    "could not convert string to float: ''": neither said where in the file."""
    path = tmp_path / "x.csv"
    path.write_text(text)
    with pytest.raises(SimError) as err:
        make(str(path), 0, 0)
    assert str(err.value) == f"--source {path}: {why}"


@pytest.mark.parametrize("given", ["npz", "csv", "pickle", "huge"])
def test_a_npy_source_that_is_no_npy_or_too_large_is_one_line(tmp_path, given):
    """An .npz named .npy ended `firmware-sim run` with an AttributeError traceback ('NpzFile'
    object has no attribute 'dtype'), a header promising more than the memory left with a
    MemoryError traceback, and text or a pickle was said to hold "pickled (object) data",
    with NumPy's advice to load it with allow_pickle."""
    import io
    import pickle

    path = tmp_path / "x.npy"
    if given == "npz":
        with path.open("wb") as f:
            np.savez(f, x=np.zeros((10, 6)))
    elif given == "csv":
        path.write_text("0.1,0.2,0.3,0.4,0.5,0.6\n" * 10)
    elif given == "pickle":
        path.write_bytes(pickle.dumps(np.zeros((10, 6))))
    else:  # 4 TiB promised, 100 bytes there (as a cut-off or sparse file)
        head = io.BytesIO()
        shape = {"descr": "<f8", "fortran_order": False, "shape": (10**11, 6)}
        np.lib.format.write_array_header_1_0(head, shape)
        path.write_bytes(head.getvalue() + bytes(100))
    with pytest.raises(SimError) as err:
        make(str(path), 0, 0)
    if given == "huge":
        assert str(err.value).startswith(f"--source {path}: does not fit in the memory left: ")
    else:
        assert str(err.value) == (
            f"--source {path}: not a NumPy array file (.npy, as numpy.save writes it): an .npz, "
            "text or a pickle is not read"
        )


@pytest.mark.parametrize("text", ["1;2;3\n", "acc_x,acc_y\n"], ids=["semicolons", "header only"])
def test_a_csv_source_without_a_row_of_numbers_names_its_line(tmp_path, text):
    """Its one line was taken for a header, and the file was refused as 'got shape [0]'."""
    path = tmp_path / "x.csv"
    path.write_text(text)
    with pytest.raises(SimError) as err:
        make(str(path), 0, 0)
    line = repr(text.strip())
    assert str(err.value) == (
        f"--source {path}: no row of comma-separated numbers; its one line is {line}"
    )


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (-np.inf, "-inf"), (1e300, "1e+300")])
@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_a_source_value_the_runtime_would_refuse_is_named(tmp_path, value, shown, suffix):
    """It was refused by its shape ('got shape [4, 3]'), which was right; 1e300 was not
    refused, and every device sent samples the runtime answers not_finite."""
    data = np.zeros((4, 3))
    data[2, 1] = value
    path = tmp_path / f"x{suffix}"
    np.save(path, data) if suffix == ".npy" else np.savetxt(path, data, delimiter=",")
    with pytest.raises(SimError, match=f"sample 2, feature 1 is {re.escape(shown)}: every value"):
        make(str(path), 0, 0)


def test_fault_plan_parsing():
    assert FaultPlan.parse("all=0.1").rates == {k: 0.1 for k in KINDS}
    assert FaultPlan.parse("drop=0.5, nan=0").rates == {"drop": 0.5, "nan": 0.0}
    for bad in ("drop", "drop=2", "melt=0.1", "drop=x"):
        with pytest.raises(SimError):
            FaultPlan.parse(bad)
    assert FaultPlan.parse("all=0.1,drop=0.5").rates["drop"] == 0.5  # all, then one kind's own
    for twice in ("drop=0.5,duplicate=0.1,drop=0.1", "all=0.1,all=0.2"):
        with pytest.raises(SimError, match="is given twice"):  # the last one was kept
            FaultPlan.parse(twice)


@pytest.mark.broker
@pytest.mark.desktop
def test_a_device_install_runtime_scores_zero_wrong_in_its_own_kernel_set(
    bundles, broker, tmp_path
):
    """edge-lstm serve from the device-like install (tflite-runtime 2.14, built-in kernels),
    firmware-sim run from the desktop one (ai-edge-litert, XNNPACK): the scorer judges by an
    offline run in the runtime's kernel set, read from its status, and names it. Judged by
    this Python's XNNPACK instead, the same answers are wrong by the kernels' difference."""
    from edge.backend import machine
    from firmware_sim.offline import device_python
    from firmware_sim.runtime import Runtime
    from firmware_sim.scorer import Scorer

    python = device_python()
    assert python, "scripts/test creates .venv-device (or set EDGE_LSTM_DEVICE_PYTHON)"
    device_kernels = f"tflite-2.14-builtin-{machine()}"
    bundle = bundles / "clf-int8"
    runtime = Runtime(bundle, broker.url, tmp_path / "state", client_id="rt", python=python)
    runtime.start()
    try:
        waiter = Scorer(broker.url, client_id="waiter")
        try:
            waiter.wait_online("rt", 60, runtime.alive)  # firmware-sim reads it, retained
        finally:
            waiter.close()
        out = tmp_path / "score"
        args = ["run", "--broker", broker.url, "--devices", "6", "--rate", "20"]
        args += ["--duration", "8", "--bundle", str(bundle), "--out", str(out), "--seed", "3"]
        from firmware_sim.cli import main

        assert main(args) == 0
        r = json.loads((out / "score.json").read_text())
        assert r["predictions_missing"] == 0
        assert r["runtime_kernels"] == r["offline_kernels"] == device_kernels
        assert "offline_kernels_note" not in r
        assert r["wrong_predictions"] == 0 and r["max_abs_diff_vs_offline"] == 0.0
        # another seed: new boot ids, so the runtime takes the streams up afresh
        more = [*args[:-1], "4", "--kernels", "litert-xnnpack", "--out", str(tmp_path / "x")]
        assert main(more) == 0
        other = json.loads((tmp_path / "x" / "score.json").read_text())
        assert other["offline_kernels"] == "litert-xnnpack"
        assert other["wrong_predictions"] > 0, other
    finally:
        assert runtime.stop() == 0, runtime.output()[-2000:]


@pytest.mark.broker
def test_a_second_run_against_the_same_runtime_is_answered_not_refused_as_duplicates(
    bundles, broker, tmp_path
):
    """Each device's boot id came from --seed alone: a second run of the same command against
    a runtime that had served the first sent the first run's boot ids with seq from where that
    run began, and every sample was refused as a duplicate (scored as lost: NOT EXACT)."""
    from firmware_sim.cli import main
    from firmware_sim.runtime import Runtime
    from firmware_sim.scorer import Scorer

    bundle = bundles / "clf-int8"
    runtime = Runtime(bundle, broker.url, tmp_path / "state", client_id="rt").start()
    try:
        waiter = Scorer(broker.url, client_id="waiter")
        try:
            waiter.wait_online("rt", 60, runtime.alive)
        finally:
            waiter.close()
        args = ["run", "--broker", broker.url, "--devices", "2", "--rate", "10"]
        args += ["--duration", "2", "--bundle", str(bundle)]
        for run in ("first", "second"):
            assert main([*args, "--out", str(tmp_path / run)]) == 0, run
            r = json.loads((tmp_path / run / "score.json").read_text())
            assert r["predictions_missing"] == 0 and r["errors_by_code"] == {}, (run, r)
            assert r["wrong_predictions"] == 0 and r["predictions_received"] > 0, (run, r)
    finally:
        assert runtime.stop() == 0, runtime.output()[-2000:]


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
    from firmware_sim.verdict import passed, verdict

    assert passed(r), verdict(r)  # labels, model, gaps and restart flags too


@pytest.mark.desktop
@pytest.mark.broker
def test_demo_runs_and_scores(bundles, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_LSTM_CACHE": str(tmp_path / "cache")}
    cache = tmp_path / "cache" / "demo"
    cache.mkdir(parents=True)
    # the cached example stands in for the first-run training (tested elsewhere)
    import shutil

    shutil.copytree(bundles / "clf-int8", cache / "bundle-int8")
    for name in ("model.keras", "model.json"):  # model.json marks the example current
        shutil.copy(bundles / "src" / "clf" / name, cache / name)
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
    assert r["wrong_predictions"] == 0  # (keeping up in real time is the load's, not a test's)
    assert (tmp_path / "res" / "score.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--broker", "mqtt://127.0.0.1:9", "--duration", "1"], "unreachable"),
        (["run", "--broker", "mqtt://127.0.0.1:9", "--source", "missing.csv"], "not a file"),
        (["run", "--broker", "mqtt://127.0.0.1:9", "--faults", "explode=1"], "explode"),
        (
            ["run", "--broker", "mqtt://127.0.0.1:9", "--faults", "reboot=0.1", "--no-boot-ids"],
            "needs --restart-gap",
        ),
        (["run", "--broker", "mqtt://127.0.0.1:9", "--faults", "x" * 100_000], "(100002 chars)"),
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


@pytest.mark.parametrize("command", [["run", "--broker", "mqtt://127.0.0.1:9"], ["host"]])
def test_more_devices_than_the_limit_are_refused_naming_the_value(command):
    """A billion devices filled memory before any error."""
    out = subprocess.run(
        [sys.executable, "-m", "firmware_sim", *command, "--devices", "1000000000"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert out.returncode == 2
    assert "--devices: '1000000000': expected 1..10000" in out.stderr.splitlines()[-1]


KILLED_WITH_ITS_CHILDREN = """
import os, signal, sys
from pathlib import Path
from firmware_sim.broker import Broker
from firmware_sim.runtime import Runtime

work = Path(sys.argv[1])
broker = Broker(work / "broker", embedded=False).start()
runtime = Runtime(Path(sys.argv[2]), broker.url, work / "state", client_id="rt").start()
print(broker.proc.pid, runtime.proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _ended(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no one reaps (PID 1 of a container) has ended too


@pytest.mark.broker
def test_the_broker_and_runtime_a_killed_firmware_sim_started_end_with_it(bundles, tmp_path):
    """firmware-sim demo killed with -9 (an OOM kill, a closed terminal's SIGKILL) left the
    Mosquitto and the edge-lstm serve it had started running for good, one pair per kill."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [
        sys.executable,
        "-c",
        KILLED_WITH_ITS_CHILDREN,
        str(tmp_path),
        str(bundles / "clf-int8"),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    try:
        deadline = time.monotonic() + 60
        while not all(_ended(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_ended(pid) for pid in pids), pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.broker
def test_a_run_against_a_broker_on_a_unix_socket_is_scored(bundles, tmp_path):
    """`serve` takes `unix:///PATH`; `firmware-sim run --broker unix:///PATH` was refused
    (`expected mqtt://HOST:PORT`). Its devices and scorer reach the broker on the socket now,
    and every sample is answered."""
    import shutil
    import tempfile

    from firmware_sim.broker import Broker
    from firmware_sim.cli import main
    from firmware_sim.runtime import Runtime
    from firmware_sim.scorer import Scorer

    short = Path(tempfile.mkdtemp(prefix="mq-", dir="/tmp"))  # a socket path is <= 107 bytes
    sock = short / "mqtt.sock"
    broker = Broker(tmp_path / "ux", embedded=False, extra=f"listener 0 {sock}\n").start()
    url = f"unix://{sock}"
    bundle = bundles / "clf-int8"
    try:
        wait_until(sock.exists, 30, "the broker's socket")
        runtime = Runtime(bundle, url, tmp_path / "state", client_id="rt").start()
        try:
            waiter = Scorer(url, client_id="waiter")
            try:
                waiter.wait_online("rt", 60, runtime.alive)
            finally:
                waiter.close()
            args = ["run", "--broker", url, "--devices", "2", "--rate", "10", "--duration", "2"]
            assert main([*args, "--bundle", str(bundle), "--out", str(tmp_path / "o")]) == 0
            r = json.loads((tmp_path / "o" / "score.json").read_text())
            assert r["predictions_missing"] == 0 and r["errors_by_code"] == {}, r
            assert r["wrong_predictions"] == 0 and r["predictions_received"] > 0, r
        finally:
            assert runtime.stop() == 0, runtime.output()[-2000:]
    finally:
        broker.stop()
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.broker
def test_a_broker_that_refuses_the_connection_is_named_with_its_reason(tmp_path):
    """A broker that wants a user name (the deploy kit's) refused the scorer's connection, and
    firmware-sim said 'no answer to our subscription within 10 s'."""
    from firmware_sim.broker import Broker
    from firmware_sim.scorer import Scorer

    broker = Broker(tmp_path / "broker", embedded=False, extra="allow_anonymous false\n")
    broker.start()
    try:
        with pytest.raises(SimError) as err:
            Scorer(broker.url)
        assert str(err.value) == f"broker {broker.url} refused the connection: Not authorized"
    finally:
        broker.stop()


@pytest.mark.broker
def test_a_runtime_that_ends_before_it_is_online_says_why(broker, tmp_path):
    """The demo and host said 'did not come online within 30 s' of a runtime that had ended at
    once, with a one-line error of its own or killed by a memory cap."""
    from firmware_sim.runtime import Runtime
    from firmware_sim.scorer import Scorer

    runtime = Runtime(tmp_path / "no-bundle", broker.url, tmp_path / "state", client_id="rt")
    scorer = Scorer(broker.url)
    try:
        with pytest.raises(SimError) as err:
            scorer.wait_online("rt", 600, runtime.start().alive, runtime.why_ended)
        assert str(err.value).startswith("the runtime 'rt' ended before it came online: ")
        assert "no-bundle" in str(err.value) and "within" not in str(err.value)
    finally:
        runtime.stop()
        scorer.close()


@pytest.mark.broker
def test_run_shows_its_progress(broker, tmp_path, capsys):
    """run said nothing until its table, after --duration and the wait for the last answers
    (the demo showed a bar)."""
    from firmware_sim.cli import main

    args = ["run", "--broker", broker.url, "--devices", "2", "--duration", "2", "--source", "sine"]
    assert main([*args, "--out", str(tmp_path / "res")]) == 1  # nothing serves: none answered
    err = capsys.readouterr().err
    assert "streaming 2/2 s: sent " in err and ", predicted 0, errors 0" in err, err


@pytest.mark.broker
@pytest.mark.parametrize("how", [["--rate", "0.01"], ["--faults", "drop=1"]], ids=" ".join)
def test_a_run_that_delivered_no_sample_is_not_judged_exact(broker, tmp_path, capsys, how):
    """Nothing sent (a rate below one sample per --duration), or every message dropped: the
    verdict was 'EXACT: all 0 predictions equal the offline run', exit 0."""
    from firmware_sim.cli import main

    args = ["run", "--broker", broker.url, "--devices", "2", "--duration", "1"]
    assert main([*args, *how, "--source", "sine", "--out", str(tmp_path / "res")]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verdict: NOTHING JUDGED: no valid sample was delivered"), last


@pytest.mark.broker
def test_devices_that_cannot_keep_their_rate_stop_at_the_duration(broker):
    """The scheduler made every sample due before --duration, however long that took: at a
    rate it could not keep up with, the run went on long past --duration, and at a period
    below the clock's resolution (--rate 1e12) the next sample was due at the same instant
    for ever, and the run never ended."""
    import threading

    from firmware_sim.devices import Fleet

    fleet = Fleet(broker.url, 1, 1e12, source="sine")
    runner = threading.Thread(target=fleet.run, args=(0.5,), daemon=True)
    try:
        runner.start()
        runner.join(120)
        assert not runner.is_alive()
        assert fleet.log and all(m.created - fleet.log[0].created < 60 for m in fleet.log)
    finally:
        fleet.stop_event.set()
        runner.join(60)
        fleet.close()


@pytest.mark.broker
@pytest.mark.desktop  # the plot needs matplotlib (the sim extra)
def test_a_plot_that_cannot_be_written_leaves_no_earlier_plot_beside_the_new_score(
    broker, tmp_path, capsys, monkeypatch
):
    """score.json was written, then score.png failed (a full disk): the run ended on that error
    without its table or verdict, and the directory held the new score beside an earlier run's
    plot, read as this run's."""
    import errno

    from firmware_sim import plots
    from firmware_sim.cli import main

    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "plot_score", full)
    out = tmp_path / "res"
    out.mkdir()
    (out / "score.png").write_bytes(b"an earlier run's plot")
    (out / "score.json").write_text("{}")
    args = ["run", "--broker", broker.url, "--devices", "1", "--duration", "1", "--source", "sine"]
    assert main([*args, "--out", str(out)]) == 1  # nothing serves: nothing answered
    printed = capsys.readouterr().out
    assert "predictions missing" in printed and "\nverdict: " in printed, printed
    assert "plot:  not written: --out " in printed and "No space left on device" in printed
    assert sorted(p.name for p in out.iterdir()) == ["score.json"]
    assert json.loads((out / "score.json").read_text())["messages_created"] > 0


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

    r = trial(
        bundles / "clf-int8",
        5,
        10.0,
        seconds=2.0,
        cores={0},
        memory_mb=1024,
        slowdown=2.0,
        drain=120,
    )
    # Whether it kept up in real time depends on the machine's load: capacity is bench work.
    assert r["runtime_alive"] and "kept_up_real_time" in r, r
    assert r["predictions_missing"] == 0 and r["runtime_peak_rss_mb"] > 10


@pytest.mark.broker
def test_host_prints_a_table_as_run_does_and_json_on_request(bundles, tmp_path, capsys):
    """``host`` printed its summary as JSON where ``run`` prints a table: now a table, and the
    path of host.json; ``--json`` prints the JSON (host.json's figures, without the trials)."""
    import json

    from firmware_sim.cli import main

    common = ["host", "--bundle", str(bundles / "clf-int8"), "--devices", "2", "--seconds", "1"]
    assert main([*common, "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "t" / "host.json").read_text())
    lines = out.splitlines()
    assert f"  {'devices':34s} 2" in lines and f"  {'runtime alive':34s} True" in lines, out
    assert f"results: {tmp_path / 't' / 'host.json'}" in lines and saved["devices"] == 2
    assert not out.lstrip().startswith("{")
    assert main([*common, "--out", str(tmp_path / "j"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "j" / "host.json").read_text())
    assert summary == {k: v for k, v in saved.items() if k != "trials"} and summary["devices"] == 2


@pytest.mark.broker
def test_the_pi_profile_spreads_its_devices_over_processes(broker):
    """One interpreter cannot publish a few thousand messages a second and stay on time: the
    trial then measured its own lag as the runtime's. The devices are spread over processes,
    each its own streams, started together."""
    from firmware_sim.host import PER_PROCESS, run_fleet

    devices = 2 * PER_PROCESS // 10 + 4  # at 10 Hz: more than two processes' worth
    log, _ = run_fleet(broker.url, devices, 10.0, 1, [f"f{i}" for i in range(6)], 1.0)
    streams = {m.stream for m in log}
    assert len(streams) == devices
    assert {s.split("-")[0] for s in streams} == {"dev0", "dev1", "dev2"}
    assert all(m.delivered for m in log)
    assert [m.created for m in log] == sorted(m.created for m in log)


# -- reboots: scorer logic on synthetic ground truth (no broker) -------------------------------


class _Answers:
    """Stands in for a Scorer: what a runtime answered, with arrival times."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.predictions = []
        self.errors = []
        self.status_log = []  # no runtime said its kernel set

    def predict(self, stream, seq, at, y=None, **extra):
        y = [0.0, 1.0] if y is None else y
        self.predictions.append((stream, {"seq": seq, "y": y, "model": "m", **extra}, at))

    def error(self, stream, seq, code, at, **extra):
        self.errors.append((stream, {"seq": seq, "error": code, "detail": "", **extra}, at))


def _sent(stream, seq, at, epoch=0, boot=None, k=1, faults=(), wire=b""):
    from firmware_sim.devices import Sent

    return Sent(
        stream,
        seq,
        np.zeros((k, 2)),
        None,
        faults=list(faults),
        created=at,
        published=at,
        epoch=epoch,
        boot=boot,
        wire=wire or f"{stream}/{epoch}/{seq}".encode(),
    )


def _boots(boot_ids=True):
    """Device d: boot 0 sends seq 10..14 at t=0..4, reboots, boot 1 sends seq 1..3 at
    t=5..7; boot 0's seq 15 was in flight and arrives at t=5.5, after the new boot began."""
    b0, b1 = (7, 8) if boot_ids else (None, None)
    log = [_sent("d", 10 + i, float(i), 0, b0) for i in range(5)]
    log += [_sent("d", 1 + i, 5.0 + i, 1, b1) for i in range(3)]
    log.append(_sent("d", 15, 5.5, 0, b0))
    log[5].faults.append("reboot")
    return log


def test_scorer_keys_samples_by_boot_and_counts_restarts_and_stale():
    from firmware_sim.scorer import score

    log, ans = _boots(), _Answers()
    for i in range(5):
        ans.predict("d", 10 + i, i + 0.1, boot=7)
    ans.predict("d", 1, 5.1, boot=8, restart=True)
    ans.predict("d", 2, 6.1, boot=8)
    ans.predict("d", 2, 6.2, boot=8)  # re-published after a restart of the runtime
    ans.predict("d", 3, 7.1, boot=8)
    ans.error("d", 15, "stale", 5.6, boot=7)
    r = score(ans, log, 8.0)
    assert r["predictions_missing"] == 0 and r["lost"] == 0, r["missing_examples"]
    assert r["restarts"] == r["restarts_expected"] == 1
    assert r["stale"] == r["stale_messages_expected"] == 1
    assert r["stale_claims_unfounded"] == r["stale_published_before_newer_boot"] == 0
    assert r["duplicate_predictions"] == 1
    assert r["unexpected_predictions"] == 0
    assert r["samples_delivered_valid"] == 8  # the stale one is not expected to be answered
    ans.error("d", 13, "stale", 6.0, boot=7)  # reached the broker before boot 1 began
    r = score(ans, log, 8.0)
    assert r["stale"] == 2 and r["stale_published_before_newer_boot"] == 1
    assert r["stale_in_order_examples"] == [("d", 0, 13)]
    assert r["stale_in_order_never_predicted"] == 0  # seq 13 was answered before


def test_stale_is_only_right_once_a_newer_boot_was_published():
    from firmware_sim.scorer import score

    log, ans = _boots(), _Answers()
    for i in range(4):
        ans.predict("d", 10 + i, i + 0.1, boot=7)
    ans.error("d", 14, "stale", 4.1, boot=7)  # no newer boot yet: wrongly refused
    for i in range(3):
        ans.predict("d", 1 + i, 5.1 + i, boot=8)
    r = score(ans, log, 8.0)
    assert r["stale_claims_unfounded"] == 1
    assert r["predictions_missing"] == 2  # seq 14 of boot 0, and its in-flight seq 15
    assert r["restarts"] == 0 and r["restarts_expected"] == 1


def test_answers_without_boot_are_attributed_by_value_then_time():
    from firmware_sim.scorer import Truth, answers

    log = _boots(boot_ids=False)
    truth = Truth(log)
    ref = {k: np.array([float(k[1]), float(k[2])], np.float32) for m in log for k in m.keys}
    ans = _Answers()
    ans.predict("d", 11, 9.0, y=[0.0, 11.0])  # only boot 0 has seq 11
    ans.predict("d", 1, 9.0, y=[0.0, 99.0])  # no value match: the newest boot sent by then
    ans.predict("d", 2, 9.0, y=[1.0, 2.0])  # value of boot 1
    ans.predict("d", 42, 9.0)  # nobody sent seq 42
    got = answers(ans, truth, ref)
    assert set(got.got) == {("d", 0, 11), ("d", 1, 1), ("d", 1, 2)}
    assert got.unexpected == [("d", 42)]
    log2 = [_sent("d", 1, 0.0, 0), _sent("d", 1, 2.0, 1)]
    ans2 = _Answers()
    ans2.predict("d", 1, 1.0, y=[1.0, 1.0])  # arrived before boot 1 sent its seq 1
    ans2.predict("d", 1, 3.0, y=[0.0, 1.0])  # re-published answer of boot 0, known by value
    ref2 = {("d", 0, 1): np.array([0.0, 1.0], np.float32)}
    got2 = answers(ans2, Truth(log2), ref2).got
    assert [len(got2[("d", 0, 1)]), ("d", 1, 1) in got2] == [2, False]


def test_reboots_without_boot_ids_need_the_runtime_restart_gap():
    from firmware_sim.scorer import Truth, excluded_keys, score

    log = [m for m in _boots(boot_ids=False) if m.seq != 15]  # no in-flight message: boot-less
    truth = Truth(log)
    keys, reasons = excluded_keys(truth, None)
    assert keys == {("d", 1, s) for s in (1, 2, 3)} and "--restart-gap" in reasons[0]
    assert excluded_keys(truth, 5) == (set(), [])  # seq 14 -> 1 is 13 back: a restart
    keys, reasons = excluded_keys(truth, 20)
    assert len(keys) == 3 and "not more than --restart-gap 20" in reasons[0]
    ans = _Answers()
    for i in range(5):
        ans.predict("d", 10 + i, i + 0.1)
    r = score(ans, log, 8.0)
    assert r["predictions_missing"] == 0 and r["excluded_samples"] == 3
    assert r["restarts_expected"] == 0
    with pytest.raises(SimError, match="--restart-gap"):
        from firmware_sim.cli import check_reboots

        check_reboots(FaultPlan.parse("reboot=0.01"), False, None)
    check_reboots(FaultPlan.parse("reboot=0.01"), False, 50)
    check_reboots(FaultPlan.parse("reboot=0.01"), True, None)


def test_a_reboot_seq_exactly_2_pow_31_back_is_a_restart_as_the_runtime_says():
    """The runtime restarts a stream whose seq goes 2**31 back with ``restart_gap`` set (as
    far behind as ahead, admitted as behind): the scorer judged such a reboot as one the
    runtime could not tell, and left the device's samples out."""
    from firmware_sim.scorer import Truth, excluded_keys

    log = [m for m in _boots(boot_ids=False) if m.seq != 15]
    for m in log[:5]:  # boot 0 ends at seq 2**31 + 1: boot 1's seq 1 is 2**31 back
        m.seq += 2**31 - 13
    assert excluded_keys(Truth(log), 5) == (set(), [])


def test_late_after_a_reboot_and_what_the_broker_lost():
    """Boot 1's seq 1 overtaken by seq 2 is late; seq 3 never reached the broker (the
    witness did not see it) and the runtime said so with a gap: not the runtime's loss."""
    from firmware_sim.scorer import score

    log = [_sent("d", 10, 0.0, 0, 7), _sent("d", 2, 1.0, 1, 8), _sent("d", 1, 1.1, 1, 8)]
    log += [_sent("d", 3, 1.2, 1, 8), _sent("d", 4, 1.3, 1, 8), _sent("d", 5, 1.4, 1, 8)]
    ans = _Answers()
    ans.predict("d", 10, 0.1, boot=7)
    ans.predict("d", 2, 1.05, boot=8, restart=True)
    ans.error("d", 1, "late", 1.15, boot=8)
    ans.predict("d", 4, 1.35, boot=8, gap=1)
    witnessed = {m.wire for m in log if m.seq != 3 and m.seq != 5}
    r = score(ans, log, 2.0, witnessed=witnessed)
    assert r["late_beyond_reorder_window"] == 1 and r["late_claims_unfounded"] == 0
    assert r["predictions_missing"] == 2  # seq 3 (broker) and seq 5 (no gap told of it)
    assert r["lost_by_broker"] == 1 and r["lost"] == 1
    assert r["missing_examples"] == [("d", 1, 5)]


def test_a_rebooting_device_restarts_its_seq_and_loses_its_buffer():
    from firmware_sim.devices import Device, Sent
    from firmware_sim.faults import LOST_IN_REBOOT, Injector

    rng = np.random.default_rng(0)
    plan = FaultPlan.parse("reboot=0.5")
    d = Device(
        "d",
        make("sine", 0, 0, features=2),
        None,
        True,
        rate=10.0,
        batch=1,
        fmt="json",
        injector=Injector(plan, rng),
        jitter=0.0,
        rng=rng,
        feature_names=["a", "b"],
    )
    boot, held = d.boot, Sent("d", d.seq, np.zeros((1, 2)), None)
    d.buffer.append((held, b""))
    assert d.reboot() == [held] and held.faults == [LOST_IN_REBOOT]
    assert (d.seq, d.epoch, d.boot, len(d.buffer)) == (1, 1, (boot + 1) % 2**32, 0)
    msg = Sent("d", 1, np.ones((1, 2)), None, epoch=1, boot=d.boot)
    body = json.loads(d.encode(msg, None))
    assert body["boot"] == d.boot and body["seq"] == 1 and body["values"] == [1.0, 1.0]


@pytest.mark.broker
@pytest.mark.parametrize("boot_ids", [True, False], ids=["boot-ids", "restart-gap"])
def test_rebooting_devices_restart_their_streams(bundles, broker, tmp_path, boot_ids):
    """Devices reboot mid-stream (seq from 1, buffer lost), with reordering and duplicates on
    the wire: every sample of every boot is answered exactly as an offline run from zero state
    at the boot's first sample; old-boot stragglers are refused as stale."""
    from firmware_sim.devices import Fleet
    from firmware_sim.runtime import Runtime
    from firmware_sim.scorer import Scorer, score

    bundle = bundles / "clf-int8"
    gap = None if boot_ids else 50
    extra = () if boot_ids else ("--restart-gap", str(gap))
    runtime = Runtime(bundle, broker.url, tmp_path / "state", client_id="rt", extra=extra).start()
    scorer = Scorer(broker.url)
    try:
        scorer.wait_online("rt", 30, runtime.alive)
        plan = FaultPlan.parse("reboot=0.02,reorder=0.02,duplicate=0.03,delay=0.02")
        fleet = Fleet(
            broker.url,
            6,
            20.0,
            faults=plan,
            seed=3,
            fmt="mixed",
            batch=(1, 3),
            boot_ids=boot_ids,
            feature_names=["f0", "f1", "f2", "f3", "f4", "f5"],
        )
        log = fleet.run(6.0)
        scorer.wait(log, 20, gap)
        fleet.close()
        r = score(scorer, log, 6.0, bundle, ["a", "b", "c", "d"], restart_gap=gap)
    finally:
        scorer.close()
        assert runtime.stop() == 0, runtime.output()[-2000:]
    assert r["faults_injected"].get("reboot", 0) > 0, r["faults_injected"]
    assert r["predictions_missing"] == 0, r["missing_examples"]
    assert r["wrong_predictions"] == 0, r["wrong_examples"]
    assert r["unexpected_predictions"] == 0
    assert r["late_claims_unfounded"] == r["stale_claims_unfounded"] == 0
    assert r["restarts"] == r["restarts_expected"] > 0
    if boot_ids:
        assert r["excluded_samples"] == 0
    from firmware_sim.verdict import passed, verdict

    assert passed(r), verdict(r)  # every reboot's first answer says restart, and no other


@pytest.mark.desktop
@pytest.mark.broker
def test_demo_on_a_cluster_kills_a_worker_and_stays_exact(bundles, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_LSTM_CACHE": str(tmp_path / "cache")}
    cache = tmp_path / "cache" / "demo"
    cache.mkdir(parents=True)
    import shutil

    shutil.copytree(bundles / "clf-int8", cache / "bundle-int8")
    for name in ("model.keras", "model.json"):  # model.json marks the example current
        shutil.copy(bundles / "src" / "clf" / name, cache / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "demo",
            "--cluster",
            "--duration",
            "10",
            "--devices",
            "10",
            "--out",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "killed worker demo-w1 (kill -9)" in out.stderr
    r = json.loads((tmp_path / "res" / "score.json").read_text())
    assert r["broker"] == "nats-server" and r["worker_killed_at_s"] is not None
    assert r["predictions_missing"] == 0 and r["wrong_predictions"] == 0
    assert r["predictions_received"] == r["samples_delivered_valid"] > 300


def test_demo_cluster_refuses_the_embedded_broker():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "firmware_sim", "demo", "--cluster", "--embedded-broker"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not go with --embedded-broker" in lines[0], out.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--broker", "mqtt://127.0.0.1:99999"], "Port out of range"),
        (["run", "--broker", "mqtt://127.0.0.1:1", "--duration", "nan"], "--duration: 'nan'"),
        (["run", "--broker", "mqtt://127.0.0.1:1", "--rate", "inf"], "--rate: 'inf'"),
        (["run", "--broker", "mqtt://127.0.0.1:1", "--batch", "5000"], "must be 1..1024"),
        (
            ["run", "--broker", "mqtt://127.0.0.1:1", "--batch", "5-2"],
            "'5-2': expected LO-HI with LO <= HI",
        ),
        (["run", "--broker", "mqtt://127.0.0.1:1", "--connections", "-1"], "--connections"),
        (["run", "--broker", "mqtt://127.0.0.1:1", "--devices", "0"], "--devices: '0'"),
        (["run", "--broker", "mqtt://127.0.0.1:1", "--seed", "-1"], "--seed: '-1'"),
        (["run", "--broker", "mqtt://127.0.0.1:1", "--kernels", "litert-xnnpak"], "kernel set"),
        (
            ["run", "--broker", "mqtt://127.0.0.1:1", "--restart-gap", str(2**31)],
            "--restart-gap: '2147483648': expected the runtime's restart_gap, 0..2147483647",
        ),
        (
            # 0 is the runtime's "off": no reboot without a boot id can be told
            [
                *("run", "--broker", "mqtt://127.0.0.1:1", "--restart-gap", "0"),
                *("--no-boot-ids", "--faults", "reboot=0.1", "--source", "sine"),
            ],
            "--faults reboot with --no-boot-ids needs --restart-gap N",
        ),
        (
            ["host", "--bundle", "b", "--devices", "10000", "--rate", "1000"],
            "--devices 10000 at --rate 1000: 10,000,000 msg/s needs 10000 device processes",
        ),
        (["host", "--bundle", "b", "--cores", "4096"], "--cores '4096'"),
        (["host", "--bundle", "b", "--slowdown", "0.5"], "--slowdown 0.5"),
        (["host", "--bundle", "b", "--slowdown", "1e308"], "--slowdown 1e+308: expected a"),
        (["host", "--bundle", "b", "--cores", "0", "--slowdown", "101"], "from 1 to 100"),
        (["host", "--bundle", "b", "--seconds", "-1"], "--seconds: '-1'"),
    ],
)
def test_simulator_options_are_checked_before_anything_starts(args, needle, capsys):
    from firmware_sim.cli import main

    with contextlib.suppress(SystemExit):  # argparse's own refusals exit 2 as well
        assert main(args) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "demo", "host"])
@pytest.mark.parametrize("where", ["a file", "a directory in the way", "below a file"])
def test_an_out_that_cannot_hold_the_results_is_refused_before_anything_starts(
    command, where, tmp_path, bundles, capsys
):
    """It was found only after the run (or the demo's first-run training, or the host's
    trials), with a traceback, and its results were lost."""
    from firmware_sim.cli import main

    (tmp_path / "file").write_text("kept\n")
    name = "host.json" if command == "host" else "score.json"
    (tmp_path / "res" / name).mkdir(parents=True)
    out, needle = {
        "a file": (tmp_path / "file", "is not a directory"),
        "a directory in the way": (tmp_path / "res", f"{name} is a directory"),
        "below a file": (tmp_path / "file" / "res", "is not a directory"),
    }[where]
    args = {
        "run": ["--broker", "mqtt://127.0.0.1:1"],
        "demo": ["--embedded-broker"],
        "host": ["--bundle", str(bundles / "clf-int8"), "--devices", "1"],
    }[command]
    assert main([command, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("firmware-sim: error: --out") and needle in err[0]
    assert (tmp_path / "file").read_text() == "kept\n"
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [name]


def test_an_offline_run_in_another_python_that_fails_says_why_in_one_line(tmp_path):
    """The scorer's note on an offline run that failed: the exception's line, or the exit code
    of a Python that wrote nothing, not the tail of a traceback."""
    from firmware_sim.offline import in_python

    chunks = [("s", 1, np.zeros((2, 3)))]
    answers, why = in_python(sys.executable, tmp_path / "no-bundle", chunks, "litert-xnnpack")
    assert answers == [] and why.startswith("(failed: ") and "\n" not in why
    assert len(why) > len("(failed: )")  # its last line: the bundle, or the kernels, it lacks
    answers, why = in_python("/bin/false", tmp_path / "no-bundle", chunks, "litert-xnnpack")
    assert (answers, why) == ([], "(failed: exit code 1)")


def test_a_fleet_that_takes_long_to_connect_says_how_far_it_is(broker, monkeypatch, capsys):
    from firmware_sim import devices

    monkeypatch.setattr(devices, "PROGRESS_S", 0.0)  # every device and connection is "slow"
    fleet = devices.Fleet(broker.url, 3, 1.0)
    fleet.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"preparing: {i} of 3 devices" for i in (2, 3)] + [
        f"connecting: {i} of 3 connections" for i in (1, 2, 3)
    ]


def test_a_fleet_reads_its_source_once_and_its_devices_share_the_samples(
    broker, monkeypatch, tmp_path
):
    """Every device read the recording set (or the --source file) again and held its own
    copy: 20,000 devices took minutes before the first connection, and gigabytes. It is read
    once; each device plays the shared samples in its own order, as before."""
    from firmware_sim import devices, sources

    reads = []
    for name in ("basicmotions", "load_file"):
        real = getattr(sources, name)
        monkeypatch.setattr(
            sources, name, lambda *a, _real=real, _n=name: reads.append(_n) or _real(*a)
        )
    np.save(tmp_path / "x.npy", np.arange(60.0).reshape(10, 6))
    for spec, read in (("basicmotions", "basicmotions"), (str(tmp_path / "x.npy"), "load_file")):
        reads.clear()
        fleet = devices.Fleet(broker.url, 4, 1.0, source=spec, connections=1, seed=1)
        try:
            assert reads == [read]
            data = [d.source.data for d in fleet.devices]
            assert all(x is data[0] and not x.flags.writeable for x in data)
            for i, d in enumerate(fleet.devices):  # what make() gives a device on its own
                alone = sources.make(spec, i, 1)
                for _ in range(3):
                    got, want = d.source.take(70), alone.take(70)
                    np.testing.assert_array_equal(got[0], want[0])
                    assert (got[1] is None) == (want[1] is None)
                    if got[1] is not None:
                        np.testing.assert_array_equal(got[1], want[1])
        finally:
            fleet.close()


def test_a_fleet_beyond_the_open_file_limit_is_refused_in_one_line(broker, monkeypatch):
    """Each MQTT connection takes three open files: past ``ulimit -n`` a connection failed
    half-way through connecting the fleet, with a traceback ("Too many open files")."""
    import resource

    from firmware_sim import devices

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (332, 332))
    with pytest.raises(SimError) as err:
        devices.Fleet(broker.url, 120, 1.0, source="sine")
    assert str(err.value) == (
        "--devices 120: 120 MQTT connections need about 392 open files, this process may "
        "open 332: use --connections 100 or fewer (devices share them), or raise the limit "
        "(ulimit -n)"
    )
    fleet = devices.Fleet(broker.url, 120, 1.0, source="sine", connections=100)
    assert len(fleet.conns) == 100
    fleet.close()


@pytest.mark.broker
def test_messages_the_broker_never_acknowledged_are_not_delivered_nor_lost(broker):
    """The broker killed mid-run and not restarted: every message handed to the client after
    that counted as delivered (so as lost, blamed on the runtime, with 'lost by broker 0') and
    the run could be called EXACT. Delivered means acknowledged (PUBACK) now; the rest is
    counted as not delivered, and the verdict says so."""
    import threading
    import time

    from firmware_sim.devices import Fleet
    from firmware_sim.scorer import score
    from firmware_sim.verdict import verdict

    fleet = Fleet(broker.url, 1, 20.0, source="sine", seed=3)
    runner = threading.Thread(target=fleet.run, args=(600.0,), daemon=True)

    def wait_for(cond):
        deadline = time.monotonic() + 120
        while not cond():
            assert time.monotonic() < deadline and runner.is_alive()
            fleet.stop_event.wait(0.02)

    try:
        runner.start()
        wait_for(lambda: len(fleet.log) >= 5 and fleet.conns[0].pending() == 0)
        broker.stop()  # and not started again
        before = len(fleet.log)
        wait_for(lambda: len(fleet.log) >= before + 10)
        fleet.stop_event.set()
        runner.join(120)
        assert not runner.is_alive()
    finally:
        fleet.stop_event.set()
        runner.join(60)
        fleet.close()
    log = fleet.log
    acked = [m.delivered for m in log]  # those acknowledged before the broker went away
    took = acked.index(False)
    assert took >= 5 and not any(acked[took:]) and len(log) - took >= 10
    ans = _Answers()
    for m in log[:took]:  # a runtime that answered everything the broker took
        ans.predict(m.stream, m.seq, (m.published or 0.0) + 0.1)
    r = score(ans, log, 1.0)
    assert r["messages_delivered"] == took
    assert r["messages_not_delivered"] == len(log) - took
    assert r["predictions_missing"] == 0 and r["lost"] == 0
    r["wrong_predictions"] = 0  # as an offline reference would have it
    v = verdict(r)
    assert not v.startswith("verdict: EXACT"), v
    assert f"{len(log) - took:,} messages not delivered" in v, v
    assert "the broker did not acknowledge them" in v, v


def test_a_device_whose_broker_is_away_does_not_rescan_its_messages_at_every_send(
    broker, monkeypatch
):
    """A connection keeps paho's handle of each message to know what was delivered, and drops
    the delivered ones past 5,000. With the broker away none are: the whole list was scanned
    again at every message sent (15,000 messages offline: 10,000 scans of up to 15,000)."""
    from firmware_sim.devices import Connection

    conn = Connection(broker.url, "offline-device")
    scans = []
    scan = Connection._forget_published
    monkeypatch.setattr(Connection, "_forget_published", lambda c: (scans.append(1), scan(c)))
    conn.go_offline()
    for _ in range(15_000):
        conn.publish("sensors/offline-device/data", b"{}")
    assert conn.pending() == 15_000
    assert len(scans) <= 2, len(scans)


def test_the_host_search_stops_at_the_load_its_device_processes_can_offer(monkeypatch):
    """The search doubled the device count up to 5,000 whatever the rate: at 100 Hz a trial
    spread its devices over hundreds of fleet processes, which measured themselves (and
    swamped the machine). It stops at what ``MAX_PROCESSES`` of them offer, and says so."""
    from firmware_sim import host

    asked = []

    def trial(bundle, n, rate, **kw):
        asked.append(n)
        assert host.fleet_processes(n, rate) <= host.MAX_PROCESSES
        return {"kept_up_real_time": True, "predictions_missing": 0, "runtime_peak_rss_mb": 1}

    monkeypatch.setattr(host, "trial", trial)
    monkeypatch.setattr(host, "MAX_PROCESSES", 4)
    r = host.search(Path("b"), 100.0, seconds=1, cores={0}, memory_mb=0, slowdown=None)
    top = host.offered_at_most(100.0)
    assert top == 24 and asked == [10, 20, 24] and r["search_limit_devices"] == top
    assert r["max_devices_real_time"] == 24 and r["first_failing"] is None


def test_the_host_search_tries_its_limit_and_bisects_below_it(monkeypatch):
    """Doubling from 320 stepped over a limit of 480 to 640 and stopped: the summary said 320
    kept up and nothing failed, although 480 had never run. The limit is tried, and a count
    below it that fails is bisected towards as any other."""
    from firmware_sim import host

    asked = []

    def trial(bundle, n, rate, **kw):
        asked.append(n)
        return {"kept_up_real_time": n <= 350, "predictions_missing": 0, "runtime_peak_rss_mb": 1}

    monkeypatch.setattr(host, "trial", trial)
    monkeypatch.setattr(host, "offered_at_most", lambda rate, batch=1: 480)
    r = host.search(Path("b"), 10.0, seconds=1, cores={0}, memory_mb=0, slowdown=None)
    assert asked[:7] == [10, 20, 40, 80, 160, 320, 480] and asked[7:] == [400, 360, 340]
    assert r["max_devices_real_time"] == 340 and r["first_failing"] == 360


def test_a_runtime_of_another_source_tree_runs_that_trees_edge(tmp_path):
    """The before/after benchmarks run ``serve`` from an older commit's worktree: its own
    ``edge`` package, not the installed one, with the same arguments."""
    from firmware_sim.runtime import Runtime

    (tmp_path / "old" / "edge").mkdir(parents=True)
    (tmp_path / "old" / "edge" / "__init__.py").write_text("")
    (tmp_path / "old" / "edge" / "cli.py").write_text(
        "import sys\ndef main():\n    print('old tree', sys.argv[1:3])\n    return 0\n"
    )
    rt = Runtime(Path("b"), "mqtt://127.0.0.1:1", tmp_path / "state", tree=tmp_path / "old")
    out = subprocess.run(rt.cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "old tree ['serve', '--model']", out
    here = Runtime(Path("b"), "mqtt://127.0.0.1:1", tmp_path / "state")
    assert here.cmd[1:3] == ["-m", "edge"] and rt.cmd[3:] == here.cmd[3:]


def test_real_time_is_judged_against_the_fastest_early_tenth_not_the_reorder_hold():
    """A stream's first sample waits the runtime's reorder hold (600 ms), so the first tenth of
    a 6 s trial was that much slower: a runtime 700 ms behind at the end was said to keep up.
    The last tenth is judged against the fastest tenth of the first half."""
    from firmware_sim.scorer import real_time

    held = np.full(100, 600.0)
    steady = np.full(800, 20.0)
    behind = np.concatenate([held, steady[:400], np.linspace(20, 700, 500)])
    r = real_time(behind, missing=0)
    assert (
        r["latency_first_tenth_median_ms"] == 600 and r["latency_early_best_tenth_median_ms"] == 20
    )
    assert r["latency_last_tenth_median_ms"] > 600 and r["kept_up_real_time"] is False
    assert real_time(np.concatenate([held, steady, np.full(100, 30.0)]), 0)["kept_up_real_time"]
    assert not real_time(np.concatenate([held, steady]), missing=1)["kept_up_real_time"]
    rising = np.linspace(5, 2000, 1000)  # behind from the start
    assert real_time(rising, 0)["kept_up_real_time"] is False
    assert real_time(np.array([]), 0) == dict.fromkeys(real_time(np.array([3.0]), 0))
    assert real_time(np.array([3.0]), 0)["kept_up_real_time"] is True


def test_a_cpu_slow_down_the_kernel_refuses_leaves_no_cgroup_behind(tmp_path, monkeypatch):
    """The runtime's CPU cgroup was made before its quota was written: a quota the kernel
    refused (or no quota file) left the empty group in /sys/fs/cgroup for good, one per run."""
    from firmware_sim import runtime

    (tmp_path / "cpu").mkdir()
    (tmp_path / "memory").mkdir()
    monkeypatch.setattr(runtime, "CGROUP_V1", tmp_path)  # a group made here has no quota file

    def refused(*_args, **_kw):  # as the kernel refuses a value
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(Path, "write_text", refused)
    url, state = "mqtt://127.0.0.1:1", tmp_path / "state"
    rt = runtime.Runtime(Path("b"), url, state, slowdown=3.0, memory_mb=64)
    rt._cgroup_setup()
    assert rt.cgroups == [] and list(tmp_path.glob("*/*")) == []
    assert rt.notes == [
        "CPU slow-down unsupported here (No such file or directory); ran at full speed",
        "memory cap by RLIMIT_AS (address space), no memory cgroup here",
    ]


@pytest.mark.parametrize("kind", ["sine", "steps"])
def test_a_sine_or_steps_source_holds_no_table_and_plays_the_same_samples(kind):
    """Each device held a table of 20,000 samples of its signal: a fleet of 20,000 devices
    took gigabytes and minutes before its first connection. Such a signal is computed from
    the sample's index when taken: the samples of that table, looped as it was."""
    from firmware_sim.sources import SYNTHETIC_LENGTH, make, synthetic

    source = make(kind, 3, 5, features=4)
    assert source.data.size == 0 and source.features == 4
    table = synthetic(kind, 4, SYNTHETIC_LENGTH, np.random.default_rng([5, 3]))
    got = np.concatenate([source.take(997)[0] for _ in range(41)])  # past the loop
    want = np.resize(table, got.shape)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["noise", "walk"])
def test_a_noise_or_walk_source_holds_no_table_and_plays_the_same_samples(kind):
    """Each device held a table of 20,000 samples of its noise or walk (about 1 MB): a fleet
    of 20,000 devices took gigabytes. The samples are drawn as taken now, from the same
    generator: the samples of that table, looped as it was, in a few kilobytes per device."""
    import tracemalloc

    from firmware_sim.sources import SYNTHETIC_LENGTH, maker, synthetic

    make = maker(kind, 5, features=6)
    source = make(3)
    assert source.data.size == 0 and source.features == 6
    table = synthetic(kind, 6, SYNTHETIC_LENGTH, np.random.default_rng([5, 3]))
    got = np.concatenate([source.take(997)[0] for _ in range(41)])  # past the loop
    np.testing.assert_array_equal(got, np.resize(table, got.shape))

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fleet = [make(i) for i in range(200)]
        for s in fleet:
            s.take(10)
        per_device = (tracemalloc.get_traced_memory()[0] - before) / len(fleet)
    finally:
        tracemalloc.stop()
    assert per_device < 16_000, f"{per_device:,.0f} bytes per device"


@pytest.mark.broker
def test_a_run_nothing_answered_prints_no_figure_it_did_not_measure(
    broker, bundles, tmp_path, capsys
):
    """Nothing served: the latencies were 'inf' (score.json held "Infinity", which is not
    JSON), the largest difference from the offline run was 0.0 over no prediction, and a run
    that delivered nothing had 'kept up real time'. Such figures are n/a now (null)."""
    from firmware_sim.cli import main

    bundle = str(bundles / "clf-int8")
    for how in (["--devices", "2"], ["--rate", "0.01"]):  # none answered; nothing delivered
        args = ["run", "--broker", broker.url, "--duration", "1", "--bundle", bundle, *how]
        assert main([*args, "--out", str(tmp_path / "res")]) == 1

        def no_constant(name: str) -> None:
            raise AssertionError(f"score.json holds {name}")

        text = (tmp_path / "res" / "score.json").read_text()
        r = json.loads(text, parse_constant=no_constant)
        for key in (
            "latency_first_tenth_median_ms",
            "latency_last_tenth_median_ms",
            "kept_up_real_time",
            "max_abs_diff_vs_offline",
        ):
            assert r[key] is None, (key, r[key])
        out = capsys.readouterr().out
        assert "inf" not in out and "kept up real time                  n/a" in out, out


@pytest.mark.broker
def test_a_scorer_cut_off_from_its_broker_does_not_blame_the_runtime_for_what_it_missed(broker):
    """The scorer's session is clean: answers published while the broker was away from it
    never reached it, and were counted as lost by the runtime ('NOT EXACT'). The times it was
    cut off are counted now, and the verdict says the missing answers cannot be judged."""
    import time

    from firmware_sim.scorer import Scorer, score, table
    from firmware_sim.verdict import verdict

    scorer = Scorer(broker.url)
    try:
        log = [_sent("d", i, float(i)) for i in range(3)]
        r = score(scorer, log, 1.0)
        r["wrong_predictions"] = 0  # as an offline reference would have it
        assert r["scorer_cut_off_from_broker"] == 0
        assert verdict(r).startswith("verdict: NOT EXACT: 3 expected predictions missing")
        broker.stop()
        deadline = time.monotonic() + 120
        while not scorer.cut_off:
            assert time.monotonic() < deadline, "the scorer never noticed the broker leave"
            time.sleep(0.05)
        r = score(scorer, log, 1.0)
        r["wrong_predictions"] = 0
    finally:
        scorer.close()
    cut = r["scorer_cut_off_from_broker"]
    assert cut >= 1 and f"scorer cut off from broker         {cut}" in table(r)
    assert verdict(r).startswith(
        "verdict: NOT JUDGED: 3 expected predictions missing, but the scorer lost its "
        "connection to the broker "
    )
    assert (
        "(answers published meanwhile never reached it): run again with the broker up "
        "throughout, and without another firmware-sim run on this broker"
    ) in verdict(r)


@pytest.mark.broker
def test_a_scorer_cut_off_by_a_second_run_on_its_broker_names_that_cause(broker):
    """Two `firmware-sim run`s on one broker at once: their scorers share a client id, and the
    broker drops one of them at each connect of the other. The verdict told each to run again
    with the broker up throughout, when it had been; it names the second run too."""
    import time

    from firmware_sim.scorer import Scorer, score
    from firmware_sim.verdict import verdict

    first = Scorer(broker.url)
    second = None
    try:
        second = Scorer(broker.url)  # the other run's scorer, with the same client id
        deadline = time.monotonic() + 120
        while not first.cut_off:
            assert time.monotonic() < deadline, "the first scorer was never dropped"
            time.sleep(0.05)
        r = score(first, [_sent("d", i, float(i)) for i in range(3)], 1.0)
        r["wrong_predictions"] = 0
    finally:
        first.close()
        if second is not None:
            second.close()
    said = verdict(r)
    assert said.startswith("verdict: NOT JUDGED: 3 expected predictions missing"), said
    assert "another firmware-sim run on this broker" in said, said


def test_a_demo_whose_cached_bundle_is_damaged_says_how_to_get_a_sound_one(
    bundles, tmp_path, monkeypatch, capsys
):
    """A cached example bundle whose model was cut short (a full disk, a copy stopped half
    way) stopped the demo with the bundle's checksum error and no word of what to do. It says
    to remove the cache, which the next demo trains and converts again."""
    import shutil

    from firmware_sim.cli import main

    cache = tmp_path / "cache" / "demo"
    cache.mkdir(parents=True)
    shutil.copytree(bundles / "clf-int8", cache / "bundle-int8")
    for name in ("model.keras", "model.json"):  # model.json marks the example current
        shutil.copy(bundles / "src" / "clf" / name, cache / name)
    model = cache / "bundle-int8" / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    monkeypatch.setenv("EDGE_LSTM_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--embedded-broker", "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("firmware-sim: error: the cached example bundle is damaged (")
    assert err[0].endswith(f"remove {cache} and run the demo again to train and convert it anew"), (
        err[0]
    )


def test_a_demo_started_while_another_makes_the_example_waits_for_it(tmp_path, monkeypatch):
    """Two demos started at once on a fresh machine both trained and converted the example
    into the same cache files, each over the other's. The second waits for the first (it
    says so) and uses the example the first made."""
    import fcntl
    import threading

    from firmware_sim import demo

    cache = tmp_path / "demo"
    cache.mkdir()
    said: list[str] = []
    waiting = threading.Event()

    def say(msg: str) -> None:
        said.append(msg)
        waiting.set()

    trained: list[Path] = []
    monkeypatch.setattr(demo, "say", say)
    monkeypatch.setattr(demo, "cached", lambda c: (c / "made").exists())
    monkeypatch.setattr(demo, "_train_example", lambda c, m, b: trained.append(c) or (m, b))
    got: list[object] = []
    with open(cache / ".lock", "a") as first:  # the first demo, making the example
        fcntl.flock(first, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: got.append(demo.example_bundle(cache)))
        second.start()
        assert waiting.wait(60), "the second demo did not wait for the first"
        (cache / "made").write_text("")  # the first demo's example is made
    second.join(60)
    assert not second.is_alive()
    assert said == [f"another demo is making the example model in {cache}: waiting for it"]
    assert trained == [] and got == [(cache / "model.keras", cache / "bundle-int8")]
    (cache / "made").unlink()  # alone, with no example yet: it makes one
    assert demo.example_bundle(cache) == (cache / "model.keras", cache / "bundle-int8")
    assert trained == [cache]


@pytest.mark.parametrize("how", ["exits", "never listens"])
def test_a_broker_that_fails_to_start_is_one_line_and_nothing_is_left_running(
    how, tmp_path, monkeypatch
):
    """A broker that exited at start gave the last 500 characters of its log (many lines, a
    traceback's middle), and one that never listened was left running after the error."""
    from firmware_sim import broker

    fake = tmp_path / "mosquitto"
    body = {
        "exits": "echo 'first line' >&2; echo 'Error: Address already in use' >&2; exit 1",
        "never listens": "exec sleep 600",
    }[how]
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(broker, "find_mosquitto", lambda: str(fake))
    started = []
    popen = broker.subprocess.Popen

    def record(*a, **kw):
        started.append(popen(*a, **kw))
        return started[-1]

    monkeypatch.setattr(broker.subprocess, "Popen", record)
    b = broker.Broker(tmp_path / "b", embedded=False)
    with pytest.raises(SimError) as err:
        b.start()
    msg = str(err.value)
    assert "\n" not in msg
    if how == "exits":
        assert msg == "the broker exited at start (exit code 1): Error: Address already in use"
    else:
        assert msg.startswith("the broker did not listen on 127.0.0.1:")
    assert len(started) == 1 and started[0].poll() is not None and b._log.closed


@pytest.mark.broker
def test_a_host_trial_stopped_while_its_scorer_connects_leaves_nothing_running(
    bundles, monkeypatch
):
    """Ctrl-C (or a scorer that could not connect) between the start of the runtime and the
    scorer's connection left the trial's broker and runtime running, and the runtime's
    cgroups behind: they were stopped only once the scorer was connected."""
    from firmware_sim import host

    brokers, runtimes = [], []

    class Broker(host.Broker):
        def start(self):
            brokers.append(self)
            return super().start()

    class Runtime:
        def __init__(self, *a, **kw):
            self.stopped = False
            runtimes.append(self)

        def start(self):
            return self

        def stop(self):
            self.stopped = True
            return 0

    def interrupted(url):
        raise KeyboardInterrupt

    monkeypatch.setattr(host, "Broker", Broker)
    monkeypatch.setattr(host, "Runtime", Runtime)
    monkeypatch.setattr(host, "Scorer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        host.trial(bundles / "clf-int8", 1, 1.0, seconds=1, cores=set(), memory_mb=0, slowdown=None)
    assert len(brokers) == 1 and brokers[0].proc is None  # stopped
    assert len(runtimes) == 1 and runtimes[0].stopped


def test_a_nats_server_that_fails_to_start_says_why_in_one_line(tmp_path, monkeypatch):
    """'nats-server did not start (see .../nats.log)': that log was in the demo's working
    directory, removed as the demo ended. The error carries the log's last line now."""
    from firmware_sim import cluster

    fake = tmp_path / "nats-server"
    fake.write_text(
        "#!/bin/sh\necho 'starting' >&2\necho 'nats: bad store directory' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(cluster, "nats_binary", lambda: str(fake))
    nats = cluster.LocalNats(tmp_path / "nats")
    with pytest.raises(SimError) as err:
        nats.start()
    assert (
        str(err.value)
        == "nats-server did not start, exited (exit code 1): nats: bad store directory"
    )
    assert nats.proc is not None and nats.proc.poll() is not None


@pytest.mark.broker
def test_a_broker_whose_port_another_process_took_is_not_taken_for_ours(tmp_path, monkeypatch):
    """Another process listening on the port chosen for the broker (taken between the choice
    and the broker's start): the broker exited, 'Address already in use', but the listener
    answered, and the demo went on talking to that other process."""
    import socket

    from firmware_sim import broker

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        monkeypatch.setattr(broker, "free_port", lambda: other.getsockname()[1])
        b = broker.Broker(tmp_path / "b", embedded=False)
        with pytest.raises(SimError) as err:
            b.start()
    assert str(err.value).startswith("the broker exited at start (exit code 1): ")
    assert "Address already in use" in str(err.value) and "\n" not in str(err.value)


def test_a_nats_server_interrupted_while_it_starts_is_stopped(tmp_path, monkeypatch):
    """Ctrl-C while the demo's nats-server started left it running (writing its store into
    the demo's working directory as that was removed) until the demo's process ended."""
    from firmware_sim import cluster

    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cluster, "nats_binary", lambda: str(fake))

    def interrupted(port):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster, "is_listening", interrupted)
    nats = cluster.LocalNats(tmp_path / "nats")
    with pytest.raises(KeyboardInterrupt):
        nats.start()
    assert nats.proc is not None and nats.proc.poll() is not None


@pytest.mark.broker
def test_answers_no_consumer_can_read_are_counted_not_a_traceback(broker):
    """A prediction without ``y``, with a ``seq`` that is no number, with rows of different
    lengths or that is no JSON object stopped the score with a traceback (KeyError, TypeError,
    ValueError): no figure, no verdict. Each is now counted, named, and fails the run."""
    from firmware_sim.scorer import Scorer, score
    from firmware_sim.verdict import verdict
    from tests.mqtt_helpers import Publisher

    log = [_sent("d", i, float(i)) for i in range(1, 6)]
    scorer = Scorer(broker.url)
    pub = Publisher(broker.url)
    try:
        pub.raw("predictions/d", b"{not json")  # first: read before the 6 that follow
        for seq, y in ((1, [0.0, 1.0]), (2, [0.0, 1.0]), (5, [0.0, 1.0])):  # sound ones
            pub.raw("predictions/d", json.dumps({"seq": seq, "y": y, "model": "m"}).encode())
        pub.raw("predictions/d", json.dumps({"seq": 3, "model": "m"}).encode())
        pub.raw("predictions/d", json.dumps({"seq": "4", "y": [0.0, 1.0]}).encode())
        pub.raw("predictions/d", json.dumps({"seq": 4, "y": [[0.0, 1.0], [2.0]]}).encode())
        pub.flush()
        wait_until(lambda: len(scorer.predictions) == 6, 60, "the answers")
        r = score(scorer, log, 1.0)
    finally:
        pub.close()
        scorer.close()
    assert r["malformed_answers"] == 4, r["malformed_examples"]
    whys = [why for _, why in r["malformed_examples"]]
    assert "no y" in whys and 'seq "4" is not a u32' in whys
    assert any("not a vector or rows of numbers" in why for why in whys)
    assert any(why.startswith("not a JSON object") for why in whys)
    assert r["predictions_received"] == 3 and r["predictions_missing"] == 2
    text = verdict(r)
    assert text.startswith("verdict: NOT ALL ANSWERED: 2 expected predictions missing, 4 answers")
    assert "no consumer can read (d: not a JSON object: b'{not json'; d: no y)" in text
    from firmware_sim.verdict import passed

    r["predictions_missing"] = 0  # the malformed answers alone fail the run
    assert not passed(r) and "NOT EXACT: 4 answers no consumer can read" in verdict(r)


def test_a_prediction_of_another_width_than_the_offline_run_is_wrong_not_a_traceback(
    monkeypatch,
):
    """A row one value longer was subtracted from the offline run's row: a numpy broadcast
    error ended the score. It is a wrong prediction."""
    from firmware_sim import scorer as scoring
    from firmware_sim.verdict import verdict

    log = [_sent("d", 1, 0.0), _sent("d", 2, 1.0)]
    ref = {("d", 0, 1): np.array([0.0, 1.0], np.float32), ("d", 0, 2): np.ones(2, np.float32)}
    monkeypatch.setattr(scoring, "offline_in", lambda *a: (ref, "litert-xnnpack", None))
    monkeypatch.setattr(scoring, "model_check", lambda *a: {})  # no bundle to read
    ans = _Answers()
    ans.predict("d", 1, 0.1, y=[0.0, 1.0])
    ans.predict("d", 2, 1.1, y=[1.0, 1.0, 1.0])
    r = scoring.score(ans, log, 2.0, Path("bundle"))
    assert r["wrong_predictions"] == 1 and r["wrong_examples"] == [("d", 0, 2)]
    assert r["max_abs_diff_vs_offline"] == 0.0
    assert verdict(r).startswith("verdict: NOT EXACT: 1 of 2 predictions differ")


def test_predictions_for_samples_that_should_have_none_fail_the_run(monkeypatch):
    """A prediction for a seq no device sent, or for a sample the runtime should have refused
    (a NaN), was counted in ``unexpected predictions`` and nowhere else: the verdict said
    'EXACT: all 5 predictions equal the offline run' and run and demo exited 0."""
    from firmware_sim import scorer as scoring
    from firmware_sim.verdict import passed, verdict

    log = [_sent("d", 1, 0.0), _sent("d", 2, 1.0), _sent("d", 3, 2.0, faults=["nan"])]
    ref = {("d", 0, s): np.array([0.0, float(s)], np.float32) for s in (1, 2)}
    monkeypatch.setattr(scoring, "offline_in", lambda *a: (ref, "litert-xnnpack", None))
    monkeypatch.setattr(scoring, "model_check", lambda *a: {})  # no bundle to read
    ans = _Answers()
    for seq in (1, 2):
        ans.predict("d", seq, seq + 0.1, y=[0.0, float(seq)])
    ans.error("d", 3, "not_finite", 2.1)
    r = scoring.score(ans, log, 3.0, Path("bundle"))
    assert passed(r) and verdict(r).startswith("verdict: EXACT: all 2 predictions")
    ans.predict("d", 3, 3.1, y=[0.0, 3.0])  # the NaN sample: refused by a sound runtime
    ans.predict("d", 9, 3.2, y=[0.0, 9.0])  # nobody sent seq 9
    r = scoring.score(ans, log, 3.0, Path("bundle"))
    assert r["unexpected_predictions"] == 2 and not passed(r)
    assert r["unexpected_examples"] == [("d", 3), ("d", 9)]
    assert verdict(r).startswith(
        "verdict: NOT EXACT: 2 predictions for samples that should have none (d 3, d 9)"
    )


def test_predictions_the_offline_run_computed_nothing_for_are_not_exact(bundles):
    """A --bundle of another feature count than the samples: the offline run refused every
    sample, so no prediction was compared, and the verdict said 'EXACT: all 2 predictions
    equal the offline run' with no difference measured."""
    from firmware_sim.devices import Sent
    from firmware_sim.scorer import score
    from firmware_sim.verdict import passed, verdict

    bundle = bundles / "reg2-int8"  # 3 features; the devices sent 6
    log = [Sent("d", s, np.ones((1, 6)), None, created=s, published=s) for s in (1, 2)]
    ans = _Answers()
    for seq in (1, 2):
        ans.predict("d", seq, seq + 0.1, y=[0.0, 1.0])
    r = score(ans, log, 2.0, bundle)
    assert verdict(r).startswith(
        "verdict: NOT EXACT: 2 predictions the offline run computed nothing for"
    )
    assert r["max_abs_diff_vs_offline"] is None and not passed(r)
    assert r["predictions_received"] == r["predictions_not_compared"] == 2
    assert r["not_compared_examples"] == [("d", 0, 1), ("d", 0, 2)]


def test_predictions_of_another_model_than_the_bundle_are_not_exact(bundles, tmp_path):
    """A runtime serving the same .tflite with other labels answers the same ``y`` under its
    own model id and labels: judged by ``y`` alone the run was EXACT. The model id every
    prediction names is compared with the bundle's."""
    import shutil

    from edge.manifest import read_bundle
    from firmware_sim.devices import Sent
    from firmware_sim.scorer import offline, score
    from firmware_sim.verdict import passed, verdict

    bundle = bundles / "clf-int8"
    other = tmp_path / "relabelled"
    shutil.copytree(bundle, other)
    doc = json.loads((other / "manifest.json").read_text())
    doc["output"]["labels"] = ["a", "b", "c", "d"]
    (other / "manifest.json").write_text(json.dumps(doc))
    served = read_bundle(other)[0].model_id
    assert served != read_bundle(bundle)[0].model_id
    rng = np.random.default_rng(0)
    log = [Sent("d", s, rng.normal(size=(1, 6)), None, created=s, published=s) for s in (1, 2)]
    ref = offline(other, log)
    ans = _Answers()
    for seq in (1, 2):
        y = ref[("d", 0, seq)]
        top = int(y.argmax())
        ans.predict("d", seq, seq + 0.1, y=y.tolist(), model=served, label="abcd"[top], p=y[top])
    r = score(ans, log, 2.0, bundle)
    assert r["wrong_predictions"] == 0  # the same y
    assert not passed(r) and verdict(r).startswith(
        f"verdict: NOT EXACT: 2 predictions name model {served}, not --bundle's "
    )
    assert r["other_models"] == {served: 2}
    r = score(ans, log, 2.0, other)
    assert passed(r) and r["predictions_other_model"] == 0


def test_a_label_or_p_that_is_not_the_top_class_of_y_fails_the_run(bundles):
    """Consumers read ``label`` and ``p``; the judge compared ``y`` alone, so a prediction
    whose ``y`` equals the offline run's under another label was EXACT."""
    from edge.manifest import read_bundle
    from firmware_sim.devices import Sent
    from firmware_sim.scorer import offline, score
    from firmware_sim.verdict import passed, verdict

    bundle = bundles / "clf-int8"
    manifest = read_bundle(bundle)[0]
    rng = np.random.default_rng(1)
    log = [Sent("d", s, rng.normal(size=(1, 6)), None, created=s, published=s) for s in (1, 2, 3)]
    ref = offline(bundle, log)
    ans = _Answers()
    for seq in (1, 2, 3):
        y = ref[("d", 0, seq)]
        top = int(y.argmax())
        label, p = manifest.labels[top], float(y[top])
        if seq == 2:
            label = manifest.labels[(top + 1) % len(manifest.labels)]
        if seq == 3:
            p = float(y[top]) + 0.5  # not what y says
        ans.predict("d", seq, seq + 0.1, y=y.tolist(), model=manifest.model_id, label=label, p=p)
    r = score(ans, log, 3.0, bundle)
    assert r["wrong_predictions"] == 0 and r["predictions_other_model"] == 0
    assert not passed(r)
    assert verdict(r).startswith(
        "verdict: NOT EXACT: 2 predictions whose label or p is not their y's top class "
        "(e.g. d seq 2: label "
    )
    assert [e[1] for e in r["labels_wrong_examples"]] == [2, 3]


def test_restart_flags_missing_or_out_of_place_fail_the_run():
    """``restarts`` and ``restarts_expected`` were figures the verdict never read: a runtime
    that answered a reboot without ``"restart": true``, or said it on an answer in the middle
    of a boot, was judged as passing."""
    from firmware_sim.scorer import score
    from firmware_sim.verdict import passed, verdict

    def judge(flags):
        ans = _Answers()
        for i in range(5):
            ans.predict("d", 10 + i, i + 0.1, boot=7, **({"restart": True} if i in flags else {}))
        for i in range(3):
            extra = {"restart": True} if 5 + i in flags else {}
            ans.predict("d", 1 + i, 5.1 + i, boot=8, **extra)
        ans.error("d", 15, "stale", 5.6, boot=7)
        return score(ans, _boots(), 8.0)

    r = judge({5})  # boot 1's first answer
    assert passed(r) and r["restarts"] == r["restarts_expected"] == 1
    r = judge({0, 5})  # boot 0's first answer may say it too (the runtime knew the device)
    assert passed(r)
    r = judge(set())
    assert not passed(r) and r["restarts_missing_examples"] == [("d", 1)]
    assert "NOT ALL ANSWERED" not in verdict(r) and verdict(r).startswith(
        'verdict: NOT EXACT: 1 device reboot answered without "restart": true (e.g. d, its boot 1'
    )
    r = judge({5, 6})  # and again on boot 1's second answer
    assert not passed(r) and r["restarts_spurious_examples"] == [("d", 1, 2)]
    assert '1 "restart" flag on an answer that is not its boot\'s first (e.g. d seq 2)' in (
        verdict(r)
    )
    r = judge({2, 5})  # in the middle of boot 0
    assert not passed(r) and r["restarts_spurious_examples"] == [("d", 0, 12)]


def test_a_gap_that_is_not_what_was_skipped_fails_the_run():
    """A prediction's ``gap`` (how many samples of the stream it skipped) was read only to
    excuse the broker's losses: a runtime that left it out after a lost sample, or said one
    where nothing was skipped, passed."""
    from firmware_sim.scorer import score
    from firmware_sim.verdict import passed, verdict

    log = [_sent("d", 10 + i, float(i)) for i in range(5)]
    log[2].published = None  # seq 12 never left the device (dropped)

    def judge(gaps, answered=(10, 11, 13, 14)):
        ans = _Answers()
        for seq in answered:
            ans.predict("d", seq, seq + 0.1, **({"gap": gaps[seq]} if seq in gaps else {}))
        return score(ans, log, 5.0)

    r = judge({})
    assert not passed(r) and r["gaps_wrong_examples"] == [(("d", 0, 13), 0, 1)]
    assert verdict(r).startswith(
        "verdict: NOT EXACT: 1 answer with a wrong gap (e.g. d seq 13: gap 0, 1 skipped)"
    )
    r = judge({11: 3, 13: 1})
    assert not passed(r) and r["gaps_wrong_examples"] == [(("d", 0, 11), 3, 0)]
    r = judge({13: 1})
    assert passed(r) and r["gaps_wrong"] == 0
    r = judge({13: 1}, answered=(10, 13, 14))  # 11's answer lost: missing, not a gap
    assert r["predictions_missing"] == 1 and r["gaps_wrong"] == 0


def test_a_verdict_over_part_of_the_run_says_how_many_samples_it_left_out():
    """Samples after a reboot the runtime could not tell (no boot ids, no --restart-gap) are
    left out of the judgement: the verdict said EXACT over the rest without a word of them."""
    from firmware_sim.scorer import score
    from firmware_sim.verdict import verdict

    log = [m for m in _boots(boot_ids=False) if m.seq != 15]
    ans = _Answers()
    for i in range(5):
        ans.predict("d", 10 + i, i + 0.1)
    r = score(ans, log, 8.0)
    r["wrong_predictions"] = 0  # as an offline reference would have it
    assert r["excluded_samples"] == 3
    assert verdict(r).startswith("verdict: EXACT: all 5 predictions equal the offline run;")
    assert verdict(r).endswith(
        "3 samples not judged (devices rebooted without boot ids and the runtime could not "
        "tell: see excluded reasons)"
    )


def test_run_fails_on_wrong_predictions_judged_in_the_runtimes_own_kernel_set():
    """``run`` exited 0 with 'NOT EXACT: 3 of 1,000 predictions differ from the offline run'
    when that run was in the runtime's own kernel set (where a difference is the runtime's);
    only a run judged in another set (``--kernels``) differs by its kernels alone."""
    from firmware_sim.verdict import passed

    r = {"predictions_received": 1000, "predictions_missing": 0, "messages_not_delivered": 0}
    r |= {"wrong_predictions": 3, "samples_delivered_valid": 1000}
    own = {**r, "runtime_kernels": "litert-xnnpack", "offline_kernels": "litert-xnnpack"}
    assert not passed(own)
    assert passed({**own, "wrong_predictions": 0})
    assert passed({**own, "offline_kernels": "tflite-2.14-builtin-x86_64"})  # --kernels
    assert passed({**own, "runtime_kernels": "not reported"})  # an older runtime: unknown


def test_an_invalid_message_answered_with_no_error_fails_the_run():
    """The errors a run's invalid messages (NaN, garbage) are due were counted
    (``errors expected at least``) and never compared: a runtime that refused them without a
    word, so the device never learns its sample was dropped, passed."""
    from firmware_sim.scorer import score
    from firmware_sim.verdict import passed, verdict

    log = [_sent("d", 1, 0.0), _sent("d", 2, 1.0, faults=["nan"]), _sent("d", 3, 2.0)]
    log += [_sent("d", 4, 3.0, faults=["garbage"]), _sent("e", 1, 0.0)]
    ans = _Answers()
    for stream, seq in (("d", 1), ("d", 3), ("e", 1)):
        ans.predict(stream, seq, seq + 0.1, **({"gap": 1} if seq == 3 else {}))
    ans.error("d", 2, "duplicate", 2.1)  # about a valid sample: no refusal
    r = score(ans, log, 4.0)
    assert not passed(r) and verdict(r).startswith(
        "verdict: NOT EXACT: 2 invalid messages (NaN, garbage, wrong feature count) answered "
        "with no error (on d)"
    )
    assert r["invalid_unanswered"] == 2 and r["invalid_unanswered_examples"] == ["d"]
    ans.error("d", 2, "not_finite", 2.2)
    ans.errors.append(("d", {"seq": None, "error": "bad_payload", "detail": ""}, 3.1))
    r = score(ans, log, 4.0)
    assert r["invalid_unanswered"] == 0 and passed(r), verdict(r)


def test_an_internal_error_fails_the_run():
    """An ``internal`` error is an exception in the runtime; a run with one, for a sample that
    was predicted anyway or for a refused one, was judged as passing."""
    from firmware_sim.scorer import score
    from firmware_sim.verdict import passed, verdict

    log = [_sent("d", 1, 0.0), _sent("d", 2, 1.0)]
    ans = _Answers()
    for seq in (1, 2):
        ans.predict("d", seq, seq + 0.1)
    assert passed(score(ans, log, 2.0))
    ans.error("d", 2, "internal", 2.2, id="4f2a")
    r = score(ans, log, 2.0)
    assert not passed(r) and verdict(r).startswith(
        "verdict: NOT EXACT: 1 answer 'internal' (an exception in the runtime"
    )

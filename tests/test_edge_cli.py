"""``edge-lstm``: inspect, and the refusals of ``serve`` before it touches the network."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from edge.cli import main
from tests.mqtt_helpers import ROOT


def test_inspect_human_and_json(bundles, capsys):
    assert main(["inspect", str(bundles / "clf-int8")]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "32 bytes per stream" in out and "self-test" in out
    last_y = out.split("last y = [", 1)[1].split("]", 1)[0].split(", ")
    assert all(len(v.split(".")[1]) <= 4 for v in last_y), last_y  # rounded as it says
    assert main(["inspect", str(bundles / "clf-int8"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["probe_y"]) == 64 and info["manifest"]["quantization"] == "int8"


@pytest.mark.parametrize("content", [b"", b"x" * 9000], ids=["empty", "text"])
def test_inspect_of_a_model_that_is_no_tflite_names_the_file(bundles, tmp_path, capsys, content):
    """A model.tflite that is no TFLite model, with a manifest whose sha256 was made for it,
    was refused in the interpreter's words, naming no file: "`model_path` or `model_content`
    must be specified" for an empty one, a 'utf-8' codec error or std::bad_alloc."""
    import hashlib
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles / "clf-int8", b)
    (b / "model.tflite").write_bytes(content)
    d = json.loads((b / "manifest.json").read_text())
    d["tflite_sha256"] = hashlib.sha256(content).hexdigest()
    (b / "manifest.json").write_text(json.dumps(d))
    assert main(["inspect", str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{b / 'model.tflite'}: not a TFLite model (" in err[0], err


def test_inspect_of_a_missing_bundle_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a bundle directory" in err[0]


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(fidelity="x"), "field 'fidelity' has the wrong type ('x')"),
        (lambda d: d.update(interpreters=[1, 2]), "field 'interpreters' has the wrong type"),
        (lambda d: d["fidelity"].update(parity=[1]), None),
        (lambda d: d["fidelity"]["parity"].update(max_abs_error="big"), None),
    ],
)
def test_inspect_of_a_hand_edited_conversion_record_is_no_traceback(
    bundles, tmp_path, capsys, edit, needle
):
    """``fidelity`` and ``interpreters`` not objects failed the manifest's parsing with a
    ValueError or TypeError; a parity figure that is no number stopped ``inspect``."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles / "clf-int8", b)
    d = json.loads((b / "manifest.json").read_text())
    edit(d)
    (b / "manifest.json").write_text(json.dumps(d))
    code = main(["inspect", str(b)])
    out, err = capsys.readouterr()
    if needle:
        assert code == 2 and err.count("\n") == 1 and needle in err
    else:
        assert code == 0 and "self-test" in out and "big" not in out


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


def test_serve_of_a_missing_bundle_leaves_no_state_dir_behind(tmp_path):
    """A mistyped --model was refused only after the state directory was made: each try
    left an empty ``edge-state`` in the current directory. The bundle is read first now."""
    out = subprocess.run(
        [sys.executable, "-m", "edge", "serve", "--model", str(tmp_path / "nope"),
         "--broker", "mqtt://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and "nope: not a bundle directory" in err[0], err
    assert not (tmp_path / "edge-state").exists()


def test_serve_on_a_state_dir_that_is_a_file_is_one_line(bundles, tmp_path):
    (tmp_path / "file").write_text("")
    argv = ["--model", str(bundles / "clf-int8"), "--state-dir", str(tmp_path / "file")]
    out = subprocess.run(
        [sys.executable, "-m", "edge", "serve", *argv], capture_output=True, text=True, timeout=60
    )
    err = out.stderr.splitlines()
    assert out.returncode == 2 and len(err) == 1 and "file: not a directory" in err[0], err


def test_the_interpreters_start_up_line_is_kept_off_stderr(bundles, tmp_path):
    """The interpreter writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from
    C++ as it is made: ``edge-lstm`` did not filter its stderr as the other commands do, and
    every ``inspect``, ``serve`` and ``replay`` began with it. Other lines are kept."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_LSTM_TF_LOGS", None)
    run = [sys.executable, "-m", "edge", "inspect", str(bundles / "clf-int8")]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "self-test" in out.stdout and out.stderr == "", out.stderr
    kept = subprocess.run(
        [*run, "--kernel-mismatch", "refuse", "--backend", "nope"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert kept.returncode == 2 and "nope" in kept.stderr, kept.stderr


def test_only_the_making_of_an_interpreter_passes_through_the_line_filter():
    """A service's stderr is not routed through a thread (its last lines before a crash would
    be lost with it): only what is written while an interpreter is made is caught, and there
    every line but the interpreter's start-up line is passed on, in order."""
    code = (
        "import os\n"
        "from edge import stderr_filter as f\n"
        "with f.interpreter_lines(): os.write(2, b'untouched\\n')\n"
        "f.catch_interpreter_lines()\n"
        "os.write(2, b'before\\n')\n"
        "with f.interpreter_lines():\n"
        "    os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
        "    os.write(2, b'kept\\n')\n"
        "    assert os.fstat(2).st_nlink == 0  # a file of its own, not the terminal or a pipe\n"
        "os.write(2, b'after\\n')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_LSTM_TF_LOGS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stderr == b"untouched\nbefore\nkept\nafter\n", out.stderr


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "edge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout and "serve" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "edge", "serve", "--help"], capture_output=True, text=True
    )
    for key in ("--reorder-ms", "--durability", "--tls-ca", "EDGE_LSTM_MAX_BATCH", "--overload"):
        assert key in out.stdout
    # a key with a fixed set of values shows them
    for key in ("--protocol {5,3.1.1}", "--log-level {debug,info,warning,error}"):
        assert key in out.stdout, key


def _damaged(path, how):
    """An .npz cut in half, or with its array's header garbled."""
    np.savez(path, a=np.zeros((20, 30, 6), np.float32))
    raw = bytearray(path.read_bytes())
    if how == "cut":
        raw = raw[: len(raw) // 2]
    else:
        raw[100:400] = bytes(b ^ 0x55 for b in raw[100:400])
    path.write_bytes(bytes(raw))


def test_help_uses_the_names_its_text_uses_and_states_the_defaults(capsys):
    from edge.cli import main
    from edge.worker_cli import WORKER_KEYS

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    assert "[--json] DIR" in help_of("inspect")  # its description: "Load DIR ..."
    replay = help_of("replay")  # its description: "every [N, T, F] array of IN.npz through DIR"
    assert "--input IN.npz" in replay and "--out OUT.npz" in replay and "DIR" in replay
    assert "default mqtt://127.0.0.1:1883" in help_of("top")
    worker = help_of("worker")
    assert all(key in worker for key in WORKER_KEYS), worker


def test_serve_help_states_one_default_per_key(capsys):
    """--client-id's help said `(default: edge-lstm-HOSTNAME) [default: '']`, --runtime-id
    `(default: the client id) [default: '']` and --model `(required) [default: '']`: two
    answers, one of them wrong. A key whose help says its default (or that it is required)
    shows only its environment variable."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: edge-lstm-HOSTNAME) [env EDGE_LSTM_CLIENT_ID]" in text, text
    assert "(default: the client id) [env EDGE_LSTM_RUNTIME_ID]" in text, text
    assert "lstm-convert (required) [env EDGE_LSTM_MODEL]" in text, text
    assert "[default: 'sensors/{stream}/data'; env EDGE_LSTM_DATA_TOPIC]" in text, text


def test_top_help_names_every_broker_form_it_takes(capsys):
    """``top --broker`` takes a unix socket as ``serve`` does, but its help named only
    mqtt:// and mqtts://: a user of a gateway's socket read that top could not reach it."""
    with pytest.raises(SystemExit):
        main(["top", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mqtt://HOST:PORT, mqtts://HOST:PORT or unix:///PATH" in text, text


@pytest.mark.parametrize(
    "name, make, out, needle",
    [
        ("t0.npz", lambda p: np.savez(p, a=np.zeros((2, 0, 6))), "o.npz", "N, T >= 1"),
        ("str.npz", lambda p: np.savez(p, a=np.full((2, 5, 6), "x")), "o.npz", "dtype <U1"),
        ("cx.npz", lambda p: np.savez(p, a=np.zeros((2, 5, 6), complex)), "o.npz", "complex"),
        ("nan.npz", lambda p: np.savez(p, a=np.full((2, 5, 6), np.nan)), "o.npz", "NaN"),
        ("one.npy", lambda p: np.save(p, np.zeros((2, 5, 6))), "o.npz", "one array (.npy)"),
        (
            "two.npz",
            lambda p: np.savez(p, good=np.zeros((2, 5, 6)), bad=np.zeros((2, 5, 4))),
            "o.npz",
            "array 'bad': replay input has shape [2, 5, 4]",
        ),
        ("none.npz", lambda p: np.savez(p), "o.npz", "holds no arrays to replay"),
        (  # an object array (never unpickled) was not named among several
            "obj.npz",
            lambda p: np.savez(p, good=np.zeros((2, 5, 6)), bad=np.array([[1, "a"]], object)),
            "o.npz",
            "arrays: array 'bad': Object arrays cannot be loaded",
        ),
        # damaged archives: they ended in zipfile's and tokenize's tracebacks
        ("cut.npz", lambda p: _damaged(p, "cut"), "o.npz", "not a readable .npz"),
        ("garbled.npz", lambda p: _damaged(p, "garbled"), "o.npz", "not a readable .npz"),
        ("ok.npz", lambda p: np.savez(p, a=np.zeros((2, 5, 6))), "missing/o.npz", "--out"),
        ("ok.npz", lambda p: np.savez(p, a=np.zeros((2, 5, 6))), ".", "--out"),
    ],
)
def test_replay_refuses_bad_inputs_in_one_line(bundles, tmp_path, capsys, name, make, out, needle):
    make(tmp_path / name)
    args = ["replay", str(bundles / "clf-int8"), "--input", str(tmp_path / name)]
    assert main([*args, "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.glob("*.tmp.npz"))  # nothing half written


@pytest.mark.parametrize("flag", ["--input", "--out"])
def test_replay_of_an_empty_path_names_the_option(bundles, tmp_path, capsys, flag):
    """An empty ``--out`` (an unset shell variable) was refused as "--out . is a directory"."""
    np.savez(tmp_path / "in.npz", a=np.zeros((1, 2, 6)))
    paths = {"--input": str(tmp_path / "in.npz"), "--out": str(tmp_path / "o.npz"), flag: ""}
    args = ["replay", str(bundles / "clf-int8"), *(x for kv in paths.items() for x in kv)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} is empty" in err[0], err


@pytest.mark.parametrize("flag", ["--input", "--out"])
def test_replay_of_a_dash_refuses_it_rather_than_writing_a_file_named_dash(
    bundles, tmp_path, capsys, flag, monkeypatch
):
    """``--out -`` wrote a file called ``-`` into the working directory, where a user looked
    for the arrays on standard output (which carries the summary)."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "in.npz", a=np.zeros((1, 2, 6)))
    paths = {"--input": "in.npz", "--out": "o.npz", flag: "-"}
    args = ["replay", str(bundles / "clf-int8"), *(x for kv in paths.items() for x in kv)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} -: " in err[0] and "./-" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_replay_refuses_a_value_the_normalised_float_input_cannot_hold(bundles, tmp_path, capsys):
    """It was replayed into inf in the model's input and NaN raw outputs, as if computed."""
    np.savez(tmp_path / "in.npz", a=np.full((1, 2, 3), 3e38))
    args = ["replay", str(bundles / "cnn-gru-float32"), "--input", str(tmp_path / "in.npz")]
    assert main([*args, "--out", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "past what the model's float32 input holds" in err[0], err
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("given", ["csv", "pickle", "empty"])
def test_replay_of_an_input_that_is_no_npz_says_so_and_never_to_allow_pickles(
    bundles, tmp_path, capsys, given
):
    """A CSV file or a pickle given as IN.npz was said to hold "pickled (object) data", with
    NumPy's advice to load it with allow_pickle (no option does, and none should)."""
    import pickle

    path = tmp_path / "in.npz"
    if given == "csv":
        path.write_text("t,a,b\n0,0.1,0.2\n")
    elif given == "pickle":
        path.write_bytes(pickle.dumps({"a": np.zeros((1, 2, 6))}))
    else:
        path.write_bytes(b"")
    args = ["replay", str(bundles / "clf-int8"), "--input", str(path)]
    assert main([*args, "--out", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    why = "the file is empty" if given == "empty" else "not a NumPy .npz archive"
    assert len(err) == 1 and f"{path}: not a readable .npz of [N, T, F] arrays: {why}" in err[0]
    assert "pickle" not in err[0].replace("or a pickle is not read", ""), err
    assert not (tmp_path / "o.npz").exists()


def test_replay_of_an_input_that_is_no_regular_file_says_what_it_is(bundles, tmp_path):
    """`--input` naming a FIFO (a pipe nobody writes to, a mistyped path in a directory of
    them) waited in its open for a writer for ever; a directory was "[Errno 21] Is a
    directory". An .npz is read by seeking, which neither a FIFO nor a device does."""
    os.mkfifo(tmp_path / "fifo.npz")
    (tmp_path / "dir.npz").mkdir()
    for name, kind in (("fifo.npz", "a FIFO"), ("dir.npz", "a directory")):
        r = subprocess.run(
            [sys.executable, "-m", "edge", "replay", str(bundles / "clf-int8"),
             "--input", str(tmp_path / name), "--out", str(tmp_path / "o.npz")],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, r.stderr
        assert f"{tmp_path / name}: not a readable .npz of [N, T, F] arrays: it is {kind}" in err[0]
    assert not (tmp_path / "o.npz").exists()


def special_files(d):
    """name -> (maker, what the refusal calls it): files a rename must never replace."""

    def device(p):
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the device /dev/null is

    def fifo_via_link(p):
        os.mkfifo(d / "fifo")
        p.symlink_to(d / "fifo")

    return {
        "fifo": (os.mkfifo, "is a FIFO"),
        "dir": (os.mkdir, "is a directory"),
        "link-to-fifo": (fifo_via_link, "is a FIFO (where the link leads"),
        "device": (device, "is a character device"),
    }


@pytest.mark.parametrize("kind", ["fifo", "dir", "link-to-fifo", "device"])
def test_replay_never_replaces_what_is_not_a_regular_file(bundles, tmp_path, capsys, kind):
    np.savez(tmp_path / "in.npz", a=np.zeros((2, 5, 6)))
    out = tmp_path / "out" / "o.npz"
    out.parent.mkdir()
    make, needle = special_files(out.parent)[kind]
    try:
        make(out)
    except PermissionError:
        pytest.skip("creating a device node needs root")
    before = out.lstat()
    args = ["replay", str(bundles / "clf-int8"), "--input", str(tmp_path / "in.npz")]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out} {needle}" in err[0], err
    after = out.lstat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert {p.name for p in out.parent.iterdir()} <= {"fifo", "o.npz"}  # no temp file left


SIGTERM_WHILE_WRITING = """
import signal, sys
import numpy as np
from edge import cli

def savez(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)  # while the temporary file beside OUT is written

np.savez = savez
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["replay", "deploy-kit"])
def test_sigterm_while_writing_leaves_no_temporary_file(bundles, tmp_path, command):
    """SIGTERM (a timeout, systemd, a CI job cancelled) killed the command outright while it
    wrote its temporary file beside OUT.npz (or the kit's beside each of its files): the
    hidden, half-written file stayed for good. It ends as Ctrl-C does: exit 130, nothing left."""
    import os
    from pathlib import Path

    np.savez(tmp_path / "in.npz", a=np.zeros((2, 5, 6)))
    out = tmp_path / "out"
    out.mkdir()
    argv = {
        "replay": ["replay", str(bundles / "clf-int8"), "--input", str(tmp_path / "in.npz")],
        "deploy-kit": ["deploy-kit", str(out)],
    }[command]
    if command == "replay":
        argv += ["--out", str(out / "o.npz")]
        script = SIGTERM_WHILE_WRITING
    else:  # the kit is copied, not saved by NumPy: the signal comes while a file is written
        script = SIGTERM_WHILE_WRITING.replace(
            "np.savez = savez", "import os\nos.fdopen = lambda *a, **k: savez()"
        )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "edge-lstm: interrupted"
    assert list(out.iterdir()) == []


def test_replay_through_a_link_replaces_its_file_and_keeps_the_link(bundles, tmp_path):
    np.savez(tmp_path / "in.npz", a=np.zeros((2, 5, 6)))
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "o.npz"
    target.write_text("keep")
    target.chmod(0o640)
    link = tmp_path / "o.npz"
    link.symlink_to(target)
    args = ["replay", str(bundles / "clf-int8"), "--input", str(tmp_path / "in.npz")]
    assert main([*args, "--out", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target
    with np.load(target) as z:
        assert z["a/y"].shape[:2] == (2, 5) and "kernels" in json.loads(str(z["info"]))
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "o.npz", "real"]
    assert [p.name for p in target.parent.iterdir()] == ["o.npz"]

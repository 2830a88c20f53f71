"""``lstm-convert``: every bad input is exit 2 with one line naming it, and nothing is written."""

import numpy as np
import pytest

from convert.quantize import AUTO_ORDER

pytestmark = pytest.mark.desktop


@pytest.fixture
def src(bundles):
    return bundles / "src" / "clf"


def run(capsys, *argv):
    from convert.cli import main

    code = main(list(argv))
    return code, capsys.readouterr()


def convert(capsys, model, calib, out, *extra):
    return run(capsys, "convert", str(model), "--calib", str(calib), "--out", str(out), *extra)


def convert_with_data(capsys, src, tmp_path, data):
    """The example model converted into ``tmp_path/out``, held-out data from ``data``."""
    model, calib = src / "model.keras", src / "model.calib.npy"
    return convert(capsys, model, calib, str(tmp_path / "out"), "--data", str(data))


def assert_refused(code, out, needle, tmp_path):
    lines = [line for line in out.err.strip().splitlines() if line.startswith("lstm-convert")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], out.err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_model(capsys, tmp_path, src):
    code, out = convert(
        capsys,
        tmp_path / "nope.keras",
        src / "model.calib.npy",
        str(tmp_path / "out"),
    )
    assert_refused(code, out, "nope.keras: model file not found", tmp_path)


def test_unreadable_model(capsys, tmp_path, src):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    code, out = convert(
        capsys,
        bad,
        src / "model.calib.npy",
        str(tmp_path / "out"),
    )
    assert_refused(code, out, "Keras cannot read this model", tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04cut short"])
def test_a_keras_file_that_is_no_zip_archive_is_not_said_to_be_missing(
    capsys, tmp_path, src, content
):
    """Keras answered "File not found" of a .keras file that is there but is no zip archive
    (empty, cut short, another format renamed): the line now says what is wrong with it."""
    bad = tmp_path / "bad.keras"
    bad.write_bytes(content)
    code, out = convert(capsys, bad, src / "model.calib.npy", str(tmp_path / "out"))
    assert_refused(code, out, f"{bad}: Keras cannot read this model: it is not a zip", tmp_path)
    assert "not found" not in out.err


def one_value(value, index):
    """Zero sequences but for one value, finite in float32: a sensor glitch."""
    x = np.zeros((2, 10, 6), np.float32)
    x[index] = value
    return x


@pytest.mark.parametrize(
    "array, needle",
    [
        (np.zeros((10, 6), np.float32), "shape [10, 6], expected [N, T, 6]"),
        (np.zeros((2, 10, 5), np.float32), "expected [N, T, 6]"),
        (np.zeros((2, 10, 6), np.int32), "dtype int32"),
        (np.full((2, 10, 6), np.nan, np.float32), "NaN or Inf (first at index [0, 0, 0])"),
        (
            one_value(1e36, (0, 4, 3)),
            "largest magnitude 1e+36 (at index [0, 4, 3]) is beyond 1e+30",
        ),
        (np.full((2, 10, 6), -3e38, np.float32), "largest magnitude 3e+38 (at index [0, 0, 0])"),
        (np.full((2, 10, 6), 1e300), "largest magnitude 1e+300 (at index [0, 0, 0])"),
    ],
)
def test_bad_calibration_data(capsys, tmp_path, src, array, needle):
    calib = tmp_path / "calib.npy"
    np.save(calib, array)
    code, out = convert(
        capsys,
        src / "model.keras",
        calib,
        str(tmp_path / "out"),
    )
    assert_refused(code, out, needle, tmp_path)


def test_held_out_data_beyond_the_input_bound_is_refused_before_converting(capsys, tmp_path, src):
    data = tmp_path / "data.npz"
    x = np.zeros((3, 10, 6), np.float32)
    x[2, 9, 5] = -1e31
    np.savez(data, x=x)
    code, out = convert_with_data(capsys, src, tmp_path, data)
    assert_refused(code, out, "--data", tmp_path)
    assert "largest magnitude 1e+31 (at index [2, 9, 5]) is beyond 1e+30" in out.err


@pytest.mark.parametrize(
    "name, arrays, needle",
    [
        ("calib.npz", {"data": np.zeros((2, 3, 6), np.float32)}, "calib.npz: no array named 'x'"),
        (
            "calib.npz",
            {"x": np.array([[1, "a"]], object)},
            "calib.npz: cannot read: array 'x': Object",
        ),
        ("calib.npy", {"x": np.array([[1, "a"]], object)}, "calib.npy: cannot read: Object"),
    ],
)
def test_calibration_file_that_holds_no_float_x(capsys, tmp_path, src, name, arrays, needle):
    calib = tmp_path / name
    if name.endswith(".npz"):
        np.savez(calib, **arrays)
    else:
        np.save(calib, arrays["x"], allow_pickle=True)
    code, out = convert(capsys, src / "model.keras", calib, str(tmp_path / "out"))
    assert_refused(code, out, needle, tmp_path)


@pytest.mark.parametrize("given", ["csv", "pickle", "npz"])
def test_a_calibration_file_of_another_format_is_refused_saying_what_it_is(
    capsys, tmp_path, src, given
):
    """A CSV file (or a pickle) given as --calib was said to hold "pickled (object) data", with
    NumPy's advice to load it with allow_pickle (no option does); an .npz archive named .npy
    was refused for its "dtype <U1"."""
    import pickle

    calib = tmp_path / "calib.npy"
    x = np.zeros((2, 10, 6), np.float32)
    if given == "csv":
        calib.write_text("0.1,0.2,0.3,0.4,0.5,0.6\n" * 10)
    elif given == "pickle":
        calib.write_bytes(pickle.dumps(x))
    else:
        with calib.open("wb") as f:
            np.savez(f, x=x)
    code, out = convert(capsys, src / "model.keras", calib, str(tmp_path / "out"))
    if given == "npz":
        needle = "calib.npy: cannot read: an .npz archive of named arrays (['x']), not one array"
    else:
        needle = "calib.npy: cannot read: not a NumPy array file (.npy, as numpy.save writes it)"
    assert_refused(code, out, needle, tmp_path)
    assert "allow_pickle" not in out.err and "dtype" not in out.err


@pytest.mark.parametrize("given", ["csv", "pickle"])
def test_an_npz_of_another_format_is_refused_saying_what_it_is(capsys, tmp_path, src, given):
    """A CSV file or a pickle named .npz (--data, or --calib) was said to hold "pickled
    (object) data", with NumPy's advice to load it with allow_pickle (no option does)."""
    import pickle

    data = tmp_path / "data.npz"
    if given == "csv":
        data.write_text("0.1,0.2,0.3,0.4,0.5,0.6\n" * 10)
    else:
        data.write_bytes(pickle.dumps({"x": np.zeros((2, 10, 6), np.float32)}))
    code, out = convert_with_data(capsys, src, tmp_path, data)
    needle = "data.npz: cannot read: not a NumPy .npz archive (as numpy.savez writes it)"
    assert_refused(code, out, needle, tmp_path)
    assert "allow_pickle" not in out.err and "pickled" not in out.err


def test_labels_that_cannot_be_read_are_named_and_never_stop_calibration(capsys, tmp_path, src):
    """An .npz whose labels 'y' are an object array (a list of lists of unequal length) was
    refused as --calib, whose labels calibration never reads, and as --data the line did not
    say which array it could not read."""
    x = np.load(src / "model.calib.npy")[:4]
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=np.array([[0], [1, 2], [3], []], object))
    code, out = convert(capsys, src / "model.keras", data, tmp_path / "out", "--quant", "float32")
    assert code in (0, 1), out.err
    (tmp_path / "bundle").mkdir()
    (tmp_path / "out").rename(tmp_path / "bundle" / "out")
    code, out = convert_with_data(capsys, src, tmp_path, data)
    assert_refused(code, out, "data.npz: cannot read: array 'y': Object arrays", tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbled member", "bad deflate stream"])
def test_a_damaged_npz_calibration_file_is_refused_naming_it(capsys, tmp_path, src, damage):
    """A truncated or damaged .npz (a zip archive) ended in a traceback of zipfile, zlib or
    tokenize (a garbled array header)."""
    good = tmp_path / "good.npz"
    x = np.random.default_rng(0).normal(0, 1, (20, 30, 6)).astype(np.float32)
    (np.savez if damage == "garbled member" else np.savez_compressed)(good, x=x)
    raw = bytearray(good.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # inside the member's data, past its local header
        raw[100:400] = bytes(b ^ 0x55 for b in raw[100:400])
    calib = tmp_path / "calib.npz"
    calib.write_bytes(bytes(raw))
    code, out = convert(capsys, src / "model.keras", calib, str(tmp_path / "out"))
    assert_refused(code, out, "calib.npz: cannot read: ", tmp_path)


@pytest.mark.parametrize("given", ["directory", "saved_model.pb"])
def test_a_savedmodel_is_refused_saying_what_to_convert(capsys, tmp_path, src, given):
    """It was refused as 'a directory, not a file to read', or as not a .keras file."""
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "saved_model.pb").write_bytes(b"")
    model = tmp_path / "exported" / ("" if given == "directory" else "saved_model.pb")
    code, out = convert(capsys, model, src / "model.calib.npy", str(tmp_path / "out"))
    assert_refused(code, out, "a TensorFlow SavedModel", tmp_path)
    assert "model.save('model.keras')" in out.err


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("custom", ["layer", "activation"])
def test_a_custom_layer_or_activation_is_refused_naming_it(capsys, tmp_path, src, custom, suffix):
    """Keras' first line about a model holding a custom object was all that was said: "<class
    'keras.src.models.functional.Functional'> could not be deserialized properly. Please ensure
    ..." (.keras), naming neither the object nor the layer."""
    import keras

    class Doubled(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    def doubled(x):
        return x * 2.0

    inp = keras.Input((None, 6))
    z = keras.layers.LSTM(4, return_sequences=True)(inp)
    if custom == "layer":
        z, needle = Doubled(name="twice")(z), "the model uses the "
    else:
        z = keras.layers.Dense(2, activation=doubled, name="head")(z)
        needle = "the model uses the function 'doubled' (of layer 'head' (Dense)), which is not "
    model = tmp_path / f"m{suffix}"
    keras.Model(inp, z).save(model)
    code, out = convert(capsys, model, src / "model.calib.npy", str(tmp_path / "out"))
    assert_refused(code, out, needle, tmp_path)
    assert "'Doubled', which is not one of Keras' own" in out.err or custom != "layer"
    assert "could not be deserialized" not in out.err


def keras2_h5(path, time_major=False, both_ways=False):
    """A legacy .h5 as tf.keras 2 writes it: every recurrent layer's config holds
    ``time_major``, the input layer's ``batch_input_shape``."""
    import json

    import h5py
    import keras

    inp = keras.Input((None, 6))
    z = keras.layers.LSTM(8, return_sequences=True, name="lstm")
    z = keras.layers.Bidirectional(z, name="both_ways")(inp) if both_ways else z(inp)
    z = keras.layers.GRU(4, return_sequences=True, name="gru")(z)
    keras.Model(inp, keras.layers.Dense(2)(z)).save(path)

    def as_keras2(config):
        if isinstance(config, list):
            return [as_keras2(c) for c in config]
        if not isinstance(config, dict):
            return config
        c = config.get("config")
        if config.get("class_name") == "InputLayer":
            c["batch_input_shape"] = c.pop("batch_shape")
        if config.get("class_name") in ("LSTM", "GRU"):
            c["time_major"] = time_major and config["class_name"] == "GRU"
        return {k: as_keras2(v) for k, v in config.items()}

    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = json.dumps(as_keras2(json.loads(f.attrs["model_config"])))
        f.attrs["keras_version"] = "2.15.0"


def test_a_keras2_h5_model_with_recurrent_layers_converts(capsys, tmp_path, src):
    """tf.keras 2 writes time_major=False into every recurrent layer's config, a keyword
    Keras 3 has not: every such .h5 was refused with "Keras cannot read this model:
    Unrecognized keyword arguments passed to LSTM: {'time_major': False}"."""
    keras2_h5(tmp_path / "m.h5")
    code, out = convert(
        capsys, tmp_path / "m.h5", src / "model.calib.npy", tmp_path / "out", "--quant", "float32"
    )
    assert code == 0, out.err
    assert (tmp_path / "out" / "model.tflite").is_file()


def test_options_that_change_nothing_for_the_model_or_mode_are_said(capsys, tmp_path, src):
    """``--normalization graph`` on a model without a Normalization layer, and
    ``--per-channel`` in a float mode, were ignored without a word."""
    keras2_h5(tmp_path / "m.h5")
    code, out = convert(
        capsys,
        tmp_path / "m.h5",
        src / "model.calib.npy",
        tmp_path / "out",
        *("--quant", "float32", "--normalization", "graph", "--per-channel"),
    )
    assert code == 0, out.err
    assert "--normalization graph changes nothing: the model has no leading" in out.err
    assert "--per-channel changes nothing in float32" in out.err


def test_a_keras2_h5_model_reading_time_first_is_refused_naming_the_layer(capsys, tmp_path, src):
    keras2_h5(tmp_path / "m.h5", time_major=True)
    code, out = convert(capsys, tmp_path / "m.h5", src / "model.calib.npy", tmp_path / "out")
    assert_refused(code, out, "layer 'gru' was saved with time_major=True (Keras 2)", tmp_path)


def test_a_keras2_h5_model_reading_both_ways_is_refused_as_bidirectional(capsys, tmp_path, src):
    """Keras builds a Bidirectional's layers without the custom objects: it was refused with
    Keras' "Unrecognized keyword arguments passed to LSTM: {'time_major': False}"."""
    keras2_h5(tmp_path / "m.h5", both_ways=True)
    code, out = convert(capsys, tmp_path / "m.h5", src / "model.calib.npy", tmp_path / "out")
    assert_refused(code, out, "layer 'both_ways' (Bidirectional) cannot be streamed", tmp_path)


def test_a_model_keras_cannot_read_says_which_keras_saved_it(capsys, tmp_path, src):
    """A model saved by a newer Keras, with a keyword this one has not, was refused with
    Keras' "Unrecognized keyword arguments passed to LSTM: ..." alone, which did not say that
    the two versions differ."""
    import json
    import zipfile

    import keras

    inp = keras.Input((None, 6))
    keras.Model(inp, keras.layers.LSTM(4, return_sequences=True)(inp)).save(tmp_path / "a.keras")
    saved = zipfile.ZipFile(tmp_path / "a.keras")
    with saved as a, zipfile.ZipFile(tmp_path / "m.keras", "w") as m:
        for name in a.namelist():
            data = json.loads(a.read(name)) if name.endswith(".json") else a.read(name)
            if name == "metadata.json":
                data["keras_version"] = "3.99.0"
            if name == "config.json":
                data["config"]["layers"][-1]["config"]["new_keyword"] = True
            m.writestr(name, json.dumps(data) if name.endswith(".json") else data)
    code, out = convert(capsys, tmp_path / "m.keras", src / "model.calib.npy", tmp_path / "out")
    needle = f"(the model was saved by Keras 3.99.0, this is Keras {keras.__version__})"
    assert_refused(code, out, "{'new_keyword': True} " + needle, tmp_path)


def test_unsupported_layer(capsys, tmp_path, src):
    import keras

    inp = keras.Input((None, 6))
    bi = keras.layers.Bidirectional(keras.layers.GRU(4), name="both_ways")
    keras.Model(inp, bi(inp)).save(tmp_path / "bi.keras")
    code, out = convert(
        capsys,
        tmp_path / "bi.keras",
        src / "model.calib.npy",
        str(tmp_path / "out"),
    )
    assert_refused(code, out, "layer 'both_ways' (Bidirectional) cannot be streamed", tmp_path)


def test_unwritable_output(capsys, tmp_path, src):
    (tmp_path / "file").write_text("x")
    code, out = convert(
        capsys,
        src / "model.keras",
        src / "model.calib.npy",
        str(tmp_path / "file" / "b"),
    )
    assert code == 2 and "cannot write the output directory" in out.err


def test_refuses_to_overwrite_a_non_bundle_directory(capsys, tmp_path, src):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    code, out = convert(
        capsys,
        src / "model.keras",
        src / "model.calib.npy",
        str(tmp_path / "out"),
    )
    assert code == 2 and "not empty and not a bundle" in out.err
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_a_directory_with_a_foreign_manifest_json_is_not_replaced(capsys, tmp_path, src):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "manifest.json").write_text('{"name": "my-web-app", "start_url": "/"}')
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "data.csv").write_text("a,b")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, out_ = convert(capsys, src / "model.keras", src / "model.calib.npy", str(out))
    lines = [line for line in out_.err.strip().splitlines() if line.startswith("lstm-convert")]
    assert code == 2 and len(lines) == 1, out_.err
    assert "not a bundle (manifest.json has format None, not 'edge-lstm-bundle')" in lines[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_bundle_that_also_holds_other_files_is_not_replaced(capsys, tmp_path, src, bundles):
    import shutil

    from convert.bundle import staging

    out = tmp_path / "out"
    shutil.copytree(bundles / "clf-int8", out)
    (out / "expected.npz").unlink()
    (out / "notes.txt").write_text("precious")
    (out / "plots").mkdir()
    before = sorted(p.name for p in out.iterdir())
    code, out_ = convert(capsys, src / "model.keras", src / "model.calib.npy", str(out))
    lines = [line for line in out_.err.strip().splitlines() if line.startswith("lstm-convert")]
    assert code == 2 and len(lines) == 1, out_.err
    assert "a bundle, but it also holds notes.txt, plots/, which no bundle contains" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # with the user's files moved out, the bundle is replaced as before
    (out / "notes.txt").unlink()
    (out / "plots").rmdir()
    with staging(out) as tmp:
        (tmp / "model.tflite").write_bytes(b"new")
    assert [p.name for p in out.iterdir()] == ["model.tflite"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_bundle_directory_is_readable_by_others_as_mkdir_makes_it(capsys, tmp_path, src):
    """The bundle directory was the staging directory mkdtemp made, mode 0700 whatever the
    umask: copied to a device (scp, rsync -a, cp -a keep the mode), the service's own user
    (deploy/edge-lstm.service: User=edge-lstm) could not read the bundle. It gets what mkdir
    gives; a bundle it replaces keeps the earlier one's mode."""
    import os
    import stat

    from convert.bundle import staging

    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        code, said = convert(
            capsys, src / "model.keras", src / "model.calib.npy", out, "--quant", "float32"
        )
    finally:
        os.umask(umask)
    assert code in (0, 1), said.err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    out.chmod(0o750)
    with staging(out) as tmp:
        (tmp / "model.tflite").write_bytes(b"new")
    assert stat.S_IMODE(out.stat().st_mode) == 0o750


def test_a_full_disk_while_the_bundle_is_written_is_one_line_and_leaves_nothing(
    capsys, tmp_path, src, monkeypatch
):
    """A full disk (ENOSPC) while the bundle's files were written ended in a traceback (of
    PIL, writing report.png)."""
    import errno

    from convert import report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "plot", full)
    code, out = convert(capsys, src / "model.keras", src / "model.calib.npy", tmp_path / "out")
    needle = f"{tmp_path / 'out'}: cannot write the bundle: No space left"
    assert_refused(code, out, needle, tmp_path)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_an_interrupt_while_the_new_bundle_takes_the_old_ones_place_keeps_one_whole(
    tmp_path, bundles, monkeypatch, exchange
):
    """The old bundle was renamed aside, then the new one into place: Ctrl-C or SIGTERM
    between the two left no bundle at all (the old one hidden in .out.old, deleted by the next
    conversion, the new one deleted with the staging directory), and a kill -9 there the
    same. The two are swapped in one step where the file system can (RENAME_EXCHANGE), and an
    interrupted pair of renames puts the old bundle back."""
    import os
    import shutil

    from convert import bundle

    out = tmp_path / "out"
    shutil.copytree(bundles / "clf-int8", out)
    (out / "expected.npz").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if not exchange:  # a file system without RENAME_EXCHANGE
        monkeypatch.setattr(bundle, "exchange", lambda a, b: False, raising=False)
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with bundle.staging(out) as tmp:
            (tmp / "model.tflite").write_bytes(b"new")
    except KeyboardInterrupt:
        assert not exchange
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert exchange and calls == []
        assert [(p.name, p.read_bytes()) for p in out.iterdir()] == [("model.tflite", b"new")]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


KILLED_WHILE_STAGING = """
import os, sys
from pathlib import Path
from convert import bundle

with bundle.staging(Path(sys.argv[1])) as tmp:
    (tmp / "model.tflite").write_bytes(b"half")
    os.kill(os.getpid(), 9)
"""


def test_staging_directories_a_kill_left_behind_go_at_the_next_conversion(tmp_path):
    """A conversion killed with -9 leaves its staging directory (a partial bundle) beside
    --out, and each such kill left one more, for good. The next conversion into that --out
    removes them; one in use by another conversion, and the user's own hidden directories,
    stay."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from convert import bundle

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_STAGING, str(out)], env=env)
    assert killed.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out."), left
    (tmp_path / ".out.notes").mkdir()  # the user's own
    with bundle.staging(out) as running:
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.notes", running.name]
        with bundle.staging(out) as tmp:  # another conversion meanwhile: running stays
            (tmp / "model.tflite").write_bytes(b"new")
        assert running.is_dir()
        (running / "model.tflite").write_bytes(b"newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.notes", "out"]
    assert [(p.name, p.read_bytes()) for p in out.iterdir()] == [("model.tflite", b"newer")]


SIGTERM_DURING_CONVERT = """
import signal, sys
from convert import cli, quantize

def calibrate(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)  # inside the staging directory's block

quantize.calibrate = calibrate
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_convert_leaves_no_staging_directory(tmp_path, src):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    argv = ["convert", str(src / "model.keras"), "--calib", str(src / "model.calib.npy")]
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_CONVERT, *argv, "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "lstm-convert: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_label_count_must_match(capsys, tmp_path, src):
    code, out = convert(
        capsys,
        src / "model.keras",
        src / "model.calib.npy",
        str(tmp_path / "out"),
        "--labels",
        "a,b",
    )
    assert_refused(code, out, "--labels has 2 labels for 4 outputs", tmp_path)


def test_verify_command_reruns_the_checks(capsys, bundles, src):
    code, out = run(
        capsys,
        "verify",
        str(bundles / "clf-int16x8"),
        "--model",
        str(src / "model.keras"),
        "--data",
        str(src / "model.test.npz"),
        "--long-steps",
        "500",
    )
    assert code == 0, out.err
    assert "drift" in out.out and "tflite: passed 2.14" in out.out


def test_verify_reads_the_model_file_the_manifest_names(capsys, tmp_path, bundles, src):
    """A bundle whose manifest names its model `step.tflite` loads in `inspect` and `serve`;
    `verify` read `model.tflite` for its op audit regardless: a FileNotFoundError traceback
    without one, and the audit of another model than the one verified beside one."""
    import json
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles / "clf-int8", b)
    (b / "model.tflite").rename(b / "step.tflite")
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**manifest, "model_file": "step.tflite"}))
    argv = ["verify", str(b), "--model", str(src / "model.keras"), "--json"]
    code, out = run(capsys, *argv, "--data", str(src / "model.test.npz"), "--long-steps", "100")
    assert code in (0, 1) and "Traceback" not in out.err, out.err
    shutil.copy(bundles / "clf-float32" / "model.tflite", b / "model.tflite")  # another model
    code, out = run(capsys, *argv, "--data", str(src / "model.test.npz"), "--long-steps", "100")
    report = json.loads(out.out)
    assert report["tflite_bytes"] == (b / "step.tflite").stat().st_size
    assert "DEQUANTIZE" in report["op_audit"]["ops"]  # the int8 model's, not the float one's


def test_help_lists_every_subcommand(capsys):
    from convert.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("convert", "verify", "train-example"))


def test_quant_auto_keeps_the_smallest_mode_meeting_the_targets(capsys, tmp_path, src):
    import json

    code, out = convert(
        capsys,
        src / "model.keras",
        src / "model.calib.npy",
        str(tmp_path / "out"),
        "--data",
        str(src / "model.test.npz"),
        "--quant",
        "auto",
        "--long-steps",
        "500",
        "--min-agreement",
        "0.995",
        "--json",
    )
    report = json.loads(out.out)  # the report alone: "wrote ..." goes to stderr with --json
    assert f"wrote {tmp_path / 'out'} in " in out.err
    tried = report["auto"]["tried"]
    assert [t["mode"] for t in tried] == list(AUTO_ORDER)[: len(tried)]
    assert all(not t["passed"] and (t["failed"] or t.get("skipped")) for t in tried[:-1])
    assert report["quantization"] == report["auto"]["chosen"] == tried[-1]["mode"]
    assert code == (0 if tried[-1]["passed"] else 1)
    assert report["advice"][0].startswith("--quant auto")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["quantization"] == tried[-1]["mode"]
    assert manifest["quantization_choice"] == report["advice"][0]


def test_a_label_shape_that_fits_no_output_is_refused_before_converting(capsys, tmp_path, src):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, 10, 6), np.float32), y=np.zeros((3, 10, 7)))
    code, out = convert_with_data(capsys, src, tmp_path, data)
    assert_refused(code, out, "labels 'y' have shape [3, 10, 7]", tmp_path)


def test_train_example_never_replaces_what_is_not_a_regular_file(tmp_path):
    import os
    import re
    import stat

    from convert.errors import ConvertError
    from convert.train import train_example

    fifo = tmp_path / "m.keras"
    os.mkfifo(fifo)
    # epochs=0 is refused too: only a refusal of --out that comes first names the FIFO
    with pytest.raises(ConvertError, match=re.escape(f"--out {fifo} is a FIFO")):
        train_example(fifo, epochs=0, progress=False)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_train_example_names_a_seed_out_of_range(capsys, tmp_path, seed):
    """NumPy's seeds are 0..2**32-1: another gave a NumPy traceback after the data was read."""
    code, out = run(
        capsys, "train-example", "--out", str(tmp_path / "out" / "m.keras"), "--seed", seed
    )
    assert_refused(code, out, f"--seed {seed} must be in 0..4294967295", tmp_path)


@pytest.mark.parametrize(
    "labels, needle",
    [
        (np.array([0, 1, 9]), "label 9 is not a class of this model (0..3)"),
        (np.array([0, 1, -1]), "label -1 is not a class of this model (0..3)"),
        (np.array([0.0, 1.5, 2.0]), "must be whole class indices"),
        (np.eye(4)[[0, 1, 2]] * 2, "not one-hot (row 0 is [2.0, 0.0, 0.0, 0.0])"),
    ],
)
def test_class_labels_that_name_no_class_are_refused_before_converting(
    capsys, tmp_path, src, labels, needle
):
    """Labels of the right shape whose values name no class of the model were only refused
    by the verdict, after the conversion and its verification had run."""
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, 10, 6), np.float32), y=labels)
    code, out = convert_with_data(capsys, src, tmp_path, data)
    assert_refused(code, out, needle, tmp_path)
    assert "converting to" not in out.err


def test_verify_refuses_labels_that_name_no_class_before_verifying(capsys, tmp_path, bundles, src):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, 10, 6), np.float32), y=np.array([0, 4, 1]))
    code, out = run(
        capsys,
        "verify",
        str(bundles / "clf-int8"),
        "--model",
        str(src / "model.keras"),
        "--data",
        str(data),
    )
    assert code == 2 and "label 4 is not a class of this model (0..3)" in out.err
    assert "parity" not in out.err


@pytest.mark.parametrize("rate", ["inf", "1e400", "nan", "0", "-10"])
def test_a_sample_rate_that_is_not_a_finite_positive_number_is_refused_first(
    capsys, tmp_path, src, rate
):
    """inf (or a number beyond float's range) was refused only after the conversion, by the
    manifest's check, naming the staging directory's manifest.json."""
    code, out = convert(
        capsys,
        src / "model.keras",
        src / "model.calib.npy",
        str(tmp_path / "out"),
        "--sample-rate",
        rate,
    )
    assert_refused(code, out, "must be a finite number > 0", tmp_path)
    assert "--sample-rate" in out.err and "converting to" not in out.err


def test_a_converter_failure_is_one_line():
    """What TFLite's MLIR converter raised for a SimpleRNN -> Conv1D model in int8 (before its
    buffer shared h's range): the error, then 'note: called from' lines, all on stderr."""
    from convert.quantize import converter_failed

    text = (
        "<frozen runpy>:198:1: error: 'tfl.concatenation' op quantization parameters violate "
        "the same scale constraint: !quant.uniform<i8:f32, 0.0085:-1> vs. "
        "!quant.uniform<i8:f32, 0.0078>\n"
        "<frozen runpy>:198:1: note: called from\n"
        '<unknown>:0: note: loc(fused["PartitionedCall:", "PartitionedCall"]): called from\n'
    )
    err = str(converter_failed("int8", Exception(text)))
    assert err == (
        "the TFLite converter failed (int8): 'tfl.concatenation' op quantization parameters "
        "violate the same scale constraint: !quant.uniform<i8:f32, 0.0085:-1> vs. "
        "!quant.uniform<i8:f32, 0.0078>"
    )
    assert str(converter_failed("float16", ValueError("\nno ops\n"))).endswith("(float16): no ops")


@pytest.mark.parametrize(
    "which, kind",
    [
        ("model", "a directory"),
        ("onnx", "a directory"),
        ("calib", "a FIFO"),
        ("data", "a directory"),
    ],
)
def test_an_input_that_is_not_a_file_is_named_for_what_it_is(capsys, tmp_path, src, which, kind):
    """A directory or a FIFO given as an input was reported 'file not found'."""
    import os

    odd = (
        tmp_path / {"model": "m.keras", "onnx": "m.onnx", "calib": "c.npy", "data": "d.npz"}[which]
    )
    os.mkfifo(odd) if kind == "a FIFO" else odd.mkdir()
    model = odd if which in ("model", "onnx") else src / "model.keras"
    calib = odd if which == "calib" else src / "model.calib.npy"
    extra = ["--data", str(odd)] if which == "data" else []
    code, out = convert(capsys, model, calib, str(tmp_path / "out"), *extra)
    label = {"calib": "--calib ", "data": "--data "}.get(which, "")
    assert_refused(code, out, f"{label}{odd} is {kind}, not a file to read", tmp_path)


@pytest.mark.parametrize("name", ["seq", "boot"])
def test_a_feature_named_as_a_senml_record_of_the_runtime_is_refused(capsys, tmp_path, src, name):
    """The runtime reads a SenML record named 'seq' or 'boot' as the message's sequence number
    or boot id: a feature of that name could never arrive in SenML."""
    code, out = convert(
        capsys,
        src / "model.keras",
        src / "model.calib.npy",
        str(tmp_path / "out"),
        "--feature-names",
        f"acc_x,acc_y,{name},gyr_x,gyr_y,gyr_z",
    )
    assert_refused(code, out, f"--feature-names: {name!r} names SenML's", tmp_path)


@pytest.mark.parametrize("beside", ["m.calib.npy", "m.test.npz", "m.json"])
def test_train_example_checks_the_files_beside_the_model_before_training(tmp_path, beside):
    """MODEL.calib.npy, MODEL.test.npz and MODEL.json were written after the training as they
    came: a directory there gave a traceback, a FIFO a write that waited for a reader."""
    import os
    import re
    import stat

    from convert.errors import ConvertError
    from convert.train import train_example

    os.mkfifo(tmp_path / beside)
    # epochs=0 is refused too: only a refusal of the file that comes first names the FIFO
    with pytest.raises(ConvertError, match=re.escape(f"{tmp_path / beside} is a FIFO")):
        train_example(tmp_path / "m.keras", epochs=0, progress=False)
    assert stat.S_ISFIFO((tmp_path / beside).lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == [beside]


@pytest.mark.parametrize("command", ["convert", "verify"])
def test_a_device_python_that_is_not_there_is_refused_before_the_work(
    capsys, tmp_path, src, bundles, monkeypatch, command
):
    """EDGE_LSTM_DEVICE_PYTHON was looked at only when the bundle was verified: after the
    conversion."""
    monkeypatch.setenv("EDGE_LSTM_DEVICE_PYTHON", str(tmp_path / "no-python"))
    if command == "convert":
        code, out = convert(capsys, src / "model.keras", src / "model.calib.npy", tmp_path / "out")
    else:
        model, data = str(src / "model.keras"), str(src / "model.test.npz")
        code, out = run(
            capsys, "verify", str(bundles / "clf-int8"), "--model", model, "--data", data
        )
    assert_refused(code, out, f"EDGE_LSTM_DEVICE_PYTHON='{tmp_path / 'no-python'}'", tmp_path)
    assert "reading" not in out.err and "parity" not in out.err


@pytest.mark.parametrize(
    "says, said",
    [
        (
            "echo 'Traceback (most recent call last):' >&2\n"
            "echo '  File \"<string>\", line 1, in <module>' >&2\n"
            "echo \"ModuleNotFoundError: No module named 'tflite_runtime'\" >&2\n",
            "ModuleNotFoundError: No module named 'tflite_runtime'",
        ),
        ("", "exit code 3, nothing on stderr"),
    ],
)
def test_a_device_python_that_fails_is_one_line(capsys, tmp_path, src, monkeypatch, says, said):
    """What it wrote to stderr was the message, traceback and all, or nothing at all."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\n{says}exit 3\n")
    python.chmod(0o755)
    monkeypatch.setenv("EDGE_LSTM_DEVICE_PYTHON", str(python))
    args = ("--quant", "float32", "--long-steps", "200")
    code, out = convert(
        capsys, src / "model.keras", src / "model.calib.npy", tmp_path / "out", *args
    )
    assert_refused(code, out, f"the bundle failed to run in tflite: {said}", tmp_path)
    assert "Traceback" not in out.err


def test_labels_for_a_model_of_one_output_are_refused(capsys, tmp_path):
    """A one-output (sigmoid) model given --labels became a classifier whose top class is always
    its only one: every prediction published that label; 0/1 labels in --data were refused as
    'label 1 is not a class of this model (0..0)'."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 3))
    z = keras.layers.LSTM(4, return_sequences=True)(inp)
    keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(z)).save(tmp_path / "m.keras")
    np.save(tmp_path / "calib.npy", np.zeros((2, 10, 3), np.float32))
    code, out = convert(
        capsys, tmp_path / "m.keras", tmp_path / "calib.npy", tmp_path / "out", "--labels", "motion"
    )
    assert_refused(code, out, "--labels 'motion': a model of one output has no classes", tmp_path)
    assert "convert it without --labels" in out.err


def test_a_tensor_without_a_usable_scale_is_named_not_the_staging_manifest(capsys, tmp_path):
    """An output that is always 0 got an int16 scale of 3.6e-43 from TFLite: the bundle's own
    manifest check refused it after the conversion, naming the staging directory's manifest."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 3))
    z = keras.layers.LSTM(4, return_sequences=True)(inp)
    head = keras.layers.Dense(2, kernel_initializer="zeros")  # bias zeros too: y is always 0
    keras.Model(inp, head(z)).save(tmp_path / "m.keras")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(0, 1, (4, 10, 3)))
    args = ("--quant", "int16x8", "--long-steps", "200")
    code, out = convert(
        capsys, tmp_path / "m.keras", tmp_path / "calib.npy", tmp_path / "out", *args
    )
    assert_refused(code, out, "--quant int16x8: TFLite gave tensor 'y' the scale", tmp_path)
    assert "manifest.json" not in out.err


def test_train_example_over_an_earlier_model_replaces_its_files_together_or_none(
    tmp_path, monkeypatch
):
    """The four files were replaced one after another: a full disk at MODEL.test.npz, when
    retraining over an earlier model, left the new MODEL.keras beside the old MODEL.json.
    All are written first and only then put in place: the earlier set stays as it was."""
    import errno
    import re

    import numpy as np

    from convert.errors import ConvertError
    from convert.train import train_example

    names = ["m.keras", "m.calib.npy", "m.test.npz", "m.json"]
    for name in names:
        (tmp_path / name).write_text(f"earlier {name}")
    savez = np.savez

    def full_disk(file, *args, **kwargs):
        if ".m.test.npz." in str(file):  # the temporary file of m.test.npz
            raise OSError(errno.ENOSPC, "No space left on device")
        return savez(file, *args, **kwargs)

    monkeypatch.setattr(np, "savez", full_disk)
    out = tmp_path / "m.keras"
    with pytest.raises(ConvertError, match=re.escape(f"{tmp_path / 'm.test.npz'}: cannot write")):
        train_example(out, epochs=1, units=4, singles_per_epoch=0, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        name: f"earlier {name}".encode() for name in names
    }


def test_train_example_says_how_far_training_is_when_stderr_is_no_terminal(tmp_path, capsys):
    """Off a terminal (a log, a pipe, the demo's first run under a script) the progress bar
    drew nothing, and minutes of training printed not a line: each epoch is said instead."""
    from convert.train import train_example

    train_example(tmp_path / "m.keras", epochs=1, pretrain_epochs=1, units=4, singles_per_epoch=0)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training")]
    assert [line.split(",")[0] for line in lines] == [
        "training: epoch 1/2",
        "training: epoch 2/2",
    ], lines
    assert "val " in lines[-1] and "best " in lines[-1]  # the held-out figures of a stream epoch

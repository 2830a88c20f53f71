import copy
import json

import pytest

from edge.errors import BundleError
from edge.manifest import parse, read_bundle


@pytest.fixture
def manifest_dict(bundles):
    return json.loads((bundles / "clf-int8" / "manifest.json").read_text())


def test_real_manifest_parses(manifest_dict):
    m = parse(manifest_dict)
    assert m.quantization == "int8" and m.features == 6 and m.output_kind == "classifier"
    assert m.tensors["h0"].dtype == "int8" and m.tensors["h0"].scale > 0
    assert parse(m.to_dict()).to_dict() == m.to_dict()
    # an int8 classifier ends at its logits: version 3, which older runtimes refuse
    assert m.output_activation == "softmax" and manifest_dict["format_version"] == 3


def test_bundles_without_a_runtime_activation_stay_version_2(bundles):
    d = json.loads((bundles / "reg2-int8" / "manifest.json").read_text())
    assert d["format_version"] == 2 and "activation" not in d["output"]
    assert parse(d).output_activation == "linear"


def test_mixed_mode_bundles_are_version_3_which_0_1_0_refuses_by_its_version(bundles):
    """edge-lstm 0.1.0 refused a bundle of a mode it does not know as damaged ("quantization
    'int8-float-head' is not one of ('int8', ...)"); version 3 makes it say "format_version 3
    is not supported ...; upgrade edge-lstm". A version-2 manifest of such a mode is read."""
    made = json.loads((bundles / "reg2-int8-float-head" / "manifest.json").read_text())
    assert made["format_version"] == 3 and "activation" not in made["output"]
    for mode in ("int8-float-head", "int8-float-cell"):
        d = copy.deepcopy(made)
        d.update(quantization=mode, format_version=2)
        written = parse(d).to_dict()
        assert written["format_version"] == 3 and parse(written).quantization == mode
    plain = json.loads((bundles / "reg2-int8" / "manifest.json").read_text())
    plain["format_version"] = 3  # an int8 bundle of version 3 still needs its activation
    with pytest.raises(BundleError, match="marks an output of logits"):
        parse(plain)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("tflite_sha256"), "missing field 'tflite_sha256'"),
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.update(quantization="int4"), "quantization 'int4'"),
        (lambda d: d["features"].update(count=7), "features.count 7"),
        (lambda d: d["output"].update(kind="ranker"), "output.kind 'ranker'"),
        (lambda d: d["tensors"]["h0"].update(dtype="uint8"), "dtype 'uint8'"),
        (lambda d: d["tensors"]["x"].update(scale=-1.0), "tensors.x"),
        (lambda d: d["state"][0].update(input="nope"), "tensor 'nope'"),
        (lambda d: d["state"][1].update(role="cake"), "role 'cake'"),
        (lambda d: d["state"][1].update(input="h0"), "listed twice"),
        # h0 fed from c0's output: both states read it, h0_next never (answers silently wrong)
        (lambda d: d["state"][0].update(output="c0_next"), "state output 'c0_next' is listed"),
        (lambda d: d["state"][0].update(output="h0"), "both an input and an output"),
        (lambda d: d.update(sample_rate_hz="fast"), "sample_rate_hz 'fast'"),
        (lambda d: d.update(sample_rate_hz=-5), "sample_rate_hz -5"),
        (lambda d: d["features"].update(names=["a"] * 6), "features.names must be distinct"),
        (lambda d: d["features"].update(names=list(range(6))), "features.names must be"),
        (lambda d: d["features"].update(units=[""]), "features.units must list 6"),
        (lambda d: d["output"].update(labels=[1, 2, 3, 4]), "output.labels must be a list"),
        # accepted: the label published with an answer could not tell the classes apart
        (lambda d: d["output"].update(labels=["a", "a", "b", "c"]), "labels must be distinct"),
        (lambda d: d["output"].update(labels=["a", "", "b", "c"]), "labels must be distinct"),
        (lambda d: d.update(state=[]), "no state tensor"),
        (lambda d: d["output"].update(labels=["a"]), "1 labels for 4 outputs"),
        (lambda d: d["output"].update(activation="relu"), "output.activation 'relu'"),
        (lambda d: d["output"].update(activation=["softmax"]), "output.activation"),
        (lambda d: d.update(format_version=2), "needs format_version 3"),
        (lambda d: d["tensors"].update(y=1), "tensors.y: not a JSON object"),
        (lambda d: d["signature"].update(output="x"), "input and output are both 'x'"),
        # the logits were published as the class probabilities
        (lambda d: d["output"].pop("activation"), "format_version 3 marks an output of logits"),
        (
            lambda d: d["output"].update(activation="linear"),
            "output.activation is missing or 'linear'",
        ),
        (
            lambda d: d["tensors"]["y"].update(dtype="float32", scale=0.0, zero_point=0),
            "an int8 output tensor",
        ),
    ],
)
def test_invalid_fields_are_named(manifest_dict, edit, message):
    d = copy.deepcopy(manifest_dict)
    edit(d)
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        parse(d)


def _swap_state_outputs(d):
    d["state"][0]["output"], d["state"][1]["output"] = "c0_next", "h0_next"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["input_normalization"]["mean"].__setitem__(2, float("nan")),
            r"mean\[2\] is nan",
        ),
        (
            lambda d: d["input_normalization"]["std"].__setitem__(0, float("inf")),
            r"std\[0\] is inf",
        ),
        (lambda d: d["input_normalization"]["mean"].__setitem__(1, 1e300), r"mean\[1\] is 1e\+300"),
        (
            lambda d: d["input_normalization"]["mean"].__setitem__(1, 10**400),
            r"mean\[1\] is <401-digit integer>",
        ),
        (lambda d: d["input_normalization"]["std"].__setitem__(3, 1e39), r"std\[3\] is 1e\+39"),
        # 1 / std overflows float32
        (lambda d: d["input_normalization"]["std"].__setitem__(5, 1e-300), r"std\[5\] is 1e-300"),
        (lambda d: d["input_normalization"]["std"].__setitem__(0, 0.0), r"std\[0\] is 0.0"),
        (lambda d: d["input_normalization"]["std"].__setitem__(0, "1.0"), r"std\[0\] is '1.0'"),
        (lambda d: d["input_normalization"]["mean"].pop(), "mean lists 5 values for 6"),
        (lambda d: d["input_normalization"].pop("std"), "missing field 'std'"),
        (lambda d: d.update(input_normalization=[0.0, 1.0]), "input_normalization has the wrong"),
        (lambda d: d.update(normalization="graph"), "normalised twice"),
        (lambda d: d.update(normalization="sometimes"), "normalization 'sometimes'"),
        (lambda d: d["tensors"]["x"].update(scale=1e300), "scale 1e\\+300"),
        (lambda d: d["tensors"]["x"].update(scale=10**400), "tensors.x: width 6 / scale 1000"),
        (lambda d: d["tensors"]["x"].update(zero_point=1000), "zero_point 1000 is outside int8"),
        (
            lambda d: d["tensors"]["c0_next"].update(dtype="int16"),
            "'c0_next' is int16 .* cross-wired",
        ),
        # h0 and c0 fed from each other's output: both int8 and as wide, only the scales differ
        (_swap_state_outputs, "state output 'c0_next' is int8 .* cross-wired"),
        (lambda d: d.update(state_requantization="no"), "state_requantization 'no'"),
        # h0 and c0 fed from each other's output with no scale to tell: only the names do
        (
            lambda d: (_swap_state_outputs(d), d.update(state_requantization=True)),
            r"state\[0\] feeds 'h0' from 'c0_next', the next value of 'c0': .* cross-wired",
        ),
    ],
)
def test_unusable_numbers_and_wiring_are_named(manifest_dict, edit, message):
    """Hand-edited values that used to load and compute garbage."""
    d = copy.deepcopy(manifest_dict)
    edit(d)
    with pytest.raises(BundleError, match=message):
        parse(d)


def test_null_normalisation_loads_but_a_missing_one_is_refused(manifest_dict):
    """The converter writes an explicit null when the source model has no normalisation; a
    manifest without the field at all lost it, and the model would get raw units."""
    d = copy.deepcopy(manifest_dict)
    d["input_normalization"] = None
    assert parse(d).extra["input_normalization"] is None
    d["normalization"] = "graph"
    parse(d)
    del manifest_dict["input_normalization"]
    with pytest.raises(BundleError, match="'runtime' but field 'input_normalization' is missing"):
        parse(manifest_dict)


def test_nan_in_a_manifest_file_is_refused(bundles, tmp_path):
    """Python's json reads NaN and Infinity, so a hand-edited file reaches the checks."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles / "clf-int8", b)
    d = json.loads((b / "manifest.json").read_text())
    d["input_normalization"]["std"] = [float("inf")] * 6
    (b / "manifest.json").write_text(json.dumps(d))
    assert "Infinity" in (b / "manifest.json").read_text()
    with pytest.raises(BundleError, match=r"input_normalization.std\[0\] is inf"):
        read_bundle(b)


def test_tampered_model_is_refused(bundles, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles / "clf-int8", b)
    data = bytearray((b / "model.tflite").read_bytes())
    data[-1] ^= 0xFF
    (b / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(b)


def test_missing_and_garbled_manifests(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        read_bundle(tmp_path / "nothing")
    with pytest.raises(BundleError, match="manifest.json: missing"):
        read_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        read_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="manifest.json: unreadable: JSON nested too deeply"):
        read_bundle(tmp_path)


def test_a_manifest_number_of_more_digits_than_python_converts_is_unreadable(
    manifest_dict, tmp_path
):
    """json.loads raises a plain ValueError (not a JSONDecodeError) for an integer of more than
    4300 digits: it escaped as a traceback from every command that loads the bundle."""
    text = json.dumps(manifest_dict)[:-1] + ', "note": ' + "9" * 5000 + "}"
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="manifest.json: unreadable: Exceeds the limit"):
        read_bundle(tmp_path)


def test_model_file_cannot_escape_the_bundle(manifest_dict, tmp_path):
    manifest_dict["model_file"] = "../elsewhere.tflite"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict))
    with pytest.raises(BundleError, match="inside the bundle"):
        read_bundle(tmp_path)


def test_a_model_file_name_holding_a_nul_is_refused_as_a_bundle_error(manifest_dict, tmp_path):
    """``os.stat`` raises ValueError on a NUL in a path: it escaped the error hierarchy."""
    manifest_dict["model_file"] = "model\x00.tflite"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict))
    with pytest.raises(BundleError, match=r"model_file 'model\\x00.tflite' holds a NUL"):
        read_bundle(tmp_path)


def test_format_1_lstm_layouts_are_still_read(manifest_dict):
    """Bundles made before per-tensor state roles list h and c per LSTM layer."""
    m = parse(manifest_dict)
    old = copy.deepcopy(manifest_dict)
    old["format_version"] = 1
    del old["output"]["activation"]  # version 3's; a version 1 bundle's softmax is in its graph
    old["state"] = [
        {"units": h["width"], "h_in": h["input"], "h_out": h["output"]}
        | {"c_in": c["input"], "c_out": c["output"]}
        for h, c in zip(manifest_dict["state"][::2], manifest_dict["state"][1::2])
    ]
    legacy = parse(old)
    assert legacy.state_names == m.state_names and legacy.state_layout() == m.state_layout()
    assert [s.role for s in legacy.states] == ["h", "c"] * (len(m.states) // 2)


@pytest.fixture
def bundle_copy(bundles, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles / "clf-int8", b)
    return b


@pytest.fixture
def no_hang():
    """Turns a blocked open or read into a failure: a FIFO opened for reading waits for a
    writer that never comes. Only a broken check ever waits for the alarm."""
    import signal

    def stuck(signum, frame):
        raise TimeoutError("blocked reading a bundle file")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["model.tflite", "manifest.json"])
def test_a_fifo_in_a_bundle_is_refused_without_opening_it(bundle_copy, no_hang, name):
    import os

    (bundle_copy / name).unlink()
    os.mkfifo(bundle_copy / name)
    with pytest.raises(BundleError, match=f"{name}: the .* is a FIFO, not a regular file"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["model.tflite", "manifest.json"])
def test_a_directory_in_place_of_a_bundle_file_is_refused(bundle_copy, name):
    (bundle_copy / name).unlink()
    (bundle_copy / name).mkdir()
    with pytest.raises(BundleError, match=f"{name}: the .* is a directory, not a regular file"):
        read_bundle(bundle_copy)


def test_an_oversized_manifest_is_refused_by_its_size(bundle_copy):
    """Sparse: no disk used, and refused before a byte of it is read."""
    import os

    os.truncate(bundle_copy / "manifest.json", (1 << 20) + 1)
    with pytest.raises(
        BundleError,
        match=r"manifest.json: the manifest is 1048577 bytes, over the limit of 1048576",
    ):
        read_bundle(bundle_copy)


def test_an_oversized_model_is_refused_by_its_size(bundle_copy, monkeypatch):
    import os

    import edge.manifest

    assert edge.manifest.MODEL_LIMIT >= 2 << 30  # generous: a step model is a few MiB
    monkeypatch.setattr(edge.manifest, "MODEL_LIMIT", 1 << 20)
    os.truncate(bundle_copy / "model.tflite", (1 << 20) + 1)
    with pytest.raises(
        BundleError, match=r"model.tflite: the model is 1048577 bytes, over the limit of 1048576"
    ):
        read_bundle(bundle_copy)


def test_a_model_that_does_not_fit_in_memory_is_one_error(bundle_copy, monkeypatch):
    """The sha256 is checked in 1 MiB reads; only the read of the whole model can run out."""
    import edge.manifest

    real_open = edge.manifest._open_regular

    class Scarce:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            if n != 1 << 20:  # anything but a chunk of the sha256 check
                raise MemoryError
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def scarce_open(path, limit, what, within=None):
        f = real_open(path, limit, what, within)
        return Scarce(f) if what == "model" else f

    monkeypatch.setattr(edge.manifest, "_open_regular", scarce_open)
    size = (bundle_copy / "model.tflite").stat().st_size
    with pytest.raises(BundleError, match=rf"the model \({size} bytes\) does not fit in"):
        read_bundle(bundle_copy)


def test_the_layers_states_fed_from_each_other_are_refused(bundles, tmp_path):
    """h0 fed from h1_next in a two-layer bundle: the same width and encoding, so it loaded and
    answered wrong (by 0.8 on this model) without a word."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundles / "torch-lstm2-int8", b)
    d = json.loads((b / "manifest.json").read_text())
    assert d["state_requantization"] is False
    d["state"][0]["output"], d["state"][2]["output"] = "h1_next", "h0_next"
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="feeds 'h0' from 'h1_next'.* cross-wired"):
        read_bundle(b)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["state"][0].update(input="h0_next", output="h0"),
            "'h0_next' is used as an input of the model, but it is not one",
        ),
        (
            lambda d: d["state"][1].update(input="c0_next", output="c0"),
            "'c0_next' is used as an input of the model, but it is not one",
        ),
    ],
)
def test_a_tensor_named_on_the_wrong_side_of_the_model_is_refused(bundle_copy, edit, message):
    """Both sides of the signature were searched as one: a state input and output swapped were
    found, and loading failed in the first invoke with the interpreter's 'Invalid Input name'."""
    import edge

    d = json.loads((bundle_copy / "manifest.json").read_text())
    edit(d)
    (bundle_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=message):
        edge.load(bundle_copy)


@pytest.mark.parametrize(
    "name, dropped", [("clf-int8", ["c0"]), ("torch-lstm2-int8", ["h1", "c1"])], ids=str
)
def test_a_state_of_the_model_the_manifest_leaves_out_is_refused(bundles, tmp_path, name, dropped):
    """A manifest without c0 (or without the second layer of a two-layer model) loaded: that
    state input was never fed, it held whatever its buffer held, and every answer was wrong
    without a word."""
    import shutil

    import edge

    b = tmp_path / "b"
    shutil.copytree(bundles / name, b)
    d = json.loads((b / "manifest.json").read_text())
    d["state"] = [s for s in d["state"] if s["input"] not in dropped]
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=f"the model's input '{dropped[-1]}' is not in the man"):
        edge.load(b)


@pytest.mark.parametrize(
    "name, tensor, factor",
    [("clf-int16x8", "h0", 1.0003), ("clf-int8", "x", 1.000005), ("clf-int8", "y", 0.999995)],
)
def test_a_scale_edited_within_a_rounding_of_the_models_is_refused(
    bundles, tmp_path, name, tensor, factor
):
    """Compared with np.isclose, a scale a few parts in 10^5 off loaded, and 295 of 300 answers
    of the int16x8 bundle differed from the verified ones."""
    import shutil

    import edge

    b = tmp_path / "b"
    shutil.copytree(bundles / name, b)
    d = json.loads((b / "manifest.json").read_text())
    d["tensors"][tensor]["scale"] *= factor
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=f"tensor '{tensor}': model quantisation .* differs"):
        edge.load(b)


HUGE = "x" * 100_000


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d.update(quantization=HUGE), "quantization"),
        (lambda d: d["output"].update(kind=HUGE), "output.kind"),
        (lambda d: d.update(sample_rate_hz=HUGE), "sample_rate_hz"),
        (lambda d: d["features"].update(names=[HUGE] * 6), "features.names"),
        (lambda d: d["tensors"]["h0"].update(dtype=HUGE), "dtype"),
        (lambda d: d["state"][0].update(input=HUGE), "tensor"),
        (lambda d: d.update(tflite_sha256=[HUGE]), "tflite_sha256"),
    ],
)
def test_a_huge_bad_value_gives_a_short_error_naming_the_field(manifest_dict, edit, field):
    d = copy.deepcopy(manifest_dict)
    edit(d)
    with pytest.raises(BundleError, match=field) as err:
        parse(d)
    assert len(str(err.value)) < 400 and " chars)" in str(err.value)


@pytest.mark.parametrize("swap", ["link", "rename"])
def test_a_bundle_swapped_while_it_is_read_is_read_from_one_bundle(
    bundles, tmp_path, monkeypatch, swap
):
    """A new bundle put in place while a ``reload`` reads the old one (a symbolic link
    pointed at it with ``mv -T``, or the directory renamed over): the manifest came from one
    bundle and the model from the other, and the good new bundle was refused as modified
    (``sha256 ... does not match the manifest's tflite_sha256``). Both are read from the
    directory that was there when the read began."""
    import os
    import shutil

    from edge import manifest as mf

    old, new = tmp_path / "v1", tmp_path / "v2"
    shutil.copytree(bundles / "clf-int8", old)
    shutil.copytree(bundles / "reg2-int8", new)
    model = tmp_path / "bundle"
    if swap == "link":
        model.symlink_to(old)
    else:
        old.rename(model)
    real_open = os.open

    def open_then_swap(path, flags, *args, **kw):
        fd = real_open(path, flags, *args, **kw)
        if str(path).endswith("manifest.json"):  # between the manifest and the model
            if swap == "link":
                (tmp_path / "next").symlink_to(new)
                os.replace(tmp_path / "next", model)
            else:
                model.rename(tmp_path / "v1-old")
                new.rename(model)
        return fd

    monkeypatch.setattr(mf.os, "open", open_then_swap)
    manifest, content = read_bundle(model)
    assert manifest.features == 6  # clf-int8's manifest, and its model
    assert content == (bundles / "clf-int8" / "model.tflite").read_bytes()

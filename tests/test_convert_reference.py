"""The NumPy reference LSTM against Keras itself, and the refusals of model intake."""

import dataclasses
import re
import warnings

import numpy as np
import pytest

from convert.spec import ACTIVATIONS

pytestmark = pytest.mark.desktop


def _head_bias_off(spec):
    """``spec`` as if its output layer's bias had been misread by 0.01."""
    dense = spec.layers[-1]
    head = dataclasses.replace(dense, bias=dense.bias + 0.01)
    return dataclasses.replace(spec, layers=(*spec.layers[:-1], head))


def keras_model(layers, features=5):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, features))
    z = inp
    for layer in layers:
        z = layer(z)
    return keras.Model(inp, z)


def test_reference_matches_keras_predict_stacked_with_norm_and_head():
    import keras

    from convert import intake, reference

    x = np.random.default_rng(1).normal(2, 5, (4, 30, 5)).astype(np.float32)
    norm = keras.layers.Normalization()
    model = keras_model(
        [
            norm,
            keras.layers.LSTM(12, return_sequences=True),
            keras.layers.LSTM(8, return_sequences=True, unit_forget_bias=False),
            keras.layers.TimeDistributed(keras.layers.Dense(6, activation="relu")),
            keras.layers.Dense(3),
            keras.layers.Activation("softmax"),
        ]
    )
    norm.adapt(x)
    spec = intake.spec_from_model(model)
    y_ref, _, _ = reference.run(spec, x)
    np.testing.assert_allclose(y_ref, model.predict(x, verbose=0), atol=2e-5)


def test_reference_matches_keras_when_the_last_lstm_returns_one_step():
    import keras

    from convert import intake, reference

    x = np.random.default_rng(2).normal(0, 1, (3, 25, 5)).astype(np.float32)
    model = keras_model([keras.layers.LSTM(10), keras.layers.Dense(2, activation="tanh")])
    y_ref, _, _ = reference.run(intake.spec_from_model(model), x)
    np.testing.assert_allclose(y_ref[:, -1], model.predict(x, verbose=0), atol=2e-5)


def _refusals():
    import keras

    L = keras.layers
    return [
        ([L.Bidirectional(L.LSTM(4, return_sequences=True))], "Bidirectional", "future samples"),
        ([L.Conv1D(4, 3, padding="same"), L.LSTM(4)], "Conv1D", "padding='same'"),
        ([L.Conv1D(4, 3, strides=2), L.LSTM(4)], "Conv1D", "strides=2"),
        ([L.Masking(), L.LSTM(4)], "Masking", "masked step"),
        ([L.LSTM(4, go_backwards=True)], "LSTM", "go_backwards"),
        ([L.LSTM(4, activation="celu")], "LSTM", "activation 'celu'"),
        ([L.LSTM(4), L.RepeatVector(3), L.LSTM(4)], "RepeatVector", "encoder-decoder"),
        ([L.LSTM(4, return_sequences=True), L.GlobalAveragePooling1D()], "Global", "whole"),
        ([L.LSTM(4, return_sequences=True), L.MultiHeadAttention(1, 2)], "Attention", "whole"),
        ([L.Dense(4)], "", "no recurrent layer"),
        ([L.LSTM(4), L.Dense(3, activation="celu")], "Dense", "'celu'"),
        ([L.LSTM(4, return_sequences=True), L.MaxPooling1D(2)], "MaxPooling1D", "rate"),
        ([L.LSTM(4, return_sequences=True), L.LeakyReLU(0.3)], "LeakyReLU", "only 0.2"),
        ([L.LSTM(4, return_sequences=True), L.PReLU(shared_axes=[1])], "PReLU", "not a layer"),
        ([L.ZeroPadding1D((1, 0)), L.Conv1D(4, 3), L.LSTM(4)], "ZeroPadding1D", "pads (1, 0)"),
        ([L.ZeroPadding1D((2, 1)), L.Conv1D(4, 3), L.LSTM(4)], "ZeroPadding1D", "its end"),
        ([L.ZeroPadding1D((2, 0)), L.LSTM(4)], "ZeroPadding1D", "before a Conv1D"),
    ]


@pytest.mark.parametrize("case", range(17))
def test_unstreamable_models_are_refused_naming_the_layer(case):
    from convert import intake
    from convert.errors import UnsupportedModel

    layers, kind, reason = _refusals()[case]
    if kind == "Attention":
        import keras

        inp = keras.Input((None, 5))
        z = layers[0](inp)
        model = keras.Model(inp, layers[1](z, z))
    else:
        model = keras_model(layers)
    with pytest.raises(UnsupportedModel) as err:
        intake.spec_from_model(model)
    assert kind in str(err.value) and reason in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_a_model_of_several_inputs_or_outputs_is_refused_naming_them():
    """It was refused as 'the model must have one input and one output', whichever it was."""
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    L = keras.layers
    a, b = keras.Input((None, 3), name="imu"), keras.Input((None, 2), name="gps")
    z = L.LSTM(4, return_sequences=True)(L.Concatenate()([a, b]))
    two_in = keras.Model([a, b], L.Dense(1)(z))
    a = keras.Input((None, 3))
    z = L.LSTM(4, return_sequences=True)(a)
    two_out = keras.Model(a, [L.Dense(2, name="pose")(z), L.Dense(1, name="speed")(z)])
    for model, needle in (
        (two_in, "the model has 2 inputs (imu, gps); expected one [batch, time, features]"),
        (two_out, "the model has 2 outputs (pose, speed); expected one"),
    ):
        with pytest.raises(UnsupportedModel, match=re.escape(needle)):
            intake.spec_from_model(model)


def test_operations_on_tensors_and_branches_are_refused_naming_them():
    """``model.layers`` lists no ``x * 3`` nor ``keras.ops.add``: they were left out of the
    step without a word. A stateful model of batch 32 (which Keras' agreement check cannot run
    on 16 sequences) converted into a bundle that computed another model."""
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    L = keras.layers
    inp = keras.Input((None, 3), batch_size=32)
    z = L.LSTM(8, stateful=True, return_sequences=True)(inp)
    scaled = keras.Model(inp, L.Dense(2)(z * 3.0))
    inp = keras.Input((None, 3))
    z = L.LSTM(8, return_sequences=True)(inp)
    residual = keras.Model(inp, L.Dense(2)(keras.ops.add(z, L.Dense(8)(z))))
    inp = keras.Input((None, 3))
    z = L.LSTM(8, return_sequences=True)(inp)
    merged = keras.Model(inp, L.Add(name="skip")([z, L.LSTM(8, return_sequences=True)(z)]))
    for model, needle in (
        (scaled, r"operation 'multiply\w*' \(Multiply\) cannot be streamed: .* not a layer"),
        (residual, r"operation 'add\w*' \(Add\) cannot be streamed"),
        (merged, r"layer 'skip' \(Add\) takes 2 tensors: the model branches"),
    ):
        with pytest.raises(UnsupportedModel, match=needle) as err:
            intake.spec_from_model(model)
        assert len(str(err.value).splitlines()) == 1


def test_a_layer_called_twice_and_nested_models_are_read_as_keras_computes_them():
    """A layer called twice was read once, and a model nested in the model was refused as
    'not a layer the converter reads'."""
    import keras

    from convert import intake, reference

    L = keras.layers
    keras.utils.set_random_seed(0)
    twice = L.Dense(3, activation="tanh")
    inp = keras.Input((None, 3))
    shared = keras.Model(inp, L.LSTM(4, return_sequences=True)(twice(twice(inp))))
    sub_in = keras.Input((None, 4))
    head = keras.Model(sub_in, L.Dense(2)(L.GRU(5, return_sequences=True)(sub_in)))
    functional = keras_model([L.Dense(4), head], features=3)
    sequential = keras.Sequential(
        [keras.Input((None, 3)), keras.Sequential([L.Conv1D(4, 2, padding="causal")]), L.LSTM(3)]
    )
    x = np.random.default_rng(11).normal(0, 1, (3, 15, 3)).astype(np.float32)
    for model in (shared, functional, sequential):
        spec = intake.spec_from_model(model)
        want = model.predict(x, verbose=0)
        y = reference.run(spec, x)[0]
        np.testing.assert_allclose(y if want.ndim == 3 else y[:, -1], want, atol=2e-5)
        assert intake.check_agreement(model, spec, x) is None


def test_a_subclassed_model_is_refused_saying_why():
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    class Scaled(keras.Model):
        def __init__(self):
            super().__init__(name="scaled")
            self.lstm = keras.layers.LSTM(4, return_sequences=True)

        def call(self, x):
            return self.lstm(x) * 2.0

    model = Scaled()
    model(np.zeros((1, 5, 3), np.float32))
    with pytest.raises(UnsupportedModel, match=r"'scaled' \(Scaled\) is a subclassed keras.Model"):
        intake.spec_from_model(model)


@pytest.mark.parametrize("case", ["axis=1", "axis=(1, 2)", "rescaling"])
def test_statistics_per_time_step_are_refused_naming_the_layer(case):
    """A Normalization's statistics or a Rescaling's scale per step of a fixed-length window
    were read as per-feature ones (silently wrong where the window had as many steps as
    features: Keras cannot run such a model on the agreement check's first steps, so nothing
    caught it), or ended in a NumPy traceback."""
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    L = keras.layers
    if case == "rescaling":
        first, kind = L.Rescaling(scale=np.arange(1, 7, dtype="float32").reshape(6, 1)), "Rescaling"
    else:
        first, kind = L.Normalization(axis=1 if case == "axis=1" else (1, 2)), "Normalization"
        first.adapt(np.random.default_rng(5).normal(0, 1, (8, 6, 6)).astype(np.float32))
    inp = keras.Input((6, 6))
    model = keras.Model(inp, L.LSTM(3, return_sequences=True)(first(inp)))
    with pytest.raises(UnsupportedModel, match=rf"layer '{first.name}' \({kind}\)") as e:
        intake.spec_from_model(model)
    assert "per time step" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_dense_and_conv1d_with_a_lora_adapter_are_read_as_keras_computes_them():
    """get_weights() lists a LoRA adapter apart from the kernel it updates: the kernel alone
    was read, and the model refused as 'not read as Keras computes it' (silently different
    where Keras could not run it for the check)."""
    import keras

    from convert import intake, reference

    L = keras.layers
    model = keras_model(
        [L.Conv1D(4, 2, padding="causal"), L.LSTM(5, return_sequences=True), L.Dense(3)]
    )
    for layer in (model.layers[1], model.layers[-1]):
        layer.enable_lora(2)
        a, b = layer.lora_kernel_a, layer.lora_kernel_b
        a.assign(np.full(a.shape, 0.3, np.float32))
        b.assign(np.full(b.shape, 0.2, np.float32))
    x = np.random.default_rng(8).normal(0, 1, (3, 12, 5)).astype(np.float32)
    spec = intake.spec_from_model(model)
    np.testing.assert_allclose(reference.run(spec, x)[0], model.predict(x, verbose=0), atol=2e-5)


def test_a_model_quantised_by_keras_is_refused_naming_the_layer():
    """A Dense after model.quantize('int8') lists its weights in another order (bias, int8
    kernel, scale): an IndexError traceback."""
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    L = keras.layers
    model = keras_model([L.LSTM(5, return_sequences=True), L.Dense(3, name="head")])
    with warnings.catch_warnings():  # Keras' note on the layers it leaves in float
        warnings.simplefilter("ignore")
        model.quantize("int8")
    with pytest.raises(UnsupportedModel, match=r"layer 'head' \(Dense\) is quantised by Keras"):
        intake.spec_from_model(model)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_precision_model_is_checked_within_its_precision_and_said(policy):
    """Keras runs a mixed-precision model in half precision, the step in float32: the
    rounding between the two was taken for a misread layer and the model refused ('please
    report the model')."""
    import keras

    from convert import intake

    L = keras.layers
    model = keras_model(
        [
            L.LSTM(16, return_sequences=True, dtype=policy),
            L.GRU(8, return_sequences=True, dtype=policy),
            L.Dense(3, dtype=policy),
        ]
    )
    x = np.random.default_rng(9).normal(0, 1, (16, 20, 5)).astype(np.float32)
    said = intake.check_agreement(model, intake.spec_from_model(model), x)
    assert said is not None and f"Keras computes this model in {policy[6:]}" in said


def test_a_half_precision_input_is_checked_within_its_precision_and_said():
    """keras.Input(dtype="float16") rounds every sample to half precision before float32
    layers: that rounding was taken for a misread layer and the model refused ('please report
    the model')."""
    import keras

    from convert import intake

    inp = keras.Input((None, 5), dtype="float16")
    z = keras.layers.LSTM(16, return_sequences=True)(inp)
    model = keras.Model(inp, keras.layers.Dense(3)(z))
    x = np.random.default_rng(9).normal(0, 1, (16, 20, 5)).astype(np.float32)
    said = intake.check_agreement(model, intake.spec_from_model(model), x)
    assert said is not None and "Keras computes this model in float16" in said


def test_an_integer_input_is_refused_where_keras_casts_a_sample_the_step_takes_as_is():
    """keras.Input(dtype="int32") truncates every sample to an integer, the step does not: a
    fraction in --calib was refused as "a layer is not read as Keras computes it (please
    report the model)". It is named; whole-number samples convert as before."""
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    inp = keras.Input((None, 5), dtype="int32")
    z = keras.layers.LSTM(16, return_sequences=True)(inp)
    model = keras.Model(inp, keras.layers.Dense(3)(z))
    spec = intake.spec_from_model(model)
    x = np.random.default_rng(9).normal(0, 3, (16, 20, 5)).astype(np.float32)
    said = r"the model's input is int32 .* at index \[0, 0, 0\]"
    with pytest.raises(UnsupportedModel, match=said):
        intake.check_agreement(model, spec, x)
    assert intake.check_agreement(model, spec, np.round(x)) is None


def test_stateful_lstm_streams_like_keras():
    """stateful=True only fixes Keras' batch; the runtime keeps each stream's state itself."""
    import keras

    from convert import intake, reference

    inp = keras.Input((None, 3), batch_size=2)
    model = keras.Model(inp, keras.layers.LSTM(4, stateful=True, return_sequences=True)(inp))
    x = np.random.default_rng(4).normal(0, 1, (2, 12, 3)).astype(np.float32)
    spec = intake.spec_from_model(model)
    np.testing.assert_allclose(reference.run(spec, x)[0], model.predict(x, verbose=0), atol=2e-5)


def test_keras_itself_checks_what_was_read_of_a_stateful_model():
    """A stateful model (fixed batch, state carried from call to call) was never checked
    against Keras: a layer read wrongly would have been verified against itself."""

    import keras

    from convert import intake, reference
    from convert.errors import UnsupportedModel

    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, 3), batch_size=2)
    z = L.LSTM(4, stateful=True, return_sequences=True)(inp)
    model = keras.Model(inp, L.Dense(2)(z))
    x = np.random.default_rng(10).normal(0, 1, (5, 12, 3)).astype(np.float32)
    spec = intake.spec_from_model(model)
    assert intake.check_agreement(model, spec, x) is None
    misread = _head_bias_off(spec)
    with pytest.raises(UnsupportedModel, match="differs from Keras' own run of it by 0.01"):
        intake.check_agreement(model, misread, x)
    # the model is left at its zero state: Keras' next run is from the start too
    y = model.predict(x[:2], batch_size=2, verbose=0)
    np.testing.assert_allclose(y, reference.run(spec, x[:2])[0], atol=2e-5)


@pytest.mark.parametrize(
    "shape, batch, many_to_one",
    [((50, 3), None, False), ((50, 3), None, True), ((None, 3), 32, False), ((7, 3), 24, True)],
)
def test_keras_itself_checks_models_of_a_fixed_length_or_a_large_stateful_batch(
    shape, batch, many_to_one
):
    """Keras runs a model of a fixed length on that length only, and a stateful one on its
    batch size only: the check ran it on the first 4 steps of 16 sequences, Keras refused,
    and a layer read wrongly was verified against itself."""
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape, batch_size=batch)
    z = L.LSTM(4, stateful=batch is not None, return_sequences=not many_to_one)(inp)
    model = keras.Model(inp, L.Dense(2)(z))
    x = np.random.default_rng(12).normal(0, 1, (20, 30, 3)).astype(np.float32)
    spec = intake.spec_from_model(model)
    assert intake.check_agreement(model, spec, x) is None
    with pytest.raises(UnsupportedModel, match="differs from Keras' own run of it by 0.01"):
        intake.check_agreement(model, _head_bias_off(spec), x)


def test_the_axis_of_a_softmax_or_normalisation_is_read_on_the_tensor_it_works_on():
    """``Softmax(axis=1)`` over time was read as a softmax over the features (the axis was
    not read); ``axis=1`` of a many-to-one layer's [batch, features] output, which is the
    features, was refused for LayerNormalization and BatchNormalization."""
    import keras

    from convert import intake, reference
    from convert.errors import UnsupportedModel

    L = keras.layers
    over_time = keras_model([L.LSTM(4, return_sequences=True), L.Softmax(axis=1, name="sm")])
    with pytest.raises(UnsupportedModel) as err:
        intake.spec_from_model(over_time)
    assert str(err.value) == (
        "layer 'sm' (Softmax): axis=1 on a tensor of 3 axes is not the features' axis; only a "
        "softmax over each step's features (axis=-1) is computed per step"
    )
    x = np.random.default_rng(13).normal(0, 1, (3, 12, 5)).astype(np.float32)
    for layers in (
        [L.LSTM(4), L.LayerNormalization(axis=1), L.BatchNormalization(axis=1), L.Softmax(axis=1)],
        [L.LSTM(4, return_sequences=True), L.TimeDistributed(L.Softmax(axis=1))],
    ):
        model = keras_model(layers)
        spec = intake.spec_from_model(model)
        want = model.predict(x, verbose=0)
        y = reference.run(spec, x)[0]
        np.testing.assert_allclose(y if want.ndim == 3 else y[:, -1], want, atol=2e-5)


def test_rms_normalization_is_read_and_stepped_as_keras_computes_it():
    """Keras' RMSNormalization (which its warning about ``rms_scaling=True`` points to) was
    refused as 'not a layer the converter reads'; it is the input over its root mean square."""
    import keras

    from convert import intake, reference, step_graph

    L = keras.layers
    model = keras_model(
        [L.LSTM(6, return_sequences=True), L.RMSNormalization(epsilon=1e-3), L.Dense(2)]
    )
    model.layers[2].scale.assign(np.linspace(0.5, 2, 6))
    x = np.random.default_rng(14).normal(0, 1, (3, 12, 5)).astype(np.float32)
    spec = intake.spec_from_model(model)
    y = reference.run(spec, x)[0]
    np.testing.assert_allclose(y, model.predict(x, verbose=0), atol=2e-5)
    fn, _ = step_graph.build(spec, normalize_in_graph=False)
    state = reference.zero_state(spec, 3, np.float32)
    for k in range(3):
        out = fn(x[:, k], *state)
        np.testing.assert_allclose(out["y"].numpy(), y[:, k], atol=1e-5)
        state = [out[s.output].numpy() for s in spec.states]


def test_relu_layers_and_pointwise_convolutions_the_step_computes_are_read():
    """``ReLU(max_value=6)`` and ``ReLU(negative_slope=0.2)`` (relu6, leaky_relu) were refused as
    'only a plain ReLU', and a one-tap ``Conv1D(k, 1, padding="same")`` as a centred window
    reading later samples; the step computes each exactly."""
    import keras

    from convert import intake, reference
    from convert.errors import UnsupportedModel

    L = keras.layers
    model = keras_model(
        [
            L.Conv1D(6, 1, padding="same", activation="relu"),
            L.LSTM(6, return_sequences=True),
            L.Dense(4),
            L.ReLU(max_value=6),
            L.Dense(4),
            L.ReLU(negative_slope=0.2),
        ]
    )
    x = np.random.default_rng(15).normal(0, 3, (3, 12, 5)).astype(np.float32)
    y = reference.run(intake.spec_from_model(model), x)[0]
    np.testing.assert_allclose(y, model.predict(x, verbose=0), atol=2e-5)
    capped = keras_model([L.LSTM(4, return_sequences=True), L.ReLU(max_value=1.0, name="cap")])
    with pytest.raises(UnsupportedModel, match="layer 'cap' .ReLU.: max_value=1.0, neg"):
        intake.spec_from_model(capped)


def test_legacy_h5_models_are_read(tmp_path):
    import keras

    from convert import intake, reference

    model = keras_model([keras.layers.LSTM(6, return_sequences=True), keras.layers.Dense(2)])
    model.save(tmp_path / "legacy.h5")
    spec = intake.read_spec(tmp_path / "legacy.h5")
    x = np.random.default_rng(3).normal(0, 1, (2, 10, 5)).astype(np.float32)
    np.testing.assert_allclose(reference.run(spec, x)[0], model.predict(x, verbose=0), atol=2e-5)


def _accepted():
    import keras

    L = keras.layers
    return {
        "lstm-relu": [L.LSTM(8, activation="relu", return_sequences=True), L.Dense(2)],
        "lstm-no-bias-many-to-one": [L.LSTM(8, use_bias=False), L.Dense(1)],
        "lstm-hard-sigmoid-softsign-dropout": [
            L.LSTM(
                8,
                activation="softsign",
                recurrent_activation="hard_sigmoid",
                dropout=0.2,
                recurrent_dropout=0.1,
                unit_forget_bias=False,
                return_sequences=True,
            ),
            L.Dropout(0.3),
            L.Dense(2),
        ],
        "rnn-lstmcell": [L.RNN(L.LSTMCell(6), return_sequences=True), L.Dense(2)],
        "stacked-cells": [
            L.RNN(L.StackedRNNCells([L.LSTMCell(6), L.GRUCell(5)]), return_sequences=True),
            L.Dense(3, activation="softmax"),
        ],
        "gru-reset-after": [L.GRU(7, return_sequences=True), L.Dense(2)],
        "gru-reset-before": [L.GRU(7, reset_after=False), L.Dense(2)],
        "mixed": [
            L.LSTM(6, return_sequences=True),
            L.GRU(5, return_sequences=True),
            L.SimpleRNN(4),
            L.Dense(2),
        ],
        "batchnorm": [
            L.Dense(8),
            L.BatchNormalization(),
            L.LSTM(6, return_sequences=True),
            L.BatchNormalization(),
            L.Dense(2),
        ],
        "layernorm": [L.LSTM(6, return_sequences=True), L.LayerNormalization(), L.Dense(2)],
        "layernorm-rms-scaling": [
            L.LSTM(6, return_sequences=True),
            L.LayerNormalization(rms_scaling=True),
            L.Dense(2),
        ],
        "rescaling-identity-elu-leaky-relu": [
            L.Rescaling(0.5, offset=0.1),
            L.Identity(),
            L.LSTM(6, return_sequences=True),
            L.Dense(4),
            L.ELU(),
            L.Dense(4),
            L.LeakyReLU(0.2),
            L.Dense(2),
        ],
        "normalization-given-mean-variance": [
            L.Normalization(mean=[1.0, -2, 0, 3, 0.5], variance=[4.0, 1, 9, 0.25, 2]),
            L.LSTM(6, return_sequences=True),
            L.Dense(2),
        ],
        "cnn-lstm": [
            L.Conv1D(8, 3, padding="causal", activation="relu"),
            L.Conv1D(6, 2, dilation_rate=2, padding="causal"),
            L.BatchNormalization(),
            L.SpatialDropout1D(0.1),
            L.GaussianNoise(0.1),
            L.LSTM(6),
            L.Dense(2),
        ],
        "zero-padded-valid-conv": [
            L.ZeroPadding1D((4, 0)),
            L.Conv1D(6, 3, dilation_rate=2, padding="valid", activation="relu"),
            L.ZeroPadding1D((1, 0)),
            L.Conv1D(5, 2),
            L.LSTM(4, return_sequences=True),
        ],
        "grouped-conv": [
            L.Conv1D(6, 3, padding="causal", groups=1),
            L.Conv1D(6, 2, padding="causal", groups=3),
            L.LSTM(4, return_sequences=True),
            L.TimeDistributed(L.Dense(2)),
        ],
    }


@pytest.mark.parametrize(
    "name",
    [
        "lstm-relu",
        "lstm-no-bias-many-to-one",
        "lstm-hard-sigmoid-softsign-dropout",
        "rnn-lstmcell",
        "stacked-cells",
        "gru-reset-after",
        "gru-reset-before",
        "mixed",
        "batchnorm",
        "layernorm",
        "layernorm-rms-scaling",
        "normalization-given-mean-variance",
        "rescaling-identity-elu-leaky-relu",
        "cnn-lstm",
        "zero-padded-valid-conv",
        "grouped-conv",
    ],
)
@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")  # deprecated, still read
def test_reference_matches_keras_for_every_accepted_shape(name):
    import keras

    from convert import intake, reference

    model = keras_model(_accepted()[name])
    rng = np.random.default_rng(5)
    for layer in model.layers:  # a trained BatchNormalization is not the identity
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape))
    x = rng.normal(0, 1, (3, 20, 5)).astype(np.float32)
    spec = intake.spec_from_model(model)
    y, _, _ = reference.run(spec, x)
    want = model.predict(x, verbose=0)
    assert spec.sequence_output == (want.ndim == 3)
    np.testing.assert_allclose(y if want.ndim == 3 else y[:, -1], want, atol=2e-5)


def test_valid_convolution_streams_as_its_causal_twin():
    """A 'valid' convolution's outputs start (k-1)d samples late in Keras; a stream emits from
    the first sample with the zero buffer as padding, as the 'causal' twin does."""
    import keras

    from convert import intake, reference

    L = keras.layers
    valid = keras_model([L.Conv1D(4, 3, padding="valid"), L.LSTM(3, return_sequences=True)])
    causal = keras_model([L.Conv1D(4, 3, padding="causal"), L.LSTM(3, return_sequences=True)])
    causal.set_weights(valid.get_weights())
    x = np.random.default_rng(6).normal(0, 1, (2, 15, 5)).astype(np.float32)
    y, _, _ = reference.run(intake.spec_from_model(valid), x)
    np.testing.assert_allclose(y, causal.predict(x, verbose=0), atol=2e-5)


def test_keras_itself_checks_what_was_read():
    """Verification compares the bundle with the step read from the model: that step is
    compared with Keras' own run first, so a layer read wrongly cannot verify itself."""

    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    L = keras.layers
    x = np.random.default_rng(7).normal(0, 1, (4, 25, 5)).astype(np.float32)
    good = keras_model([L.LSTM(6, return_sequences=True), L.Dense(2)])
    spec = intake.spec_from_model(good)
    assert intake.check_agreement(good, spec, x) is None
    misread = _head_bias_off(spec)
    with pytest.raises(UnsupportedModel, match="differs from Keras' own run of it by 0.01"):
        intake.check_agreement(good, misread, x)
    valid = keras_model([L.Conv1D(4, 3, padding="valid"), L.LSTM(3, return_sequences=True)])
    said = intake.check_agreement(valid, intake.spec_from_model(valid), x)
    assert said is not None and "padding='valid' streams as its causal twin" in said
    conv, lstm = L.Conv1D(4, 3, padding="valid"), L.LSTM(3, return_sequences=True)
    padded = keras_model([L.ZeroPadding1D((2, 0)), conv, lstm])  # causal: nothing to say
    assert intake.check_agreement(padded, intake.spec_from_model(padded), x) is None


@pytest.mark.parametrize("first", ["lstm", "dense", "valid-conv"])
def test_a_layer_read_wrongly_beside_a_valid_convolution_is_refused_not_warned(first):
    """A 'valid' Conv1D that is not the model's first layer turned the check of what was read
    into the warning about 'valid' padding alone: a layer read wrongly was converted, its
    difference from Keras said to be the padding's. The step is checked against Keras' run of
    the causal twin (the stream), wherever the convolution is; the padding's own difference
    from Keras' model is still said."""
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    L = keras.layers
    before = {
        "lstm": L.LSTM(6, return_sequences=True),
        "dense": L.Dense(6),
        "valid-conv": L.Conv1D(6, 2, padding="valid"),
    }[first]
    conv = L.Conv1D(4, 3, padding="valid")
    model = keras_model([before, conv, L.LSTM(3, return_sequences=True), L.Dense(2)])
    x = np.random.default_rng(8).normal(0, 1, (4, 25, 5)).astype(np.float32)
    spec = intake.spec_from_model(model)
    said = intake.check_agreement(model, spec, x)
    assert said is not None and "padding='valid' streams as its causal twin" in said
    with pytest.raises(UnsupportedModel, match="differs from Keras' own run of it"):
        intake.check_agreement(model, _head_bias_off(spec), x)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_are_keras_own(name):
    import keras

    from convert import reference

    z = np.linspace(-8, 8, 161).reshape(7, 23)
    want = np.asarray(keras.activations.get(name)(z.astype(np.float32)))
    np.testing.assert_allclose(reference.activate(z, name), want, atol=2e-6, rtol=1e-5)

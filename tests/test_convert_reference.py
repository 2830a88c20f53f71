"""The NumPy reference LSTM against Keras itself, and the refusals of model intake."""

import numpy as np
import pytest

pytestmark = pytest.mark.desktop


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
        ([L.GRU(4)], "GRU", "not supported yet"),
        ([L.SimpleRNN(4)], "SimpleRNN", "not supported yet"),
        ([L.Conv1D(4, 3, padding="same"), L.LSTM(4)], "Conv1D", "window"),
        ([L.Masking(), L.LSTM(4)], "Masking", "masking"),
        ([L.LSTM(4, go_backwards=True)], "LSTM", "go_backwards"),
        ([L.LSTM(4, activation="relu")], "LSTM", "activation='tanh'"),
        (
            [L.LSTM(4, return_sequences=True), L.Dense(4), L.LSTM(4)],
            "LSTM",
            "after the head",
        ),
        ([L.LSTM(4, return_sequences=True) for _ in range(3)] + [L.LSTM(4)], "", "at most 3"),
        ([L.Dense(4)], "Dense", "before the first LSTM"),
        ([L.LSTM(4), L.Dense(3, activation="elu")], "Dense", "'elu'"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_unstreamable_models_are_refused_naming_the_layer(case):
    from convert import intake
    from convert.errors import UnsupportedModel

    layers, kind, reason = _refusals()[case]
    model = keras_model(layers)
    with pytest.raises(UnsupportedModel) as err:
        intake.spec_from_model(model)
    assert kind in str(err.value) and reason in str(err.value)


def test_stateful_lstm_is_refused():
    import keras

    from convert import intake
    from convert.errors import UnsupportedModel

    inp = keras.Input((None, 3), batch_size=2)
    model = keras.Model(inp, keras.layers.LSTM(4, stateful=True, name="mem")(inp))
    with pytest.raises(UnsupportedModel, match="'mem'.*stateful=True"):
        intake.spec_from_model(model)


def test_legacy_h5_models_are_read(tmp_path):
    import keras

    from convert import intake, reference

    model = keras_model([keras.layers.LSTM(6, return_sequences=True), keras.layers.Dense(2)])
    model.save(tmp_path / "legacy.h5")
    spec = intake.read_spec(tmp_path / "legacy.h5")
    x = np.random.default_rng(3).normal(0, 1, (2, 10, 5)).astype(np.float32)
    np.testing.assert_allclose(reference.run(spec, x)[0], model.predict(x, verbose=0), atol=2e-5)

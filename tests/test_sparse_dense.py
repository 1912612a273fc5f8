"""Tests of `SparseDense`, the fixed-random-connectivity dense layer."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_moe.layers.sparse import SparseDense


def _x(n=16, d=12, seed=0):
    return np.random.RandomState(seed).randn(n, d).astype("float32")


def test_output_matches_numpy():
    layer = SparseDense(7, density=0.5, bias_initializer="random_normal", seed=3)
    x = _x()
    y = np.asarray(layer(x))
    w = layer.kernel.numpy()
    m = layer.mask.numpy()
    b = layer.bias.numpy()
    assert set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_allclose(y, x @ (w * m) + b, rtol=1e-5, atol=1e-6)


def test_activation_and_no_bias():
    layer = SparseDense(5, density=0.7, activation="relu", use_bias=False, seed=1)
    x = _x()
    y = np.asarray(layer(x))
    expected = np.maximum(x @ (layer.kernel.numpy() * layer.mask.numpy()), 0.0)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert layer.bias is None
    assert [w.name for w in layer.trainable_weights] == ["kernel"]
    assert [w.name for w in layer.non_trainable_weights] == ["mask"]


def test_masked_weights_get_zero_gradient():
    layer = SparseDense(9, density=0.4, seed=5)
    x = tf.constant(_x())
    layer(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x)))
    grad = tape.gradient(loss, layer.kernel).numpy()
    m = layer.mask.numpy()
    assert np.all(grad[m == 0] == 0.0)
    assert np.any(grad[m == 1] != 0.0)


def test_empirical_density():
    for density in (0.1, 0.5, 0.9):
        layer = SparseDense(200, density=density, seed=11)
        layer.build((None, 200))
        assert abs(layer.mask.numpy().mean() - density) < 0.05
        assert layer.connection_count == int(layer.mask.numpy().sum())
    full = SparseDense(10, density=1.0)
    full.build((None, 4))
    assert full.connection_count == 40


def test_seed_determinism():
    def mask(seed):
        layer = SparseDense(50, density=0.5, seed=seed)
        layer.build((None, 40))
        return layer.mask.numpy()

    np.testing.assert_array_equal(mask(7), mask(7))
    assert not np.array_equal(mask(7), mask(8))


def test_set_mask():
    layer = SparseDense(3, seed=0)
    assert layer.connection_count is None
    wiring = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], "float32")
    layer.set_mask(wiring)  # builds with input_dim 4
    np.testing.assert_array_equal(layer.mask.numpy(), wiring)
    assert layer.connection_count == 6
    x = _x(5, 4)
    expected = x @ (layer.kernel.numpy() * wiring) + layer.bias.numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        layer.set_mask(np.ones((5, 3)))
    with pytest.raises(ValueError, match="mask"):
        layer.set_mask(np.ones((4, 2)))
    with pytest.raises(ValueError, match="mask"):
        layer.set_mask(np.full((4, 3), 0.5))


def test_save_load_restores_mask(tmp_path):
    inputs = keras.Input((12,))
    hidden = SparseDense(16, density=0.3, activation="relu", seed=2, name="sparse1")(inputs)
    outputs = SparseDense(4, density=0.6, name="sparse2")(hidden)  # seed None: random
    model = keras.Model(inputs, outputs)
    custom = np.random.RandomState(1).rand(16, 4) < 0.5
    model.get_layer("sparse2").set_mask(custom.astype("float32"))
    path = str(tmp_path / "sparse.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for name in ("sparse1", "sparse2"):
        np.testing.assert_array_equal(
            loaded.get_layer(name).mask.numpy(), model.get_layer(name).mask.numpy()
        )
    np.testing.assert_array_equal(loaded.get_layer("sparse2").mask.numpy(), custom)
    x = _x(8, 12)
    np.testing.assert_allclose(
        np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6
    )


def test_get_config_round_trip():
    layer = SparseDense(
        6, density=0.25, activation="tanh", use_bias=False, seed=4, name="sd"
    )
    config = layer.get_config()
    clone = SparseDense.from_config(config)
    assert clone.get_config() == config
    assert (clone.units, clone.density, clone.use_bias, clone.seed) == (6, 0.25, False, 4)
    layer.build((None, 10))
    clone.build((None, 10))
    np.testing.assert_array_equal(layer.mask.numpy(), clone.mask.numpy())
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, SparseDense)


def test_rank3_inputs():
    layer = SparseDense(5, seed=0)
    x = np.random.rand(2, 3, 4).astype("float32")
    y = np.asarray(layer(x))
    assert y.shape == (2, 3, 5)
    expected = x @ (layer.kernel.numpy() * layer.mask.numpy()) + layer.bias.numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1, float("nan"), True, "0.5"])
def test_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        SparseDense(4, density=density)


@pytest.mark.parametrize("units", [0, -1, 2.5, None])
def test_bad_units(units):
    with pytest.raises(ValueError, match="units"):
        SparseDense(units)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        SparseDense(4, seed=-1)


def test_unknown_last_dim():
    layer = SparseDense(4)
    with pytest.raises(ValueError, match="last dimension"):
        layer.build((None, None))


# `grouped_ffn`: the hand-written gradient of sparse dispatch's per-expert network -------


def _grouped_ffn_reference(x, expert_ids, layers, activation):
    """Every row through its own expert's weights, gathered per row; autodiff only."""
    h = x
    for index, (kernel, bias) in enumerate(layers):
        h = tf.einsum("nd,ndu->nu", h, tf.gather(kernel, expert_ids))
        if bias is not None:
            h = h + tf.gather(bias, expert_ids)
        if index < len(layers) - 1 and activation is not None:
            h = activation(h)
    return h


@pytest.mark.parametrize(
    "activation, sizes, use_bias",
    [
        (tf.nn.relu, (6, 9, 5), True),  # ReLU's own gradient kernel
        (tf.math.tanh, (6, 9, 5), True),  # any other activation: autodiff of it alone
        (None, (6, 9, 5), False),  # linear hidden layer, no biases
        (None, (7, 4), True),  # single-layer experts
    ],
)
@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_ffn_matches_autodiff_of_dense_reference(activation, sizes, use_bias, compiled):
    from keras_moe.layers import dispatch

    rng = np.random.default_rng(7)
    # Expert 0 gets no row; expert 2 gets more than dispatch._FEW_ROWS, so both forms of
    # the input-gradient product are checked.
    counts = np.array([0, 3, dispatch._FEW_ROWS + 44, 17, 1], np.int32)
    experts = len(counts)
    expert_ids = tf.constant(np.repeat(np.arange(experts), counts).astype("int32"))
    x = tf.constant(rng.normal(size=(counts.sum(), sizes[0])))
    layers = [
        (
            tf.constant(rng.normal(size=(experts, d_in, d_out)) / np.sqrt(d_in)),
            tf.constant(rng.normal(size=(experts, d_out))) if use_bias else None,
        )
        for d_in, d_out in zip(sizes[:-1], sizes[1:])
    ]
    sources = [x] + [w for layer in layers for w in layer if w is not None]
    upstream = tf.constant(rng.normal(size=(counts.sum(), sizes[-1])))

    def outputs_and_grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(sources)
            y = fn()
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, sources)

    def grouped():
        return dispatch.grouped_ffn(x, tf.constant(counts), layers, activation)

    def reference():
        return _grouped_ffn_reference(x, expert_ids, layers, activation)

    if compiled:
        run = tf.function(outputs_and_grads, autograph=False)
    else:
        run = outputs_and_grads
    y, grads = run(grouped)
    want_y, want_grads = outputs_and_grads(reference)
    assert y.dtype == tf.float64
    np.testing.assert_allclose(y.numpy(), want_y.numpy(), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(
            tf.convert_to_tensor(got).numpy(), tf.convert_to_tensor(want).numpy(),
            rtol=1e-10, atol=1e-12,
        )
    # The expert without rows gets exactly zero gradient.
    for kernel_grad in grads[1:]:
        assert np.all(tf.convert_to_tensor(kernel_grad).numpy()[0] == 0.0)

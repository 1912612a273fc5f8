"""`SparseDense`, the fixed-random-connectivity dense layer (StochasticNet), on TF and JAX."""

import numpy as np
import pytest

import keras

from keras_moe.layers.sparse_connectivity import SparseDense
from testing_utils import gradients, run_layer_test, to_numpy

pytestmark = pytest.mark.multi_backend


def _x(n=16, d=12, seed=0):
    return np.random.RandomState(seed).randn(n, d).astype("float32")


def test_output_matches_numpy():
    layer = SparseDense(7, density=0.5, bias_initializer="random_normal", seed=3)
    x = _x()
    y = np.asarray(layer(x))
    w = to_numpy(layer.kernel)
    m = to_numpy(layer.mask)
    b = to_numpy(layer.bias)
    assert set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_allclose(y, x @ (w * m) + b, rtol=1e-5, atol=1e-6)


def test_activation_and_no_bias():
    layer = SparseDense(5, density=0.7, activation="relu", use_bias=False, seed=1)
    x = _x()
    y = np.asarray(layer(x))
    expected = np.maximum(x @ (to_numpy(layer.kernel) * to_numpy(layer.mask)), 0.0)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert layer.bias is None
    assert [w.name for w in layer.trainable_weights] == ["kernel"]
    assert [w.name for w in layer.non_trainable_weights] == ["mask"]


def test_masked_weights_get_zero_gradient():
    layer = SparseDense(9, density=0.4, seed=5)
    x = _x()
    layer(x)
    _, _, (grad,) = gradients(
        lambda: keras.ops.sum(keras.ops.square(layer(x))), variables=[layer.kernel]
    )
    m = to_numpy(layer.mask)
    assert np.all(grad[m == 0] == 0.0)
    assert np.any(grad[m == 1] != 0.0)


def test_empirical_density():
    for density in (0.1, 0.5, 0.9):
        layer = SparseDense(200, density=density, seed=11)
        layer.build((None, 200))
        assert abs(to_numpy(layer.mask).mean() - density) < 0.05
        assert layer.connection_count == int(to_numpy(layer.mask).sum())
    full = SparseDense(10, density=1.0)
    full.build((None, 4))
    assert full.connection_count == 40


def test_seed_determinism():
    def mask(seed):
        layer = SparseDense(50, density=0.5, seed=seed)
        layer.build((None, 40))
        return to_numpy(layer.mask)

    np.testing.assert_array_equal(mask(7), mask(7))
    assert not np.array_equal(mask(7), mask(8))


def test_set_mask():
    layer = SparseDense(3, seed=0)
    assert layer.connection_count is None
    wiring = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], "float32")
    layer.set_mask(wiring)  # builds with input_dim 4
    np.testing.assert_array_equal(to_numpy(layer.mask), wiring)
    assert layer.connection_count == 6
    x = _x(5, 4)
    expected = x @ (to_numpy(layer.kernel) * wiring) + to_numpy(layer.bias)
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
            to_numpy(loaded.get_layer(name).mask), to_numpy(model.get_layer(name).mask)
        )
    np.testing.assert_array_equal(to_numpy(loaded.get_layer("sparse2").mask), custom)
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
    np.testing.assert_array_equal(to_numpy(layer.mask), to_numpy(clone.mask))
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(restored, SparseDense)


def test_rank3_inputs():
    layer = SparseDense(5, seed=0)
    x = np.random.rand(2, 3, 4).astype("float32")
    y = np.asarray(layer(x))
    assert y.shape == (2, 3, 5)
    expected = x @ (to_numpy(layer.kernel) * to_numpy(layer.mask)) + to_numpy(layer.bias)
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


def test_layer_contract(tmp_path):
    run_layer_test(
        SparseDense, dict(units=6, density=0.5, seed=2, activation="relu"), _x(n=4),
        expected_output_shape=(4, 6), expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=1, tmp_path=tmp_path,
    )

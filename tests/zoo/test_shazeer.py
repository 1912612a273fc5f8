"""Shazeer's noisy top-k classifier builder (tiny sizes, one full-size build)."""

import numpy as np
import pytest

import keras

from keras_moe.layers import MoEDense
from keras_moe.zoo import registry
from keras_moe.zoo.shazeer import sparse_moe_classifier

TINY = dict(input_shape=(4, 4, 1), num_classes=3, units=6, num_experts=5, top_k=2)


def _moe_layers(model):
    return [layer for layer in model.layers if isinstance(layer, MoEDense)]


def test_registered_with_description():
    assert "sparse_moe_classifier" in registry.list_models()
    assert "noisy top-k" in registry.describe("sparse_moe_classifier")


def test_shapes_layers_and_losses():
    model = sparse_moe_classifier(num_layers=2, **TINY)
    x = np.random.default_rng(0).random((7, 4, 4, 1)).astype("float32")
    assert model(x).shape == (7, 3)
    layers = _moe_layers(model)
    assert [layer.name for layer in layers] == ["moe_0", "moe_1"]
    for layer in layers:
        assert layer.top_k == 2 and layer.num_experts == 5
        assert type(layer.gate).__name__ == "NoisyTopKGate"
        assert [type(r).__name__ for r in layer.balance_loss] == ["ImportanceLoss", "LoadLoss"]
        assert [r.coefficient for r in layer.balance_loss] == [0.1, 0.1]
    model(x, training=True)
    assert len(model.losses) == 4
    model(x, training=False)
    assert model.losses == []


def test_importance_loss_value_against_numpy():
    keras.utils.set_random_seed(0)
    model = sparse_moe_classifier(load_weight=0.0, importance_weight=0.5, dropout=0.0, **TINY)
    layer = model.get_layer("moe_0")
    x = np.random.default_rng(1).random((9, 4, 4, 1)).astype("float32")
    # Random gate weights (the paper's zero init would route uniformly, by noise only).
    rng = np.random.default_rng(2)
    layer.gate.kernel.assign(rng.normal(size=layer.gate.kernel.shape).astype("float32"))
    layer.gate.noise_kernel.assign(np.full(layer.gate.noise_kernel.shape, -30.0, "float32"))
    model(x, training=True)
    assert len(model.losses) == 1
    # Noise std is softplus(-30 * sum x) + 0.01: tiny, so the noisy top-k equals the clean
    # top-k unless two logits are within a few hundredths (checked below).
    logits = x.reshape(9, -1).astype(np.float64) @ np.asarray(layer.gate.kernel, np.float64)
    ordered = np.sort(logits, axis=1)
    assert np.all(ordered[:, -2] - ordered[:, -3] > 0.2)
    gates = np.zeros_like(logits)
    for row, values in enumerate(logits):
        top = np.argsort(values)[-2:]
        e = np.exp(values[top] - values[top].max())
        gates[row, top] = e / e.sum()
    importance = gates.sum(0)
    expected = 0.5 * importance.var() / (importance.mean() ** 2 + 1e-10)
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=2e-3)


def test_no_losses_when_weights_are_zero_and_argument_errors():
    model = sparse_moe_classifier(importance_weight=0.0, load_weight=0.0, **TINY)
    model(np.zeros((2, 4, 4, 1), "float32"), training=True)
    assert model.losses == []
    with pytest.raises(ValueError, match="num_layers"):
        sparse_moe_classifier(num_layers=0, **TINY)
    with pytest.raises(ValueError, match="top_k"):
        sparse_moe_classifier(**{**TINY, "top_k": 9})
    with pytest.raises(ValueError, match="dropout"):
        sparse_moe_classifier(dropout=1.0, **TINY)


def test_parameters_grow_with_experts_at_fixed_k():
    small = sparse_moe_classifier(**{**TINY, "num_experts": 4}).count_params()
    large = sparse_moe_classifier(**{**TINY, "num_experts": 8}).count_params()
    # Per expert: kernel 16 x 6 + bias 6, plus two gate columns (W_g, W_noise) of 16.
    assert large - small == 4 * (16 * 6 + 6 + 2 * 16)


def test_trains_one_step_and_round_trips(tmp_path):
    model = sparse_moe_classifier(**TINY)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((16, 4, 4, 1)).astype("float32")
    y = np.arange(16) % 3
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = str(tmp_path / "s.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


def test_full_size_builds():
    model = sparse_moe_classifier()
    assert model.output.shape == (None, 10)
    layer = model.get_layer("moe_0")
    assert (layer.num_experts, layer.top_k, layer.units) == (32, 2, 256)
    # Experts, the gate's two kernels, the classifier, and the two scalar counters of
    # dropped and routed assignments every top-k layer keeps (non-trainable).
    expected = 32 * (784 * 256 + 256) + 2 * 784 * 32 + 256 * 10 + 10 + 2
    assert model.count_params() == expected

"""Gated (GLU) experts in MoEDense, the shared-expert sigmoid gate and SoftmaxGate's
top-k options: numerics against float64 numpy, dispatch modes against each other,
serialization and errors.

Runs on TensorFlow and on JAX (`multi_backend`).
"""

import keras
import numpy as np
import pytest
from scipy.special import erf

from keras_moe.layers import MoEDense, SoftmaxGate
from testing_utils import as_array, gradients, outputs_and_gradients, to_numpy

pytestmark = pytest.mark.multi_backend


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


NUMPY_GLU = {
    "swiglu": lambda g, u: g * _sigmoid(g) * u,
    "geglu": lambda g, u: 0.5 * g * (1.0 + erf(g / np.sqrt(2.0))) * u,
    "geglu_tanh": lambda g, u: _gelu_tanh(g) * u,
    # GPT-OSS, written out: gate clipped above at 7, up clipped to [-7, 7].
    "clamped_swiglu": lambda g, u: (np.clip(u, -7, 7) + 1) * np.minimum(g, 7)
    * _sigmoid(1.702 * np.minimum(g, 7)),
}


def _w(variable):
    return np.float64(to_numpy(variable))


def numpy_gated_moe(layer, x):
    """float64 reference of a gated MoEDense behind a linear SoftmaxGate."""
    x = np.float64(x)
    gate = layer.gate
    logits = x @ _w(gate.kernel) + (_w(gate.bias) if gate.use_bias else 0.0)
    probs = _softmax(logits)
    gates = np.zeros_like(logits)
    rows = np.arange(len(x))[:, None]
    top = np.argsort(-logits, axis=-1)[:, : layer.top_k]
    gates[rows, top] = (_softmax(logits[rows, top]) if gate.normalize_top_k
                        else probs[rows, top])
    glu = NUMPY_GLU[layer.gated_experts]

    def expert(weights, e):
        def b(name):
            return weights[name][e] if layer.use_bias else 0.0
        h = glu(x @ weights["gate_kernel"][e] + b("gate_bias"),
                x @ weights["hidden_kernel"][e] + b("hidden_bias"))
        return h @ weights["kernel"][e] + b("bias")

    routed = {k: _w(v) for k, v in layer.stacked_expert_weights().items()}
    out = sum(gates[:, e:e + 1] * expert(routed, e) for e in range(layer.num_experts))
    if layer.num_shared_experts:
        shared = {k: _w(v) for k, v in layer._shared_weights.items()}
        shared_out = sum(expert(shared, e) for e in range(layer.num_shared_experts))
        if layer.shared_expert_gate:
            shared_out = shared_out * _sigmoid(x @ _w(layer._shared_gate_kernel))
        out = out + shared_out
    return out, gates


def _randomize(layer, seed=0):
    """Random values in every weight (biases too), scaled so the GLU clamps bite."""
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        if w.trainable:
            w.assign(rng.normal(0, 1.0, w.shape).astype("float32"))


@pytest.mark.parametrize("gated, dispatch, shared, use_bias, normalize", [
    ("swiglu", "sparse", 0, False, True),
    ("geglu", "dense", 1, True, True),
    ("geglu_tanh", "capacity", 0, True, False),
    ("clamped_swiglu", "sparse", 2, True, True),
])
def test_gated_forward_matches_numpy_float64(gated, dispatch, shared, use_bias, normalize):
    rng = np.random.default_rng(1)
    x = (3.0 * rng.normal(size=(48, 6))).astype("float32")
    gate = SoftmaxGate(5, top_k=2, use_bias=use_bias, normalize_top_k=normalize)
    layer = MoEDense(4, num_experts=5, top_k=2, gate=gate, expert_hidden_units=3,
                     gated_experts=gated, use_bias=use_bias, dispatch=dispatch,
                     capacity_factor=5.0, num_shared_experts=shared,
                     shared_expert_gate=bool(shared), return_gates=True)
    layer.build(x.shape)
    _randomize(layer)
    outputs, gates = layer(x)
    expected, expected_gates = numpy_gated_moe(layer, x)
    if gated == "clamped_swiglu":  # the clamps are reached on these inputs
        h = np.float64(x) @ _w(layer.gate_kernel)[0]
        assert (h > 7).any()
    np.testing.assert_allclose(to_numpy(gates), expected_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(outputs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gated", ["clamped_swiglu"])
def test_gated_dispatch_modes_agree_on_outputs_and_gradients(gated):
    """Sparse (TensorFlow's hand-written grouped-FFN gradient, JAX's ragged_dot),
    capacity and dense dispatch: same outputs and gradients for every weight."""
    x = (2.0 * np.random.default_rng(2).normal(size=(64, 8))).astype("float32")
    layers = {}
    for mode in ("dense", "sparse", "capacity"):
        layers[mode] = MoEDense(6, num_experts=4, top_k=2, expert_hidden_units=5,
                                gated_experts=gated, dispatch=mode, capacity_factor=4.0,
                                num_shared_experts=1, shared_expert_gate=True)
        layers[mode].build(x.shape)
    _randomize(layers["dense"], seed=3)
    for mode in ("sparse", "capacity"):
        for src, dst in zip(layers["dense"].trainable_weights, layers[mode].trainable_weights):
            dst.assign(src)
    results = {mode: outputs_and_gradients(layer, x) for mode, layer in layers.items()}
    names = [w.path.split("/")[-1] for w in layers["dense"].trainable_weights]
    assert {"gate_kernel", "gate_bias", "shared_expert_gate_kernel"} <= set(names)
    assert np.abs(results["dense"][1][names.index("gate_kernel") + 1]).sum() > 0
    for mode in ("sparse", "capacity"):
        np.testing.assert_allclose(results[mode][0], results["dense"][0], rtol=1e-5, atol=1e-5)
        for got, want in zip(results[mode][1], results["dense"][1]):
            np.testing.assert_allclose(as_array(got, want), as_array(want, got),
                                       rtol=1e-4, atol=1e-4)


def test_gated_layer_config_and_keras_file_round_trip(tmp_path):
    layer = MoEDense(5, num_experts=4, top_k=2, expert_hidden_units=7, gated_experts="swiglu",
                     gate=SoftmaxGate(4, top_k=2, use_bias=False, normalize_top_k=False),
                     num_shared_experts=2, shared_expert_gate=True, use_bias=False)
    config = layer.get_config()
    clone = MoEDense.from_config(config)
    assert clone.get_config() == config
    assert clone.gated_experts == "swiglu" and clone.shared_expert_gate
    assert not clone.gate.use_bias and not clone.gate.normalize_top_k

    model = keras.Sequential([keras.Input((6,)), layer, keras.layers.Dense(3)])
    model.compile("adam", "mse")
    x = np.random.default_rng(9).normal(size=(16, 6)).astype("float32")
    model.fit(x, np.zeros((16, 3)), epochs=1, verbose=0)
    path = str(tmp_path / "gated.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)
    assert "bias" not in [w.path.split("/")[-1] for w in restored.layers[0].gate.weights]


def test_default_config_is_unchanged_for_plain_experts():
    """Files written before gated experts existed hold configs without the new keys."""
    layer = MoEDense(5, num_experts=4, top_k=2, expert_hidden_units=7)
    config = layer.get_config()
    old = {k: v for k, v in config.items() if k not in ("gated_experts", "shared_expert_gate")}
    clone = MoEDense.from_config(old)
    clone.build((None, 3))
    assert clone.gated_experts is None
    assert [w.path.split("/")[-1] for w in clone.trainable_weights] == [
        "hidden_kernel", "hidden_bias", "kernel", "bias", "kernel", "bias"]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(gated_experts="swiglu"), "expert_hidden_units"),
    (dict(gated_experts="reglu", expert_hidden_units=4), "gated_experts"),
    (dict(shared_expert_gate=True), "num_shared_experts"),
])
def test_bad_gated_arguments_raise_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MoEDense(4, num_experts=4, top_k=2, **kwargs)


def test_normalize_top_k_false_needs_top_k():
    with pytest.raises(ValueError, match="normalize_top_k"):
        SoftmaxGate(4, normalize_top_k=False)

"""Gate layers (`keras_moe.layers.gates`) against float64 references, on TF and JAX."""

import keras
import numpy as np
import pytest

from keras_moe.layers import NoisyTopKGate, ReLUGate, SoftmaxGate
from testing_utils import run_layer_test, to_numpy

pytestmark = pytest.mark.multi_backend


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top_k_reference(logits, selection, k):
    """Gates: softmax over the k largest `selection` logits' values, zero elsewhere."""
    top = np.argsort(-selection, axis=-1, kind="stable")[:, :k]
    rows = np.arange(len(logits))[:, None]
    gates = np.zeros_like(logits)
    gates[rows, top] = _softmax(selection[rows, top])
    return gates, top


def _gate_keys(top_k):
    keys = ["gates", "logits", "probs", "dispatch_mask", "load"]
    return keys + (["top_k_indices", "top_k_gates"] if top_k else [])


@pytest.mark.parametrize("top_k, hidden_units", [(None, None), (None, 6), (2, None), (3, 5)])
def test_softmax_gate_matches_reference(top_k, hidden_units):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 7)).astype("float32")
    gate = SoftmaxGate(5, top_k=top_k, hidden_units=hidden_units)
    gate.build(x.shape)
    for w in gate.weights:
        w.assign(rng.normal(0, 0.7, w.shape).astype("float32"))
    out = to_numpy(gate(x, training=True))
    assert sorted(out) == sorted(_gate_keys(top_k))
    h = x.astype(np.float64)
    if hidden_units:
        h = np.maximum(h @ to_numpy(gate.hidden_kernel) + to_numpy(gate.hidden_bias), 0)
    logits = h @ to_numpy(gate.kernel) + to_numpy(gate.bias)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probs"], _softmax(logits), rtol=1e-5, atol=1e-6)
    if top_k is None:
        np.testing.assert_allclose(out["gates"], _softmax(logits), rtol=1e-5, atol=1e-6)
        chosen = np.argmax(logits, axis=-1)[:, None]
    else:
        gates, chosen = _top_k_reference(logits, logits, top_k)
        np.testing.assert_allclose(out["gates"], gates, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.sort(out["top_k_indices"], -1), np.sort(chosen, -1))
    mask = np.zeros_like(logits)
    mask[np.arange(len(x))[:, None], chosen] = 1.0
    np.testing.assert_array_equal(out["dispatch_mask"], mask)
    np.testing.assert_allclose(out["load"], mask.sum(0))


def test_noisy_top_k_gate_adds_the_seeded_noise_of_shazeer_eq_4():
    """H = x W_g + N(0, 1) * (softplus(x W_noise) + eps), with the gate's own seed."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype("float32")
    gate = NoisyTopKGate(8, top_k=2, seed=11)
    gate.build(x.shape)
    gate.kernel.assign(rng.normal(0, 0.3, (6, 8)).astype("float32"))
    gate.noise_kernel.assign(rng.normal(0, 0.3, (6, 8)).astype("float32"))
    out = to_numpy(gate(x, training=True))
    # The same draw from a fresh generator with the same seed.
    noise = to_numpy(keras.random.normal((64, 8), seed=keras.random.SeedGenerator(11)))
    clean = x.astype(np.float64) @ to_numpy(gate.kernel)
    stddev = np.log1p(np.exp(x.astype(np.float64) @ to_numpy(gate.noise_kernel))) + 1e-2
    noisy = clean + noise * stddev
    gates, _ = _top_k_reference(clean, noisy, 2)
    np.testing.assert_allclose(out["logits"], clean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["gates"], gates, rtol=1e-4, atol=1e-5)
    # Evaluation: no noise, top 2 of the clean logits.
    evaluation = to_numpy(gate(x, training=False))
    np.testing.assert_allclose(evaluation["gates"], _top_k_reference(clean, clean, 2)[0],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(evaluation["load"], (evaluation["gates"] > 0).sum(0))


def test_noisy_gate_starts_uniform_and_routes_by_noise():
    """W_g = W_noise = 0 at the start: every expert is chosen about k / E of the time."""
    x = np.random.default_rng(2).normal(size=(4096, 4)).astype("float32")
    gate = NoisyTopKGate(8, top_k=2, seed=0)
    share = to_numpy(gate(x, training=True)["dispatch_mask"]).mean(0)
    np.testing.assert_allclose(share, 2 / 8, atol=0.03)


def test_smooth_load_says_whether_the_training_load_has_a_gradient():
    assert NoisyTopKGate(4, top_k=2).smooth_load
    assert not NoisyTopKGate(4, top_k=2, noisy=False).smooth_load
    assert not NoisyTopKGate(4, top_k=4).smooth_load  # every expert always chosen
    assert not SoftmaxGate(4, top_k=2).smooth_load


def test_relu_gate_matches_reference_and_starts_open():
    e = np.random.default_rng(3).dirichlet(np.ones(10), size=6).astype("float32")
    head = ReLUGate(16, use_bias=True)
    out = to_numpy(head(e))
    logits = e.astype(np.float64) @ to_numpy(head.kernel) + to_numpy(head.bias)
    np.testing.assert_allclose(out["gates"], np.maximum(logits, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["dispatch_mask"], (out["gates"] > 0).astype("float32"))
    # W ~ N(1, 0.01) and e on the simplex: every gate starts at about 1.
    np.testing.assert_allclose(out["gates"], 1.0, atol=0.05)


@pytest.mark.parametrize(
    "layer_cls, init_kwargs, top_k",
    [
        (SoftmaxGate, dict(num_experts=4, hidden_units=3), None),
        (SoftmaxGate, dict(num_experts=4, top_k=2), 2),
        (NoisyTopKGate, dict(num_experts=4, top_k=2, kernel_initializer="random_normal"), 2),
    ],
)
def test_routing_gate_layer_contract(tmp_path, layer_cls, init_kwargs, top_k):
    x = np.random.default_rng(4).normal(size=(6, 5)).astype("float32")
    shapes = {key: (6, 4) for key in _gate_keys(top_k)}
    shapes["load"] = (4,)
    if top_k:
        shapes["top_k_indices"] = shapes["top_k_gates"] = (6, top_k)
    run_layer_test(layer_cls, init_kwargs, x, expected_output_shape=shapes, tmp_path=tmp_path)


def test_relu_gate_layer_contract(tmp_path):
    e = np.random.default_rng(5).dirichlet(np.ones(3), size=4).astype("float32")
    run_layer_test(
        ReLUGate, dict(units=5), e,
        expected_output_shape={"gates": (4, 5), "logits": (4, 5), "dispatch_mask": (4, 5)},
        expected_num_trainable_weights=1, tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: SoftmaxGate(0), "num_experts"),
        (lambda: SoftmaxGate(3, top_k=4), "top_k"),
        (lambda: SoftmaxGate(3, hidden_units=0), "hidden_units"),
        (lambda: NoisyTopKGate(3, top_k=None), "top_k"),
        (lambda: NoisyTopKGate(3, top_k=2, noise_epsilon=0.0), "noise_epsilon"),
        (lambda: ReLUGate(0), "units"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()

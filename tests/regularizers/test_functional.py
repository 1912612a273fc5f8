"""Tests of keras_moe.regularizers.functional against float64 numpy references.

Backend-neutral: every test runs on TensorFlow and on JAX (values through `to_numpy`,
gradients through `testing_utils.gradients`), except the TensorFlow-graph test with an
unknown number of tokens, whose JAX counterpart runs under `jax.jit`.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import regularizers as R
from regularizers.regularizer_references import ATOL
from regularizers.regularizer_references import RTOL
from regularizers.regularizer_references import noisy_inputs
from regularizers.regularizer_references import np_batch_entropy
from regularizers.regularizer_references import np_batch_variance
from regularizers.regularizer_references import np_cv_squared
from regularizers.regularizer_references import np_entropy
from regularizers.regularizer_references import np_l1
from regularizers.regularizer_references import np_noisy_top_k_load
from regularizers.regularizer_references import np_router_z
from regularizers.regularizer_references import np_sample_entropy
from regularizers.regularizer_references import np_sample_variance
from regularizers.regularizer_references import np_sequence_balance
from regularizers.regularizer_references import np_switch
from regularizers.regularizer_references import random_gates
from regularizers.regularizer_references import requires_jax
from regularizers.regularizer_references import top_k_gates
from testing_utils import as_array
from testing_utils import assert_no_gradient
from testing_utils import gradients
from testing_utils import requires_tensorflow
from testing_utils import to_numpy

pytestmark = pytest.mark.multi_backend


# ----------------------------------------------------------------------------------------
# cv_squared, importance, load
# ----------------------------------------------------------------------------------------


def test_cv_squared_uses_population_variance():
    x = np.random.default_rng(0).uniform(0.5, 3.0, size=7).astype(np.float32)
    value = float(to_numpy(R.cv_squared(x)))
    np.testing.assert_allclose(value, np_cv_squared(x), rtol=RTOL)
    unbiased = x.astype(np.float64).var(ddof=1) / x.astype(np.float64).mean() ** 2
    assert not np.isclose(value, unbiased, rtol=1e-3)


def test_cv_squared_minimum_and_edge_cases():
    assert float(to_numpy(R.cv_squared(np.full(6, 2.5, np.float32)))) == 0.0
    assert float(to_numpy(R.cv_squared(np.array([3.0], np.float32)))) == 0.0
    assert float(to_numpy(R.cv_squared(np.zeros(4, np.float32)))) == 0.0
    assert np.isfinite(to_numpy(R.cv_squared(np.zeros(0, np.float32))))
    with pytest.raises(ValueError, match="1-D"):
        R.cv_squared(np.ones((2, 2), np.float32))


def test_cv_squared_float64_input_returns_float32():
    result = R.cv_squared(np.array([1.0, 2.0, 4.0]))
    assert keras.backend.standardize_dtype(result.dtype) == "float32"


def test_importance_and_importance_cv_squared():
    gates = random_gates(1)
    np.testing.assert_allclose(
        to_numpy(R.importance(gates)), gates.astype(np.float64).sum(axis=0), rtol=RTOL
    )
    np.testing.assert_allclose(
        float(to_numpy(R.importance_cv_squared(gates))),
        np_cv_squared(gates.astype(np.float64).sum(axis=0)),
        rtol=RTOL,
    )


def test_importance_cv_squared_minimum_at_uniform_gates():
    gates = np.full((10, 4), 0.25, np.float32)
    assert float(to_numpy(R.importance_cv_squared(gates))) == pytest.approx(0.0, abs=1e-12)


def test_importance_flattens_leading_axes():
    gates = random_gates(2, tokens=12).reshape(3, 4, 5)
    np.testing.assert_allclose(
        to_numpy(R.importance(gates)), gates.reshape(12, 5).sum(axis=0), rtol=RTOL
    )


def test_load_cv_squared():
    load = np.array([3.0, 7.5, 1.0, 4.0], np.float32)
    np.testing.assert_allclose(
        float(to_numpy(R.load_cv_squared(load))), np_cv_squared(load), rtol=RTOL
    )


# ----------------------------------------------------------------------------------------
# noisy_top_k_load
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_noisy_top_k_load_matches_reference(k):
    clean, noisy, stddev = noisy_inputs(3)
    load = to_numpy(R.noisy_top_k_load(clean, noisy, stddev, k))
    assert load.shape == (6,)
    np.testing.assert_allclose(load, np_noisy_top_k_load(clean, noisy, stddev, k), rtol=RTOL)


def test_noisy_top_k_load_scalar_stddev():
    clean, noisy, _ = noisy_inputs(4)
    np.testing.assert_allclose(
        to_numpy(R.noisy_top_k_load(clean, noisy, 0.7, 2)),
        np_noisy_top_k_load(clean, noisy, 0.7, 2),
        rtol=RTOL,
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_top_k_load_monte_carlo(k):
    """P(x, i) is the chance that i is in the top k when only i's noise is redrawn."""
    rng = np.random.default_rng(10 + k)
    tokens, experts, samples = 3, 5, 20000
    clean = rng.normal(size=(tokens, experts))
    stddev = rng.uniform(0.3, 1.2, size=(tokens, experts))
    noisy = clean + stddev * rng.normal(size=(tokens, experts))

    # The estimator's per-token probabilities: the load of a one-token batch.
    estimate = np.stack(
        [
            to_numpy(
                R.noisy_top_k_load(
                    clean[t : t + 1].astype(np.float32),
                    noisy[t : t + 1].astype(np.float32),
                    stddev[t : t + 1].astype(np.float32),
                    k,
                )
            )
            for t in range(tokens)
        ]
    )

    empirical = np.zeros((tokens, experts))
    for t in range(tokens):
        for i in range(experts):
            redrawn = clean[t, i] + stddev[t, i] * rng.normal(size=samples)
            others = np.delete(noisy[t], i)
            # i is in the top k iff fewer than k other experts beat it.
            beaten_by = (others[None, :] > redrawn[:, None]).sum(axis=1)
            empirical[t, i] = np.mean(beaten_by < k)
    np.testing.assert_allclose(estimate, empirical, atol=0.012)
    # Each token's probabilities sum to about k (exact only in expectation).
    assert np.all(np.abs(estimate.sum(axis=1) - k) < k)


def test_noisy_top_k_load_zero_stddev_gives_hard_counts_without_nan():
    clean, _, _ = noisy_inputs(5)
    k = 2
    stddev = np.zeros_like(clean)
    load = to_numpy(R.noisy_top_k_load(clean, clean, stddev, k))
    # The gradient of the summed load (what a tape takes of a vector target).
    _, grads, _ = gradients(
        lambda c, s: ops.sum(R.noisy_top_k_load(c, c, s, k)), inputs=[clean, stddev]
    )
    assert np.all(np.isfinite(load))
    top = np.argsort(-clean, axis=-1)[:, :k]
    counts = np.zeros(clean.shape[1])
    for row in top:
        counts[row] += 1
    np.testing.assert_allclose(load, counts)
    for grad in grads:
        assert grad is None or np.all(np.isfinite(grad))
    # Scalar zero stddev and a noisy vector that differs from the clean one.
    _, noisy, _ = noisy_inputs(6)
    value = to_numpy(R.noisy_top_k_load(clean, noisy, 0.0, k))
    np.testing.assert_allclose(value, np_noisy_top_k_load(clean, noisy, 0.0, k))


def test_noisy_top_k_load_tiny_stddev_has_finite_gradients():
    clean, _, _ = noisy_inputs(7)
    stddev = np.full(clean.shape, 1e-9, np.float32)
    noise = np.random.default_rng(0).normal(size=clean.shape).astype(np.float32)

    def loss(clean_logits, noise_stddev):
        noisy_logits = clean_logits + noise_stddev * noise
        return R.load_cv_squared(R.noisy_top_k_load(clean_logits, noisy_logits, noise_stddev, 2))

    _, grads, _ = gradients(loss, inputs=[clean, stddev])
    for grad in grads:
        assert np.all(np.isfinite(grad))


def test_noisy_top_k_load_gradients_flow():
    clean, noisy, stddev = noisy_inputs(8)
    eps = (noisy - clean) / stddev

    def loss(clean_logits, noise_stddev):
        noisy_logits = clean_logits + noise_stddev * eps
        return R.load_cv_squared(R.noisy_top_k_load(clean_logits, noisy_logits, noise_stddev, 2))

    _, (grad_clean, grad_stddev), _ = gradients(loss, inputs=[clean, stddev])
    for grad in (grad_clean, grad_stddev):
        assert np.all(np.isfinite(grad))
        assert np.abs(grad).max() > 1e-6


def test_noisy_top_k_load_gradient_matches_finite_difference():
    clean, noisy, stddev = noisy_inputs(9, tokens=4, experts=4)
    clean64 = clean.astype(np.float64)
    weights = np.array([1.0, -2.0, 0.5, 3.0])
    weights32 = weights.astype(np.float32)
    _, (grad,), _ = gradients(
        lambda c: ops.sum(R.noisy_top_k_load(c, noisy, stddev, 1) * weights32), inputs=[clean]
    )
    h = 1e-5
    numeric = np.zeros_like(clean64)
    for t in range(4):
        for i in range(4):
            plus, minus = clean64.copy(), clean64.copy()
            plus[t, i] += h
            minus[t, i] -= h
            numeric[t, i] = (
                weights @ np_noisy_top_k_load(plus, noisy, stddev, 1)
                - weights @ np_noisy_top_k_load(minus, noisy, stddev, 1)
            ) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("k", [0, 6, 7, 1.5, True])
def test_noisy_top_k_load_rejects_bad_k(k):
    clean, noisy, stddev = noisy_inputs(0)
    with pytest.raises(ValueError, match="`k`"):
        R.noisy_top_k_load(clean, noisy, stddev, k)


@requires_tensorflow
def test_noisy_top_k_load_in_tf_function_with_unknown_tokens():
    import tensorflow as tf

    spec = tf.TensorSpec((None, 6), tf.float32)

    @tf.function(input_signature=[spec, spec, spec])
    def load(clean, noisy, stddev):
        return R.noisy_top_k_load(clean, noisy, stddev, 2)

    clean, noisy, stddev = noisy_inputs(11)
    np.testing.assert_allclose(
        to_numpy(load(clean, noisy, stddev)),
        np_noisy_top_k_load(clean, noisy, stddev, 2),
        rtol=RTOL,
    )


@requires_jax
def test_noisy_top_k_load_under_jax_jit():
    """The JAX counterpart of the graph test: traced once per (static) token count."""
    import jax

    load = jax.jit(lambda clean, noisy, stddev: R.noisy_top_k_load(clean, noisy, stddev, 2))
    for tokens in (11, 4):
        clean, noisy, stddev = noisy_inputs(11, tokens=tokens)
        np.testing.assert_allclose(
            to_numpy(load(clean, noisy, stddev)),
            np_noisy_top_k_load(clean, noisy, stddev, 2),
            rtol=RTOL,
        )


# ----------------------------------------------------------------------------------------
# Switch load balance and router z-loss
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_switch_load_balance_matches_reference(k):
    outputs = top_k_gates(12, k=k)
    value = float(to_numpy(R.switch_load_balance(outputs["probs"], outputs["dispatch_mask"])))
    np.testing.assert_allclose(
        value, np_switch(outputs["probs"], outputs["dispatch_mask"]), rtol=RTOL
    )


def test_switch_load_balance_fraction_sums_to_one_with_varying_k_and_dropped_tokens():
    outputs = top_k_gates(13, tokens=8, experts=4, k=2)
    mask = outputs["dispatch_mask"].copy()
    mask[0] = 0.0  # dropped by capacity
    mask[1] = [1.0, 1.0, 1.0, 0.0]  # sent to three experts
    probs = outputs["probs"]
    np.testing.assert_allclose(
        float(to_numpy(R.switch_load_balance(probs, mask))), np_switch(probs, mask), rtol=RTOL
    )
    # With uniform probabilities the loss is E * sum_e f_e / E = sum_e f_e = 1.
    uniform = np.full_like(probs, 0.25)
    assert float(to_numpy(R.switch_load_balance(uniform, mask))) == pytest.approx(1.0, rel=RTOL)


def test_switch_load_balance_minimum_at_uniform_routing():
    experts = 4
    mask = np.tile(np.eye(experts, dtype=np.float32), (3, 1))  # each expert 3 tokens
    probs = np.full((12, experts), 1.0 / experts, np.float32)
    assert float(to_numpy(R.switch_load_balance(probs, mask))) == pytest.approx(1.0, rel=RTOL)
    # Any imbalance that the probabilities follow raises it above 1.
    outputs = top_k_gates(14, experts=experts, k=1)
    assert float(to_numpy(R.switch_load_balance(outputs["probs"], outputs["dispatch_mask"]))) > 1.0


def test_switch_load_balance_gradient_only_through_probs():
    outputs = top_k_gates(15, tokens=10, experts=5, k=2)
    _, (grad_probs, grad_mask), _ = gradients(
        R.switch_load_balance, inputs=[outputs["probs"], outputs["dispatch_mask"]]
    )
    assert_no_gradient(grad_mask)
    fraction = outputs["dispatch_mask"].mean(axis=0) / 2.0
    expected = np.tile(5 * fraction / 10, (10, 1))
    np.testing.assert_allclose(grad_probs, expected, rtol=RTOL)


@pytest.mark.parametrize("k, length", [(1, 4), (2, 5), (3, 20)])
def test_sequence_balance_loss_matches_reference(k, length):
    outputs = top_k_gates(17, tokens=20, experts=6, k=k)
    value = float(to_numpy(R.sequence_balance_loss(outputs["probs"], outputs["dispatch_mask"],
                                                   length)))
    np.testing.assert_allclose(
        value, np_sequence_balance(outputs["probs"], outputs["dispatch_mask"], length),
        rtol=RTOL)


def test_sequence_balance_loss_is_one_for_evenly_spread_sequences_and_more_otherwise():
    probs = np.full((8, 4), 0.25, np.float32)
    even = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 3, 2, 1, 0]]  # 2 sequences of 4
    assert float(to_numpy(R.sequence_balance_loss(probs, even, 4))) == pytest.approx(1.0)
    # The same tokens as one batch are balanced; as sequences of 2 they are not.
    skewed = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2, 3, 3]]
    peaked = np.where(skewed > 0, 0.7, 0.1).astype(np.float32)
    assert float(to_numpy(R.sequence_balance_loss(peaked, skewed, 8))) == pytest.approx(1.0)
    assert float(to_numpy(R.sequence_balance_loss(peaked, skewed, 2))) > 2.0


def test_sequence_balance_loss_gradient_only_through_probs_and_nan_tokens_left_out():
    outputs = top_k_gates(18, tokens=12, experts=5, k=2)
    _, (grad_probs, grad_mask), _ = gradients(
        lambda p, m: R.sequence_balance_loss(p, m, 4),
        inputs=[outputs["probs"], outputs["dispatch_mask"]])
    assert_no_gradient(grad_mask)
    # d/dP[t, e] of mean_s sum_e f_e P_e = f_e(s) / (T * sequences).
    mask = outputs["dispatch_mask"].reshape(3, 4, 5).astype(np.float64)
    f = 5 / (2 * 4) * mask.sum(1)
    np.testing.assert_allclose(grad_probs.reshape(3, 4, 5),
                               np.repeat(f[:, None, :], 4, 1) / (4 * 3), rtol=RTOL)
    # A NaN token drops out of its own sequence only.
    probs = np.array(outputs["probs"], copy=True)
    probs[5] = np.nan
    value = float(to_numpy(R.sequence_balance_loss(probs, outputs["dispatch_mask"], 4)))
    keep = [r for r in range(12) if r != 5]
    parts = [np_sequence_balance(outputs["probs"][rows], outputs["dispatch_mask"][rows], len(rows))
             for rows in ([r for r in keep if r < 4], [r for r in keep if 4 <= r < 8],
                          [r for r in keep if r >= 8])]
    assert value == pytest.approx(np.mean(parts), rel=RTOL)


def test_router_z_loss():
    logits = 3.0 * np.random.default_rng(16).normal(size=(9, 5)).astype(np.float32)
    np.testing.assert_allclose(
        float(to_numpy(R.router_z_loss(logits))), np_router_z(logits), rtol=RTOL
    )
    at_minimum = np.full((4, 5), -np.log(5.0), np.float32)
    assert float(to_numpy(R.router_z_loss(at_minimum))) == pytest.approx(0.0, abs=1e-10)


# ----------------------------------------------------------------------------------------
# entropy and variance gate losses, L1
# ----------------------------------------------------------------------------------------


def test_entropy_matches_reference_and_is_safe_at_zero():
    p = random_gates(17)
    p[0] = [1.0, 0.0, 0.0, 0.0, 0.0]
    p[1, :2] = 0.0
    np.testing.assert_allclose(to_numpy(R.entropy(p)), np_entropy(p), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        to_numpy(R.entropy(p, axis=0)), np_entropy(p, axis=0), rtol=RTOL, atol=ATOL
    )
    assert float(to_numpy(R.entropy(np.array([1.0, 0.0, 0.0], np.float32)))) == 0.0
    _, (grad,), _ = gradients(lambda x: ops.sum(R.entropy(x)), inputs=[p])
    assert np.all(np.isfinite(grad))


def test_batch_and_sample_entropy_losses():
    gates = random_gates(18)
    np.testing.assert_allclose(
        float(to_numpy(R.batch_entropy_loss(gates))), np_batch_entropy(gates), rtol=RTOL
    )
    np.testing.assert_allclose(
        float(to_numpy(R.sample_entropy_loss(gates))), np_sample_entropy(gates), rtol=RTOL
    )


def test_entropy_losses_minima():
    experts = 4
    one_hot = np.tile(np.eye(experts, dtype=np.float32), (2, 1))  # uniform mean gate
    assert float(to_numpy(R.batch_entropy_loss(one_hot))) == pytest.approx(
        -np.log(experts), rel=RTOL
    )
    assert float(to_numpy(R.sample_entropy_loss(one_hot))) == pytest.approx(0.0, abs=1e-7)
    gates = random_gates(19, experts=experts)
    assert float(to_numpy(R.batch_entropy_loss(gates))) > -np.log(experts)
    assert float(to_numpy(R.sample_entropy_loss(gates))) > 0.0


def test_batch_and_sample_variance_losses():
    gates = random_gates(20)
    np.testing.assert_allclose(
        float(to_numpy(R.batch_variance_loss(gates))), np_batch_variance(gates), rtol=RTOL
    )
    np.testing.assert_allclose(
        float(to_numpy(R.sample_variance_loss(gates))), np_sample_variance(gates), rtol=RTOL
    )


def test_variance_losses_minima():
    experts = 5
    one_hot = np.tile(np.eye(experts, dtype=np.float32), (3, 1))
    assert float(to_numpy(R.batch_variance_loss(one_hot))) == pytest.approx(0.0, abs=1e-10)
    assert float(to_numpy(R.sample_variance_loss(one_hot))) == pytest.approx(
        -(experts - 1) / experts**2, rel=RTOL
    )
    gates = random_gates(21, experts=experts)
    assert float(to_numpy(R.batch_variance_loss(gates))) > 0.0
    assert float(to_numpy(R.sample_variance_loss(gates))) > -(experts - 1) / experts**2


def test_l1_gate_sparsity():
    rng = np.random.default_rng(22)
    gates = np.maximum(rng.normal(size=(6, 10)), 0.0).astype(np.float32)
    np.testing.assert_allclose(float(to_numpy(R.l1_gate_sparsity(gates))), np_l1(gates), rtol=RTOL)
    signed = rng.normal(size=(3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        float(to_numpy(R.l1_gate_sparsity(signed))), np_l1(signed), rtol=RTOL
    )
    assert float(to_numpy(R.l1_gate_sparsity(np.ones((4, 16), np.float32)))) == 1.0
    assert float(to_numpy(R.l1_gate_sparsity(np.zeros((4, 16), np.float32)))) == 0.0


def _conv_gates_and_one_nan_example(example=2):
    """ReLU gates of a conv layer (batch, height, width, channels), and a copy in which
    one entry of `example` is NaN."""
    rng = np.random.default_rng(23)
    gates = np.maximum(rng.normal(size=(6, 3, 4, 5)), 0.0).astype(np.float32)
    corrupted = gates.copy()
    corrupted[example, 1, 0, 3] = np.nan
    return gates, corrupted, np.delete(gates, example, axis=0)


@requires_tensorflow
@pytest.mark.parametrize("shape", [(None, None, None, None), (None, 3, None, 5)])
def test_l1_gate_sparsity_in_tf_function_with_unknown_dims(shape):
    """Conv gates in a graph whose spatial and channel sizes are unknown until run."""
    import tensorflow as tf

    l1 = tf.function(R.l1_gate_sparsity, input_signature=[tf.TensorSpec(shape, tf.float32)])
    gates, corrupted, clean = _conv_gates_and_one_nan_example()
    np.testing.assert_allclose(float(to_numpy(l1(gates))), np_l1(gates), rtol=RTOL)
    np.testing.assert_allclose(float(to_numpy(l1(corrupted))), np_l1(clean), rtol=RTOL)


@requires_jax
def test_l1_gate_sparsity_under_jax_jit():
    """The JAX counterpart of the graph test: traced once per (static) gate shape."""
    import jax

    l1 = jax.jit(R.l1_gate_sparsity)
    gates, corrupted, clean = _conv_gates_and_one_nan_example()
    for batch in (gates, gates[:, :2, :3]):
        np.testing.assert_allclose(float(to_numpy(l1(batch))), np_l1(batch), rtol=RTOL)
    np.testing.assert_allclose(float(to_numpy(l1(corrupted))), np_l1(clean), rtol=RTOL)


# ----------------------------------------------------------------------------------------
# non-finite tokens are left out of every batch statistic
# ----------------------------------------------------------------------------------------

BAD_ROW = 3


def _gate_batch():
    return [random_gates(50, tokens=12, experts=5)]


def _switch_batch():
    outputs = top_k_gates(51, tokens=12, experts=5, k=2)
    return [outputs["probs"], outputs["dispatch_mask"]]


def _logit_batch():
    return [3.0 * np.random.default_rng(52).normal(size=(12, 5)).astype(np.float32)]


def _noisy_batch():
    return list(noisy_inputs(53, tokens=12, experts=5))


def _relu_gate_batch(shape):
    rng = np.random.default_rng(54)
    return [np.maximum(rng.normal(size=shape), 0.0).astype(np.float32)]


def _noisy_load(clean, noisy, stddev):
    return R.noisy_top_k_load(clean, noisy, stddev, 2)


# name: (function, inputs, indices of the inputs whose BAD_ROW is corrupted, float64
# reference of the function on clean inputs). A non-finite gate input reaches the noisy
# load through all three of its inputs; the single-input cases check each one alone.
NON_FINITE_CASES = {
    "importance": (
        R.importance, _gate_batch, (0,), lambda g: np.asarray(g, np.float64).sum(axis=0)
    ),
    "importance_cv_squared": (
        R.importance_cv_squared,
        _gate_batch,
        (0,),
        lambda g: np_cv_squared(np.asarray(g, np.float64).sum(axis=0)),
    ),
    "noisy_top_k_load": (
        _noisy_load,
        _noisy_batch,
        (0, 1, 2),
        lambda c, n, s: np_noisy_top_k_load(c, n, s, 2),
    ),
    "noisy_top_k_load[clean_logits]": (
        _noisy_load, _noisy_batch, (0,), lambda c, n, s: np_noisy_top_k_load(c, n, s, 2)
    ),
    "noisy_top_k_load[noisy_logits]": (
        _noisy_load, _noisy_batch, (1,), lambda c, n, s: np_noisy_top_k_load(c, n, s, 2)
    ),
    "noisy_top_k_load[noise_stddev]": (
        _noisy_load, _noisy_batch, (2,), lambda c, n, s: np_noisy_top_k_load(c, n, s, 2)
    ),
    "switch_load_balance": (R.switch_load_balance, _switch_batch, (0,), np_switch),
    "switch_load_balance[dispatch_mask]": (
        R.switch_load_balance, _switch_batch, (1,), np_switch
    ),
    "router_z_loss": (R.router_z_loss, _logit_batch, (0,), np_router_z),
    "batch_entropy_loss": (R.batch_entropy_loss, _gate_batch, (0,), np_batch_entropy),
    "sample_entropy_loss": (R.sample_entropy_loss, _gate_batch, (0,), np_sample_entropy),
    "batch_variance_loss": (R.batch_variance_loss, _gate_batch, (0,), np_batch_variance),
    "sample_variance_loss": (R.sample_variance_loss, _gate_batch, (0,), np_sample_variance),
    "l1_gate_sparsity": (
        R.l1_gate_sparsity, lambda: _relu_gate_batch((12, 10)), (0,), np_l1
    ),
    "l1_gate_sparsity[rank 4]": (
        R.l1_gate_sparsity, lambda: _relu_gate_batch((12, 3, 2, 4)), (0,), np_l1
    ),
}


def _corrupt(inputs, indices, bad_value, pattern, row=BAD_ROW):
    """Copies of `inputs` with `bad_value` in one entry (or all) of `row` of `indices`."""
    corrupted = [np.array(x, copy=True) for x in inputs]
    for index in indices:
        if pattern == "entry":
            corrupted[index][(row,) + (1,) * (corrupted[index].ndim - 1)] = bad_value
        else:
            corrupted[index][row] = bad_value
    return corrupted


def _without_row(inputs, row=BAD_ROW):
    return [np.delete(x, row, axis=0) for x in inputs]


def _objective(fn):
    """`fn` as a scalar: a vector result is weighted by unequal per-expert weights."""

    def scalar(*inputs):
        value = fn(*inputs)
        if len(value.shape) == 0:
            return value
        weights = np.linspace(-1.0, 2.0, value.shape[-1]).astype(np.float32)
        return ops.sum(value * weights)

    return scalar


@pytest.mark.parametrize("pattern", ["entry", "row"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(NON_FINITE_CASES))
def test_non_finite_token_is_left_out_of_the_value(name, bad_value, pattern):
    """One token with a non-finite entry (or row): the value of the batch without it."""
    fn, make_inputs, indices, reference = NON_FINITE_CASES[name]
    inputs = make_inputs()
    clean = _without_row(inputs)
    value = to_numpy(fn(*_corrupt(inputs, indices, bad_value, pattern)))
    assert np.all(np.isfinite(value)), value
    np.testing.assert_allclose(value, reference(*clean), rtol=RTOL, atol=ATOL)
    # The same float32 value as the library's on the batch without the row.
    np.testing.assert_allclose(value, to_numpy(fn(*clean)), rtol=1e-6, atol=1e-7)
    # The corrupted row did count before: leaving it out changed the value.
    assert not np.allclose(reference(*clean), reference(*inputs), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("pattern", ["entry", "row"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(NON_FINITE_CASES))
def test_non_finite_token_gets_no_gradient_and_spoils_no_other(name, bad_value, pattern):
    """Zero gradient for the bad token; the others' as in the batch without it."""
    fn, make_inputs, indices, _ = NON_FINITE_CASES[name]
    inputs = make_inputs()
    corrupted = _corrupt(inputs, indices, bad_value, pattern)
    _, grads, _ = gradients(_objective(fn), inputs=corrupted)
    _, clean_grads, _ = gradients(_objective(fn), inputs=_without_row(inputs))
    some_gradient = False
    for x, grad, clean_grad in zip(inputs, grads, clean_grads):
        grad = as_array(grad, x)
        assert np.all(np.isfinite(grad)), grad
        np.testing.assert_array_equal(grad[BAD_ROW], np.zeros_like(grad[BAD_ROW]))
        np.testing.assert_allclose(
            np.delete(grad, BAD_ROW, axis=0),
            as_array(clean_grad, _without_row([x])[0]),
            rtol=RTOL,
            atol=1e-7,
        )
        some_gradient = some_gradient or bool(np.any(grad))
    assert some_gradient, "the other tokens lost their gradient"


@pytest.mark.parametrize("name", sorted(NON_FINITE_CASES))
def test_all_tokens_non_finite_gives_finite_value_and_zero_gradient(name):
    """No finite token left: the means divide by at least 1, nothing is NaN."""
    fn, make_inputs, indices, _ = NON_FINITE_CASES[name]
    inputs = make_inputs()
    for row in range(len(inputs[0])):
        inputs = _corrupt(inputs, indices, np.nan, "row", row=row)
    value, grads, _ = gradients(_objective(fn), inputs=inputs)
    assert np.isfinite(value)
    assert np.all(np.isfinite(to_numpy(fn(*inputs))))
    for grad in grads:
        assert_no_gradient(grad)

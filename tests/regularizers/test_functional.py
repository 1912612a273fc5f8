"""Tests of keras_moe.regularizers against float64 numpy references of the formulas."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices for the MirroredStrategy test. This must run before any
# TensorFlow op initialises the runtime; if another module already did that, the
# distributed test runs in a fresh subprocess instead.
try:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )
except RuntimeError:
    pass

import keras  # noqa: E402

from keras_moe import regularizers as R  # noqa: E402

RTOL = 1e-5
ATOL = 1e-6


# ----------------------------------------------------------------------------------------
# numpy float64 references, written out from the formulas
# ----------------------------------------------------------------------------------------


def np_cv_squared(x):
    x = np.asarray(x, np.float64)
    mean = x.mean()
    variance = ((x - mean) ** 2).mean()  # population variance
    return variance / (mean**2 + 1e-10)


def np_phi(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z, np.float64) / math.sqrt(2.0)))


def np_noisy_top_k_load(clean, noisy, stddev, k):
    clean = np.asarray(clean, np.float64)
    noisy = np.asarray(noisy, np.float64)
    stddev = np.broadcast_to(np.asarray(stddev, np.float64), clean.shape)
    tokens, experts = clean.shape
    load = np.zeros(experts)
    for t in range(tokens):
        descending = np.sort(noisy[t])[::-1]
        for i in range(experts):
            in_top_k = noisy[t, i] > descending[k]
            threshold = descending[k] if in_top_k else descending[k - 1]
            diff = clean[t, i] - threshold
            if stddev[t, i] > 0:
                load[i] += np_phi(diff / stddev[t, i])
            else:
                load[i] += 0.5 * (1.0 + np.sign(diff))
    return load


def np_entropy(p, axis=-1):
    p = np.asarray(p, np.float64)
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=axis)


def np_switch(probs, mask):
    probs = np.asarray(probs, np.float64)
    mask = np.asarray(mask, np.float64)
    tokens, experts = probs.shape
    fraction = np.zeros(experts)
    routed = 0
    for t in range(tokens):
        k_t = mask[t].sum()
        if k_t > 0:
            routed += 1
            fraction += mask[t] / k_t
    fraction /= max(routed, 1)
    return experts * np.sum(fraction * probs.mean(axis=0))


def np_router_z(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    return np.mean(lse**2)


def np_batch_entropy(gates):
    return -np_entropy(np.asarray(gates, np.float64).mean(axis=0))


def np_sample_entropy(gates):
    return np_entropy(gates, axis=-1).mean()


def np_batch_variance(gates):
    return np.asarray(gates, np.float64).mean(axis=0).var()


def np_sample_variance(gates):
    return -np.asarray(gates, np.float64).var(axis=-1).mean()


def np_l1(gates):
    gates = np.asarray(gates, np.float64)
    return np.abs(gates).reshape(gates.shape[0], -1).mean(axis=-1).mean()


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def random_gates(seed, tokens=16, experts=5):
    rng = np.random.default_rng(seed)
    return softmax(2.0 * rng.normal(size=(tokens, experts))).astype(np.float32)


def top_k_gates(seed, tokens=16, experts=6, k=2):
    """Gates, clean logits, probs and dispatch mask of a plain top-k softmax router."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, experts)).astype(np.float32)
    top = np.argsort(-logits, axis=-1)[:, :k]
    mask = np.zeros_like(logits)
    np.put_along_axis(mask, top, 1.0, axis=-1)
    masked = np.where(mask > 0, logits, -np.inf)
    gates = softmax(masked).astype(np.float32)
    return {
        "gates": gates,
        "logits": logits,
        "probs": softmax(logits).astype(np.float32),
        "dispatch_mask": mask,
        "load": mask.sum(axis=0),
    }


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


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


def noisy_inputs(seed, tokens=12, experts=6):
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(tokens, experts)).astype(np.float32)
    stddev = rng.uniform(0.2, 1.5, size=(tokens, experts)).astype(np.float32)
    noisy = (clean + stddev * rng.normal(size=(tokens, experts))).astype(np.float32)
    return clean, noisy, stddev


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
    clean_t = tf.constant(clean)
    stddev_t = tf.zeros_like(clean_t)
    with tf.GradientTape() as tape:
        tape.watch([clean_t, stddev_t])
        load = R.noisy_top_k_load(clean_t, clean_t, stddev_t, k)
    grads = tape.gradient(load, [clean_t, stddev_t])
    load = to_numpy(load)
    assert np.all(np.isfinite(load))
    top = np.argsort(-clean, axis=-1)[:, :k]
    counts = np.zeros(clean.shape[1])
    for row in top:
        counts[row] += 1
    np.testing.assert_allclose(load, counts)
    for grad in grads:
        assert grad is None or np.all(np.isfinite(to_numpy(grad)))
    # Scalar zero stddev and a noisy vector that differs from the clean one.
    _, noisy, _ = noisy_inputs(6)
    value = to_numpy(R.noisy_top_k_load(clean, noisy, 0.0, k))
    np.testing.assert_allclose(value, np_noisy_top_k_load(clean, noisy, 0.0, k))


def test_noisy_top_k_load_tiny_stddev_has_finite_gradients():
    clean, _, _ = noisy_inputs(7)
    clean_t = tf.constant(clean)
    stddev_t = tf.fill(clean.shape, 1e-9)
    with tf.GradientTape() as tape:
        tape.watch([clean_t, stddev_t])
        noise = np.random.default_rng(0).normal(size=clean.shape).astype(np.float32)
        noisy_t = clean_t + stddev_t * tf.constant(noise)
        loss = R.load_cv_squared(R.noisy_top_k_load(clean_t, noisy_t, stddev_t, 2))
    for grad in tape.gradient(loss, [clean_t, stddev_t]):
        assert np.all(np.isfinite(to_numpy(grad)))


def test_noisy_top_k_load_gradients_flow():
    clean, noisy, stddev = noisy_inputs(8)
    clean_t, stddev_t = tf.constant(clean), tf.constant(stddev)
    eps = tf.constant((noisy - clean) / stddev)
    with tf.GradientTape() as tape:
        tape.watch([clean_t, stddev_t])
        noisy_t = clean_t + stddev_t * eps
        loss = R.load_cv_squared(R.noisy_top_k_load(clean_t, noisy_t, stddev_t, 2))
    grad_clean, grad_stddev = tape.gradient(loss, [clean_t, stddev_t])
    for grad in (grad_clean, grad_stddev):
        grad = to_numpy(grad)
        assert np.all(np.isfinite(grad))
        assert np.abs(grad).max() > 1e-6


def test_noisy_top_k_load_gradient_matches_finite_difference():
    clean, noisy, stddev = noisy_inputs(9, tokens=4, experts=4)
    clean64 = clean.astype(np.float64)
    clean_t = tf.constant(clean)
    with tf.GradientTape() as tape:
        tape.watch(clean_t)
        load = R.noisy_top_k_load(clean_t, noisy, stddev, 1)
        objective = tf.reduce_sum(load * tf.constant([1.0, -2.0, 0.5, 3.0]))
    grad = to_numpy(tape.gradient(objective, clean_t))
    weights = np.array([1.0, -2.0, 0.5, 3.0])
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


def test_noisy_top_k_load_in_tf_function_with_unknown_tokens():
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
    probs = tf.constant(outputs["probs"])
    mask = tf.constant(outputs["dispatch_mask"])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([probs, mask])
        loss = R.switch_load_balance(probs, mask)
    grad_mask = tape.gradient(loss, mask)
    assert grad_mask is None or not np.any(to_numpy(grad_mask))
    fraction = outputs["dispatch_mask"].mean(axis=0) / 2.0
    expected = np.tile(5 * fraction / 10, (10, 1))
    np.testing.assert_allclose(to_numpy(tape.gradient(loss, probs)), expected, rtol=RTOL)


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
    p_t = tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(p_t)
        value = tf.reduce_sum(R.entropy(p_t))
    assert np.all(np.isfinite(to_numpy(tape.gradient(value, p_t))))


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


# ----------------------------------------------------------------------------------------
# GateRegularizer objects
# ----------------------------------------------------------------------------------------

OUTPUTS = top_k_gates(30, tokens=12, experts=6, k=2)

# (class, alias, default weights, unweighted reference term(s) on OUTPUTS)
SINGLE_TERM = [
    (R.ImportanceLoss, "importance", 1e-2, lambda o: np_cv_squared(o["gates"].sum(axis=0))),
    (R.LoadLoss, "load", 1e-2, lambda o: np_cv_squared(o["load"])),
    (R.SwitchLoadBalanceLoss, "switch", 1e-2, lambda o: np_switch(o["probs"], o["dispatch_mask"])),
    (R.RouterZLoss, "z_loss", 1e-3, lambda o: np_router_z(o["logits"])),
    (R.L1GateLoss, "l1", 1e-3, lambda o: np_l1(o["gates"])),
]
TWO_TERM = [
    (R.EntropyGateLoss, "entropy", np_batch_entropy, np_sample_entropy),
    (R.VarianceGateLoss, "variance", np_batch_variance, np_sample_variance),
]
ALL_CLASSES = [case[0] for case in SINGLE_TERM] + [case[0] for case in TWO_TERM]


def weights_of(cls):
    return ("alpha", "beta") if cls in (R.EntropyGateLoss, R.VarianceGateLoss) else (
        "coefficient",
    )


@pytest.mark.parametrize("cls, alias, default, reference", SINGLE_TERM)
def test_single_term_regularizer_value_and_scaling(cls, alias, default, reference):
    assert cls().coefficient == default
    for coefficient in (0.0, 1.0, 0.37):
        value = cls(coefficient=coefficient)(OUTPUTS)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        assert tuple(value.shape) == ()
        np.testing.assert_allclose(
            float(to_numpy(value)), coefficient * reference(OUTPUTS), rtol=RTOL, atol=1e-12
        )


@pytest.mark.parametrize("cls, alias, batch_reference, sample_reference", TWO_TERM)
def test_alpha_beta_regularizer_value_and_scaling(cls, alias, batch_reference, sample_reference):
    default = cls()
    assert (default.alpha, default.beta) == (0.1, 0.01)
    gates = OUTPUTS["gates"]
    for alpha, beta in ((0.1, 0.01), (1.0, 0.0), (0.0, 2.5), (0.3, 0.7)):
        value = float(to_numpy(cls(alpha=alpha, beta=beta)({"gates": gates})))
        expected = alpha * batch_reference(gates) + beta * sample_reference(gates)
        np.testing.assert_allclose(value, expected, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_get_config_round_trip(cls):
    kwargs = {name: 0.25 + i for i, name in enumerate(weights_of(cls))}
    original = cls(**kwargs)
    config = original.get_config()
    assert config == kwargs
    json.dumps(config)
    rebuilt = cls.from_config(config)
    assert type(rebuilt) is cls and rebuilt.get_config() == config
    np.testing.assert_allclose(to_numpy(rebuilt(OUTPUTS)), to_numpy(original(OUTPUTS)))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_keras_saving_round_trip(cls):
    kwargs = {name: 0.5 + i for i, name in enumerate(weights_of(cls))}
    original = cls(**kwargs)
    config = keras.saving.serialize_keras_object(original)
    assert config["registered_name"] == f"keras_moe>{cls.__name__}"
    config = json.loads(json.dumps(config))
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert type(rebuilt) is cls and rebuilt.get_config() == original.get_config()
    # and through the module's own helpers
    ours = R.deserialize(json.loads(json.dumps(R.serialize(original))))
    assert type(ours) is cls and ours.get_config() == original.get_config()
    plain = R.deserialize({"class_name": cls.__name__, "config": kwargs})
    assert type(plain) is cls and plain.get_config() == original.get_config()


def test_get_with_names_instances_and_configs():
    for cls, alias, default, _ in SINGLE_TERM:
        regularizer = R.get(alias)
        assert type(regularizer) is cls and regularizer.coefficient == default
        assert type(R.get(cls.__name__)) is cls
    for cls, alias, _, _ in TWO_TERM:
        assert type(R.get(alias)) is cls
    instance = R.ImportanceLoss(0.3)
    assert R.get(instance) is instance
    assert R.get(None) is None
    from_config = R.get({"class_name": "entropy", "config": {"alpha": 1.0, "beta": 0.0}})
    assert type(from_config) is R.EntropyGateLoss and from_config.alpha == 1.0
    assert type(R.get(R.serialize(R.L1GateLoss(2.0)))) is R.L1GateLoss


def test_get_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="known names") as info:
        R.get("importanse")
    for name in ("importance", "load", "switch", "z_loss", "entropy", "variance", "l1"):
        assert name in str(info.value)
    with pytest.raises(ValueError):
        R.get(3.0)


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("bad", [-1, -1e-9, float("nan"), float("inf"), "0.1", None, True])
def test_invalid_weights_raise(cls, bad):
    for name in weights_of(cls):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            cls(**{name: bad})


def test_invalid_coefficient_message():
    with pytest.raises(ValueError) as info:
        R.ImportanceLoss(coefficient=-1)
    assert str(info.value) == "coefficient must be a finite number >= 0, got -1"


@pytest.mark.parametrize(
    "cls, key",
    [
        (R.ImportanceLoss, "gates"),
        (R.LoadLoss, "load"),
        (R.SwitchLoadBalanceLoss, "probs"),
        (R.SwitchLoadBalanceLoss, "dispatch_mask"),
        (R.RouterZLoss, "logits"),
        (R.EntropyGateLoss, "gates"),
        (R.VarianceGateLoss, "gates"),
        (R.L1GateLoss, "gates"),
    ],
)
def test_missing_key_raises(cls, key):
    outputs = {name: value for name, value in OUTPUTS.items() if name != key}
    with pytest.raises(ValueError, match=f"'{key}'") as info:
        cls()(outputs)
    assert "provided by" in str(info.value)


def test_non_dict_gate_outputs_raise():
    with pytest.raises(ValueError, match="dict"):
        R.ImportanceLoss()(OUTPUTS["gates"])


def test_regularizers_in_tf_function():
    @tf.function
    def total(outputs):
        return sum(R.get(name)(outputs) for name in ("importance", "load", "switch", "z_loss"))

    expected = sum(float(to_numpy(R.get(name)(OUTPUTS))) for name in (
        "importance", "load", "switch", "z_loss"))
    np.testing.assert_allclose(float(to_numpy(total(OUTPUTS))), expected, rtol=RTOL)


# ----------------------------------------------------------------------------------------
# tf.distribute: per-replica values on half batches equal the single-device value
# ----------------------------------------------------------------------------------------


def _mirrored_results():
    """Single-device and 2-replica values and gradients of several terms (JSON-able)."""
    tokens, experts = 8, 4
    outputs = top_k_gates(40, tokens=tokens, experts=experts, k=2)
    rng = np.random.default_rng(41)
    dense_gates = random_gates(42, tokens=tokens, experts=experts)
    cases = {
        "importance_cv_squared": (R.importance_cv_squared, [outputs["gates"]]),
        "batch_entropy_loss": (R.batch_entropy_loss, [dense_gates]),
        "sample_variance_loss": (R.sample_variance_loss, [dense_gates]),
        "switch_load_balance": (
            R.switch_load_balance,
            [outputs["probs"], outputs["dispatch_mask"]],
        ),
        "router_z_loss": (R.router_z_loss, [outputs["logits"]]),
        "noisy_top_k_load_cv": (
            lambda clean, noisy, std: R.load_cv_squared(R.noisy_top_k_load(clean, noisy, std, 2)),
            [
                outputs["logits"],
                outputs["logits"] + rng.normal(size=(tokens, experts)).astype(np.float32),
                np.full((tokens, experts), 0.8, np.float32),
            ],
        ),
    }
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    half = tokens // 2
    results = {}
    for name, (fn, inputs) in cases.items():
        inputs = [np.asarray(x, np.float32) for x in inputs]
        first = tf.constant(inputs[0])
        with tf.GradientTape() as tape:
            tape.watch(first)
            value = fn(first, *[tf.constant(x) for x in inputs[1:]])
        grad = tape.gradient(value, first)

        def shard(x):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(
                    x[ctx.replica_id_in_sync_group * half :][:half]
                )
            )

        @tf.function
        def step(*shards, fn=fn):
            def replica_fn(*local):
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(local[0])
                    local_value = fn(*local)
                    scaled = R.scale_for_replicas(local_value)
                return (
                    local_value,
                    tape.gradient(scaled, local[0]),
                    tape.gradient(local_value, local[0]),
                    tf.constant(R.num_replicas_in_sync()),
                )

            return strategy.run(replica_fn, args=shards)

        values, grads, raw_grads, replicas = step(*[shard(x) for x in inputs])
        local = strategy.experimental_local_results
        results[name] = {
            "replicas": int(local(replicas)[0].numpy()),
            "single": float(value.numpy()),
            "per_replica": [float(v.numpy()) for v in local(values)],
            "single_grad": grad.numpy().tolist(),
            "replica_grad": np.concatenate([g.numpy() for g in local(grads)]).tolist(),
            "raw_replica_grad": np.concatenate([g.numpy() for g in local(raw_grads)]).tolist(),
        }
    return results


@pytest.fixture(scope="module")
def mirrored_results():
    if len(tf.config.list_logical_devices("CPU")) >= 2:
        return _mirrored_results()
    # TensorFlow was initialised before this module could split the CPU: run in a fresh
    # interpreter, where importing this file configures two logical CPUs first.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('_regularizer_tests', {__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print('RESULTS ' + json.dumps(module._mirrored_results()))\n"
    )
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = [ln for ln in completed.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "importance_cv_squared",
        "batch_entropy_loss",
        "sample_variance_loss",
        "switch_load_balance",
        "router_z_loss",
        "noisy_top_k_load_cv",
    ],
)
def test_mirrored_strategy_matches_single_device(mirrored_results, name):
    result = mirrored_results[name]
    assert result["replicas"] == 2
    for value in result["per_replica"]:
        np.testing.assert_allclose(value, result["single"], rtol=RTOL, atol=1e-7)
    # Each replica's loss is the global loss; Keras sums the replicas' gradients, so a
    # replica enters loss / replicas (as `model.fit` does for add_loss terms). That
    # replica's gradient w.r.t. its own shard is then the single-device gradient.
    np.testing.assert_allclose(
        result["replica_grad"], result["single_grad"], rtol=RTOL, atol=1e-7
    )
    np.testing.assert_allclose(
        result["raw_replica_grad"], 2 * np.asarray(result["single_grad"]), rtol=RTOL, atol=1e-7
    )


# ----------------------------------------------------------------------------------------
# use from a layer: add_loss in a functional model, one training step
# ----------------------------------------------------------------------------------------


class _SoftmaxGateWithLoss(keras.layers.Layer):
    """Minimal test gate: softmax router that attaches a regularizer with add_loss."""

    def __init__(self, experts, regularizer, **kwargs):
        super().__init__(**kwargs)
        self.experts = experts
        self.regularizer = R.get(regularizer)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.experts), name="kernel")

    def call(self, x, training=None):
        logits = keras.ops.matmul(x, self.kernel)
        probs = keras.ops.softmax(logits)
        if training:
            self.add_loss(self.regularizer({"gates": probs, "logits": logits, "probs": probs}))
        return probs


@pytest.mark.parametrize("name", ["importance", "entropy", "z_loss"])
def test_regularizer_as_layer_add_loss_trains(name):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    default = R.get(name)
    regularizer = type(default).from_config({key: 1.0 for key in default.get_config()})
    outputs = _SoftmaxGateWithLoss(4, regularizer)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = np.full((16, 4), 0.25, np.float32)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    model(x, training=True)
    assert len(model.losses) == 1

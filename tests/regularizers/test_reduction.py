"""Tests of keras_moe.regularizers.reduction: global-batch statistics.

Under a `tf.distribute.MirroredStrategy` over two logical CPUs (TensorFlow only, hence
this module is not marked `multi_backend` as a whole), each replica's term on its half
batch equals the single-device term, and so do the gradients once scaled. The JAX
counterpart: under `jax.jit` with the batch sharded over the virtual CPU devices the
terms equal the unsharded ones (the sums over tokens are global by construction).
Outside a strategy the helpers are plain sums, on every backend.
"""

import numpy as np
import pytest
from keras import ops

from keras_moe import regularizers as R
from regularizers.regularizer_references import RTOL
from regularizers.regularizer_references import random_gates
from regularizers.regularizer_references import requires_jax
from regularizers.regularizer_references import top_k_gates
from testing_utils import BACKEND
from testing_utils import gradients
from testing_utils import requires_tensorflow
from testing_utils import to_numpy

TOKENS = 8
EXPERTS = 4
# A token whose gates are NaN, in the first replica's half of the batch.
NAN_ROW = 1


def _with_nan_row(x):
    x = np.array(x, np.float32, copy=True)
    x[NAN_ROW] = np.nan
    return x


def distributed_cases():
    """name: (function of float32 arrays whose first is differentiated, its inputs)."""
    outputs = top_k_gates(40, tokens=TOKENS, experts=EXPERTS, k=2)
    rng = np.random.default_rng(41)
    dense_gates = random_gates(42, tokens=TOKENS, experts=EXPERTS)
    noisy_logits = outputs["logits"] + rng.normal(size=(TOKENS, EXPERTS)).astype(np.float32)
    cases = {
        "importance_cv_squared": (R.importance_cv_squared, [outputs["gates"]]),
        "batch_entropy_loss": (R.batch_entropy_loss, [dense_gates]),
        "sample_variance_loss": (R.sample_variance_loss, [dense_gates]),
        "switch_load_balance": (
            R.switch_load_balance,
            [outputs["probs"], outputs["dispatch_mask"]],
        ),
        "router_z_loss": (R.router_z_loss, [outputs["logits"]]),
        # Four sequences of two tokens: two on each replica.
        "sequence_balance_loss": (
            lambda probs, mask: R.sequence_balance_loss(probs, mask, 2),
            [outputs["probs"], outputs["dispatch_mask"]],
        ),
        "noisy_top_k_load_cv": (
            lambda clean, noisy, std: R.load_cv_squared(R.noisy_top_k_load(clean, noisy, std, 2)),
            [outputs["logits"], noisy_logits, np.full((TOKENS, EXPERTS), 0.8, np.float32)],
        ),
        # A NaN token is left out of the global statistics: the token count is global.
        "batch_entropy_loss[nan token]": (R.batch_entropy_loss, [_with_nan_row(dense_gates)]),
        "sample_variance_loss[nan token]": (
            R.sample_variance_loss, [_with_nan_row(dense_gates)]
        ),
        "switch_load_balance[nan token]": (
            R.switch_load_balance,
            [_with_nan_row(outputs["probs"]), outputs["dispatch_mask"]],
        ),
        "router_z_loss[nan token]": (R.router_z_loss, [_with_nan_row(outputs["logits"])]),
    }
    return {
        name: (fn, [np.asarray(x, np.float32) for x in inputs])
        for name, (fn, inputs) in cases.items()
    }


CASE_NAMES = sorted(distributed_cases())


# ----------------------------------------------------------------------------------------
# outside a strategy: plain sums, every backend
# ----------------------------------------------------------------------------------------


@pytest.mark.multi_backend
def test_helpers_are_plain_sums_outside_a_strategy():
    values = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    assert R.num_replicas_in_sync() == 1
    np.testing.assert_allclose(to_numpy(R.cross_replica_sum(values)), values)
    np.testing.assert_allclose(
        to_numpy(R.batch_sum(values)), values.astype(np.float64).sum(axis=0), rtol=RTOL
    )
    np.testing.assert_allclose(
        to_numpy(R.batch_mean(values)), values.astype(np.float64).mean(axis=0), rtol=RTOL
    )
    loss = ops.convert_to_tensor(np.float32(2.5))
    assert float(to_numpy(R.scale_for_replicas(loss))) == 2.5


@pytest.mark.multi_backend
def test_batch_sum_gradient_outside_a_strategy():
    values = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    weights = np.array([1.0, -2.0, 0.5], np.float32)
    _, (grad,), _ = gradients(lambda v: ops.sum(R.batch_sum(v) * weights), inputs=[values])
    np.testing.assert_allclose(grad, np.tile(weights, (5, 1)))
    _, (grad,), _ = gradients(lambda v: ops.sum(R.batch_mean(v) * weights), inputs=[values])
    np.testing.assert_allclose(grad, np.tile(weights / 5.0, (5, 1)), rtol=RTOL)


# ----------------------------------------------------------------------------------------
# tf.distribute: per-replica values on half batches equal the single-device value
# ----------------------------------------------------------------------------------------


def _mirrored_results(strategy):
    """Single-device and 2-replica values and gradients of several terms."""
    import tensorflow as tf

    half = TOKENS // 2
    results = {}
    for name, (fn, inputs) in distributed_cases().items():
        first = tf.constant(inputs[0])
        with tf.GradientTape() as tape:
            tape.watch(first)
            value = fn(first, *[tf.constant(x) for x in inputs[1:]])
        grad = tape.gradient(value, first)

        def shard(x):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * half :][:half])
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
            "replicas": int(to_numpy(local(replicas)[0])),
            "single": float(to_numpy(value)),
            "per_replica": [float(to_numpy(v)) for v in local(values)],
            "single_grad": to_numpy(grad),
            "replica_grad": np.concatenate([to_numpy(g) for g in local(grads)]),
            "raw_replica_grad": np.concatenate([to_numpy(g) for g in local(raw_grads)]),
        }
    return results


@pytest.fixture(scope="module")
def mirrored_results(mirrored_strategy):
    # tests/conftest.py splits the CPU into two logical devices before TensorFlow starts.
    assert mirrored_strategy.num_replicas_in_sync == 2, "conftest gave fewer than 2 CPUs"
    return _mirrored_results(mirrored_strategy)


@requires_tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_mirrored_strategy_matches_single_device(mirrored_results, name):
    result = mirrored_results[name]
    assert result["replicas"] == 2
    assert np.isfinite(result["single"])
    for value in result["per_replica"]:
        np.testing.assert_allclose(value, result["single"], rtol=RTOL, atol=1e-7)
    # Each replica's loss is the global loss; Keras sums the replicas' gradients, so a
    # replica enters loss / replicas (as `model.fit` does for add_loss terms). That
    # replica's gradient w.r.t. its own shard is then the single-device gradient.
    assert np.all(np.isfinite(result["single_grad"]))
    np.testing.assert_allclose(
        result["replica_grad"], result["single_grad"], rtol=RTOL, atol=1e-7
    )
    np.testing.assert_allclose(
        result["raw_replica_grad"], 2 * np.asarray(result["single_grad"]), rtol=RTOL, atol=1e-7
    )


@requires_tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CASE_NAMES if "[nan token]" in name])
def test_mirrored_nan_token_is_left_out_of_the_global_count(mirrored_results, name):
    """The NaN token is in one replica's half; both divide by the global 7 tokens."""
    fn, inputs = distributed_cases()[name]
    clean = [np.delete(x, NAN_ROW, axis=0) for x in inputs]
    expected = float(to_numpy(fn(*clean)))
    for value in mirrored_results[name]["per_replica"]:
        np.testing.assert_allclose(value, expected, rtol=RTOL, atol=1e-7)
    assert not np.any(mirrored_results[name]["replica_grad"][NAN_ROW])


# ----------------------------------------------------------------------------------------
# JAX: the batch sharded over devices under jax.jit gives the single-device values
# ----------------------------------------------------------------------------------------


@pytest.mark.multi_backend
@requires_jax
@pytest.mark.parametrize("name", CASE_NAMES)
def test_jax_sharded_batch_matches_single_device(name):
    import jax
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    assert BACKEND == "jax"
    devices = jax.devices()
    # tests/conftest.py asks XLA for 8 virtual CPU devices; the batch splits over them.
    assert len(devices) >= 2 and TOKENS % len(devices) == 0, devices
    mesh = Mesh(np.array(devices), ("batch",))
    by_token = NamedSharding(mesh, PartitionSpec("batch"))

    fn, inputs = distributed_cases()[name]
    single_value, (single_grad, *_), _ = gradients(fn, inputs=inputs)
    sharded = [jax.device_put(x, by_token) for x in inputs]
    assert len(sharded[0].sharding.device_set) == len(devices)
    value, grad = jax.jit(jax.value_and_grad(fn))(*sharded)
    assert np.isfinite(single_value)
    np.testing.assert_allclose(to_numpy(value), single_value, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(to_numpy(grad), single_grad, rtol=RTOL, atol=1e-7)

"""Tests of the parametric t-SNE objective against a float64 numpy reference.

Backend-neutral: every test runs on TensorFlow and on JAX, except the TensorFlow-graph
test with an unknown batch size, whose JAX counterpart runs under `jax.jit`.
"""

import keras
import numpy as np
import pytest

from keras_moe.regularizers import tsne
from regularizers.regularizer_references import requires_jax
from testing_utils import assert_no_gradient
from testing_utils import gradients
from testing_utils import requires_tensorflow
from testing_utils import to_numpy

pytestmark = pytest.mark.multi_backend


# ---------------------------------------------------------------- numpy reference (float64)


def _np_sqdist(x):
    x = np.asarray(x, np.float64)
    return np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)


def _np_conditional(x, perplexity, steps=200):
    """P_{j|i} by plain bisection on log(beta) over a wide bracket, row by row."""
    d = _np_sqdist(x)
    n = d.shape[0]
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        di = np.delete(d[i], i)
        di = di - di.min()
        lo, hi = -60.0, 60.0  # log-beta bracket
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            w = np.exp(-np.exp(mid) * di)
            pi = w / w.sum()
            h = -np.sum(pi[pi > 0] * np.log(pi[pi > 0]))
            if h > target:
                lo = mid  # too flat: larger precision
            else:
                hi = mid
        w = np.exp(-np.exp(0.5 * (lo + hi)) * di)
        p[i, np.arange(n) != i] = w / w.sum()
    return p


def _np_joint(x, perplexity):
    pc = _np_conditional(x, perplexity)
    return (pc + pc.T) / (2.0 * pc.shape[0])


def _np_q(y, dof):
    d = _np_sqdist(y)
    k = (1.0 + d / dof) ** (-(dof + 1.0) / 2.0)
    np.fill_diagonal(k, 0.0)
    return k / k.sum()


def _np_kl(p, y, dof):
    q = _np_q(y, dof)
    mask = p > 0
    return np.sum(p[mask] * np.log(p[mask] / q[mask]))


def _perplexities(p):
    logp = np.log(np.where(p > 0, p, 1.0))
    return np.exp(-np.sum(p * logp, axis=1))


def _data(n=50, d=10, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, d).astype("float32"), rng.randn(n, 2).astype("float32")


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("perplexity", [5.0, 10.0, 30.0])
def test_conditional_hits_perplexity(perplexity):
    x, _ = _data()
    p = to_numpy(tsne.conditional_affinities(x, perplexity)).astype(np.float64)
    assert np.all(np.diag(p) == 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(_perplexities(p), perplexity, atol=1e-3)
    np.testing.assert_allclose(p, _np_conditional(x, perplexity), atol=1e-5)


@pytest.mark.parametrize("perplexity", [5.0, 30.0])
def test_joint_affinities(perplexity):
    x, _ = _data(seed=1)
    p = to_numpy(tsne.tsne_affinities(x, perplexity)).astype(np.float64)
    np.testing.assert_allclose(p, p.T, atol=1e-9)
    assert abs(p.sum() - 1.0) < 1e-5
    assert np.all(p >= 0) and np.all(np.diag(p) == 0)
    np.testing.assert_allclose(p, _np_joint(x, perplexity), rtol=1e-3, atol=1e-7)


def test_scale_invariance_of_search():
    """Distances far from 1 (tiny and huge) still hit the perplexity."""
    x, _ = _data(seed=2)
    for scale in (1e-3, 1e2):
        p = to_numpy(tsne.conditional_affinities(x * scale, 10.0)).astype(np.float64)
        np.testing.assert_allclose(_perplexities(p), 10.0, atol=1e-3)


@pytest.mark.parametrize("dof", [1.0, 3.0])
@pytest.mark.parametrize("perplexity", [5.0, 10.0, 30.0])
def test_kl_matches_numpy(perplexity, dof):
    x, y = _data(seed=3)
    p = _np_joint(x, perplexity)
    expected = _np_kl(p, y, dof)
    got = float(to_numpy(tsne.parametric_tsne_loss(x, y, perplexity=perplexity, dof=dof)))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # tsne_kl alone, on the reference P.
    got_kl = float(to_numpy(tsne.tsne_kl(p.astype("float32"), y, dof=dof)))
    np.testing.assert_allclose(got_kl, expected, rtol=1e-4)


def test_gradient_matches_analytic():
    x, y = _data(seed=4)
    p = to_numpy(tsne.tsne_affinities(x, 10.0))
    _, (grad,), _ = gradients(lambda embedding: tsne.tsne_kl(p, embedding, dof=1.0), inputs=[y])
    pn = p.astype(np.float64)
    y64 = y.astype(np.float64)
    q = _np_q(y64, 1.0)
    diff = y64[:, None, :] - y64[None, :, :]
    inv = 1.0 / (1.0 + np.sum(diff**2, axis=-1))
    expected = 4.0 * np.sum(((pn - q) * inv)[:, :, None] * diff, axis=1)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-6)


def test_no_gradient_to_inputs():
    x, y = _data(seed=5)
    _, (grad_x, grad_y), _ = gradients(
        lambda inputs, embedding: tsne.parametric_tsne_loss(inputs, embedding, perplexity=10.0),
        inputs=[x, y],
    )
    assert_no_gradient(grad_x)
    assert np.any(grad_y) and np.all(np.isfinite(grad_y))


@requires_tensorflow
def test_graph_mode_unknown_batch():
    import tensorflow as tf

    x, y = _data(seed=6)

    @tf.function(
        input_signature=[
            tf.TensorSpec((None, 10), tf.float32),
            tf.TensorSpec((None, 2), tf.float32),
        ]
    )
    def f(a, b):
        return tsne.parametric_tsne_loss(a, b, perplexity=10.0)

    np.testing.assert_allclose(
        float(to_numpy(f(x, y))), _np_kl(_np_joint(x, 10.0), y, 1.0), rtol=1e-4
    )


@requires_jax
def test_parametric_tsne_loss_under_jax_jit():
    """The JAX counterpart of the graph test: traced once per (static) batch size."""
    import jax

    loss = jax.jit(lambda a, b: tsne.parametric_tsne_loss(a, b, perplexity=10.0))
    for n in (50, 30):
        x, y = _data(n=n, seed=6)
        np.testing.assert_allclose(
            float(to_numpy(loss(x, y))), _np_kl(_np_joint(x, 10.0), y, 1.0), rtol=1e-4
        )


def test_parametric_embedding_learns_clusters():
    rng = np.random.RandomState(0)
    centres = rng.randn(4, 20) * 4.0
    labels = np.repeat(np.arange(4), 50)
    x = (centres[labels] + rng.randn(200, 20)).astype("float32")
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(2)]
    )
    loss_fn = tsne.ParametricTSNELoss(perplexity=30.0)
    steps = 100
    # 100 full-batch Adam steps in one compiled `fit` epoch: every batch is all of x, in
    # order, and the loss reads the inputs (passed as the targets) and the map.
    encoder.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss_fn)
    repeated = np.tile(x, (steps, 1))

    first = float(to_numpy(loss_fn(x, encoder(x))))
    encoder.fit(repeated, repeated, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    last = float(to_numpy(loss_fn(x, encoder(x))))
    assert last < 0.7 * first

    y = to_numpy(encoder(x))
    d = _np_sqdist(y)
    np.fill_diagonal(d, np.inf)
    neighbours = np.argsort(d, axis=1)[:, :5]
    votes = labels[neighbours]
    predicted = np.array([np.bincount(v, minlength=4).argmax() for v in votes])
    assert np.mean(predicted == labels) > 0.9


def test_loss_object_weight_and_config():
    x, y = _data(seed=7)
    loss_fn = tsne.ParametricTSNELoss(perplexity=10.0, dof=3.0, weight=0.5)
    expected = 0.5 * float(to_numpy(tsne.parametric_tsne_loss(x, y, perplexity=10.0, dof=3.0)))
    np.testing.assert_allclose(float(to_numpy(loss_fn(x, y))), expected, rtol=1e-6)
    config = loss_fn.get_config()
    assert config == {"perplexity": 10.0, "dof": 3.0, "weight": 0.5}
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss_fn))
    assert isinstance(clone, tsne.ParametricTSNELoss)
    assert clone.get_config() == config


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"perplexity": 1.0}, "perplexity"),
        ({"perplexity": 0.5}, "perplexity"),
        ({"perplexity": float("nan")}, "perplexity"),
        ({"dof": 0.0}, "dof"),
        ({"dof": -1.0}, "dof"),
        ({"weight": -0.1}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": "1"}, "weight"),
    ],
)
def test_loss_object_value_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tsne.ParametricTSNELoss(**kwargs)


def test_function_value_errors():
    x, y = _data(n=20)
    with pytest.raises(ValueError, match="perplexity"):
        tsne.tsne_affinities(x, perplexity=20.0)
    with pytest.raises(ValueError, match="perplexity"):
        tsne.tsne_affinities(x, perplexity=1.0)
    with pytest.raises(ValueError, match="dof"):
        tsne.tsne_kl(np.eye(20, dtype="float32"), y, dof=0.0)

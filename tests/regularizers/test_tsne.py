"""Tests of the parametric t-SNE objective against a float64 numpy reference."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_moe.regularizers import tsne


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
    p = np.asarray(tsne.conditional_affinities(x, perplexity), np.float64)
    assert np.all(np.diag(p) == 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(_perplexities(p), perplexity, atol=1e-3)
    np.testing.assert_allclose(p, _np_conditional(x, perplexity), atol=1e-5)


@pytest.mark.parametrize("perplexity", [5.0, 30.0])
def test_joint_affinities(perplexity):
    x, _ = _data(seed=1)
    p = np.asarray(tsne.tsne_affinities(x, perplexity), np.float64)
    np.testing.assert_allclose(p, p.T, atol=1e-9)
    assert abs(p.sum() - 1.0) < 1e-5
    assert np.all(p >= 0) and np.all(np.diag(p) == 0)
    np.testing.assert_allclose(p, _np_joint(x, perplexity), rtol=1e-3, atol=1e-7)


def test_scale_invariance_of_search():
    """Distances far from 1 (tiny and huge) still hit the perplexity."""
    x, _ = _data(seed=2)
    for scale in (1e-3, 1e2):
        p = np.asarray(tsne.conditional_affinities(x * scale, 10.0), np.float64)
        np.testing.assert_allclose(_perplexities(p), 10.0, atol=1e-3)


@pytest.mark.parametrize("dof", [1.0, 3.0])
@pytest.mark.parametrize("perplexity", [5.0, 10.0, 30.0])
def test_kl_matches_numpy(perplexity, dof):
    x, y = _data(seed=3)
    p = _np_joint(x, perplexity)
    expected = _np_kl(p, y, dof)
    got = float(tsne.parametric_tsne_loss(x, y, perplexity=perplexity, dof=dof))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # tsne_kl alone, on the reference P.
    got_kl = float(tsne.tsne_kl(p.astype("float32"), y, dof=dof))
    np.testing.assert_allclose(got_kl, expected, rtol=1e-4)


def test_gradient_matches_analytic():
    x, y = _data(seed=4)
    p = tsne.tsne_affinities(x, 10.0)
    yv = tf.Variable(y)
    with tf.GradientTape() as tape:
        loss = tsne.tsne_kl(p, yv, dof=1.0)
    grad = tape.gradient(loss, yv).numpy()
    pn = np.asarray(p, np.float64)
    y64 = y.astype(np.float64)
    q = _np_q(y64, 1.0)
    diff = y64[:, None, :] - y64[None, :, :]
    inv = 1.0 / (1.0 + np.sum(diff**2, axis=-1))
    expected = 4.0 * np.sum(((pn - q) * inv)[:, :, None] * diff, axis=1)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-6)


def test_no_gradient_to_inputs():
    x, y = _data(seed=5)
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = tsne.parametric_tsne_loss(xv, y, perplexity=10.0)
    grad = tape.gradient(loss, xv)
    assert grad is None or np.all(grad.numpy() == 0)


def test_graph_mode_unknown_batch():
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
        float(f(x, y)), _np_kl(_np_joint(x, 10.0), y, 1.0), rtol=1e-4
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
    optimizer = keras.optimizers.Adam(1e-2)
    xt = tf.constant(x)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(xt, encoder(xt))
        grads = tape.gradient(loss, encoder.trainable_variables)
        optimizer.apply_gradients(zip(grads, encoder.trainable_variables))
        return loss

    first = float(loss_fn(xt, encoder(xt)))
    for _ in range(100):
        train_step()
    last = float(loss_fn(xt, encoder(xt)))
    assert last < 0.7 * first

    y = np.asarray(encoder(xt))
    d = _np_sqdist(y)
    np.fill_diagonal(d, np.inf)
    neighbours = np.argsort(d, axis=1)[:, :5]
    votes = labels[neighbours]
    predicted = np.array([np.bincount(v, minlength=4).argmax() for v in votes])
    assert np.mean(predicted == labels) > 0.9


def test_loss_object_weight_and_config():
    x, y = _data(seed=7)
    loss_fn = tsne.ParametricTSNELoss(perplexity=10.0, dof=3.0, weight=0.5)
    expected = 0.5 * float(tsne.parametric_tsne_loss(x, y, perplexity=10.0, dof=3.0))
    np.testing.assert_allclose(float(loss_fn(x, y)), expected, rtol=1e-6)
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

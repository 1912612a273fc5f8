"""Tests of the t-SNE gate, the parametric t-SNE map and the sparse expert clusters."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_moe.layers.expert_clusters import (
    ExpertClusterDense,
    ExpertClusters,
    block_ids,
    cluster_mask,
)
from keras_moe.layers.moe_dense import MoEDense
from keras_moe.layers.tsne_gate import (
    ParametricTSNEMap,
    TSNEGate,
    expert_positions,
    fit_parametric_tsne,
    nearest_neighbour_sq_distance,
)
from keras_moe.regularizers.tsne import parametric_tsne_loss


def _rng(seed=0):
    return np.random.RandomState(seed)


def _softmax(a):
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def _gate_reference(z, c, temperature, k=None):
    """Distance-to-gate formula in float64: logits = -||z - c||^2 / T."""
    z = z.astype("float64")
    c = c.astype("float64")
    logits = -((z[:, None, :] - c[None]) ** 2).sum(-1) / temperature
    probs = _softmax(logits)
    if k is None:
        mask = np.eye(len(c))[np.argmax(logits, axis=1)]
        return logits, probs, probs, mask, None, None
    idx = np.argsort(-logits, axis=1)[:, :k]
    top = np.take_along_axis(logits, idx, axis=1)
    top_gates = _softmax(top)
    gates = np.zeros_like(logits)
    np.put_along_axis(gates, idx, top_gates, axis=1)
    mask = (gates > 0).astype("float64")
    return logits, probs, gates, mask, idx, top_gates


def _clustered(n=96, d=12, classes=3, seed=0):
    rng = _rng(seed)
    centres = rng.randn(classes, d) * 4.0
    y = np.arange(n) % classes
    x = centres[y] + rng.randn(n, d)
    return x.astype("float32"), y


# Gate numerics ------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_gate_matches_numpy_on_plane_inputs(top_k):
    rng = _rng(1)
    z = rng.randn(40, 2).astype("float32") * 2.0
    c = rng.randn(5, 2).astype("float32") * 2.0
    gate = TSNEGate(5, top_k=top_k, temperature=0.7)
    gate.build((None, 2))
    gate.set_positions(c)
    out = {k: np.asarray(v) for k, v in gate(z).items()}
    logits, probs, gates, mask, idx, top_gates = _gate_reference(z, c, 0.7, top_k)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probs"], probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["gates"], gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["dispatch_mask"], mask)
    np.testing.assert_array_equal(out["load"], mask.sum(axis=0))
    np.testing.assert_allclose(out["embedding"], z)
    assert all(v.dtype == np.float32 for k, v in out.items() if k != "top_k_indices")
    if top_k is None:
        assert "top_k_indices" not in out
    else:
        np.testing.assert_array_equal(out["top_k_indices"], idx)
        np.testing.assert_allclose(out["top_k_gates"], top_gates, rtol=1e-5, atol=1e-6)
        # Spatial sparsity: exactly the k nearest experts are on.
        assert np.all(out["dispatch_mask"].sum(axis=1) == top_k)
        dist = ((z[:, None] - c[None]) ** 2).sum(-1)
        kth = np.sort(dist, axis=1)[:, top_k - 1 : top_k]
        np.testing.assert_array_equal(out["dispatch_mask"], (dist <= kth).astype("float32"))


def test_gate_with_mapping_and_gradients():
    rng = _rng(2)
    x = rng.randn(16, 6).astype("float32")
    mapping = keras.layers.Dense(2, kernel_initializer="random_normal", name="map")
    gate = TSNEGate(4, top_k=2, temperature=2.0, mapping=mapping)
    out = gate(x)
    w, b = mapping.kernel.numpy(), mapping.bias.numpy()
    c = gate.positions.numpy()
    _, _, gates, _, _, _ = _gate_reference(x @ w + b, c, 2.0, 2)
    np.testing.assert_allclose(np.asarray(out["gates"]), gates, rtol=1e-5, atol=1e-6)
    # Default positions: a 2x2 grid over [-1, 1]^2.
    np.testing.assert_allclose(c, [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(gate(xt)["gates"] * tf.range(4, dtype="float32"))
    grads = tape.gradient(loss, [gate.positions, mapping.kernel])
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


def test_fixed_positions_are_not_trainable():
    gate = TSNEGate(3, trainable_positions=False)
    gate.build((None, 2))
    assert gate.trainable_weights == []
    assert [w.name for w in gate.non_trainable_weights] == ["positions"]


def test_gate_math_in_float32_under_mixed_precision():
    gate = TSNEGate(4, top_k=2, mapping=keras.layers.Dense(2, dtype="mixed_float16"))
    out = gate(np.random.rand(8, 5).astype("float16"))
    assert gate.compute_dtype == "float32"
    assert out["gates"].dtype == "float32" and out["embedding"].dtype == "float32"


def test_moe_dense_with_tsne_gate_sparse_equals_dense():
    x = _rng(3).randn(24, 7).astype("float32")
    outputs = []
    for dispatch in ("sparse", "dense"):
        keras.utils.set_random_seed(5)
        gate = TSNEGate(
            6, top_k=2, temperature=0.5,
            mapping=keras.layers.Dense(2, kernel_initializer="random_normal"),
        )
        moe = MoEDense(5, num_experts=6, top_k=2, gate=gate, dispatch=dispatch)
        outputs.append(np.asarray(moe(x)))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        MoEDense(5, num_experts=6, top_k=3, gate=TSNEGate(6, top_k=2))


# Expert positions --------------------------------------------------------------------


def test_expert_positions_grid_and_kmeans():
    rng = _rng(4)
    pts = rng.rand(1000, 2) * [10.0, 4.0] + [-5.0, 1.0]
    grid = expert_positions(pts, 6, "grid")
    lo, hi = np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0)
    xs = lo[0] + (np.arange(3) + 0.5) / 3 * (hi[0] - lo[0])
    ys = lo[1] + (np.arange(2) + 0.5) / 2 * (hi[1] - lo[1])
    expected = np.array([[x, y] for y in ys for x in xs])
    np.testing.assert_allclose(grid, expected, rtol=1e-5)
    centres = np.array([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    blobs = np.concatenate([c + 0.1 * rng.randn(50, 2) for c in centres])
    found = expert_positions(blobs, 3, "kmeans", seed=0)
    order = np.argsort(found[:, 0])
    np.testing.assert_allclose(found[order], centres, atol=0.1)
    assert nearest_neighbour_sq_distance(centres) == pytest.approx(200.0)
    gate = TSNEGate(3)
    gate.build((None, 2))
    np.testing.assert_allclose(gate.init_positions(blobs, "kmeans"), gate.positions.numpy())


# Parametric t-SNE map ----------------------------------------------------------------


def test_joint_add_loss_equals_weight_times_tsne_loss():
    x, _ = _clustered(n=40)
    tsne_map = ParametricTSNEMap(hidden_units=(8,), perplexity=8.0, loss_weight=0.3)
    y = tsne_map(x, training=True)
    assert len(tsne_map.losses) == 1
    expected = 0.3 * float(parametric_tsne_loss(x, y, perplexity=8.0, dof=1.0))
    assert float(tsne_map.losses[0]) == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    tsne_map(x, training=False)
    assert tsne_map.losses == []
    tsne_map.trainable = False  # a frozen map adds nothing
    tsne_map(x, training=True)
    assert tsne_map.losses == []


def test_joint_loss_reaches_model_losses_through_gate():
    x, _ = _clustered(n=32)
    inputs = keras.Input((12,))
    tsne_map = ParametricTSNEMap(hidden_units=(8,), perplexity=5.0, loss_weight=2.0)
    gates = TSNEGate(4, top_k=2, mapping=tsne_map)(inputs)["gates"]
    model = keras.Model(inputs, keras.layers.Dense(3)(gates))
    model(x, training=True)
    assert len(model.losses) == 1
    added = float(model.losses[0])
    y = tsne_map(x)
    assert added == pytest.approx(
        2.0 * float(parametric_tsne_loss(x, y, 5.0)), rel=1e-5
    )


def test_fit_parametric_tsne_lowers_the_kl():
    keras.utils.set_random_seed(0)
    x, _ = _clustered(n=120)
    tsne_map = ParametricTSNEMap(hidden_units=(16,), perplexity=10.0)
    before = float(parametric_tsne_loss(x, tsne_map(x), 10.0))
    history = fit_parametric_tsne(tsne_map, x, batch_size=60, epochs=15, learning_rate=1e-2)
    after = float(parametric_tsne_loss(x, tsne_map(x), 10.0))
    assert after < 0.8 * before
    assert len(history.history["loss"]) == 15
    assert tsne_map.loss_weight == 0.0 and tsne_map.trainable


# Expert clusters ---------------------------------------------------------------------


def test_cluster_mask_densities():
    mask = cluster_mask(120, 80, 4, local_density=0.5, remote_density=0.05, seed=0)
    rows, cols = block_ids(120, 4), block_ids(80, 4)
    assert set(np.unique(mask)) == {0.0, 1.0}
    for a in range(4):
        for b in range(4):
            block = mask[np.ix_(rows == a, cols == b)]
            expected = 0.5 if a == b else 0.05
            assert abs(block.mean() - expected) <= 0.5 / block.size
    np.testing.assert_array_equal(
        mask, cluster_mask(120, 80, 4, local_density=0.5, remote_density=0.05, seed=0)
    )
    assert not np.array_equal(mask, cluster_mask(120, 80, 4, 0.5, 0.05, seed=1))
    np.testing.assert_array_equal(block_ids(10, 3), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_expert_cluster_dense_uses_block_mask():
    layer = ExpertClusterDense(64, num_experts=4, local_density=0.75, remote_density=0.1, seed=3)
    x = _rng(5).randn(6, 32).astype("float32")
    y = np.asarray(layer(x))
    np.testing.assert_array_equal(layer.mask.numpy(), cluster_mask(32, 64, 4, 0.75, 0.1, seed=3))
    np.testing.assert_allclose(
        y, x @ (layer.kernel.numpy() * layer.mask.numpy()) + layer.bias.numpy(),
        rtol=1e-5, atol=1e-5,
    )
    config = layer.get_config()
    assert "density" not in config and config["remote_density"] == 0.1
    clone = ExpertClusterDense.from_config(config)
    clone.build((None, 32))
    np.testing.assert_array_equal(clone.mask.numpy(), layer.mask.numpy())


def test_expert_clusters_match_numpy_and_count_weights():
    rng = _rng(6)
    x = rng.randn(10, 9).astype("float32")
    gates = np.zeros((10, 3), "float32")
    gates[np.arange(10), np.arange(10) % 3] = 0.7
    gates[np.arange(10), (np.arange(10) + 1) % 3] = 0.3
    gates[0] = [1.0, 0.0, 0.0]
    layer = ExpertClusters(3, 4, input_density=0.6, local_density=0.8,
                           remote_density=0.2, seed=2)
    out = np.asarray(layer(x, gates))
    l1, l2 = layer.input_layer, layer.cluster_layer
    g = np.repeat(gates, 4, axis=1)
    h = np.maximum(x @ (l1.kernel.numpy() * l1.mask.numpy()) + l1.bias.numpy(), 0) * g
    ref = np.maximum(h @ (l2.kernel.numpy() * l2.mask.numpy()) + l2.bias.numpy(), 0) * g
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Used connections: brute force over each example's active units.
    counts = layer.used_weight_count(gates > 0)
    for i in range(10):
        units = g[i] > 0
        expected = l1.mask.numpy()[:, units].sum() + l2.mask.numpy()[np.ix_(units, units)].sum()
        assert counts[i] == expected
    assert counts[0] < counts[1]


def test_serialization_round_trip(tmp_path):
    keras.utils.set_random_seed(1)
    x, _ = _clustered(n=20)
    inputs = keras.Input((12,))
    tsne_map = ParametricTSNEMap(hidden_units=(8,), perplexity=5.0, loss_weight=0.1)
    gate = TSNEGate(4, top_k=2, temperature=0.3, mapping=tsne_map, name="gate")
    gate_out = gate(inputs)
    hidden = ExpertClusters(4, 3, local_density=0.7, remote_density=0.1, seed=4,
                            name="experts")(inputs, gate_out["gates"])
    model = keras.Model(inputs, [keras.layers.Dense(3)(hidden), gate_out["gates"]])
    gate.set_positions(_rng(7).randn(4, 2))
    path = str(tmp_path / "tsne_moe.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for name in ("input_layer", "cluster_layer"):
        np.testing.assert_array_equal(
            getattr(loaded.get_layer("experts"), name).mask.numpy(),
            getattr(model.get_layer("experts"), name).mask.numpy(),
        )
    np.testing.assert_array_equal(
        loaded.get_layer("gate").positions.numpy(), gate.positions.numpy()
    )
    assert loaded.get_layer("gate").mapping.loss_weight == 0.1
    # Config round trip of a gate with a custom mapping network.
    custom = TSNEGate(3, top_k=1, mapping=ParametricTSNEMap(network=keras.layers.Dense(2)))
    clone = TSNEGate.from_config(custom.get_config())
    assert isinstance(clone.mapping, ParametricTSNEMap) and clone.top_k == 1


# Bad input -----------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="perplexity"):
        ParametricTSNEMap(perplexity=1.0)
    tsne_map = ParametricTSNEMap(hidden_units=(4,), perplexity=30.0, loss_weight=1.0)
    with pytest.raises(ValueError, match="perplexity"):  # batch of 10 <= perplexity
        tsne_map(np.zeros((10, 3), "float32"), training=True)
    with pytest.raises(ValueError, match="batch_size"):
        fit_parametric_tsne(tsne_map, np.zeros((100, 3)), batch_size=20)
    for name in ("local_density", "remote_density", "input_density"):
        for bad in (0.0, 1.5, -0.1):
            with pytest.raises(ValueError, match=name):
                ExpertClusters(4, 2, **{name: bad})
    with pytest.raises(ValueError, match="remote_density"):
        cluster_mask(8, 8, 2, local_density=0.2, remote_density=0.5)
    with pytest.raises(ValueError, match="local_density"):
        ExpertClusterDense(8, 2, local_density=0.0)
    with pytest.raises(ValueError, match="num_experts"):
        ExpertClusterDense(4, num_experts=5)
    with pytest.raises(ValueError, match="top_k"):
        TSNEGate(3, top_k=4)
    with pytest.raises(ValueError, match="temperature"):
        TSNEGate(3, temperature=0.0)
    with pytest.raises(ValueError, match="mapping"):
        TSNEGate(3, mapping="mlp")
    with pytest.raises(ValueError, match="mapping"):
        TSNEGate(3, mapping=keras.layers.Dense(3))(np.zeros((4, 5), "float32"))
    with pytest.raises(ValueError, match="inputs"):
        TSNEGate(3)(np.zeros((4, 3), "float32"))
    with pytest.raises(ValueError, match="embedding"):
        expert_positions(np.zeros((10, 3)), 2)
    with pytest.raises(ValueError, match="embedding"):
        expert_positions(np.zeros((2, 2)), 3, "kmeans")
    with pytest.raises(ValueError, match="method"):
        expert_positions(np.zeros((10, 2)), 2, "random")
    gate = TSNEGate(3)
    gate.build((None, 2))
    with pytest.raises(ValueError, match="positions"):
        gate.set_positions(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="positions"):
        gate.set_positions(np.zeros((3, 3)))

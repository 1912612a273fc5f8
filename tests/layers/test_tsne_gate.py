"""The t-SNE gate and the parametric t-SNE map (paper 000), on TensorFlow and JAX."""

import numpy as np
import pytest

import keras

from keras_moe.layers.expert_clusters import ExpertClusters
from keras_moe.layers.moe_dense import MoEDense
from keras_moe.layers.tsne_gate import (
    ParametricTSNEMap,
    TSNEGate,
    expert_positions,
    fit_parametric_tsne,
    nearest_neighbour_sq_distance,
)
from keras_moe.regularizers.tsne import parametric_tsne_loss
from testing_utils import gradients, run_layer_test, to_numpy

pytestmark = pytest.mark.multi_backend


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
    w, b = to_numpy(mapping.kernel), to_numpy(mapping.bias)
    c = to_numpy(gate.positions)
    _, _, gates, _, _, _ = _gate_reference(x @ w + b, c, 2.0, 2)
    np.testing.assert_allclose(np.asarray(out["gates"]), gates, rtol=1e-5, atol=1e-6)
    # Default positions: a 2x2 grid over [-1, 1]^2.
    np.testing.assert_allclose(c, [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    weights = np.arange(4, dtype="float32")
    _, _, grads = gradients(
        lambda: keras.ops.sum(gate(x)["gates"] * weights), variables=[gate.positions, mapping.kernel]
    )
    assert all(g is not None and np.any(g != 0) for g in grads)


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
    np.testing.assert_allclose(gate.init_positions(blobs, "kmeans"), to_numpy(gate.positions))


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
            to_numpy(getattr(loaded.get_layer("experts"), name).mask),
            to_numpy(getattr(model.get_layer("experts"), name).mask),
        )
    np.testing.assert_array_equal(
        to_numpy(loaded.get_layer("gate").positions), to_numpy(gate.positions)
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


def test_tsne_gate_layer_contract(tmp_path):
    x = _rng(9).randn(6, 2).astype("float32")
    shapes = {key: (6, 4) for key in ("gates", "logits", "probs", "dispatch_mask")}
    shapes.update(load=(4,), top_k_indices=(6, 2), top_k_gates=(6, 2), embedding=(6, 2))
    run_layer_test(
        TSNEGate, dict(num_experts=4, top_k=2, temperature=0.5), x,
        expected_output_shape=shapes, expected_num_trainable_weights=1, tmp_path=tmp_path,
    )


def test_parametric_tsne_map_layer_contract(tmp_path):
    x, _ = _clustered(n=24)
    run_layer_test(
        ParametricTSNEMap, dict(hidden_units=(8,), perplexity=5.0, loss_weight=0.5), x,
        expected_output_shape=(24, 2), expected_num_trainable_weights=4,
        expected_num_losses=1, tmp_path=tmp_path,
    )

"""Tests of the zoo's t-SNE-gated spatially sparse MoE and its baselines."""


import numpy as np
import pytest

import keras

from keras_moe.analysis import gates as gate_reader
from keras_moe.layers.expert_clusters import ExpertClusters
from keras_moe.layers.tsne_gate import ParametricTSNEMap, TSNEGate, fit_parametric_tsne
from keras_moe.regularizers.tsne import parametric_tsne_loss
from keras_moe.zoo import describe, get_model, list_models

from keras_moe.zoo import spatially_sparse as zoo_tsne

SHAPE = (6, 6, 1)


def _images(n=96, classes=3, seed=0):
    """Class-structured tiny images: each class lights a different third of the image."""
    rng = np.random.RandomState(seed)
    y = np.arange(n) % classes
    x = rng.randint(0, 60, size=(n,) + SHAPE)
    for c in range(classes):
        x[y == c, 2 * c : 2 * c + 2] += 180
    return x.astype("uint8"), y


def _tiny(**kw):
    kw = dict(input_shape=SHAPE, num_classes=3, num_experts=4, top_k=2, expert_units=4,
              map_hidden_units=(8,), perplexity=5.0, temperature=1.0, seed=1) | kw
    return zoo_tsne.tsne_moe(**kw)


def _loss(model, x, y):
    logits = model.predict(x, verbose=0)
    return float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits))


def test_registered_with_descriptions():
    assert {"tsne_moe", "tsne_moe_dense_mlp"} <= set(list_models("tsne_moe"))
    assert "t-SNE" in describe("tsne_moe")
    model = get_model("tsne_moe", input_shape=SHAPE, num_classes=3, num_experts=4,
                      expert_units=2, map_hidden_units=(4,))
    assert model.output.shape == (None, 3)
    assert isinstance(model.get_layer("gate"), TSNEGate)
    assert isinstance(model.get_layer("experts"), ExpertClusters)


def test_frozen_map_procedure_trains_and_loss_decreases():
    keras.utils.set_random_seed(0)
    x, y = _images()
    model = _tiny(map_training="frozen")
    tsne_map = model.get_layer("gate").mapping
    flat = x.reshape(len(x), -1).astype("float32") / 255.0
    map_before = [w.copy() for w in tsne_map.get_weights()]
    fit_parametric_tsne(tsne_map, flat, batch_size=48, epochs=3, learning_rate=1e-2)
    assert not tsne_map.trainable  # the map stays frozen for the classifier
    gate = model.get_layer("gate")
    gate.init_positions(np.asarray(tsne_map(flat)), "kmeans")
    map_trained = [w.copy() for w in tsne_map.get_weights()]
    assert any(not np.allclose(a, b) for a, b in zip(map_before, map_trained))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = _loss(model, x, y)
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    assert _loss(model, x, y) < before - 0.05
    for a, b in zip(map_trained, tsne_map.get_weights()):
        np.testing.assert_array_equal(a, b)  # frozen: unchanged by the classifier
    assert model.losses == []


def test_joint_mode_adds_the_weighted_tsne_term_and_trains():
    keras.utils.set_random_seed(1)
    x, y = _images(n=64)
    model = _tiny(map_training="joint", tsne_weight=0.5)
    tsne_map = model.get_layer("gate").mapping
    assert tsne_map.trainable and tsne_map.loss_weight == 0.5
    model(x[:32], training=True)
    assert len(model.losses) == 1
    added = float(model.losses[0])
    flat = x[:32].reshape(32, -1).astype("float32") / 255.0
    expected = 0.5 * float(parametric_tsne_loss(flat, tsne_map(flat), 5.0))
    assert added == pytest.approx(expected, rel=1e-5)
    map_before = [w.copy() for w in tsne_map.get_weights()]
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = _loss(model, x, y)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert _loss(model, x, y) < before
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert any(not np.allclose(a, b) for a, b in zip(map_before, tsne_map.get_weights()))


def test_softmax_baseline_and_dense_mlp():
    keras.utils.set_random_seed(2)
    x, y = _images(n=64)
    softmax = _tiny(gate="softmax")
    assert softmax.get_layer("gate").top_k == 2
    width = zoo_tsne.matched_dense_width(5000, 36, 3)
    assert abs((36 * width + width * width + 3 * width) - 5000) < 36 + 2 * width + 4
    mlp = zoo_tsne.tsne_moe_dense_mlp(input_shape=SHAPE, num_classes=3,
                                      hidden_units=(width, width))
    kernels = sum(int(np.prod(w.shape)) for w in mlp.weights if "kernel" in w.path)
    assert kernels == 36 * width + width * width + 3 * width
    for model in (softmax, mlp):
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = _loss(model, x, y)
        model.fit(x, y, batch_size=32, epochs=3, verbose=0)
        assert _loss(model, x, y) < before


def test_gate_model_and_weights_per_example():
    x, _ = _images(n=10)
    model = _tiny()
    outs = gate_reader.gate_model(model, "gate", outputs="all").predict(x, verbose=0)
    assert "load" not in outs and outs["embedding"].shape == (10, 2)
    assert np.all(outs["dispatch_mask"].sum(axis=1) == 2)
    counts = zoo_tsne.weights_per_example(model, outs["dispatch_mask"])
    experts = model.get_layer("experts")
    m1, m2 = experts.input_layer.mask.numpy(), experts.cluster_layer.mask.numpy()
    for i in range(10):
        units = np.repeat(outs["dispatch_mask"][i], 4) > 0
        expected = m1[:, units].sum() + m2[np.ix_(units, units)].sum() + units.sum() * 3
        assert counts[i] == expected


def test_zoo_model_save_load(tmp_path):
    x, _ = _images(n=8)
    model = _tiny(map_training="joint")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    assert isinstance(loaded.get_layer("gate").mapping, ParametricTSNEMap)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gate"):
        _tiny(gate="noisy")
    with pytest.raises(ValueError, match="map_training"):
        _tiny(map_training="pretrained")
    with pytest.raises(ValueError, match="top_k"):
        _tiny(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="remote_density"):
        _tiny(remote_density=0.0)
    with pytest.raises(ValueError, match="local_density"):
        _tiny(local_density=1.2)
    with pytest.raises(ValueError, match="perplexity"):
        _tiny(perplexity=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        _tiny(num_classes=1)
    with pytest.raises(ValueError, match="mapping"):
        _tiny(mapping=keras.layers.Dense(3))

"""`keras_moe.zoo.deepmoe.model`: DeepMoEModel as a functional model with the objective of eq. 7."""

import numpy as np
import pytest

import keras

from keras_moe.layers.gates import ReLUGate
from keras_moe.zoo import deepmoe

from .helpers import NUM_CLASSES, SHAPE, tiny

def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + SHAPE).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=n)
    return x, y


def np_ce(logits, y):
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def objective(model, x, y, lam, mu):
    """Eq. 7 in numpy from the network's training-mode outputs."""
    out = model.network(x, training=True)
    ce = np_ce(np.asarray(out["logits"], "float64"), y).mean()
    ce_e = np_ce(np.asarray(out["embedding_logits"], "float64"), y).mean()
    # eq. 8 per example, divided by the number of gated channels, averaged over the batch
    gates = np.concatenate([np.asarray(g, "float64") for g in out["gates"]], axis=1)
    l_g = np.abs(gates).sum(axis=1).mean() / gates.shape[1]
    return ce + lam * l_g + mu * ce_e, ce, l_g, ce_e


def compile_plain(model, lr=0.0):
    model.compile(
        keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


# The objective ---------------------------------------------------------------------------

def test_fit_loss_is_eq7_and_zero_switch_needs_no_recompile(monkeypatch):
    traces = []  # compute_loss's Python body runs once per trace of the train function
    original = deepmoe.embedding_cross_entropy
    monkeypatch.setattr(
        deepmoe.model, "embedding_cross_entropy", lambda *a: traces.append(1) or original(*a)
    )
    x, y = batch()
    model = tiny(gate_l1=0.7, embedding_loss_weight=1.3)
    compile_plain(model, lr=0.0)  # weights stay fixed, the reported loss is eq. 7 exactly
    loss, _ = model.train_on_batch(x, y)
    full, ce, l_g, ce_e = objective(model, x, y, 0.7, 1.3)
    assert l_g == pytest.approx(1.0, abs=0.05) and ce_e > 0.1  # both terms are present
    assert loss == pytest.approx(full, rel=1e-4)
    assert abs(loss - ce) > 0.5  # the extra terms are not negligible here
    train_function = model.train_function
    num_traces = len(traces)
    assert num_traces >= 1

    model.gate_l1 = 0.0
    model.embedding_loss_weight = 0.0
    loss0, _ = model.train_on_batch(x, y)
    assert loss0 == pytest.approx(objective(model, x, y, 0.0, 0.0)[0], rel=1e-4)
    assert model.train_function is train_function
    assert len(traces) == num_traces  # no retrace: the coefficients are variables

    model.gate_l1 = 2.0  # and back on, each term alone
    loss2, _ = model.train_on_batch(x, y)
    assert loss2 == pytest.approx(objective(model, x, y, 2.0, 0.0)[0], rel=1e-4)

    # Now learn (same compiled function): a large lambda closes the gates, and the gate
    # heads and the embedding receive gradients.
    net = model.network
    gate_kernel = net.get_layer("stage2_block1_conv1_gate").kernel
    emb_kernel = net.get_layer("embedding").dense.kernel
    before = [gate_kernel.numpy().copy(), emb_kernel.numpy().copy()]
    gates0 = np.mean([np.asarray(g).mean() for g in net(x, training=False)["gates"]])
    model.optimizer.learning_rate.assign(0.5)
    model.gate_l1, model.embedding_loss_weight = 50.0, 1.0
    for _ in range(4):
        loss, accuracy = model.train_on_batch(x, y)
        assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0
    assert len(traces) == num_traces
    assert not np.allclose(before[0], gate_kernel.numpy())  # gate heads learn
    assert not np.allclose(before[1], emb_kernel.numpy())  # the embedding learns
    gates1 = np.mean([np.asarray(g).mean() for g in net(x, training=False)["gates"]])
    assert gates1 < gates0 - 0.1


def test_compute_loss_terms_exactly():
    x, y = batch(seed=1)
    model = tiny(gate_l1=0.25, embedding_loss_weight=0.5)
    compile_plain(model)
    y_pred = model(x, training=True)
    assert len(model.losses) == 1  # the gate term, added in training calls only
    got = float(model.compute_loss(x, y, y_pred, training=True))
    full, ce, l_g, ce_e = objective(model, x, y, 0.25, 0.5)
    assert got == pytest.approx(full, rel=1e-5)
    assert got - ce == pytest.approx(0.25 * l_g + 0.5 * ce_e, rel=1e-3)
    # Inference calls add nothing: evaluate's loss is the compile loss alone.
    y_pred = model(x, training=False)
    assert model.losses == []
    base = np_ce(np.asarray(y_pred, "float64"), y).mean()
    assert float(model.compute_loss(x, y, y_pred, training=False)) == pytest.approx(base, rel=1e-5)
    assert model.evaluate(x, y, verbose=0)[0] == pytest.approx(base, rel=1e-4)


def test_gate_term_weighs_every_channel_alike():
    """L_g = sum over all gated channels of |g| / their number (eq. 8 normalised), not the
    mean of the layers' means: layers of different widths get different gate levels."""
    x, _ = batch(seed=2)
    model = tiny(gate_l1=1.0)
    heads = [layer for layer in model.network.layers if isinstance(layer, ReLUGate)]
    for i, head in enumerate(heads):  # e is on the simplex: every gate of head i is 0.5 * i
        head.kernel.assign(np.full(head.kernel.shape, 0.5 * i, "float32"))
    model(x, training=True)
    (got,) = [float(loss) for loss in model.losses]
    widths = np.array([h.kernel.shape[1] for h in heads], "float64")
    levels = 0.5 * np.arange(len(heads))
    expected = (widths * levels).sum() / widths.sum()
    layer_mean = levels.mean()
    assert abs(expected - layer_mean) > 0.1  # the two normalisations differ here
    assert got == pytest.approx(expected, rel=1e-5)


def test_embedding_cross_entropy_one_hot_and_sample_weight():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 4)).astype("float32")
    y = rng.integers(0, 4, size=6)
    w = rng.uniform(0, 2, size=6).astype("float32")
    expected = (np_ce(logits.astype("float64"), y) * w).sum() / 6
    got = deepmoe.embedding_cross_entropy(y, logits, w)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    onehot = np.eye(4, dtype="float32")[y]
    got = deepmoe.embedding_cross_entropy(onehot, logits, w)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    got = deepmoe.embedding_cross_entropy(y[:, None], logits)
    assert float(got) == pytest.approx(np_ce(logits.astype("float64"), y).mean(), rel=1e-5)


def test_gates_start_open():
    x, _ = batch(seed=4)
    out = tiny().network(x, training=False)
    assert len(out["gates"]) == 6  # 3 stages x 1 block x 2 convs
    for g in out["gates"]:
        g = np.asarray(g)
        assert g.min() > 0.9 and g.max() < 1.1
    np.testing.assert_allclose(np.asarray(out["embedding_logits"]).shape, (8, NUM_CLASSES))


def test_save_load_safe_mode(tmp_path):
    x, y = batch(seed=5)
    model = tiny(gate_l1=0.3, embedding_loss_weight=0.6)
    model(x, training=True)  # move the batch-norm statistics off their initial values
    model.gate_l1 = 0.05
    path = tmp_path / "deepmoe.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, deepmoe.DeepMoEModel)
    assert loaded.gate_l1 == pytest.approx(0.05)
    assert loaded.embedding_loss_weight == pytest.approx(0.6)
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)),
        rtol=1e-5, atol=1e-5,
    )
    # Reloaded and compiled, it computes its objective.
    compile_plain(loaded)
    got = float(loaded.compute_loss(x, y, loaded(x, training=True), training=True))
    assert got == pytest.approx(objective(loaded, x, y, 0.05, 0.6)[0], rel=1e-5)


# Structure ------------------------------------------------------------------------------


# A functional model ----------------------------------------------------------------------


def test_the_model_is_functional_and_its_layers_are_visible():
    """`model.inputs`, `summary()` and `plot_model`'s graph see every layer (the model
    used to wrap its network, so none of them could)."""
    import json

    from keras_moe import compat

    model = tiny()
    assert compat.is_functional(model)
    assert len(model.inputs) == 1 and tuple(model.inputs[0].shape) == (None,) + SHAPE
    lines = []
    model.summary(line_length=250, print_fn=lambda line, **kwargs: lines.append(line))
    text = "\n".join(lines)
    for name in ("embedding", "stage1_block1_conv1_gate", "stage1_block1_conv1", "objective"):
        assert name in text, name
    dot = keras.utils.model_to_dot(model).to_string()  # what plot_model draws
    assert "stage2_block1_conv2_gate" in dot and "ShallowEmbedding" in dot
    assert json.loads(model.to_json())["class_name"] == "DeepMoEModel"


def test_get_config_chains_to_super_and_rebuilds_the_same_model():
    model = tiny(gate_l1=0.3)
    config = model.get_config()
    assert {"name", "trainable", "dtype"} <= set(config)  # keras.Model's own keys
    assert config["architecture"] == "resnet_cifar" and config["depth"] == 8
    assert config["gate_l1"] == pytest.approx(0.3)
    assert len(str(config)) < 1200  # the architecture's keywords, not the graph
    clone = deepmoe.DeepMoEModel.from_config(config)
    clone.set_weights(model.get_weights())
    x, _ = batch()
    np.testing.assert_allclose(clone.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


@pytest.mark.slow
def test_loading_without_keras_moe_says_to_import_it(tmp_path):
    """With only `import keras`, loading used to dump a 30 KB config; now the short
    config's first keys say what to do."""
    import os
    import subprocess
    import sys

    path = tmp_path / "deepmoe.keras"
    tiny().save(path)
    script = f"import keras\nkeras.saving.load_model({str(path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert "import keras_moe" in error and "DeepMoEModel" in error
    assert len(error) < 2000, len(error)

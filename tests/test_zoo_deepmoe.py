"""DeepMoE zoo (paper 004): DeepMoEModel's objective, the builders, parameter counts."""

import inspect

import numpy as np
import pytest

import keras

from keras_moe import zoo
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from keras_moe.zoo import deepmoe

NUM_CLASSES = 5
SHAPE = (16, 16, 3)


def tiny(**kwargs):
    """A DeepMoE ResNet-8 with 8/16/32 channels and a 4-layer width-4 embedding."""
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return deepmoe.deepmoe_resnet_cifar(
        depth=8, input_shape=SHAPE, width_multiplier=0.5, embedding_widths=(4, 4, 4, 4),
        **kwargs,
    )


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


def _inbound_layer(layer, index=0):
    return layer._inbound_nodes[0].input_tensors[index]._keras_history.operation


def test_gates_after_bn_relu_and_shortcut_never_gated():
    net = tiny().network
    gated = [l for l in net.layers if isinstance(l, GatedConv2D)]
    assert len(gated) == 6
    for layer in gated:
        assert isinstance(_inbound_layer(layer, 0), keras.layers.ReLU), layer.name
        gate = _inbound_layer(layer, 1)
        assert isinstance(gate, ReLUGate) and gate.name == f"{layer.name}_gate"
        assert isinstance(_inbound_layer(gate), ShallowEmbedding)
    plain = [l for l in net.layers if type(l) is keras.layers.Conv2D]
    assert sorted(l.name for l in plain) == [
        "stage2_block1_proj", "stage3_block1_proj", "stem_conv"
    ]


def test_wide_doubles_gated_channels_only():
    narrow, wide = tiny().network, tiny(wide=True).network
    for name in ("stage1_block1_conv1", "stage3_block1_conv1"):
        assert wide.get_layer(name).filters == 2 * narrow.get_layer(name).filters
        assert wide.get_layer(f"{name[:-1]}2_gate").units == 2 * narrow.get_layer(
            f"{name[:-1]}2_gate").units
    assert wide.get_layer("stage3_block1_conv2").filters == narrow.get_layer(
        "stage3_block1_conv2").filters  # residual stream keeps its width
    assert wide.get_layer("logits").kernel.shape == narrow.get_layer("logits").kernel.shape
    vgg_w = deepmoe.vgg16(width_multiplier=0.125, wide=True, num_classes=3)
    vgg_n = deepmoe.vgg16(width_multiplier=0.125, num_classes=3)
    assert [l.filters for l in vgg_w.layers if isinstance(l, keras.layers.Conv2D)] == [
        2 * l.filters for l in vgg_n.layers if isinstance(l, keras.layers.Conv2D)]


def test_registry_entries():
    names = ["deepmoe_resnet56", "deepmoe_resnet110", "deepmoe_resnet18", "deepmoe_resnet34",
             "deepmoe_resnet50", "deepmoe_vgg16", "deepmoe_resnet_cifar", "resnet56",
             "resnet110", "resnet18", "resnet34", "resnet50", "vgg16", "resnet_cifar"]
    for name in names:
        assert name in zoo.list_models()
        assert zoo.describe(name) and zoo.get_builder(name).__name__ == name
        params = list(inspect.signature(zoo.get_builder(name)).parameters.values())
        assert [p.name for p in params[:2]] == ["input_shape", "num_classes"]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
        assert "Args:" in zoo.get_builder(name).__doc__
    model = zoo.get_model("resnet_cifar", depth=14, num_classes=3, width_multiplier=0.25)
    assert isinstance(model, keras.Model) and not isinstance(model, deepmoe.DeepMoEModel)
    assert model.output_shape == (None, 3)


# Argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(width_multiplier=0.0), "width_multiplier"),
        (dict(width_multiplier=-1.0), "width_multiplier"),
        (dict(input_shape=(8, 8, 3)), "input_shape"),  # the embedding strides 2^4
        (dict(input_shape=(16, 16)), "input_shape"),
        (dict(num_classes=1), "num_classes"),
        (dict(depth=9), "depth"),
        (dict(gate_l1=-0.1), "gate_l1"),
        (dict(embedding_loss_weight=-1.0), "embedding_loss_weight"),
    ],
)
def test_bad_builder_arguments(kwargs, name):
    args = dict(depth=8, input_shape=SHAPE, num_classes=NUM_CLASSES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        deepmoe.deepmoe_resnet_cifar(**args)


def test_bad_arguments_other_builders_and_setters():
    with pytest.raises(ValueError, match="input_shape"):
        deepmoe.resnet18(input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="input_shape"):
        deepmoe.vgg16(input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="width_multiplier"):
        deepmoe.resnet50(width_multiplier=0)
    with pytest.raises(ValueError, match="num_classes"):
        deepmoe.deepmoe_vgg16(num_classes=0)
    model = tiny()
    with pytest.raises(ValueError, match="gate_l1"):
        model.gate_l1 = -1.0
    with pytest.raises(ValueError, match="embedding_loss_weight"):
        model.embedding_loss_weight = float("nan")
    with pytest.raises(ValueError, match="network"):
        deepmoe.DeepMoEModel(deepmoe.resnet_cifar(depth=8, width_multiplier=0.25))


# Full-size models: build only -----------------------------------------------------------


def _embedding_and_gate_params(model):
    net = model.network
    emb = net.get_layer("embedding").count_params()
    gated = [l for l in net.layers if isinstance(l, GatedConv2D)]
    heads = [l for l in net.layers if isinstance(l, ReLUGate)]
    num_classes = net.get_layer("logits").units
    channels = sum(l.kernel.shape[-2] for l in gated)  # gate length = input channels
    assert sum(h.count_params() for h in heads) == num_classes * channels
    return emb + num_classes * channels, len(gated)


# Baselines: published trainable parameters and the tolerance of their rounding (He et al.
# give two significant digits for the CIFAR ResNets; torchvision's ImageNet counts; the
# CIFAR VGG-16 with BN and one dense layer has no single published count), and this
# implementation's exact `count_params()` (batch-norm moving statistics included).
BASELINES = {
    "resnet56": (0.85e6, 0.02, 860_026),
    "resnet110": (1.7e6, 0.03, 1_744_852),
    "resnet18": (11.7e6, 0.02, 11_699_112),
    "resnet34": (21.8e6, 0.02, 21_814_696),
    "resnet50": (25.6e6, 0.02, 25_610_152),
    "vgg16": (14.77e6, 0.01, 14_778_660),
}
GATED_LAYERS = {"resnet56": 54, "resnet110": 108, "resnet18": 16, "resnet34": 32,
                "resnet50": 48, "vgg16": 12}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_full_size_build(name):
    published, tolerance, exact = BASELINES[name]
    keras.backend.clear_session()
    model = zoo.get_model(name)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == pytest.approx(published, rel=tolerance)
    assert model.count_params() == exact
    assert not any(isinstance(l, (GatedConv2D, ReLUGate)) for l in model.layers)


@pytest.mark.parametrize("name", sorted(GATED_LAYERS))
def test_deepmoe_full_size_build(name):
    keras.backend.clear_session()
    model = zoo.get_model(f"deepmoe_{name}")
    extra, gated = _embedding_and_gate_params(model)
    assert gated == GATED_LAYERS[name]
    # The baseline network, plus the embedding, the gate heads and the two coefficients.
    assert model.count_params() == BASELINES[name][2] + extra + 2

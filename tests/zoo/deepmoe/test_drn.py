"""DeepMoE bottleneck-B (paper 004, Fig. 2c) and DRN-A-50 segmentation (sec. 5.4).

The gate placement rule tested here (the paper gives it only as Fig. 2's drawing; see the
module docstring of `keras_moe.zoo.deepmoe`):

- bottleneck-A: conv1 (1x1), conv2 (3x3) and conv3 (1x1) of every bottleneck are
  `GatedConv2D`s, one `ReLUGate` head each: 3 per block, 3 * (3 + 4 + 6 + 3) = 48 in a
  ResNet-50 trunk. Wide doubles conv1's and conv2's outputs.
- bottleneck-B: only conv2 (3x3) is a `GatedConv2D` (gated on conv1's output); conv1
  and conv3 are plain `Conv2D`s: 1 head per block, 16. Wide doubles conv1's output only.
- Both: the stem, the projection shortcuts and the classifier are plain, and every gated
  convolution reads a post-BN ReLU.
"""

import functools
import inspect

import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_moe import compat, zoo
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from keras_moe.zoo import deepmoe

STAGES = (3, 4, 6, 3)  # ResNet-50 blocks per stage
WIDTHS = (64, 128, 256, 512)
BLOCKS = [f"stage{s + 1}_block{b + 1}" for s, n in enumerate(STAGES) for b in range(n)]
TORCHVISION_RESNET50 = 25_557_032  # trainable parameters, 1000 classes

TINY_SHAPE = (64, 64, 3)
TINY_CLASSES = 3
TINY_EMBEDDING = (4, 4, 4, 4, 4)


def resnet50_trunk_params(widths=WIDTHS, wide=False, bottleneck="A"):
    """Trainable parameters of ResNet-50 without its classifier, by formula.

    Convolutions have no bias; every batch norm has 2 trainable parameters per channel.
    """
    total = 7 * 7 * 3 * widths[0] + 2 * widths[0]  # stem
    c_in = widths[0]
    for w, blocks in zip(widths, STAGES):
        inner1 = 2 * w if wide else w  # conv1's output
        inner2 = 2 * w if wide and bottleneck == "A" else w  # conv2's output
        for block in range(blocks):
            total += c_in * inner1 + 2 * inner1  # conv1 1x1 + bn1
            total += 9 * inner1 * inner2 + 2 * inner2  # conv2 3x3 + bn2
            total += inner2 * 4 * w + 2 * 4 * w  # conv3 1x1 + bn3
            if block == 0:
                total += c_in * 4 * w + 2 * 4 * w  # projection shortcut + bn
            c_in = 4 * w
    return total


def trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def base_trainable(model):
    """Trainable parameters of a DeepMoE's base network (no embedding, no gate heads)."""
    net = model.network
    extra = [l for l in net.layers if isinstance(l, (ShallowEmbedding, ReLUGate))]
    return trainable(net) - sum(trainable(l) for l in extra)


def gated_names(model):
    net = getattr(model, "network", model)
    return sorted(l.name for l in net.layers if isinstance(l, GatedConv2D))


def expected_gated(bottleneck):
    convs = ("conv1", "conv2", "conv3") if bottleneck == "A" else ("conv2",)
    return sorted(f"{block}_{conv}" for block in BLOCKS for conv in convs)


def _inbound(layer, index=0):
    return compat.producing_operation(compat.inbound_nodes(layer)[0].input_tensors[index])


@pytest.fixture(scope="module")
def full_size():
    keras.backend.clear_session()
    return {"drn_a50": zoo.get_model("drn_a50"),
            "deepmoe_drn_a50": zoo.get_model("deepmoe_drn_a50")}


# Full size: build only -------------------------------------------------------------------


def test_resnet50_formula_matches_torchvision():
    assert resnet50_trunk_params() + 2048 * 1000 + 1000 == TORCHVISION_RESNET50


def test_drn_a50_full_size(full_size):
    model = full_size["drn_a50"]
    assert model.output_shape == (None, 832, 832, 19)
    # ResNet-50 minus its 1000-way fc, plus the 1x1 classifier convolution with bias.
    expected = TORCHVISION_RESNET50 - (2048 * 1000 + 1000) + (2048 * 19 + 19)
    assert resnet50_trunk_params() + 2048 * 19 + 19 == expected
    assert trainable(model) == expected  # 23,546,963
    assert not any(isinstance(l, (GatedConv2D, ReLUGate)) for l in model.layers)
    # Output stride 8: conv4_x and conv5_x keep the 104x104 map of conv3_x, dilated.
    for block, size, dilation in (("stage2_block4", 104, 1), ("stage3_block1", 104, 1),
                                  ("stage3_block2", 104, 2), ("stage4_block1", 104, 2),
                                  ("stage4_block3", 104, 4)):
        conv2 = model.get_layer(f"{block}_conv2")
        assert conv2.output.shape[1:3] == (size, size), block
        assert tuple(conv2.dilation_rate) == (dilation, dilation), block
    assert tuple(model.get_layer("stage3_block1_conv2").strides) == (1, 1)
    assert tuple(model.get_layer("stage2_block1_conv2").strides) == (2, 2)
    assert model.get_layer("classifier").output.shape == (None, 104, 104, 19)


def test_deepmoe_drn_a50_full_size(full_size):
    model = full_size["deepmoe_drn_a50"]
    base = full_size["drn_a50"]
    assert isinstance(model, deepmoe.DeepMoEModel)
    assert tuple(model.network.output["logits"].shape) == (None, 832, 832, 19)
    assert gated_names(model) == expected_gated("A") and model.num_gated_layers == 48
    assert base_trainable(model) == trainable(base)
    assert len(model.network.get_layer("embedding").convs) == 5  # ImageNet-size embedding
    for block, dilation in (("stage3_block2", 2), ("stage4_block1", 2), ("stage4_block3", 4)):
        assert model.network.get_layer(f"{block}_conv2").dilation_rate == (dilation,) * 2
    assert model.embedding_loss_weight == 0.0  # the default mu


# Bottleneck A vs B ----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tiny_resnet50(bottleneck, wide=False):
    """Built once per module and configuration (each build takes seconds)."""
    return deepmoe.deepmoe_resnet50(input_shape=(32, 32, 3), num_classes=TINY_CLASSES,
                                    width_multiplier=0.0625, embedding_widths=TINY_EMBEDDING,
                                    bottleneck=bottleneck, wide=wide)


def _tiny_drn(**kwargs):
    kwargs.setdefault("embedding_widths", TINY_EMBEDDING)
    return deepmoe.deepmoe_drn_a50(input_shape=TINY_SHAPE, num_classes=TINY_CLASSES,
                                   width_multiplier=0.125, **kwargs)


@pytest.mark.parametrize("bottleneck", ["A", "B"])
def test_gate_placement(bottleneck):
    for model in (_tiny_resnet50(bottleneck), _tiny_drn(bottleneck=bottleneck)):
        net = model.network
        assert gated_names(model) == expected_gated(bottleneck), model.name
        heads = [l for l in net.layers if isinstance(l, ReLUGate)]
        assert len(heads) == model.num_gated_layers == (48 if bottleneck == "A" else 16)
        for layer in net.layers:
            if isinstance(layer, GatedConv2D):
                reads = _inbound(layer, 0)  # a ReLU, or the max-pool after the stem's
                assert isinstance(reads, keras.layers.ReLU) or reads.name == "stem_pool"
                assert _inbound(layer, 1).name == f"{layer.name}_gate"
        plain = {l.name for l in net.layers if type(l) is keras.layers.Conv2D}
        proj = {f"stage{s}_block1_proj" for s in (1, 2, 3, 4)}
        assert {"stem_conv"} | proj <= plain
        if bottleneck == "B":
            assert {f"{b}_{c}" for b in BLOCKS for c in ("conv1", "conv3")} <= plain


def test_wide_b_doubles_only_the_gated_channels():
    narrow, wide = _tiny_resnet50("B").network, _tiny_resnet50("B", wide=True).network
    for block in ("stage1_block1", "stage4_block3"):
        assert wide.get_layer(f"{block}_conv1").filters == 2 * narrow.get_layer(
            f"{block}_conv1").filters
        assert wide.get_layer(f"{block}_conv2_gate").units == 2 * narrow.get_layer(
            f"{block}_conv2_gate").units
        for conv in ("conv2", "conv3"):
            assert wide.get_layer(f"{block}_{conv}").filters == narrow.get_layer(
                f"{block}_{conv}").filters
    # Base networks by formula: narrow B is ResNet-50 (B moves the gates, not the
    # channels); wide A doubles conv1's and conv2's outputs, wide B conv1's only.
    widths = tuple(max(1, round(w * 0.0625)) for w in WIDTHS)
    classifier = 4 * widths[-1] * TINY_CLASSES + TINY_CLASSES
    assert base_trainable(_tiny_resnet50("B")) == resnet50_trunk_params(widths) + classifier
    for bottleneck in ("A", "B"):
        model = _tiny_resnet50(bottleneck, wide=True)
        assert base_trainable(model) == resnet50_trunk_params(
            widths, wide=True, bottleneck=bottleneck) + classifier
    assert _tiny_resnet50("B", wide=True).name == "deepmoe_resnet50_b_wide"
    assert _tiny_resnet50("A").name == "deepmoe_resnet50"


# Training ---------------------------------------------------------------------------------


def _pixels(seed=0, n=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + TINY_SHAPE).astype("float32")
    y = rng.integers(0, TINY_CLASSES, size=(n,) + TINY_SHAPE[:2])
    return x, y


def _compile(model, lr, **kwargs):
    model.compile(keras.optimizers.SGD(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  **kwargs)


def test_drn_a50_fits_per_pixel_labels():
    x, y = _pixels()
    model = deepmoe.drn_a50(input_shape=TINY_SHAPE, num_classes=TINY_CLASSES,
                            width_multiplier=0.125)
    assert model.output_shape == (None,) + TINY_SHAPE[:2] + (TINY_CLASSES,)
    _compile(model, 0.01)
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)  # 2 steps, graph mode
    assert np.isfinite(history.history["loss"][0])


def test_deepmoe_drn_a50_fits_and_gates_learn():
    x, y = _pixels(seed=1)
    model = _tiny_drn(bottleneck="A", gate_l1=0.5, embedding_loss_weight=1.0)
    # Eager keeps this test fast (tracing the tiny DeepMoE DRN costs ~20 s on 2 cores);
    # the traced loss path is covered by the tf.function test below.
    _compile(model, 0.1, run_eagerly=True)
    net = model.network
    gate = net.get_layer("stage3_block2_conv2_gate").kernel
    embedding = net.get_layer("embedding").dense.kernel
    before = [gate.numpy().copy(), embedding.numpy().copy()]
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(before[0], gate.numpy())  # gate heads get gradients
    assert not np.allclose(before[1], embedding.numpy())  # so does the embedding
    assert model(x[:1]).shape == (1,) + TINY_SHAPE[:2] + (TINY_CLASSES,)


def _np_histogram_ce(y, logits, num_classes, weights=None):
    logits = logits.astype("float64")
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    out = []
    for i in range(len(y)):
        labels = y[i].reshape(-1)
        w = np.ones(labels.shape) if weights is None else weights[i].reshape(-1)
        keep = (labels >= 0) & (labels < num_classes)
        hist = np.bincount(labels[keep], weights=w[keep], minlength=num_classes)
        image_weight = w[keep].mean() if keep.any() else 0.0
        if hist.sum() > 0:
            hist = hist / hist.sum()
        out.append(-(hist * logp[i]).sum() * (1.0 if weights is None else image_weight))
    return float(np.mean(out))


def test_embedding_loss_on_pixel_labels_is_histogram_cross_entropy():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=(3, 5, 6))
    y[0, :2] = 255  # CityScapes' void label is left out
    y[2] = 255  # an image without a labelled pixel contributes 0
    logits = rng.normal(size=(3, 4)).astype("float32")
    want = _np_histogram_ce(y, logits, 4)
    assert float(deepmoe.embedding_cross_entropy(y, logits)) == pytest.approx(want, rel=1e-5)
    assert float(deepmoe.embedding_cross_entropy(y[..., None], logits)) == pytest.approx(
        want, rel=1e-5)
    onehot = np.eye(4, dtype="float32")[np.where(y == 255, 0, y)] * (y != 255)[..., None]
    assert float(deepmoe.embedding_cross_entropy(onehot[:2], logits[:2])) == pytest.approx(
        _np_histogram_ce(y[:2], logits[:2], 4), rel=1e-5)
    w = rng.uniform(0.5, 2.0, size=y.shape).astype("float32")
    assert float(deepmoe.embedding_cross_entropy(y, logits, w)) == pytest.approx(
        _np_histogram_ce(y, logits, 4, w), rel=1e-5)
    # Traced with unknown batch and image sizes, as in model.fit.
    traced = tf.function(deepmoe.embedding_cross_entropy, input_signature=[
        tf.TensorSpec((None, None, None), tf.int64), tf.TensorSpec((None, 4), tf.float32)])
    assert float(traced(y, logits)) == pytest.approx(want, rel=1e-5)
    # Image labels keep the classifier behaviour.
    labels = np.array([0, 3, 1])
    assert float(deepmoe.embedding_cross_entropy(labels, logits)) == pytest.approx(
        _np_histogram_ce(labels[:, None], logits, 4), rel=1e-5)


# Registry and argument checks --------------------------------------------------------------


def test_registry_entries():
    for name in ("deepmoe_drn_a50", "drn_a50"):
        assert name in zoo.list_models()
        assert "DRN-A-50" in zoo.describe(name)
        params = list(inspect.signature(zoo.get_builder(name)).parameters.values())
        assert [p.name for p in params[:2]] == ["input_shape", "num_classes"]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
        assert "Args:" in zoo.get_builder(name).__doc__
    for name in ("deepmoe_drn_a50", "deepmoe_resnet50"):
        signature = inspect.signature(zoo.get_builder(name))
        assert signature.parameters["bottleneck"].default == "A"
        assert "bottleneck:" in zoo.get_builder(name).__doc__
    assert "bottleneck" not in inspect.signature(zoo.resnet50).parameters
    assert "bottleneck" not in inspect.signature(zoo.drn_a50).parameters
    defaults = inspect.signature(zoo.deepmoe_drn_a50).parameters
    assert defaults["num_classes"].default == 19
    assert defaults["input_shape"].default == (832, 832, 3)


@pytest.mark.parametrize("builder", ["deepmoe_resnet50", "deepmoe_drn_a50"])
@pytest.mark.parametrize("value", ["C", "b", None, 2])
def test_bad_bottleneck(builder, value):
    with pytest.raises(ValueError, match=r"bottleneck must be one of 'A', 'B'"):
        zoo.get_model(builder, bottleneck=value)


@pytest.mark.parametrize(
    "builder,kwargs,name",
    [
        ("drn_a50", dict(input_shape=(60, 64, 3)), "input_shape"),  # not a multiple of 8
        ("drn_a50", dict(input_shape=(64, 100, 3)), "input_shape"),
        ("drn_a50", dict(input_shape=(4, 8, 3)), "input_shape"),  # below the stride
        ("drn_a50", dict(input_shape=(64, 64)), "input_shape"),
        ("drn_a50", dict(num_classes=1), "num_classes"),
        ("drn_a50", dict(width_multiplier=0), "width_multiplier"),
        ("deepmoe_drn_a50", dict(input_shape=(24, 24, 3)), "input_shape"),  # embedding: 32
        ("deepmoe_drn_a50", dict(input_shape=(36, 40, 3)), "input_shape"),
        ("deepmoe_drn_a50", dict(gate_l1=-1.0), "gate_l1"),
        ("deepmoe_drn_a50", dict(embedding_loss_weight=-1.0), "embedding_loss_weight"),
    ],
)
def test_bad_drn_arguments(builder, kwargs, name):
    with pytest.raises(ValueError, match=name):
        zoo.get_model(builder, **kwargs)

"""`keras_moe.zoo.deepmoe.resnet` and `.vgg`: the builders, their structure, parameter counts."""

import inspect

import numpy as np
import pytest

import keras

from keras_moe import compat, zoo
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from keras_moe.zoo import deepmoe

from .helpers import NUM_CLASSES, SHAPE, tiny


def _inbound_layer(layer, index=0):
    return compat.producing_operation(compat.inbound_nodes(layer)[0].input_tensors[index])


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

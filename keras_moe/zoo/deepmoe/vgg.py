"""DeepMoE VGG-16 (Wang et al. 2019, sec. 5.2.1) and its plain baseline, for CIFAR-100.

VGG-16 with batch norm (the common CIFAR variant): 13 3x3 convolutions with BN+ReLU, 5
max-pools, global average pooling, one dense layer to the classes (14.8M parameters for
CIFAR-100). In the DeepMoE every convolution but the first is gated ("a gating header
after each convolutional layer"); wide doubles every convolution ("the number of
channels in each convolutional layer by a factor of two").
"""

import keras

from keras_moe.layers.gated_conv import CIFAR_EMBEDDING_WIDTHS
from keras_moe.zoo.deepmoe.family import CONVNET, DEEPMOE
from keras_moe.zoo.deepmoe.model import (
    DEFAULT_GATE_L1,
    DeepMoEModel,
    GatedNetwork,
    register_architecture,
)
from keras_moe.zoo.deepmoe.resnet import bn, check_coefficients, check_common, classifier, relu, scaled
from keras_moe.zoo.registry import register_model

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


@register_architecture("vgg16")
def _vgg16(*, input_shape, num_classes, wide, width_multiplier, embedding_widths=None,
           gated=True, name=None):
    input_shape, num_classes, width_multiplier = check_common(
        input_shape, num_classes, width_multiplier, 32, embedding_widths if gated else None)
    inputs = keras.Input(input_shape, name="images")
    b = GatedNetwork(inputs, num_classes, gated, embedding_widths)
    x = inputs
    conv_index, pool_index = 0, 0
    for item in VGG16_CONFIG:
        if item == "M":
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, name=f"pool{pool_index}")(x)
            continue
        conv_index += 1
        filters = scaled(item, width_multiplier) * (2 if wide else 1)
        name_i = f"conv{conv_index}"
        x = b.conv(x, filters, 3, 1, name_i, gated=conv_index > 1)
        x = relu(bn(x, f"{name_i}_bn"), f"{name_i}_relu")
    return b.finish(classifier(x, num_classes), name)


@register_model(family=DEEPMOE)
def deepmoe_vgg16(*, input_shape=(32, 32, 3), num_classes=100, wide=False,
                  width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0,
                  embedding_widths=CIFAR_EMBEDDING_WIDTHS):
    """DeepMoE VGG-16 with batch norm for CIFAR-100 (12 gated convs; Wang et al. 2019).

    Args:
        input_shape: `(height, width, channels)`, height and width >= 32.
        num_classes: Number of classes (= latent experts of the embedding), >= 2.
        wide: Wide-DeepMoE: double every convolution's channels.
        width_multiplier: Scales every layer's channels, > 0.
        gate_l1: lambda, weight of the channel-mean gate L1 term L_g, >= 0.
        embedding_loss_weight: mu, weight of the embedding cross-entropy, >= 0.
        embedding_widths: Channels of the embedding's stride-2 convolutions.

    Example:

    >>> model = deepmoe_vgg16(num_classes=100)

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 5.2.1.
    """
    check_coefficients(gate_l1, embedding_loss_weight)
    return DeepMoEModel(
        "vgg16", input_shape=input_shape, num_classes=num_classes, wide=wide,
        width_multiplier=width_multiplier, embedding_widths=embedding_widths,
        gate_l1=gate_l1, embedding_loss_weight=embedding_loss_weight,
        name="deepmoe_vgg16" + ("_wide" if wide else ""))


@register_model(family=CONVNET)
def vgg16(*, input_shape=(32, 32, 3), num_classes=100, wide=False, width_multiplier=1.0):
    """VGG-16 with batch norm for CIFAR-100, the DeepMoE baseline (Simonyan & Zisserman 2014).

    Args:
        input_shape: `(height, width, channels)`, height and width >= 32.
        num_classes: Number of classes, >= 2.
        wide: Double every convolution's channels (the widened baseline).
        width_multiplier: Scales every layer's channels, > 0.

    Example:

    >>> model = vgg16(num_classes=100)

    Reference:
        Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
        Recognition", ICLR 2015 (with batch norm, CIFAR variant).
    """
    return _vgg16(input_shape=input_shape, num_classes=num_classes, wide=wide,
                  width_multiplier=width_multiplier, gated=False,
                  name="vgg16" + ("_wide" if wide else ""))

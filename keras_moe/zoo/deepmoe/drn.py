"""DeepMoE DRN-A-50 for CityScapes semantic segmentation (Wang et al. 2019, sec. 5.4).

DRN-A-50 (Yu et al. 2017): the ResNet-50 trunk with conv4_x / conv5_x at stride 1,
dilation 2 / 4 (output stride 8), a 1x1 convolution to the classes and bilinear
upsampling x8, per-pixel logits `(batch, H, W, num_classes)`. Dilation as DRN's section
2 (the first block of conv4_x keeps dilation 1, of conv5_x dilation 2; DRN's code uses 1
for both); bilinear `UpSampling2D` (half-pixel centres; DRN uses a fixed bilinear
transposed convolution); default input 832x832 crops, height and width multiples of 8.
The segmentation embedding loss has no image label: `embedding_cross_entropy` takes the
image's class histogram of labelled pixels as the target, and mu defaults to 0.
"""

import keras

from keras_moe.layers.gated_conv import IMAGENET_EMBEDDING_WIDTHS
from keras_moe.zoo.deepmoe.family import CONVNET, DEEPMOE
from keras_moe.zoo.deepmoe.model import (
    DEFAULT_GATE_L1,
    DeepMoEModel,
    GatedNetwork,
    register_architecture,
)
from keras_moe.zoo.deepmoe.resnet import (
    IMAGENET_DEPTHS,
    check_bottleneck,
    check_coefficients,
    check_common,
    resnet_trunk,
)
from keras_moe.zoo.registry import register_model

# DRN-A (Yu et al. 2017): conv4_x and conv5_x without stride, dilated 2 and 4.
DRN_A_STRIDES = (1, 2, 1, 1)
DRN_A_DILATIONS = (1, 1, 2, 4)
DRN_OUTPUT_STRIDE = 8
CITYSCAPES_CROP = (832, 832, 3)
CITYSCAPES_CLASSES = 19

# Table 5 (CityScapes val): {model: (mIoU %, FLOPs x 1e9)} as printed. The table does
# not say whether "-A" / "-B" are the bottlenecks of Fig. 2 or its "efficient" and
# "accurate" lambda settings (its caption reads the latter). `static_flops` of `drn_a50`
# at 1024x2048 is 798.6e9 MACs (wide: 2262e9).
PAPER_SEGMENTATION = {
    "drn_a50": (67.3, 703),
    "wide-deepmoe-50-A": (68.8, 804),
    "wide-drn_a50": (69.3, 2173),
    "wide-deepmoe-50-B": (71.2, 1738),
}


@register_architecture("drn_a50")
def _drn_a50(*, input_shape, num_classes, wide, width_multiplier, embedding_widths=None,
             bottleneck="A", gated=True, name=None):
    bottleneck = check_bottleneck(bottleneck)
    input_shape, num_classes, width_multiplier = check_common(
        input_shape, num_classes, width_multiplier, DRN_OUTPUT_STRIDE,
        embedding_widths if gated else None)
    if any(d % DRN_OUTPUT_STRIDE for d in input_shape[:2]):
        raise ValueError(
            f"input_shape must have height and width divisible by {DRN_OUTPUT_STRIDE} (the "
            f"output stride of DRN-A), got {input_shape!r}")
    kind, stages = IMAGENET_DEPTHS[50]
    inputs = keras.Input(input_shape, name="images")
    b = GatedNetwork(inputs, num_classes, gated, embedding_widths)
    x = resnet_trunk(b, inputs, kind, stages, wide, width_multiplier, bottleneck,
                     strides=DRN_A_STRIDES, dilations=DRN_A_DILATIONS)
    x = keras.layers.Conv2D(num_classes, 1, name="classifier")(x)
    logits = keras.layers.UpSampling2D(
        DRN_OUTPUT_STRIDE, interpolation="bilinear", name="logits")(x)
    return b.finish(logits, name)


@register_model(family=DEEPMOE)
def deepmoe_drn_a50(*, input_shape=CITYSCAPES_CROP, num_classes=CITYSCAPES_CLASSES,
                    wide=False, width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1,
                    embedding_loss_weight=0.0, embedding_widths=IMAGENET_EMBEDDING_WIDTHS,
                    bottleneck="A"):
    """DeepMoE DRN-A-50 for CityScapes segmentation (per-pixel logits; Wang et al. 2019).

    The `deepmoe_resnet50` trunk (ImageNet-size embedding of 5 stride-2 convolutions, one
    `ReLUGate` head per gated convolution, bottleneck-A or -B) made a DRN-A: conv4_x and
    conv5_x keep stride 1 and dilate their 3x3 convolutions by 2 and 4 (the first block
    of each with the previous stage's dilation, 1 and 2, as in DRN sec. 2; DRN's code
    uses 1 for both), so the output stride is 8; then an ungated 1x1 convolution (with
    bias) to `num_classes` and bilinear upsampling x8 (`UpSampling2D`, half-pixel
    centres) give logits `(batch, H, W, num_classes)`.

    Train with `compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=
    True))` and labels `(batch, H, W)` (add `ignore_class=255` for CityScapes' void).
    The embedding loss has no image label here (the paper is silent): its target is the
    image's class histogram, the fraction of its labelled pixels in each class
    (`embedding_cross_entropy`; labels outside `[0, num_classes)` are ignored), and mu
    defaults to 0 as the paper's ImageNet setting (section 5) that the backbone follows.

    Args:
        input_shape: `(height, width, channels)`, height and width divisible by 8 and
            >= 32. Default: the paper's 832x832 training crops (section 5.4); CityScapes
            images are 1024x2048.
        num_classes: Number of classes (= latent experts of the embedding), >= 2;
            CityScapes: 19.
        wide: Wide-DeepMoE: double the channels of the gated layers (see
            `bottleneck`).
        width_multiplier: Scales every layer's channels, > 0.
        gate_l1: lambda, weight of the channel-mean gate L1 term L_g, >= 0.
        embedding_loss_weight: mu, weight of the embedding cross-entropy against the
            image's class histogram, >= 0 (default 0; the paper is silent).
        embedding_widths: Channels of the embedding's stride-2 convolutions.
        bottleneck: `"A"` (default): all three convolutions of every bottleneck gated;
            `"B"`: only the 3x3 convolutions (see `deepmoe_resnet50`).

    Example:

    >>> model = keras_moe.zoo.deepmoe_drn_a50(bottleneck="B")
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True, ignore_class=255))
    >>> model.fit(images, label_maps)          # label_maps: (batch, 832, 832) ints

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 5.4
        and Table 5; Yu, Koltun & Funkhouser, "Dilated Residual Networks", CVPR 2017.
    """
    check_coefficients(gate_l1, embedding_loss_weight)
    bottleneck = check_bottleneck(bottleneck)
    return DeepMoEModel(
        "drn_a50", input_shape=input_shape, num_classes=num_classes, wide=wide,
        width_multiplier=width_multiplier, embedding_widths=embedding_widths,
        bottleneck=bottleneck, gate_l1=gate_l1, embedding_loss_weight=embedding_loss_weight,
        name="deepmoe_drn_a50" + ("_b" if bottleneck == "B" else "") + ("_wide" if wide else ""))


@register_model(family=CONVNET)
def drn_a50(*, input_shape=CITYSCAPES_CROP, num_classes=CITYSCAPES_CLASSES, wide=False,
            width_multiplier=1.0):
    """DRN-A-50 for CityScapes segmentation, the DeepMoE baseline (Yu et al. 2017).

    ResNet-50 (`resnet50`'s trunk) with conv4_x and conv5_x at stride 1 and dilation 2
    and 4 (the first block of each with the previous stage's dilation), output stride 8,
    a 1x1 convolution (with bias) to `num_classes` and bilinear upsampling x8 to
    per-pixel logits `(batch, H, W, num_classes)`. Parameters: ResNet-50's minus its
    classifier plus the 1x1 convolution, 23.55M for 19 classes. Multiply-adds
    (`keras_moe.analysis.static_flops`, which counts the upsampling as 0): 263.6e9 per
    832x832 crop, 798.6e9 per 1024x2048 CityScapes image (Table 5 prints 703e9).

    Args:
        input_shape: `(height, width, channels)`, height and width divisible by 8 and
            >= 8 (default: 832x832 crops, the paper's section 5.4).
        num_classes: Number of classes, >= 2 (CityScapes: 19).
        wide: Double the channels that DeepMoE (bottleneck-A) gates (the wide baseline,
            "wide-DRN-A-50" of Table 5).
        width_multiplier: Scales every layer's channels, > 0.

    Example:

    >>> model = keras_moe.zoo.drn_a50()
    >>> model.output_shape
    (None, 832, 832, 19)

    Reference:
        Yu, Koltun & Funkhouser, "Dilated Residual Networks", CVPR 2017 (DRN-A).
    """
    return _drn_a50(input_shape=input_shape, num_classes=num_classes, wide=wide,
                    width_multiplier=width_multiplier, gated=False,
                    name="drn_a50" + ("_wide" if wide else ""))

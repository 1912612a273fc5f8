"""DeepMoE ResNets (Wang et al. 2019) and their plain baselines (He et al. 2016).

- CIFAR (basic blocks, 16/32/64 channels): `deepmoe_resnet56`, `deepmoe_resnet110` /
  `resnet56`, `resnet110`; any depth 6n+2 with `deepmoe_resnet_cifar(depth=)` /
  `resnet_cifar(depth=)` (tests use depth 8).
- ImageNet: `deepmoe_resnet18`, `deepmoe_resnet34` (basic blocks, Fig. 2a),
  `deepmoe_resnet50` (bottleneck-A, Fig. 2b, default, or -B, Fig. 2c) / `resnet18`,
  `resnet34`, `resnet50`.

Every builder takes `wide=False` (wide-DeepMoE: doubles the block-internal channels, the
gated channels that are not the residual stream, so the residual stream, shortcuts and
classifier keep their widths; the plain baselines accept it too) and
`width_multiplier=1.0` (scales every layer's channels; for small test models). All end
in logits; inputs are float images already normalised.

Choices: every convolution of a residual block is gated on its input channels, the
shortcut (identity or 1x1 projection) and the stem never. CIFAR ResNets use 1x1 + BN
projection shortcuts when the shape changes (He et al.'s option B; ResNet-56 has 0.86M
parameters with them, 0.85M with option A). ImageNet ResNet-50 puts the stride on the
3x3 convolution (torchvision's "v1.5"). Bottleneck-A gates its three convolutions (3 gate
heads per block) and wide doubles conv1's and conv2's outputs (WRN-50-2-like);
bottleneck-B gates only the 3x3 convolution (its input, conv1's output, are the experts)
and wide doubles conv1's output only (0.93 x ResNet-101's base parameters; the paper: 6%
fewer). Embedding: 4 (CIFAR) or 5 (ImageNet) stride-2 convolutions
(`keras_moe.layers.ShallowEmbedding`). L_g is normalised by the number of gated channels
(see `DeepMoEObjective`). Defaults: `gate_l1 = 0.1` (the paper gives only a range),
mu 1.0 for CIFAR and 0.0 for ImageNet (section 5).
"""

import keras

from keras_moe import validation
from keras_moe.layers.gated_conv import CIFAR_EMBEDDING_WIDTHS, IMAGENET_EMBEDDING_WIDTHS
from keras_moe.zoo.deepmoe.family import CONVNET, DEEPMOE
from keras_moe.zoo.deepmoe.model import (
    DEFAULT_GATE_L1,
    DeepMoEModel,
    GatedNetwork,
    register_architecture,
)
from keras_moe.zoo.registry import register_model

# Published parameter counts of the baselines (He et al. 2016, rounded to two digits for
# CIFAR; torchvision for ImageNet, 1000 classes). Trainable parameters here: ResNet-56
# 855,770 (853,018 without the two projection shortcuts), ResNet-110 1,736,564, ResNet-18
# 11,689,512, ResNet-34 21,797,672, ResNet-50 25,557,032.
PUBLISHED_PARAMS = {
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet18": 11.7e6,
    "resnet34": 21.8e6,
    "resnet50": 25.6e6,
}

# The paper's top-1 error rates (%), Tables 1 and 2: {model: (baseline, wide-DeepMoE)}.
PAPER_ERRORS = {
    ("cifar10", "resnet56"): (6.55, 6.03),
    ("cifar100", "resnet56"): (31.46, 29.77),
    ("cifar100", "resnet110"): (29.45, 26.14),
    ("imagenet", "resnet18"): (30.24, 29.05),
    ("imagenet", "resnet34"): (26.70, 25.87),
    ("imagenet", "resnet50"): (23.85, 22.88),
}

IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
BOTTLENECKS = ("A", "B")


# Checks ----------------------------------------------------------------------------------


def check_common(input_shape, num_classes, width_multiplier, min_size, embedding_widths):
    """Checks the keywords every DeepMoE architecture takes; returns them normalised."""
    if (
        not isinstance(input_shape, (list, tuple))
        or len(input_shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                   for d in input_shape)
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive integers, "
            f"got {input_shape!r}"
        )
    num_classes = validation.integer("num_classes", num_classes, minimum=2)
    width_multiplier = validation.positive_float("width_multiplier", width_multiplier)
    if embedding_widths is not None:
        if not isinstance(embedding_widths, (list, tuple)) or not embedding_widths:
            raise ValueError(
                "embedding_widths must be a non-empty sequence of integers >= 1, "
                f"got {embedding_widths!r}"
            )
        min_size = max(min_size, 2 ** len(embedding_widths))
    if min(input_shape[:2]) < min_size:
        raise ValueError(
            f"input_shape must have height and width >= {min_size} (the total stride of "
            f"the network), got {tuple(input_shape)!r}"
        )
    return tuple(input_shape), num_classes, width_multiplier


def check_coefficients(gate_l1, embedding_loss_weight):
    # Before the (slow, for full-size models) build; DeepMoEObjective checks them again.
    validation.non_negative_float("gate_l1", gate_l1)
    validation.non_negative_float("embedding_loss_weight", embedding_loss_weight)


def check_bottleneck(bottleneck):
    return validation.one_of("bottleneck", bottleneck, BOTTLENECKS)


def _check_cifar_depth(depth):
    depth = validation.integer("depth", depth, minimum=8)
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 (8, 14, 20, ..., 56, 110), got {depth!r}")
    return depth


def scaled(channels, multiplier):
    return max(1, int(round(channels * multiplier)))


# Blocks ----------------------------------------------------------------------------------


def bn(x, name):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)


def relu(x, name):
    return keras.layers.ReLU(name=name)(x)


def _shortcut(b, x, filters, strides, name):
    if strides == 1 and x.shape[-1] == filters:
        return x
    shortcut = b.conv(x, filters, 1, strides, f"{name}_proj", gated=False)  # never gated
    return bn(shortcut, f"{name}_proj_bn")


def _basic_block(b, x, filters, inner, strides, name):
    shortcut = _shortcut(b, x, filters, strides, name)
    h = b.conv(x, inner, 3, strides, f"{name}_conv1")
    h = relu(bn(h, f"{name}_bn1"), f"{name}_relu1")
    h = b.conv(h, filters, 3, 1, f"{name}_conv2")
    h = bn(h, f"{name}_bn2")
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return relu(h, f"{name}_out")


def _bottleneck_block(b, x, width, wide, strides, name, bottleneck="A", dilation=1):
    """1x1 (width) -> 3x3 (width, stride, dilation) -> 1x1 (4 * width) + shortcut.

    Bottleneck-A gates all three convolutions on their inputs and wide doubles both
    block-internal tensors; bottleneck-B gates only the 3x3 convolution and wide doubles
    only its input. In a plain network both are the ordinary ResNet bottleneck.
    """
    filters = 4 * width
    inner = width * (2 if wide else 1)
    shortcut = _shortcut(b, x, filters, strides, name)
    gate_1x1 = bottleneck == "A"
    h = b.conv(x, inner, 1, 1, f"{name}_conv1", gated=gate_1x1)
    h = relu(bn(h, f"{name}_bn1"), f"{name}_relu1")
    h = b.conv(h, inner if bottleneck == "A" else width, 3, strides, f"{name}_conv2",
               dilation=dilation)
    h = relu(bn(h, f"{name}_bn2"), f"{name}_relu2")
    h = b.conv(h, filters, 1, 1, f"{name}_conv3", gated=gate_1x1)
    h = bn(h, f"{name}_bn3")
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return relu(h, f"{name}_out")


def classifier(x, num_classes):
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(num_classes, name="logits")(x)


def resnet_trunk(b, inputs, kind, stages, wide, width_multiplier, bottleneck,
                 strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1)):
    """Stem (7x7/2 conv, 3x3/2 max-pool) and the four stages of an ImageNet ResNet.

    `strides[s]` is the stride of stage s's first block, `dilations[s]` the dilation of
    the 3x3 convolutions of its other blocks; its first block uses the previous stage's
    dilation (DRN, Yu et al. 2017, sec. 2).
    """
    x = b.conv(inputs, scaled(64, width_multiplier), 7, 2, "stem_conv", gated=False)
    x = relu(bn(x, "stem_bn"), "stem_relu")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    previous_dilation = 1
    for stage, (base, blocks) in enumerate(zip((64, 128, 256, 512), stages)):
        width = scaled(base, width_multiplier)
        for block in range(blocks):
            block_strides = strides[stage] if block == 0 else 1
            dilation = previous_dilation if block == 0 else dilations[stage]
            block_name = f"stage{stage + 1}_block{block + 1}"
            if kind == "basic":
                x = _basic_block(b, x, width, width * (2 if wide else 1), block_strides,
                                 block_name)
            else:
                x = _bottleneck_block(b, x, width, wide, block_strides, block_name,
                                      bottleneck=bottleneck, dilation=dilation)
        previous_dilation = dilations[stage]
    return x


# Networks (gated: the architectures a DeepMoEModel config names) -------------------------


def _resnet_cifar(*, depth, input_shape, num_classes, wide, width_multiplier,
                  embedding_widths=None, gated=True, name=None):
    depth = _check_cifar_depth(depth)
    input_shape, num_classes, width_multiplier = check_common(
        input_shape, num_classes, width_multiplier, 4, embedding_widths if gated else None)
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="images")
    b = GatedNetwork(inputs, num_classes, gated, embedding_widths)
    x = b.conv(inputs, scaled(16, width_multiplier), 3, 1, "stem_conv", gated=False)
    x = relu(bn(x, "stem_bn"), "stem_relu")
    for stage, base in enumerate((16, 32, 64)):
        filters = scaled(base, width_multiplier)
        inner = filters * (2 if wide else 1)
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(b, x, filters, inner, strides, f"stage{stage + 1}_block{block + 1}")
    return b.finish(classifier(x, num_classes), name)


def _resnet_imagenet(*, depth, input_shape, num_classes, wide, width_multiplier,
                     embedding_widths=None, bottleneck="A", gated=True, name=None):
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth!r}")
    bottleneck = check_bottleneck(bottleneck)
    kind, stages = IMAGENET_DEPTHS[depth]
    if kind == "basic" and bottleneck != "A":
        raise ValueError(
            f"bottleneck must be 'A' (the only value) for the basic-block ResNet-{depth}, "
            f"got {bottleneck!r}")
    input_shape, num_classes, width_multiplier = check_common(
        input_shape, num_classes, width_multiplier, 32, embedding_widths if gated else None)
    inputs = keras.Input(input_shape, name="images")
    b = GatedNetwork(inputs, num_classes, gated, embedding_widths)
    x = resnet_trunk(b, inputs, kind, stages, wide, width_multiplier, bottleneck)
    return b.finish(classifier(x, num_classes), name)


register_architecture("resnet_cifar")(_resnet_cifar)
register_architecture("resnet_imagenet")(_resnet_imagenet)


def _wide(name, wide):
    return name + ("_wide" if wide else "")


def _deepmoe_cifar(depth, input_shape, num_classes, wide, width_multiplier, gate_l1,
                   embedding_loss_weight, embedding_widths):
    check_coefficients(gate_l1, embedding_loss_weight)
    return DeepMoEModel(
        "resnet_cifar", depth=depth, input_shape=input_shape, num_classes=num_classes,
        wide=wide, width_multiplier=width_multiplier, embedding_widths=embedding_widths,
        gate_l1=gate_l1, embedding_loss_weight=embedding_loss_weight,
        name=_wide(f"deepmoe_resnet{depth}", wide))


def _deepmoe_imagenet(depth, input_shape, num_classes, wide, width_multiplier, gate_l1,
                      embedding_loss_weight, embedding_widths, bottleneck="A"):
    check_coefficients(gate_l1, embedding_loss_weight)
    bottleneck = check_bottleneck(bottleneck)
    return DeepMoEModel(
        "resnet_imagenet", depth=depth, input_shape=input_shape,
        num_classes=num_classes, wide=wide, width_multiplier=width_multiplier,
        embedding_widths=embedding_widths, bottleneck=bottleneck, gate_l1=gate_l1,
        embedding_loss_weight=embedding_loss_weight,
        name=_wide(f"deepmoe_resnet{depth}" + ("_b" if bottleneck == "B" else ""), wide))


def _plain_cifar(depth, input_shape, num_classes, wide, width_multiplier):
    return _resnet_cifar(depth=depth, input_shape=input_shape, num_classes=num_classes,
                         wide=wide, width_multiplier=width_multiplier, gated=False,
                         name=_wide(f"resnet{depth}", wide))


def _plain_imagenet(depth, input_shape, num_classes, wide, width_multiplier):
    return _resnet_imagenet(depth=depth, input_shape=input_shape, num_classes=num_classes,
                            wide=wide, width_multiplier=width_multiplier, gated=False,
                            name=_wide(f"resnet{depth}", wide))


# Registered builders ---------------------------------------------------------------------

_DEEPMOE_ARGS = """
    Args:
        input_shape: `(height, width, channels)`{size}.
        num_classes: Number of classes (= latent experts of the embedding), >= 2.
        wide: Wide-DeepMoE: double the gated (block-internal) channels.
        width_multiplier: Scales every layer's channels, > 0.
        gate_l1: lambda, weight of the channel-mean gate L1 term L_g, >= 0.
        embedding_loss_weight: mu, weight of the embedding cross-entropy, >= 0{mu}.
        embedding_widths: Channels of the embedding's stride-2 convolutions.{extra}

    Returns:
        A `DeepMoEModel`.

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019.
"""

_BASELINE_ARGS = """
    Args:
        input_shape: `(height, width, channels)`{size}.
        num_classes: Number of classes, >= 2.
        wide: Double the channels that DeepMoE gates (the widened baseline).
        width_multiplier: Scales every layer's channels, > 0.{extra}

    Returns:
        A functional `keras.Model` (logits).

    Reference:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
"""

_BOTTLENECK_ARG = """
        bottleneck: `"A"` (Fig. 2b, the default): all three convolutions of every
            bottleneck are gated on their inputs, and `wide` doubles conv1's and conv2's
            outputs. `"B"` (Fig. 2c): only the 3x3 convolution is gated (on conv1's
            output) and the 1x1 convolutions are plain; `wide` doubles only conv1's
            output. B has a third of A's gate heads and, wide, fewer parameters."""

_DEPTH_ARG = """
        depth: 6n + 2 (8, 14, ..., 56, 110)."""


def _documented(template, size, mu="", extra=""):
    """Appends the builders' common Args section to a builder's own docstring."""

    def document(function):
        function.__doc__ = function.__doc__.rstrip() + "\n" + template.format(
            size=size, mu=mu, extra=extra)
        return function

    return document


_CIFAR_SIZE = ", height and width >= 16"
_IMAGENET_SIZE = ", height and width >= 32"


@_documented(_DEEPMOE_ARGS, _CIFAR_SIZE, mu=" (paper: 1)", extra=_DEPTH_ARG)
@register_model(family=DEEPMOE)
def deepmoe_resnet_cifar(*, input_shape=(32, 32, 3), num_classes=10, depth=56, wide=False,
                         width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1,
                         embedding_loss_weight=1.0, embedding_widths=CIFAR_EMBEDDING_WIDTHS):
    """DeepMoE CIFAR ResNet of any depth 6n+2 (basic blocks, 16/32/64 channels; Wang et al. 2019).

    Example:

    >>> model = deepmoe_resnet_cifar(depth=8, num_classes=10)
    """
    return _deepmoe_cifar(depth, input_shape, num_classes, wide, width_multiplier, gate_l1,
                          embedding_loss_weight, embedding_widths)


@_documented(_BASELINE_ARGS, ", height and width >= 4", extra=_DEPTH_ARG)
@register_model(family=CONVNET)
def resnet_cifar(*, input_shape=(32, 32, 3), num_classes=10, depth=56, wide=False,
                 width_multiplier=1.0):
    """CIFAR ResNet of any depth 6n+2, the DeepMoE baseline (He et al. 2016).

    Example:

    >>> model = resnet_cifar(depth=20)
    """
    return _plain_cifar(depth, input_shape, num_classes, wide, width_multiplier)


@_documented(_DEEPMOE_ARGS, _CIFAR_SIZE, mu=" (paper: 1)")
@register_model(family=DEEPMOE)
def deepmoe_resnet56(*, input_shape=(32, 32, 3), num_classes=10, wide=False,
                     width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0,
                     embedding_widths=CIFAR_EMBEDDING_WIDTHS):
    """DeepMoE ResNet-56 for CIFAR-10 (basic blocks, gated on every block convolution's input; Wang et al. 2019).

    Table 2: CIFAR-10 error 6.55% (ResNet-56) -> 6.03% (wide-DeepMoE, mu = 1).
    """
    return _deepmoe_cifar(56, input_shape, num_classes, wide, width_multiplier, gate_l1,
                          embedding_loss_weight, embedding_widths)


@_documented(_BASELINE_ARGS, ", height and width >= 4")
@register_model(family=CONVNET)
def resnet56(*, input_shape=(32, 32, 3), num_classes=10, wide=False, width_multiplier=1.0):
    """ResNet-56 for CIFAR-10, the DeepMoE baseline (He et al. 2016; ~0.85M parameters)."""
    return _plain_cifar(56, input_shape, num_classes, wide, width_multiplier)


@_documented(_DEEPMOE_ARGS, _CIFAR_SIZE, mu=" (paper: 1)")
@register_model(family=DEEPMOE)
def deepmoe_resnet110(*, input_shape=(32, 32, 3), num_classes=100, wide=False,
                      width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=1.0,
                      embedding_widths=CIFAR_EMBEDDING_WIDTHS):
    """DeepMoE ResNet-110 for CIFAR-100 (basic blocks, gated on every block convolution's input; Wang et al. 2019).

    Table 2: CIFAR-100 error 29.45% (ResNet-110) -> 26.14% (wide-DeepMoE).
    """
    return _deepmoe_cifar(110, input_shape, num_classes, wide, width_multiplier, gate_l1,
                          embedding_loss_weight, embedding_widths)


@_documented(_BASELINE_ARGS, ", height and width >= 4")
@register_model(family=CONVNET)
def resnet110(*, input_shape=(32, 32, 3), num_classes=100, wide=False, width_multiplier=1.0):
    """ResNet-110 for CIFAR-100, the DeepMoE baseline (He et al. 2016; ~1.70M parameters)."""
    return _plain_cifar(110, input_shape, num_classes, wide, width_multiplier)


@_documented(_DEEPMOE_ARGS, _IMAGENET_SIZE, mu=" (paper: 0 on ImageNet)")
@register_model(family=DEEPMOE)
def deepmoe_resnet18(*, input_shape=(224, 224, 3), num_classes=1000, wide=False,
                     width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=0.0,
                     embedding_widths=IMAGENET_EMBEDDING_WIDTHS):
    """DeepMoE ResNet-18 for ImageNet (basic blocks; Wang et al. 2019).

    Height and width >= 32; mu defaults to 0 (the paper's ImageNet setting).
    """
    return _deepmoe_imagenet(18, input_shape, num_classes, wide, width_multiplier, gate_l1,
                             embedding_loss_weight, embedding_widths)


@_documented(_BASELINE_ARGS, _IMAGENET_SIZE)
@register_model(family=CONVNET)
def resnet18(*, input_shape=(224, 224, 3), num_classes=1000, wide=False, width_multiplier=1.0):
    """ResNet-18 for ImageNet, the DeepMoE baseline (He et al. 2016; 11.7M parameters)."""
    return _plain_imagenet(18, input_shape, num_classes, wide, width_multiplier)


@_documented(_DEEPMOE_ARGS, _IMAGENET_SIZE, mu=" (paper: 0 on ImageNet)")
@register_model(family=DEEPMOE)
def deepmoe_resnet34(*, input_shape=(224, 224, 3), num_classes=1000, wide=False,
                     width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=0.0,
                     embedding_widths=IMAGENET_EMBEDDING_WIDTHS):
    """DeepMoE ResNet-34 for ImageNet (basic blocks; Wang et al. 2019).

    Height and width >= 32; mu defaults to 0 (the paper's ImageNet setting).
    """
    return _deepmoe_imagenet(34, input_shape, num_classes, wide, width_multiplier, gate_l1,
                             embedding_loss_weight, embedding_widths)


@_documented(_BASELINE_ARGS, _IMAGENET_SIZE)
@register_model(family=CONVNET)
def resnet34(*, input_shape=(224, 224, 3), num_classes=1000, wide=False, width_multiplier=1.0):
    """ResNet-34 for ImageNet, the DeepMoE baseline (He et al. 2016; 21.8M parameters)."""
    return _plain_imagenet(34, input_shape, num_classes, wide, width_multiplier)


@_documented(_DEEPMOE_ARGS, _IMAGENET_SIZE, mu=" (paper: 0 on ImageNet)", extra=_BOTTLENECK_ARG)
@register_model(family=DEEPMOE)
def deepmoe_resnet50(*, input_shape=(224, 224, 3), num_classes=1000, wide=False,
                     width_multiplier=1.0, gate_l1=DEFAULT_GATE_L1, embedding_loss_weight=0.0,
                     embedding_widths=IMAGENET_EMBEDDING_WIDTHS, bottleneck="A"):
    """DeepMoE ResNet-50 for ImageNet (bottleneck-A or -B blocks; Wang et al. 2019)."""
    return _deepmoe_imagenet(50, input_shape, num_classes, wide, width_multiplier, gate_l1,
                             embedding_loss_weight, embedding_widths, bottleneck)


@_documented(_BASELINE_ARGS, _IMAGENET_SIZE)
@register_model(family=CONVNET)
def resnet50(*, input_shape=(224, 224, 3), num_classes=1000, wide=False, width_multiplier=1.0):
    """ResNet-50 for ImageNet, the DeepMoE baseline (He et al. 2016; 25.6M parameters)."""
    return _plain_imagenet(50, input_shape, num_classes, wide, width_multiplier)

"""The tiny DeepMoE the zoo.deepmoe tests share."""

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

"""Tiny configurations of every zoo builder, for export and round-trip tests.

`TINY[name]` holds the keyword arguments of a small, fast instance of builder `name`
(few channels, small images, shallow where the depth is free). Builders whose depth the
paper fixes (ResNet-56/110, the ImageNet ResNets, VGG-16) keep their depth and are
shrunk in width and image size only: they are built and exported, never trained here.
"""

_CIFAR = dict(input_shape=(16, 16, 3), num_classes=3, width_multiplier=0.125,
              embedding_widths=(4, 4, 4, 4))
_CIFAR_BASE = dict(input_shape=(16, 16, 3), num_classes=3, width_multiplier=0.125)
_IMAGENET = dict(input_shape=(32, 32, 3), num_classes=3, width_multiplier=0.0625,
                 embedding_widths=(4, 4, 4, 4, 4))
_IMAGENET_BASE = dict(input_shape=(32, 32, 3), num_classes=3, width_multiplier=0.0625)
_EIGEN = dict(input_shape=(8, 8, 1), num_classes=3, experts=(3, 3), units=(6, 6),
              gate_hidden_units=(4, 4))

TINY = {
    "deepmoe_resnet_cifar": dict(_CIFAR, depth=8),
    "resnet_cifar": dict(_CIFAR_BASE, depth=8),
    "deepmoe_resnet56": _CIFAR,
    "deepmoe_resnet110": _CIFAR,
    "resnet56": _CIFAR_BASE,
    "resnet110": _CIFAR_BASE,
    "deepmoe_resnet18": _IMAGENET,
    "deepmoe_resnet34": _IMAGENET,
    "deepmoe_resnet50": _IMAGENET,
    "deepmoe_drn_a50": _IMAGENET,  # 32x32: a multiple of the output stride 8
    "drn_a50": _IMAGENET_BASE,
    "resnet18": _IMAGENET_BASE,
    "resnet34": _IMAGENET_BASE,
    "resnet50": _IMAGENET_BASE,
    "deepmoe_vgg16": dict(_CIFAR, input_shape=(32, 32, 3), width_multiplier=0.0625),
    "vgg16": dict(_CIFAR_BASE, input_shape=(32, 32, 3), width_multiplier=0.0625),
    "dmoe_mnist": _EIGEN,
    "dmoe_mnist_single_expert": _EIGEN,
    "dmoe_mnist_concat": _EIGEN,
    "dmoe_mnist_dnn": _EIGEN,
    "dmoe_mnist_one_layer": dict(_EIGEN, experts=3, units=6, gate_hidden_units=4),
    "dmoe_monophone": dict(_EIGEN, input_shape=(12,), experts=(2, 4)),
    "sparse_moe_classifier": dict(input_shape=(6, 6, 1), num_classes=3, units=8,
                                  num_experts=4, top_k=2, expert_hidden_units=6),
    "two_domain_moe": dict(input_shape=(8, 8, 1), num_classes=4, gate="conv",
                           gate_loss="entropy", expert_filters=4, expert_units=6,
                           gate_filters=3, gate_units=5),
    "tsne_moe": dict(input_shape=(6, 6, 1), num_classes=3, num_experts=4, top_k=2,
                     expert_units=4, map_hidden_units=(8,), perplexity=5.0),
    "tsne_moe_dense_mlp": dict(input_shape=(6, 6, 1), num_classes=3, hidden_units=(8, 8)),
}

# Models that are only built and exported (their depth is fixed by the paper).
HEAVY = {"deepmoe_resnet56", "deepmoe_resnet110", "resnet56", "resnet110",
         "deepmoe_resnet18", "deepmoe_resnet34", "deepmoe_resnet50", "resnet18",
         "resnet34", "resnet50", "deepmoe_vgg16", "vgg16"}


def build(name, seed=0):
    """Builds the tiny `name` with seeded weights, gates made non-trivial.

    Zero-initialised gate kernels (Shazeer's) route every example alike; they are
    given small random values so that exported gates differ between examples.
    """
    import keras
    import numpy as np

    from keras_moe import zoo

    keras.utils.set_random_seed(seed)
    model = zoo.get_model(name, **TINY[name])
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        if "gate" in weight.path and weight.trainable and not np.any(weight.numpy()):
            weight.assign(rng.normal(0, 0.3, weight.shape).astype(weight.dtype))
    return model


def images(name, count=5, seed=1):
    """A float32 batch of `count` images in [0, 255] shaped for the tiny `name`."""
    import numpy as np

    shape = TINY[name]["input_shape"]
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255 if name.startswith(("tsne", "dmoe_mnist")) else 1,
                       size=(count,) + tuple(shape)).astype("float32")

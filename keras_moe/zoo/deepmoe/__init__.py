"""DeepMoE (Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019) and its
baselines.

Modules:

- `model`: `DeepMoEModel` (a functional model with the objective of eq. 7 in its own
  `compute_loss`), `DeepMoEObjective`, `embedding_cross_entropy`, `GatedNetwork`.
- `family`: the registered families (`deepmoe`, and `convnet` for the baselines):
  Procedure 1 as the default phases, the tuning space, the phase settings.
- `resnet`: `deepmoe_resnet_cifar`, `deepmoe_resnet56/110/18/34/50` and the baselines
  `resnet_cifar`, `resnet56/110/18/34/50`.
- `vgg`: `deepmoe_vgg16`, `vgg16` (CIFAR-100).
- `drn`: `deepmoe_drn_a50`, `drn_a50` (CityScapes segmentation).

Every builder is also an attribute of this package and of `keras_moe.zoo`.
"""

from keras_moe.zoo.deepmoe.family import CONVNET, DEEPMOE
from keras_moe.zoo.deepmoe.model import (
    DEFAULT_GATE_L1,
    DeepMoEModel,
    DeepMoEObjective,
    GatedNetwork,
    embedding_cross_entropy,
)
from keras_moe.zoo.deepmoe.resnet import (
    BOTTLENECKS,
    IMAGENET_DEPTHS,
    PAPER_ERRORS,
    PUBLISHED_PARAMS,
    deepmoe_resnet18,
    deepmoe_resnet34,
    deepmoe_resnet50,
    deepmoe_resnet56,
    deepmoe_resnet110,
    deepmoe_resnet_cifar,
    resnet18,
    resnet34,
    resnet50,
    resnet56,
    resnet110,
    resnet_cifar,
)
from keras_moe.zoo.deepmoe.vgg import VGG16_CONFIG, deepmoe_vgg16, vgg16
from keras_moe.zoo.deepmoe.drn import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_CROP,
    DRN_A_DILATIONS,
    DRN_A_STRIDES,
    DRN_OUTPUT_STRIDE,
    PAPER_SEGMENTATION,
    deepmoe_drn_a50,
    drn_a50,
)

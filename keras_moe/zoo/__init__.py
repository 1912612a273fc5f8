"""Model zoo: one builder per model of the papers, and the registry that lists them.

Modules, one per paper family; each registers its builders on import:

- `deepmoe`: DeepMoE ResNets and VGG-16 (Wang et al.) and their plain baselines.
- `eigen`: Eigen et al.'s deep MoE on jittered MNIST, its Table 1 baselines, monophone.
- `two_domain`: the MNIST + CIFAR-10 two-expert experiment (conv, dense, oracle gates).
- `shazeer`: `sparse_moe_classifier`, noisy top-k MoE classifier with balancing losses.

Example:

>>> from keras_moe import zoo
>>> zoo.list_models()
>>> model = zoo.get_model("deepmoe_resnet56", num_classes=10)
"""

from keras_moe.zoo import deepmoe  # noqa: F401  (registers its builders)
from keras_moe.zoo import eigen  # noqa: F401
from keras_moe.zoo import shazeer  # noqa: F401
from keras_moe.zoo import two_domain  # noqa: F401
from keras_moe.zoo.registry import describe, get_builder, get_model, list_models, register_model

__all__ = ["describe", "get_builder", "get_model", "list_models", "register_model"]

"""Model zoo: one builder per model of the papers, the registry that lists them, and the
family each belongs to.

Modules, one per paper family; each registers its family and its builders on import:

- `deepmoe` (a package): DeepMoE ResNets, VGG-16 and DRN-A-50 (Wang et al.) and their
  plain baselines; `DeepMoEModel`.
- `eigen`: Eigen et al.'s deep MoE on jittered MNIST, its Table 1 baselines, monophone.
- `two_domain`: the MNIST + CIFAR-10 two-expert experiment (conv, dense, oracle gates).
- `spatially_sparse`: `tsne_moe`, the t-SNE-gated spatially sparse MoE, and its dense MLP baseline.
- `shazeer`: `sparse_moe_classifier`, noisy top-k MoE classifier with balancing losses.

Example:

>>> from keras_moe import zoo
>>> zoo.list_models()
>>> model = zoo.deepmoe_resnet56(num_classes=10)        # every builder is an attribute
>>> model = zoo.get_model("deepmoe_resnet56", num_classes=10)  # or by name
>>> zoo.get_family("deepmoe_resnet56").phases_for(6)     # Procedure 1's two phases
"""

from keras_moe.zoo import deepmoe  # noqa: F401  (registers its families and builders)
from keras_moe.zoo import eigen  # noqa: F401
from keras_moe.zoo import shazeer  # noqa: F401
from keras_moe.zoo import spatially_sparse  # noqa: F401
from keras_moe.zoo import two_domain  # noqa: F401
from keras_moe.zoo.registry import (
    ModelFamily,
    PhaseContext,
    PhaseSetting,
    describe,
    get_builder,
    get_family,
    get_model,
    list_families,
    list_models,
    register_family,
    register_model,
    register_phase_settings,
)

__all__ = ["ModelFamily", "PhaseContext", "PhaseSetting", "describe", "get_builder",
           "get_family", "get_model", "list_families", "list_models", "register_family",
           "register_model", "register_phase_settings"]


def __getattr__(name):
    """Every registered builder is an attribute: `keras_moe.zoo.deepmoe_resnet56()`."""
    if name in list_models():
        return get_builder(name)
    raise AttributeError(f"module 'keras_moe.zoo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(list_models()))

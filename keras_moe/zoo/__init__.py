"""Model zoo: one builder per model of the papers, and the registry that lists them.

Modules, one per paper family; each registers its builders on import:
(none yet: later work adds e.g. `eigen.py`, `two_domain.py`, `shazeer.py`, `deepmoe.py`,
`tsne_moe.py`).

Example:

>>> from keras_moe import zoo
>>> zoo.list_models()
>>> model = zoo.get_model("some_model", num_classes=10)
"""

from keras_moe.zoo.registry import describe, get_builder, get_model, list_models, register_model

__all__ = ["describe", "get_builder", "get_model", "list_models", "register_model"]

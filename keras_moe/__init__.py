"""keras-moe: mixture-of-experts layers, balancing regularizers and a paper-faithful zoo.

Subpackages: `layers` (MoE layers and gates), `regularizers` (balancing losses), `data`
(datasets), `zoo` (model builders and their registry), `training` (procedures and
callbacks), `analysis` (activation rates, FLOPs, plots), `inference` (DeepMoE serving
that skips closed channels).
"""

__version__ = "0.1.0"

from keras_moe import layers, regularizers, zoo  # noqa: E402

__all__ = ["layers", "regularizers", "zoo", "__version__"]

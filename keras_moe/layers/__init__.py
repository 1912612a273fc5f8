"""Keras layers of keras-moe: gates, mixture-of-experts layers and their dispatch.

- `gates`: gating networks (`SoftmaxGate`, `NoisyTopKGate`, `ReLUGate`) and the gate-output
  dict they return.
- `moe_dense`: `MoEDense`, a dense mixture of experts.
- `dispatch`: how tokens reach experts (sparse, capacity, dense).
- `expert_mixture`: `ExpertMixture`, a gate over whole expert sub-models (paper 002).
- `gated_conv`: `GatedConv2D` (DeepMoE's channel-gated convolution) and `ShallowEmbedding`.
- `sparse`: `SparseDense`, a dense layer with a fixed random connectivity mask (StochasticNet).
"""

from keras_moe.layers.expert_mixture import ExpertMixture
from keras_moe.layers.gated_conv import GatedConv2D, ShallowEmbedding
from keras_moe.layers.gates import NoisyTopKGate, ReLUGate, SoftmaxGate
from keras_moe.layers.moe_dense import MoEDense
from keras_moe.layers.sparse import SparseDense

__all__ = [
    "ExpertMixture",
    "GatedConv2D",
    "MoEDense",
    "NoisyTopKGate",
    "ReLUGate",
    "ShallowEmbedding",
    "SoftmaxGate",
    "SparseDense",
]

"""Keras layers of keras-moe: gates, mixture-of-experts layers and their dispatch.

- `gates`: gating networks (`SoftmaxGate`, `NoisyTopKGate`, `ReLUGate`) and the
  gate-output dict they return; `routing_gates`: the gates of current MoE models
  (`SigmoidTopKGate`, `ExpertChoiceGate`).
- `routing`: the routing choices the gates share (biased top-k, group limits, expert
  choice).
- `moe_dense`: `MoEDense`, a dense mixture of experts.
- `dispatch`: how tokens reach experts (sparse, capacity, dense).
- `expert_mixture`: `ExpertMixture`, a gate over whole expert sub-models (paper 002).
- `gated_conv`: `GatedConv2D` (DeepMoE's channel-gated convolution) and `ShallowEmbedding`.
- `tsne_gate`: `TSNEGate` (gates from positions in a parametric t-SNE map), `ParametricTSNEMap`.
- `expert_clusters`: expert clusters wired densely within and sparsely between (`ExpertClusters`).
- `sparse_connectivity`: `SparseDense`, a dense layer with a fixed random connectivity
  mask (StochasticNet). Not to be confused with sparse *dispatch* (`dispatch`).
"""

from keras_moe.layers.expert_clusters import ExpertClusterDense, ExpertClusters, cluster_mask
from keras_moe.layers.expert_mixture import ExpertMixture
from keras_moe.layers.gated_conv import GatedConv2D, ShallowEmbedding
from keras_moe.layers.gates import NoisyTopKGate, ReLUGate, SoftmaxGate
from keras_moe.layers.routing_gates import ExpertChoiceGate, SigmoidTopKGate
from keras_moe.layers.moe_dense import MoEDense
from keras_moe.layers.sparse_connectivity import SparseDense
from keras_moe.layers.tsne_gate import (
    ParametricTSNEMap,
    TSNEGate,
    expert_positions,
    fit_parametric_tsne,
    nearest_neighbour_sq_distance,
)

__all__ = [
    "ExpertClusterDense",
    "ExpertChoiceGate",
    "ExpertClusters",
    "ExpertMixture",
    "GatedConv2D",
    "MoEDense",
    "NoisyTopKGate",
    "ParametricTSNEMap",
    "ReLUGate",
    "ShallowEmbedding",
    "SigmoidTopKGate",
    "SoftmaxGate",
    "SparseDense",
    "TSNEGate",
    "cluster_mask",
    "expert_positions",
    "fit_parametric_tsne",
    "nearest_neighbour_sq_distance",
]

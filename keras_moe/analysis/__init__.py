"""Analysis of trained MoE models: the gate reader, activation rates, heatmaps, FLOPs.

- `graph`: the functional-graph helper every graph walk goes through.
- `gates`: the gate reader (where a model's gates are, their values, statistics and
  density).
- `gating`: activation rates, routing information, heatmaps.
- `flops`: static and effective (DeepMoE) multiply-adds.
- `shuffling`: DeepMoE's gate-embedding shuffling.
- `report`: the run report.
"""

from keras_moe.analysis import flops, gates, gating, graph, shuffling
from keras_moe.analysis.flops import effective_flops, static_flops
from keras_moe.analysis.gates import gate_density, gate_statistics, gate_values
from keras_moe.analysis.gating import activation_rates, routing_mutual_information
from keras_moe.analysis.shuffling import gate_embedding_shuffling

__all__ = [
    "activation_rates",
    "effective_flops",
    "flops",
    "gate_density",
    "gate_embedding_shuffling",
    "gate_statistics",
    "gate_values",
    "gates",
    "gating",
    "graph",
    "routing_mutual_information",
    "shuffling",
    "static_flops",
]

"""Analysis of trained MoE models: expert activation rates, gating heatmaps, FLOPs."""

from keras_moe.analysis import flops, gating, shuffling
from keras_moe.analysis.flops import effective_flops, gate_density, static_flops
from keras_moe.analysis.gating import activation_rates, routing_mutual_information
from keras_moe.analysis.shuffling import gate_embedding_shuffling

__all__ = [
    "activation_rates",
    "effective_flops",
    "flops",
    "gate_density",
    "gate_embedding_shuffling",
    "gating",
    "routing_mutual_information",
    "shuffling",
    "static_flops",
]

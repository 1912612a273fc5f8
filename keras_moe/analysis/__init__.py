"""Analysis of trained MoE models: expert activation rates, gating heatmaps, FLOPs."""

from keras_moe.analysis import gating
from keras_moe.analysis.gating import activation_rates, routing_mutual_information

__all__ = ["activation_rates", "gating", "routing_mutual_information"]

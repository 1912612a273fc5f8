"""Balancing and sparsity regularizers for mixture-of-experts gates.

Pure functions of gate tensors (`cv_squared`, `importance_cv_squared`, `noisy_top_k_load`,
`switch_load_balance`, `sequence_balance_loss`, `router_z_loss`, the entropy and variance gate losses,
`l1_gate_sparsity`) in `keras.ops`, global over the batch under `tf.distribute`, and thin
serializable `GateRegularizer` objects that weight them and read a gate's output dict.
"""

from keras_moe.regularizers.functional import batch_entropy_loss
from keras_moe.regularizers.functional import batch_variance_loss
from keras_moe.regularizers.functional import cv_squared
from keras_moe.regularizers.functional import entropy
from keras_moe.regularizers.functional import importance
from keras_moe.regularizers.functional import importance_cv_squared
from keras_moe.regularizers.functional import l1_gate_sparsity
from keras_moe.regularizers.functional import load_cv_squared
from keras_moe.regularizers.functional import noisy_top_k_load
from keras_moe.regularizers.functional import router_z_loss
from keras_moe.regularizers.functional import sample_entropy_loss
from keras_moe.regularizers.functional import sample_variance_loss
from keras_moe.regularizers.functional import sequence_balance_loss
from keras_moe.regularizers.functional import switch_load_balance
from keras_moe.regularizers.losses import EntropyGateLoss
from keras_moe.regularizers.losses import GateRegularizer
from keras_moe.regularizers.losses import ImportanceLoss
from keras_moe.regularizers.losses import L1GateLoss
from keras_moe.regularizers.losses import LoadLoss
from keras_moe.regularizers.losses import RouterZLoss
from keras_moe.regularizers.losses import SequenceBalanceLoss
from keras_moe.regularizers.losses import SwitchLoadBalanceLoss
from keras_moe.regularizers.losses import VarianceGateLoss
from keras_moe.regularizers.losses import check_gate_supports
from keras_moe.regularizers.losses import deserialize
from keras_moe.regularizers.losses import get
from keras_moe.regularizers.losses import get_list
from keras_moe.regularizers.losses import serialize
from keras_moe.regularizers.reduction import batch_mean
from keras_moe.regularizers.tsne import ParametricTSNELoss
from keras_moe.regularizers.tsne import conditional_affinities
from keras_moe.regularizers.tsne import parametric_tsne_loss
from keras_moe.regularizers.tsne import tsne_affinities
from keras_moe.regularizers.tsne import tsne_kl
from keras_moe.regularizers.reduction import batch_sum
from keras_moe.regularizers.reduction import cross_replica_sum
from keras_moe.regularizers.reduction import num_replicas_in_sync
from keras_moe.regularizers.reduction import scale_for_replicas

__all__ = [
    "ParametricTSNELoss",
    "conditional_affinities",
    "parametric_tsne_loss",
    "tsne_affinities",
    "tsne_kl",
    "batch_entropy_loss",
    "batch_mean",
    "batch_sum",
    "batch_variance_loss",
    "cross_replica_sum",
    "check_gate_supports",
    "cv_squared",
    "deserialize",
    "entropy",
    "EntropyGateLoss",
    "GateRegularizer",
    "get",
    "get_list",
    "importance",
    "importance_cv_squared",
    "ImportanceLoss",
    "l1_gate_sparsity",
    "L1GateLoss",
    "load_cv_squared",
    "LoadLoss",
    "noisy_top_k_load",
    "num_replicas_in_sync",
    "router_z_loss",
    "RouterZLoss",
    "sample_entropy_loss",
    "sample_variance_loss",
    "scale_for_replicas",
    "sequence_balance_loss",
    "SequenceBalanceLoss",
    "serialize",
    "switch_load_balance",
    "SwitchLoadBalanceLoss",
    "VarianceGateLoss",
]

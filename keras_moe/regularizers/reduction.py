"""Batch statistics that stay correct under `tf.distribute`.

Balancing losses are non-linear functions of sums over the *global* batch (the CV^2 of
per-expert importance, the entropy of the mean gate). Under a data-parallel strategy each
replica only sees its shard, so a loss computed from shard sums differs from the
single-device loss. These helpers sum over the leading axis and then across replicas, with
gradients flowing back through the all-reduce, so every replica computes the global value.
"""

import keras
from keras import ops


def _replica_context():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def num_replicas_in_sync():
    """Number of replicas that run the current step in sync (1 outside a strategy)."""
    context = _replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def cross_replica_sum(value):
    """Sums `value` over the replicas of the current strategy; identity outside one."""
    context = _replica_context()
    if context is None:
        return value
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def batch_sum(values):
    """Sum of `values` over axis 0 and over all replicas: shape `values.shape[1:]`."""
    return cross_replica_sum(ops.sum(values, axis=0))


def batch_mean(values):
    """Mean of `values` over axis 0 of the global batch (all replicas)."""
    count = ops.cast(ops.shape(values)[0], values.dtype)
    return batch_sum(values) / cross_replica_sum(count)


def scale_for_replicas(loss):
    """Divides a globally computed loss by the replica count, for custom training loops.

    The gradients of every replica's loss are summed; a term that each replica computes
    from global statistics must enter each replica's loss divided by the number of
    replicas to match the single-device gradient. `model.fit` on TensorFlow already does
    this for every `add_loss` term: do not apply it there as well.
    """
    replicas = num_replicas_in_sync()
    if replicas == 1:
        return loss
    return loss / ops.cast(replicas, loss.dtype)

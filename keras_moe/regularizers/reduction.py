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


def _sum_local_replicas(strategy, per_replica):
    return ops.sum(ops.stack(strategy.experimental_local_results(per_replica)), axis=0)


def cross_replica_sum(value):
    """Sums `value` over the replicas of the current strategy; identity outside one.

    Returns the global sum. Two choices keep this safe inside a model's forward pass:

    - On one worker (MirroredStrategy) the replicas' values are added in a merge call
      with plain ops, not with collective all-reduces: TensorFlow's collectives abort
      with "Shape mismatch in the collective instance" when several of them run in the
      forward pass beside Keras's gradient all-reduce. Across workers the strategy's
      all-reduce is used.
    - The gradient needs no collective in the backward pass: each replica's gradient is
      `num_replicas` times the local derivative, so that after the usual division of
      each replica's loss by the replica count (`model.fit` does it for added losses)
      and the sum of replica gradients, the update equals the single-device one.
    """
    context = _replica_context()
    if context is None:
        return value
    import tensorflow as tf

    local = ops.stop_gradient(value)
    if context.strategy.extended._in_multi_worker_mode():
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
    else:
        total = context.merge_call(_sum_local_replicas, args=(local,))
    replicas = ops.cast(context.num_replicas_in_sync, value.dtype)
    return ops.stop_gradient(total) + replicas * (value - local)


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
    this for every `add_loss` term: do not apply it there as well. In a custom loop,
    apply it to `model.losses` only: a Keras loss object already divides by the
    replica count inside a strategy.
    """
    replicas = num_replicas_in_sync()
    if replicas == 1:
        return loss
    return loss / ops.cast(replicas, loss.dtype)


def add_global(variable, delta):
    """Adds `delta`, summed over the replicas of a `tf.distribute` strategy, to `variable`.

    For bookkeeping variables that count the global batch (Eigen's running totals, the
    drop counters of `MoEDense`). They use ONLY_FIRST_REPLICA aggregation and every
    replica adds the same global sum; SUM aggregation would add every replica's
    `variable + delta`, doubling the old value on two replicas at each step.
    """
    variable.assign_add(ops.stop_gradient(cross_replica_sum(delta)))

"""Routing tokens to experts and combining the experts' outputs.

Three strategies give the same result when nothing is dropped:

- `dense_combine`: every expert runs on every token; the reference, O(E) compute.
- `sparse_dispatch`: dropless. Assignments are sorted by expert, each expert runs one
  matmul on exactly its tokens, and a weighted segment sum puts the outputs back. Its
  shapes depend on the routing, so it is the one TensorFlow-specific function here.
- `capacity_dispatch`: static shapes for XLA and TPUs. Each expert has `capacity` slots;
  assignments beyond it are dropped (their contribution is zero) and counted.
"""

import math

import keras
from keras import ops


def dense_combine(expert_outputs, gates):
    """Mixes per-expert outputs (experts, tokens, units) with gates (tokens, experts)."""
    return ops.einsum("te,etu->tu", ops.cast(gates, expert_outputs.dtype), expert_outputs)


def _flatten_assignments(top_k_indices, top_k_gates):
    """Token id, expert id and gate of every (token, slot) assignment, token-major."""
    num_tokens = ops.shape(top_k_indices)[0]
    k = top_k_indices.shape[-1]
    token_ids = ops.reshape(
        ops.repeat(ops.expand_dims(ops.arange(num_tokens, dtype="int32"), 1), k, axis=1),
        (-1,),
    )
    return token_ids, ops.reshape(top_k_indices, (-1,)), ops.reshape(top_k_gates, (-1,))


def sparse_dispatch(tokens, top_k_indices, top_k_gates, num_experts, expert_fn):
    """Dropless top-k dispatch that computes each expert only on its own tokens.

    Args:
        tokens: (tokens, features) inputs.
        top_k_indices: (tokens, k) int32 expert of each assignment.
        top_k_gates: (tokens, k) gate of each assignment.
        num_experts: Number of experts.
        expert_fn: Maps a list of `num_experts` tensors (n_e, features), the tokens of
            each expert, to the list of their outputs (n_e, units).

    Returns:
        (tokens, units): sum over a token's assignments of gate * expert output.
    """
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "dispatch='sparse' needs the TensorFlow backend (its shapes depend on the "
            "routing); use dispatch='capacity' on other backends."
        )
    import tensorflow as tf

    token_ids, expert_ids, gate_values = _flatten_assignments(top_k_indices, top_k_gates)
    order = tf.argsort(expert_ids, stable=True)
    sorted_tokens = tf.gather(token_ids, order)
    sorted_gates = tf.gather(gate_values, order)
    tokens_per_expert = tf.math.bincount(
        expert_ids, minlength=num_experts, maxlength=num_experts, dtype=tf.int32
    )
    expert_inputs = tf.split(
        tf.gather(tokens, sorted_tokens), tokens_per_expert, num=num_experts
    )
    expert_outputs = tf.concat(expert_fn(expert_inputs), axis=0)
    weighted = expert_outputs * tf.cast(sorted_gates, expert_outputs.dtype)[:, None]
    return tf.math.unsorted_segment_sum(weighted, sorted_tokens, tf.shape(tokens)[0])


def expert_capacity(num_tokens, k, num_experts, capacity_factor):
    """Slots per expert: ceil(capacity_factor * k * tokens / experts), at least 1."""
    if isinstance(num_tokens, int):
        return max(1, int(math.ceil(capacity_factor * k * num_tokens / num_experts)))
    capacity = ops.ceil(
        ops.cast(num_tokens, "float32") * (capacity_factor * k / num_experts)
    )
    return ops.maximum(ops.cast(capacity, "int32"), 1)


def capacity_dispatch(
    tokens, top_k_indices, top_k_gates, num_experts, capacity, batched_expert_fn
):
    """Top-k dispatch into fixed-size expert buffers (static shapes).

    Assignments claim slots in priority order: every token's first choice before any
    token's second choice, and within a choice, earlier tokens first (GShard's order).
    Assignments that find their expert full are dropped.

    Args:
        tokens: (tokens, features) inputs.
        top_k_indices: (tokens, k) int32 expert of each assignment.
        top_k_gates: (tokens, k) gate of each assignment.
        num_experts: Number of experts.
        capacity: Slots per expert (int or scalar int tensor).
        batched_expert_fn: Maps (experts, capacity, features) to (experts, capacity, units).

    Returns:
        `(outputs, dropped)`: (tokens, units) combined outputs and the number of
        dropped assignments (int32 scalar).
    """
    num_tokens = ops.shape(tokens)[0]
    k = top_k_indices.shape[-1]
    features = tokens.shape[-1]
    # Choice-major order: row j * tokens + t is token t's j-th choice.
    expert_ids = ops.reshape(ops.transpose(top_k_indices), (-1,))
    gate_values = ops.reshape(ops.transpose(top_k_gates), (-1,))
    token_ids = ops.tile(ops.arange(num_tokens, dtype="int32"), (k,))

    one_hot = ops.one_hot(expert_ids, num_experts, dtype="int32")
    position = ops.sum((ops.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    kept = position < capacity
    overflow_slot = num_experts * capacity
    slots = ops.where(kept, expert_ids * capacity + position, overflow_slot)

    buffer = ops.scatter(
        ops.expand_dims(slots, -1),
        ops.take(tokens, token_ids, axis=0),
        (overflow_slot + 1, features),
    )
    expert_inputs = ops.reshape(buffer[:overflow_slot], (num_experts, capacity, features))
    expert_outputs = batched_expert_fn(expert_inputs)
    units = expert_outputs.shape[-1]
    flat_outputs = ops.concatenate(
        [
            ops.reshape(expert_outputs, (overflow_slot, units)),
            ops.zeros((1, units), dtype=expert_outputs.dtype),
        ],
        axis=0,
    )
    weights = ops.cast(gate_values, expert_outputs.dtype) * ops.cast(
        kept, expert_outputs.dtype
    )
    per_assignment = ops.take(flat_outputs, slots, axis=0) * weights[:, None]
    outputs = ops.sum(ops.reshape(per_assignment, (k, num_tokens, units)), axis=0)
    dropped = ops.sum(ops.cast(ops.logical_not(kept), "int32"))
    return outputs, dropped

"""Routing choices shared by the gates: biased top-k choice, group limits, expert choice.

Pure functions of `(tokens, experts)` float32 tensors in `keras.ops`; the gate layers of
`keras_moe.layers.gates` compose them.

- `choose_top_k(values, selection, k)`: the k experts with the largest `selection` and
  the `values` at those experts. A gate ranks on one quantity (noisy logits, scores plus
  a balancing bias) and takes its gate values from another (the same logits without the
  bias): auxiliary-loss-free balancing (Wang et al. 2024) changes only which experts are
  chosen, never the weight a chosen expert gets.
- `group_limited(selection, num_groups, top_k_groups)`: DeepSeek-V2/V3's device- or
  node-limited routing: experts form equal, consecutive groups; each token keeps its
  `top_k_groups` best groups (a group scores the sum of its two best selection scores,
  DeepSeek-V3's rule; its only score for a group of one) and ranks experts inside them.
- `bias_update(load, rate)`: `rate * sign(mean(load) - load)`, the step of the
  balancing bias after a training step.
- `expert_choice(scores, capacity)`: Zhou et al. 2022: every expert takes the
  `capacity` tokens with the highest scores for it.
"""

from keras import ops

from keras_moe import ops as moe_ops
from keras_moe import validation

__all__ = [
    "MASKED",
    "bias_update",
    "check_groups",
    "choose_top_k",
    "dense_layout",
    "expert_choice",
    "expert_choice_capacity",
    "group_limited",
]

# Selection score of an expert outside a token's chosen groups: finite, so that the
# smooth load estimator's differences stay finite, and below any real score.
MASKED = -1e9


def check_groups(num_experts, top_k, num_groups, top_k_groups):
    """Validates group-limited routing settings; returns `(num_groups, top_k_groups)`.

    Both None (no group limit), or: `num_groups` >= 1 dividing `num_experts`,
    1 <= `top_k_groups` <= `num_groups`, and the kept groups holding at least `top_k`
    experts.
    """
    if num_groups is None and top_k_groups is None:
        return None, None
    if num_groups is None or top_k_groups is None:
        raise ValueError(
            "`num_groups` and `top_k_groups` go together (group-limited routing): set "
            f"both or neither; got num_groups={num_groups!r}, top_k_groups={top_k_groups!r}."
        )
    num_groups = validation.positive_int("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(
            f"`num_groups`={num_groups} must divide num_experts ({num_experts}) into "
            "equal groups."
        )
    top_k_groups = validation.positive_int("top_k_groups", top_k_groups)
    if top_k_groups > num_groups:
        raise ValueError(
            f"`top_k_groups` must be between 1 and num_groups ({num_groups}); got "
            f"{top_k_groups}."
        )
    if top_k is None:
        raise ValueError("group-limited routing (`num_groups`) needs a top-k gate (`top_k`).")
    if top_k > top_k_groups * (num_experts // num_groups):
        raise ValueError(
            f"top_k={top_k} experts do not fit in top_k_groups={top_k_groups} groups of "
            f"{num_experts // num_groups} experts; raise `top_k_groups` or lower `top_k`."
        )
    return num_groups, top_k_groups


def group_limited(selection, num_groups, top_k_groups):
    """`selection` with every expert outside each token's best groups set to `MASKED`.

    Args:
        selection: (tokens, experts) scores the experts are ranked by.
        num_groups: Equal, consecutive groups of experts.
        top_k_groups: Groups kept per token.

    Returns:
        (tokens, experts), `selection` where kept, `MASKED` elsewhere.
    """
    num_experts = selection.shape[-1]
    size = num_experts // num_groups
    grouped = ops.reshape(selection, (-1, num_groups, size))
    best, _ = moe_ops.top_k(grouped, min(2, size))
    group_scores = ops.sum(best, axis=-1)  # (tokens, groups)
    _, kept = moe_ops.top_k(group_scores, top_k_groups)
    kept_groups = ops.sum(ops.one_hot(kept, num_groups, dtype="float32"), axis=-2) > 0
    keep = ops.repeat(kept_groups, size, axis=-1)
    return ops.where(keep, selection, ops.cast(MASKED, selection.dtype))


def choose_top_k(values, selection, k):
    """The k experts with the largest `selection`, and `values` at them.

    Args:
        values: (tokens, experts) the quantity the gate values are made of.
        selection: (tokens, experts) the quantity the experts are ranked by.
        k: Experts per token.

    Returns:
        `(indices, chosen)`, each (tokens, k): int32 experts, largest selection first,
        and `values` at them (gradients flow to `values`, never to `selection`).
    """
    _, indices = moe_ops.top_k(ops.stop_gradient(selection), k)
    indices = ops.stop_gradient(ops.cast(indices, "int32"))
    return indices, ops.take_along_axis(values, indices, axis=-1)


def dense_layout(indices, top_gates, num_experts):
    """(tokens, k) experts and gates -> (tokens, experts) gates and 0/1 dispatch mask."""
    one_hot = ops.one_hot(indices, num_experts, dtype="float32")
    return ops.sum(one_hot * top_gates[..., None], axis=-2), ops.sum(one_hot, axis=-2)


def bias_update(load, rate):
    """`rate * sign(mean(load) - load)`: lifts the bias of under-loaded experts, lowers
    the over-loaded ones' (Wang et al. 2024, Algorithm 1; no gradient)."""
    load = ops.stop_gradient(ops.cast(load, "float32"))
    return rate * ops.sign(ops.mean(load) - load)


def expert_choice_capacity(num_tokens, num_experts, capacity_factor):
    """Tokens each expert takes: `ceil(capacity_factor * tokens / experts)`, between 1
    and the number of tokens (`num_tokens` an int, a scalar tensor for TensorFlow's
    dynamic batch, or a JAX symbolic dimension)."""
    from keras_moe.layers.dispatch import expert_capacity

    if capacity_factor >= num_experts:  # every expert takes every token
        return num_tokens
    # A factor below the expert count keeps ceil(factor * tokens / experts) <= tokens.
    return expert_capacity(num_tokens, 1, num_experts, capacity_factor)


def expert_choice(scores, capacity):
    """Each expert's `capacity` tokens with the highest `scores` for it.

    Args:
        scores: (tokens, experts) token-to-expert scores (a softmax over experts).
        capacity: Tokens per expert, 1 <= capacity <= tokens.

    Returns:
        `(indices, gates)`, each (experts, capacity): int32 tokens, best first, and
        their scores (the gate of token t at expert e where e chose t).
    """
    by_expert = ops.transpose(scores)  # (experts, tokens)
    _, indices = moe_ops.top_k(ops.stop_gradient(by_expert), capacity)
    indices = ops.stop_gradient(ops.cast(indices, "int32"))
    return indices, ops.take_along_axis(by_expert, indices, axis=-1)

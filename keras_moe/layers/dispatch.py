"""Routing tokens to experts and combining the experts' outputs.

Three strategies give the same result when nothing is dropped:

- `dense_combine`: every expert runs on every token; the reference, O(E) compute.
- `sparse_dispatch`: dropless. Assignments are sorted by expert, each expert runs one
  matmul on exactly its tokens, and a gather through the inverse of the sort puts each
  token's k outputs back for the gate-weighted sum. The grouped matmul is the
  backend-specific part here: on TensorFlow one matmul per expert with a hand-written
  gradient (`grouped_ffn`, dynamic shapes); on JAX `jax.lax.ragged_dot` (static shapes,
  the row count per expert is data). `keras.ops` has no grouped matmul.
- `capacity_dispatch`: static shapes for XLA and TPUs. Each expert has `capacity` slots;
  assignments beyond it are dropped (their contribution is zero) and counted.

Expert-choice routing (`ExpertChoiceGate`) has its own: `expert_choice_dispatch`, a
gather of each expert's chosen tokens, one batched product and a scatter-add back; it
is both dropless (every choice runs) and static (every expert takes as many tokens).
"""

import fractions

import keras
import numpy as np
from keras import ops


def dense_combine(expert_outputs, gates):
    """Mixes per-expert outputs (experts, tokens, units) with gates (tokens, experts)."""
    return ops.einsum("te,etu->tu", ops.cast(gates, expert_outputs.dtype), expert_outputs)


def expert_choice_dispatch(tokens, indices, gates, batched_expert_fn):
    """Expert-choice dispatch: each expert runs on exactly the tokens it took.

    Each expert gathers its `capacity` tokens, the experts run as one batched product
    (every expert has the same number of rows: static shapes, nothing computed for a
    token an expert did not take), and each output row is added, times its gate, to its
    token (a token that no expert took gets zeros).

    Args:
        tokens: (tokens, features) inputs.
        indices: (experts, capacity) int32 tokens each expert took.
        gates: (experts, capacity) their gates.
        batched_expert_fn: Maps (experts, capacity, features) to
            (experts, capacity, units), expert e on slice e.

    Returns:
        (tokens, units) combined outputs.
    """
    expert_outputs = batched_expert_fn(ops.take(tokens, indices, axis=0))
    units = expert_outputs.shape[-1]
    weighted = expert_outputs * ops.cast(gates, expert_outputs.dtype)[:, :, None]
    return ops.scatter(ops.reshape(indices, (-1, 1)), ops.reshape(weighted, (-1, units)),
                       (ops.shape(tokens)[0], units))


def sparse_dispatch(tokens, top_k_indices, top_k_gates, num_experts, grouped_expert_fn):
    """Dropless top-k dispatch that computes each expert only on its own tokens.

    Assignments are sorted by expert (a stable sort, so each expert sees its tokens in
    order); `position[a]` is where assignment `a` lands in that order. Combining reads
    each token's k expert outputs back with one gather through `position` rather than
    scatter-adding them. On TensorFlow the gathers have hand-written gradients: the
    gather is a permutation, so its gradient is the gather through the inverse
    permutation, and the dispatch gather's gradient sums each token's k rows the same
    way (both cheaper than segment sums on the CPU). On JAX autodiff does the same.

    Args:
        tokens: (tokens, features) inputs.
        top_k_indices: (tokens, k) int32 expert of each assignment.
        top_k_gates: (tokens, k) gate of each assignment.
        num_experts: Number of experts.
        grouped_expert_fn: Called as `grouped_expert_fn(inputs, tokens_per_expert)`
            with the (n, features) inputs of every assignment, sorted by expert, and
            the (experts,) int32 count of assignments of each expert; returns the
            (n, units) output of each row's expert, in the same order (`grouped_ffn`
            computes it).

    Returns:
        (tokens, units): sum over a token's assignments of gate * expert output.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _sparse_dispatch_tf(
            tokens, top_k_indices, top_k_gates, num_experts, grouped_expert_fn
        )
    if backend == "jax":
        return _sparse_dispatch_jax(
            tokens, top_k_indices, top_k_gates, num_experts, grouped_expert_fn
        )
    raise NotImplementedError(
        f"dispatch='sparse' is implemented for the TensorFlow and JAX backends, not "
        f"{backend!r}; use dispatch='capacity' or 'dense'."
    )


def _sparse_dispatch_tf(tokens, top_k_indices, top_k_gates, num_experts, grouped_expert_fn):
    import tensorflow as tf

    k = top_k_indices.shape[-1]
    expert_ids = tf.reshape(top_k_indices, (-1,))  # assignment t * k + j
    order = tf.argsort(expert_ids, stable=True)  # sorted row -> assignment
    position = tf.math.invert_permutation(order)  # assignment -> sorted row
    tokens_per_expert = tf.math.bincount(
        expert_ids, minlength=num_experts, maxlength=num_experts, dtype=tf.int32
    )
    expert_inputs = _rows_of_assignments(tokens, order // k, position, k)
    expert_outputs = grouped_expert_fn(expert_inputs, tokens_per_expert)
    units = expert_outputs.shape[-1]
    per_token = tf.reshape(
        _permute_rows(expert_outputs, position, order), (tf.shape(tokens)[0], k, units)
    )
    gates = tf.cast(top_k_gates, expert_outputs.dtype)
    return tf.reduce_sum(per_token * gates[:, :, None], axis=1)


def _sparse_dispatch_jax(tokens, top_k_indices, top_k_gates, num_experts, grouped_expert_fn):
    import jax.numpy as jnp

    num_tokens, k = top_k_indices.shape
    expert_ids = jnp.reshape(top_k_indices, (-1,))  # assignment t * k + j
    order = jnp.argsort(expert_ids, stable=True)  # sorted row -> assignment
    # The inverse permutation, assignment -> sorted row, written as a scatter of a
    # range (cheaper than a second sort).
    position = jnp.zeros_like(order).at[order].set(
        jnp.arange(order.shape[0], dtype=order.dtype)
    )
    tokens_per_expert = jnp.bincount(expert_ids, length=num_experts).astype("int32")
    expert_inputs = jnp.take(tokens, order // k, axis=0)
    expert_outputs = grouped_expert_fn(expert_inputs, tokens_per_expert)
    per_token = jnp.reshape(
        jnp.take(expert_outputs, position, axis=0), (num_tokens, k, expert_outputs.shape[-1])
    )
    gates = top_k_gates.astype(expert_outputs.dtype)
    return jnp.sum(per_token * gates[:, :, None], axis=1)


def _rows_of_assignments(tokens, sorted_token_ids, position, k):
    """`tokens[sorted_token_ids]`; the gradient adds each token's k rows back."""
    import tensorflow as tf

    @tf.custom_gradient
    def gather(x):
        def grad(upstream):
            per_token = tf.reshape(
                tf.gather(upstream, position), (tf.shape(x)[0], k, tf.shape(upstream)[-1])
            )
            return tf.reduce_sum(per_token, axis=1)

        return tf.gather(x, sorted_token_ids), grad

    return gather(tokens)


def _permute_rows(rows, permutation, inverse_permutation):
    """`rows[permutation]`, whose gradient is the gather through the inverse."""
    import tensorflow as tf

    @tf.custom_gradient
    def gather(x):
        def grad(upstream):
            return tf.gather(upstream, inverse_permutation)

        return tf.gather(x, permutation), grad

    return gather(rows)


# Below this many rows, `g @ W^T` is computed as `(W @ g^T)^T` (see `_matmul_kernel_t`).
_FEW_ROWS = 256


def _matmul_kernel_t(rows, kernel):
    """`rows @ kernel^T` for one expert's rows, whatever their number.

    TensorFlow's CPU matmul (Eigen) is slow when the product has few rows and a
    transposed right operand: for 128 rows and 256x512 kernels it takes ~1.8x as long
    per row as on thousands of rows. The transposed product `kernel @ rows^T` has the
    few rows as its columns, runs near full speed, and its transpose is cheap; on many
    rows the direct form is the faster one.
    """
    import tensorflow as tf

    return tf.cond(
        tf.shape(rows)[0] < _FEW_ROWS,
        lambda: tf.transpose(tf.matmul(kernel, rows, transpose_b=True)),
        lambda: tf.matmul(rows, kernel, transpose_b=True),
    )


def grouped_ffn(inputs, tokens_per_expert, layers, hidden_activation=None):
    """Per-expert feed-forward network on rows sorted by expert.

    Row block e of `inputs` (`tokens_per_expert[e]` rows, in order) goes through expert
    e: `z = h W_e + b_e` for each `(W, b)` in `layers`, with `hidden_activation` between
    consecutive layers (not after the last one).

    A layer may have several kernels side by side: `((W1, W2), (b1, b2))` computes
    `z_p = h W_p + b_p` for each part and hands the parts to the activation as
    separate arguments (`hidden_activation(z_1, z_2)`): a GLU's gate and up
    projections. Keeping the parts apart, rather than concatenating their kernels,
    spares copying every expert's kernels at each call, splitting the hidden rows, and
    slicing the packed weight gradients.

    On JAX each layer is one `jax.lax.ragged_dot` (the grouped matmul; a real grouped
    kernel on GPU and TPU, a masked dense product costing about `experts` times the
    work on the CPU; the parts are concatenated there, so that they are one product).
    On TensorFlow each layer part is one matmul per expert.

    TensorFlow's gradient is written by hand rather than left to autodiff: each stacked weight's
    gradient is packed once from the per-expert matmuls (autodiff adds, per expert and
    per bias, broadcast-reduction ops with dynamic shapes), the input gradients of
    small experts use the faster transposed product (`_matmul_kernel_t`), and the
    hidden activation's gradient comes from ReLU's own kernel (or, for any other
    activation, from autodiff of the activation alone).

    Args:
        inputs: (n, features) rows sorted by expert.
        tokens_per_expert: (experts,) int32 row count of each expert; sums to n.
        layers: List of `(kernel, bias)`: kernel (experts, in, out), bias (experts, out)
            or None; or a tuple of kernels (and None or a tuple of as many biases) for
            a layer of several parts. Tensors of the dtype of `inputs` (cast variables
            beforehand).
        hidden_activation: Callable applied between layers, to one tensor per part of
            the layer before; None for linear.

    Returns:
        (n, units) outputs of the last layer, before any output activation.
    """
    layers = [_layer_parts(kernel, bias) for kernel, bias in layers]
    if len(layers[-1][0]) != 1:
        raise ValueError("grouped_ffn: the last layer must have a single kernel.")
    backend = keras.backend.backend()
    if backend == "jax":
        return _grouped_ffn_jax(inputs, tokens_per_expert, layers, hidden_activation)
    if backend != "tensorflow":
        raise NotImplementedError(
            f"grouped_ffn runs on the TensorFlow and JAX backends, not {backend!r}."
        )
    return _grouped_ffn_tf(inputs, tokens_per_expert, layers, hidden_activation)


def _layer_parts(kernel, bias):
    """`(kernels, biases)` as tuples (biases None when the layer has none)."""
    kernels = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,)
    if bias is None:
        return kernels, None
    biases = tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)
    if len(biases) != len(kernels):
        raise ValueError(
            f"grouped_ffn: a layer has {len(kernels)} kernels and {len(biases)} biases."
        )
    return kernels, biases


def _grouped_ffn_jax(inputs, tokens_per_expert, layers, hidden_activation):
    import jax
    import jax.numpy as jnp

    num_experts = layers[0][0][0].shape[0]
    row_expert = None  # the expert of each sorted row, for the biases
    h = inputs
    last = len(layers) - 1
    for index, (kernels, biases) in enumerate(layers):
        widths = [kernel.shape[-1] for kernel in kernels]
        kernel = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=-1)
        h = jax.lax.ragged_dot(h, kernel, tokens_per_expert)
        if biases is not None:
            if row_expert is None:
                row_expert = jnp.repeat(
                    jnp.arange(num_experts), tokens_per_expert,
                    total_repeat_length=inputs.shape[0],
                )
            bias = biases[0] if len(biases) == 1 else jnp.concatenate(biases, axis=-1)
            h = h + jnp.take(bias, row_expert, axis=0)
        if index < last and hidden_activation is not None:
            parts = jnp.split(h, np.cumsum(widths)[:-1], axis=-1)
            h = hidden_activation(*parts)
    return h


def _grouped_ffn_tf(inputs, tokens_per_expert, layers, hidden_activation):
    import tensorflow as tf

    num_experts = layers[0][0][0].shape[0]
    if num_experts is None:
        raise ValueError("grouped_ffn needs a static number of experts.")
    is_relu = hidden_activation in (keras.activations.relu, tf.nn.relu)
    is_linear = hidden_activation is None or hidden_activation is keras.activations.linear
    last = len(layers) - 1
    # Only an activation other than ReLU, or one of several parts, needs its inputs for
    # the gradient (ReLU's comes from its output).
    needs_pre = [
        index < last and not is_linear and (not is_relu or len(kernels) > 1)
        for index, (kernels, _) in enumerate(layers)
    ]
    flat_weights = [
        w for kernels, biases in layers for w in (*kernels, *(biases or ()))
    ]

    def split_rows(x):
        return tf.split(x, tokens_per_expert, num=num_experts)

    @tf.custom_gradient
    def ffn(x, *weights):
        weights = iter(weights)
        per_layer = []  # per layer: (kernels, biases), each [part][expert]
        for kernels, biases in layers:
            unstacked_kernels = [tf.unstack(next(weights), num_experts) for _ in kernels]
            unstacked_biases = None
            if biases is not None:
                unstacked_biases = [tf.unstack(next(weights), num_experts) for _ in biases]
            per_layer.append((unstacked_kernels, unstacked_biases))

        layer_inputs = []  # each layer's per-expert inputs
        pre_activations = []  # each hidden layer's per-expert outputs, [part][expert]
        rows = split_rows(x)
        for index, (kernels, biases) in enumerate(per_layer):
            layer_inputs.append(rows)
            parts = [[tf.matmul(r, w) for r, w in zip(rows, part)] for part in kernels]
            if biases is not None:
                parts = [
                    [tf.nn.bias_add(z, b) for z, b in zip(part, part_biases)]
                    for part, part_biases in zip(parts, biases)
                ]
            if index == last:
                rows = parts[0]
                break
            pre_activations.append(parts if needs_pre[index] else None)
            if is_linear:
                rows = parts[0]
            else:
                rows = [hidden_activation(*zs) for zs in zip(*parts)]
        outputs = tf.concat(rows, axis=0)

        def activation_grad(upstream, pre, post):
            """Per-part gradients of one expert's hidden activation."""
            if is_linear:
                return [upstream]
            if pre is None:  # ReLU of a single part
                return [tf.raw_ops.ReluGrad(gradients=upstream, features=post)]
            with tf.GradientTape() as tape:
                for z in pre:
                    tape.watch(z)
                recomputed = hidden_activation(*pre)
            return tape.gradient(recomputed, list(pre), output_gradients=upstream)

        def grad(upstream):
            layer_grads = []  # last layer first; each the layer's flat weight grads
            upstream_parts = [split_rows(upstream)]  # [part][expert]
            for index in range(last, -1, -1):
                kernels, biases = per_layer[index]
                kernel_grads = [
                    tf.stack([
                        tf.matmul(i, u, transpose_a=True)
                        for i, u in zip(layer_inputs[index], part_upstream)
                    ])
                    for part_upstream in upstream_parts
                ]
                bias_grads = []
                if biases is not None:
                    bias_grads = [
                        tf.stack([tf.reduce_sum(u, axis=0) for u in part_upstream])
                        for part_upstream in upstream_parts
                    ]
                layer_grads.append(kernel_grads + bias_grads)
                rows_grads = _sum_of_parts(upstream_parts, kernels)
                if index == 0:
                    break
                pre = pre_activations[index - 1]
                per_expert = [
                    activation_grad(
                        u, None if pre is None else [part[e] for part in pre],
                        layer_inputs[index][e],
                    )
                    for e, u in enumerate(rows_grads)
                ]
                upstream_parts = [list(part) for part in zip(*per_expert)]
            flat = [g for grads in reversed(layer_grads) for g in grads]
            return (tf.concat(rows_grads, axis=0), *flat)

        return outputs, grad

    return ffn(inputs, *flat_weights)


def _sum_of_parts(upstream_parts, kernels):
    """Each expert's input gradient, `sum_p u_p W_p^T`, from per-part upstreams."""
    total = None
    for part_upstream, part_kernels in zip(upstream_parts, kernels):
        grads = [_matmul_kernel_t(u, w) for u, w in zip(part_upstream, part_kernels)]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return total


def expert_capacity(num_tokens, k, num_experts, capacity_factor):
    """Slots per expert: ceil(capacity_factor * k * tokens / experts), at least 1.

    `num_tokens` is an int, a scalar int tensor (TensorFlow's dynamic batch), or a JAX
    symbolic dimension (a batch of unknown size in `model.export`'s JAX tracing, where
    shapes must stay dimension expressions). The ratio is taken as an exact fraction of
    `capacity_factor` as written (1.1, not its binary neighbour), so the int and the
    symbolic paths agree and a product that lands on an integer is not rounded up.
    """
    ratio = fractions.Fraction(repr(float(capacity_factor))) * k / num_experts
    p, q = ratio.numerator, ratio.denominator
    if isinstance(num_tokens, int):
        return max(1, -(-p * num_tokens // q))
    if not hasattr(num_tokens, "dtype"):  # a symbolic dimension (>= 1): integer algebra
        return (p * num_tokens + q - 1) // q
    capacity = ops.ceil(
        ops.cast(num_tokens, "float32") * (capacity_factor * k / num_experts)
    )
    return ops.maximum(ops.cast(capacity, "int32"), 1)


def capacity_dispatch(
    tokens,
    top_k_indices,
    top_k_gates,
    num_experts,
    capacity,
    batched_expert_fn,
    groups=1,
    shard=None,
):
    """Top-k dispatch into fixed-size expert buffers (static shapes), by token groups.

    The tokens are split into `groups` equal, consecutive groups (GShard's groups: with
    expert parallelism, one per device), and each group routes on its own: each expert
    has `capacity` slots per group, and a group's assignments claim them in priority
    order, every token's first choice before any token's second choice, earlier tokens
    first within a choice. Assignments that find their expert's slots full are dropped
    (they contribute zero) and counted. With one group this is GShard's rule over the
    whole batch.

    Everything before the experts and after them is a gather within a group (a sort of
    the group's assignments by expert decides which token fills each slot), so that with
    the groups split over devices and the experts over a device axis, the only exchange
    between devices is the reshuffle of the (groups, experts, capacity, features) buffer
    from group-major to expert-major and back: an all-to-all each way.

    Args:
        tokens: (tokens, features) inputs; `tokens` divisible by `groups`.
        top_k_indices: (tokens, k) int32 expert of each assignment.
        top_k_gates: (tokens, k) gate of each assignment.
        num_experts: Number of experts.
        capacity: Slots per expert and group (int or scalar int tensor).
        batched_expert_fn: Maps (experts, n, features) to (experts, n, units), expert e
            on slice e.
        groups: Number of token groups, >= 1 (static).
        shard: None, or an object with `by_group(x)` and `by_expert(x)` that place a
            (groups, experts, ...) or (experts, groups, ...) buffer on the devices (see
            `keras_moe.expert_parallel`).

    Returns:
        `(outputs, dropped)`: (tokens, units) combined outputs and the number of
        dropped assignments (int32 scalar).
    """
    k = top_k_indices.shape[-1]
    features = tokens.shape[-1]
    static_tokens = tokens.shape[0]
    if groups > 1 and (static_tokens is None or static_tokens % groups):
        raise ValueError(
            f"capacity dispatch over {groups} token groups needs a static number of "
            f"tokens divisible by {groups}; got {static_tokens} tokens."
        )
    per_group = static_tokens // groups if static_tokens is not None else -1
    x = ops.reshape(tokens, (groups, per_group, features))
    per_group = ops.shape(x)[1]
    # Choice-major order within a group: assignment j * per_group + s is token s's j-th
    # choice, so that sorting by expert with ties kept in this order gives the priority.
    expert_ids = ops.reshape(
        ops.transpose(ops.reshape(top_k_indices, (groups, per_group, k)), (0, 2, 1)),
        (groups, -1),
    )
    gate_values = ops.reshape(
        ops.transpose(ops.reshape(top_k_gates, (groups, per_group, k)), (0, 2, 1)),
        (groups, -1),
    )
    assignments = ops.shape(expert_ids)[1]
    # Unique keys make any sort stable (TensorFlow's argsort is not).
    index = ops.arange(assignments, dtype="int32")
    order = ops.argsort(expert_ids * assignments + index[None, :], axis=-1)  # row -> a
    position = ops.argsort(order, axis=-1)  # assignment -> its row in that order
    counts = ops.sum(ops.one_hot(expert_ids, num_experts, dtype="int32"), axis=1)  # (G, E)
    starts = ops.cumsum(counts, axis=-1) - counts
    rank = ops.cast(position, "int32") - ops.take_along_axis(starts, expert_ids, axis=1)
    kept = rank < capacity

    # Slot (e, c) of a group holds the assignment at row starts[e] + c of the order.
    slot = ops.arange(capacity, dtype="int32")
    filled = slot[None, None, :] < counts[:, :, None]  # (G, E, C)
    slot_rows = ops.where(filled, starts[:, :, None] + slot[None, None, :], 0)
    slot_assignment = ops.take_along_axis(
        ops.cast(order, "int32"), ops.reshape(slot_rows, (groups, -1)), axis=1
    )
    slot_token = slot_assignment % per_group
    filled = ops.reshape(filled, (groups, -1))
    expert_inputs = _take_rows(x, slot_token) * ops.cast(filled, x.dtype)[:, :, None]

    expert_inputs = ops.reshape(expert_inputs, (groups, num_experts, capacity, features))
    if shard is not None:
        expert_inputs = shard.by_group(expert_inputs)
    expert_inputs = ops.transpose(expert_inputs, (1, 0, 2, 3))  # (E, G, C, d)
    if shard is not None:
        expert_inputs = shard.by_expert(expert_inputs)
    expert_outputs = batched_expert_fn(ops.reshape(expert_inputs, (num_experts, -1, features)))
    units = expert_outputs.shape[-1]
    expert_outputs = ops.reshape(expert_outputs, (num_experts, groups, capacity, units))
    if shard is not None:
        expert_outputs = shard.by_expert(expert_outputs)
    expert_outputs = ops.transpose(expert_outputs, (1, 0, 2, 3))  # (G, E, C, u)
    if shard is not None:
        expert_outputs = shard.by_group(expert_outputs)
    expert_outputs = ops.reshape(expert_outputs, (groups, -1, units))

    slot_of_assignment = expert_ids * capacity + ops.minimum(rank, capacity - 1)
    weights = ops.cast(gate_values, expert_outputs.dtype) * ops.cast(kept, expert_outputs.dtype)
    per_assignment = _take_rows(expert_outputs, slot_of_assignment) * weights[:, :, None]
    outputs = ops.sum(ops.reshape(per_assignment, (groups, k, per_group, units)), axis=1)
    outputs = ops.reshape(outputs, (-1, units))
    dropped = ops.sum(ops.cast(ops.logical_not(kept), "int32"))
    return outputs, dropped


def _take_rows(x, indices):
    """`x[g, indices[g, n]]` for every group g: (groups, rows, d), (groups, n) -> (groups, n, d).

    A gather within each group, written so that each backend keeps it one: TensorFlow's
    batched gather, and on JAX a vmapped take, which XLA's SPMD partitioner keeps on the
    device of its group.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.gather(x, indices, batch_dims=1)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return jax.vmap(lambda rows, index: jnp.take(rows, index, axis=0))(x, indices)
    return ops.take_along_axis(x, ops.expand_dims(indices, -1), axis=1)

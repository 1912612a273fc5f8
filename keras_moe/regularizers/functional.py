"""Balancing and sparsity terms of gate tensors, as pure functions in `keras.ops`.

Every function takes gate tensors of shape `(tokens, experts)` (any leading axes are
flattened into tokens), computes in float32 and returns a float32 tensor. Every sum or mean
over tokens goes through `batch_sum` from `keras_moe.regularizers.reduction`, so inside a
`tf.distribute` replica context each term is computed from the statistics of the *global*
batch and equals the single-device value.

A token whose gate values are not all finite (a NaN or infinite input reaches the gate
as NaN logits) is left out of the batch statistics: it adds nothing to the sums and is
not counted in the means, and no NaN reaches the other tokens' terms or gradients. The
task loss of such a token is still NaN, which is where a bad input shows.

Sources:

- Shazeer et al. 2017, "Outrageously Large Neural Networks: the Sparsely-Gated
  Mixture-of-Experts Layer" (importance, load, CV^2; reference code: tensor2tensor
  `utils/expert_utils.py`).
- Fedus et al. 2021, "Switch Transformers" (load-balancing loss).
- Zoph et al. 2022, "ST-MoE" (router z-loss).
- "Mixture of Experts - Experiment 1" (`shared/papers/002`: batch/sample entropy and
  variance gate losses).
- Wang et al. 2018, "Deep Mixture of Experts via Shallow Embedding" (DeepMoE, L1 gate loss).
"""

import math

from keras import ops

from keras_moe import ops as moe_ops
from keras_moe import validation
from keras_moe.regularizers.reduction import batch_sum

__all__ = [
    "cv_squared",
    "importance",
    "importance_cv_squared",
    "noisy_top_k_load",
    "load_cv_squared",
    "switch_load_balance",
    "sequence_balance_loss",
    "router_z_loss",
    "entropy",
    "batch_entropy_loss",
    "sample_entropy_loss",
    "batch_variance_loss",
    "sample_variance_loss",
    "l1_gate_sparsity",
]

# Denominator guard of the squared coefficient of variation (tensor2tensor's value).
CV_EPSILON = 1e-10
# Lower clip inside the logarithm of the entropy, so that 0 * log(0) evaluates to 0.
LOG_EPSILON = 1e-12
# Noise standard deviations at or below this are treated as zero noise by
# `noisy_top_k_load` (the estimator then becomes the hard step function).
MIN_NOISE_STDDEV = 1e-12


def _float32(x):
    return ops.cast(x, "float32")


def _tokens(x, name):
    """Casts to float32 and flattens all leading axes: `(..., experts)` -> `(tokens, experts)`."""
    x = _float32(x)
    rank = len(x.shape)
    if rank < 2:
        raise ValueError(
            f"`{name}` must have shape (tokens, experts) (rank >= 2), got shape {x.shape}"
        )
    if rank > 2:
        x = ops.reshape(x, (-1, x.shape[-1]))
    return x


def _finite_rows(*tensors):
    """(tokens,) bool: True where every `(tokens, experts)` tensor's row is finite."""
    keep = None
    for tensor in tensors:
        row = ops.all(ops.isfinite(tensor), axis=-1)
        keep = row if keep is None else ops.logical_and(keep, row)
    return keep


def _zero_rows(x, keep):
    """`x` with the rows where `keep` is False set to 0 (and no gradient through them).

    Applied to the inputs, before any non-linear op, so that a NaN row contributes
    neither a NaN value nor (through `0 * NaN` in the chain rule) a NaN gradient.
    """
    return ops.where(ops.expand_dims(keep, -1), x, ops.zeros_like(x))


def _finite_tokens(x, name):
    """`_tokens(x)` with non-finite rows zeroed, and the (tokens,) float32 row mask."""
    x = _tokens(x, name)
    keep = _finite_rows(x)
    return _zero_rows(x, keep), ops.cast(keep, "float32")


def _mean_over(values, weights):
    """Mean of `values` (tokens, ...) over the global batch's tokens with weight 1."""
    weights = ops.reshape(weights, (-1,) + (1,) * (len(values.shape) - 1))
    total = batch_sum(values * weights)
    count = batch_sum(ops.reshape(weights, (-1, 1)))[0]
    return total / ops.maximum(count, 1.0)


def _population_variance(x, axis):
    mean = ops.mean(x, axis=axis, keepdims=True)
    return ops.mean(ops.square(x - mean), axis=axis)


def _standard_normal_cdf(z):
    return 0.5 * (1.0 + ops.erf(z / math.sqrt(2.0)))


def cv_squared(x):
    """Squared coefficient of variation of a 1-D tensor.

    `cv^2(x) = Var(x) / (Mean(x)^2 + 1e-10)`, with the *population* variance
    `Var(x) = mean((x - mean(x))^2)` (a known port bug uses the unbiased `n - 1`
    denominator, which inflates the loss for few experts).

    Minimum: 0, reached when all entries are equal (and for a length-1 or empty vector,
    which return 0).

    Source: Shazeer et al. 2017, eq. 6-7 and tensor2tensor `cv_squared`.

    Args:
        x: 1-D tensor, e.g. per-expert importance or load.

    Returns:
        Scalar float32 tensor.
    """
    x = _float32(x)
    if len(x.shape) != 1:
        raise ValueError(f"`x` must be a 1-D tensor, got shape {x.shape}")
    count = ops.maximum(ops.cast(ops.shape(x)[0], "float32"), 1.0)
    mean = ops.sum(x) / count
    variance = ops.sum(ops.square(x - mean)) / count
    return variance / (ops.square(mean) + CV_EPSILON)


def importance(gates):
    """Per-expert importance: the sum of the gate values over the (global) batch.

    `Importance(X)_e = sum_t G(x_t)_e`.

    Source: Shazeer et al. 2017, eq. 6.

    Args:
        gates: `(tokens, experts)` combine weights.

    Returns:
        `(experts,)` float32 tensor.
    """
    gates, _ = _finite_tokens(gates, "gates")
    return batch_sum(gates)


def importance_cv_squared(gates):
    """Importance balancing term `cv^2(Importance(X))` (unweighted).

    Minimum: 0, reached when every expert receives the same total gate mass over the batch.

    Source: Shazeer et al. 2017, eq. 7 (`L_importance = w_importance * CV(Importance)^2`).

    Args:
        gates: `(tokens, experts)` combine weights.

    Returns:
        Scalar float32 tensor.
    """
    return cv_squared(importance(gates))


def _check_k(k, num_experts):
    validation.integer("`k`", k, minimum=1)
    if num_experts is not None and k >= num_experts:
        raise ValueError(
            f"`k` must be smaller than the number of experts ({num_experts}) so that the "
            f"(k+1)-th largest noisy logit exists, got k={k}"
        )


def noisy_top_k_load(clean_logits, noisy_logits, noise_stddev, k):
    """Shazeer's smooth (differentiable) estimate of the per-expert load.

    For token `x` and expert `i`, `P(x, i)` is the probability that expert `i` is among the
    top `k` noisy logits when its own noise is redrawn and every other expert's noise is
    kept:

        P(x, i) = Phi((clean_i - threshold_i) / noise_stddev_i)
        threshold_i = (k+1)-th largest noisy logit   if i is in the noisy top k
                      k-th largest noisy logit       otherwise

    with `Phi(z) = 0.5 * (1 + erf(z / sqrt(2)))` the standard normal CDF, and
    `Load(X)_i = sum_x P(x, i)` over the (global) batch.

    Where `noise_stddev <= 1e-12` (e.g. at evaluation, when no noise is added) the
    estimator takes its limit, the step `1[clean_i > threshold_i]` (0.5 on ties), instead
    of dividing by zero; with `noisy_logits == clean_logits` this gives hard top-k counts.
    Values and gradients are never NaN. Gradients flow to `clean_logits`, `noise_stddev`
    and (through the thresholds) `noisy_logits`.

    Source: Shazeer et al. 2017, appendix A, eq. 8-10, and tensor2tensor `_prob_in_top_k`.

    Args:
        clean_logits: `(tokens, experts)` logits before noise, `x W_g`.
        noisy_logits: `(tokens, experts)` logits with noise, `H(x)`.
        noise_stddev: noise standard deviation, `(tokens, experts)` or broadcastable to it
            (e.g. a scalar), `softplus(x W_noise) + eps` for the noisy top-k gate.
        k: number of experts each token is sent to; needs `1 <= k < experts`.

    Returns:
        `(experts,)` float32 tensor: the smooth load of each expert.

    Raises:
        ValueError: if `k` is not an integer in `[1, experts - 1]`.
    """
    clean_logits = _tokens(clean_logits, "clean_logits")
    noisy_logits = _tokens(noisy_logits, "noisy_logits")
    _check_k(k, clean_logits.shape[-1])
    noise_stddev = ops.broadcast_to(_float32(noise_stddev), ops.shape(clean_logits))
    keep = _finite_rows(clean_logits, noisy_logits, noise_stddev)
    clean_logits = _zero_rows(clean_logits, keep)
    noisy_logits = _zero_rows(noisy_logits, keep)
    noise_stddev = _zero_rows(noise_stddev, keep)

    top_values, _ = moe_ops.top_k(noisy_logits, k + 1)
    threshold_if_in = top_values[:, k : k + 1]
    threshold_if_out = top_values[:, k - 1 : k]
    is_in = ops.greater(noisy_logits, threshold_if_in)
    threshold = ops.where(is_in, threshold_if_in, threshold_if_out)
    difference = clean_logits - threshold

    # Safe divide: the Phi branch only ever sees a positive denominator, so no inf * 0
    # appears in the value or in the gradient; the zero-noise branch is the step limit.
    has_noise = ops.greater(noise_stddev, MIN_NOISE_STDDEV)
    safe_stddev = ops.where(has_noise, noise_stddev, ops.ones_like(noise_stddev))
    smooth = _standard_normal_cdf(difference / safe_stddev)
    step = 0.5 * (1.0 + ops.sign(ops.stop_gradient(difference)))
    prob = ops.where(has_noise, smooth, step)
    return batch_sum(_zero_rows(prob, keep))


def load_cv_squared(load):
    """Load balancing term `cv^2(Load(X))` (unweighted).

    Minimum: 0, reached when every expert has the same (smooth or hard) load.

    Source: Shazeer et al. 2017, appendix A, eq. 11.

    Args:
        load: `(experts,)` per-expert load, e.g. from `noisy_top_k_load`.

    Returns:
        Scalar float32 tensor.
    """
    return cv_squared(load)


def switch_load_balance(router_probs, dispatch_mask):
    """Switch Transformer auxiliary load-balancing loss (unweighted).

    `L = E * sum_e f_e * P_e`, where

    - `f_e` is the fraction of token-assignments routed to expert `e`: each routed token
      counts once, split evenly over the `k_t = sum_e dispatch_mask[t, e]` experts it is sent
      to, `f_e = sum_t (dispatch_mask[t, e] / k_t) / (number of routed tokens)`, so that
      `sum_e f_e = 1`. Tokens whose row is all zero (dropped by a capacity limit) are left
      out. With a fixed `k` this is `batch_mean(dispatch_mask) / k`. `f` is a count and gets
      no gradient (as in the paper);
    - `P_e = batch_mean(router_probs)[:, e]`, the mean router probability (softmax over all
      clean logits), which carries the gradient.

    Minimum: 1, reached at uniform routing (`f_e = P_e = 1 / E`); for a fixed `f` it is
    minimised by moving probability to the least loaded experts.

    Source: Fedus et al. 2021, "Switch Transformers", eq. 4-6.

    Args:
        router_probs: `(tokens, experts)` softmax over all clean logits.
        dispatch_mask: `(tokens, experts)` float 0/1, 1 where the token is sent to the expert.

    Returns:
        Scalar float32 tensor.
    """
    router_probs = _tokens(router_probs, "router_probs")
    dispatch_mask = ops.stop_gradient(_tokens(dispatch_mask, "dispatch_mask"))
    keep = _finite_rows(router_probs, dispatch_mask)
    router_probs = _zero_rows(router_probs, keep)
    dispatch_mask = _zero_rows(dispatch_mask, keep)
    num_experts = ops.cast(ops.shape(router_probs)[-1], "float32")
    experts_per_token = ops.sum(dispatch_mask, axis=-1, keepdims=True)
    routed = ops.cast(ops.greater(experts_per_token, 0.0), "float32")
    share = dispatch_mask / ops.maximum(experts_per_token, 1.0)
    routed_tokens = ops.maximum(batch_sum(routed)[0], 1.0)
    fraction = batch_sum(share) / routed_tokens
    mean_probs = _mean_over(router_probs, ops.cast(keep, "float32"))
    return num_experts * ops.sum(fraction * mean_probs)


def sequence_balance_loss(probs, dispatch_mask, tokens_per_sequence):
    """DeepSeek-V3's sequence-wise balance loss (unweighted): the Switch term per sequence.

    For each sequence of `T` tokens, `L_s = sum_e f_e P_e` with
    `f_e = E * c_e / sum_e c_e` (`c_e` the sequence's tokens sent to `e`; for a top-k
    gate `sum_e c_e = k T`, the paper's `E / (k T) * c_e`) and `P_e = mean_t probs[t, e]`
    (the normalised scores); the loss is the mean of `L_s` over the global batch's
    sequences. `f` is a count and gets no gradient. A token whose row is not finite is
    left out of its sequence (a sequence left with none is left out of the mean).

    Minimum: 1, reached when every sequence spreads its tokens evenly.

    Source: DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", eq. 17-20.

    Args:
        probs: `(sequences * T, experts)` (or `(sequences, T, experts)`) normalised
            scores (each row sums to 1).
        dispatch_mask: Same shape, float 0/1, 1 where the token is sent to the expert.
        tokens_per_sequence: `T`, the sequence length (an int or a scalar tensor).

    Returns:
        Scalar float32 tensor.
    """
    probs = _tokens(probs, "probs")
    dispatch_mask = ops.stop_gradient(_tokens(dispatch_mask, "dispatch_mask"))
    keep = _finite_rows(probs, dispatch_mask)
    probs = _zero_rows(probs, keep)
    dispatch_mask = _zero_rows(dispatch_mask, keep)
    num_experts = probs.shape[-1]
    by_sequence = (-1, tokens_per_sequence, num_experts)
    counts = ops.sum(ops.reshape(dispatch_mask, by_sequence), axis=1)  # (sequences, E)
    score_sums = ops.sum(ops.reshape(probs, by_sequence), axis=1)
    kept = ops.sum(ops.reshape(ops.cast(keep, "float32"), by_sequence[:2]), axis=1)
    fraction = num_experts * counts / ops.maximum(ops.sum(counts, axis=-1, keepdims=True),
                                                  1.0)
    mean_scores = score_sums / ops.maximum(kept, 1.0)[:, None]
    present = ops.cast(kept > 0, "float32")
    per_sequence = ops.sum(fraction * mean_scores, axis=-1) * present
    return batch_sum(per_sequence) / ops.maximum(batch_sum(present), 1.0)


def router_z_loss(logits):
    """Router z-loss: `batch_mean_t (logsumexp_e logits[t, e])^2` (unweighted).

    Penalises large router logits, which keeps the router's softmax numerically stable.

    Minimum: 0, reached when every token's logits are log-probabilities
    (`sum_e exp(logits[t, e]) = 1`), e.g. all logits equal to `-ln(E)`.

    Source: Zoph et al. 2022, "ST-MoE", eq. 5.

    Args:
        logits: `(tokens, experts)` clean router logits.

    Returns:
        Scalar float32 tensor.
    """
    logits, kept = _finite_tokens(logits, "logits")
    return _mean_over(ops.square(ops.logsumexp(logits, axis=-1)), kept)


def entropy(p, axis=-1):
    """Shannon entropy in nats, `-sum_i p_i ln p_i` along `axis`, with `0 ln 0 = 0`.

    The logarithm's argument is clipped below at 1e-12, so zeros give 0 and finite
    gradients. `p` is not renormalised.

    Minimum: 0 at one-hot `p`; maximum `ln(n)` at uniform `p` of length `n` on the simplex.

    Args:
        p: float tensor of probabilities.
        axis: axis along which to sum.

    Returns:
        float32 tensor with `axis` removed.
    """
    p = _float32(p)
    return -ops.sum(p * ops.log(ops.maximum(p, LOG_EPSILON)), axis=axis)


def batch_entropy_loss(gates):
    """Batch-entropy loss `-Entropy(batch_mean_t gates_t)`.

    Minimised by using the experts evenly on average over the batch.

    Minimum: `-ln(E)` for gates on the simplex, reached when the mean gate is uniform.

    Source: `shared/papers/002` ("Mixture of Experts - Experiment 1"), section 5.1,
    `Loss_batch-entropy`.

    Args:
        gates: `(tokens, experts)` gate probabilities.

    Returns:
        Scalar float32 tensor.
    """
    gates, kept = _finite_tokens(gates, "gates")
    return -entropy(_mean_over(gates, kept))


def sample_entropy_loss(gates):
    """Sample-entropy loss `batch_mean_t Entropy(gates_t)`.

    Minimised by decisive per-example gates (each example uses one expert).

    Minimum: 0, reached when every gate row is one-hot.

    Source: `shared/papers/002`, section 5.1, `Loss_sample-entropy`.

    Args:
        gates: `(tokens, experts)` gate probabilities.

    Returns:
        Scalar float32 tensor.
    """
    gates, kept = _finite_tokens(gates, "gates")
    return _mean_over(entropy(gates, axis=-1), kept)


def batch_variance_loss(gates):
    """Batch-variance loss `Var_e(batch_mean_t gates_t)` (population variance over experts).

    `shared/papers/002` only says "variance loss is defined similarly, using variance
    instead of entropy". We chose the sign so that this term pushes the same way as the
    batch-entropy term: a small variance of the mean gate across experts means the experts
    are used evenly, so the loss is `+Var` (the batch-entropy loss is `-Entropy`).

    Minimum: 0, reached when the mean gate is uniform over the experts.

    Source: `shared/papers/002`, section 5.1, `Loss_batch-variance` (sign: our choice).

    Args:
        gates: `(tokens, experts)` gate probabilities.

    Returns:
        Scalar float32 tensor.
    """
    gates, kept = _finite_tokens(gates, "gates")
    return _population_variance(_mean_over(gates, kept), axis=-1)


def sample_variance_loss(gates):
    """Sample-variance loss `-batch_mean_t Var_e(gates_t)` (population variance).

    Sign chosen (see `batch_variance_loss`) so that the term pushes the same way as the
    sample-entropy term: a decisive gate row has a large variance across experts, so the
    loss is `-Var` and rewards one-hot gates.

    Minimum: `-(E - 1) / E^2` for gates on the simplex, reached when every row is one-hot.

    Source: `shared/papers/002`, section 5.1, `Loss_sample-variance` (sign: our choice).

    Args:
        gates: `(tokens, experts)` gate probabilities.

    Returns:
        Scalar float32 tensor.
    """
    gates, kept = _finite_tokens(gates, "gates")
    return -_mean_over(_population_variance(gates, axis=-1), kept)


def l1_gate_sparsity(gates):
    """DeepMoE L1 gate loss, normalised per channel: `batch_mean_x (||g(x)||_1 / C)`.

    The paper's term is `sum_l ||G^l(e)||_1`; we divide each example's L1 norm by the
    number of gated channels `C` (all non-batch axes) and average over the batch, so the
    term is the mean absolute gate value. A coefficient `lambda` therefore has a scale
    independent of the layer width: the term is 1.0 when every gate is exactly 1 (gates
    fully open, as at DeepMoE's initialisation) and 0 when every gate is closed.

    Minimum: 0, reached when every gate is 0.

    Source: Wang et al. 2018, DeepMoE, eq. 7-8 (`lambda * L_g`).

    Args:
        gates: `(batch, channels)` (or `(batch, ...)`) gate values, e.g. ReLU gates.

    Returns:
        Scalar float32 tensor.
    """
    gates = _float32(gates)
    rank = len(gates.shape)
    if rank < 2:
        raise ValueError(
            f"`gates` must have shape (batch, channels) (rank >= 2), got shape {gates.shape}"
        )
    # Reduced over the non-batch axes in place, not flattened: their sizes may be unknown
    # (a convolutional gate in a TensorFlow graph with unknown spatial dimensions).
    example_axes = tuple(range(1, rank))
    keep = ops.all(ops.isfinite(gates), axis=example_axes)
    kept = ops.where(ops.reshape(keep, (-1,) + (1,) * (rank - 1)), gates, ops.zeros_like(gates))
    per_example = ops.mean(ops.abs(kept), axis=example_axes)
    return _mean_over(per_example, ops.cast(keep, "float32"))

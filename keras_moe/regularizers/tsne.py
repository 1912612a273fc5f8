"""Parametric t-SNE objective (van der Maaten 2009) in `keras.ops`.

A network `f` maps a high-dimensional batch `x` (n, d) to a low-dimensional map
`y = f(x)` (n, k). The loss is `KL(P || Q)`:

- `P` (no gradient) from Gaussian affinities in the input space, with a per-row
  precision `beta_i` found by binary search so that the conditional distribution
  `P_{j|i}` has perplexity `exp(H_i)` equal to `perplexity`; symmetrised and jointly
  normalised, `p_ij = (P_{j|i} + P_{i|j}) / (2n)`.
- `Q` from a Student-t kernel with `dof` degrees of freedom in the map,
  `q_ij ∝ (1 + ||y_i - y_j||^2 / dof)^(-(dof + 1) / 2)`, diagonal zeroed, jointly
  normalised over all `i != j`.

Everything is computed in float32 whatever the inputs' dtype. The affinities are per
batch, so the batch size `n` must exceed the perplexity.

Reference:
    van der Maaten, "Learning a Parametric Embedding by Preserving Local Structure",
    AISTATS 2009.
"""

import math

import keras
from keras import ops

from keras_moe import validation

__all__ = [
    "conditional_affinities",
    "tsne_affinities",
    "tsne_kl",
    "parametric_tsne_loss",
    "ParametricTSNELoss",
]

# Guard inside the KL logarithm: log((p + eps) / (q + eps)).
KL_EPSILON = 1e-12
# Floor of the row normaliser of the conditional affinities.
_SUM_EPSILON = 1e-30


def _check_perplexity(perplexity, n=None):
    perplexity = validation.number("perplexity", perplexity, minimum=1, exclusive_minimum=True)
    if n is not None and perplexity >= n:
        raise ValueError(
            f"perplexity must be smaller than the batch size ({n}), got {perplexity!r}"
        )
    return perplexity


def _check_dof(dof):
    return validation.number("dof", dof, minimum=0, exclusive_minimum=True)


def _squared_distances(x):
    """Pairwise squared Euclidean distances of the rows of `x` (n, d), clipped at 0."""
    sq = ops.sum(ops.square(x), axis=-1)
    d = sq[:, None] + sq[None, :] - 2.0 * ops.matmul(x, ops.transpose(x))
    return ops.maximum(d, 0.0)


def _row_stats(d, beta, off_diag):
    """Conditional affinities and entropies of each row at precisions `beta` (n,)."""
    w = ops.exp(-beta[:, None] * d) * off_diag
    total = ops.maximum(ops.sum(w, axis=1), _SUM_EPSILON)
    p = w / total[:, None]
    # H_i = log(sum_j w_ij) + beta_i * sum_j p_ij d_ij (natural log).
    entropy = ops.log(total) + beta * ops.sum(p * d, axis=1)
    return p, entropy


def conditional_affinities(x, perplexity=30.0, tol=1e-5, max_iter=64):
    """Gaussian conditional affinities `P_{j|i}` at a given perplexity.

    `P_{j|i} = exp(-beta_i d_ij) / sum_{k != i} exp(-beta_i d_ik)` with `d_ij` the
    squared distance and `P_{i|i} = 0`. Each row's precision `beta_i` is found by a
    vectorised binary search of `max_iter` fixed steps (doubling or halving while the
    bracket is open, bisection once closed; rows within `tol` of the target stop moving),
    so that the entropy `H_i = -sum_j P_{j|i} log P_{j|i}` equals `log(perplexity)`.
    Each row's minimum off-diagonal distance is subtracted first (it cancels in `P_{j|i}`)
    for numerical stability. No gradient flows to `x`.

    Args:
        x: (n, d) high-dimensional batch.
        perplexity: Target perplexity `exp(H_i)`, 1 < perplexity < n.
        tol: Tolerance on the entropy (nats) at which a row stops searching.
        max_iter: Number of search steps (fixed, so it traces in graph mode).

    Returns:
        (n, n) float32 tensor whose rows sum to 1 and whose diagonal is zero.

    Example:

    >>> p = conditional_affinities(np.random.rand(50, 10).astype("float32"), 10.0)
    >>> p.shape
    (50, 50)
    """
    n = x.shape[0]
    perplexity = _check_perplexity(perplexity, n)
    max_iter = validation.integer("max_iter", max_iter, minimum=1)
    x = ops.stop_gradient(ops.cast(x, "float32"))
    d = _squared_distances(x)
    size = ops.shape(d)[0]
    eye = ops.eye(size, dtype="float32")
    off_diag = 1.0 - eye
    # Subtract the smallest off-diagonal distance of each row.
    row_min = ops.min(d + eye * 3.0e38, axis=1)
    d = ops.maximum(d - row_min[:, None], 0.0) * off_diag
    target = math.log(perplexity)

    # Start from the inverse mean shifted distance: the right scale for most rows.
    mean_d = ops.sum(d, axis=1) / ops.maximum(ops.cast(size, "float32") - 1.0, 1.0)
    beta0 = 1.0 / ops.maximum(mean_d, 1e-12)
    lo0 = ops.zeros_like(beta0)  # beta > 0: halving is the bisection with lo = 0.
    hi0 = ops.full_like(beta0, float("inf"))

    def step(_, state):
        beta, lo, hi = state
        _, entropy = _row_stats(d, beta, off_diag)
        diff = entropy - target
        done = ops.abs(diff) < tol
        too_flat = diff > 0  # entropy too high: increase the precision.
        moving = ops.logical_not(done)
        new_lo = ops.where(ops.logical_and(too_flat, moving), beta, lo)
        new_hi = ops.where(ops.logical_and(ops.logical_not(too_flat), moving), beta, hi)
        up = ops.where(ops.isinf(new_hi), beta * 2.0, (beta + new_hi) / 2.0)
        down = (beta + new_lo) / 2.0
        new_beta = ops.where(done, beta, ops.where(too_flat, up, down))
        return new_beta, new_lo, new_hi

    beta, _, _ = ops.fori_loop(0, int(max_iter), step, (beta0, lo0, hi0))
    p, _ = _row_stats(d, beta, off_diag)
    return ops.stop_gradient(p)


def tsne_affinities(x, perplexity=30.0, tol=1e-5, max_iter=64):
    """Joint t-SNE affinities `P` of a high-dimensional batch.

    `p_ij = (P_{j|i} + P_{i|j}) / (2n)` with `P_{j|i}` from `conditional_affinities`, so
    `P` is symmetric, has a zero diagonal and sums to 1. No gradient flows to `x`.

    Args:
        x: (n, d) high-dimensional batch.
        perplexity: Target perplexity of each conditional row, 1 < perplexity < n.
        tol: Tolerance on each row's entropy (nats).
        max_iter: Number of binary-search steps.

    Returns:
        (n, n) float32 tensor.

    Example:

    >>> p = tsne_affinities(np.random.rand(100, 784).astype("float32"), perplexity=30.0)
    >>> p.shape  # symmetric, zero diagonal, sums to 1
    (100, 100)

    Reference:
        van der Maaten, AISTATS 2009, section 3; van der Maaten & Hinton, JMLR 2008.
    """
    p_cond = conditional_affinities(x, perplexity, tol=tol, max_iter=max_iter)
    n = ops.cast(ops.shape(p_cond)[0], "float32")
    return ops.stop_gradient((p_cond + ops.transpose(p_cond)) / (2.0 * n))


def tsne_kl(p, y, dof=1.0):
    """KL divergence `KL(P || Q)` between joint affinities `P` and a map `y`.

    `q_ij = (1 + ||y_i - y_j||^2 / dof)^(-(dof + 1) / 2) / Z` for `i != j`, `q_ii = 0`,
    with `Z` the sum of the kernel over all `i != j`; the loss is
    `sum_ij p_ij log((p_ij + eps) / (q_ij + eps))` with `eps = 1e-12`.

    `dof` is the Student-t's degrees of freedom `alpha`. `dof = 1` is the Cauchy kernel
    of classic t-SNE (right for a 2-D map); van der Maaten 2009 suggests
    `alpha = k - 1` for a k-dimensional map, or learning it.

    Args:
        p: (n, n) joint affinities (e.g. from `tsne_affinities`).
        y: (n, k) low-dimensional map of the same batch.
        dof: Degrees of freedom of the Student-t kernel, > 0.

    Returns:
        Scalar float32 tensor.

    Example:

    >>> p = tsne_affinities(x, perplexity=30.0)
    >>> loss = tsne_kl(p, encoder(x), dof=1.0)
    """
    dof = _check_dof(dof)
    p = ops.cast(p, "float32")
    y = ops.cast(y, "float32")
    # Differences rather than the Gram expansion: exact for small distances (k is small).
    diff = y[:, None, :] - y[None, :, :]
    d = ops.sum(ops.square(diff), axis=-1)
    kernel = ops.power(1.0 + d / dof, -(dof + 1.0) / 2.0)
    kernel = kernel * (1.0 - ops.eye(ops.shape(y)[0], dtype="float32"))
    q = kernel / ops.sum(kernel)
    return ops.sum(p * ops.log((p + KL_EPSILON) / (q + KL_EPSILON)))


def parametric_tsne_loss(x, y, perplexity=30.0, dof=1.0):
    """Parametric t-SNE loss of a batch: `tsne_kl(tsne_affinities(x, perplexity), y, dof)`.

    Args:
        x: (n, d) high-dimensional batch (no gradient flows to it).
        y: (n, k) map of the batch, e.g. `encoder(x)`.
        perplexity: Target perplexity, 1 < perplexity < n.
        dof: Degrees of freedom of the Student-t kernel, > 0.

    Returns:
        Scalar float32 tensor.

    Example:

    >>> loss = parametric_tsne_loss(x, encoder(x), perplexity=30.0)

    Reference:
        van der Maaten, "Learning a Parametric Embedding by Preserving Local Structure",
        AISTATS 2009.
    """
    return tsne_kl(tsne_affinities(x, perplexity), y, dof)


@keras.saving.register_keras_serializable(package="keras_moe")
class ParametricTSNELoss:
    """Weighted parametric t-SNE loss: `weight * KL(P(x) || Q(y))`.

    Args:
        perplexity: Target perplexity of the input affinities, > 1 (and smaller than the
            batch size at call time); 30 in van der Maaten 2009.
        dof: Degrees of freedom of the Student-t kernel in the map, > 0 (1 for a 2-D
            map; `k - 1` for a k-dimensional one).
        weight: Multiplier of the loss, finite and >= 0.

    Example:

    >>> loss_fn = ParametricTSNELoss(perplexity=30.0)
    >>> loss = loss_fn(x, encoder(x))

    Reference:
        van der Maaten, "Learning a Parametric Embedding by Preserving Local Structure",
        AISTATS 2009.
    """

    def __init__(self, perplexity=30.0, dof=1.0, weight=1.0):
        self.perplexity = _check_perplexity(perplexity)
        self.dof = _check_dof(dof)
        self.weight = validation.non_negative_float("weight", weight)

    def __call__(self, x, y):
        return self.weight * parametric_tsne_loss(x, y, self.perplexity, self.dof)

    def get_config(self):
        return {"perplexity": self.perplexity, "dof": self.dof, "weight": self.weight}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

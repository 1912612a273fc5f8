"""Operations that `keras.ops` has, written where a backend needs them written otherwise.

- `top_k`: `keras.ops.top_k`, except on JAX, where `jax.lax.top_k` is one op that XLA's
  SPMD partitioner does not split along the batch: under `keras_moe.expert_parallel`
  every device would gather the whole batch's router logits to choose each token's
  experts. There the k largest are taken by k rounds of max-and-mask, which partitions
  along the tokens like any elementwise op (cheap for the small k of routing).
"""

import keras
from keras import ops

__all__ = ["top_k"]

# Above this k, a sort is cheaper than rounds of max-and-mask.
_MAX_ROUNDS = 8


def top_k(x, k):
    """The k largest entries along the last axis, largest first, and their indices.

    Ties go to the lower index, as with `keras.ops.top_k`; the values' gradient flows
    to the chosen entries of `x`.

    Args:
        x: Float tensor (..., n).
        k: Static int, 1 <= k <= n.

    Returns:
        `(values, indices)`, each (..., k); indices int32.
    """
    if keras.backend.backend() != "jax":
        values, indices = ops.top_k(x, k)
        return values, ops.cast(indices, "int32")
    import jax
    import jax.numpy as jnp

    if k > _MAX_ROUNDS:
        indices = jnp.argsort(-x, axis=-1, stable=True)[..., :k].astype("int32")
        return jnp.take_along_axis(x, indices, axis=-1), indices
    columns = jnp.arange(x.shape[-1])
    taken = None
    values, indices = [], []
    for _ in range(k):
        if taken is None:
            index = jnp.argmax(x, axis=-1)
        else:
            candidates = jnp.where(taken, -jnp.inf, x)
            index = jnp.argmax(candidates, axis=-1)
            # Where only -inf is left, argmax may point at a taken entry: take the first
            # entry not taken yet instead.
            exhausted = jnp.isneginf(jnp.max(candidates, axis=-1))
            index = jnp.where(exhausted, jnp.argmax(~taken, axis=-1), index)
        values.append(jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0])
        indices.append(index.astype("int32"))
        chosen = columns == index[..., None]
        taken = chosen if taken is None else taken | chosen
    return jnp.stack(values, axis=-1), jax.lax.stop_gradient(jnp.stack(indices, axis=-1))

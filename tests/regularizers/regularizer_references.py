"""Float64 numpy references of the regularizer formulas, and gate inputs to test them on.

Shared by the tests under tests/regularizers/ (imported as `from regularizer_references
import ...`: pytest's prepend import mode puts this folder on `sys.path`). Each reference
is written out from the formula in the library's docstring, independently of
`keras_moe.regularizers`.
"""

import math

import numpy as np
import pytest

from testing_utils import BACKEND

# Float32 tolerances of the library's values against the float64 references.
RTOL = 1e-5
ATOL = 1e-6

requires_jax = pytest.mark.skipif(
    BACKEND != "jax", reason="the JAX counterpart of a TensorFlow-only test"
)


# ----------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------


def np_cv_squared(x):
    """`Var(x) / (Mean(x)^2 + 1e-10)` with the population variance."""
    x = np.asarray(x, np.float64)
    mean = x.mean()
    variance = ((x - mean) ** 2).mean()  # population variance
    return variance / (mean**2 + 1e-10)


def np_phi(z):
    """Standard normal CDF."""
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z, np.float64) / math.sqrt(2.0)))


def np_noisy_top_k_load(clean, noisy, stddev, k):
    """Shazeer's smooth load, token by token and expert by expert."""
    clean = np.asarray(clean, np.float64)
    noisy = np.asarray(noisy, np.float64)
    stddev = np.broadcast_to(np.asarray(stddev, np.float64), clean.shape)
    tokens, experts = clean.shape
    load = np.zeros(experts)
    for t in range(tokens):
        descending = np.sort(noisy[t])[::-1]
        for i in range(experts):
            in_top_k = noisy[t, i] > descending[k]
            threshold = descending[k] if in_top_k else descending[k - 1]
            diff = clean[t, i] - threshold
            if stddev[t, i] > 0:
                load[i] += np_phi(diff / stddev[t, i])
            else:
                load[i] += 0.5 * (1.0 + np.sign(diff))
    return load


def np_entropy(p, axis=-1):
    """Shannon entropy (nats) along `axis`, with 0 log 0 = 0."""
    p = np.asarray(p, np.float64)
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=axis)


def np_switch(probs, mask):
    """Switch load balance `E * sum_e f_e P_e`, f over routed tokens only."""
    probs = np.asarray(probs, np.float64)
    mask = np.asarray(mask, np.float64)
    tokens, experts = probs.shape
    fraction = np.zeros(experts)
    routed = 0
    for t in range(tokens):
        k_t = mask[t].sum()
        if k_t > 0:
            routed += 1
            fraction += mask[t] / k_t
    fraction /= max(routed, 1)
    return experts * np.sum(fraction * probs.mean(axis=0))


def np_sequence_balance(probs, mask, tokens_per_sequence):
    """DeepSeek-V3's sequence-wise balance, sequence by sequence: the mean over sequences
    of `sum_e (E / (k T)) * count_e * mean_t probs[t, e]`, k the experts per token."""
    probs = np.asarray(probs, np.float64)
    mask = np.asarray(mask, np.float64)
    experts = probs.shape[-1]
    terms = []
    for start in range(0, len(probs), tokens_per_sequence):
        p = probs[start:start + tokens_per_sequence]
        m = mask[start:start + tokens_per_sequence]
        k = m.sum(axis=-1).mean()
        f = experts / (k * len(p)) * m.sum(axis=0)
        terms.append(np.sum(f * p.mean(axis=0)))
    return float(np.mean(terms))


def np_router_z(logits):
    """Mean over tokens of `logsumexp(logits)^2`."""
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    return np.mean(lse**2)


def np_batch_entropy(gates):
    """Minus the entropy of the mean gate."""
    return -np_entropy(np.asarray(gates, np.float64).mean(axis=0))


def np_sample_entropy(gates):
    """Mean over tokens of each token's gate entropy."""
    return np_entropy(gates, axis=-1).mean()


def np_batch_variance(gates):
    """Population variance over experts of the mean gate."""
    return np.asarray(gates, np.float64).mean(axis=0).var()


def np_sample_variance(gates):
    """Minus the mean over tokens of each token's population variance over experts."""
    return -np.asarray(gates, np.float64).var(axis=-1).mean()


def np_l1(gates):
    """Mean over examples of each example's mean absolute gate."""
    gates = np.asarray(gates, np.float64)
    return np.abs(gates).reshape(gates.shape[0], -1).mean(axis=-1).mean()


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------


def softmax(x):
    """Row-wise softmax in numpy."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def random_gates(seed, tokens=16, experts=5):
    """Dense softmax gates, float32 (tokens, experts)."""
    rng = np.random.default_rng(seed)
    return softmax(2.0 * rng.normal(size=(tokens, experts))).astype(np.float32)


def top_k_gates(seed, tokens=16, experts=6, k=2):
    """Gates, clean logits, probs and dispatch mask of a plain top-k softmax router."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, experts)).astype(np.float32)
    top = np.argsort(-logits, axis=-1)[:, :k]
    mask = np.zeros_like(logits)
    np.put_along_axis(mask, top, 1.0, axis=-1)
    masked = np.where(mask > 0, logits, -np.inf)
    gates = softmax(masked).astype(np.float32)
    return {
        "gates": gates,
        "logits": logits,
        "probs": softmax(logits).astype(np.float32),
        "dispatch_mask": mask,
        "load": mask.sum(axis=0),
    }


def noisy_inputs(seed, tokens=12, experts=6):
    """Clean logits, noisy logits and positive noise stddevs of a noisy top-k gate."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(tokens, experts)).astype(np.float32)
    stddev = rng.uniform(0.2, 1.5, size=(tokens, experts)).astype(np.float32)
    noisy = (clean + stddev * rng.normal(size=(tokens, experts))).astype(np.float32)
    return clean, noisy, stddev

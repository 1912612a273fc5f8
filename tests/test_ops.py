"""`keras_moe.ops.top_k` against numpy, on TensorFlow and JAX (where it avoids lax.top_k)."""

import keras
import numpy as np
import pytest

from keras_moe import ops as moe_ops
from testing_utils import gradients, to_numpy

pytestmark = pytest.mark.multi_backend


def _reference(x, k):
    """k largest per row, largest first, ties to the lower index (a stable sort)."""
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, order, axis=-1), order


@pytest.mark.parametrize("k", [1, 2, 3, 9])  # 9 takes JAX's sort path
def test_top_k_matches_a_stable_sort(k):
    rng = np.random.default_rng(k)
    x = rng.integers(-3, 4, size=(50, 12)).astype("float32")  # many ties
    x[0, :] = -np.inf
    x[1, 5:] = -np.inf  # fewer finite entries than k for the larger k
    values, indices = to_numpy(moe_ops.top_k(keras.ops.convert_to_tensor(x), k))
    want_values, want_indices = _reference(x, k)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(indices, want_indices)
    assert indices.dtype == np.int32
    assert all(len(set(row)) == k for row in indices)  # never the same entry twice


def test_top_k_gradient_reaches_the_chosen_entries_only():
    x = np.random.default_rng(1).normal(size=(6, 5)).astype("float32")
    weights = np.array([2.0, -1.0], "float32")

    def objective(values):
        return keras.ops.sum(moe_ops.top_k(values, 2)[0] * weights)

    _, (grad,), _ = gradients(objective, [x])
    _, chosen = _reference(x, 2)
    want = np.zeros_like(x)
    np.put_along_axis(want, chosen, weights[None, :], axis=-1)
    np.testing.assert_allclose(grad, want)

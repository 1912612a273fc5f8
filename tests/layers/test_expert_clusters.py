"""Expert clusters wired densely within and sparsely between (paper 000), on TF and JAX."""

import numpy as np
import pytest

from keras_moe.layers.expert_clusters import (
    ExpertClusterDense,
    ExpertClusters,
    block_ids,
    cluster_mask,
)
from testing_utils import run_layer_test, to_numpy

pytestmark = pytest.mark.multi_backend


def _rng(seed=0):
    return np.random.RandomState(seed)


def test_cluster_mask_densities():
    mask = cluster_mask(120, 80, 4, local_density=0.5, remote_density=0.05, seed=0)
    rows, cols = block_ids(120, 4), block_ids(80, 4)
    assert set(np.unique(mask)) == {0.0, 1.0}
    for a in range(4):
        for b in range(4):
            block = mask[np.ix_(rows == a, cols == b)]
            expected = 0.5 if a == b else 0.05
            assert abs(block.mean() - expected) <= 0.5 / block.size
    np.testing.assert_array_equal(
        mask, cluster_mask(120, 80, 4, local_density=0.5, remote_density=0.05, seed=0)
    )
    assert not np.array_equal(mask, cluster_mask(120, 80, 4, 0.5, 0.05, seed=1))
    np.testing.assert_array_equal(block_ids(10, 3), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_expert_cluster_dense_uses_block_mask():
    layer = ExpertClusterDense(64, num_experts=4, local_density=0.75, remote_density=0.1, seed=3)
    x = _rng(5).randn(6, 32).astype("float32")
    y = np.asarray(layer(x))
    np.testing.assert_array_equal(to_numpy(layer.mask), cluster_mask(32, 64, 4, 0.75, 0.1, seed=3))
    np.testing.assert_allclose(
        y, x @ (to_numpy(layer.kernel) * to_numpy(layer.mask)) + to_numpy(layer.bias),
        rtol=1e-5, atol=1e-5,
    )
    config = layer.get_config()
    assert "density" not in config and config["remote_density"] == 0.1
    clone = ExpertClusterDense.from_config(config)
    clone.build((None, 32))
    np.testing.assert_array_equal(to_numpy(clone.mask), to_numpy(layer.mask))


def test_expert_clusters_match_numpy_and_count_weights():
    rng = _rng(6)
    x = rng.randn(10, 9).astype("float32")
    gates = np.zeros((10, 3), "float32")
    gates[np.arange(10), np.arange(10) % 3] = 0.7
    gates[np.arange(10), (np.arange(10) + 1) % 3] = 0.3
    gates[0] = [1.0, 0.0, 0.0]
    layer = ExpertClusters(3, 4, input_density=0.6, local_density=0.8,
                           remote_density=0.2, seed=2)
    out = np.asarray(layer(x, gates))
    l1, l2 = layer.input_layer, layer.cluster_layer
    g = np.repeat(gates, 4, axis=1)
    h = np.maximum(x @ (to_numpy(l1.kernel) * to_numpy(l1.mask)) + to_numpy(l1.bias), 0) * g
    ref = np.maximum(h @ (to_numpy(l2.kernel) * to_numpy(l2.mask)) + to_numpy(l2.bias), 0) * g
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Used connections: brute force over each example's active units.
    counts = layer.used_weight_count(gates > 0)
    for i in range(10):
        units = g[i] > 0
        expected = to_numpy(l1.mask)[:, units].sum() + to_numpy(l2.mask)[np.ix_(units, units)].sum()
        assert counts[i] == expected
    assert counts[0] < counts[1]




def test_bad_arguments_raise_value_errors_naming_them():
    for name in ("local_density", "remote_density", "input_density"):
        for bad in (0.0, 1.5, -0.1):
            with pytest.raises(ValueError, match=name):
                ExpertClusters(4, 2, **{name: bad})
    with pytest.raises(ValueError, match="remote_density"):
        cluster_mask(8, 8, 2, local_density=0.2, remote_density=0.5)
    with pytest.raises(ValueError, match="local_density"):
        ExpertClusterDense(8, 2, local_density=0.0)
    with pytest.raises(ValueError, match="num_experts"):
        ExpertClusterDense(4, num_experts=5)


def test_expert_cluster_dense_layer_contract(tmp_path):
    x = _rng(11).randn(5, 12).astype("float32")
    run_layer_test(
        ExpertClusterDense, dict(units=8, num_experts=2, seed=1), x,
        expected_output_shape=(5, 8), expected_num_trainable_weights=2,
        expected_num_non_trainable_weights=1, tmp_path=tmp_path,
    )

"""Gating analysis: activation rates, routing information, grids, top examples, figures."""

import math
import os

import numpy as np
import pytest
from sklearn import metrics

from keras_moe import data
from keras_moe.analysis import gating


def random_gates(n, experts, seed):
    return np.random.default_rng(seed).dirichlet(np.ones(experts) * 0.7, size=n)


def test_activation_rates_match_a_loop():
    gates = random_gates(200, 4, 0)
    groups = np.random.default_rng(1).integers(0, 6, 200)
    groups[groups == 4] = 5  # group 4 stays empty
    rates = gating.activation_rates(gates, groups, num_groups=7)
    assert rates.shape == (7, 4)
    for g in range(7):
        members = gates[groups == g]
        if len(members):
            np.testing.assert_allclose(rates[g], members.mean(0), rtol=1e-12)
        else:
            assert np.isnan(rates[g]).all()
    # Rows of a softmax gate sum to 1.
    np.testing.assert_allclose(np.nansum(rates, 1)[[0, 1, 2, 3, 5]], 1.0)
    with pytest.raises(ValueError, match="num_groups"):
        gating.activation_rates(gates, groups, num_groups=3)
    with pytest.raises(ValueError, match="groups"):
        gating.activation_rates(gates, groups[:10])
    with pytest.raises(ValueError, match="gates"):
        gating.activation_rates(gates[:, 0], groups)


def _entropy(labels):
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return -(p * np.log(p)).sum()


@pytest.mark.parametrize("normalization", ["arithmetic", "geometric", "min", "max"])
def test_routing_information_matches_sklearn(normalization):
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 9, 500)
    logits = rng.normal(size=(500, 4))
    logits[np.arange(500), groups % 4] += 1.5  # partial dependence
    gates = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = metrics.normalized_mutual_info_score(
        groups, gates.argmax(1), average_method=normalization)
    got = gating.routing_mutual_information(gates, groups, normalization=normalization)
    assert 0.05 < got < 0.95
    assert got == pytest.approx(expected, rel=1e-10)


def test_routing_information_expert_and_group_normalisation():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 81, 2000)
    experts = (groups // 21) % 4  # expert determined by the group ("where")
    gates = np.eye(4)[experts] * 0.7 + 0.1
    mi = metrics.mutual_info_score(groups, experts)
    assert gating.routing_mutual_information(gates, groups) == pytest.approx(1.0)
    assert gating.routing_mutual_information(gates, groups, normalization="group") == (
        pytest.approx(mi / _entropy(groups)))
    # The arithmetic NMI is far below 1 for the same perfect dependence: 81 groups.
    assert gating.routing_mutual_information(gates, groups, normalization="arithmetic") < 0.5

    noisy = experts.copy()
    flip = rng.random(2000) < 0.3
    noisy[flip] = rng.integers(0, 4, flip.sum())
    value = gating.routing_mutual_information(np.eye(4)[noisy], groups)
    assert value == pytest.approx(metrics.mutual_info_score(groups, noisy) / _entropy(noisy))

    # Independent: each group spreads evenly over the experts.
    groups = np.repeat(np.arange(10), 8)
    experts = np.tile(np.arange(4), 20)
    independent = gating.routing_mutual_information(np.eye(4)[experts], groups)
    assert independent == pytest.approx(0.0, abs=1e-12)
    # One expert takes everything: 0 (a constant carries no information).
    assert gating.routing_mutual_information(np.tile([0.1, 0.9], (80, 1)), groups) == 0.0
    with pytest.raises(ValueError, match="normalization"):
        gating.routing_mutual_information(np.eye(4)[experts], groups, normalization="sqrt")


def test_translation_grids_match_a_loop_and_offset_index():
    rng = np.random.default_rng(4)
    offsets = rng.integers(-4, 5, size=(3000, 2))
    gates = random_gates(3000, 3, 5)
    grids = gating.translation_grids(gates, offsets)
    assert grids.shape == (3, 9, 9)
    for dx in range(-4, 5):
        for dy in range(-4, 5):
            sel = (offsets[:, 0] == dx) & (offsets[:, 1] == dy)
            np.testing.assert_allclose(grids[:, dy + 4, dx + 4], gates[sel].mean(0), rtol=1e-12)
    cells = data.offset_index(offsets, 4)
    np.testing.assert_allclose(gating.translation_grids(gates, cells), grids)
    with pytest.raises(ValueError, match="max_shift"):
        gating.translation_grids(gates, offsets, max_shift=3)


def test_joint_assignment_matches_a_loop():
    g1, g2 = random_gates(50, 3, 6), random_gates(50, 5, 7)
    joint = gating.joint_assignment(g1, g2)
    expected = np.array([[np.mean(g1[:, i] * g2[:, j]) for j in range(5)] for i in range(3)])
    np.testing.assert_allclose(joint, expected, rtol=1e-12)
    np.testing.assert_allclose(joint.sum(), 1.0)
    rows = gating.joint_assignment(g1, g2, normalize_rows=True)
    np.testing.assert_allclose(rows, expected / expected.sum(1, keepdims=True))


def test_top_examples_per_combination_matches_brute_force():
    g1, g2 = random_gates(60, 3, 8), random_gates(60, 4, 9)
    g1[10] = g1[11]  # a tie: the lower index comes first
    g2[10] = g2[11]
    top = gating.top_examples_per_combination(g1, g2, k=9)
    assert top.shape == (3, 4, 9) and top.dtype == np.int64
    for i in range(3):
        for j in range(4):
            values = [(-(g1[x, i] * g2[x, j]), x) for x in range(60)]
            expected = [x for _, x in sorted(values)[:9]]
            assert list(top[i, j]) == expected
    with pytest.raises(ValueError, match="k must be"):
        gating.top_examples_per_combination(g1, g2, k=61)
    with pytest.raises(ValueError, match="same number"):
        gating.top_examples_per_combination(g1, g2[:5])


def _png_ok(path):
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(10)
    g1, g2 = random_gates(120, 4, 11), random_gates(120, 2, 12)
    labels = rng.integers(0, 10, 120)
    offsets = rng.integers(-4, 5, (120, 2))

    fig = gating.plot_gate_heatmap(gating.activation_rates(g1, labels, 10),
                                   title="by class", group_name="class")
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(image, gating.activation_rates(g1, labels, 10).T)
    fig.savefig(os.path.join(tmp_path, "class.png"), dpi=50)
    _png_ok(os.path.join(tmp_path, "class.png"))

    grids = gating.translation_grids(g1, offsets)
    fig = gating.plot_translation_grids(grids, title="by translation")
    assert sum(len(ax.images) for ax in fig.axes) == 4
    fig.savefig(os.path.join(tmp_path, "translation.png"), dpi=50)
    _png_ok(os.path.join(tmp_path, "translation.png"))

    images = rng.integers(0, 255, (120, 36, 36, 1)).astype(np.uint8)
    top = gating.top_examples_per_combination(g1, g2, k=9)
    fig = gating.plot_top_examples(images, top)
    assert len(fig.axes) == 8
    mosaic = fig.axes[0].images[0].get_array()
    assert mosaic.shape == (3 * 37 - 1, 3 * 37 - 1)
    np.testing.assert_array_equal(mosaic[:36, :36], images[top[0, 0, 0], :, :, 0])
    np.testing.assert_array_equal(mosaic[37:73, 74:110], images[top[0, 0, 5], :, :, 0])
    fig.savefig(os.path.join(tmp_path, "top.png"), dpi=50)
    _png_ok(os.path.join(tmp_path, "top.png"))


def test_figures_do_not_touch_the_pyplot_backend():
    import matplotlib

    before = matplotlib.get_backend()
    gating.plot_gate_heatmap(np.ones((2, 3)))
    assert matplotlib.get_backend() == before
    assert math.isfinite(gating.agg_figure(2, 2).get_figwidth())

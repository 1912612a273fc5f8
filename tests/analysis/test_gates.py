"""`keras_moe.analysis.gates`: the one gate reader."""

import keras
import numpy as np
import pytest

from keras_moe import zoo
from keras_moe.analysis import gates


def _deepmoe():
    return zoo.deepmoe_resnet_cifar(depth=8, width_multiplier=0.25, input_shape=(16, 16, 3),
                                    embedding_widths=(4, 4, 4, 4))


def test_deepmoe_gates_are_read_at_the_heads_and_at_the_gated_convolutions():
    model = _deepmoe()
    x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype("float32")
    heads = gates.gate_tensors(model)  # kinds "moe" and "gate": the ReLUGate heads
    convs = gates.gate_values(model, x, kinds=("gated_conv",))
    assert len(heads) == len(convs) == model.num_gated_layers == 6
    assert all(name.endswith("_gate") for name in heads)
    assert [c + "_gate" for c in convs] == list(heads)
    network = model.network(x, training=False)["gates"]
    for got, want in zip(convs.values(), network):
        np.testing.assert_allclose(got, keras.ops.convert_to_numpy(want), atol=1e-6)
    per_layer, overall = gates.densities(convs)
    assert overall == pytest.approx(np.mean([(g > 0).mean() for g in convs.values()]))
    assert gates.gate_density(model, x, overall=True) == pytest.approx(overall)
    assert gates.gate_model(model) is gates.gate_model(model)  # built once per model


def test_statistics_follow_the_dispatch_mask():
    model = zoo.sparse_moe_classifier(num_experts=4, top_k=2, units=8, input_shape=(4, 4, 1))
    x = np.random.default_rng(1).uniform(size=(50, 4, 4, 1)).astype("float32")
    stats = gates.gate_statistics(model, x)["moe_0"]
    values = gates.gate_values(model, x, kinds=("moe",), outputs="all")["moe_0"]
    np.testing.assert_array_equal(stats["counts"], values["dispatch_mask"].sum(0))
    assert stats["counts"].sum() == 100 and stats["share"].sum() == pytest.approx(1.0)
    assert stats["gates"].shape == (50, 4) and ((stats["gates"] > 0).sum(1) == 2).all()


def test_one_named_site_and_layers_out_of_reach():
    model = zoo.two_domain_moe(gate="conv", expert_filters=2, expert_units=4, gate_filters=2,
                               gate_units=3)
    x = np.zeros((2, 32, 32, 1), "float32")
    assert gates.gate_model(model, "mixture").predict(x, verbose=0).shape == (2, 2)
    with pytest.raises(ValueError, match="no gating layer 'nope'.*mixture"):
        gates.gate_model(model, "nope")
    inner = zoo.sparse_moe_classifier(num_experts=2, top_k=1, units=4, input_shape=(4, 4, 1))
    outer_in = keras.Input((4, 4, 1))
    outer = keras.Model(outer_in, inner(outer_in))
    assert [layer.name for layer in gates.unreachable_moe_layers(outer)] == ["moe_0"]
    assert gates.gate_statistics(outer, np.zeros((2, 4, 4, 1), "float32")) == {}

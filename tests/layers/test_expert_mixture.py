"""ExpertMixture (paper 002): whole expert sub-models mixed by a gate, on TF and JAX."""

import keras
import numpy as np
import pytest

from keras_moe import regularizers
from keras_moe.layers.expert_mixture import ExpertMixture
from testing_utils import run_layer_test, to_numpy

pytestmark = pytest.mark.multi_backend


def _experts(units=3, count=2):
    return [keras.layers.Dense(units) for _ in range(count)]


def _softmax_gate(count=2):
    return keras.Sequential([keras.layers.Dense(count, activation="softmax")])


def test_output_is_the_gate_weighted_sum_of_expert_logits():
    rng = np.random.default_rng(1)
    x = rng.random((6, 5)).astype("float32")
    for output in ("logits", "probabilities"):
        layer = ExpertMixture(_experts(), gate=_softmax_gate(), output=output, return_gates=True)
        y, gates = to_numpy(layer(x))
        logits = sum(
            gates[:, i : i + 1] * to_numpy(expert(x)) for i, expert in enumerate(layer.experts)
        )
        want = logits if output == "logits" else np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_oracle_gate_is_the_one_hot_domain():
    x = np.random.default_rng(2).random((4, 5)).astype("float32")
    domain = np.array([0, 1, 1, 0])
    layer = ExpertMixture(_experts(), gate="oracle", return_gates=True)
    _, gates = layer([x, domain])
    np.testing.assert_array_equal(to_numpy(gates), np.eye(2, dtype="float32")[domain])


def test_layer_contract(tmp_path):
    x = np.random.default_rng(3).random((4, 5)).astype("float32")
    run_layer_test(
        ExpertMixture,
        dict(experts=_experts(), gate=_softmax_gate(), balance_loss="entropy"),
        x, expected_output_shape=(4, 3), expected_num_losses=1, tmp_path=tmp_path,
    )


def test_balance_loss_is_the_argument_of_moe_dense_and_gate_loss_its_former_name():
    layer = ExpertMixture(_experts(), gate="oracle", balance_loss="variance")
    assert isinstance(layer.balance_loss[0], regularizers.VarianceGateLoss)
    assert "balance_loss" in layer.get_config() and "gate_loss" not in layer.get_config()
    with pytest.warns(DeprecationWarning, match="balance_loss"):
        old = ExpertMixture(_experts(), gate="oracle", gate_loss="entropy")
    assert isinstance(old.balance_loss[0], regularizers.EntropyGateLoss)
    with pytest.raises(ValueError, match="balance_loss"):
        ExpertMixture(_experts(), gate="oracle", gate_loss="entropy", balance_loss="entropy")
    with pytest.raises(ValueError, match="LoadLoss"):  # its load is a hard count
        ExpertMixture(_experts(), gate=_softmax_gate(), balance_loss="load")


def test_config_round_trip_and_errors():
    experts = _experts()
    layer = ExpertMixture(experts, gate=_softmax_gate(), balance_loss="entropy",
                          output="probabilities")
    x = np.random.default_rng(0).random((4, 5)).astype("float32")
    out = layer(x)
    clone = ExpertMixture.from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(out), rtol=1e-6)
    with pytest.raises(ValueError, match="experts"):
        ExpertMixture([], gate="oracle")
    with pytest.raises(ValueError, match="gate"):
        ExpertMixture(experts, gate="softmax")
    with pytest.raises(ValueError, match="output"):
        ExpertMixture(experts, gate="oracle", output="probs")
    with pytest.raises(ValueError, match="balance_loss"):
        ExpertMixture(experts, gate="oracle", balance_loss="nope")
    bad_gate = keras.Sequential([keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match="one probability per expert"):
        ExpertMixture(_experts(), gate=bad_gate)(x)
    with pytest.raises(ValueError, match="same width"):
        ExpertMixture([keras.layers.Dense(3), keras.layers.Dense(4)], gate="oracle")(
            [x, np.zeros(4, "int32")])

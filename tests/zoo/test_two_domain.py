"""Paper 002: ExpertMixture and the two_domain_moe builder (tiny sizes, one full build)."""

import numpy as np
import pytest

import keras

from keras_moe.layers.expert_mixture import ExpertMixture
from keras_moe.zoo import registry
from keras_moe.zoo import two_domain
from keras_moe.analysis import activation_rates
from keras_moe.analysis.gates import gate_model
from keras_moe.zoo.two_domain import two_domain_moe

TINY = dict(input_shape=(8, 8, 1), num_classes=6, expert_filters=3, expert_units=5,
            gate_filters=2, gate_units=4)


def _batch(n=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    domain = (np.arange(n) % 2).astype("int32")
    y = rng.integers(0, 6, n)
    return x, domain, y


def _np_entropy(p):
    return -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=-1)


def _np_gate_loss(kind, gates, alpha, beta):
    g = np.asarray(gates, np.float64)
    if kind == "entropy":
        return alpha * -_np_entropy(g.mean(0)) + beta * _np_entropy(g).mean()
    return alpha * np.var(g.mean(0)) - beta * np.var(g, axis=1).mean()


def test_registered_with_description():
    assert "two_domain_moe" in registry.list_models()
    assert registry.describe("two_domain_moe").startswith("Paper 002's two-domain MoE")


@pytest.mark.parametrize("gate", ["conv", "dense"])
def test_shapes_and_gates_on_simplex(gate):
    model = two_domain_moe(gate=gate, **TINY)
    x, _, _ = _batch()
    logits = model(x)
    gates = np.asarray(gate_model(model, "mixture")(x))
    assert logits.shape == (12, 6) and gates.shape == (12, 2)
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    assert [t.name for t in model.inputs] == ["image"]


def test_mixture_equals_gate_weighted_expert_logits():
    model = two_domain_moe(gate="dense", **TINY)
    x, _, _ = _batch()
    mixture = model.get_layer("mixture")
    gates = np.asarray(gate_model(model, "mixture")(x), np.float64)
    experts = [np.asarray(e(x), np.float64) for e in mixture.experts]
    expected = gates[:, :1] * experts[0] + gates[:, 1:] * experts[1]
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-6)
    probs = two_domain_moe(gate="dense", output="probabilities", **TINY)
    probs.set_weights(model.get_weights())
    e = np.exp(expected - expected.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(probs(x)), e / e.sum(-1, keepdims=True), atol=1e-6)


def test_oracle_routes_exactly_by_domain():
    model = two_domain_moe(gate="oracle", **TINY)
    x, domain, _ = _batch()
    inputs = {"image": x, "domain": domain}
    gates = np.asarray(gate_model(model, "mixture")(inputs))
    np.testing.assert_array_equal(gates, np.eye(2, dtype="float32")[domain])
    mixture = model.get_layer("mixture")
    per_expert = [np.asarray(e(x)) for e in mixture.experts]
    chosen = np.where(domain[:, None] == 0, per_expert[0], per_expert[1])
    np.testing.assert_array_equal(np.asarray(model(inputs)), chosen)
    # Flipping the domain flips the expert, whatever the image.
    flipped = np.asarray(model({"image": x, "domain": 1 - domain}))
    np.testing.assert_array_equal(flipped, np.where(domain[:, None] == 0, per_expert[1],
                                                    per_expert[0]))


@pytest.mark.parametrize("kind", ["entropy", "variance"])
@pytest.mark.parametrize("gate", ["dense", "conv"])
def test_gate_loss_adds_exactly_the_formula(kind, gate):
    alpha, beta = 0.3, 0.05
    plain = two_domain_moe(gate=gate, **TINY)
    lossy = two_domain_moe(gate=gate, gate_loss=kind, alpha=alpha, beta=beta, **TINY)
    lossy.set_weights(plain.get_weights())
    x, _, y = _batch()
    for m in (plain, lossy):
        m.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gates = np.asarray(gate_model(plain, "mixture")(x))
    expected = _np_gate_loss(kind, gates, alpha, beta)

    pred_plain = plain(x, training=True)
    assert plain.losses == []
    total_plain = float(plain.compute_loss(x, y, pred_plain, training=True))
    pred_lossy = lossy(x, training=True)
    assert len(lossy.losses) == 1
    np.testing.assert_allclose(float(lossy.losses[0]), expected, rtol=1e-5, atol=1e-7)
    total_lossy = float(lossy.compute_loss(x, y, pred_lossy, training=True))
    np.testing.assert_allclose(total_lossy - total_plain, expected, rtol=1e-4, atol=1e-6)
    # Not in inference.
    lossy(x, training=False)
    assert lossy.losses == []


def test_oracle_gate_loss_is_the_constant_formula_value():
    model = two_domain_moe(gate="oracle", gate_loss="entropy", **TINY)
    x, domain, _ = _batch()
    model({"image": x, "domain": domain}, training=True)
    one_hot = np.eye(2)[domain]
    np.testing.assert_allclose(float(model.losses[0]),
                               _np_gate_loss("entropy", one_hot, 0.1, 0.01), rtol=1e-6)


def test_training_step_moves_the_gate_loss():
    keras.utils.set_random_seed(1)
    model = two_domain_moe(gate="dense", gate_loss="entropy", alpha=1.0, beta=0.0, **TINY)
    model.compile(keras.optimizers.Adam(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, _, y = _batch(32)
    before = _np_gate_loss("entropy", np.asarray(gate_model(model, "mixture")(x)), 1.0, 0.0)
    model.fit(x, y, batch_size=32, epochs=5, verbose=0)
    after = _np_gate_loss("entropy", np.asarray(gate_model(model, "mixture")(x)), 1.0, 0.0)
    assert after < before  # minimising -Entropy(mean gate) balances the experts


def test_save_load_round_trip(tmp_path):
    model = two_domain_moe(gate="oracle", gate_loss="variance", **TINY)
    x, domain, _ = _batch()
    inputs = {"image": x, "domain": domain}
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(inputs)), np.asarray(model(inputs)))
    np.testing.assert_array_equal(np.asarray(gate_model(loaded, "mixture")(inputs)),
                                  np.eye(2, dtype="float32")[domain])
    layer = loaded.get_layer("mixture")
    assert layer.oracle and type(layer.balance_loss[0]).__name__ == "VarianceGateLoss"


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="gate"):
        two_domain_moe(gate="sparse", **TINY)
    with pytest.raises(ValueError, match="gate_loss"):
        two_domain_moe(gate_loss="l1", **TINY)
    with pytest.raises(ValueError, match="alpha"):
        two_domain_moe(alpha=-1.0, **TINY)


def test_activation_rates_table():
    gates = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]])
    table = activation_rates(gates, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(table, [[0.75, 0.25], [0.1, 0.9]])


def _conv_params(cin, cout):
    return 9 * cin * cout + cout


def test_full_size_builds_with_the_papers_parameter_count():
    model = two_domain_moe(gate="conv")
    assert model.output.shape == (None, 20)
    expert = (_conv_params(1, 128) + _conv_params(128, 128)
              + (8 * 8 * 128 * 128 + 128) + (128 * 20 + 20))
    gate = _conv_params(1, 64) + _conv_params(64, 64) + (8 * 8 * 64 * 64 + 64) + (64 * 2 + 2)
    assert model.count_params() == 2 * expert + gate
    assert two_domain.MIXTURE_NAME == "mixture"


def test_keras_train_accuracy_is_cumulative_before_each_step():
    """The example's claim: fit's epoch accuracy = accuracy of the predictions made before
    each batch's gradient step, accumulated over the epoch (paper 002's definition)."""
    keras.utils.set_random_seed(3)
    model = two_domain_moe(gate="dense", **TINY)
    manual = two_domain_moe(gate="dense", **TINY)
    manual.set_weights(model.get_weights())
    for m in (model, manual):
        m.compile(keras.optimizers.SGD(0.5),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, _, y = _batch(48, seed=4)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    correct = 0
    for start in range(0, 48, 16):
        xb, yb = x[start:start + 16], y[start:start + 16]
        correct += int(np.sum(np.argmax(np.asarray(manual(xb)), -1) == yb))
        manual.train_on_batch(xb, yb)
    np.testing.assert_allclose(manual.get_weights()[0], model.get_weights()[0], atol=1e-5)
    assert history.history["accuracy"][0] == pytest.approx(correct / 48)


def test_mixed_precision_output_is_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = two_domain_moe(gate="conv", **TINY)
        x, _, _ = _batch()
        logits = model(x)
        gates = gate_model(model, "mixture")(x)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == "float32" and gates.dtype == "float32"
    np.testing.assert_allclose(np.asarray(gates).sum(-1), 1.0, rtol=1e-6)

"""Eigen et al.'s deep MoE zoo builders and the two-phase training procedure."""

import os

import keras
import numpy as np
import pytest

from keras_moe import zoo
from keras_moe.analysis import gating
from keras_moe.layers import MoEDense
from keras_moe.training import eigen as eigen_training
from keras_moe.zoo import eigen

TINY = dict(input_shape=(6, 6, 1), num_classes=3, experts=(2, 3), units=(5, 4),
            gate_hidden_units=(4, 3))


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def relu(x):
    return np.maximum(x, 0.0)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_moe(layer, x):
    """Eigen's mixture from the formulas: sum_i softmax(B relu(A x + a) + b)_i relu(W_i x + b_i)."""
    gate = layer.gate
    a, a_bias = gate.hidden_kernel.numpy(), gate.hidden_bias.numpy()
    b, b_bias = gate.kernel.numpy(), gate.bias.numpy()
    g = softmax(relu(x @ a + a_bias) @ b + b_bias)
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    experts = np.stack([relu(x @ kernel[e] + bias[e]) for e in range(len(kernel))], 1)
    return (g[:, :, None] * experts).sum(1), g


def test_registered_with_descriptions():
    names = zoo.list_models("dmoe")
    for name in ("dmoe_mnist", "dmoe_mnist_single_expert", "dmoe_mnist_concat",
                 "dmoe_mnist_dnn", "dmoe_mnist_one_layer", "dmoe_monophone"):
        assert name in names
        assert zoo.describe(name) and not zoo.describe(name).endswith(":")


def test_dmoe_forward_matches_numpy_formulas():
    keras.utils.set_random_seed(1)
    model = eigen.dmoe_mnist(**TINY)
    # Non-zero biases so that every term of the formulas is exercised.
    for w in model.weights:
        if w.trainable and "bias" in w.path:
            w.assign(np.random.default_rng(2).normal(size=w.shape).astype("float32") * 0.3)
    images = np.random.default_rng(3).integers(0, 256, size=(7, 6, 6, 1)).astype("float32")
    x = images.reshape(7, -1).astype(np.float64) / 255.0
    z1, g1 = numpy_moe(model.get_layer("moe_1"), x)
    z2, g2 = numpy_moe(model.get_layer("moe_2"), z1)
    head = model.get_layer("classifier")
    logits = z2 @ head.kernel.numpy() + head.bias.numpy()
    np.testing.assert_allclose(model.predict(images, verbose=0), logits, rtol=1e-4, atol=1e-5)
    got_g1, got_g2 = gating.gating_model(model).predict(images, verbose=0)
    np.testing.assert_allclose(got_g1, g1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_g2, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("second_layer", ["mixture", "single", "concat"])
def test_parameter_count_formula_and_variants(second_layer):
    model = eigen.dmoe_mnist(second_layer=second_layer, **TINY)
    assert model.output_shape == (None, 3)
    assert model.get_layer("moe_1").num_experts == 2
    if second_layer == "mixture":
        assert trainable_count(model) == eigen.dmoe_parameter_count(36, 3, (2, 3), (5, 4), (4, 3))
        assert model.get_layer("moe_2").gate.hidden_units == 3
    elif second_layer == "single":
        assert model.get_layer("expert_2").units == 4
    else:
        assert model.get_layer("concat_experts_2").units == 3 * 4
    assert model(np.zeros((2, 6, 6, 1), "float32")).shape == (2, 3)


def test_baseline_builders_are_the_variants():
    single = eigen.dmoe_mnist_single_expert(**TINY)
    concat = eigen.dmoe_mnist_concat(**TINY)
    variant = eigen.dmoe_mnist(second_layer="single", **TINY)
    assert trainable_count(single) == trainable_count(variant)
    assert concat.get_layer("concat_experts_2").units == 12
    assert [l.name for l in single.layers if isinstance(l, MoEDense)] == ["moe_1"]


@pytest.mark.parametrize("size", list(eigen.TABLE1_SIZES))
def test_matched_dnn_has_the_dmoe_parameter_count(size):
    # Formula only for the four Table 1 sizes (no build); the tiny one is built.
    spec = eigen.TABLE1_SIZES[size]
    target = eigen.dmoe_parameter_count(36 * 36, 10, **spec)
    width = eigen.matched_dnn_first_units(36 * 36, 10, target, spec["units"][1])
    u2 = spec["units"][1]
    dnn = 36 * 36 * width + width + width * u2 + u2 + u2 * 10 + 10
    assert abs(dnn - target) / target < 0.01
    # Widening the first layer by one unit moves the count further away.
    step = 36 * 36 + 1 + u2
    assert abs(dnn - target) <= step / 2


def test_tiny_matched_dnn_built_within_one_percent():
    spec = dict(input_shape=(12, 12, 1), num_classes=4, experts=(3, 2), units=(10, 6),
                gate_hidden_units=(5, 4))
    dmoe, dnn = eigen.dmoe_mnist(**spec), eigen.dmoe_mnist_dnn(**spec)
    assert abs(trainable_count(dnn) - trainable_count(dmoe)) / trainable_count(dmoe) < 0.01
    assert dnn.get_layer("dense_2").units == 6  # the DMoE's z2 width
    assert not any(isinstance(l, MoEDense) for l in dnn.layers)


@pytest.mark.parametrize("layer", ["mixture", "single", "concat"])
def test_one_layer_model(layer):
    model = eigen.dmoe_mnist_one_layer(input_shape=(6, 6, 1), num_classes=3, experts=2,
                                       units=5, gate_hidden_units=4, layer=layer)
    assert model.output_shape == (None, 3)
    moes = [l for l in model.layers if isinstance(l, MoEDense)]
    assert len(moes) == (1 if layer == "mixture" else 0)
    if layer == "concat":
        assert model.get_layer("concat_experts_1").units == 10


def test_full_size_builders_build():
    """One build-only check per full-size model: the paper's sizes."""
    dmoe = eigen.dmoe_mnist()
    assert dmoe.input_shape == (None, 36, 36, 1) and dmoe.output_shape == (None, 10)
    assert [dmoe.get_layer(n).units for n in ("moe_1", "moe_2")] == [100, 100]
    assert [dmoe.get_layer(n).gate.hidden_units for n in ("moe_1", "moe_2")] == [50, 50]
    assert trainable_count(dmoe) == eigen.dmoe_parameter_count(1296, 10)
    dnn = eigen.dmoe_mnist_dnn()
    assert abs(trainable_count(dnn) - trainable_count(dmoe)) / trainable_count(dmoe) < 0.01
    assert eigen.dmoe_mnist_concat().output_shape == (None, 10)
    assert eigen.dmoe_mnist_single_expert().output_shape == (None, 10)
    assert eigen.dmoe_mnist_one_layer().output_shape == (None, 10)


def test_monophone_builder_shapes():
    model = eigen.dmoe_monophone()
    assert model.input_shape == (None, 440) and model.output_shape == (None, 40)
    first, second = model.get_layer("moe_1"), model.get_layer("moe_2")
    assert (first.num_experts, first.units, first.gate.hidden_units) == (4, 128, 64)
    assert (second.num_experts, second.units, second.gate.hidden_units) == (16, 128, 64)
    assert "rescale" not in [l.name for l in model.layers]
    g1, g2 = gating.gating_model(model)(np.zeros((3, 440), "float32"))
    assert g1.shape == (3, 4) and g2.shape == (3, 16)
    assert eigen.dmoe_monophone(second_layer="concat").get_layer(
        "concat_experts_2").units == 16 * 128


@pytest.mark.parametrize("kwargs, name", [
    (dict(second_layer="gated"), "second_layer"),
    (dict(units=(4, 4, 4)), "units"),
    (dict(experts=(2, 0)), r"experts\[1\]"),
    (dict(assignment_margin=-1.0), "assignment_margin"),
    (dict(input_scale=0.0), "input_scale"),
    (dict(num_classes=0), "num_classes"),
])
def test_invalid_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        eigen.dmoe_mnist(**kwargs)


def _compiled_tiny(margin=0.5, seed=0):
    keras.utils.set_random_seed(seed)
    model = eigen.dmoe_mnist(assignment_margin=margin, **TINY)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _tiny_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, size=(n, 6, 6, 1)).astype("float32")
    x[np.arange(n), y * 2, 1, 0] += 190.0  # class visible in one pixel
    return x, y


def test_two_phase_training_lifts_the_constraint_and_loss_decreases():
    x, y = _tiny_data()
    model = _compiled_tiny()
    layers = eigen_training.constrained_moe_layers(model)
    assert [l.name for l in layers] == ["moe_1", "moe_2"]
    initial = model.evaluate(x, y, verbose=0)

    history = eigen_training.train_eigen_two_phase(model, x, y, constrained_epochs=2, free_epochs=2,
                                           free_learning_rate=0.05, batch_size=32, verbose=0)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.05)
    assert history.phases == ["constrained"] * 2 + ["free"] * 2
    assert len(history.history["loss"]) == 4
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.evaluate(x, y, verbose=0) < initial
    for layer in layers:
        assert float(layer.assignment_constraint_active.numpy()) == 0.0
        totals = layer.assignment_totals.numpy()
        # Only the constrained phase counted (2 epochs of 256 examples), within the margin.
        np.testing.assert_allclose(totals.sum(), 2 * len(x), rtol=1e-4)
        assert (totals - totals.mean()).max() <= 0.5 + 1.0

    # Lifted: training-mode gates are the free gates (no renormalisation, no counting).
    layer = layers[0]
    before = layer.assignment_totals.numpy().copy()
    flat = x[:16].reshape(16, -1) / 255.0
    _, constrained_off = layer(flat, training=True)
    _, free = layer(flat, training=False)
    np.testing.assert_allclose(constrained_off.numpy(), free.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(layer.assignment_totals.numpy(), before)


def test_constraint_is_active_in_phase_one():
    """In phase 1 an over-used expert is switched off: its training gate is exactly 0."""
    x, _ = _tiny_data(64)
    model = _compiled_tiny(margin=0.0)
    layer = model.get_layer("moe_1")
    layer.gate.bias.assign([5.0, 0.0])  # expert 0 takes nearly everything
    eigen_training.reset_assignment_totals(model)
    eigen_training.set_assignment_constraints(model, True)
    flat = x.reshape(64, -1) / 255.0
    _, gates = layer(flat, training=True)
    gates = gates.numpy()
    assert (gates[:, 0] == 0.0).mean() > 0.3
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-5)
    eigen_training.set_assignment_constraints(model, False)
    _, gates = layer(flat, training=True)
    assert (gates.numpy()[:, 0] > 0.9).all()


def test_callback_lifts_at_the_given_epoch():
    x, y = _tiny_data(64)
    model = _compiled_tiny()
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append([float(l.assignment_constraint_active.numpy())
                         for l in eigen_training.constrained_moe_layers(self.model)])

    lift = eigen_training.LiftAssignmentConstraint(2)
    model.fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=[lift, Record()])
    assert seen == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert lift.lifted_at == 2
    np.testing.assert_allclose(
        model.get_layer("moe_1").assignment_totals.numpy().sum(), 2 * 64, rtol=1e-4)


def test_phase_argument_errors():
    x, y = _tiny_data(8)
    model = _compiled_tiny()
    with pytest.raises(ValueError, match="epochs"):
        eigen_training.train_eigen_two_phase(model, x, y, constrained_epochs=1, free_epochs=1,
                                     epochs=3)
    with pytest.raises(ValueError, match="constrained_epochs"):
        eigen_training.train_eigen_two_phase(model, x, y, constrained_epochs=-1, free_epochs=1)
    with pytest.raises(ValueError, match="free_learning_rate"):
        eigen_training.train_eigen_two_phase(model, x, y, constrained_epochs=1, free_epochs=1,
                                     free_learning_rate=0.0)
    with pytest.raises(ValueError, match="compiled"):
        eigen_training.train_eigen_two_phase(eigen.dmoe_mnist(**TINY), x, y, constrained_epochs=1,
                                     free_epochs=1)
    with pytest.raises(ValueError, match="assignment_margin"):
        eigen_training.set_assignment_constraints(eigen.dmoe_mnist_dnn(**TINY), False)
    with pytest.raises(ValueError, match="lift_at_epoch"):
        eigen_training.LiftAssignmentConstraint(-1)


def test_save_and_reload_keeps_predictions(tmp_path):
    x, _ = _tiny_data(32)
    model = eigen.dmoe_mnist(assignment_margin=0.5, **TINY)
    model(x, training=True)  # one constrained pass: non-zero running totals
    assert model.get_layer("moe_1").assignment_totals.numpy().sum() == pytest.approx(32)
    path = os.path.join(tmp_path, "dmoe.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("moe_2").assignment_margin == 0.5
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.get_layer("moe_1").assignment_totals.numpy(),
                               model.get_layer("moe_1").assignment_totals.numpy())

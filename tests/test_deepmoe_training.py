"""DeepMoE's Procedure 1 (two phases), GateDensityTarget, and the shuffling analysis."""

import numpy as np
import pytest

import keras

from keras_moe.analysis import flops
from keras_moe.analysis import shuffling
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate
from keras_moe.training import deepmoe as training
from keras_moe.zoo import deepmoe

SHAPE = (16, 16, 3)
NUM_CLASSES = 4


def tiny(**kwargs):
    keras.utils.set_random_seed(0)
    return deepmoe.deepmoe_resnet_cifar(
        depth=8, input_shape=SHAPE, num_classes=NUM_CLASSES, width_multiplier=0.5,
        embedding_widths=(4, 4, 4, 4), **kwargs,
    )


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    x = rng.normal(size=(n,) + SHAPE).astype("float32")
    x[..., 0] += y[:, None, None]  # learnable signal
    return x, y


def compiled(model, lr=0.05, momentum=0.9):
    # Eager: tiny models, and no retracing after the phase-2 recompile.
    model.compile(keras.optimizers.SGD(lr, momentum=momentum),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], run_eagerly=True)
    return model


def weights(layers):
    return [np.array(w) for layer in layers for w in layer.weights]


class Snapshot(keras.callbacks.Callback):
    """Records the gating and base weights when a phase starts."""

    def __init__(self, gating, base):
        super().__init__()
        self.gating, self.base = gating, base

    def on_train_begin(self, logs=None):
        self.gating_weights = weights(self.gating)
        self.base_weights = weights(self.base)
        self.gate_l1 = self.model.gate_l1
        self.mu = self.model.embedding_loss_weight


def test_two_phase_freezes_gating_and_zeroes_lambda_mu():
    model = compiled(tiny(gate_l1=0.5, embedding_loss_weight=1.0))
    optimizer = model.optimizer
    gating = training.gating_layers(model)
    assert isinstance(gating[0], ShallowEmbedding)
    assert all(isinstance(layer, ReLUGate) for layer in gating[1:])
    assert len(gating) == 1 + model.num_gated_layers
    base = [layer for layer in model.network.layers if layer not in gating and layer.weights]
    initial_gating = weights(gating)
    snap = Snapshot(gating, base)
    result = training.train_deepmoe_two_phase(
        model, data(), joint_epochs=2, finetune_epochs=2, finetune_callbacks=[snap],
        batch_size=16, verbose=0,
    )
    assert result.phases == ["joint", "joint", "finetune", "finetune"]
    assert len(result.history["loss"]) == 4
    assert result.joint is not None and result.finetune is not None
    # The joint phase trained the gating (so the freeze below is a real check).
    assert any(not np.array_equal(a, b) for a, b in zip(initial_gating, snap.gating_weights))
    # Phase 2 started with lambda = mu = 0 and left every gating weight (moving batch-norm
    # statistics included) unchanged, while the base network trained.
    assert snap.gate_l1 == 0.0 and snap.mu == 0.0
    assert model.gate_l1 == 0.0 and model.embedding_loss_weight == 0.0
    for before, after in zip(snap.gating_weights, weights(gating)):
        np.testing.assert_array_equal(before, after)
    changed = [not np.array_equal(a, b) for a, b in zip(snap.base_weights, weights(base))]
    assert sum(changed) >= len(changed) // 2
    assert all(not layer.trainable for layer in gating)
    assert model.optimizer is optimizer  # same instance: iterations and slots kept
    assert int(optimizer.iterations.numpy()) == 4 * 2
    trainable = {id(v) for v in model.trainable_variables}
    assert not any(id(w) in trainable for layer in gating for w in layer.weights)


def test_two_phase_argument_checks():
    model = tiny()
    with pytest.raises(ValueError, match="compiled"):
        training.train_deepmoe_two_phase(model, data(), joint_epochs=1, finetune_epochs=1)
    compiled(model)
    with pytest.raises(ValueError, match="epochs"):
        training.train_deepmoe_two_phase(model, data(), joint_epochs=1, finetune_epochs=1,
                                         epochs=3)
    with pytest.raises(ValueError, match="joint_epochs"):
        training.train_deepmoe_two_phase(model, data(), joint_epochs=-1, finetune_epochs=1)
    with pytest.raises(ValueError, match="DeepMoEModel"):
        training.train_deepmoe_two_phase(
            compiled(deepmoe.resnet_cifar(depth=8, input_shape=SHAPE)), data(),
            joint_epochs=1, finetune_epochs=1)


def test_density_target_rule_with_controlled_density():
    densities = iter([0.9, 0.9, 0.8, 0.2, 0.51, 0.9, 0.0])
    callback = training.GateDensityTarget(
        0.5, density_fn=lambda model: next(densities), factor=2.0, tolerance=0.02,
        min_gate_l1=0.01, max_gate_l1=1.0,
    )
    model = tiny(gate_l1=0.2)
    callback.set_model(model)
    assert callback.update() == (0.9, pytest.approx(0.4))   # above target: x2
    assert callback.update() == (0.9, pytest.approx(0.8))
    assert callback.update() == (0.8, pytest.approx(0.8))   # above but falling: hold
    assert callback.update() == (0.2, pytest.approx(0.4))   # below target: /2
    assert callback.update() == (0.51, pytest.approx(0.4))  # inside the dead band
    model.gate_l1 = 0.7
    assert callback.update() == (0.9, pytest.approx(1.0))   # capped at max_gate_l1
    model.gate_l1 = 0.015
    assert callback.update() == (0.0, pytest.approx(0.01))  # floored at min_gate_l1
    assert model.gate_l1 == pytest.approx(0.01)
    assert [round(r[2], 6) for r in callback.records] == [0.4, 0.8, 0.8, 0.4, 0.4, 1.0, 0.01]


def test_density_target_raises_zero_lambda_and_checks_arguments():
    callback = training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, factor=3.0,
                                          min_gate_l1=0.1)
    model = tiny(gate_l1=0.0)
    callback.set_model(model)
    callback.update()
    assert model.gate_l1 == pytest.approx(0.3)
    with pytest.raises(ValueError, match="target_density"):
        training.GateDensityTarget(1.5, density_fn=lambda m: 1.0)
    with pytest.raises(ValueError, match="factor"):
        training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, factor=1.0)
    with pytest.raises(ValueError, match="data"):
        training.GateDensityTarget(0.5)


def test_density_target_tiny_run_moves_density_toward_target():
    # Plain SGD: with momentum 0.9 this tiny run overshoots to density 0 (all gates
    # shrink together and the velocity carries them past zero; see the callback's doc).
    model = compiled(tiny(gate_l1=20.0), lr=0.1, momentum=0.0)
    x, y = data(64)
    start = flops.gate_density(model, x, overall=True)
    assert start == 1.0
    callback = training.GateDensityTarget(0.5, data=x, every=1, factor=1.5, max_gate_l1=1e4)
    history = model.fit(x, y, batch_size=16, epochs=4, callbacks=[callback], verbose=0)
    end = flops.gate_density(model, x, overall=True)
    assert end < start
    assert abs(end - 0.5) < abs(start - 0.5)
    assert history.history["gate_density"][-1] == pytest.approx(end)
    # lambda rose while the density stayed above the target band.
    first_below = next((i for i, r in enumerate(callback.records) if r[1] <= 0.52),
                       len(callback.records))
    lambdas = [r[2] for r in callback.records[:first_below]]
    assert lambdas == sorted(lambdas) and lambdas[-1] > 20.0


# Shuffling ---------------------------------------------------------------------------


def test_substituted_own_embedding_gives_original_predictions():
    model = tiny()
    x, _ = data(16)
    e = keras.ops.convert_to_numpy(shuffling.embedding_model(model)(x, training=False))
    substituted = shuffling.substituted_embedding_model(model)
    original = keras.ops.convert_to_numpy(model(x, training=False))
    replayed = keras.ops.convert_to_numpy(substituted([x, e], training=False))
    np.testing.assert_array_equal(replayed, original)
    # Weights are shared, and another e changes the outputs.
    embedding = model.network.get_layer("embedding")
    shared = {id(w) for w in model.network.weights} - {id(w) for w in embedding.weights}
    assert {id(w) for w in substituted.weights} == shared
    other = keras.ops.convert_to_numpy(substituted([x, e[::-1]], training=False))
    assert not np.allclose(other, original)


def test_gate_embedding_shuffling_groups_and_deterministic_donor():
    model = tiny()
    x, y = data(40, seed=3)
    y[-1] = 3  # class 3 has exactly one example below: every draw is that example
    y[y == 3] = 2
    y[-1] = 3
    groups = (0, 0, 1, 1)
    result = shuffling.gate_embedding_shuffling(model, x, y, target_class=0, groups=groups,
                                                repeats=3)
    rows = np.flatnonzero(y == 0)
    predicted = np.argmax(keras.ops.convert_to_numpy(model(x[rows], training=False)), -1)
    assert result.own_accuracy == pytest.approx(np.mean(predicted == 0))
    assert result.num_examples == len(rows)
    assert result.in_group == [1] and result.out_group == [2, 3]
    e = keras.ops.convert_to_numpy(shuffling.embedding_model(model)(x, training=False))
    donor = np.repeat(e[-1:], len(rows), axis=0)
    sub = shuffling.substituted_embedding_model(model)
    pred3 = np.argmax(keras.ops.convert_to_numpy(sub([x[rows], donor], training=False)), -1)
    assert result.accuracy[3] == pytest.approx(np.mean(pred3 == 0))
    assert result.in_group_accuracy == pytest.approx(result.accuracy[1])
    assert result.out_group_accuracy == pytest.approx((result.accuracy[2] + result.accuracy[3]) / 2)
    with pytest.raises(ValueError, match="donor_classes"):
        shuffling.gate_embedding_shuffling(model, x, y, 0, groups, donor_classes=[0])

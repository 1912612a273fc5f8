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
    # The optimizer's state carried over to the remaining variables (phases.recompile):
    # the iteration count runs on through both phases (the learning-rate schedule), its
    # configuration is the same, and it holds slots for the trainable variables only.
    assert model.optimizer.get_config() == optimizer.get_config()
    assert int(model.optimizer.iterations.numpy()) == 4 * 2
    paths = {v.path.replace("/", "_") for v in model.trainable_variables}
    slots = [v.path.split("/", 1)[1] for v in model.optimizer.variables
             if v.path.split("/", 1)[1] not in ("iteration", "learning_rate")]
    assert slots and all(any(s.startswith(p + "_") for p in paths) for s in slots)
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


def expected_gate_l1(gate_l1, density, previous, target, *, gain, down_gain, factor,
                     down_factor, lookahead, ramp, target_density, lo, hi):
    """GateDensityTarget's rule written out (see its docstring)."""
    batch, d = density
    if ramp:
        target = max(target_density, 1 - (1 - target_density) * min(1, batch / ramp))
    predicted = d
    if previous is not None and lookahead:
        predicted = d + lookahead * (d - previous[1]) / (batch - previous[0])
    error = predicted - target
    step = np.clip((gain if error > 0 else down_gain) * error, -np.log(down_factor),
                   np.log(factor))
    return float(np.clip(gate_l1 * np.exp(step), lo, hi))


def run_rule(callback, model, measurements):
    it = iter(measurements)
    callback.density_fn = lambda m: next(it)[1]
    out = []
    for batch, _ in measurements:
        callback._seen = batch
        out.append(callback.update())
    return out


def test_density_target_update_follows_the_formula():
    rule = dict(gain=4.0, down_gain=4.0, factor=1.5, down_factor=2.0, lookahead=0, ramp=0)
    callback = training.GateDensityTarget(
        0.5, density_fn=lambda m: 0.0, tolerance=0.0, min_gate_l1=0.01, max_gate_l1=1.0,
        **rule)
    model = tiny(gate_l1=0.2)
    callback.set_model(model)
    measurements = [(10, 0.9), (20, 0.6), (30, 0.55), (40, 0.45), (50, 0.0), (60, 0.7),
                    (70, 0.9), (80, 0.9), (90, 0.9)]
    got = run_rule(callback, model, measurements)
    lam, previous = 0.2, None
    for (batch, d), (d_got, lam_got) in zip(measurements, got):
        lam = expected_gate_l1(lam, (batch, d), previous, 0.5, target_density=0.5, lo=0.01,
                               hi=1.0, **rule)
        previous = (batch, d)
        assert d_got == d and lam_got == pytest.approx(lam, rel=1e-6)
    # Spot values: bounded up-step (x1.5), proportional steps, bounded down-step (/2),
    # capped at max_gate_l1.
    lams = [r.gate_l1 for r in callback.records]
    assert lams[0] == pytest.approx(0.3)
    assert lams[1] == pytest.approx(0.3 * np.exp(0.4))
    assert lams[2] == pytest.approx(lams[1] * np.exp(0.2))
    assert lams[3] == pytest.approx(lams[2] * np.exp(-0.2))
    assert lams[4] == pytest.approx(lams[3] / 2)
    assert lams[-1] == pytest.approx(1.0)
    assert model.gate_l1 == pytest.approx(1.0)


def test_density_target_lookahead_and_ramp_follow_the_formula():
    rule = dict(gain=3.0, down_gain=6.0, factor=1.3, down_factor=1.8, lookahead=20, ramp=100)
    callback = training.GateDensityTarget(
        0.4, density_fn=lambda m: 0.0, every=5, min_gate_l1=1e-3, max_gate_l1=100.0, **rule)
    model = tiny(gate_l1=1.0)
    callback.set_model(model)
    measurements = [(5, 1.0), (10, 1.0), (15, 0.99), (20, 0.95), (25, 0.9), (30, 0.884),
                    (60, 0.7), (100, 0.45), (105, 0.41), (110, 0.40), (200, 0.40)]
    got = run_rule(callback, model, measurements)
    lam, previous = 1.0, None
    for (batch, d), (_, lam_got) in zip(measurements, got):
        lam = expected_gate_l1(lam, (batch, d), previous, None, target_density=0.4,
                               lo=1e-3, hi=100.0, **rule)
        previous = (batch, d)
        assert lam_got == pytest.approx(lam, rel=1e-6)
    records = callback.records
    assert [r.target for r in records[:3]] == pytest.approx([0.97, 0.94, 0.91])
    assert records[-1].target == pytest.approx(0.4)
    # Falling by 0.016 per 5 batches, 0.884 predicts 0.884 - 4 * 0.016 = 0.82 = the
    # ramped target at batch 30: no step.
    assert records[5].target == pytest.approx(0.82)
    assert records[5].gate_l1 == pytest.approx(records[4].gate_l1)


def test_density_ahead_follows_the_formula():
    rng = np.random.default_rng(0)
    previous = {"a": rng.uniform(-0.5, 1.5, (6, 8)), "b": rng.uniform(-0.5, 1.5, (6, 4))}
    current = {"a": previous["a"] - rng.uniform(0.0, 0.1, (6, 8)),  # falling
               "b": previous["b"] + rng.uniform(0.0, 0.1, (6, 4))}  # rising
    batches, lookahead = 5, 30
    expected_kept = 0
    for name in ("a", "b"):
        both = (current[name] > 0) & (previous[name] > 0)
        drift = max((previous[name][both] - current[name][both]).mean() / batches, 0.0)
        for value in current[name].ravel():  # written out entry by entry
            expected_kept += value > drift * lookahead
    expected = expected_kept / 72
    got = training.density_ahead(previous, current, batches, lookahead)
    assert got == pytest.approx(expected)
    now = np.mean(np.concatenate([(g > 0).ravel() for g in current.values()]))
    assert got < now  # layer a's drift closes some of its gates ahead
    # The rising layer predicts no closing; lookahead 0 is the density now.
    assert training.density_ahead({"b": previous["b"]}, {"b": current["b"]}, 5, 30) == (
        pytest.approx(np.mean(current["b"] > 0)))
    assert training.density_ahead(previous, current, 5, 0) == pytest.approx(now)


def test_density_target_options_and_argument_checks():
    model = tiny(gate_l1=0.0)
    callback = training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, factor=3.0,
                                          min_gate_l1=0.1, lookahead=0, gain=5.0)
    callback.set_model(model)
    callback.update()   # a lambda of 0 is first raised to min_gate_l1, then x factor
    assert model.gate_l1 == pytest.approx(0.3)
    # latch: once at or below the target, lambda never goes up again.
    densities = iter([0.4, 0.9])
    latched = training.GateDensityTarget(0.5, density_fn=lambda m: next(densities),
                                         latch=True, lookahead=0)
    latched.set_model(model)
    model.gate_l1 = 1.0
    latched.update()
    assert model.gate_l1 < 1.0
    low = model.gate_l1
    latched.update()
    assert model.gate_l1 == low and latched.reached
    # hold_while_falling: no raise while the density falls.
    densities = iter([0.9, 0.8])
    held = training.GateDensityTarget(0.5, density_fn=lambda m: next(densities),
                                      hold_while_falling=True, lookahead=0)
    held.set_model(model)
    model.gate_l1 = 1.0
    held.update()
    raised = model.gate_l1
    held.update()
    assert raised > 1.0 and model.gate_l1 == raised
    # initial_gate_l1 is applied when training starts.
    start = training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, initial_gate_l1=0.05)
    start.set_model(model)
    start.on_train_begin()
    assert model.gate_l1 == pytest.approx(0.05)
    with pytest.raises(ValueError, match="target_density"):
        training.GateDensityTarget(1.5, density_fn=lambda m: 1.0)
    with pytest.raises(ValueError, match="factor"):
        training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, factor=1.0)
    with pytest.raises(ValueError, match="down_factor"):
        training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, down_factor=0.5)
    with pytest.raises(ValueError, match="gain"):
        training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, gain=0.0)
    with pytest.raises(ValueError, match="down_gain"):
        training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, down_gain=-1.0)
    with pytest.raises(ValueError, match="ramp"):
        training.GateDensityTarget(0.5, density_fn=lambda m: 1.0, ramp=-1)
    with pytest.raises(ValueError, match="data"):
        training.GateDensityTarget(0.5)


def test_spread_gate_heads():
    model = tiny()
    heads = training.spread_gate_heads(model, seed=1)
    assert len(heads) == model.num_gated_layers
    kernels = [np.array(h.kernel) for h in heads]
    assert all(k.min() >= 0.0 and k.max() <= 2.0 for k in kernels)
    assert np.std(np.concatenate([k.ravel() for k in kernels])) > 0.4   # ~2 / sqrt(12)
    x, _ = data(16)
    assert flops.gate_density(model, x, overall=True) == 1.0  # every gate starts open
    again = [np.array(h.kernel) for h in training.spread_gate_heads(tiny(), seed=1)]
    for a, b in zip(kernels, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="high"):
        training.spread_gate_heads(model, low=1.0, high=1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_density_target_closed_loop_reaches_target_without_overshoot(seed):
    # Momentum 0.9 as in the paper's recipe: the old multiplicative rule overshot to
    # density ~0 on this kind of run (all gates crossed zero together), and gain 5 under
    # the channel-weighted L1 term wound lambda up near the target, then closed the
    # widest layer (seed 0: density 0.23 at the end).
    target = 0.5
    model = tiny(gate_l1=1.0)
    training.spread_gate_heads(model, seed=seed)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(256, seed=seed)
    assert flops.gate_density(model, x[:128], overall=True) == 1.0
    callback = training.GateDensityTarget(target, data=x[:128], every=2)
    history = model.fit(x, y, batch_size=32, epochs=25, callbacks=[callback], verbose=0)
    densities = [r.density for r in callback.records]
    lambdas = [r.gate_l1 for r in callback.records]
    assert len(densities) == 100
    # Reaches the target: the last 20 measurements within 0.05 of it.
    assert max(abs(d - target) for d in densities[-20:]) <= 0.05
    # Never far below it (closed gates may not reopen).
    assert min(densities) >= target - 0.1
    # lambda rose from its start while the gates were all open, then came back down.
    peak = int(np.argmax(lambdas))
    assert lambdas[peak] > 10 * lambdas[0] and lambdas[-1] < lambdas[peak] / 2
    assert history.history["gate_density"][-1] == pytest.approx(densities[-1])
    assert history.history["gate_l1"][-1] == pytest.approx(lambdas[-1])


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


def test_density_target_logs_each_epochs_lowest_reading():
    # Two epochs of 4 batches, one measurement per batch: the dip to 0.3 in epoch 0
    # recovers before the epoch ends, so only `gate_density_min` shows it.
    readings = [0.9, 0.3, 0.8, 0.7, 0.65, 0.6, 0.62, 0.64]
    it = iter(readings)
    callback = training.GateDensityTarget(0.5, density_fn=lambda m: next(it), every=1)
    model = compiled(tiny())
    images, labels = data(n=32)
    history = model.fit(images, labels, batch_size=8, epochs=2, shuffle=False, verbose=0,
                        callbacks=[callback])
    assert [r.density for r in callback.records] == readings
    assert history.history["gate_density"] == pytest.approx([0.7, 0.64])
    assert history.history["gate_density_min"] == pytest.approx(
        [min(readings[:4]), min(readings[4:])])
    # One reading every 6 batches of 4-batch epochs: epoch 0 has none (and no records:
    # nothing logged), epoch 3 has none of its own and reports the last one (batch 12).
    later_readings = iter([0.4, 0.3])
    later = training.GateDensityTarget(0.5, density_fn=lambda m: next(later_readings),
                                       every=6)
    logs = model.fit(images, labels, batch_size=8, epochs=4, shuffle=False, verbose=0,
                     callbacks=[later]).history
    assert [r.batch for r in later.records] == [6, 12]
    assert logs["gate_density_min"] == pytest.approx([0.4, 0.3, 0.3])
    assert len(logs["gate_density_min"]) == len(logs["gate_density"])


def test_density_target_state_continues_the_rule_after_a_json_round_trip():
    """What an epoch backup keeps of the controller (get_state through the run
    directory's JSON): a controller restored mid-run takes the same steps as the one
    that never stopped (ramp position, latch, the lookahead's last reading)."""
    import json

    from keras_moe.training import run_dir

    readings = [0.9, 0.8, 0.7, 0.45, 0.5, 0.6, 0.65, 0.55]
    rule = dict(every=2, ramp=8, lookahead=3, latch=True, min_gate_l1=1e-3,
                max_gate_l1=100.0)

    def controller(values):
        it = iter(values)
        return training.GateDensityTarget(0.5, density_fn=lambda m: next(it), **rule)

    def batches(callback, count):
        for batch in range(count):
            callback.on_train_batch_end(batch)

    whole_model, whole = tiny(gate_l1=0.2), controller(readings)
    whole.set_model(whole_model)
    whole.on_train_begin()
    batches(whole, 16)

    first_model, first = tiny(gate_l1=0.2), controller(readings[:4])
    first.set_model(first_model)
    first.on_train_begin()
    batches(first, 8)
    saved = json.loads(json.dumps(run_dir.to_json_value(first.get_state())))
    resumed_model, resumed = tiny(gate_l1=first_model.gate_l1), controller(readings[4:])
    resumed.set_model(resumed_model)
    resumed.set_state(run_dir.from_json_value(saved))
    resumed.on_train_begin()
    batches(resumed, 8)
    assert resumed.records == whole.records
    assert resumed.reached and resumed._seen == 16
    assert resumed_model.gate_l1 == pytest.approx(whole_model.gate_l1, rel=1e-7)
    # Without the state, the restarted ramp and lookahead take other steps.
    fresh_model, fresh = tiny(gate_l1=first_model.gate_l1), controller(readings[4:])
    fresh.set_model(fresh_model)
    fresh.on_train_begin()
    batches(fresh, 8)
    assert fresh_model.gate_l1 != pytest.approx(whole_model.gate_l1, rel=1e-3)

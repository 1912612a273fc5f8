"""MoEDense: numerics against numpy, dispatch equivalence, constraint, serialization, errors."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import regularizers
from keras_moe.layers import MoEDense, NoisyTopKGate


def _relu(x):
    return np.maximum(x, 0.0)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_moe_dense(layer, x):
    """float64 reference of MoEDense with a SoftmaxGate, written from the formulas."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    gate = layer.gate
    h = x
    if gate.hidden_units is not None:
        h = _relu(h @ np.float64(gate.hidden_kernel.numpy()) + gate.hidden_bias.numpy())
    logits = h @ np.float64(gate.kernel.numpy()) + gate.bias.numpy()
    if layer.top_k is None:
        gates = _softmax(logits)
    else:
        gates = np.zeros_like(logits)
        top = np.argsort(-logits, axis=-1)[:, : layer.top_k]
        rows = np.arange(len(x))[:, None]
        gates[rows, top] = _softmax(logits[rows, top])
    out = np.zeros((len(x), layer.units))
    for e in range(layer.num_experts):
        z = x
        if layer.expert_hidden_units is not None:
            z = _relu(z @ layer.hidden_kernel.numpy()[e] + layer.hidden_bias.numpy()[e])
        y = z @ np.float64(layer.kernel.numpy()[e]) + layer.bias.numpy()[e]
        if layer.activation is keras.activations.relu:
            y = _relu(y)
        out += gates[:, e : e + 1] * y
    return out, gates


def _random_biases(layer, seed=0):
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        if "bias" in w.path:
            w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))


@pytest.mark.parametrize(
    "top_k, expert_hidden_units, gate_hidden_units, activation",
    [(None, None, 8, "relu"), (2, 12, None, None), (1, None, 5, "relu"), (3, 6, 4, None)],
)
def test_forward_matches_numpy_reference(top_k, expert_hidden_units, gate_hidden_units, activation):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 10)).astype("float32")
    layer = MoEDense(
        7, num_experts=5, top_k=top_k, gate_hidden_units=gate_hidden_units,
        expert_hidden_units=expert_hidden_units, activation=activation, return_gates=True,
    )
    layer.build(x.shape)
    _random_biases(layer)
    outputs, gates = layer(x)
    expected, expected_gates = numpy_moe_dense(layer, x)
    np.testing.assert_allclose(gates.numpy(), expected_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-4, atol=1e-5)


def _layers_with_shared_weights(x, **kwargs):
    layers = {}
    for mode in ("dense", "sparse", "capacity"):
        layer = MoEDense(dispatch=mode, capacity_factor=float(kwargs["num_experts"]), **kwargs)
        layer.build(x.shape)
        layers[mode] = layer
    _random_biases(layers["dense"])
    for mode in ("sparse", "capacity"):
        copy_trainable_weights(layers["dense"], layers[mode])
    return layers


def copy_trainable_weights(source, target):
    for src, dst in zip(source.trainable_weights, target.trainable_weights):
        assert src.path.split("/")[-1] == dst.path.split("/")[-1]
        dst.assign(src)


@pytest.mark.parametrize("expert_hidden_units, top_k", [(None, 2), (16, 2), (16, 1), (16, 3)])
def test_dispatch_modes_agree_on_outputs_and_gradients(expert_hidden_units, top_k):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(64, 12)).astype("float32"))
    kwargs = dict(units=9, num_experts=6, top_k=top_k, gate_hidden_units=8,
                  expert_hidden_units=expert_hidden_units, activation="relu")
    layers = _layers_with_shared_weights(x, **kwargs)
    results = {}
    for mode, layer in layers.items():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.sin(tf.range(9, dtype=tf.float32)))
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        results[mode] = (
            y.numpy(), [None if g is None else tf.convert_to_tensor(g).numpy() for g in grads]
        )
    assert layers["capacity"].dropped_fraction == 0.0
    for mode in ("sparse", "capacity"):
        np.testing.assert_allclose(results[mode][0], results["dense"][0], rtol=1e-5, atol=1e-6)
        for got, want in zip(results[mode][1], results["dense"][1]):
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    gate_grad = results["sparse"][1][-2]
    if top_k > 1:  # the gate receives gradient through the combine weights
        assert np.abs(gate_grad).sum() > 0
    else:  # a softmax over one logit is constant: top-1 gates pass no gradient
        assert gate_grad is None


def test_sparse_dispatch_skips_unrouted_experts():
    """An expert that receives no token gets no gradient: it was never computed."""
    x = np.random.default_rng(3).normal(size=(32, 8)).astype("float32")
    layer = MoEDense(4, num_experts=4, top_k=1, dispatch="sparse")
    layer.build(x.shape)
    layer.gate.bias.assign([10.0, 0.0, -10.0, -10.0])  # route everything to expert 0
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    grad = tape.gradient(loss, layer.kernel).numpy()
    assert np.abs(grad[0]).sum() > 0
    assert np.abs(grad[1:]).sum() == 0


def test_capacity_mode_drops_and_counts_overflow():
    x = np.random.default_rng(4).normal(size=(40, 8)).astype("float32")
    layer = MoEDense(3, num_experts=4, top_k=2, dispatch="capacity", capacity_factor=0.5)
    layer.build(x.shape)
    layer.gate.kernel.assign(np.zeros((8, 4), "float32"))
    layer.gate.bias.assign([4.0, 3.0, -4.0, -4.0])  # every token: expert 0, then 1
    y = layer(x).numpy()
    capacity = int(np.ceil(0.5 * 2 * 40 / 4))  # 10 slots per expert
    # Experts 0 and 1 each get 40 assignments and keep 10: 60 of 80 are dropped.
    assert layer.dropped_fraction == pytest.approx(60 / 80)
    dense = MoEDense(3, num_experts=4, top_k=2, dispatch="dense")
    dense.build(x.shape)
    copy_trainable_weights(layer, dense)
    full = dense(x).numpy()
    # Slots go to first choices before second choices, earlier tokens first: tokens
    # 0..9 fill both experts, later tokens keep no assignment and output zero.
    np.testing.assert_allclose(y[capacity:], 0.0)
    np.testing.assert_allclose(y[:capacity], full[:capacity], rtol=1e-5, atol=1e-6)
    layer.reset_drop_counters()
    assert layer.dropped_fraction == 0.0


def test_rank_three_inputs_route_every_position():
    x = np.random.default_rng(5).normal(size=(3, 7, 10)).astype("float32")
    layer = MoEDense(4, num_experts=3, top_k=2, return_gates=True)
    y, gates = layer(x)
    assert y.shape == (3, 7, 4) and gates.shape == (3, 7, 3)
    flat_y, flat_gates = layer(x.reshape(21, 10))
    np.testing.assert_allclose(y.numpy().reshape(21, 4), flat_y.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.count_nonzero(gates.numpy(), axis=-1), 2)


def test_balance_losses_only_in_training_and_equal_formula():
    x = np.random.default_rng(6).normal(size=(50, 6)).astype("float32")
    layer = MoEDense(
        4, num_experts=5, top_k=2, gate_hidden_units=4,
        balance_loss=[regularizers.ImportanceLoss(0.5), regularizers.SwitchLoadBalanceLoss(2.0)],
        return_gates=True,
    )
    layer(x, training=False)
    assert layer.losses == []
    _, gates = layer(x, training=True)
    assert len(layer.losses) == 2
    gates = gates.numpy().astype(np.float64)
    importance = gates.sum(0)
    cv2 = importance.var() / (importance.mean() ** 2 + 1e-10)
    np.testing.assert_allclose(float(layer.losses[0]), 0.5 * cv2, rtol=1e-4)


def _toy_gate_model(margin):
    layer = MoEDense(3, num_experts=4, gate_hidden_units=6, assignment_margin=margin,
                     return_gates=True, name="moe")
    inputs = keras.Input((8,))
    outputs, gates = layer(inputs)
    return layer, keras.Model(inputs, [outputs, gates])


def test_assignment_margin_keeps_running_totals_within_margin():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(512, 8)).astype("float32")
    margin = 4.0
    # Without the constraint a gate biased towards expert 0 gives it > 90% of the mass.
    free = MoEDense(3, num_experts=4, gate_hidden_units=6, return_gates=True,
                    bias_initializer="zeros")
    free.build(x.shape)
    free.gate.bias.assign([6.0, 0.0, 0.0, 0.0])
    _, gates = free(x, training=True)
    assert gates.numpy()[:, 0].sum() / len(x) > 0.9

    layer = MoEDense(3, num_experts=4, gate_hidden_units=6, return_gates=True,
                     assignment_margin=margin)
    layer.build(x.shape)
    copy_trainable_weights(free, layer)
    for batch in np.split(x, 8):
        _, gates = layer(batch, training=True)
        totals = layer.assignment_totals.numpy()
        # One example can add at most 1 - 1/N above the mean after crossing the margin.
        assert (totals - totals.mean()).max() <= margin + 0.75 + 1e-4
        np.testing.assert_allclose(gates.numpy().sum(-1), 1.0, rtol=1e-5)
    totals = layer.assignment_totals.numpy()
    np.testing.assert_allclose(totals.sum(), len(x), rtol=1e-4)
    assert totals[0] / totals.sum() < 0.3

    # The gate's gradient survives the renormalisation.
    with tf.GradientTape() as tape:
        y, _ = layer(x[:64], training=True)
        loss = tf.reduce_sum(y * y)
    grads = tape.gradient(loss, layer.gate.trainable_weights)
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    assert sum(np.abs(g.numpy()).sum() for g in grads) > 0

    # Phase 2: the constraint is lifted without rebuilding; gates equal the free layer's.
    layer.set_assignment_constraint(False)
    before = layer.assignment_totals.numpy().copy()
    _, constrained_off = layer(x, training=True)
    _, reference = free(x, training=True)
    np.testing.assert_allclose(constrained_off.numpy(), reference.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(layer.assignment_totals.numpy(), before)


def test_assignment_margin_prevents_collapse_in_model_fit():
    """Rich-get-richer during SGD: the constraint keeps every expert in use."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(1024, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    shares = {}
    for margin in (None, 2.0):
        keras.utils.set_random_seed(0)
        layer = MoEDense(8, num_experts=4, gate_hidden_units=6, activation="relu",
                         assignment_margin=margin, return_gates=True)
        inputs = keras.Input((8,))
        hidden, gates = layer(inputs)
        model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
        layer.gate.bias.assign([2.0, 0.0, 0.0, 0.0])
        model.compile(keras.optimizers.SGD(0.5),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=6, verbose=0)
        if margin is None:
            g = keras.Model(inputs, gates).predict(x, verbose=0)
            shares[margin] = g.mean(0).max()
        else:
            totals = layer.assignment_totals.numpy()
            shares[margin] = totals.max() / totals.sum()
            assert (totals - totals.mean()).max() <= margin + 0.75 + 1e-3
    assert shares[None] > 0.9
    assert shares[2.0] < 0.3


def test_mixed_precision_keeps_gates_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = MoEDense(4, num_experts=3, top_k=2, return_gates=True)
        y, gates = layer(np.random.rand(6, 5).astype("float32"))
        assert y.dtype == "float16"
        assert gates.dtype == "float32"
        assert layer.gate.kernel.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_config_round_trip_and_keras_file(tmp_path):
    layer = MoEDense(
        5, num_experts=4, top_k=2, gate="noisy_top_k", expert_hidden_units=7,
        activation="relu", dispatch="sparse",
        balance_loss=[regularizers.ImportanceLoss(0.1), "load"],
    )
    config = layer.get_config()
    clone = MoEDense.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.gate, NoisyTopKGate)
    assert [type(r) for r in clone.balance_loss] == [regularizers.ImportanceLoss, regularizers.LoadLoss]

    inputs = keras.Input((6,))
    model = keras.Sequential([inputs, layer, keras.layers.Dense(3)])
    model.compile("adam", "mse")
    x = np.random.default_rng(9).normal(size=(16, 6)).astype("float32")
    model.fit(x, np.zeros((16, 3)), epochs=1, verbose=0)
    path = str(tmp_path / "moe.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["sparse", "capacity", "dense"])
def test_saved_model_export_reloads_with_same_outputs(tmp_path, dispatch):
    inputs = keras.Input((6,))
    hidden = MoEDense(8, num_experts=4, top_k=2, gate="noisy_top_k", dispatch=dispatch,
                      activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x = np.random.default_rng(10).normal(size=(11, 6)).astype("float32")
    for w in model.weights:  # a zero-initialised gate would route everything identically
        if "kernel" in w.path:
            w.assign(np.random.default_rng(11).normal(0, 0.5, w.shape).astype("float32"))
    path = str(tmp_path / "exported")
    model.export(path)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(x).numpy(), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(units=4, num_experts=3, top_k=4), "top_k"),
        (dict(units=4, num_experts=3, top_k=0), "top_k"),
        (dict(units=4, num_experts=0), "num_experts"),
        (dict(units=0, num_experts=3), "units"),
        (dict(units=4, num_experts=3, gate="sigmoid"), "gate"),
        (dict(units=4, num_experts=3, top_k=2, dispatch="scatter"), "dispatch"),
        (dict(units=4, num_experts=3, top_k=2, dispatch="capacity", capacity_factor=0), "capacity_factor"),
        (dict(units=4, num_experts=3, top_k=2, capacity_factor=-1.0), "capacity_factor"),
        (dict(units=4, num_experts=3, balance_loss=regularizers.ImportanceLoss), "balance_loss"),
        (dict(units=4, num_experts=3, dispatch="sparse"), "top_k"),
        (dict(units=4, num_experts=3, gate="noisy_top_k"), "top_k"),
        (dict(units=4, num_experts=3, assignment_margin=-1.0), "assignment_margin"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MoEDense(**kwargs)


def test_negative_loss_coefficient_is_rejected():
    with pytest.raises(ValueError, match="coefficient"):
        MoEDense(4, num_experts=3, balance_loss=regularizers.ImportanceLoss(-1.0))


def test_unknown_last_dimension_raises_at_build():
    layer = MoEDense(4, num_experts=3)
    with pytest.raises(ValueError, match="last dimension"):
        layer.build((None, None))

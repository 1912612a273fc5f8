"""Routing of current MoE models (`keras_moe.layers.routing` and the gates and `MoEDense`
options built on it), each against its formula written out in float64 numpy, on
TensorFlow and JAX: the sigmoid top-k gate, auxiliary-loss-free balancing, group-limited
routing, expert choice, shared experts."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import regularizers
from keras_moe.layers import (
    ExpertChoiceGate,
    MoEDense,
    NoisyTopKGate,
    SigmoidTopKGate,
    SoftmaxGate,
)
from keras_moe.layers import routing
from regularizers.regularizer_references import np_noisy_top_k_load
from testing_utils import BACKEND, gradients, run_layer_test, to_numpy

pytestmark = pytest.mark.multi_backend


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_group_limited(selection, groups, keep):
    """Each token's `keep` groups with the largest sum of their two best scores."""
    tokens, experts = selection.shape
    size = experts // groups
    out = np.full_like(selection, routing.MASKED)
    for t in range(tokens):
        scores = [np.sort(selection[t, g * size:(g + 1) * size])[::-1][:2].sum()
                  for g in range(groups)]
        for g in np.argsort(-np.array(scores), kind="stable")[:keep]:
            out[t, g * size:(g + 1) * size] = selection[t, g * size:(g + 1) * size]
    return out


def _np_top_k(values, selection, k):
    """(tokens, k) experts by descending selection, and values there."""
    top = np.argsort(-selection, axis=-1, kind="stable")[:, :k]
    return top, np.take_along_axis(values, top, axis=-1)


def _dense(top, top_gates, experts):
    gates = np.zeros((len(top), experts))
    mask = np.zeros((len(top), experts))
    rows = np.arange(len(top))[:, None]
    gates[rows, top] = top_gates
    mask[rows, top] = 1.0
    return gates, mask


def _set_weights(layer, rng, scale=0.7):
    for weight in layer.weights:
        if weight.trainable:
            weight.assign(rng.normal(0, scale, weight.shape).astype("float32"))


# Routing functions ------------------------------------------------------------------------


@pytest.mark.parametrize("experts, groups, keep", [(12, 4, 2), (8, 8, 3), (6, 2, 1), (9, 3, 3)])
def test_group_limited_keeps_each_tokens_best_groups(experts, groups, keep):
    selection = np.random.default_rng(0).normal(size=(25, experts)).astype("float32")
    got = to_numpy(routing.group_limited(ops.convert_to_tensor(selection), groups, keep))
    np.testing.assert_array_equal(got, _np_group_limited(selection, groups, keep))


def test_bias_update_is_rate_times_the_sign_of_mean_minus_load():
    load = np.array([3.0, 1.0, 2.0, 6.0], "float32")  # mean 3
    got = to_numpy(routing.bias_update(ops.convert_to_tensor(load), 0.01))
    np.testing.assert_allclose(got, [0.0, 0.01, 0.01, -0.01])


def test_expert_choice_capacity_formula():
    assert routing.expert_choice_capacity(100, 8, 2.0) == 25  # ceil(2 * 100 / 8)
    assert routing.expert_choice_capacity(10, 4, 1.0) == 3
    assert routing.expert_choice_capacity(6, 2, 8.0) == 6  # never more than every token


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_groups=3), "top_k_groups"),
        (dict(num_groups=3, top_k_groups=1), "divide"),
        (dict(num_groups=4, top_k_groups=5), "top_k_groups"),
        (dict(num_groups=4, top_k_groups=1, top_k=3), "top_k_groups"),
        (dict(bias_update_rate=-0.1), "bias_update_rate"),
        (dict(routed_scaling=0.0), "routed_scaling"),
    ],
)
def test_bad_routing_arguments_raise_value_errors_naming_them(kwargs, argument):
    kwargs = dict(dict(num_experts=8, top_k=2), **kwargs)
    with pytest.raises(ValueError, match=argument):
        SigmoidTopKGate(**kwargs)


# The sigmoid gate ------------------------------------------------------------------------


@pytest.mark.parametrize("k, scaling, groups, bias", [
    (2, 1.0, None, False), (3, 2.5, None, True), (2, 1.0, (4, 2), True), (1, 1.0, (2, 1), False)])
def test_sigmoid_gate_matches_deepseek_v3(k, scaling, groups, bias):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype("float32")
    gate = SigmoidTopKGate(8, top_k=k, routed_scaling=scaling,
                           bias_update_rate=0.0 if bias else None,
                           num_groups=groups and groups[0], top_k_groups=groups and groups[1])
    gate.build(x.shape)
    _set_weights(gate, rng)
    b = rng.normal(0, 0.3, 8).astype("float32") if bias else np.zeros(8, "float32")
    if bias:
        gate.expert_bias.assign(b)
    out = to_numpy(gate(x, training=False))
    logits = x.astype(np.float64) @ to_numpy(gate.kernel)
    scores = _sigmoid(logits)
    selection = scores + b
    if groups:
        selection = _np_group_limited(selection, *groups)
    top, chosen = _np_top_k(scores, selection, k)
    top_gates = scaling * chosen / chosen.sum(-1, keepdims=True)
    gates, mask = _dense(top, top_gates, 8)
    np.testing.assert_array_equal(out["top_k_indices"], top)
    np.testing.assert_allclose(out["top_k_gates"], top_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["gates"], gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["dispatch_mask"], mask)
    np.testing.assert_allclose(out["probs"], scores / scores.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["load"], mask.sum(0))


def test_gate_gradients_flow_to_the_scores_never_to_the_bias():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 5)).astype("float32")
    gate = SigmoidTopKGate(6, top_k=2, bias_update_rate=0.1)
    gate.build(x.shape)
    _set_weights(gate, rng)
    _, _, (grad,) = gradients(
        lambda: ops.sum(gate(x)["gates"] * np.arange(6.0, dtype="float32")),
        variables=[gate.kernel])
    assert np.abs(grad).sum() > 0
    assert not gate.expert_bias.trainable and gate.trainable_weights == [gate.kernel]


# Auxiliary-loss-free balancing ---------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: SoftmaxGate(6, top_k=2, bias_update_rate=0.05),
    lambda: NoisyTopKGate(6, top_k=2, noisy=False, bias_update_rate=0.05),
    lambda: SigmoidTopKGate(6, top_k=2, bias_update_rate=0.05),
])
def test_the_bias_steps_after_training_calls_from_the_load_it_chose(make):
    """The choice of a training call uses the bias as it was; then the bias moves by
    gamma * sign(mean load - load) of that choice. Inference never moves it."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4)).astype("float32")
    gate = make()
    gate.build(x.shape)
    _set_weights(gate, rng)
    start = rng.normal(0, 0.2, 6).astype("float32")
    gate.expert_bias.assign(start)
    out = to_numpy(gate(x, training=True))
    load = out["dispatch_mask"].sum(0)
    np.testing.assert_allclose(to_numpy(gate.expert_bias),
                               start + 0.05 * np.sign(load.mean() - load), rtol=1e-6)
    before = to_numpy(gate.expert_bias).copy()
    gate(x, training=False)
    np.testing.assert_array_equal(to_numpy(gate.expert_bias), before)


def test_the_bias_chooses_but_the_gate_values_stay_unbiased():
    """Softmax gate: the choice ranks softmax(logits) + b (Wang et al.'s scores), the
    chosen experts' gates are the softmax over their own logits."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 4)).astype("float32")
    gate = SoftmaxGate(5, top_k=2, bias_update_rate=0.0)
    gate.build(x.shape)
    _set_weights(gate, rng)
    b = np.array([0.0, 0.0, 0.0, 0.0, 5.0], "float32")  # expert 4 always chosen
    gate.expert_bias.assign(b)
    out = to_numpy(gate(x))
    logits = x.astype(np.float64) @ to_numpy(gate.kernel) + to_numpy(gate.bias)
    top, chosen = _np_top_k(logits, _softmax(logits) + b, 2)
    assert np.all(top[:, 0] == 4)
    np.testing.assert_allclose(out["gates"], _dense(top, _softmax(chosen), 5)[0],
                               rtol=1e-5, atol=1e-6)


def test_the_noisy_gates_smooth_load_is_that_of_the_biased_choice():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(48, 6)).astype("float32")
    gate = NoisyTopKGate(8, top_k=2, seed=7, bias_update_rate=0.0)
    gate.build(x.shape)
    _set_weights(gate, rng, 0.3)
    b = rng.normal(0, 0.5, 8).astype("float32")
    gate.expert_bias.assign(b)
    out = to_numpy(gate(x, training=True))
    noise = to_numpy(keras.random.normal((48, 8), seed=keras.random.SeedGenerator(7)))
    clean = x.astype(np.float64) @ to_numpy(gate.kernel)
    stddev = np.log1p(np.exp(x.astype(np.float64) @ to_numpy(gate.noise_kernel))) + 1e-2
    noisy = clean + noise * stddev
    top, chosen = _np_top_k(noisy, noisy + b, 2)
    np.testing.assert_allclose(out["gates"], _dense(top, _softmax(chosen), 8)[0],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["load"], np_noisy_top_k_load(clean + b, noisy + b, stddev, 2),
                               rtol=1e-4, atol=1e-5)


def test_a_layer_with_the_bias_balances_a_skewed_router_in_fit():
    """One expert's scores start far above the others': with the bias its share falls
    to about 1/E within 200 steps; the router's weights are frozen, so only the bias
    can do it. (A rate too large for the scores' spread makes the shares oscillate:
    0.01 here swings between 0.15 and 0.44.)"""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = rng.normal(size=(512, 4)).astype("float32")
    layer = MoEDense(4, num_experts=4, top_k=1, gate="sigmoid_top_k", bias_update_rate=0.002)
    model = keras.Sequential([keras.Input((8,)), layer])
    layer.gate.kernel.assign(np.concatenate(
        [np.full((8, 1), 0.5), rng.normal(0, 0.05, (8, 3))], axis=1).astype("float32"))
    layer.gate.trainable = False

    def share():
        return to_numpy(layer.gate(x)["dispatch_mask"]).mean(0)

    before = share()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, y, batch_size=64, epochs=25, verbose=0, shuffle=False)
    after = share()
    assert before.max() > 0.45, before
    assert after.max() < 0.32 and after.min() > 0.18, after


# Expert choice ----------------------------------------------------------------------------


def test_expert_choice_gate_matches_zhou_et_al():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(20, 5)).astype("float32")
    gate = ExpertChoiceGate(4, capacity_factor=1.5)
    gate.build(x.shape)
    _set_weights(gate, rng)
    out = to_numpy(gate(x))
    probs = _softmax(x.astype(np.float64) @ to_numpy(gate.kernel))
    capacity = 8  # ceil(1.5 * 20 / 4)
    chosen = np.argsort(-probs.T, axis=-1, kind="stable")[:, :capacity]
    np.testing.assert_array_equal(out["expert_choice_indices"], chosen)
    np.testing.assert_allclose(out["expert_choice_gates"],
                               np.take_along_axis(probs.T, chosen, -1), rtol=1e-5)
    gates = np.zeros_like(probs)
    for e in range(4):
        gates[chosen[e], e] = probs[chosen[e], e]
    np.testing.assert_allclose(out["gates"], gates, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out["dispatch_mask"], (gates > 0).astype("float32"))
    np.testing.assert_array_equal(out["load"], np.full(4, capacity))
    assert (out["dispatch_mask"].sum(0) == capacity).all()


def _expert_choice_pair(dispatch):
    layer = MoEDense(5, num_experts=4, gate="expert_choice", capacity_factor=1.0,
                     expert_hidden_units=6, num_shared_experts=1, dispatch=dispatch)
    layer.build((None, 7))
    return layer


def test_expert_choice_dispatch_modes_agree_and_count_unrouted_tokens():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(24, 7)).astype("float32")
    upstream = rng.normal(size=(24, 5)).astype("float32")
    reference = _expert_choice_pair("dense")
    _set_weights(reference, rng, 0.5)
    values = [to_numpy(w) for w in reference.weights]
    results = {}
    for dispatch in ("dense", "capacity", "sparse"):
        layer = _expert_choice_pair(dispatch)
        for w, v in zip(layer.weights, values):
            w.assign(v)
        inputs = ops.convert_to_tensor(x)
        y = to_numpy(layer(inputs))
        _, _, grads = gradients(lambda layer=layer: ops.sum(layer(inputs) * upstream),
                                variables=layer.trainable_weights)
        results[dispatch] = (y, grads, layer.dropped_fraction)
    for dispatch in ("capacity", "sparse"):
        np.testing.assert_allclose(results[dispatch][0], results["dense"][0], rtol=1e-5,
                                   atol=1e-5)
        for got, want in zip(results[dispatch][1], results["dense"][1]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    mask = to_numpy(reference.gate(x)["dispatch_mask"])
    unrouted = np.mean(mask.sum(-1) == 0)
    assert unrouted > 0  # capacity factor 1: some tokens are left out
    for dispatch, (_, _, dropped) in results.items():
        assert dropped == pytest.approx(unrouted, abs=1e-6), dispatch


def test_expert_choice_refuses_top_k_and_the_top_k_options():
    with pytest.raises(ValueError, match="expert_choice.*top_k=2"):
        MoEDense(4, num_experts=4, top_k=2, gate="expert_choice")
    with pytest.raises(ValueError, match="bias_update_rate=0.01"):
        MoEDense(4, num_experts=4, gate="expert_choice", bias_update_rate=0.01)
    with pytest.raises(ValueError, match="token_groups"):
        MoEDense(4, num_experts=4, gate="expert_choice", token_groups=2)


# Shared experts ---------------------------------------------------------------------------


def _np_ffn(x, hidden_kernel, hidden_bias, kernel, bias):
    return np.maximum(np.maximum(x @ hidden_kernel + hidden_bias, 0) @ kernel + bias, 0)


def test_shared_experts_add_every_tokens_ffn_to_the_routed_output():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 9, 6)).astype("float32")  # any rank: every position a token
    layer = MoEDense(5, num_experts=4, top_k=2, expert_hidden_units=7, activation="relu",
                     gate="sigmoid_top_k", num_shared_experts=2, return_gates=True)
    layer.build(x.shape)
    _set_weights(layer, rng, 0.5)
    y, gates = (to_numpy(t) for t in layer(x))
    tokens = x.reshape(-1, 6).astype(np.float64)
    w = {v.path.split("/", 1)[1]: to_numpy(v).astype(np.float64) for v in layer.weights}
    routed = sum(gates.reshape(-1, 4)[:, [e]] * _np_ffn(
        tokens, w["hidden_kernel"][e], w["hidden_bias"][e], w["kernel"][e], w["bias"][e])
        for e in range(4))
    shared = sum(_np_ffn(tokens, w["shared_hidden_kernel"][s], w["shared_hidden_bias"][s],
                         w["shared_kernel"][s], w["shared_bias"][s]) for s in range(2))
    np.testing.assert_allclose(y.reshape(-1, 5), routed + shared, rtol=1e-4, atol=1e-5)


# Layer contracts and files ----------------------------------------------------------------


@pytest.mark.parametrize("layer_cls, init_kwargs, k", [
    (SigmoidTopKGate, dict(num_experts=4, top_k=2, bias_update_rate=0.01, num_groups=2,
                           top_k_groups=1, routed_scaling=2.0), 2),
    (ExpertChoiceGate, dict(num_experts=4, capacity_factor=2.0), None),
])
def test_new_gates_layer_contract(tmp_path, layer_cls, init_kwargs, k):
    x = np.random.default_rng(10).normal(size=(6, 5)).astype("float32")
    shapes = {key: (6, 4) for key in ("gates", "logits", "probs", "dispatch_mask")}
    shapes["load"] = (4,)
    if k:
        shapes["top_k_indices"] = shapes["top_k_gates"] = (6, k)
    else:
        shapes["expert_choice_indices"] = shapes["expert_choice_gates"] = (4, 3)
    run_layer_test(layer_cls, init_kwargs, x, expected_output_shape=shapes,
                   expected_num_non_trainable_weights=1 if k else 0, tmp_path=tmp_path)


@pytest.mark.parametrize("init_kwargs, losses", [
    (dict(gate="sigmoid_top_k", top_k=2, bias_update_rate=0.01, num_shared_experts=1,
          num_groups=2, top_k_groups=1), []),
    (dict(gate="noisy_top_k", top_k=2, bias_update_rate=0.01, num_groups=2, top_k_groups=2),
     ["importance"]),
    (dict(gate="softmax", top_k=2, bias_update_rate=0.01, num_shared_experts=2), []),
    (dict(gate="expert_choice", capacity_factor=2.0, num_shared_experts=1), ["switch"]),
])
def test_moe_dense_routing_options_layer_contract(tmp_path, init_kwargs, losses):
    x = np.random.default_rng(11).normal(size=(8, 5)).astype("float32")
    layer = run_layer_test(
        MoEDense, dict(units=3, num_experts=4, expert_hidden_units=4, balance_loss=losses,
                       **init_kwargs),
        x, expected_output_shape=(8, 3), expected_num_losses=len(losses), tmp_path=tmp_path)
    config = layer.get_config()
    for key, value in init_kwargs.items():
        if key != "gate":
            assert config[key] == value, key


def test_a_trained_bias_is_saved_and_loaded_with_the_model(tmp_path):
    keras.utils.set_random_seed(12)
    inputs = keras.Input((5,))
    layer = MoEDense(3, num_experts=4, top_k=2, gate="sigmoid_top_k", bias_update_rate=0.1)
    model = keras.Model(inputs, layer(inputs))
    model.compile("sgd", "mse")
    # Tokens near one point pick the same experts in every batch, so the bias moves the
    # same way each step (balanced or alternating batches could cancel it back to 0).
    x = (2.0 + 0.05 * np.random.default_rng(12).normal(size=(32, 5))).astype("float32")
    model.fit(x, np.zeros((32, 3), "float32"), batch_size=8, epochs=1, verbose=0)
    bias = to_numpy(layer.gate.expert_bias)
    assert np.abs(bias).sum() > 0
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(loaded.layers[1].gate.expert_bias), bias)


def test_a_gate_layer_and_the_layers_routing_options_must_agree():
    gate = SigmoidTopKGate(4, top_k=2, bias_update_rate=0.01)
    assert MoEDense(3, num_experts=4, top_k=2, gate=gate).bias_update_rate == 0.01
    with pytest.raises(ValueError, match="bias_update_rate=0.01.*bias_update_rate=0.1"):
        MoEDense(3, num_experts=4, top_k=2, gate=gate, bias_update_rate=0.1)


# Sequence-wise balance -------------------------------------------------------------------


def test_sequence_balance_loss_needs_sequences():
    layer = MoEDense(3, num_experts=4, top_k=2, gate="sigmoid_top_k",
                     balance_loss=regularizers.SequenceBalanceLoss(0.1))
    with pytest.raises(ValueError, match="SequenceBalanceLoss.*batch, sequence, features"):
        layer.build((None, 5))


def test_sequence_balance_loss_is_added_on_sequences():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(3, 10, 5)).astype("float32")
    layer = MoEDense(3, num_experts=4, top_k=2, gate="sigmoid_top_k",
                     balance_loss=regularizers.SequenceBalanceLoss(0.1))
    layer.build(x.shape)
    _set_weights(layer, rng)
    layer(x, training=True)
    (loss,) = [float(to_numpy(v)) for v in layer.losses]
    out = to_numpy(layer.gate(x.reshape(-1, 5)))
    mask = out["dispatch_mask"].reshape(3, 10, 4)
    probs = out["probs"].reshape(3, 10, 4).astype(np.float64)
    f = 4 / (2 * 10) * mask.sum(1)
    expected = 0.1 * np.mean(np.sum(f * probs.mean(1), -1))
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_the_bias_over_two_replicas_moves_as_on_one_device(mirrored_strategy):
    rng = np.random.default_rng(14)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    kernel = rng.normal(0, 0.5, (6, 4)).astype("float32")

    def train(strategy):
        with strategy.scope():
            inputs = keras.Input((6,))
            layer = MoEDense(3, num_experts=4, top_k=1, gate="sigmoid_top_k",
                             bias_update_rate=0.01, kernel_initializer="ones")
            model = keras.Model(inputs, layer(inputs))
            layer.gate.kernel.assign(kernel)
            model.compile(keras.optimizers.SGD(0.0), "mse")
        model.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False)
        return to_numpy(layer.gate.expert_bias)

    import tensorflow as tf

    one = train(tf.distribute.get_strategy())
    two = train(mirrored_strategy)
    assert np.abs(one).sum() > 0
    np.testing.assert_allclose(two, one, atol=1e-7)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="serving a SavedModel needs TensorFlow")
@pytest.mark.parametrize("kwargs", [
    dict(gate="sigmoid_top_k", top_k=2, bias_update_rate=0.01, num_groups=2, top_k_groups=1,
         num_shared_experts=1),
    dict(gate="expert_choice", capacity_factor=1.5, num_shared_experts=1),
])
def test_saved_model_serves_the_new_routers(tmp_path, kwargs):
    import tensorflow as tf

    inputs = keras.Input((6,))
    layer = MoEDense(8, num_experts=4, activation="relu", **kwargs)
    model = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
    rng = np.random.default_rng(15)
    _set_weights(model, rng, 0.5)
    if kwargs.get("bias_update_rate"):
        layer.gate.expert_bias.assign(rng.normal(0, 0.3, 4).astype("float32"))
    x = rng.normal(size=(11, 6)).astype("float32")
    model.export(str(tmp_path / "exported"))
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(to_numpy(reloaded.serve(x)), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)

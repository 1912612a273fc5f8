"""Tests of the GateRegularizer objects of keras_moe.regularizers.losses.

Backend-neutral: every test runs on TensorFlow and on JAX, except the `tf.function` test,
whose JAX counterpart runs under `jax.jit`.
"""

import json

import keras
import numpy as np
import pytest

from keras_moe import regularizers as R
from keras_moe.layers import MoEDense
from keras_moe.layers import NoisyTopKGate
from keras_moe.layers import ReLUGate
from keras_moe.layers import SoftmaxGate
from keras_moe.layers import TSNEGate
from regularizers.regularizer_references import RTOL
from regularizers.regularizer_references import np_batch_entropy
from regularizers.regularizer_references import np_batch_variance
from regularizers.regularizer_references import np_cv_squared
from regularizers.regularizer_references import np_l1
from regularizers.regularizer_references import np_router_z
from regularizers.regularizer_references import np_sample_entropy
from regularizers.regularizer_references import np_sample_variance
from regularizers.regularizer_references import np_switch
from regularizers.regularizer_references import requires_jax
from regularizers.regularizer_references import top_k_gates
from testing_utils import assert_no_gradient
from testing_utils import gradients
from testing_utils import requires_tensorflow
from testing_utils import to_numpy

pytestmark = pytest.mark.multi_backend

OUTPUTS = top_k_gates(30, tokens=12, experts=6, k=2)

# (class, alias, default weights, unweighted reference term(s) on OUTPUTS)
SINGLE_TERM = [
    (R.ImportanceLoss, "importance", 1e-2, lambda o: np_cv_squared(o["gates"].sum(axis=0))),
    (R.LoadLoss, "load", 1e-2, lambda o: np_cv_squared(o["load"])),
    (R.SwitchLoadBalanceLoss, "switch", 1e-2, lambda o: np_switch(o["probs"], o["dispatch_mask"])),
    (R.RouterZLoss, "z_loss", 1e-3, lambda o: np_router_z(o["logits"])),
    (R.L1GateLoss, "l1", 1e-3, lambda o: np_l1(o["gates"])),
]
TWO_TERM = [
    (R.EntropyGateLoss, "entropy", np_batch_entropy, np_sample_entropy),
    (R.VarianceGateLoss, "variance", np_batch_variance, np_sample_variance),
]
ALL_CLASSES = [case[0] for case in SINGLE_TERM] + [case[0] for case in TWO_TERM]


def weights_of(cls):
    return ("alpha", "beta") if cls in (R.EntropyGateLoss, R.VarianceGateLoss) else (
        "coefficient",
    )


@pytest.mark.parametrize("cls, alias, default, reference", SINGLE_TERM)
def test_single_term_regularizer_value_and_scaling(cls, alias, default, reference):
    assert cls().coefficient == default
    for coefficient in (0.0, 1.0, 0.37):
        value = cls(coefficient=coefficient)(OUTPUTS)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        assert tuple(value.shape) == ()
        np.testing.assert_allclose(
            float(to_numpy(value)), coefficient * reference(OUTPUTS), rtol=RTOL, atol=1e-12
        )


@pytest.mark.parametrize("cls, alias, batch_reference, sample_reference", TWO_TERM)
def test_alpha_beta_regularizer_value_and_scaling(cls, alias, batch_reference, sample_reference):
    default = cls()
    assert (default.alpha, default.beta) == (0.1, 0.01)
    gates = OUTPUTS["gates"]
    for alpha, beta in ((0.1, 0.01), (1.0, 0.0), (0.0, 2.5), (0.3, 0.7)):
        value = float(to_numpy(cls(alpha=alpha, beta=beta)({"gates": gates})))
        expected = alpha * batch_reference(gates) + beta * sample_reference(gates)
        np.testing.assert_allclose(value, expected, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_get_config_round_trip(cls):
    kwargs = {name: 0.25 + i for i, name in enumerate(weights_of(cls))}
    original = cls(**kwargs)
    config = original.get_config()
    assert config == kwargs
    json.dumps(config)
    rebuilt = cls.from_config(config)
    assert type(rebuilt) is cls and rebuilt.get_config() == config
    np.testing.assert_allclose(to_numpy(rebuilt(OUTPUTS)), to_numpy(original(OUTPUTS)))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_keras_saving_round_trip(cls):
    kwargs = {name: 0.5 + i for i, name in enumerate(weights_of(cls))}
    original = cls(**kwargs)
    config = keras.saving.serialize_keras_object(original)
    assert config["registered_name"] == f"keras_moe>{cls.__name__}"
    config = json.loads(json.dumps(config))
    rebuilt = keras.saving.deserialize_keras_object(config)
    assert type(rebuilt) is cls and rebuilt.get_config() == original.get_config()
    # and through the module's own helpers
    ours = R.deserialize(json.loads(json.dumps(R.serialize(original))))
    assert type(ours) is cls and ours.get_config() == original.get_config()
    plain = R.deserialize({"class_name": cls.__name__, "config": kwargs})
    assert type(plain) is cls and plain.get_config() == original.get_config()


def test_get_with_names_instances_and_configs():
    for cls, alias, default, _ in SINGLE_TERM:
        regularizer = R.get(alias)
        assert type(regularizer) is cls and regularizer.coefficient == default
        assert type(R.get(cls.__name__)) is cls
    for cls, alias, _, _ in TWO_TERM:
        assert type(R.get(alias)) is cls
    instance = R.ImportanceLoss(0.3)
    assert R.get(instance) is instance
    assert R.get(None) is None
    from_config = R.get({"class_name": "entropy", "config": {"alpha": 1.0, "beta": 0.0}})
    assert type(from_config) is R.EntropyGateLoss and from_config.alpha == 1.0
    assert type(R.get(R.serialize(R.L1GateLoss(2.0)))) is R.L1GateLoss


def test_get_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="known names") as info:
        R.get("importanse")
    for name in ("importance", "load", "switch", "z_loss", "entropy", "variance", "l1"):
        assert name in str(info.value)
    with pytest.raises(ValueError):
        R.get(3.0)


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("bad", [-1, -1e-9, float("nan"), float("inf"), "0.1", None, True])
def test_invalid_weights_raise(cls, bad):
    for name in weights_of(cls):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            cls(**{name: bad})


def test_invalid_coefficient_message():
    with pytest.raises(ValueError) as info:
        R.ImportanceLoss(coefficient=-1)
    assert str(info.value) == "coefficient must be a finite number >= 0, got -1"


@pytest.mark.parametrize(
    "cls, key",
    [
        (R.ImportanceLoss, "gates"),
        (R.LoadLoss, "load"),
        (R.SwitchLoadBalanceLoss, "probs"),
        (R.SwitchLoadBalanceLoss, "dispatch_mask"),
        (R.RouterZLoss, "logits"),
        (R.EntropyGateLoss, "gates"),
        (R.VarianceGateLoss, "gates"),
        (R.L1GateLoss, "gates"),
    ],
)
def test_missing_key_raises(cls, key):
    outputs = {name: value for name, value in OUTPUTS.items() if name != key}
    with pytest.raises(ValueError, match=f"'{key}'") as info:
        cls()(outputs)
    assert "provided by" in str(info.value)


def test_non_dict_gate_outputs_raise():
    with pytest.raises(ValueError, match="dict"):
        R.ImportanceLoss()(OUTPUTS["gates"])


COMPILED_TERMS = ("importance", "load", "switch", "z_loss")


def _total_of_compiled_terms(outputs):
    return sum(R.get(name)(outputs) for name in COMPILED_TERMS)


def _eager_total_of_compiled_terms():
    return sum(float(to_numpy(R.get(name)(OUTPUTS))) for name in COMPILED_TERMS)


@requires_tensorflow
def test_regularizers_in_tf_function():
    import tensorflow as tf

    total = tf.function(_total_of_compiled_terms)
    np.testing.assert_allclose(
        float(to_numpy(total(OUTPUTS))), _eager_total_of_compiled_terms(), rtol=RTOL
    )


@requires_jax
def test_regularizers_under_jax_jit():
    """The JAX counterpart of the `tf.function` test: the gate-output dict is a pytree."""
    import jax

    total = jax.jit(_total_of_compiled_terms)
    np.testing.assert_allclose(
        float(to_numpy(total(OUTPUTS))), _eager_total_of_compiled_terms(), rtol=RTOL
    )


# ----------------------------------------------------------------------------------------
# use from a layer: add_loss in a functional model, one training step
# ----------------------------------------------------------------------------------------


class _SoftmaxGateWithLoss(keras.layers.Layer):
    """Minimal test gate: softmax router that attaches a regularizer with add_loss."""

    def __init__(self, experts, regularizer, **kwargs):
        super().__init__(**kwargs)
        self.experts = experts
        self.regularizer = R.get(regularizer)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.experts), name="kernel")

    def call(self, x, training=None):
        logits = keras.ops.matmul(x, self.kernel)
        probs = keras.ops.softmax(logits)
        if training:
            self.add_loss(self.regularizer({"gates": probs, "logits": logits, "probs": probs}))
        return probs


@pytest.mark.parametrize("name", ["importance", "entropy", "z_loss"])
def test_regularizer_as_layer_add_loss_trains(name):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    default = R.get(name)
    regularizer = type(default).from_config({key: 1.0 for key in default.get_config()})
    outputs = _SoftmaxGateWithLoss(4, regularizer)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = np.full((16, 4), 0.25, np.float32)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    model(x, training=True)
    assert len(model.losses) == 1


# ----------------------------------------------------------------------------------------
# check_gate_supports: LoadLoss needs a gate whose load has a gradient
# ----------------------------------------------------------------------------------------

HARD_LOAD_GATES = {
    "SoftmaxGate": lambda: SoftmaxGate(4),
    "SoftmaxGate(top_k=2)": lambda: SoftmaxGate(4, top_k=2),
    "NoisyTopKGate(noisy=False)": lambda: NoisyTopKGate(4, top_k=2, noisy=False),
    "TSNEGate": lambda: TSNEGate(4),
    "TSNEGate(top_k=2)": lambda: TSNEGate(4, top_k=2),
}

LOAD_LOSS_GATES = {
    "NoisyTopKGate(noisy=True)": lambda: NoisyTopKGate(4, top_k=2, noisy=True),
    "NoisyTopKGate(top_k=1)": lambda: NoisyTopKGate(4, top_k=1),
    # Every token goes to every expert: the load is balanced by construction.
    "SoftmaxGate(top_k=num_experts)": lambda: SoftmaxGate(4, top_k=4),
    "NoisyTopKGate(top_k=num_experts)": lambda: NoisyTopKGate(4, top_k=4),
    "NoisyTopKGate(top_k=num_experts, noisy=False)": lambda: NoisyTopKGate(
        4, top_k=4, noisy=False
    ),
    "TSNEGate(top_k=num_experts)": lambda: TSNEGate(4, top_k=4),
    # A gate that does not say whether its load is smooth is not checked.
    "ReLUGate (no smooth_load)": lambda: ReLUGate(4),
}


@pytest.mark.parametrize("gate_name", sorted(HARD_LOAD_GATES))
def test_check_gate_supports_refuses_load_loss_on_a_hard_load(gate_name):
    gate = HARD_LOAD_GATES[gate_name]()
    assert gate.smooth_load is False
    with pytest.raises(ValueError) as info:
        R.check_gate_supports(R.LoadLoss(), gate, "balance_loss")
    message = str(info.value)
    assert message.startswith("`balance_loss`: LoadLoss needs")
    assert f"{type(gate).__name__} '{gate.name}'" in message
    assert "hard count" in message
    assert "Use ImportanceLoss or SwitchLoadBalanceLoss" in message
    assert "NoisyTopKGate with noisy=True" in message
    # The argument defaults to `balance_loss` and is named as given.
    with pytest.raises(ValueError, match="^`balance_loss`: "):
        R.check_gate_supports(R.LoadLoss(), gate)
    with pytest.raises(ValueError, match="^`gate_loss`: "):
        R.check_gate_supports(R.LoadLoss(0.5), gate, "gate_loss")


@pytest.mark.parametrize("gate_name", sorted(LOAD_LOSS_GATES))
def test_check_gate_supports_accepts_load_loss(gate_name):
    gate = LOAD_LOSS_GATES[gate_name]()
    assert R.check_gate_supports(R.LoadLoss(), gate, "balance_loss") is None


@pytest.mark.parametrize("gate_name", sorted(HARD_LOAD_GATES))
@pytest.mark.parametrize("cls", [cls for cls in ALL_CLASSES if cls is not R.LoadLoss])
def test_check_gate_supports_accepts_terms_without_a_load(gate_name, cls):
    assert cls.needs_smooth_load is False
    assert R.check_gate_supports(cls(), HARD_LOAD_GATES[gate_name](), "balance_loss") is None


@pytest.mark.parametrize(
    "gate, has_load_gradient",
    [
        (lambda: SoftmaxGate(4, top_k=2), False),
        (lambda: NoisyTopKGate(4, top_k=2, noisy=False), False),
        (lambda: NoisyTopKGate(4, top_k=2, noisy=True), True),
    ],
    ids=["SoftmaxGate(top_k=2)", "NoisyTopKGate(noisy=False)", "NoisyTopKGate(noisy=True)"],
)
def test_smooth_load_says_whether_load_loss_has_a_gradient(gate, has_load_gradient):
    """What the check guards: on a hard load LoadLoss would train nothing."""
    gate = gate()
    x = np.random.default_rng(60).normal(size=(32, 3)).astype(np.float32)
    gate.build(x.shape)
    rng = np.random.default_rng(61)
    for weight in gate.trainable_variables:
        weight.assign(rng.normal(size=weight.shape).astype(np.float32))
    value, _, grads = gradients(
        lambda inputs: R.LoadLoss(1.0)(gate(inputs, training=True)),
        inputs=[x],
        variables=gate.trainable_variables,
    )
    assert np.isfinite(value) and value > 0.0
    assert gate.smooth_load is has_load_gradient
    if has_load_gradient:
        assert any(np.any(grad) for grad in grads)
        assert all(np.all(np.isfinite(grad)) for grad in grads)
    else:
        for grad in grads:
            assert_no_gradient(grad)


def test_moe_dense_refuses_load_loss_on_a_softmax_gate_at_construction():
    with pytest.raises(ValueError) as info:
        MoEDense(8, num_experts=4, gate="softmax", top_k=2, balance_loss="load")
    message = str(info.value)
    assert "`balance_loss`" in message and "LoadLoss" in message
    assert "ImportanceLoss or SwitchLoadBalanceLoss" in message
    # Also inside a list of terms, and on a gate layer passed in.
    with pytest.raises(ValueError, match="`balance_loss`: LoadLoss"):
        MoEDense(
            8,
            num_experts=4,
            top_k=2,
            gate=NoisyTopKGate(4, top_k=2, noisy=False),
            balance_loss=["importance", R.LoadLoss(0.1)],
        )


def test_moe_dense_accepts_load_loss_where_the_load_is_smooth():
    layer = MoEDense(8, num_experts=4, gate="noisy_top_k", top_k=2, balance_loss="load")
    assert [type(term) for term in layer.balance_loss] == [R.LoadLoss]
    layer = MoEDense(8, num_experts=4, gate="softmax", top_k=2, balance_loss="importance")
    assert [type(term) for term in layer.balance_loss] == [R.ImportanceLoss]

"""`ExpertMixture`: whole expert sub-models mixed by a gate (paper 002)."""

import warnings

import keras
from keras import ops

from keras_moe import regularizers
from keras_moe import validation
from keras_moe.layers.replica_losses import ReplicaLocalLossesMixin

OUTPUTS = ("logits", "probabilities")


def _as_layer(name, value):
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if not isinstance(value, keras.layers.Layer):
        raise ValueError(
            f"{name} must be a keras Layer or Model (or its serialized config), got "
            f"{type(value).__name__}: {value!r}"
        )
    return value


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertMixture(ReplicaLocalLossesMixin, keras.layers.Layer):
    """Mixes the outputs of whole expert sub-models with a per-example gate.

    `Y'(X) = softmax(sum_i g_i(X) NN_i(X))`: every expert `NN_i` is a Keras layer or
    model mapping the input to a vector of logits of the same width, and the gate
    `g(X)` is a probability vector over the experts, either

    - computed by a gate sub-model (a layer or model whose output is `(batch,
      num_experts)` probabilities, e.g. ending in a softmax), or
    - `gate="oracle"`: read from an integer input (the domain of each example in paper
      002's baseline): `g(X) = one_hot(domain)`. The layer is then called on
      `[x, domain]`, `domain` of shape `(batch,)` or `(batch, 1)`, values in
      `[0, num_experts)`; an id outside that range gets an all-zero gate row.

    Every expert runs on every example (the mixture is soft, as in the paper). Gate
    regularizers passed as `balance_loss` (e.g. `EntropyGateLoss`, `VarianceGateLoss`;
    the same argument as `MoEDense`'s) read
    the gate-output dict (`"gates"`, `"probs"`, `"dispatch_mask"`, `"load"`) and are
    added with `add_loss` in training only. With the oracle gate a gate loss is a
    constant (it has no gradient); it is still added, so that the reported training
    loss of all gates includes the same terms (our choice; the paper reports no loss
    values).

    The gate is cast to float32; the mixture `sum_i g_i NN_i(X)` is formed in float32
    and the output is float32 (the paper's softmax, or its logits), so the class
    probabilities stay exact under mixed precision.

    Args:
        experts: List of at least one Keras layer or model (or their serialized
            configs); each maps the input `x` to logits `(batch, units)`, all with the
            same `units`.
        gate: `"oracle"`, or a Keras layer or model (or its serialized config) mapping
            `x` to `(batch, len(experts))` gate probabilities.
        balance_loss: None, a regularizer from `keras_moe.regularizers` (instance,
            registered name such as `"entropy"` or `"variance"`, or config), or a list
            of them; their coefficients live in the regularizer objects.
        output: `"logits"` (default: `sum_i g_i NN_i(X)`, to be used with a
            `from_logits=True` loss; the paper's `Y'` is its softmax) or
            `"probabilities"` (the paper's `Y'` itself).
        return_gates: If True, `call` returns `(outputs, gates)`, gates
            `(batch, len(experts))` float32.
        **kwargs: Base layer arguments.

    Example:

    >>> experts = [keras.Sequential([keras.layers.Dense(20)]) for _ in range(2)]
    >>> gate = keras.Sequential([keras.layers.Dense(2, activation="softmax")])
    >>> mixture = ExpertMixture(experts, gate=gate, balance_loss="entropy")
    >>> mixture(np.zeros((4, 8), "float32")).shape
    (4, 20)
    >>> oracle = ExpertMixture(
    ...     [keras.layers.Dense(20), keras.layers.Dense(20)], gate="oracle")
    >>> oracle([np.zeros((4, 8), "float32"), np.array([0, 1, 1, 0])]).shape
    (4, 20)

    Reference:
        "Mixture of Experts - Experiment 1" (`shared/papers/002`), sections 1 and 5.1.
    """

    # The gate-output dict's `"load"` counts examples by their largest gate (no
    # gradient): `LoadLoss` is refused here.
    smooth_load = False

    def __init__(
        self,
        experts,
        gate,
        balance_loss=None,
        output="logits",
        return_gates=False,
        gate_loss=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if gate_loss is not None:
            # The argument's name before it matched MoEDense's (and .keras files of
            # then): accepted, with a warning, unless both are given.
            if balance_loss is not None:
                raise ValueError(
                    "Pass the gate regularizers as `balance_loss` only; `gate_loss` is "
                    "its former name."
                )
            warnings.warn(
                "ExpertMixture(gate_loss=...) is now `balance_loss=`.",
                DeprecationWarning,
                stacklevel=2,
            )
            balance_loss = gate_loss
        if not isinstance(experts, (list, tuple)) or len(experts) == 0:
            raise ValueError(
                "experts must be a non-empty list of keras Layers or Models, got "
                f"{experts!r}"
            )
        self.experts = [
            _as_layer(f"experts[{i}]", expert) for i, expert in enumerate(experts)
        ]
        self.num_experts = len(self.experts)
        if isinstance(gate, str):
            validation.one_of("gate", gate, ("oracle",))
            self.oracle = True
            self.gate = None
        else:
            self.oracle = False
            self.gate = _as_layer("gate", gate)
        self.balance_loss = regularizers.get_list(balance_loss, "balance_loss", self)
        self.output_kind = validation.one_of("output", output, OUTPUTS)
        self.return_gates = bool(return_gates)

    # Shapes ----------------------------------------------------------------------------

    def _split_shapes(self, input_shape):
        if self.oracle:
            if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 or not (
                isinstance(input_shape[0], (list, tuple))
            ):
                raise ValueError(
                    "With gate='oracle' the layer is called on [x, domain]; got input "
                    f"shape {input_shape}."
                )
            return tuple(input_shape[0])
        return tuple(input_shape)

    def build(self, input_shape):
        x_shape = self._split_shapes(input_shape)
        for expert in self.experts:
            if not expert.built:
                expert.build(x_shape)
        if self.gate is not None:
            if not self.gate.built:
                self.gate.build(x_shape)
            gate_shape = self.gate.compute_output_shape(x_shape)
            if gate_shape[-1] is not None and gate_shape[-1] != self.num_experts:
                raise ValueError(
                    f"gate must output one probability per expert ({self.num_experts}); "
                    f"its output shape is {gate_shape}."
                )
        units = {tuple(e.compute_output_shape(x_shape))[-1] for e in self.experts}
        if len(units) != 1:
            raise ValueError(
                f"experts must all output the same width; got widths {sorted(units)}."
            )
        self.units = units.pop()

    def compute_output_shape(self, input_shape):
        x_shape = self._split_shapes(input_shape)
        output_shape = tuple(self.experts[0].compute_output_shape(x_shape))
        if self.return_gates:
            return output_shape, (x_shape[0], self.num_experts)
        return output_shape

    # Forward ---------------------------------------------------------------------------

    def compute_gate_outputs(self, inputs, training=None):
        """The gate-output dict for `inputs` (`x`, or `[x, domain]` for the oracle).

        Keys: `"gates"` and `"probs"` (the gate probabilities, float32),
        `"dispatch_mask"` (one-hot of the largest gate) and `"load"` (examples per
        expert by that mask), as in `keras_moe.layers.gates`.
        """
        if self.oracle:
            _, domain = inputs
            domain = ops.reshape(ops.cast(domain, "int32"), (-1,))
            gates = ops.one_hot(domain, self.num_experts, dtype="float32")
        else:
            x = inputs
            gates = ops.cast(self.gate(x, training=training), "float32")
        mask = ops.one_hot(ops.argmax(gates, axis=-1), self.num_experts, dtype="float32")
        return {
            "gates": gates,
            "probs": gates,
            "dispatch_mask": mask,
            "load": ops.sum(mask, axis=0),
        }

    def call(self, inputs, training=None):
        x = inputs[0] if self.oracle else inputs
        gate_outputs = self.compute_gate_outputs(inputs, training=training)
        gates = gate_outputs["gates"]
        if training:
            for regularizer in self.balance_loss:
                self.add_loss(regularizer(gate_outputs))
        mixed = None
        for i, expert in enumerate(self.experts):
            term = gates[:, i : i + 1] * ops.cast(expert(x, training=training), "float32")
            mixed = term if mixed is None else mixed + term
        outputs = mixed if self.output_kind == "logits" else ops.softmax(mixed, axis=-1)
        if self.return_gates:
            return outputs, gates
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "experts": [keras.saving.serialize_keras_object(e) for e in self.experts],
                "gate": "oracle"
                if self.oracle
                else keras.saving.serialize_keras_object(self.gate),
                "balance_loss": [regularizers.serialize(r) for r in self.balance_loss],
                "output": self.output_kind,
                "return_gates": self.return_gates,
            }
        )
        return config

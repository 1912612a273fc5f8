"""`MoEDense`: a dense layer made of gated experts."""

import keras
import numpy as np
from keras import ops

from keras_moe import expert_parallel
from keras_moe import regularizers
from keras_moe.regularizers import reduction
from keras_moe.layers import dispatch as dispatch_lib
from keras_moe import validation
from keras_moe.layers.gates import NoisyTopKGate, SoftmaxGate
from keras_moe.layers.replica_losses import ReplicaLocalLossesMixin

GATES = ("softmax", "noisy_top_k")
EXPERT_WEIGHTS = ("hidden_kernel", "hidden_bias", "kernel", "bias")
DISPATCH_MODES = ("sparse", "capacity", "dense")


SPARSE_BACKENDS = ("tensorflow", "jax")


def _default_dispatch(top_k):
    """Dense for soft gating; for top-k the fastest dropless-or-static mode at hand.

    TensorFlow: sparse. JAX: sparse (`jax.lax.ragged_dot`) on GPUs and TPUs, capacity on
    the CPU, where `ragged_dot` lowers to a masked dense product over every expert (see
    `benchmarks/moe_dense.py --backend jax`). Other backends: capacity.
    """
    if top_k is None:
        return "dense"
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return "sparse"
    if backend == "jax":
        import jax

        return "capacity" if jax.default_backend() == "cpu" else "sparse"
    return "capacity"


def _check_expert_devices(devices, num_experts):
    if devices is None:
        return None
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)) or not devices or not all(
        isinstance(d, str) for d in devices
    ):
        raise ValueError(
            "expert_devices must be None or a non-empty list of TensorFlow device names "
            f"(e.g. ['/GPU:0', '/GPU:1']), got {devices!r}"
        )
    if num_experts % len(devices):
        raise ValueError(
            f"expert_devices: {len(devices)} devices must divide num_experts "
            f"({num_experts}) so that each holds as many experts."
        )
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "expert_devices places experts with TensorFlow's device scopes; on "
            f"{keras.backend.backend()!r} use keras_moe.expert_parallel.expert_parallel()."
        )
    return tuple(devices)


def _per_expert(initializer, num_experts):
    """`initializer` for a stack of `num_experts` expert weights, each scaled as alone.

    Keras's variance-scaling initializers (Glorot, He, LeCun) read a leading axis as a
    receptive field and divide the variance by it: drawn on an (experts, in, out) shape,
    every expert would start `sqrt(experts)` times smaller than the same weight of a
    `Dense` layer. Scaling the variance back by the number of experts gives each expert
    the fans of its own (in, out) matrix, in one draw.
    """
    if (
        not isinstance(initializer, keras.initializers.VarianceScaling)
        or num_experts == 1
        or getattr(initializer, "input_axes", None) is not None
        or getattr(initializer, "output_axes", None) is not None
    ):
        return initializer  # no fans, or fans the user chose
    return keras.initializers.VarianceScaling(
        scale=initializer.scale * num_experts,
        mode=initializer.mode,
        distribution=initializer.distribution,
        seed=initializer.seed,
    )


def _add_global(variable, delta):
    """Adds `delta`, summed over the replicas of a `tf.distribute` strategy, to `variable`.

    The layer's bookkeeping variables (Eigen's running totals, the drop counters) count
    the global batch. They use ONLY_FIRST_REPLICA aggregation and every replica adds the
    same global sum; SUM aggregation would add every replica's `variable + delta`,
    doubling the old value on two replicas at each step.
    """
    variable.assign_add(ops.stop_gradient(reduction.cross_replica_sum(delta)))


@keras.saving.register_keras_serializable(package="keras_moe")
class MoEDense(ReplicaLocalLossesMixin, keras.layers.Layer):
    """A mixture of `num_experts` dense experts behind a gating network.

    Each expert is `activation(x W_e + b_e)` (Eigen et al.'s experts), or with
    `expert_hidden_units` a one-hidden-layer feed-forward network
    `activation(expert_hidden_activation(x U_e + c_e) W_e + b_e)` (Shazeer et al.'s
    experts). Expert weights are stacked along a leading expert axis. The output is
    `sum_e g_e(x) expert_e(x)`, where `g(x)` comes from the gate. Every leading position
    of an input of rank >= 2 is a token routed on its own.

    With `top_k=None` all experts are mixed (soft gating, Eigen); with `top_k=k` only the
    k experts with the largest gate logits get a non-zero gate, and with the default
    `dispatch="sparse"` only those experts are computed for that token.

    Balancing regularizers passed as `balance_loss` are added with `add_loss` in
    training only. Their batch statistics are taken over the global batch under
    `tf.distribute` (Keras then divides every added loss by the replica count), so a
    data-parallel run optimises the same objective as a single device.

    Eigen's assignment constraint (`assignment_margin=m`): the layer keeps the running
    total `G_i` of the gate values given to each expert over the training examples seen.
    While `G_i - mean(G) > m`, expert `i`'s gate is set to zero for the example and the
    gate is renormalised over the remaining experts; gradients still flow through the
    kept gate values. Examples are processed in order within a batch (the paper's rule,
    exact for any batch size), so each total stays within `m + 1` of the mean. Call
    `set_assignment_constraint(False)` for the paper's second, unconstrained phase.
    Under a data-parallel strategy each replica applies the rule to its shard from the
    shared totals, and the totals then add up every replica's assignments.

    Args:
        units: Output width of every expert, >= 1.
        num_experts: Number of experts, >= 1.
        top_k: None for soft gating over all experts, or the number of experts each
            token is sent to, 1 <= top_k <= num_experts.
        gate: `"softmax"` (`SoftmaxGate`: Eigen's gating network with
            `gate_hidden_units`, top-k if `top_k` is set), `"noisy_top_k"`
            (`NoisyTopKGate`, Shazeer's; needs `top_k`) or a gate layer instance
            returning the gate-output dict of `keras_moe.layers.gates`.
        gate_hidden_units: Hidden width of the softmax gate (None: a linear gate).
        expert_hidden_units: None for single-layer experts, or the hidden width of
            two-layer feed-forward experts.
        activation: Activation of each expert's output (Eigen: "relu").
        expert_hidden_activation: Activation of the experts' hidden layer.
        use_bias: Whether experts have biases.
        dispatch: `"sparse"` (dropless, computes only the chosen experts; TensorFlow
            and JAX), `"capacity"` (static shapes for XLA/TPU, drops overflow),
            `"dense"` (every expert on every token) or None: for top-k, sparse on
            TensorFlow and on JAX with a GPU or TPU, capacity on JAX's CPU (where
            `ragged_dot` computes every expert) and other backends; dense for soft
            gating. Sparse and capacity need `top_k`. The dispatch mode changes no
            weight: a model trained with one mode loads its weights into another.
        capacity_factor: Capacity mode's slack, > 0: each expert has
            `ceil(capacity_factor * top_k * tokens / num_experts)` slots (per token
            group).
        token_groups: Capacity dispatch only: split the tokens into this many equal
            groups, each routed on its own with its own slots (GShard's groups), or
            None: one group per device under a `keras_moe.expert_parallel`
            distribution, one group otherwise. A single device with the same
            `token_groups` drops exactly what the sharded layer drops.
        expert_devices: None, or TensorFlow device names (e.g. `["/GPU:0", "/GPU:1"]`),
            as many as divide `num_experts`: the experts are split into that many
            consecutive blocks, each block's weights live on its device and its
            matmuls run there, and TensorFlow moves the token rows (the gate and the
            routing stay on the default device). Saved files hold the stacked weights,
            so a layer trained placed loads unplaced and back, and SavedModels carry no
            device. TensorFlow only (on JAX use `keras_moe.expert_parallel`), and for
            one model replica: not inside a `tf.distribute` strategy of several
            replicas, whose replicas each hold every variable.
        balance_loss: None, a regularizer (instance, registered name or config) from
            `keras_moe.regularizers`, or a list of them; their coefficients live in
            the regularizer objects.
        assignment_margin: None, or Eigen's margin `m >= 0` (soft gating only).
        return_gates: If True, `call` returns `(outputs, gates)` with gates of shape
            `inputs.shape[:-1] + (num_experts,)`.
        kernel_initializer: Initializer of the expert kernels.
        bias_initializer: Initializer of the expert biases.
        **kwargs: Base layer arguments.

    Example:

    >>> layer = MoEDense(64, num_experts=8, top_k=2, gate="noisy_top_k",
    ...                  expert_hidden_units=128,
    ...                  balance_loss=["importance", "load"])
    >>> layer(np.random.rand(32, 16).astype("float32")).shape
    (32, 64)

    References:
        Eigen, Ranzato & Sutskever, "Learning Factored Representations in a Deep
        Mixture of Experts", ICLR workshop 2014.
        Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
        Mixture-of-Experts Layer", ICLR 2017.
    """

    def __init__(
        self,
        units,
        num_experts,
        top_k=None,
        gate="softmax",
        gate_hidden_units=None,
        expert_hidden_units=None,
        activation=None,
        expert_hidden_activation="relu",
        use_bias=True,
        dispatch=None,
        capacity_factor=1.25,
        token_groups=None,
        expert_devices=None,
        balance_loss=None,
        assignment_margin=None,
        return_gates=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = validation.positive_int("units", units)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.top_k = validation.top_k(top_k, self.num_experts)
        self.gate_hidden_units = validation.positive_int(
            "gate_hidden_units", gate_hidden_units, allow_none=True
        )
        self.expert_hidden_units = validation.positive_int(
            "expert_hidden_units", expert_hidden_units, allow_none=True
        )
        self.activation = keras.activations.get(activation)
        self.expert_hidden_activation = keras.activations.get(expert_hidden_activation)
        self.use_bias = bool(use_bias)
        self.capacity_factor = validation.positive_float("capacity_factor", capacity_factor)
        self.token_groups = validation.positive_int("token_groups", token_groups, allow_none=True)
        self.expert_devices = _check_expert_devices(expert_devices, self.num_experts)
        self.assignment_margin = validation.non_negative_float(
            "assignment_margin", assignment_margin, allow_none=True
        )
        self.return_gates = bool(return_gates)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

        if dispatch is None:
            dispatch = _default_dispatch(self.top_k)
        self.dispatch = validation.one_of("dispatch", dispatch, DISPATCH_MODES)
        if self.dispatch != "dense" and self.top_k is None:
            raise ValueError(
                f"`dispatch`={self.dispatch!r} needs `top_k` (an integer with 1 <= top_k "
                f"<= num_experts); with top_k=None every expert runs, use "
                "dispatch='dense'."
            )
        if self.dispatch == "sparse" and keras.backend.backend() not in SPARSE_BACKENDS:
            raise ValueError(
                "`dispatch`='sparse' needs the TensorFlow or JAX backend; on "
                f"{keras.backend.backend()!r} use 'capacity' or 'dense'."
            )
        if self.token_groups is not None and self.dispatch != "capacity":
            raise ValueError(
                f"`token_groups` applies to dispatch='capacity'; got dispatch="
                f"{self.dispatch!r}."
            )
        if self.assignment_margin is not None and self.top_k is not None:
            raise ValueError(
                "`assignment_margin` applies to soft gating (top_k=None), as in Eigen et "
                f"al.; got top_k={self.top_k}."
            )

        self.gate = self._make_gate(gate)
        self.balance_loss = regularizers.get_list(balance_loss, "balance_loss", self.gate)

    def _make_gate(self, gate):
        if isinstance(gate, keras.layers.Layer):
            return self._check_gate_layer(gate)
        if isinstance(gate, dict):
            return self._make_gate(keras.saving.deserialize_keras_object(gate))
        if not isinstance(gate, str):
            raise ValueError(
                f"`gate` must be one of {', '.join(map(repr, GATES))} or a gate layer "
                f"(e.g. keras_moe.layers.SoftmaxGate); got {gate!r}"
            )
        validation.one_of("gate", gate, GATES)
        if gate == "softmax":
            return SoftmaxGate(
                self.num_experts,
                top_k=self.top_k,
                hidden_units=self.gate_hidden_units,
                name="gate",
            )
        if self.top_k is None:
            raise ValueError(
                "`gate`='noisy_top_k' needs `top_k`: an integer with 1 <= top_k <= "
                f"num_experts ({self.num_experts}); got None."
            )
        return NoisyTopKGate(self.num_experts, top_k=self.top_k, name="gate")

    def _check_gate_layer(self, gate):
        """A gate layer passed as `gate` must agree with this layer on experts and k."""
        gate_experts = getattr(gate, "num_experts", None)
        if gate_experts is None:
            raise ValueError(
                f"`gate` must be one of {', '.join(map(repr, GATES))} or a gate layer "
                "with a `num_experts` attribute that returns the gate-output dict of "
                "keras_moe.layers.gates (SoftmaxGate, NoisyTopKGate, TSNEGate, ...); got "
                f"a {type(gate).__name__} layer without `num_experts`."
            )
        if gate_experts != self.num_experts:
            raise ValueError(
                f"`gate` has num_experts={gate_experts} but the layer has "
                f"num_experts={self.num_experts}; they must agree."
            )
        gate_top_k = getattr(gate, "top_k", None)
        if gate_top_k != self.top_k:
            raise ValueError(
                f"`gate` has top_k={gate_top_k} but the layer has top_k={self.top_k}; "
                "they must agree."
            )
        return gate

    def build(self, input_shape):
        input_dim = validation.last_dim(self, input_shape)
        # Inputs of another width then fail in Keras's input check, naming this layer
        # and the expected width, not inside a matmul.
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: input_dim})
        if not self.gate.built:
            self.gate.build((None, input_dim))
        # A gate layer that returns something else than the gate-output dict fails here,
        # when the model is put together, not at its first training step.
        self._checked_gate_outputs(
            self.gate.compute_output_spec(keras.KerasTensor((None, input_dim)))
        )
        if self.expert_devices is not None:
            import tensorflow as tf

            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            if replicas > 1:
                raise ValueError(
                    f"MoEDense '{self.name}': expert_devices places one copy of the "
                    f"experts over devices; under a tf.distribute strategy of {replicas} "
                    "replicas every replica holds every variable. Build it outside the "
                    "strategy."
                )
        with expert_parallel.expert_weights(self.num_experts):
            self._build_experts(input_dim)
        if self.assignment_margin is not None:
            self.assignment_totals = self.add_weight(
                name="assignment_totals",
                shape=(self.num_experts,),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                aggregation="only_first_replica",
            )
            self.assignment_constraint_active = self.add_weight(
                name="assignment_constraint_active",
                shape=(),
                initializer="ones",
                trainable=False,
                dtype="float32",
                aggregation="only_first_replica",
            )
        if self.top_k is not None:
            # Every top-k layer keeps both counters, whatever its dispatch mode (only
            # capacity dispatch drops), so that weights move between dispatch modes:
            # train sparse, serve capacity under XLA, and back.
            self.dropped_assignments = self.add_weight(
                name="dropped_assignments",
                shape=(),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                aggregation="only_first_replica",
            )
            self.routed_assignments = self.add_weight(
                name="routed_assignments",
                shape=(),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                aggregation="only_first_replica",
            )

    # Experts ---------------------------------------------------------------------------

    def _expert_weight_specs(self, input_dim):
        """(name, shape of one expert's weight, initializer) of each stacked weight."""
        specs = []
        width = input_dim
        if self.expert_hidden_units is not None:
            specs.append(("hidden_kernel", (input_dim, self.expert_hidden_units),
                          self.kernel_initializer))
            if self.use_bias:
                specs.append(("hidden_bias", (self.expert_hidden_units,), self.bias_initializer))
            width = self.expert_hidden_units
        specs.append(("kernel", (width, self.units), self.kernel_initializer))
        if self.use_bias:
            specs.append(("bias", (self.units,), self.bias_initializer))
        return specs

    def _build_experts(self, input_dim):
        """The stacked expert weights (leading expert axis), in one piece, or in one
        piece per device of `expert_devices`; split over devices under
        `keras_moe.expert_parallel`."""
        for name in EXPERT_WEIGHTS:
            setattr(self, name, None)
        specs = self._expert_weight_specs(input_dim)
        if self.expert_devices is None:
            for name, shape, initializer in specs:
                setattr(self, name, self.add_weight(
                    name=name, shape=(self.num_experts,) + shape,
                    initializer=_per_expert(initializer, self.num_experts),
                ))
            self._expert_shards = [(None, {name: getattr(self, name) for name, _, _ in specs})]
            return
        import tensorflow as tf

        per_device = self.num_experts // len(self.expert_devices)
        self._expert_shards = [(device, {}) for device in self.expert_devices]
        for name, shape, initializer in specs:
            # One draw for all experts, then sliced, so that a placed layer starts from
            # the values an unplaced one with the same seed would.
            full = _per_expert(initializer, self.num_experts)((self.num_experts,) + shape)
            for index, (device, weights) in enumerate(self._expert_shards):
                piece = full[index * per_device:(index + 1) * per_device]
                with tf.device(device):
                    weights[name] = self.add_weight(
                        name=f"{name}_{index}", shape=(per_device,) + shape,
                        initializer=lambda shape, dtype=None, piece=piece: ops.cast(piece, dtype),
                    )

    def stacked_expert_weights(self):
        """Each stacked expert weight as one (experts, ...) tensor, placed or not.

        Returns:
            Dict of name (`"hidden_kernel"`, `"hidden_bias"`, `"kernel"`, `"bias"`, those
            present) to tensor, in that order.
        """
        names = [name for name in EXPERT_WEIGHTS if name in self._expert_shards[0][1]]
        if len(self._expert_shards) == 1:
            return {name: self._expert_shards[0][1][name] for name in names}
        return {
            name: ops.concatenate(
                [ops.convert_to_tensor(weights[name]) for _, weights in self._expert_shards],
                axis=0,
            )
            for name in names
        }

    def _bookkeeping_variables(self):
        names = ("assignment_totals", "assignment_constraint_active", "dropped_assignments",
                 "routed_assignments")
        return [getattr(self, n) for n in names if getattr(self, n, None) is not None]

    def save_own_variables(self, store):
        # The stacked expert weights first, then the bookkeeping: the order Keras uses
        # for an unplaced layer, whatever the placement, so that files stay
        # device-agnostic (a layer trained placed loads unplaced, and back).
        index = 0
        for value in self.stacked_expert_weights().values():
            store[str(index)] = ops.convert_to_numpy(value)
            index += 1
        for variable in self._bookkeeping_variables():
            store[str(index)] = ops.convert_to_numpy(variable)
            index += 1

    def load_own_variables(self, store):
        names = list(self.stacked_expert_weights())
        bookkeeping = self._bookkeeping_variables()
        if len(store.keys()) != len(names) + len(bookkeeping):
            raise ValueError(
                f"MoEDense '{self.name}' has {len(names) + len(bookkeeping)} variables "
                f"to load ({names} and {len(bookkeeping)} counters), the file has "
                f"{len(store.keys())}."
            )
        for index, name in enumerate(names):
            value = store[str(index)]
            pieces = len(self._expert_shards)
            for part, (_, weights) in zip(np.split(np.asarray(value), pieces), self._expert_shards):
                weights[name].assign(part)
        for offset, variable in enumerate(bookkeeping):
            variable.assign(store[str(len(names) + offset)])

    def _expert(self, x, hidden_kernel, hidden_bias, kernel, bias):
        """One expert on a (tokens, features) or a batched (experts, tokens, features) x."""
        if hidden_kernel is not None:
            x = ops.matmul(x, hidden_kernel)
            if hidden_bias is not None:
                x = x + hidden_bias
            x = self.expert_hidden_activation(x)
        y = ops.matmul(x, kernel)
        if bias is not None:
            y = y + bias
        return self.activation(y)

    def _on_each_device(self, compute):
        """`compute(weights)` for each piece of the experts, on the piece's device."""
        if self.expert_devices is None:
            return [compute(self._expert_shards[0][1])]
        import tensorflow as tf

        results = []
        for device, weights in self._expert_shards:
            with tf.device(device):
                results.append(compute(weights))
        return results

    def _batched_experts(self, expert_inputs):
        """(experts or 1, n, features) -> (experts, n, units), expert e on slice e (a
        leading 1 broadcasts the same rows to every expert)."""
        pieces = len(self._expert_shards)
        if expert_inputs.shape[0] == 1 or pieces == 1:
            inputs = [expert_inputs] * pieces
        else:
            inputs = ops.split(expert_inputs, pieces, axis=0)
        inputs = iter(inputs)

        def compute(weights):
            hidden_bias = weights.get("hidden_bias")
            bias = weights.get("bias")
            return self._expert(
                next(inputs),
                weights.get("hidden_kernel"),
                None if hidden_bias is None else hidden_bias[:, None, :],
                weights["kernel"],
                None if bias is None else bias[:, None, :],
            )

        outputs = self._on_each_device(compute)
        return outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=0)

    def _grouped_experts(self, expert_inputs, tokens_per_expert):
        """(n, features) rows sorted by expert -> (n, units), each row through its expert."""
        dtype = expert_inputs.dtype
        pieces = len(self._expert_shards)
        if pieces == 1:
            rows, counts = [expert_inputs], [tokens_per_expert]
        else:
            import tensorflow as tf

            counts = tf.split(tokens_per_expert, pieces)
            rows = tf.split(expert_inputs, [tf.reduce_sum(c) for c in counts])
        work = iter(zip(rows, counts))

        def cast(weight):
            return None if weight is None else ops.cast(weight, dtype)

        def compute(weights):
            piece_rows, piece_counts = next(work)
            layers = []
            if self.expert_hidden_units is not None:
                layers.append((cast(weights["hidden_kernel"]), cast(weights.get("hidden_bias"))))
            layers.append((cast(weights["kernel"]), cast(weights.get("bias"))))
            return dispatch_lib.grouped_ffn(
                piece_rows, piece_counts, layers, hidden_activation=self.expert_hidden_activation
            )

        outputs = self._on_each_device(compute)
        outputs = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=0)
        return self.activation(outputs)

    # Eigen's assignment constraint ----------------------------------------------------

    def set_assignment_constraint(self, active):
        """Switches Eigen's running-assignment constraint on or off (phase 2: off).

        Takes effect without recompiling the model: the switch is a layer variable.
        """
        if self.assignment_margin is None:
            raise ValueError(
                "This layer has no assignment constraint: build it with "
                "`assignment_margin` set to a number >= 0."
            )
        self.assignment_constraint_active.assign(1.0 if active else 0.0)

    def reset_assignment_totals(self):
        """Sets every running assignment total back to zero."""
        self.assignment_totals.assign(ops.zeros_like(self.assignment_totals))

    def _constrain_assignments(self, gates):
        margin = self.assignment_margin

        def step(totals, gate):
            over = (totals - ops.mean(totals)) > margin
            allowed = 1.0 - ops.cast(over, "float32")
            kept = gate * allowed
            kept = kept / ops.maximum(ops.sum(kept), 1e-30)
            return totals + kept, allowed

        start = ops.convert_to_tensor(self.assignment_totals)

        def constrained():
            totals, allowed = ops.scan(step, start, ops.stop_gradient(gates))
            kept = gates * allowed
            norm = ops.sum(kept, axis=-1, keepdims=True)
            # A row whose allowed experts all have gates that underflowed to 0 falls back
            # to uniform weights over the allowed experts instead of dividing by zero.
            uniform = allowed / ops.sum(allowed, axis=-1, keepdims=True)
            kept = ops.where(norm > 1e-30, kept / ops.maximum(norm, 1e-30), uniform)
            return kept, totals - start

        def free():
            return gates, ops.zeros_like(start)

        # The branches only compute; the running totals are updated after the cond, so
        # that on JAX no traced value escapes a branch into the variable.
        gates, added = ops.cond(self.assignment_constraint_active > 0.5, constrained, free)
        _add_global(self.assignment_totals, added)
        return gates

    # Forward ---------------------------------------------------------------------------

    def call(self, inputs, training=None):
        input_dim = inputs.shape[-1]
        token_axes = len(inputs.shape) - 1
        leading_shape = tuple(ops.shape(inputs)[:-1])
        tokens = inputs if token_axes == 1 else ops.reshape(inputs, (-1, input_dim))

        gate_outputs = self._gate_outputs(tokens, training)
        gates = gate_outputs["gates"]
        if training and self.assignment_margin is not None:
            gates = self._constrain_assignments(gates)
            gate_outputs["gates"] = gates
        if training:
            for regularizer in self.balance_loss:
                self.add_loss(regularizer(gate_outputs))

        if self.dispatch == "dense":
            outputs = dispatch_lib.dense_combine(
                self._batched_experts(ops.expand_dims(tokens, 0)), gates
            )
        else:
            top_k_indices, top_k_gates = self._top_k_assignments(gate_outputs)
            if self.dispatch == "sparse":
                if expert_parallel.current() is not None:
                    raise ValueError(
                        f"MoEDense '{self.name}': dispatch='sparse' does not run under "
                        "expert_parallel (its row counts per device are data-dependent); "
                        "use dispatch='capacity', which the distribution splits over "
                        "the devices."
                    )
                outputs = dispatch_lib.sparse_dispatch(
                    tokens, top_k_indices, top_k_gates, self.num_experts, self._grouped_experts
                )
            else:
                outputs, dropped = self._capacity_dispatch(tokens, top_k_indices, top_k_gates)
                _add_global(self.dropped_assignments, ops.cast(dropped, "float32"))
        if self.top_k is not None:
            assignments = ops.shape(tokens)[0] * self.top_k
            _add_global(self.routed_assignments, ops.cast(assignments, "float32"))

        if token_axes > 1:
            outputs = ops.reshape(outputs, leading_shape + (self.units,))
            gates = ops.reshape(gates, leading_shape + (self.num_experts,))
        if self.return_gates:
            return outputs, gates
        return outputs

    def _capacity_dispatch(self, tokens, top_k_indices, top_k_gates):
        """Capacity dispatch by token groups: `token_groups`, or one per device of an
        active `keras_moe.expert_parallel` distribution (whose placement it applies)."""
        groups, shard = expert_parallel.shard_dispatch()
        if self.token_groups is not None:
            if shard is not None and self.token_groups % groups:
                raise ValueError(
                    f"token_groups={self.token_groups} must be a multiple of the "
                    f"{groups} devices of the expert-parallel distribution."
                )
            groups = self.token_groups
        static_tokens = tokens.shape[0]
        num_tokens = static_tokens if static_tokens is not None else ops.shape(tokens)[0]
        if groups > 1:
            if static_tokens is None or static_tokens % groups:
                raise ValueError(
                    f"MoEDense '{self.name}': capacity dispatch over {groups} token groups "
                    f"needs a number of tokens divisible by {groups}, got {static_tokens} "
                    "(batch size times positions per example)."
                )
            num_tokens = static_tokens // groups
        capacity = dispatch_lib.expert_capacity(
            num_tokens, self.top_k, self.num_experts, self.capacity_factor
        )
        return dispatch_lib.capacity_dispatch(
            tokens,
            top_k_indices,
            top_k_gates,
            self.num_experts,
            capacity,
            self._batched_experts,
            groups=groups,
            shard=shard,
        )

    def _gate_outputs(self, tokens, training):
        return self._checked_gate_outputs(self.gate(tokens, training=training))

    def _checked_gate_outputs(self, outputs):
        if not isinstance(outputs, dict) or "gates" not in outputs:
            raise ValueError(
                f"`gate` ({type(self.gate).__name__} '{self.gate.name}') must return the "
                "gate-output dict of keras_moe.layers.gates (at least 'gates', shape "
                f"(tokens, {self.num_experts})); it returned {type(outputs).__name__}."
            )
        width = outputs["gates"].shape[-1]
        if width is not None and width != self.num_experts:
            raise ValueError(
                f"`gate` ({type(self.gate).__name__} '{self.gate.name}') returned gates "
                f"for {width} experts; the layer has num_experts={self.num_experts}."
            )
        return dict(outputs)

    def _top_k_assignments(self, gate_outputs):
        missing = [k for k in ("top_k_indices", "top_k_gates") if k not in gate_outputs]
        if missing:
            raise ValueError(
                f"dispatch={self.dispatch!r} needs the gate to return {missing}; "
                f"{type(self.gate).__name__} did not. Use a top-k gate or dispatch='dense'."
            )
        return gate_outputs["top_k_indices"], gate_outputs["top_k_gates"]

    @property
    def dropped_fraction(self):
        """Fraction of token-assignments dropped by capacity dispatch since the last reset.

        Always 0.0 for sparse and dense dispatch (they drop nothing) and soft gating.
        """
        if self.top_k is None:
            return 0.0
        routed = float(ops.convert_to_numpy(self.routed_assignments))
        dropped = float(ops.convert_to_numpy(self.dropped_assignments))
        return dropped / routed if routed else 0.0

    def reset_drop_counters(self):
        """Zeroes the counters of dropped and routed assignments (top-k layers)."""
        if self.top_k is not None:
            self.dropped_assignments.assign(0.0)
            self.routed_assignments.assign(0.0)

    def compute_output_shape(self, input_shape):
        output_shape = tuple(input_shape[:-1]) + (self.units,)
        if self.return_gates:
            return output_shape, tuple(input_shape[:-1]) + (self.num_experts,)
        return output_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "gate": keras.saving.serialize_keras_object(self.gate),
                "gate_hidden_units": self.gate_hidden_units,
                "expert_hidden_units": self.expert_hidden_units,
                "activation": keras.activations.serialize(self.activation),
                "expert_hidden_activation": keras.activations.serialize(
                    self.expert_hidden_activation
                ),
                "use_bias": self.use_bias,
                "dispatch": self.dispatch,
                "capacity_factor": self.capacity_factor,
                "token_groups": self.token_groups,
                "expert_devices": None if self.expert_devices is None else list(
                    self.expert_devices
                ),
                "balance_loss": [regularizers.serialize(r) for r in self.balance_loss],
                "assignment_margin": self.assignment_margin,
                "return_gates": self.return_gates,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config

"""`MoEDense`: a dense layer made of gated experts."""

import keras
from keras import ops

from keras_moe import expert_parallel
from keras_moe import regularizers
from keras_moe import validation
from keras_moe.layers import dispatch as dispatch_lib
from keras_moe.layers.assignment_constraint import AssignmentConstraint
from keras_moe.layers.experts import GATED_EXPERTS, StackedExperts, check_expert_devices
from keras_moe.layers.gates import NoisyTopKGate, SoftmaxGate
from keras_moe.layers.routing_gates import ExpertChoiceGate, SigmoidTopKGate
from keras_moe.layers.replica_losses import ReplicaLocalLossesMixin
from keras_moe.regularizers.reduction import add_global

GATES = ("softmax", "noisy_top_k", "sigmoid_top_k", "expert_choice")
DISPATCH_MODES = ("sparse", "capacity", "dense")
# MoEDense arguments that configure the gate it makes from a name (see `_make_gate`).
ROUTING_OPTIONS = ("bias_update_rate", "num_groups", "top_k_groups")


SPARSE_BACKENDS = ("tensorflow", "jax")


def _default_dispatch(top_k, expert_choice=False):
    """Dense for soft gating; for top-k the fastest dropless-or-static mode at hand.

    TensorFlow: sparse. JAX: sparse (`jax.lax.ragged_dot`) on GPUs and TPUs, capacity on
    the CPU, where `ragged_dot` lowers to a masked dense product over every expert (see
    `benchmarks/moe_dense.py --backend jax`). Other backends: capacity. Expert choice:
    capacity (each expert takes a fixed number of tokens; sparse runs the same path).
    """
    if expert_choice:
        return "capacity"
    if top_k is None:
        return "dense"
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return "sparse"
    if backend == "jax":
        import jax

        return "capacity" if jax.default_backend() == "cpu" else "sparse"
    return "capacity"


@keras.saving.register_keras_serializable(package="keras_moe")
class MoEDense(StackedExperts, AssignmentConstraint, ReplicaLocalLossesMixin,
               keras.layers.Layer):
    """A mixture of `num_experts` dense experts behind a gating network.

    Each expert is `activation(x W_e + b_e)` (Eigen et al.'s experts), or with
    `expert_hidden_units` a one-hidden-layer feed-forward network
    `activation(expert_hidden_activation(x U_e + c_e) W_e + b_e)` (Shazeer et al.'s
    experts). Expert weights are stacked along a leading expert axis. The output is
    `sum_e g_e(x) expert_e(x)`, where `g(x)` comes from the gate. Every leading position
    of an input of rank >= 2 is a token routed on its own.

    With `top_k=None` all experts are mixed (soft gating, Eigen); with `top_k=k` only the
    k experts with the largest gate logits get a non-zero gate, and with the default
    `dispatch="sparse"` only those experts are computed for that token. With
    `gate="expert_choice"` (Zhou et al. 2022, no `top_k`) the experts choose their
    tokens instead: each takes `ceil(capacity_factor * tokens / num_experts)`, and only
    those run; a token no expert took gets zeros (plus the shared experts' output) and
    is counted in `dropped_fraction`.

    Routing of current MoE models (see `keras_moe.layers.routing`): `gate=
    "sigmoid_top_k"` (DeepSeek-V3), auxiliary-loss-free balancing (`bias_update_rate`,
    Wang et al. 2024), group-limited routing (`num_groups`, `top_k_groups`) and shared
    experts (`num_shared_experts`, DeepSeekMoE). DeepSeekMoE's fine-grained experts are
    this layer with many small experts and a larger k: for example
    `MoEDense(units, num_experts=64, top_k=8, expert_hidden_units=d_ff // 8,
    num_shared_experts=2, gate="sigmoid_top_k", bias_update_rate=1e-3)` splits each of
    eight experts of hidden width `d_ff` into eight of `d_ff / 8` (same parameters and
    compute per token) and keeps two always-on experts for common knowledge.

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
            (`NoisyTopKGate`, Shazeer's; needs `top_k`), `"sigmoid_top_k"`
            (`SigmoidTopKGate`, DeepSeek-V3's; needs `top_k`), `"expert_choice"`
            (`ExpertChoiceGate` with this layer's `capacity_factor`; `top_k` must be
            None) or a gate layer instance returning the gate-output dict of
            `keras_moe.layers.gates`.
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
            group). With `gate="expert_choice"`: the mean number of experts per token
            (each expert takes `ceil(capacity_factor * tokens / num_experts)`).
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
        num_shared_experts: Experts of the same shape that every token passes through,
            >= 0; their outputs are added to the routed output (DeepSeekMoE). They are
            replicated, never split, under `keras_moe.expert_parallel`.
        bias_update_rate: For a gate made from a top-k name: None, or the rate
            gamma >= 0 of auxiliary-loss-free balancing (a per-expert bias in the
            choice of experts only, stepped by `gamma * sign(mean load - load_e)` after
            each training step, over the global batch; DeepSeek-V3: 1e-3). With a gate
            layer, set it there (if set here too, the two must agree).
        num_groups: For a gate made from a top-k name: None, or the number of equal
            expert groups of group-limited routing (DeepSeek-V2/V3; with
            `top_k_groups`). With a gate layer, as `bias_update_rate`.
        top_k_groups: The groups each token keeps, 1 <= top_k_groups <= num_groups.
        gated_experts: None for the experts above, or a gated linear unit (GLU) inside
            each two-layer expert: `down(glu(gate(x), up(x)))`, with `hidden_kernel`
            (and `hidden_bias`) the up projection, `gate_kernel` (and `gate_bias`) the
            gate projection, both (experts, in, `expert_hidden_units`), and `kernel`
            the down projection; `expert_hidden_activation` is then unused.
            `"swiglu"`: `silu(g) * u` (Mixtral, Qwen-MoE, Qwen3-MoE); `"geglu"`:
            `gelu(g) * u` (exact GELU); `"geglu_tanh"`: GELU's tanh approximation
            (Gemma); `"clamped_swiglu"`: GPT-OSS's `(clip(u, -7, 7) + 1) * g' *
            sigmoid(1.702 g')` with `g' = min(g, 7)`. Needs `expert_hidden_units`.
        shared_expert_gate: With `num_shared_experts`: if True, the shared experts'
            summed output is scaled per token by `sigmoid(x w)`, `w` an (in, 1) kernel
            without bias (Qwen-MoE's shared-expert gate).
        **kwargs: Base layer arguments.

    Example:

    >>> layer = MoEDense(64, num_experts=8, top_k=2, gate="noisy_top_k",
    ...                  expert_hidden_units=128,
    ...                  balance_loss=["importance", "load"])
    >>> layer(np.random.rand(32, 16).astype("float32")).shape
    (32, 64)

    Mixtral's experts (SwiGLU, no biases, softmax over the two chosen experts):

    >>> layer = MoEDense(16, num_experts=8, top_k=2, expert_hidden_units=56,
    ...                  gated_experts="swiglu", use_bias=False)
    >>> layer(np.random.rand(32, 16).astype("float32")).shape
    (32, 16)

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
        num_shared_experts=0,
        bias_update_rate=None,
        num_groups=None,
        top_k_groups=None,
        gated_experts=None,
        shared_expert_gate=False,
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
        self.expert_devices = check_expert_devices(expert_devices, self.num_experts)
        self.assignment_margin = validation.non_negative_float(
            "assignment_margin", assignment_margin, allow_none=True
        )
        self.return_gates = bool(return_gates)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.num_shared_experts = validation.integer(
            "num_shared_experts", num_shared_experts, minimum=0)
        self.bias_update_rate = validation.non_negative_float(
            "bias_update_rate", bias_update_rate, allow_none=True)
        self.num_groups = num_groups
        self.top_k_groups = top_k_groups
        self.gated_experts = None if gated_experts is None else validation.one_of(
            "gated_experts", gated_experts, GATED_EXPERTS)
        if self.gated_experts is not None and self.expert_hidden_units is None:
            raise ValueError(
                f"`gated_experts`={self.gated_experts!r} makes each expert "
                "`down(glu(gate(x), up(x)))`: it needs `expert_hidden_units` (the width "
                "of the gate and up projections); got None."
            )
        self.shared_expert_gate = bool(shared_expert_gate)
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError(
                "`shared_expert_gate`=True scales the shared experts' output by "
                "sigmoid(x w): it needs `num_shared_experts` >= 1; got 0."
            )

        self.gate = self._make_gate(gate)
        self.num_groups, self.top_k_groups = (getattr(self.gate, "num_groups", None),
                                              getattr(self.gate, "top_k_groups", None))
        self.bias_update_rate = getattr(self.gate, "bias_update_rate", None)
        self.expert_choice = isinstance(self.gate, ExpertChoiceGate)
        if dispatch is None:
            dispatch = _default_dispatch(self.top_k, self.expert_choice)
        self.dispatch = validation.one_of("dispatch", dispatch, DISPATCH_MODES)
        if self.dispatch != "dense" and self.top_k is None and not self.expert_choice:
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
        if self.token_groups is not None and (self.dispatch != "capacity"
                                              or self.expert_choice):
            raise ValueError(
                f"`token_groups` applies to dispatch='capacity' with a top-k gate; got "
                f"dispatch={self.dispatch!r}"
                + (" with an expert-choice gate." if self.expert_choice else ".")
            )
        if self.assignment_margin is not None and (self.top_k is not None
                                                   or self.expert_choice):
            raise ValueError(
                "`assignment_margin` applies to soft gating (top_k=None), as in Eigen et "
                f"al.; got top_k={self.top_k}"
                + (" with an expert-choice gate." if self.expert_choice else ".")
            )
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
        routing = {"bias_update_rate": self.bias_update_rate, "num_groups": self.num_groups,
                   "top_k_groups": self.top_k_groups}
        if gate == "expert_choice":
            given = [f"{k}={v!r}" for k, v in routing.items() if v is not None]
            if self.top_k is not None or given:
                raise ValueError(
                    "`gate`='expert_choice' routes without `top_k` (each expert takes "
                    "`capacity_factor * tokens / num_experts` tokens) and without "
                    "bias_update_rate, num_groups or top_k_groups; got "
                    + ", ".join([f"top_k={self.top_k}"] * (self.top_k is not None) + given)
                    + "."
                )
            return ExpertChoiceGate(self.num_experts, capacity_factor=self.capacity_factor,
                                    name="gate")
        if gate == "softmax":
            return SoftmaxGate(
                self.num_experts,
                top_k=self.top_k,
                hidden_units=self.gate_hidden_units,
                name="gate",
                **routing,
            )
        if self.top_k is None:
            raise ValueError(
                f"`gate`={gate!r} needs `top_k`: an integer with 1 <= top_k <= "
                f"num_experts ({self.num_experts}); got None."
            )
        if gate == "sigmoid_top_k":
            return SigmoidTopKGate(self.num_experts, top_k=self.top_k, name="gate", **routing)
        return NoisyTopKGate(self.num_experts, top_k=self.top_k, name="gate", **routing)

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
        for option in ROUTING_OPTIONS:
            mine, its = getattr(self, option), getattr(gate, option, None)
            if mine is not None and mine != its:
                raise ValueError(
                    f"`gate` has {option}={its!r} but the layer was given {option}="
                    f"{mine!r}; set it on the gate layer (or give the gate by name)."
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
        needs_sequences = [type(r).__name__ for r in self.balance_loss
                           if getattr(r, "needs_sequences", False)]
        if needs_sequences and len(input_shape) != 3:
            raise ValueError(
                f"MoEDense '{self.name}': {', '.join(needs_sequences)} in `balance_loss` "
                "reads sequences: the layer's inputs must be (batch, sequence, features); "
                f"got inputs of shape {tuple(input_shape)}."
            )
        with expert_parallel.expert_weights(self.num_experts):
            self._build_experts(input_dim)
        self._build_shared_experts(input_dim)
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
        if self.top_k is not None or self.expert_choice:
            # Every top-k layer keeps both counters, whatever its dispatch mode (only
            # capacity dispatch drops), so that weights move between dispatch modes:
            # train sparse, serve capacity under XLA, and back. An expert-choice layer
            # counts the tokens that no expert took, out of all tokens.
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

    def _bookkeeping_variables(self):
        names = ("assignment_totals", "assignment_constraint_active", "dropped_assignments",
                 "routed_assignments")
        return [getattr(self, n) for n in names if getattr(self, n, None) is not None]

    # Forward ---------------------------------------------------------------------------

    def call(self, inputs, training=None):
        input_dim = inputs.shape[-1]
        token_axes = len(inputs.shape) - 1
        leading_shape = tuple(ops.shape(inputs)[:-1])
        tokens = inputs if token_axes == 1 else ops.reshape(inputs, (-1, input_dim))

        gate_outputs = self._gate_outputs(tokens, training)
        if token_axes == 2:  # (batch, sequence, features): sequence-wise losses read it
            gate_outputs["tokens_per_sequence"] = (
                inputs.shape[1] if inputs.shape[1] is not None else ops.shape(inputs)[1])
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
        elif self.expert_choice:
            self._refuse_under_expert_parallel("expert-choice routing (each expert "
                                               "chooses among all the batch's tokens)")
            outputs = dispatch_lib.expert_choice_dispatch(
                tokens, gate_outputs["expert_choice_indices"],
                gate_outputs["expert_choice_gates"], self._batched_experts)
        else:
            top_k_indices, top_k_gates = self._top_k_assignments(gate_outputs)
            if self.dispatch == "sparse":
                self._refuse_under_expert_parallel(
                    "dispatch='sparse' (its row counts per device are data-dependent); "
                    "use dispatch='capacity', which the distribution splits over the "
                    "devices")
                outputs = dispatch_lib.sparse_dispatch(
                    tokens, top_k_indices, top_k_gates, self.num_experts, self._grouped_experts
                )
            else:
                outputs, dropped = self._capacity_dispatch(tokens, top_k_indices, top_k_gates)
                add_global(self.dropped_assignments, ops.cast(dropped, "float32"))
        if self.top_k is not None:
            assignments = ops.shape(tokens)[0] * self.top_k
            add_global(self.routed_assignments, ops.cast(assignments, "float32"))
        if self.expert_choice:
            experts_per_token = ops.sum(gate_outputs["dispatch_mask"], axis=-1)
            unrouted = ops.sum(ops.cast(experts_per_token == 0, "float32"))
            add_global(self.dropped_assignments, unrouted)
            add_global(self.routed_assignments, ops.cast(ops.shape(tokens)[0], "float32"))
        if self.num_shared_experts:
            outputs = outputs + self._shared_expert_outputs(tokens)

        if token_axes > 1:
            outputs = ops.reshape(outputs, leading_shape + (self.units,))
            gates = ops.reshape(gates, leading_shape + (self.num_experts,))
        if self.return_gates:
            return outputs, gates
        return outputs

    def _refuse_under_expert_parallel(self, what):
        if expert_parallel.current() is not None:
            raise ValueError(f"MoEDense '{self.name}': {what} does not run under "
                             "keras_moe.expert_parallel.")

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
        With an expert-choice gate: the fraction of tokens that no expert took (in any
        dispatch mode).
        """
        if self.top_k is None and not self.expert_choice:
            return 0.0
        routed = float(ops.convert_to_numpy(self.routed_assignments))
        dropped = float(ops.convert_to_numpy(self.dropped_assignments))
        return dropped / routed if routed else 0.0

    def reset_drop_counters(self):
        """Zeroes the counters of dropped and routed assignments (top-k and expert-choice
        layers)."""
        if self.top_k is not None or self.expert_choice:
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
                "num_shared_experts": self.num_shared_experts,
                "bias_update_rate": self.bias_update_rate,
                "num_groups": self.num_groups,
                "top_k_groups": self.top_k_groups,
                "gated_experts": self.gated_experts,
                "shared_expert_gate": self.shared_expert_gate,
            }
        )
        return config

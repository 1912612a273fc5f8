"""Gating networks: they decide, per token, how much each expert contributes.

Every gate layer returns a dict of float32 tensors (the *gate outputs*) that the MoE layers
combine with and that the balancing regularizers of `keras_moe.regularizers` read:

- `"gates"`: (tokens, experts) combine weights; for top-k gates zero outside the top k.
- `"logits"`: (tokens, experts) clean gate logits (before noise).
- `"probs"`: (tokens, experts) softmax over all clean logits (router probabilities).
- `"dispatch_mask"`: (tokens, experts) 1.0 where the token is sent to that expert.
- `"load"`: (experts,) tokens per expert (smooth estimate for noisy top-k in training;
  summed over replicas in training, this replica's count otherwise).
- `"top_k_indices"` (int32) and `"top_k_gates"`: (tokens, k), only for top-k gates; the
  sparse dispatch reads these.
- `"expert_choice_indices"` (int32) and `"expert_choice_gates"`: (experts, capacity), only
  for `ExpertChoiceGate`: the tokens each expert took, and their gates.

The gates of current MoE models, `SigmoidTopKGate` and `ExpertChoiceGate`, are in
`keras_moe.layers.routing_gates`. The top-k gates (`SoftmaxGate` with `top_k`,
`NoisyTopKGate`, `SigmoidTopKGate`) share two routing options (`keras_moe.layers.routing`): auxiliary-loss-free balancing
(`bias_update_rate`: a per-expert bias that enters the choice of experts only, stepped
after every training step towards equal load) and group-limited routing (`num_groups`,
`top_k_groups`).

Gate math runs in float32 whatever the layer's dtype policy, so a mixed-precision model
routes exactly as a float32 one would.
"""

import keras
from keras import ops

from keras_moe.layers import routing
from keras_moe.regularizers import functional as reg_fn
from keras_moe import validation


def top_k_outputs(values, selection, k, normalize="softmax", scale=1.0):
    """The top-k gate outputs: the k largest `selection`, gates made of `values` there.

    `normalize="softmax"`: a softmax over the chosen `values` (logits), which equals the
    softmax over all experts renormalised over the chosen ones;
    `"none"`: the softmax over all experts' `values` at the chosen ones, not renormalised
    (they sum to less than 1);
    `"sum"`: the chosen `values` (positive scores) divided by their sum, times `scale`.
    """
    num_experts = values.shape[-1]
    top_indices, top_values = routing.choose_top_k(values, selection, k)
    if normalize == "none":
        top_gates = ops.take_along_axis(ops.softmax(values, axis=-1), top_indices, axis=-1)
    elif normalize == "softmax":
        # A softmax over one logit is identically 1 (and would warn); say so directly.
        top_gates = ops.softmax(top_values, axis=-1) if k > 1 else ops.ones_like(top_values)
    else:
        top_gates = scale * top_values / ops.sum(top_values, axis=-1, keepdims=True)
    gates, dispatch_mask = routing.dense_layout(top_indices, top_gates, num_experts)
    return {
        "gates": gates,
        "dispatch_mask": dispatch_mask,
        "top_k_indices": top_indices,
        "top_k_gates": top_gates,
    }


def softmax_gate_outputs(logits, top_k, training, selection=None, normalize_top_k=True):
    """The gate-output dict of a gate that is a softmax over `logits` (float32).

    Soft gating (`top_k=None`) mixes every expert with `softmax(logits)` and marks the
    argmax expert in `"dispatch_mask"`; top-k gating softmaxes the k largest logits (or
    the logits of the k largest `selection`, when the gate ranks on something else),
    or with `normalize_top_k=False` keeps the softmax over all logits at those k.
    Shared by every deterministic softmax gate (`SoftmaxGate`, `TSNEGate`).
    """
    num_experts = logits.shape[-1]
    probs = ops.softmax(logits, axis=-1)
    if top_k is None:
        outputs = {
            "gates": probs,
            "dispatch_mask": ops.one_hot(
                ops.argmax(logits, axis=-1), num_experts, dtype="float32"
            ),
        }
    else:
        outputs = top_k_outputs(logits, logits if selection is None else selection, top_k,
                                normalize="softmax" if normalize_top_k else "none")
    outputs["logits"] = logits
    outputs["probs"] = probs
    outputs["load"] = hard_load(outputs["dispatch_mask"], training)
    return outputs


def hard_load(dispatch_mask, training):
    """Tokens per expert. Global over replicas in training, where the balancing losses
    read it; a local count otherwise, which spares inference a cross-replica sync."""
    counts = ops.stop_gradient(dispatch_mask)
    return reg_fn.importance(counts) if training else ops.sum(counts, axis=0)


class RoutingOptions:
    """The routing options every top-k gate shares (see `keras_moe.layers.routing`).

    - `bias_update_rate`: None, or auxiliary-loss-free balancing's rate gamma >= 0: a
      non-trainable `expert_bias` (experts,) is added to the quantity the gate ranks
      experts by, and after each training step (in the step's forward pass, so that it
      applies from the next step on) moves by `gamma * sign(mean load - load_e)`, the
      load counted over the global batch. It never changes the value of a chosen
      expert's gate and gets no gradient; it is saved with the model.
    - `num_groups`, `top_k_groups`: group-limited routing.
    """

    def _init_routing(self, bias_update_rate, num_groups, top_k_groups):
        self.bias_update_rate = validation.non_negative_float(
            "bias_update_rate", bias_update_rate, allow_none=True)
        if self.bias_update_rate is not None and self.top_k is None:
            raise ValueError(
                "`bias_update_rate` (auxiliary-loss-free balancing) biases the choice of "
                "the top k experts: it needs `top_k`; got top_k=None.")
        self.num_groups, self.top_k_groups = routing.check_groups(
            self.num_experts, self.top_k, num_groups, top_k_groups)

    def _build_routing(self):
        if self.bias_update_rate is not None:
            # Every replica adds the same global step: the first replica's stands.
            self.expert_bias = self.add_weight(
                name="expert_bias",
                shape=(self.num_experts,),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                aggregation="only_first_replica",
            )

    @property
    def routes_plainly(self):
        """True when the gate ranks experts by its scores alone (no bias, no groups)."""
        return self.bias_update_rate is None and self.num_groups is None

    def _selection(self, scores):
        """`scores` plus the balancing bias, limited to each token's best groups."""
        if self.bias_update_rate is not None:
            scores = scores + ops.convert_to_tensor(self.expert_bias)
        if self.num_groups is not None:
            scores = routing.group_limited(scores, self.num_groups, self.top_k_groups)
        return scores

    def _step_bias(self, dispatch_mask, training):
        if training and self.bias_update_rate is not None:
            load = hard_load(dispatch_mask, True)  # global tokens per expert
            self.expert_bias.assign_add(routing.bias_update(load, self.bias_update_rate))

    def _routing_config(self):
        return {
            "bias_update_rate": self.bias_update_rate,
            "num_groups": self.num_groups,
            "top_k_groups": self.top_k_groups,
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftmaxGate(RoutingOptions, keras.layers.Layer):
    """Softmax gating network, optionally kept to the top k experts.

    With `hidden_units` it is Eigen et al.'s two-layer gate,
    `g(x) = softmax(B relu(A x + a) + b)`; without, a single linear map and softmax
    (the classic mixture-of-experts gate). With `top_k`, the softmax runs over the k
    largest logits only and every other expert gets exactly zero (no noise; see
    `NoisyTopKGate` for Shazeer's noisy variant).

    Args:
        num_experts: Number of experts, >= 1.
        top_k: None to mix all experts (soft gating), or the number of experts kept
            per token, 1 <= top_k <= num_experts.
        hidden_units: None for a linear gate, or the width (>= 1) of the gate's hidden
            ReLU layer (50 or 20 in Eigen et al.).
        hidden_activation: Activation of the hidden layer.
        kernel_initializer: Initializer of both gate kernels.
        bias_initializer: Initializer of both gate biases.
        bias_update_rate: Top-k only: None, or the rate gamma >= 0 of
            auxiliary-loss-free balancing (Wang et al. 2024). The bias is added to the
            router probabilities `softmax(logits)` for the choice (their paper's
            affinity scores); the chosen experts' gates stay the softmax over their
            logits.
        num_groups: Top-k only: None, or the number of equal expert groups of
            group-limited routing (with `top_k_groups`; a group scores the sum of its
            two best router probabilities, plus bias).
        top_k_groups: The groups each token keeps, 1 <= top_k_groups <= num_groups.
        normalize_top_k: Top-k only. True: the chosen experts' gates are the softmax
            over their logits, which is the softmax over all experts renormalised over
            the chosen ones (Mixtral; Qwen-MoE's `norm_top_k_prob=True`; GPT-OSS's
            top-k then softmax). False: the softmax over all experts, at the chosen
            ones, not renormalised (Qwen-MoE's `norm_top_k_prob=False`).
        use_bias: Whether the output logits have a bias (`bias`); the hidden layer
            always has one.
        **kwargs: Base layer arguments.

    Example:

    >>> gate = SoftmaxGate(num_experts=4, hidden_units=50)
    >>> outputs = gate(np.zeros((8, 36 * 36), "float32"))
    >>> outputs["gates"].shape
    (8, 4)

    Reference:
        Eigen, Ranzato & Sutskever, "Learning Factored Representations in a Deep
        Mixture of Experts", 2013, section 4.1.
    """

    def __init__(
        self,
        num_experts,
        top_k=None,
        hidden_units=None,
        hidden_activation="relu",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        bias_update_rate=None,
        num_groups=None,
        top_k_groups=None,
        normalize_top_k=True,
        use_bias=True,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.top_k = validation.top_k(top_k, self.num_experts)
        self.hidden_units = validation.positive_int(
            "hidden_units", hidden_units, allow_none=True
        )
        self.normalize_top_k = bool(normalize_top_k)
        if not self.normalize_top_k and self.top_k is None:
            raise ValueError(
                "`normalize_top_k`=False keeps the router probabilities of the top k "
                "experts: it needs `top_k`; got top_k=None."
            )
        self.use_bias = bool(use_bias)
        self.hidden_activation = keras.activations.get(hidden_activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._init_routing(bias_update_rate, num_groups, top_k_groups)

    # Its `"load"` is a hard count (no gradient); `LoadLoss` is refused on it.
    smooth_load = False

    def build(self, input_shape):
        input_dim = validation.last_dim(self, input_shape)
        width = input_dim
        if self.hidden_units is not None:
            self.hidden_kernel = self.add_weight(
                name="hidden_kernel",
                shape=(input_dim, self.hidden_units),
                initializer=self.kernel_initializer,
                dtype="float32",
            )
            self.hidden_bias = self.add_weight(
                name="hidden_bias",
                shape=(self.hidden_units,),
                initializer=self.bias_initializer,
                dtype="float32",
            )
            width = self.hidden_units
        self.kernel = self.add_weight(
            name="kernel",
            shape=(width, self.num_experts),
            initializer=self.kernel_initializer,
            dtype="float32",
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.num_experts,),
                initializer=self.bias_initializer,
                dtype="float32",
            )
        self._build_routing()

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        if self.hidden_units is not None:
            x = self.hidden_activation(ops.matmul(x, self.hidden_kernel) + self.hidden_bias)
        logits = ops.matmul(x, self.kernel)
        if self.bias is not None:
            logits = logits + self.bias
        selection = None
        if self.top_k is not None and not self.routes_plainly:
            selection = self._selection(ops.softmax(logits, axis=-1))
        outputs = softmax_gate_outputs(logits, self.top_k, training, selection,
                                       normalize_top_k=self.normalize_top_k)
        self._step_bias(outputs["dispatch_mask"], training)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "hidden_units": self.hidden_units,
                "hidden_activation": keras.activations.serialize(self.hidden_activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "normalize_top_k": self.normalize_top_k,
                "use_bias": self.use_bias,
                **self._routing_config(),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class NoisyTopKGate(RoutingOptions, keras.layers.Layer):
    """Shazeer et al.'s noisy top-k gate.

    `H(x) = x W_g + N(0, 1) * (softplus(x W_noise) + noise_epsilon)` during training
    (clean logits `x W_g` otherwise); the k largest of `H` are kept and softmaxed, every
    other expert gets exactly zero. `W_g` and `W_noise` start at zero, so routing starts
    uniform and noise-driven. In training the returned `"load"` is the smooth estimator
    `sum_x P(x, i)` (see `keras_moe.regularizers.noisy_top_k_load`), which has gradients;
    at evaluation, or when k equals the number of experts, it is the hard count.

    Args:
        num_experts: Number of experts, >= 1.
        top_k: Experts kept per token, 1 <= top_k <= num_experts.
        noise_epsilon: Floor added to the noise scale, > 0 (1e-2 as in tensor2tensor).
        noisy: False turns the noise off (a plain top-k softmax gate).
        kernel_initializer: Initializer of `W_g` and `W_noise` (zeros, as in the paper).
        seed: Seed of the gate noise.
        bias_update_rate: None, or the rate gamma >= 0 of auxiliary-loss-free balancing
            (Wang et al. 2024): the bias is added to the noisy logits `H` for the choice
            (the paper gives no rule for a noisy gate: the gate ranks `H`), the gates
            stay the softmax over the chosen `H`, and the smooth load is that of the
            biased choice.
        num_groups: None, or the number of equal expert groups of group-limited
            routing (with `top_k_groups`; a group scores the sum of its two best
            biased noisy logits).
        top_k_groups: The groups each token keeps, 1 <= top_k_groups <= num_groups.
        **kwargs: Base layer arguments.

    Example:

    >>> gate = NoisyTopKGate(num_experts=16, top_k=2)
    >>> outputs = gate(np.random.rand(32, 64).astype("float32"), training=True)
    >>> outputs["top_k_indices"].shape
    (32, 2)

    Reference:
        Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
        Mixture-of-Experts Layer", ICLR 2017, section 2.1 and appendix A.
    """

    def __init__(
        self,
        num_experts,
        top_k=2,
        noise_epsilon=1e-2,
        noisy=True,
        kernel_initializer="zeros",
        seed=None,
        bias_update_rate=None,
        num_groups=None,
        top_k_groups=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.top_k = validation.top_k(top_k, self.num_experts, required_by="NoisyTopKGate")
        self.noise_epsilon = validation.positive_float("noise_epsilon", noise_epsilon)
        self.noisy = bool(noisy)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._init_routing(bias_update_rate, num_groups, top_k_groups)

    @property
    def smooth_load(self):
        """Whether the training-time `"load"` is the differentiable estimator."""
        return self.noisy and self.top_k < self.num_experts

    def build(self, input_shape):
        input_dim = validation.last_dim(self, input_shape)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.num_experts),
            initializer=self.kernel_initializer,
            dtype="float32",
        )
        if self.noisy:
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_dim, self.num_experts),
                initializer=self.kernel_initializer,
                dtype="float32",
            )
        self._build_routing()

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        clean_logits = ops.matmul(x, self.kernel)
        if training and self.noisy:
            noise_stddev = ops.softplus(ops.matmul(x, self.noise_kernel)) + self.noise_epsilon
            noise = keras.random.normal(
                ops.shape(clean_logits), dtype="float32", seed=self.seed_generator
            )
            noisy_logits = clean_logits + noise * noise_stddev
        else:
            noise_stddev = None
            noisy_logits = clean_logits
        # The choice ranks the noisy logits (plus bias, within the token's groups); the
        # smooth load is that of this same choice, so the clean logits get the same
        # bias and the same groups.
        selection, clean_selection = noisy_logits, clean_logits
        if not self.routes_plainly:
            selection = self._selection(noisy_logits)
            clean_selection = clean_logits
            if self.bias_update_rate is not None:
                clean_selection = clean_selection + ops.convert_to_tensor(self.expert_bias)
            if self.num_groups is not None:
                clean_selection = ops.where(selection <= routing.MASKED, selection,
                                            clean_selection)
        outputs = top_k_outputs(noisy_logits, selection, self.top_k)
        if noise_stddev is not None and self.top_k < self.num_experts:
            outputs["load"] = reg_fn.noisy_top_k_load(
                clean_selection, selection, noise_stddev, self.top_k
            )
        else:
            outputs["load"] = hard_load(outputs["dispatch_mask"], training)
        outputs["logits"] = clean_logits
        outputs["probs"] = ops.softmax(clean_logits, axis=-1)
        self._step_bias(outputs["dispatch_mask"], training)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "noise_epsilon": self.noise_epsilon,
                "noisy": self.noisy,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "seed": self.seed,
                **self._routing_config(),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class ReLUGate(keras.layers.Layer):
    """One head of DeepMoE's multi-headed sparse gate: `G(e) = ReLU(e W)`.

    The gates are non-negative and unnormalised: a zero gate switches a channel off.
    The default initializer draws `W` around 1 (mean 1, stddev 0.01), so with a
    mixture-weight input `e` on the simplex the gates start at about 1, fully open.

    Args:
        units: Number of gated channels, >= 1.
        use_bias: Whether to add a bias before the ReLU (DeepMoE uses none).
        kernel_initializer: Initializer of `W`.
        bias_initializer: Initializer of the bias.
        **kwargs: Base layer arguments.

    Example:

    >>> head = ReLUGate(units=64)
    >>> head(np.full((2, 10), 0.1, "float32"))["gates"].shape
    (2, 64)

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, eq. 5.
    """

    def __init__(
        self,
        units,
        use_bias=False,
        kernel_initializer=None,
        bias_initializer="zeros",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.units = validation.positive_int("units", units)
        self.use_bias = bool(use_bias)
        if kernel_initializer is None:
            kernel_initializer = keras.initializers.RandomNormal(mean=1.0, stddev=0.01)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        input_dim = validation.last_dim(self, input_shape)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            initializer=self.kernel_initializer,
            dtype="float32",
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                dtype="float32",
            )

    def call(self, inputs, training=None):
        logits = ops.matmul(ops.cast(inputs, "float32"), self.kernel)
        if self.use_bias:
            logits = logits + self.bias
        gates = ops.relu(logits)
        return {
            "gates": gates,
            "logits": logits,
            "dispatch_mask": ops.cast(gates > 0, "float32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config

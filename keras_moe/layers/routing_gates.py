"""The gates of current MoE models: DeepSeek-V3's sigmoid top-k, Zhou et al.'s expert choice.

Both return the gate-output dict of `keras_moe.layers.gates` (see there); the sigmoid
gate shares the top-k gates' routing options (auxiliary-loss-free balancing,
group-limited routing), and the expert-choice gate adds the tokens each expert took.
"""

import keras
from keras import ops

from keras_moe import validation
from keras_moe.layers import routing
from keras_moe.layers.gates import RoutingOptions, hard_load, top_k_outputs


@keras.saving.register_keras_serializable(package="keras_moe")
class SigmoidTopKGate(RoutingOptions, keras.layers.Layer):
    """DeepSeek-V3's sigmoid top-k gate.

    Per-expert scores `s = sigmoid(x W)`; the k experts with the largest `s` (plus the
    balancing bias with `bias_update_rate`, within the token's best groups with
    `num_groups`) are chosen, and each gets its score renormalised over the chosen ones,
    `g_e = routed_scaling * s_e / sum_{chosen} s`. The scores are independent per expert
    (no softmax competition). `"probs"` is `s / sum_e s_e` over all experts (the
    normalised scores of DeepSeek-V3's sequence-wise balance loss, read by
    `SwitchLoadBalanceLoss` and `SequenceBalanceLoss`); `"load"` is a hard count, so
    `LoadLoss` is refused. With `top_k=1` the single gate is `routed_scaling` and the
    router gets no gradient from the output (balance it with the bias).

    Args:
        num_experts: Number of experts, >= 1.
        top_k: Experts per token, 1 <= top_k <= num_experts.
        routed_scaling: Factor on the routed gates, > 0 (DeepSeek-V3: 2.5).
        kernel_initializer: Initializer of `W` (the paper gives none; Glorot).
        bias_update_rate: None, or the rate gamma >= 0 of auxiliary-loss-free balancing
            (DeepSeek-V3: 0.001): the bias is added to the scores for the choice only.
        num_groups: None, or the number of equal expert groups of group-limited
            routing (DeepSeek-V3: 8, with a group scoring the sum of its two best
            biased scores).
        top_k_groups: The groups each token keeps (DeepSeek-V3: 4).
        **kwargs: Base layer arguments.

    Example:

    >>> gate = SigmoidTopKGate(num_experts=8, top_k=2, bias_update_rate=1e-3)
    >>> gate(np.random.rand(4, 16).astype("float32"))["top_k_gates"].shape
    (4, 2)

    Reference:
        DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv 2412.19437, section 2.1.2,
        eq. 12-16.
    """

    def __init__(
        self,
        num_experts,
        top_k=2,
        routed_scaling=1.0,
        kernel_initializer="glorot_uniform",
        bias_update_rate=None,
        num_groups=None,
        top_k_groups=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.top_k = validation.top_k(top_k, self.num_experts, required_by="SigmoidTopKGate")
        self.routed_scaling = validation.positive_float("routed_scaling", routed_scaling)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self._init_routing(bias_update_rate, num_groups, top_k_groups)

    # Its `"load"` is a hard count (no gradient); `LoadLoss` is refused on it.
    smooth_load = False

    def build(self, input_shape):
        input_dim = validation.last_dim(self, input_shape)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.num_experts),
            initializer=self.kernel_initializer,
            dtype="float32",
        )
        self._build_routing()

    def call(self, inputs, training=None):
        logits = ops.matmul(ops.cast(inputs, "float32"), self.kernel)
        scores = ops.sigmoid(logits)
        outputs = top_k_outputs(scores, self._selection(scores), self.top_k,
                                 normalize="sum", scale=self.routed_scaling)
        outputs["logits"] = logits
        outputs["probs"] = scores / ops.sum(scores, axis=-1, keepdims=True)
        outputs["load"] = hard_load(outputs["dispatch_mask"], training)
        self._step_bias(outputs["dispatch_mask"], training)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "routed_scaling": self.routed_scaling,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                **self._routing_config(),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceGate(keras.layers.Layer):
    """Zhou et al.'s expert-choice router: each expert picks its tokens.

    Scores `S = softmax(x W)` over the experts, per token. Each expert takes the
    `capacity = ceil(capacity_factor * tokens / num_experts)` tokens (at most all of
    them) with the highest score for it; the gate of token t at expert e is `S[t, e]`
    where e took t, zero elsewhere. Every expert gets exactly `capacity` tokens
    (balanced by construction); a token can get several experts, or none (the layer
    counts those, `MoEDense.dropped_fraction`). The choice runs over the tokens of one
    call: under `tf.distribute`, each replica's experts choose among its own tokens.

    Besides the common keys the gate returns `"expert_choice_indices"` and
    `"expert_choice_gates"`, (experts, capacity): which tokens each expert took, and
    their gates. It has no `top_k` (None).

    Args:
        num_experts: Number of experts, >= 1.
        capacity_factor: Mean experts per token, > 0 (Zhou et al.'s EC-CF2: 2).
        kernel_initializer: Initializer of `W`.
        **kwargs: Base layer arguments.

    Example:

    >>> gate = ExpertChoiceGate(num_experts=4, capacity_factor=2.0)
    >>> gate(np.random.rand(8, 16).astype("float32"))["expert_choice_indices"].shape
    (4, 4)

    Reference:
        Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022
        (arXiv 2202.09368), section 3.1.
    """

    top_k = None
    # Its `"load"` is a hard count (no gradient); `LoadLoss` is refused on it.
    smooth_load = False

    def __init__(self, num_experts, capacity_factor=2.0, kernel_initializer="glorot_uniform",
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.capacity_factor = validation.positive_float("capacity_factor", capacity_factor)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        input_dim = validation.last_dim(self, input_shape)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.num_experts),
            initializer=self.kernel_initializer,
            dtype="float32",
        )

    def capacity(self, num_tokens):
        """Tokens each expert takes out of `num_tokens` (int, or a scalar tensor)."""
        return routing.expert_choice_capacity(num_tokens, self.num_experts,
                                              self.capacity_factor)

    def compute_output_spec(self, inputs, training=None):
        # Written out: the capacity is a function of the number of tokens, which Keras's
        # shape inference on JAX passes as a symbolic dimension that top-k cannot take.
        tokens = inputs.shape[0]
        capacity = None if tokens is None else self.capacity(int(tokens))
        spec = {key: keras.KerasTensor((tokens, self.num_experts), "float32")
                for key in ("gates", "logits", "probs", "dispatch_mask")}
        spec["load"] = keras.KerasTensor((self.num_experts,), "float32")
        spec["expert_choice_indices"] = keras.KerasTensor((self.num_experts, capacity), "int32")
        spec["expert_choice_gates"] = keras.KerasTensor((self.num_experts, capacity), "float32")
        return spec

    def call(self, inputs, training=None):
        logits = ops.matmul(ops.cast(inputs, "float32"), self.kernel)
        probs = ops.softmax(logits, axis=-1)
        static_tokens = logits.shape[0]
        if keras.backend.backend() == "jax" and not isinstance(static_tokens, int):
            raise ValueError(
                f"ExpertChoiceGate '{self.name}': on JAX the experts' choice needs a "
                f"known number of tokens (each takes a fixed share); got {static_tokens} "
                "(a SavedModel export traces with an unknown batch: export with a fixed "
                "one, or from TensorFlow).")
        num_tokens = static_tokens if isinstance(static_tokens, int) else ops.shape(logits)[0]
        indices, chosen = routing.expert_choice(probs, self.capacity(num_tokens))
        # (token, expert) pairs of every choice, scattered into the dense layout.
        experts = ops.broadcast_to(
            ops.arange(self.num_experts, dtype="int32")[:, None], ops.shape(indices))
        pairs = ops.reshape(ops.stack([indices, experts], axis=-1), (-1, 2))
        shape = (num_tokens, self.num_experts)
        gates = ops.scatter(pairs, ops.reshape(chosen, (-1,)), shape)
        dispatch_mask = ops.scatter(pairs, ops.ones_like(ops.reshape(chosen, (-1,))), shape)
        return {
            "gates": gates,
            "logits": logits,
            "probs": probs,
            "dispatch_mask": dispatch_mask,
            "load": hard_load(dispatch_mask, training),
            "expert_choice_indices": indices,
            "expert_choice_gates": chosen,
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "capacity_factor": self.capacity_factor,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config

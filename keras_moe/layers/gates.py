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

Gate math runs in float32 whatever the layer's dtype policy, so a mixed-precision model
routes exactly as a float32 one would.
"""

import keras
from keras import ops

from keras_moe.regularizers import functional as reg_fn
from keras_moe import ops as moe_ops
from keras_moe import validation


def _top_k_outputs(logits, selection_logits, k):
    """Softmax over the k largest `selection_logits`, scattered back to a dense layout."""
    num_experts = logits.shape[-1]
    top_values, top_indices = moe_ops.top_k(selection_logits, k)
    # A softmax over one logit is identically 1 (and would warn); say so directly.
    top_gates = ops.softmax(top_values, axis=-1) if k > 1 else ops.ones_like(top_values)
    one_hot = ops.one_hot(top_indices, num_experts, dtype="float32")
    gates = ops.sum(one_hot * top_gates[..., None], axis=-2)
    dispatch_mask = ops.sum(one_hot, axis=-2)
    return {
        "gates": gates,
        "dispatch_mask": dispatch_mask,
        "top_k_indices": ops.cast(top_indices, "int32"),
        "top_k_gates": top_gates,
    }


def softmax_gate_outputs(logits, top_k, training):
    """The gate-output dict of a gate that is a softmax over `logits` (float32).

    Soft gating (`top_k=None`) mixes every expert with `softmax(logits)` and marks the
    argmax expert in `"dispatch_mask"`; top-k gating softmaxes the k largest logits.
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
        outputs = _top_k_outputs(logits, logits, top_k)
    outputs["logits"] = logits
    outputs["probs"] = probs
    outputs["load"] = _hard_load(outputs["dispatch_mask"], training)
    return outputs


def _hard_load(dispatch_mask, training):
    """Tokens per expert. Global over replicas in training, where the balancing losses
    read it; a local count otherwise, which spares inference a cross-replica sync."""
    counts = ops.stop_gradient(dispatch_mask)
    return reg_fn.importance(counts) if training else ops.sum(counts, axis=0)


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftmaxGate(keras.layers.Layer):
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
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.top_k = validation.top_k(top_k, self.num_experts)
        self.hidden_units = validation.positive_int(
            "hidden_units", hidden_units, allow_none=True
        )
        self.hidden_activation = keras.activations.get(hidden_activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

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
        self.bias = self.add_weight(
            name="bias",
            shape=(self.num_experts,),
            initializer=self.bias_initializer,
            dtype="float32",
        )

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        if self.hidden_units is not None:
            x = self.hidden_activation(ops.matmul(x, self.hidden_kernel) + self.hidden_bias)
        logits = ops.matmul(x, self.kernel) + self.bias
        return softmax_gate_outputs(logits, self.top_k, training)

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
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class NoisyTopKGate(keras.layers.Layer):
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
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        if top_k is None:
            raise ValueError(
                "NoisyTopKGate needs `top_k`: an integer with 1 <= top_k <= "
                f"num_experts ({self.num_experts}); got None."
            )
        self.top_k = validation.top_k(top_k, self.num_experts)
        self.noise_epsilon = validation.positive_float("noise_epsilon", noise_epsilon)
        self.noisy = bool(noisy)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

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
        outputs = _top_k_outputs(clean_logits, noisy_logits, self.top_k)
        if noise_stddev is not None and self.top_k < self.num_experts:
            outputs["load"] = reg_fn.noisy_top_k_load(
                clean_logits, noisy_logits, noise_stddev, self.top_k
            )
        else:
            outputs["load"] = _hard_load(outputs["dispatch_mask"], training)
        outputs["logits"] = clean_logits
        outputs["probs"] = ops.softmax(clean_logits, axis=-1)
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

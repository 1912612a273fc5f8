"""Serializable gate regularizers: weighted balancing and sparsity terms.

A `GateRegularizer` maps the dict of tensors a gate layer produces (`gate_outputs`) to a
weighted scalar loss, which the layer attaches with `add_loss`. The dict's keys:

- `"gates"`: `(tokens, experts)` float32 combine weights (top-k gates: zeros outside the top
  k; DeepMoE ReLU gates: non-negative, not normalised);
- `"logits"`: `(tokens, experts)` clean logits before noise;
- `"probs"`: `(tokens, experts)` softmax over all clean logits (router probabilities);
- `"dispatch_mask"`: `(tokens, experts)` float 0/1, 1 where the token goes to that expert;
- `"load"`: `(experts,)` per-expert load (smooth estimate for noisy top-k in training,
  otherwise hard counts).

The losses are computed from global-batch statistics (see `reduction.py`) and are *not*
divided by the replica count: `model.fit` already scales every `add_loss` term by
`1 / num_replicas_in_sync` under `tf.distribute`, which is exactly what a globally computed
term needs. In a custom training loop, wrap the value in `scale_for_replicas`.
"""

import keras

from keras_moe import validation
from keras_moe.regularizers import functional

__all__ = [
    "GateRegularizer",
    "ImportanceLoss",
    "LoadLoss",
    "SwitchLoadBalanceLoss",
    "SequenceBalanceLoss",
    "RouterZLoss",
    "EntropyGateLoss",
    "VarianceGateLoss",
    "L1GateLoss",
    "check_gate_supports",
    "get",
    "get_list",
    "serialize",
    "deserialize",
]

# Which gate layers put each key into `gate_outputs` (used in error messages).
KEY_PROVIDERS = {
    "gates": "every gate (softmax, top-k, noisy top-k, Switch, DeepMoE ReLU gates)",
    "logits": "gates with a softmax router (softmax, top-k, noisy top-k, Switch gates)",
    "probs": "gates with a softmax router (softmax, top-k, noisy top-k, Switch gates)",
    "dispatch_mask": "sparse routing gates (top-k, noisy top-k, Switch gates)",
    "load": "top-k routing gates (noisy top-k: smooth estimate in training; top-k and "
    "Switch: hard counts)",
    "tokens_per_sequence": "MoEDense on (batch, sequence, features) inputs",
}


@keras.saving.register_keras_serializable(package="keras_moe")
class GateRegularizer:
    """Base class of the gate regularizers.

    Subclasses list the `gate_outputs` keys they read in `required_keys` and implement
    `call(gate_outputs)`, returning the weighted scalar loss. `__call__` checks the keys
    first and raises a `ValueError` naming a missing key and the gates that provide it.

    Example:

    ```python
    class MeanGateLoss(GateRegularizer):
        required_keys = ("gates",)

        def call(self, gate_outputs):
            return keras.ops.mean(gate_outputs["gates"])
    ```
    """

    required_keys = ()
    # True for terms that are only meaningful when the gate's training-time `"load"` is
    # a differentiable estimate (a gate's `smooth_load` attribute says whether it is).
    needs_smooth_load = False

    def __call__(self, gate_outputs):
        """Returns the weighted scalar loss (float32) for a gate's outputs.

        Args:
            gate_outputs: dict of gate tensors (see the module docstring).

        Raises:
            ValueError: if a key this regularizer needs is missing.
        """
        if not hasattr(gate_outputs, "keys") or not hasattr(gate_outputs, "__getitem__"):
            raise ValueError(
                f"{type(self).__name__} expects `gate_outputs` to be a dict of gate "
                f"tensors, got {type(gate_outputs).__name__}"
            )
        for key in self.required_keys:
            if key not in gate_outputs or gate_outputs[key] is None:
                raise ValueError(
                    f"{type(self).__name__} needs gate_outputs['{key}'], which is missing "
                    f"(got keys {sorted(gate_outputs.keys())}); '{key}' is provided by "
                    f"{KEY_PROVIDERS.get(key, 'no known gate')}"
                )
        return self.call(gate_outputs)

    def call(self, gate_outputs):
        """Computes the weighted loss; `gate_outputs` holds every key in `required_keys`."""
        raise NotImplementedError(f"{type(self).__name__} must implement `call`")

    def get_config(self):
        """Returns the constructor arguments as a JSON-serializable dict."""
        return {}

    @classmethod
    def from_config(cls, config):
        """Creates a regularizer from the dict `get_config` returns."""
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class _CoefficientRegularizer(GateRegularizer):
    """A single unweighted term from `functional`, times `coefficient`."""

    def __init__(self, coefficient):
        self.coefficient = validation.non_negative_float("coefficient", coefficient)

    def term(self, gate_outputs):
        raise NotImplementedError

    def call(self, gate_outputs):
        return self.coefficient * self.term(gate_outputs)

    def get_config(self):
        return {"coefficient": self.coefficient}


class _AlphaBetaRegularizer(GateRegularizer):
    """`alpha * batch_term + beta * sample_term` over `gate_outputs["gates"]`."""

    required_keys = ("gates",)

    def __init__(self, alpha, beta):
        self.alpha = validation.non_negative_float("alpha", alpha)
        self.beta = validation.non_negative_float("beta", beta)

    def batch_term(self, gates):
        raise NotImplementedError

    def sample_term(self, gates):
        raise NotImplementedError

    def call(self, gate_outputs):
        gates = gate_outputs["gates"]
        return self.alpha * self.batch_term(gates) + self.beta * self.sample_term(gates)

    def get_config(self):
        return {"alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="keras_moe")
class ImportanceLoss(_CoefficientRegularizer):
    """Shazeer's importance loss: `coefficient * cv^2(sum_t gates_t)`.

    `cv^2(v) = Var(v) / (Mean(v)^2 + 1e-10)` with the population variance. Reads
    `gate_outputs["gates"]`.

    Minimum: 0, reached when every expert gets the same total gate mass over the batch.

    Source: Shazeer et al. 2017, eq. 6-7 (`w_importance`, 0.1 in the paper).

    Args:
        coefficient: weight of the term, a finite number >= 0 (default 1e-2).

    Example:

    >>> gates = np.array([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]], "float32")
    >>> loss = ImportanceLoss(coefficient=1e-2)({"gates": gates})
    """

    required_keys = ("gates",)

    def __init__(self, coefficient=1e-2):
        super().__init__(coefficient)

    def term(self, gate_outputs):
        return functional.importance_cv_squared(gate_outputs["gates"])


@keras.saving.register_keras_serializable(package="keras_moe")
class LoadLoss(_CoefficientRegularizer):
    """Shazeer's load loss: `coefficient * cv^2(load)`.

    Reads `gate_outputs["load"]`, the per-expert load (the smooth estimate of
    `functional.noisy_top_k_load` for a noisy top-k gate in training, else hard counts).
    A hard count has no gradient, so the layers refuse this loss on a gate whose load
    is not smooth (`check_gate_supports`): a deterministic softmax or top-k gate, or a
    noisy gate with `noisy=False`. Use `ImportanceLoss` or `SwitchLoadBalanceLoss` there.

    Minimum: 0, reached when every expert has the same load.

    Source: Shazeer et al. 2017, appendix A, eq. 11 (`w_load`, 0.1 in the paper).

    Args:
        coefficient: weight of the term, a finite number >= 0 (default 1e-2).

    Example:

    >>> load = np.array([10.0, 6.0, 8.0], "float32")
    >>> loss = LoadLoss()({"load": load})
    """

    required_keys = ("load",)
    needs_smooth_load = True

    def __init__(self, coefficient=1e-2):
        super().__init__(coefficient)

    def term(self, gate_outputs):
        return functional.load_cv_squared(gate_outputs["load"])


@keras.saving.register_keras_serializable(package="keras_moe")
class SwitchLoadBalanceLoss(_CoefficientRegularizer):
    """Switch Transformer load balance: `coefficient * E * sum_e f_e * P_e`.

    `f_e`: fraction of token-assignments routed to expert `e` (from
    `gate_outputs["dispatch_mask"]`, no gradient); `P_e`: mean router probability of `e`
    (from `gate_outputs["probs"]`). See `functional.switch_load_balance`.

    Minimum: `coefficient * 1`, reached at uniform routing.

    Source: Fedus et al. 2021, "Switch Transformers", eq. 4-6 (alpha = 1e-2).

    Args:
        coefficient: weight of the term, a finite number >= 0 (default 1e-2).

    Example:

    >>> probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], "float32")
    >>> mask = np.array([[1, 0, 0], [0, 1, 0]], "float32")
    >>> loss = SwitchLoadBalanceLoss()({"probs": probs, "dispatch_mask": mask})
    """

    required_keys = ("probs", "dispatch_mask")

    def __init__(self, coefficient=1e-2):
        super().__init__(coefficient)

    def term(self, gate_outputs):
        return functional.switch_load_balance(
            gate_outputs["probs"], gate_outputs["dispatch_mask"]
        )


@keras.saving.register_keras_serializable(package="keras_moe")
class SequenceBalanceLoss(_CoefficientRegularizer):
    """DeepSeek-V3's sequence-wise balance loss: `coefficient * mean_s sum_e f_e P_e`.

    The Switch term of each sequence on its own (see
    `functional.sequence_balance_loss`), so that no single sequence piles its tokens on
    a few experts, then averaged over the global batch's sequences. For layers on
    `(batch, sequence, features)` inputs: `MoEDense` passes the sequence length as
    `gate_outputs["tokens_per_sequence"]` and refuses this loss at build on inputs of
    another rank. DeepSeek-V3 uses it beside auxiliary-loss-free balancing, with a tiny
    coefficient.

    Minimum: `coefficient * 1`, reached when every sequence spreads its tokens evenly.

    Source: DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", eq. 17-20 (alpha = 1e-4).

    Args:
        coefficient: weight of the term, a finite number >= 0 (default 1e-4).

    Example:

    >>> probs = np.full((2 * 3, 4), 0.25, "float32")   # 2 sequences of 3 tokens
    >>> mask = np.eye(4, dtype="float32")[[0, 1, 2, 3, 0, 1]]
    >>> loss = SequenceBalanceLoss()({"probs": probs, "dispatch_mask": mask,
    ...                               "tokens_per_sequence": 3})
    """

    required_keys = ("probs", "dispatch_mask", "tokens_per_sequence")
    # Reads sequences: the layer must see (batch, sequence, features) inputs.
    needs_sequences = True

    def __init__(self, coefficient=1e-4):
        super().__init__(coefficient)

    def term(self, gate_outputs):
        return functional.sequence_balance_loss(
            gate_outputs["probs"], gate_outputs["dispatch_mask"],
            gate_outputs["tokens_per_sequence"])


@keras.saving.register_keras_serializable(package="keras_moe")
class RouterZLoss(_CoefficientRegularizer):
    """Router z-loss: `coefficient * batch_mean_t (logsumexp_e logits[t, e])^2`.

    Reads `gate_outputs["logits"]` (clean router logits).

    Minimum: 0, reached when `sum_e exp(logits[t, e]) = 1` for every token.

    Source: Zoph et al. 2022, "ST-MoE", eq. 5 (c_z = 1e-3).

    Args:
        coefficient: weight of the term, a finite number >= 0 (default 1e-3).

    Example:

    >>> logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.3, -0.2]], "float32")
    >>> loss = RouterZLoss()({"logits": logits})
    """

    required_keys = ("logits",)

    def __init__(self, coefficient=1e-3):
        super().__init__(coefficient)

    def term(self, gate_outputs):
        return functional.router_z_loss(gate_outputs["logits"])


@keras.saving.register_keras_serializable(package="keras_moe")
class EntropyGateLoss(_AlphaBetaRegularizer):
    """Entropy gate loss: `alpha * (-Entropy(mean_t g_t)) + beta * mean_t Entropy(g_t)`.

    The batch term rewards using the experts evenly over the batch; the sample term
    rewards decisive (one-hot) gates per example. Reads `gate_outputs["gates"]`.

    Minimum (gates on the simplex): `-alpha * ln(E)`, reached when every gate row is
    one-hot and the experts are chosen equally often over the batch.

    Source: `shared/papers/002` ("Mixture of Experts - Experiment 1"), section 5.1
    (alpha = 0.1, beta = 0.01, batch 128).

    Args:
        alpha: weight of the batch-entropy term, a finite number >= 0 (default 0.1).
        beta: weight of the sample-entropy term, a finite number >= 0 (default 0.01).

    Example:

    >>> gates = np.array([[0.9, 0.1], [0.2, 0.8]], "float32")
    >>> loss = EntropyGateLoss(alpha=0.1, beta=0.01)({"gates": gates})
    """

    def __init__(self, alpha=0.1, beta=0.01):
        super().__init__(alpha, beta)

    def batch_term(self, gates):
        return functional.batch_entropy_loss(gates)

    def sample_term(self, gates):
        return functional.sample_entropy_loss(gates)


@keras.saving.register_keras_serializable(package="keras_moe")
class VarianceGateLoss(_AlphaBetaRegularizer):
    """Variance gate loss: `alpha * Var_e(mean_t g_t) - beta * mean_t Var_e(g_t)`.

    Population variances across experts. The paper only says "variance loss is defined
    similarly"; we chose the signs so that each term pushes the same way as its entropy
    counterpart: the batch term (`+Var` of the mean gate) rewards balanced use of the
    experts, the sample term (`-Var` of each gate row) rewards decisive per-example gates.
    Reads `gate_outputs["gates"]`.

    Minimum (gates on the simplex): `-beta * (E - 1) / E^2`, reached when every gate row is
    one-hot and the experts are chosen equally often over the batch.

    Source: `shared/papers/002`, section 5.1 (alpha = 0.1, beta = 0.01; signs: our choice).

    Args:
        alpha: weight of the batch-variance term, a finite number >= 0 (default 0.1).
        beta: weight of the sample-variance term, a finite number >= 0 (default 0.01).

    Example:

    >>> gates = np.array([[0.9, 0.1], [0.2, 0.8]], "float32")
    >>> loss = VarianceGateLoss()({"gates": gates})
    """

    def __init__(self, alpha=0.1, beta=0.01):
        super().__init__(alpha, beta)

    def batch_term(self, gates):
        return functional.batch_variance_loss(gates)

    def sample_term(self, gates):
        return functional.sample_variance_loss(gates)


@keras.saving.register_keras_serializable(package="keras_moe")
class L1GateLoss(_CoefficientRegularizer):
    """DeepMoE L1 gate sparsity: `coefficient * batch_mean_x (||g(x)||_1 / C)`.

    The mean absolute gate value over the `C` gated channels, averaged over the batch, so
    the unweighted term is 1.0 when every gate is exactly 1 and `coefficient` (DeepMoE's
    lambda, per gated layer) has a scale independent of the layer width. Reads
    `gate_outputs["gates"]`.

    Minimum: 0, reached when every gate is 0.

    Source: Wang et al. 2018, DeepMoE, eq. 7-8 (lambda in [0.001, 8] in the paper, where
    the L1 norm is not divided by `C`).

    Args:
        coefficient: weight of the term, a finite number >= 0 (default 1e-3).

    Example:

    >>> gates = np.array([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]], "float32")
    >>> loss = L1GateLoss(coefficient=1e-3)({"gates": gates})
    """

    required_keys = ("gates",)

    def __init__(self, coefficient=1e-3):
        super().__init__(coefficient)

    def term(self, gate_outputs):
        return functional.l1_gate_sparsity(gate_outputs["gates"])


_CLASSES = {
    cls.__name__: cls
    for cls in (
        ImportanceLoss,
        LoadLoss,
        SwitchLoadBalanceLoss,
        SequenceBalanceLoss,
        RouterZLoss,
        EntropyGateLoss,
        VarianceGateLoss,
        L1GateLoss,
    )
}

ALIASES = {
    "importance": ImportanceLoss,
    "load": LoadLoss,
    "switch": SwitchLoadBalanceLoss,
    "switch_load_balance": SwitchLoadBalanceLoss,
    "sequence_balance": SequenceBalanceLoss,
    "z_loss": RouterZLoss,
    "router_z_loss": RouterZLoss,
    "entropy": EntropyGateLoss,
    "variance": VarianceGateLoss,
    "l1": L1GateLoss,
}


def _lookup(name):
    if name in ALIASES:
        return ALIASES[name]
    if name in _CLASSES:
        return _CLASSES[name]
    prefix = "keras_moe>"
    if name.startswith(prefix) and name[len(prefix) :] in _CLASSES:
        return _CLASSES[name[len(prefix) :]]
    known = sorted(ALIASES) + sorted(_CLASSES)
    raise ValueError(f"Unknown gate regularizer {name!r}; known names: {', '.join(known)}")


def serialize(regularizer):
    """Serializes a `GateRegularizer` to a Keras config dict (JSON-compatible)."""
    if not isinstance(regularizer, GateRegularizer):
        raise ValueError(
            f"`regularizer` must be a GateRegularizer, got {type(regularizer).__name__}"
        )
    return keras.saving.serialize_keras_object(regularizer)


def deserialize(config, custom_objects=None):
    """Rebuilds a `GateRegularizer` from a config.

    Args:
        config: a dict from `serialize`, a plain `{"class_name": ..., "config": {...}}`
            dict (class names and the names `get` knows are accepted), or a name string.
        custom_objects: optional dict of further classes, as in
            `keras.saving.deserialize_keras_object`.

    Returns:
        A `GateRegularizer`.
    """
    if isinstance(config, str):
        return _lookup(config)()
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            "`config` must be a name or a dict with a 'class_name' key, got "
            f"{config!r}"
        )
    objects = dict(_CLASSES)
    class_name = config["class_name"]
    if class_name not in objects and not (custom_objects and class_name in custom_objects):
        objects[class_name] = _lookup(class_name)
    objects.update(custom_objects or {})
    result = keras.saving.deserialize_keras_object(config, custom_objects=objects)
    if not isinstance(result, GateRegularizer):
        raise ValueError(f"{config!r} does not describe a GateRegularizer")
    return result


def get(identifier):
    """Returns a `GateRegularizer` for an instance, a name, or a config dict.

    Args:
        identifier: `None` (returns `None`), a `GateRegularizer` (returned as is), a name
            (`"importance"`, `"load"`, `"switch"`, `"z_loss"`, `"entropy"`, `"variance"`,
            `"l1"`, or a class name; built with default coefficients), or a config dict
            (see `deserialize`).

    Raises:
        ValueError: for an unknown name (the message lists the known names) or an
            identifier of another type.
    """
    if identifier is None:
        return None
    if isinstance(identifier, GateRegularizer):
        return identifier
    if isinstance(identifier, str):
        return _lookup(identifier)()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    raise ValueError(
        "Could not interpret gate regularizer identifier of type "
        f"{type(identifier).__name__}: {identifier!r}"
    )


def check_gate_supports(regularizer, gate, argument="balance_loss"):
    """Raises a ValueError if `regularizer` would be an inert term for `gate`.

    A term that needs a smooth load (`LoadLoss`) on a gate whose load is a hard count
    (its `smooth_load` attribute is False) would add a loss with no gradient. The one
    exception is a gate that sends every token to every expert (`top_k` equal to
    `num_experts`), where the load is balanced by construction and the term is 0.
    Gates that do not say (no `smooth_load` attribute) are not checked.

    Args:
        regularizer: A `GateRegularizer`.
        gate: The gate layer whose outputs it will read.
        argument: The argument name to put in the message.
    """
    if not getattr(regularizer, "needs_smooth_load", False):
        return
    if getattr(gate, "smooth_load", None) is not False:
        return
    top_k = getattr(gate, "top_k", None)
    if top_k is not None and top_k == getattr(gate, "num_experts", None):
        return
    raise ValueError(
        f"`{argument}`: {type(regularizer).__name__} needs a gate whose load has a "
        f"gradient in training (NoisyTopKGate with noisy=True); the load of "
        f"{type(gate).__name__} '{gate.name}' is a hard count, so the term would have "
        "no gradient. Use ImportanceLoss or SwitchLoadBalanceLoss with this gate, or "
        "gate='noisy_top_k'."
    )


def get_list(identifiers, argument="balance_loss", gate=None):
    """The regularizers a layer's `balance_loss` argument names, as a list.

    Args:
        identifiers: None, one identifier `get` accepts, or a list of them.
        argument: The layer argument's name, for error messages.
        gate: The gate layer whose outputs the regularizers will read, if known; each
            regularizer is checked against it with `check_gate_supports`.

    Returns:
        A list of `GateRegularizer` (empty for None).

    Raises:
        ValueError: naming `argument`, for an identifier `get` cannot interpret or a
            regularizer the gate cannot support.
    """
    if identifiers is None:
        return []
    if not isinstance(identifiers, (list, tuple)):
        identifiers = [identifiers]
    resolved = []
    for item in identifiers:
        try:
            regularizer = get(item)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`{argument}` must be None, a regularizer from keras_moe.regularizers "
                "(instance, registered name or config) or a list of them; got "
                f"{item!r}: {error}"
            ) from error
        if gate is not None:
            check_gate_supports(regularizer, gate, argument)
        resolved.append(regularizer)
    return resolved

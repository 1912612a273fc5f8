"""`sparsify(model)`: keras-hub MoE blocks replaced by `MoEDense` (see the package doc)."""

import keras
import numpy as np
from keras import ops

from keras_moe import compat, expert_parallel, regularizers
from keras_moe.layers import dispatch as dispatch_lib
from keras_moe.layers.experts import GATED_EXPERTS, StackedExperts
from keras_moe.layers.gates import SoftmaxGate
from keras_moe.layers.moe_dense import MoEDense

# Options `sparsify` accepts and a sparsified backbone's config keeps.
DISPATCH_MODES = ("sparse", "capacity", "dense")


def _np(variable):
    return np.asarray(ops.convert_to_numpy(variable))


class _Unconvertible(ValueError):
    """A block this converter cannot reproduce; `_convert_block` names the caller."""


def _split_shared(gate, up, down, width):
    """A shared SwiGLU MLP of hidden width `n * width` as `n` stacked experts of
    `width` (a GLU is a sum over its hidden units, so the sum of the pieces is exact)."""
    d, total = gate.shape
    if total % width:
        raise _Unconvertible(
            f"the shared expert's hidden width ({total}) must be a multiple of "
            f"the routed experts' ({width}) to become MoEDense shared experts of that width."
        )
    n = total // width

    def stack_in(kernel):  # (d, n * f) -> (n, d, f)
        return np.transpose(kernel.reshape(d, n, width), (1, 0, 2))

    return n, stack_in(gate), stack_in(up), down.reshape(n, width, -1)


def _qwen_bank(bank):
    """Qwen-family expert bank: fused `[gate | up]` (E, d, 2f) and down (E, f, d)."""
    fused = _np(bank._expert_feedforward_gate_dense)
    f = fused.shape[-1] // 2
    return {"gate_kernel": fused[..., :f], "up_kernel": fused[..., f:],
            "down_kernel": _np(bank._expert_feedforward_output_dense)}


def _qwen_mlp(mlp, width):
    return _split_shared(_np(mlp._feedforward_gate_dense.kernel),
                         _np(mlp._feedforward_intermediate_dense.kernel),
                         _np(mlp._feedforward_output_dense.kernel), width)


def _mixtral(block):
    bank = block.expert_bank
    spec = dict(top_k=block.top_k, normalize_top_k=True, router_bias=False,
                gated_experts="swiglu", use_bias=False, router_output="logits",
                aux_coefficient=block.router_aux_loss_coef)
    weights = {"router_kernel": _np(block._sparse_feedforward_gate_dense.kernel),
               "gate_kernel": _np(bank._expert_feedforward_gate_dense),
               "up_kernel": _np(bank._expert_feedforward_intermediate_dense),
               "down_kernel": _np(bank._expert_feedforward_output_dense)}
    return spec, weights


def _qwen_family(block, router, normalize_top_k, shared=None):
    """The Qwen MoE blocks: a bias-free softmax router, the fused expert bank, and
    `shared` = (the shared SwiGLU MLP, its sigmoid gate's dense) where there is one."""
    spec = dict(top_k=block.top_k, normalize_top_k=normalize_top_k, router_bias=False,
                gated_experts="swiglu", use_bias=False, router_output="logits",
                aux_coefficient=block.router_aux_loss_coefficient)
    weights = {"router_kernel": _np(router.kernel), **_qwen_bank(block.expert_bank)}
    if shared is not None:
        mlp, gate_dense = shared
        n, gate, up, down = _qwen_mlp(mlp, weights["up_kernel"].shape[-1])
        spec.update(num_shared_experts=n, shared_expert_gate=True)
        weights.update(shared_gate_kernel=gate, shared_up_kernel=up,
                       shared_down_kernel=down,
                       shared_expert_gate_kernel=_np(gate_dense.kernel))
    return spec, weights


def _qwen_moe(block):
    return _qwen_family(block, block._sparse_feedforward_gate_dense,
                        bool(block.norm_top_k_prob),
                        shared=(block.shared_expert_dense, block.shared_expert_gate_dense))


def _qwen3_moe(block):
    return _qwen_family(block, block._sparse_feedforward_gate_dense,
                        bool(block.norm_top_k_prob))


def _qwen3_5_moe(block):  # always renormalised
    return _qwen_family(block, block._router_gate, True,
                        shared=(block.shared_expert, block._shared_expert_gate))


def _gpt_oss(block):
    experts = block.experts
    if (experts.alpha, experts.limit) != (1.702, 7.0):
        raise _Unconvertible(
            f"GPT-OSS experts with alpha={experts.alpha}, limit={experts.limit}; "
            "MoEDense's clamped_swiglu has GPT-OSS's alpha=1.702, limit=7.0."
        )
    # Top-k of the logits, then a softmax over the k: the renormalised softmax.
    spec = dict(top_k=block.top_k, normalize_top_k=True, router_bias=True,
                gated_experts="clamped_swiglu", use_bias=True, router_output="gates",
                aux_coefficient=None)
    fused, fused_bias = _np(experts.gate_up_proj), _np(experts.gate_up_proj_bias)
    weights = {"router_kernel": _np(block.router.router_dense.kernel),
               "router_bias": _np(block.router.router_dense.bias),
               # GPT-OSS interleaves gate and up: even columns gate, odd columns up.
               "gate_kernel": fused[..., ::2], "up_kernel": fused[..., 1::2],
               "gate_bias": fused_bias[..., ::2], "up_bias": fused_bias[..., 1::2],
               "down_kernel": _np(experts.down_proj), "down_bias": _np(experts.down_proj_bias)}
    return spec, weights


@keras.saving.register_keras_serializable(package="keras_moe")
class HubExpertBank(StackedExperts, keras.layers.Layer):
    """Stacked gated experts run only on their tokens, for a router that is elsewhere.

    Called as `bank(tokens, dispatch_weights)` (Gemma4's expert bank: the decoder runs
    its own router on other inputs and passes (tokens, experts) combine weights with
    `top_k` non-zero entries per row): the `top_k` largest weights of each row choose the
    experts, and `sum_j w_j * scale_e_j * expert_e_j(x)` is computed with `MoEDense`'s
    experts and dispatch (`per_expert_scale`: Gemma4's learnable output scale of each
    expert, applied to its combine weight).

    Args:
        units: Output width of every expert (the hidden size).
        num_experts: Number of experts.
        top_k: Experts per token (non-zero entries of each dispatch-weight row).
        expert_hidden_units: Width of the gate and up projections.
        gated_experts: One of `keras_moe.layers.experts.GATED_EXPERTS`.
        dispatch: `"sparse"` (dropless), `"capacity"` or `"dense"`.
        capacity_factor: Capacity dispatch's slack.
        **kwargs: Base layer arguments.

    Example:

    >>> bank = HubExpertBank(16, num_experts=4, top_k=2, expert_hidden_units=8)
    >>> weights = np.array([[0.5, 0.5, 0.0, 0.0]] * 3, "float32")
    >>> bank(np.zeros((3, 16), "float32"), weights).shape
    (3, 16)
    """

    def __init__(self, units, num_experts, top_k, expert_hidden_units,
                 gated_experts="geglu_tanh", dispatch="sparse", capacity_factor=1.25,
                 **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.expert_hidden_units = int(expert_hidden_units)
        if gated_experts not in GATED_EXPERTS:
            raise ValueError(f"`gated_experts` must be one of {GATED_EXPERTS}; got "
                             f"{gated_experts!r}.")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"`dispatch` must be one of {DISPATCH_MODES}; got {dispatch!r}.")
        self.gated_experts = gated_experts
        self.dispatch = dispatch
        self.capacity_factor = float(capacity_factor)
        # What StackedExperts reads: no biases, no shared experts, no placement.
        self.use_bias = False
        self.num_shared_experts = 0
        self.shared_expert_gate = False
        self.expert_devices = None
        self.activation = keras.activations.linear
        self.expert_hidden_activation = keras.activations.linear
        self.kernel_initializer = keras.initializers.get("glorot_uniform")
        self.bias_initializer = keras.initializers.get("zeros")

    def build(self, input_shape, dispatch_weights_shape=None):
        input_dim = input_shape[-1]
        with expert_parallel.expert_weights(self.num_experts):
            self._build_experts(input_dim)
        self._build_shared_experts(input_dim)
        self.per_expert_scale = self.add_weight(name="per_expert_scale",
                                                shape=(self.num_experts,),
                                                initializer="ones")

    def _bookkeeping_variables(self):
        return [self.per_expert_scale]  # saved after the expert weights

    def call(self, tokens, dispatch_weights):
        weights = ops.cast(dispatch_weights, "float32")
        top_gates, top_indices = ops.top_k(weights, self.top_k)
        top_indices = ops.cast(top_indices, "int32")
        _record(self, weights)
        top_gates = top_gates * ops.take(ops.cast(self.per_expert_scale, "float32"),
                                         top_indices)
        if self.dispatch == "sparse":
            return dispatch_lib.sparse_dispatch(tokens, top_indices, top_gates,
                                                self.num_experts, self._grouped_experts)
        if self.dispatch == "dense":
            gates = weights * ops.cast(self.per_expert_scale, "float32")[None, :]
            return dispatch_lib.dense_combine(
                self._batched_experts(ops.expand_dims(tokens, 0)), gates)
        static = tokens.shape[0]
        capacity = dispatch_lib.expert_capacity(
            static if static is not None else ops.shape(tokens)[0], self.top_k,
            self.num_experts, self.capacity_factor)
        outputs, _ = dispatch_lib.capacity_dispatch(tokens, top_indices, top_gates,
                                                    self.num_experts, capacity,
                                                    self._batched_experts)
        return outputs

    def compute_output_shape(self, input_shape, dispatch_weights_shape=None):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "num_experts": self.num_experts,
                       "top_k": self.top_k, "expert_hidden_units": self.expert_hidden_units,
                       "gated_experts": self.gated_experts, "dispatch": self.dispatch,
                       "capacity_factor": self.capacity_factor})
        return config


def _gemma4_bank(bank, top_k, options):
    """Gemma4: its router stays (it reads other inputs than the experts); the expert
    bank becomes a `HubExpertBank` (GeGLU, tanh GELU), `top_k` from the router."""
    if options["balance_loss"] not in (None, "family"):
        raise _Unconvertible(
            "Gemma4 keeps its own router, so `balance_loss` cannot be added to "
            "its MoE blocks (keras-hub's Gemma4 has no auxiliary loss); pass "
            "balance_loss=None or 'family'.")
    gate, up, down = _np(bank.gate_proj), _np(bank.up_proj), _np(bank.down_proj)
    num_experts, hidden, width = gate.shape
    new = HubExpertBank(hidden, num_experts, top_k, width, gated_experts="geglu_tanh",
                        dispatch=options["dispatch"],
                        capacity_factor=options["capacity_factor"], name=bank.name,
                        dtype=bank.dtype_policy)
    new.build((None, hidden))
    new.gate_kernel.assign(gate)
    new.hidden_kernel.assign(up)
    new.kernel.assign(down)
    new.per_expert_scale.assign(_np(bank.per_expert_scale))
    return new


# Backbone class name -> (family, decoder attribute holding the MoE block, block class
# name, converter).
FAMILIES = {
    "MixtralBackbone": ("mixtral", "_sparse_moe_block", "MixtralSparseMoeBlock", _mixtral),
    "QwenMoeBackbone": ("qwen_moe", "mlp", "QwenSparseMoeBlock", _qwen_moe),
    "Qwen3MoeBackbone": ("qwen3_moe", "mlp", "Qwen3SparseMoeBlock", _qwen3_moe),
    "Qwen3_5MoeBackbone": ("qwen3_5_moe", "mlp", "Qwen3_5MoeSparseMoeBlock", _qwen3_5_moe),
    "GptOssBackbone": ("gpt_oss", "sparse_moe_block", "GptOssSparseMoeBlock", _gpt_oss),
    "Gemma4Backbone": ("gemma4", "moe_expert_bank", "Gemma4MoEBlock", None),
}
SUPPORTED_FAMILIES = tuple(family for family, _, _, _ in FAMILIES.values())


def _record(block, gates):
    """Keeps a block's (tokens, experts) gates while `expert_use` runs the model."""
    recorded = getattr(block, "_expert_use_gates", None)
    if recorded is not None:
        recorded.append(ops.convert_to_numpy(gates).reshape(-1, gates.shape[-1]))


def expert_use(model, inputs):
    """Each converted MoE block's share of the token-assignments per expert.

    Runs `model` once, eagerly and in inference mode, on `inputs`, and reads the gates of
    every `HubMoEBlock` and `HubExpertBank` of a sparsified model.

    Args:
        model: A model sparsified by `sparsify`.
        inputs: Its inputs (e.g. `{"token_ids": ..., "padding_mask": ...}`).

    Returns:
        Dict of `"<decoder layer>/<block>"` names to a (experts,) numpy array of
        assignment shares (summing to 1), in the order of the decoder layers.

    Example:

    >>> shares = expert_use(causal_lm, {"token_ids": ids, "padding_mask": mask})
    """
    backbone = getattr(model, "backbone", model)
    blocks = {}  # "<decoder>/<block>" -> block, in the order of the decoders
    for decoder in getattr(backbone, "transformer_layers", []):
        for layer in compat.flatten_layers(decoder, include_self=False):
            if isinstance(layer, (HubMoEBlock, HubExpertBank)):
                blocks[f"{decoder.name}/{layer.name}"] = layer
    if not blocks:
        raise ValueError("expert_use: the model has no block converted by sparsify.")
    for block in blocks.values():
        object.__setattr__(block, "_expert_use_gates", [])
    try:
        model(inputs, training=False)
        gates = {path: np.concatenate(block._expert_use_gates)
                 for path, block in blocks.items()}
    finally:
        for block in blocks.values():
            object.__setattr__(block, "_expert_use_gates", None)
    shares = {}
    for path, values in gates.items():
        counts = (values > 0).sum(axis=0).astype("float64")
        shares[path] = counts / counts.sum()
    return shares


@keras.saving.register_keras_serializable(package="keras_moe")
class HubMoEBlock(keras.layers.Layer):
    """A keras-hub MoE block's stand-in: an `MoEDense`, called as keras-hub calls it.

    keras-hub's decoders call their MoE block as `block(x, attention_mask=...,
    training=...)` on (batch, sequence, hidden) inputs and read back `(outputs,
    router_output)`; this layer does the same, with `router_output` the router logits
    (tokens, experts) or, as GPT-OSS returns, the combine weights (tokens, experts,
    zero outside the top k).

    Args:
        moe: A `keras_moe.layers.MoEDense` (or its serialized config) with
            `return_gates=True`.
        router_output: `"logits"` or `"gates"`.
        **kwargs: Base layer arguments.

    Example:

    >>> block = HubMoEBlock(MoEDense(16, num_experts=4, top_k=2, expert_hidden_units=8,
    ...                              gated_experts="swiglu", return_gates=True))
    >>> outputs, logits = block(np.zeros((2, 3, 16), "float32"))
    """

    def __init__(self, moe, router_output="logits", **kwargs):
        super().__init__(**kwargs)
        if isinstance(moe, dict):
            moe = keras.saving.deserialize_keras_object(moe)
        if not isinstance(moe, MoEDense) or not moe.return_gates:
            raise ValueError(
                "`moe` must be a keras_moe.layers.MoEDense with return_gates=True; got "
                f"{moe!r}."
            )
        if router_output not in ("logits", "gates"):
            raise ValueError(
                f"`router_output` must be 'logits' or 'gates'; got {router_output!r}.")
        self.moe = moe
        self.router_output = router_output

    def build(self, input_shape):
        self.moe.build(input_shape)

    def call(self, hidden_states, attention_mask=None, training=None):
        outputs, gates = self.moe(hidden_states, training=training)
        num_experts = self.moe.num_experts
        _record(self, gates)
        if self.router_output == "gates":
            return outputs, ops.cast(ops.reshape(gates, (-1, num_experts)), outputs.dtype)
        gate = self.moe.gate
        tokens = ops.reshape(ops.cast(hidden_states, "float32"), (-1, hidden_states.shape[-1]))
        logits = ops.matmul(tokens, gate.kernel)
        if gate.bias is not None:
            logits = logits + gate.bias
        return outputs, ops.cast(logits, outputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), (None, self.moe.num_experts)

    def get_config(self):
        config = super().get_config()
        config.update({"moe": keras.saving.serialize_keras_object(self.moe),
                       "router_output": self.router_output})
        return config


# Families keras-hub has that `sparsify` does not convert, and why.
NOT_CONVERTED = {}


def _family_of(backbone):
    for cls in type(backbone).__mro__:
        if cls.__name__ in FAMILIES:
            return cls.__name__
        if cls.__name__ in NOT_CONVERTED:
            raise ValueError(
                f"sparsify: {cls.__name__}: {NOT_CONVERTED[cls.__name__]}. Supported "
                f"families: {', '.join(SUPPORTED_FAMILIES)}.")
    raise ValueError(
        f"sparsify: {type(backbone).__name__} is not a supported keras-hub MoE backbone; "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)} "
        f"({', '.join(FAMILIES)})."
    )


def _balance_loss(option, coefficient):
    if option == "family":
        return [] if coefficient is None else [regularizers.SwitchLoadBalanceLoss(coefficient)]
    return option


def _converted_block(block, converter, options):
    spec, weights = converter(block)
    num_experts, hidden, width = weights["up_kernel"].shape
    gate = SoftmaxGate(num_experts, top_k=spec["top_k"], use_bias=spec["router_bias"],
                       normalize_top_k=spec["normalize_top_k"], name="gate")
    moe = MoEDense(
        hidden, num_experts=num_experts, top_k=spec["top_k"], gate=gate,
        expert_hidden_units=width, gated_experts=spec["gated_experts"],
        use_bias=spec["use_bias"], dispatch=options["dispatch"],
        capacity_factor=options["capacity_factor"],
        balance_loss=_balance_loss(options["balance_loss"], spec["aux_coefficient"]),
        num_shared_experts=spec.get("num_shared_experts", 0),
        shared_expert_gate=spec.get("shared_expert_gate", False),
        return_gates=True, dtype=block.dtype_policy, name="moe",
    )
    new = HubMoEBlock(moe, router_output=spec["router_output"], name=block.name,
                      dtype=block.dtype_policy)
    new.build((None, None, hidden))
    gate.kernel.assign(weights["router_kernel"])
    if spec["router_bias"]:
        gate.bias.assign(weights["router_bias"])
    targets = {"gate_kernel": moe.gate_kernel, "up_kernel": moe.hidden_kernel,
               "down_kernel": moe.kernel}
    if spec["use_bias"]:
        targets.update(gate_bias=moe.gate_bias, up_bias=moe.hidden_bias, down_bias=moe.bias)
    if moe.num_shared_experts:
        shared = moe._shared_weights
        targets.update(shared_gate_kernel=shared["gate_kernel"],
                       shared_up_kernel=shared["hidden_kernel"],
                       shared_down_kernel=shared["kernel"],
                       shared_expert_gate_kernel=moe._shared_gate_kernel)
    for name, variable in targets.items():
        variable.assign(weights[name])
    return new


def _replace_attribute(layer, name, new):
    """`layer.<name> = new`, untracking the old sub-layer (its weights leave the model)."""
    old = getattr(layer, name)
    locked = layer._tracker.locked
    layer._tracker.unlock()
    layer._tracker.untrack(old)
    setattr(layer, name, new)
    if locked:
        layer._tracker.lock()


def _sparsify_backbone(backbone, options):
    family_class = _family_of(backbone)
    family, attribute, block_class, converter = FAMILIES[family_class]
    replaced = 0
    for decoder in backbone.transformer_layers:
        block = getattr(decoder, attribute, None)
        if block is None or type(block).__name__ != block_class:
            continue  # a dense feed-forward layer (e.g. Qwen-MoE's mlp_only_layers)
        top_k = decoder.moe_router.num_experts_per_token if converter is None else None
        new = _convert_block(block, converter, options, top_k, caller="sparsify")
        _replace_attribute(decoder, attribute, new)
        replaced += 1
    if not replaced:
        raise ValueError(
            f"sparsify: {type(backbone).__name__} ({family}) has no {block_class} to "
            "replace."
        )
    backbone._sparse_moe_options = dict(options)


_SPARSE_SUBCLASSES = {}  # (base, marker) -> its registered Sparse<base> subclass


def _registered_sparse_subclass(base, marker, attributes):
    """`keras_moe>Sparse<base name>`, built once per base: a subclass of `base` with
    `attributes`, flagged by the class attribute `marker` (a flagged class is its own
    sparse subclass)."""
    if getattr(base, marker, False):
        return base
    key = (base, marker)
    if key not in _SPARSE_SUBCLASSES:
        name = "Sparse" + base.__name__
        cls = type(name, (base,), {**attributes, marker: True})  # module: this one
        _SPARSE_SUBCLASSES[key] = keras.saving.register_keras_serializable(
            package="keras_moe", name=name)(cls)
    return _SPARSE_SUBCLASSES[key]


def sparse_backbone_class(base):
    """The registered subclass of a keras-hub backbone class whose instances are built
    sparsified (its config adds `sparse_moe`, the options of `sparsify`), so that a
    saved sparsified model loads sparsified.

    Args:
        base: A supported keras-hub backbone class (e.g. `keras_hub.models.MixtralBackbone`).

    Returns:
        The subclass, `keras_moe>Sparse<base name>` in saved files.
    """

    def __init__(self, *args, sparse_moe=None, **kwargs):
        base.__init__(self, *args, **kwargs)
        _sparsify_backbone(self, _options(**(sparse_moe or {})))

    def get_config(self):
        config = base.get_config(self)
        config["sparse_moe"] = dict(self._sparse_moe_options)
        return config

    return _registered_sparse_subclass(
        base, "_is_sparse_moe_backbone",
        {"__init__": __init__, "get_config": get_config,
         "__doc__": sparse_backbone_class.__doc__})


def sparse_task_class(base):
    """The registered subclass of a keras-hub task class (e.g.
    `keras_hub.models.MixtralCausalLM`) whose `backbone_cls` is the sparse backbone
    class: `sparsify` gives a task this class, so that `save_to_preset` records it
    (`task.json`) and `keras_hub.models.CausalLM.from_preset(dir)` (or the family's
    class) finds it and loads the task sparsified, as keras-hub finds a task for its
    own backbones.

    Args:
        base: A keras-hub task class whose `backbone_cls` is a supported backbone.

    Returns:
        The subclass, `keras_moe>Sparse<base name>` in saved files.
    """
    return _registered_sparse_subclass(
        base, "_is_sparse_moe_task",
        {"backbone_cls": sparse_backbone_class(base.backbone_cls),
         "__doc__": sparse_task_class.__doc__})


def _options(dispatch="sparse", capacity_factor=1.25, balance_loss="family"):
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"`dispatch` must be one of {DISPATCH_MODES}; got {dispatch!r}.")
    if balance_loss is not None and balance_loss != "family":
        if isinstance(balance_loss, (str, dict)):
            balance_loss = [balance_loss]
        balance_loss = [regularizers.serialize(regularizers.get(r))
                        if not isinstance(r, (str, dict)) else r for r in balance_loss]
    return {"dispatch": dispatch, "capacity_factor": float(capacity_factor),
            "balance_loss": balance_loss}


def sparse_block(block, *, top_k=None, dispatch="sparse", capacity_factor=1.25,
                 balance_loss="family"):
    """The sparse equivalent of one keras-hub MoE block, its weights copied.

    What `sparsify` puts in place of each block, for a block used on its own (a
    benchmark, a model of one's own built from keras-hub's layers). `block` is left as
    it was.

    Args:
        block: A built keras-hub MoE block: `MixtralSparseMoeBlock`,
            `QwenSparseMoeBlock`, `Qwen3SparseMoeBlock`, `Qwen3_5MoeSparseMoeBlock`,
            `GptOssSparseMoeBlock` (each becomes a `HubMoEBlock`, called as the block
            is), or Gemma4's expert bank `Gemma4MoEBlock` (becomes a `HubExpertBank`,
            called as `bank(tokens, dispatch_weights)`; its router stays).
        top_k: Gemma4 only, and required there: experts per token (the router's
            `num_experts_per_token`); the other blocks carry their own.
        dispatch: As in `sparsify`.
        capacity_factor: As in `sparsify`.
        balance_loss: As in `sparsify`.

    Returns:
        The new layer, built.

    Example:

    >>> from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
    >>> block = MixtralSparseMoeBlock(16, 8, 4, top_k=2)
    >>> block.build((None, None, 16))
    >>> outputs, router_logits = sparse_block(block)(np.ones((1, 3, 16), "float32"))
    """
    options = _options(dispatch, capacity_factor, balance_loss)
    by_class = {block_class: converter for _, _, block_class, converter in FAMILIES.values()}
    name = type(block).__name__
    if name not in by_class:
        raise ValueError(f"sparse_block: {name} is not a keras-hub MoE block this "
                         f"converts; supported: {', '.join(sorted(by_class))}.")
    if not block.built:
        raise ValueError(f"sparse_block: build the {name} first (its weights are copied).")
    converter = by_class[name]
    if converter is None:
        if top_k is None:
            raise ValueError("sparse_block: a Gemma4MoEBlock needs `top_k` (its router's "
                             "`num_experts_per_token`).")
    elif top_k is not None:
        raise ValueError(f"sparse_block: `top_k` is for Gemma4's expert bank only; a "
                         f"{name} routes with its own top_k.")
    return _convert_block(block, converter, options, top_k, caller="sparse_block")


def _convert_block(block, converter, options, top_k, caller):
    """The sparse layer for one block (Gemma4's bank when `converter` is None, with
    its router's `top_k`); a block it cannot reproduce is refused naming `caller`."""
    try:
        if converter is None:
            return _gemma4_bank(block, int(top_k), options)
        return _converted_block(block, converter, options)
    except _Unconvertible as error:
        raise ValueError(f"{caller}: {type(block).__name__}: {error}") from None


def sparsify(model, dispatch="sparse", capacity_factor=1.25, balance_loss="family"):
    """Replaces each MoE block of a keras-hub MoE model by an equivalent sparse one.

    Each MoE block (router and expert bank) of the backbone's decoder layers becomes a
    `HubMoEBlock` around a `keras_moe.layers.MoEDense` with the family's gated experts
    and router, its weights copied; the model is changed in place (its backbone's class
    becomes `sparse_backbone_class(...)`, so that `.keras` files load sparsified once
    `keras_moe.hub` is imported) and returned. Nothing else in the model changes.

    Args:
        model: A keras-hub backbone or task (e.g. `CausalLM`) of a supported family
            (`SUPPORTED_FAMILIES`): built from its config or `from_preset`.
        dispatch: `MoEDense` dispatch of the new blocks. `"sparse"` (default) is
            dropless, so the model computes what keras-hub's does; `"capacity"` drops
            the assignments over `capacity_factor` (static shapes, XLA/TPU).
        capacity_factor: Slack of capacity dispatch.
        balance_loss: `"family"`: the family's own auxiliary loss with its coefficient,
            as `SwitchLoadBalanceLoss` (keras-hub's `compute_load_balancing_loss` without
            its padding mask; GPT-OSS has none); None for none; or the `balance_loss` of
            `MoEDense` (names or configs of `keras_moe.regularizers`).

    Returns:
        `model`, sparsified.

    Example:

    >>> backbone = keras_hub.models.MixtralBackbone(
    ...     vocabulary_size=32, num_layers=2, num_query_heads=2, num_key_value_heads=1,
    ...     hidden_dim=16, intermediate_dim=8, num_experts=4, top_k=2)
    >>> backbone = sparsify(backbone)
    """
    options = _options(dispatch, capacity_factor, balance_loss)
    backbone = getattr(model, "backbone", model)
    if getattr(type(backbone), "_is_sparse_moe_backbone", False):
        raise ValueError(f"sparsify: {type(backbone).__name__} is already sparsified.")
    family_class = _family_of(backbone)
    _sparsify_backbone(backbone, options)
    base = next(c for c in type(backbone).__mro__ if c.__name__ == family_class)
    backbone.__class__ = sparse_backbone_class(type(backbone) if type(backbone) is base
                                               else type(backbone))
    if model is not backbone and getattr(type(model), "backbone_cls", None) is not None \
            and issubclass(base, type(model).backbone_cls):
        model.__class__ = sparse_task_class(type(model))  # e.g. for from_preset
    for attribute in ("train_function", "test_function", "predict_function",
                      "generate_function"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    return model


def _register_installed_families():
    """Registers the sparse subclass of every supported backbone keras-hub has, and of
    each of their task classes, so that loading a saved sparsified model (`.keras` or
    preset) needs only `import keras_moe.hub`."""
    try:
        import keras_hub
    except ImportError:
        return
    bases = set()
    for name in FAMILIES:
        base = getattr(keras_hub.models, name, None)
        if base is not None:
            sparse_backbone_class(base)
            bases.add(base)
    for task in vars(keras_hub.models).values():
        if isinstance(task, type) and issubclass(task, keras_hub.models.Task) \
                and getattr(task, "backbone_cls", None) in bases:
            sparse_task_class(task)


_register_installed_families()

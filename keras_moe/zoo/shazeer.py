"""Shazeer et al.'s sparsely-gated mixture of experts as an image classifier.

Builder: `sparse_moe_classifier(...)`, an MLP whose hidden layers are noisy top-k
`MoEDense` layers with importance and load balancing losses, or, with its routing
keywords, any router of `MoEDense` (sigmoid top-k, auxiliary-loss-free balancing,
expert choice, shared experts, group-limited routing) with any balancing losses.
"""

import keras

from keras_moe import regularizers
from keras_moe import validation
from keras_moe.layers.moe_dense import MoEDense
from keras_moe.zoo.registry import ModelFamily, register_family, register_model

SHAZEER = register_family(ModelFamily(
    name="shazeer",
    description="Shazeer et al. 2017: noisy top-k MoE layers with importance and load losses",
    search_space=(("num_experts", "experts"), ("top_k", "top_k"),
                  ("importance_weight", "decade"), ("load_weight", "decade")),
))


@register_model(family=SHAZEER)
def sparse_moe_classifier(
    *,
    input_shape=(28, 28, 1),
    num_classes=10,
    num_layers=1,
    units=256,
    num_experts=32,
    top_k=2,
    expert_hidden_units=None,
    importance_weight=0.1,
    load_weight=0.1,
    dropout=0.2,
    dispatch=None,
    rescale=None,
    gate="noisy_top_k",
    switch_weight=0.0,
    z_loss_weight=0.0,
    bias_update_rate=None,
    num_shared_experts=0,
    num_groups=None,
    top_k_groups=None,
    capacity_factor=None,
):
    """Classifier with noisy top-k MoEDense hidden layers and importance + load losses.

    `input -> flatten -> [MoEDense(units, num_experts, top_k, noisy top-k gate) ->
    dropout] x num_layers -> Dense(num_classes)` (logits). Each MoE layer is Shazeer et
    al.'s: `H(x) = x W_g + N(0, 1) softplus(x W_noise)` in training, softmax over the top
    k, only the chosen experts computed (sparse dispatch on TensorFlow), and the losses
    `importance_weight * CV(Importance)^2 + load_weight * CV(Load)^2` per layer (0.1
    each in the paper's experiments).

    The routing keywords swap the router for one of current MoE models (the defaults
    are Shazeer's): `gate` (`"noisy_top_k"`, `"softmax"` top-k, `"sigmoid_top_k"`,
    `"expert_choice"`), the Switch and z-loss terms, `bias_update_rate`
    (auxiliary-loss-free balancing), `num_shared_experts`, `num_groups` and
    `top_k_groups`; `LoadLoss` needs the noisy gate, so set `load_weight=0` with the
    others. With `gate="expert_choice"` the experts choose their tokens and `top_k`
    sets the compute: each token gets `capacity_factor` experts on average, `top_k` by
    default (Zhou et al. compare expert choice at capacity factor 2 with top-2).

    Shazeer et al. report language modelling and translation, not image
    classification: the defaults for Fashion-MNIST-size inputs are our choice. Experts
    are single ReLU layers (`activation(x W_e + b_e)`) of width `units` by default,
    which keeps a step's cost independent of `num_experts`; `expert_hidden_units` gives
    the paper's one-hidden-layer feed-forward experts (output activation ReLU here, so
    stacked layers stay non-linear). Parameters grow linearly with `num_experts` while
    each example's compute grows only with `top_k`.

    Args:
        input_shape: Input shape (flattened), (28, 28, 1) for Fashion-MNIST.
        num_classes: Number of classes, >= 2.
        num_layers: Number of MoE hidden layers, >= 1.
        units: Output width of every MoE layer.
        num_experts: Experts per MoE layer.
        top_k: Experts per example, 1 <= top_k <= num_experts (noise and the load
            estimator need top_k < num_experts to matter).
        expert_hidden_units: None (single-layer experts) or the hidden width of
            two-layer feed-forward experts.
        importance_weight: Coefficient of the importance CV^2 loss, >= 0.
        load_weight: Coefficient of the load CV^2 loss, >= 0.
        dropout: Dropout rate after each MoE layer, in [0, 1).
        dispatch: `MoEDense` dispatch mode (None: sparse on TensorFlow).
        rescale: None, or a factor applied to the inputs first (e.g. 1/255 for uint8).
        gate: The router: a `MoEDense` gate name (`"noisy_top_k"`, Shazeer's).
        switch_weight: Coefficient of the Switch load-balancing loss, >= 0 (Fedus et
            al.: 1e-2).
        z_loss_weight: Coefficient of the router z-loss, >= 0 (Zoph et al.: 1e-3).
        bias_update_rate: None, or auxiliary-loss-free balancing's rate (top-k gates).
        num_shared_experts: Experts every example passes through, >= 0.
        num_groups: None, or the expert groups of group-limited routing.
        top_k_groups: The groups each example keeps (with `num_groups`).
        capacity_factor: None (the layer's default, 1.25, for capacity dispatch; `top_k`
            for expert choice), or `MoEDense`'s capacity factor.

    Returns:
        A `keras.Model` (not compiled) with one input named `"image"`, outputting
        logits; its MoE layers are named `moe_0`, `moe_1`, ...

    Example:

    >>> model = sparse_moe_classifier(num_experts=16, top_k=2)
    >>> model.output.shape
    (None, 10)

    Reference:
        Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
        Mixture-of-Experts Layer", ICLR 2017 (notes: `shared/papers/003`).
    """
    num_classes = validation.integer("num_classes", num_classes, minimum=2)
    num_layers = validation.positive_int("num_layers", num_layers)
    dropout = validation.number("dropout", dropout, minimum=0, maximum=0.999)
    importance_weight = validation.non_negative_float("importance_weight", importance_weight)
    load_weight = validation.non_negative_float("load_weight", load_weight)
    switch_weight = validation.non_negative_float("switch_weight", switch_weight)
    z_loss_weight = validation.non_negative_float("z_loss_weight", z_loss_weight)
    if rescale is not None:
        rescale = validation.positive_float("rescale", rescale)

    losses = []
    if importance_weight > 0:
        losses.append(regularizers.ImportanceLoss(importance_weight))
    if load_weight > 0:
        losses.append(regularizers.LoadLoss(load_weight))
    if switch_weight > 0:
        losses.append(regularizers.SwitchLoadBalanceLoss(switch_weight))
    if z_loss_weight > 0:
        losses.append(regularizers.RouterZLoss(z_loss_weight))
    routing = dict(gate=gate, num_shared_experts=num_shared_experts,
                   bias_update_rate=bias_update_rate, num_groups=num_groups,
                   top_k_groups=top_k_groups)
    if gate == "expert_choice":
        if top_k is None and capacity_factor is None:
            raise ValueError("gate='expert_choice' needs `capacity_factor` (mean experts "
                             "per example) or `top_k` (the same, from a top-k budget).")
        routing["capacity_factor"] = float(top_k if capacity_factor is None else capacity_factor)
        top_k = None
    elif capacity_factor is not None:
        routing["capacity_factor"] = capacity_factor

    inputs = keras.Input(tuple(input_shape), name="image")
    x = keras.layers.Flatten()(inputs)
    if rescale is not None:
        x = keras.layers.Rescaling(rescale)(x)
    for i in range(num_layers):
        x = MoEDense(
            units,
            num_experts=num_experts,
            top_k=top_k,
            expert_hidden_units=expert_hidden_units,
            activation="relu",
            dispatch=dispatch,
            balance_loss=losses or None,
            name=f"moe_{i}",
            **routing,
        )(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="sparse_moe_classifier")

"""Eigen et al.'s running-assignment constraint, switched for every layer of a model.

The constraint lives in `MoEDense(assignment_margin=m)` (an expert whose running total of
gate values runs more than `m` ahead of the mean is switched off for the example); these
helpers find every such layer of a model (nested models included) and switch or reset
them together. The Eigen family's `assignment_constraint` phase setting
(`keras_moe.zoo.eigen`) and the procedure `keras_moe.training.eigen` use them.
"""

from keras_moe import compat
from keras_moe.layers import MoEDense

__all__ = ["constrained_moe_layers", "require_constrained_layers", "reset_assignment_totals",
           "set_assignment_constraints"]


def constrained_moe_layers(model):
    """Every `MoEDense` in `model` (nested models included) with an assignment margin.

    Args:
        model: A Keras model or layer.

    Returns:
        A list of `MoEDense` layers with `assignment_margin` set, in the model's order.
    """
    layers, seen = [], set()
    for layer in compat.flatten_layers(model, include_self=True, recursive=True):
        if isinstance(layer, MoEDense) and layer.assignment_margin is not None:
            if id(layer) not in seen:
                seen.add(id(layer))
                layers.append(layer)
    return layers


def require_constrained_layers(model):
    """`constrained_moe_layers(model)`, refusing a model without any (or unbuilt ones)."""
    layers = constrained_moe_layers(model)
    if not layers:
        raise ValueError(
            f"{getattr(model, 'name', model)!r} has no MoEDense layer with "
            "`assignment_margin` set; Eigen's constrained training needs at least one "
            "(e.g. keras_moe.zoo.dmoe_mnist())."
        )
    unbuilt = [layer.name for layer in layers if not layer.built]
    if unbuilt:
        raise ValueError(
            f"MoEDense layers {unbuilt} are not built yet; call the model on data (or "
            "build it) before switching the assignment constraint."
        )
    return layers


def set_assignment_constraints(model, active):
    """Switches the running-assignment constraint of every constrained `MoEDense` on/off.

    Returns:
        The layers switched.
    """
    layers = require_constrained_layers(model)
    for layer in layers:
        layer.set_assignment_constraint(bool(active))
    return layers


def reset_assignment_totals(model):
    """Zeroes the running assignment totals of every constrained `MoEDense`.

    Returns:
        The layers reset.
    """
    layers = require_constrained_layers(model)
    for layer in layers:
        layer.reset_assignment_totals()
    return layers

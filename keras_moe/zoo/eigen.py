"""Eigen, Ranzato & Sutskever's deep mixture of experts (DMoE) and its baselines.

Paper 001, "Learning Factored Representations in a Deep Mixture of Experts" (2013):

    z1 = sum_i g1_i(x)  f1_i(x)        f1_i(x) = relu(W1_i x + b1_i)
    z2 = sum_j g2_j(z1) f2_j(z1)       f2_j(z) = relu(W2_j z + b2_j)
    F(x) = softmax(W3 z2 + b3)         g(x) = softmax(B relu(A x + a) + b)

Builders (all registered in the zoo):

- `dmoe_mnist`: the DMoE for jittered MNIST (36x36x1 images), default 4 x 100 - 4 x 100
  experts with gates of 50 - 50 hidden units; `second_layer` selects the Table 1 columns.
- `dmoe_mnist_single_expert`, `dmoe_mnist_concat`: Table 1's baselines (one fixed
  second-layer expert; all second-layer experts concatenated), first layer a mixture.
- `dmoe_mnist_dnn`: a fully connected network with the DMoE's second-layer width and a
  first layer widened until its parameter count equals the DMoE's (gates included).
- `dmoe_mnist_one_layer`: the one-layer model (mixture, single expert or concatenation).
- `dmoe_monophone`: the speech configuration (440 inputs, 40 classes, 4 x 128 - 16 x 128,
  gates of 64).

Choices where the paper is silent (each is a keyword):

- The models end in logits (`output_activation=None`): compile with
  `SparseCategoricalCrossentropy(from_logits=True)`; pass `output_activation="softmax"`
  for the paper's F(x).
- Image inputs are raw pixel values in [0, 255] (uint8 or float) and are flattened and
  multiplied by `input_scale=1/255` inside the model; pass `input_scale=None` for inputs
  already scaled.
- The assignment margin `m` of the running-assignment constraint defaults to
  `DEFAULT_ASSIGNMENT_MARGIN = 100.0` examples: an expert may run at most 100 examples'
  worth of gate mass ahead of the mean total, less than one batch of 128, so assignments
  stay balanced from the first steps while the gates stay free to specialise within
  that slack. Set `assignment_margin=None` for no constraint. Lift it for the paper's
  fine-tuning phase (a recipe phase's `assignment_constraint = false`, or
  `keras_moe.training.eigen`).
- Every MoE layer returns its gates as a second output tensor (`return_gates=True`) so
  `keras_moe.analysis.gating.gating_model(model)` can read them; the model's only output
  is the class scores.

The family (`EIGEN`): recipe phases may switch the running-assignment constraint
(`assignment_constraint`; switching it on at a phase's start zeroes the running
totals), and `keras-moe tune` searches the experts per layer and the margin.
"""

import keras

from keras_moe import validation
from keras_moe.layers import MoEDense
from keras_moe.zoo.eigen_constraint import (  # noqa: F401 (the family's helpers)
    constrained_moe_layers,
    require_constrained_layers,
    reset_assignment_totals,
    set_assignment_constraints,
)
from keras_moe.zoo.registry import ModelFamily, PhaseSetting, register_family, register_model

DEFAULT_ASSIGNMENT_MARGIN = 100.0
SECOND_LAYERS = ("mixture", "single", "concat")

# Table 1's model sizes: experts x hidden units per layer, gate hidden units per layer.
TABLE1_SIZES = {
    "4x100-4x100": dict(experts=(4, 4), units=(100, 100), gate_hidden_units=(50, 50)),
    "4x100-4x20 (gates 50-50)": dict(experts=(4, 4), units=(100, 20), gate_hidden_units=(50, 50)),
    "4x100-4x20 (gates 50-20)": dict(experts=(4, 4), units=(100, 20), gate_hidden_units=(50, 20)),
    "4x50-4x20": dict(experts=(4, 4), units=(50, 20), gate_hidden_units=(20, 20)),
}
TABLE1_ONE_LAYER = dict(experts=4, units=100, gate_hidden_units=50)

# The paper's Table 1 (error %, jittered MNIST): {row: {column: (test, train)}}.
PAPER_TABLE1 = {
    "4x100-4x100": {"single": (1.33, 0.85), "mixture": (1.42, 0.91),
                    "concat": (1.30, 0.77), "dnn": (1.30, 0.60)},
    "4x100-4x20 (gates 50-50)": {"single": (1.58, 1.05), "mixture": (1.50, 0.96),
                                 "concat": (1.30, 0.85), "dnn": (1.41, 0.90)},
    "4x100-4x20 (gates 50-20)": {"single": (1.41, 1.04), "mixture": (1.39, 0.98),
                                 "concat": (1.30, 0.87), "dnn": (1.40, 0.87)},
    "4x50-4x20": {"single": (1.63, 1.60), "mixture": (1.77, 1.41),
                  "concat": (1.50, 1.33), "dnn": (1.67, 1.32)},
    "4x100 (one layer)": {"single": (2.86, 2.99), "mixture": (1.72, 1.78),
                          "concat": (1.69, 1.59)},
}


# The family ------------------------------------------------------------------------------


def _assignment_constraint(model, value, context):
    if value and context.starting:
        reset_assignment_totals(model)  # the running totals start from zero (our choice)
    set_assignment_constraints(model, value)
    return False


EIGEN = register_family(ModelFamily(
    name="eigen",
    description="Eigen et al. 2013: deep mixture of experts with the assignment constraint",
    search_space=(("experts", "experts_per_layer"), ("assignment_margin", "decade")),
    phase_settings={"assignment_constraint": PhaseSetting(apply=_assignment_constraint)},
))


# Argument checks ---------------------------------------------------------------------------


def _pair(name, value, allow_none=False):
    """A per-layer pair of positive ints (a single int is used for both layers)."""
    if value is None and allow_none:
        return (None, None)
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(
                f"{name} must be an integer >= 1 or a pair of them (one per layer), "
                f"got {value!r}"
            )
        return tuple(
            validation.positive_int(f"{name}[{i}]", v, allow_none=allow_none)
            for i, v in enumerate(value)
        )
    v = validation.positive_int(name, value, allow_none=allow_none)
    return (v, v)


def _input_dim(input_shape):
    if not isinstance(input_shape, (list, tuple)) or not input_shape:
        raise ValueError(f"input_shape must be a non-empty tuple of ints, got {input_shape!r}")
    dim = 1
    for i, d in enumerate(input_shape):
        dim *= validation.positive_int(f"input_shape[{i}]", d)
    return dim


def _check_common(input_shape, num_classes, input_scale, assignment_margin):
    _input_dim(input_shape)
    validation.positive_int("num_classes", num_classes)
    validation.number("input_scale", input_scale, minimum=0, exclusive_minimum=True,
                      allow_none=True)
    validation.non_negative_float("assignment_margin", assignment_margin, allow_none=True)


# Parameter counts ------------------------------------------------------------------------


def moe_parameter_count(input_dim, units, num_experts, gate_hidden_units):
    """Trainable parameters of one soft-gated `MoEDense` (experts plus two-layer gate).

    Args:
        input_dim: Input features.
        units: Hidden units of each expert.
        num_experts: Number of experts.
        gate_hidden_units: Hidden units of the gate, or None for a linear gate.

    Returns:
        `N (d h + h) + d g + g + g N + N` as an int.

    Example:

    >>> moe_parameter_count(1296, 100, 4, 50)
    583854
    """
    experts = num_experts * (input_dim * units + units)
    if gate_hidden_units is None:
        gate = input_dim * num_experts + num_experts
    else:
        gate = (input_dim * gate_hidden_units + gate_hidden_units
                + gate_hidden_units * num_experts + num_experts)
    return experts + gate


def dmoe_parameter_count(input_dim, num_classes, experts=(4, 4), units=(100, 100),
                         gate_hidden_units=(50, 50)):
    """Trainable parameters of the two-layer DMoE, gating networks included.

    Args:
        input_dim: Flattened input size (36 * 36 for jittered MNIST).
        num_classes: Output classes.
        experts: Experts per layer (N, M).
        units: Hidden units of every expert, per layer.
        gate_hidden_units: Hidden units of each layer's gate (None: linear gate).

    Returns:
        The count as an int (equals the built model's trainable parameter count).

    Example:

    >>> dmoe_parameter_count(36 * 36, 10)
    630518
    """
    experts, units = _pair("experts", experts), _pair("units", units)
    gates = _pair("gate_hidden_units", gate_hidden_units, allow_none=True)
    first = moe_parameter_count(input_dim, units[0], experts[0], gates[0])
    second = moe_parameter_count(units[0], units[1], experts[1], gates[1])
    return first + second + units[1] * num_classes + num_classes


def matched_dnn_first_units(input_dim, num_classes, target_parameters, second_units):
    """Width h1 of the DNN `input -> h1 -> second_units -> classes` closest in parameters.

    Eigen et al.'s DNN baseline keeps the DMoE's second-layer width and widens the first
    layer until the parameter count matches the DMoE's: solves
    `d h1 + h1 + h1 h2 + h2 + h2 C + C = target` for h1 and rounds to the nearest unit,
    so the count is within `(d + 1 + h2) / 2` of the target.

    Args:
        input_dim: Input features d.
        num_classes: Output classes C.
        target_parameters: Parameter count to match (e.g. `dmoe_parameter_count`).
        second_units: Second hidden layer width h2.

    Returns:
        h1 as an int >= 1.

    Example:

    >>> matched_dnn_first_units(1296, 10, dmoe_parameter_count(1296, 10), 100)
    451
    """
    fixed = second_units + second_units * num_classes + num_classes
    per_unit = input_dim + 1 + second_units
    width = int(round((target_parameters - fixed) / per_unit))
    if width < 1:
        raise ValueError(
            f"target_parameters={target_parameters} is too small for a DNN with "
            f"{second_units} second-layer units on {input_dim} inputs"
        )
    return width


# Builders --------------------------------------------------------------------------------


def _inputs(input_shape, input_scale):
    inputs = keras.Input(tuple(input_shape), name="inputs")
    x = inputs
    if len(input_shape) > 1:
        x = keras.layers.Flatten(name="flatten")(x)
    if input_scale is not None:
        x = keras.layers.Rescaling(float(input_scale), name="rescale")(x)
    return inputs, x


def _moe(units, experts, gate_hidden_units, assignment_margin, name):
    return MoEDense(
        units,
        num_experts=experts,
        gate_hidden_units=gate_hidden_units,
        activation="relu",
        assignment_margin=assignment_margin,
        return_gates=True,
        name=name,
    )


def _deep_moe(input_shape, num_classes, experts, units, gate_hidden_units, second_layer,
              assignment_margin, input_scale, output_activation, name):
    _check_common(input_shape, num_classes, input_scale, assignment_margin)
    experts, units = _pair("experts", experts), _pair("units", units)
    gates = _pair("gate_hidden_units", gate_hidden_units, allow_none=True)
    validation.one_of("second_layer", second_layer, SECOND_LAYERS)

    inputs, x = _inputs(input_shape, input_scale)
    z1, _ = _moe(units[0], experts[0], gates[0], assignment_margin, "moe_1")(x)
    if second_layer == "mixture":
        z2, _ = _moe(units[1], experts[1], gates[1], assignment_margin, "moe_2")(z1)
    elif second_layer == "single":
        z2 = keras.layers.Dense(units[1], activation="relu", name="expert_2")(z1)
    else:  # concat: M experts of h units side by side = one dense layer of M * h units
        z2 = keras.layers.Dense(experts[1] * units[1], activation="relu",
                                name="concat_experts_2")(z1)
    outputs = keras.layers.Dense(num_classes, activation=output_activation,
                                 name="classifier")(z2)
    return keras.Model(inputs, outputs, name=name)


@register_model(family=EIGEN)
def dmoe_mnist(
    *,
    input_shape=(36, 36, 1),
    num_classes=10,
    experts=(4, 4),
    units=(100, 100),
    gate_hidden_units=(50, 50),
    second_layer="mixture",
    assignment_margin=DEFAULT_ASSIGNMENT_MARGIN,
    input_scale=1 / 255.0,
    output_activation=None,
):
    """Eigen et al.'s two-layer deep mixture of experts for jittered MNIST.

    Two soft-gated `MoEDense` layers (ReLU experts, gates
    `softmax(B relu(A x + a) + b)`) and a linear classifier. Input images are flattened
    and scaled by `input_scale` inside the model. Each `MoEDense` keeps the running
    assignment totals of the paper's constraint (margin `assignment_margin`); lift it
    for the fine-tuning phase with `keras_moe.training.phases`.

    Args:
        input_shape: Image shape (36x36x1: MNIST with +-4 pixel translations).
        num_classes: Output classes.
        experts: Experts per layer, `(N, M)` (paper: 4 and 4).
        units: Hidden units of each expert per layer (paper: 100 - 100, 100 - 20,
            50 - 20; see `TABLE1_SIZES`).
        gate_hidden_units: Hidden units of each layer's gate (paper: 50 - 50, 50 - 20,
            20 - 20); None for linear gates.
        second_layer: `"mixture"` (the DMoE), `"single"` (Table 1's single second-layer
            expert) or `"concat"` (all M second-layer experts concatenated: one ReLU
            layer of `M * units[1]` units).
        assignment_margin: Margin `m` of the running-assignment constraint, in examples
            (the paper gives none; default 100, see the module docstring), or None.
        input_scale: Factor applied to the flattened input (1/255: pixels in [0, 255]),
            or None for inputs already scaled.
        output_activation: None (logits, default) or `"softmax"` (the paper's F(x)).

    Returns:
        A `keras.Model` from images to class scores, with MoE layers `moe_1` (and
        `moe_2`).

    Example:

    >>> model = dmoe_mnist(units=(100, 20), gate_hidden_units=(50, 20))
    >>> model.output_shape
    (None, 10)

    Reference:
        Eigen, Ranzato & Sutskever, "Learning Factored Representations in a Deep
        Mixture of Experts", 2013, sections 3 and 4.1, Table 1.
    """
    return _deep_moe(input_shape, num_classes, experts, units, gate_hidden_units,
                     second_layer, assignment_margin, input_scale, output_activation,
                     name=f"dmoe_mnist_{second_layer}")


@register_model(family=EIGEN)
def dmoe_mnist_single_expert(
    *,
    input_shape=(36, 36, 1),
    num_classes=10,
    experts=(4, 4),
    units=(100, 100),
    gate_hidden_units=(50, 50),
    assignment_margin=DEFAULT_ASSIGNMENT_MARGIN,
    input_scale=1 / 255.0,
    output_activation=None,
):
    """Table 1 baseline: DMoE first layer, one fixed second-layer expert.

    The first layer is the DMoE's mixture; the second layer is a single ReLU expert of
    `units[1]` units (no gate). `experts[1]` and `gate_hidden_units[1]` are accepted
    so a Table 1 row can be passed unchanged, and are unused.

    Args:
        input_shape: Image shape.
        num_classes: Output classes.
        experts: Experts per layer; only `experts[0]` is used.
        units: Hidden units per layer.
        gate_hidden_units: Gate hidden units; only the first is used.
        assignment_margin: Margin of the first layer's constraint, or None.
        input_scale: Input scale factor, or None.
        output_activation: None (logits) or `"softmax"`.

    Returns:
        A `keras.Model`.

    Example:

    >>> dmoe_mnist_single_expert().output_shape
    (None, 10)

    Reference:
        Eigen, Ranzato & Sutskever, 2013, section 4.1 and Table 1 ("Single Expert").
    """
    return _deep_moe(input_shape, num_classes, experts, units, gate_hidden_units,
                     "single", assignment_margin, input_scale, output_activation,
                     name="dmoe_mnist_single_expert")


@register_model(family=EIGEN)
def dmoe_mnist_concat(
    *,
    input_shape=(36, 36, 1),
    num_classes=10,
    experts=(4, 4),
    units=(100, 100),
    gate_hidden_units=(50, 50),
    assignment_margin=DEFAULT_ASSIGNMENT_MARGIN,
    input_scale=1 / 255.0,
    output_activation=None,
):
    """Table 1 baseline: DMoE first layer, all second-layer experts concatenated.

    The second layer is `experts[1]` ReLU experts of `units[1]` units each, all used for
    every input and concatenated (one ReLU layer of `experts[1] * units[1]` units): the
    upper bound the mixture aims at.

    Args:
        input_shape: Image shape.
        num_classes: Output classes.
        experts: Experts per layer.
        units: Hidden units of each expert per layer.
        gate_hidden_units: Gate hidden units; only the first is used.
        assignment_margin: Margin of the first layer's constraint, or None.
        input_scale: Input scale factor, or None.
        output_activation: None (logits) or `"softmax"`.

    Returns:
        A `keras.Model`.

    Example:

    >>> dmoe_mnist_concat().get_layer("concat_experts_2").units
    400

    Reference:
        Eigen, Ranzato & Sutskever, 2013, section 4.1 and Table 1 ("Concat Layer2").
    """
    return _deep_moe(input_shape, num_classes, experts, units, gate_hidden_units,
                     "concat", assignment_margin, input_scale, output_activation,
                     name="dmoe_mnist_concat")


@register_model(family=EIGEN)
def dmoe_mnist_dnn(
    *,
    input_shape=(36, 36, 1),
    num_classes=10,
    experts=(4, 4),
    units=(100, 100),
    gate_hidden_units=(50, 50),
    input_scale=1 / 255.0,
    output_activation=None,
):
    """Table 1 baseline: fully connected net with the DMoE's parameter count.

    `input -> relu(h1) -> relu(units[1]) -> classes`: the second hidden layer has the
    DMoE's `z2` width and the first is widened until the total parameter count is as
    close as possible to the DMoE's with the same `experts`, `units` and
    `gate_hidden_units` (gating networks included), computed by
    `dmoe_parameter_count` and `matched_dnn_first_units` (within half a hidden unit's
    parameters of it).

    Args:
        input_shape: Image shape.
        num_classes: Output classes.
        experts: Experts per layer of the DMoE to match.
        units: Hidden units per layer of the DMoE to match.
        gate_hidden_units: Gate hidden units of the DMoE to match.
        input_scale: Input scale factor, or None.
        output_activation: None (logits) or `"softmax"`.

    Returns:
        A `keras.Model`, first hidden layer `dense_1`.

    Example:

    >>> dmoe_mnist_dnn().get_layer("dense_1").units
    451

    Reference:
        Eigen, Ranzato & Sutskever, 2013, section 4.1 and Table 1 ("DNN").
    """
    _check_common(input_shape, num_classes, input_scale, None)
    input_dim = _input_dim(input_shape)
    units = _pair("units", units)
    target = dmoe_parameter_count(input_dim, num_classes, experts, units, gate_hidden_units)
    first = matched_dnn_first_units(input_dim, num_classes, target, units[1])

    inputs, x = _inputs(input_shape, input_scale)
    x = keras.layers.Dense(first, activation="relu", name="dense_1")(x)
    x = keras.layers.Dense(units[1], activation="relu", name="dense_2")(x)
    outputs = keras.layers.Dense(num_classes, activation=output_activation,
                                 name="classifier")(x)
    return keras.Model(inputs, outputs, name="dmoe_mnist_dnn")


@register_model(family=EIGEN)
def dmoe_mnist_one_layer(
    *,
    input_shape=(36, 36, 1),
    num_classes=10,
    experts=4,
    units=100,
    gate_hidden_units=50,
    layer="mixture",
    assignment_margin=DEFAULT_ASSIGNMENT_MARGIN,
    input_scale=1 / 255.0,
    output_activation=None,
):
    """Table 1's one-layer model: one mixture (or baseline) layer, then a linear layer.

    Args:
        input_shape: Input shape (36x36x1 for jittered MNIST; `(440,)` with
            `input_scale=None` for the monophone one-layer model, 4 x 128, gate 64).
        num_classes: Output classes.
        experts: Experts in the layer (paper: 4).
        units: Hidden units of each expert (paper: 100).
        gate_hidden_units: Gate hidden units (paper: 50), or None for a linear gate.
        layer: `"mixture"` (Table 1's "DMoE" column), `"single"` (one ReLU expert of
            `units` units, no gate) or `"concat"` (all experts concatenated: one ReLU
            layer of `experts * units` units).
        assignment_margin: Margin of the constraint (mixture only), or None.
        input_scale: Input scale factor, or None.
        output_activation: None (logits) or `"softmax"`.

    Returns:
        A `keras.Model`.

    Example:

    >>> dmoe_mnist_one_layer(layer="concat").get_layer("concat_experts_1").units
    400

    Reference:
        Eigen, Ranzato & Sutskever, 2013, section 4.1 and Table 1 ("one layer").
    """
    _check_common(input_shape, num_classes, input_scale, assignment_margin)
    experts = validation.positive_int("experts", experts)
    units = validation.positive_int("units", units)
    gate_hidden_units = validation.positive_int("gate_hidden_units", gate_hidden_units,
                                                allow_none=True)
    validation.one_of("layer", layer, SECOND_LAYERS)

    inputs, x = _inputs(input_shape, input_scale)
    if layer == "mixture":
        z, _ = _moe(units, experts, gate_hidden_units, assignment_margin, "moe_1")(x)
    elif layer == "single":
        z = keras.layers.Dense(units, activation="relu", name="expert_1")(x)
    else:
        z = keras.layers.Dense(experts * units, activation="relu",
                               name="concat_experts_1")(x)
    outputs = keras.layers.Dense(num_classes, activation=output_activation,
                                 name="classifier")(z)
    return keras.Model(inputs, outputs, name=f"dmoe_one_layer_{layer}")


@register_model(family=EIGEN)
def dmoe_monophone(
    *,
    input_shape=(440,),
    num_classes=40,
    experts=(4, 16),
    units=(128, 128),
    gate_hidden_units=(64, 64),
    second_layer="mixture",
    assignment_margin=DEFAULT_ASSIGNMENT_MARGIN,
    input_scale=None,
    output_activation=None,
):
    """Eigen et al.'s monophone speech DMoE: 440 inputs, 4 x 128 - 16 x 128, 40 phones.

    The same architecture as `dmoe_mnist` with section 4.2's sizes: 11 frames of 40
    frequency bins as a 440-vector, 4 first-layer and 16 second-layer experts of 128
    units, gates of 64 hidden units, 40 phoneme classes. Its data set is proprietary.

    Args:
        input_shape: Input shape (440 features).
        num_classes: Phoneme classes (40).
        experts: Experts per layer (4, 16).
        units: Hidden units of each expert per layer (128, 128).
        gate_hidden_units: Gate hidden units per layer (64, 64).
        second_layer: `"mixture"`, `"single"` or `"concat"` (Table 2's columns).
        assignment_margin: Margin of the constraint (none given in the paper), or None.
        input_scale: Input scale factor (None: features used as given).
        output_activation: None (logits) or `"softmax"`.

    Returns:
        A `keras.Model` from 440 features to 40 class scores.

    Example:

    >>> dmoe_monophone().output_shape
    (None, 40)

    Reference:
        Eigen, Ranzato & Sutskever, 2013, sections 4.2 and 5.2, Table 2.
    """
    return _deep_moe(input_shape, num_classes, experts, units, gate_hidden_units,
                     second_layer, assignment_margin, input_scale, output_activation,
                     name=f"dmoe_monophone_{second_layer}")

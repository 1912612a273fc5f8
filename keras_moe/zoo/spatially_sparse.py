"""Zoo: the t-SNE-gated spatially sparse mixture of experts (paper 000) and its baselines.

- `tsne_moe`: images -> [t-SNE map -> `TSNEGate`] gates -> `ExpertClusters` (sparse
  experts, dense within and sparse between clusters) -> linear classifier. With
  `gate="softmax"` the same experts behind a top-k softmax gate (the softmax-gated MoE
  baseline).
- `tsne_moe_dense_mlp`: the dense two-hidden-layer MLP baseline, sized with
  `matched_dense_width` to the weights the MoE uses per example.
- Helpers: `fit_tsne_map` (the paper's first step: fit the map, place the experts on
  it), `weights_per_example`. The gate-output dict of a built model:
  `keras_moe.analysis.gates.gate_model(model, "gate", outputs="all")`.

The family (`TSNE`): a recipe phase's `tsne_map_epochs = N` fits the map for N epochs on
the training inputs at that phase's start (`fit_tsne_map`); `keras-moe tune` searches the
number of experts, k and the t-SNE weight.

Reference:
    Byrne & Santerre, "Spatially Sparse Mixture of Experts" (`shared/papers/000`).
"""

import math

import keras
import numpy as np

from keras_moe import validation
from keras_moe.layers.expert_clusters import ExpertClusters
from keras_moe.layers.gates import SoftmaxGate
from keras_moe.layers.tsne_gate import (
    ParametricTSNEMap,
    TSNEGate,
    fit_parametric_tsne,
    nearest_neighbour_sq_distance,
)
from keras_moe.zoo.registry import ModelFamily, PhaseSetting, register_family, register_model

__all__ = [
    "TSNE",
    "fit_tsne_map",
    "tsne_moe",
    "tsne_moe_dense_mlp",
    "matched_dense_width",
    "weights_per_example",
]

GATES = ("tsne", "softmax")
MAP_TRAINING = ("frozen", "joint")


def fit_tsne_map(model, data, epochs, *, batch_size=500, num_examples=10000, seed=0,
                 verbose=0):
    """The t-SNE-gated MoE's first step (paper 000): fits the model's t-SNE map on the
    training inputs, places the experts at k-means centres of the mapped points and sets
    the gate's temperature to the mean squared nearest-neighbour distance between experts
    (`keras_moe.layers.tsne_gate.nearest_neighbour_sq_distance`).

    Uses the first `num_examples` training inputs (the map's pairwise affinities are
    computed per batch of `batch_size`). The map keeps its trainability (frozen for
    `map_training="frozen"`, the paper's procedure).

    Args:
        model: A `tsne_moe` model with `gate="tsne"`.
        data: The run's `RecipeData` (its `train_inputs(limit)` gives the inputs).
        epochs: Epochs of the map's fit, >= 1.
        batch_size: Batch size of the map's fit.
        num_examples: Training inputs used at most.
        seed: Seed of the fit's shuffling and of the k-means placement.
        verbose: `fit` verbosity of the map's fit (1 a progress bar, 2 a line per epoch).

    Returns:
        The mapped points `(examples, 2)`.

    Raises:
        ValueError: The model has no `TSNEGate` with a map.
    """
    gate = next((layer for layer in model.layers if isinstance(layer, TSNEGate)), None)
    if gate is None or gate.mapping is None:
        raise ValueError(
            f"tsne_map_epochs applies to t-SNE-gated models (a TSNEGate with a map); "
            f"{model.name!r} has none")
    tsne_map = gate.mapping
    features = keras.Model(model.inputs, gate.input).predict(
        data.train_inputs(num_examples), batch_size=1000, verbose=0)
    trainable = tsne_map.trainable
    fit_parametric_tsne(tsne_map, features, batch_size=min(batch_size, len(features)),
                        epochs=epochs, seed=seed, verbose=verbose)
    tsne_map.trainable = trainable
    points = keras.ops.convert_to_numpy(tsne_map(features))
    positions = gate.init_positions(points, method="kmeans", seed=seed)
    gate.temperature = float(nearest_neighbour_sq_distance(np.asarray(positions)))
    return points


def _fit_map(model, value, context):
    if context.starting:
        if context.verbose:
            print(f"phase {context.phase.name!r}: fitting the t-SNE map for {value} "
                  "epoch(s) on the training inputs", flush=True)
        fit_tsne_map(model, context.data, value, verbose=context.verbose)
    return True


TSNE = register_family(ModelFamily(
    name="tsne",
    description="paper 000: t-SNE-gated spatially sparse MoE and its dense baseline",
    search_space=(("num_experts", "experts"), ("top_k", "top_k"), ("tsne_weight", "decade")),
    phase_settings={"tsne_map_epochs": PhaseSetting(apply=_fit_map, needs_data=True)},
))


def _image_features(input_shape):
    inputs = keras.Input(tuple(input_shape), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    if len(input_shape) > 1:
        x = keras.layers.Flatten(name="flatten")(x)
    return inputs, x


def _check_shape(input_shape, num_classes):
    if not isinstance(input_shape, (tuple, list)) or not input_shape or not all(
        isinstance(d, int) and d >= 1 for d in input_shape
    ):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    return validation.integer("num_classes", num_classes, minimum=2)


@register_model(family=TSNE)
def tsne_moe(
    *,
    input_shape=(28, 28, 1),
    num_classes=10,
    num_experts=16,
    top_k=2,
    expert_units=32,
    gate="tsne",
    mapping=None,
    map_hidden_units=(256, 256),
    map_training="frozen",
    tsne_weight=0.1,
    perplexity=30.0,
    temperature=1.0,
    trainable_positions=True,
    input_density=0.5,
    local_density=0.5,
    remote_density=0.05,
    seed=0,
):
    """t-SNE-gated spatially sparse MoE classifier (Byrne & Santerre, paper 000).

    Pixels (rescaled to [0, 1], flattened) go to a 2-D parametric t-SNE map (layer
    `"tsne_map"`), whose point gives the spatial gate (`TSNEGate`, layer `"gate"`: the
    `top_k` nearest experts, weights falling with squared distance / `temperature`).
    The sparse expert clusters (`ExpertClusters`, layer `"experts"`) see the pixels
    through a random mask of density `input_density`, and each other through a block
    mask (`local_density` within an expert, `remote_density` between); a linear layer
    (`"logits"`) classifies. The paper's procedure is `map_training="frozen"`: train the
    map first (`keras_moe.layers.fit_parametric_tsne` on `model.get_layer("tsne_map")`,
    or pass a trained `mapping`), place the experts on it
    (`model.get_layer("gate").init_positions(...)`), then train the classifier with the
    map fixed. `map_training="joint"` trains map and classifier together, the t-SNE
    term added with weight `tsne_weight` (batches must then exceed `perplexity`).

    Paper 000 gives no sizes, rates or schedule: every default here is our choice
    (see `zoo/tsne_moe.md`).

    Args:
        input_shape: Shape of one image (uint8 pixel values 0..255).
        num_classes: Number of classes, >= 2.
        num_experts: Number of experts, >= 1.
        top_k: Experts active per example, 1 <= top_k <= num_experts (None: all).
        expert_units: Hidden units per expert (both expert layers).
        gate: `"tsne"` (the paper's spatial gate) or `"softmax"` (a top-k softmax gate
            on the pixels: the softmax-gated MoE baseline with the same experts).
        mapping: None for a new `ParametricTSNEMap` MLP, or a (trained) Keras layer or
            model mapping the flattened pixels to the plane (a non-`ParametricTSNEMap`
            is wrapped in one). The given map is modified: frozen (`trainable=False`)
            or, for `"joint"`, made trainable with `loss_weight=tsne_weight`.
        map_hidden_units: Hidden widths of the new map's MLP.
        map_training: `"frozen"` (the map is not trained with the classifier) or
            `"joint"` (trained with it, plus `tsne_weight` times the t-SNE loss).
        tsne_weight: Weight of the joint t-SNE term, >= 0.
        perplexity: Perplexity of the t-SNE objective, > 1.
        temperature: Distance scale of the spatial gate, > 0 (squared map units).
        trainable_positions: Whether expert positions are learned.
        input_density, local_density, remote_density: Connection densities, in (0, 1].
        seed: Seed of the connectivity masks.

    Returns:
        An uncompiled `keras.Model` from images to logits.

    Example:

    >>> model = tsne_moe(num_experts=16, top_k=2)
    >>> fit_parametric_tsne(model.get_layer("tsne_map"), x_flat / 255.0, epochs=10)
    >>> model.get_layer("gate").init_positions(model.get_layer("tsne_map")(x_flat / 255.0))
    """
    num_classes = _check_shape(input_shape, num_classes)
    validation.one_of("gate", gate, GATES)
    validation.one_of("map_training", map_training, MAP_TRAINING)
    tsne_weight = validation.non_negative_float("tsne_weight", tsne_weight)
    num_experts = validation.positive_int("num_experts", num_experts)
    top_k = validation.top_k(top_k, num_experts)
    inputs, x = _image_features(input_shape)

    if gate == "tsne":
        if mapping is not None and not isinstance(mapping, ParametricTSNEMap):
            if not isinstance(mapping, keras.layers.Layer):
                raise ValueError(f"mapping must be None or a Keras layer or model, got {mapping!r}")
            mapping = ParametricTSNEMap(network=mapping, perplexity=perplexity, name="tsne_map")
        if mapping is None:
            mapping = ParametricTSNEMap(
                hidden_units=map_hidden_units, perplexity=perplexity, name="tsne_map"
            )
        if map_training == "joint":
            mapping.loss_weight = tsne_weight
            mapping.trainable = True
        else:
            mapping.trainable = False
        gate_layer = TSNEGate(
            num_experts,
            top_k=top_k,
            temperature=temperature,
            mapping=mapping,
            trainable_positions=trainable_positions,
            name="gate",
        )
    else:
        gate_layer = SoftmaxGate(num_experts, top_k=top_k, name="gate")

    gates = gate_layer(x)["gates"]
    hidden = ExpertClusters(
        num_experts,
        expert_units,
        input_density=input_density,
        local_density=local_density,
        remote_density=remote_density,
        seed=seed,
        name="experts",
    )(x, gates)
    logits = keras.layers.Dense(num_classes, name="logits")(hidden)
    return keras.Model(inputs, logits, name=f"tsne_moe_{gate}")


@register_model(family=TSNE)
def tsne_moe_dense_mlp(*, input_shape=(28, 28, 1), num_classes=10, hidden_units=(256, 256)):
    """Dense MLP baseline of tsne_moe (size it with matched_dense_width)."""
    num_classes = _check_shape(input_shape, num_classes)
    inputs, x = _image_features(input_shape)
    for i, width in enumerate(hidden_units):
        x = keras.layers.Dense(
            validation.positive_int("hidden_units", width), activation="relu", name=f"hidden_{i}"
        )(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="tsne_moe_dense_mlp")


def matched_dense_width(weights, input_dim, num_classes):
    """Width w of a two-hidden-layer MLP with `weights` kernel entries.

    Solves `input_dim * w + w * w + w * num_classes = weights` (biases not counted) and
    rounds to the nearest integer >= 1.
    """
    b = input_dim + num_classes
    return max(1, int(round((-b + math.sqrt(b * b + 4.0 * float(weights))) / 2.0)))


def weights_per_example(model, dispatch_mask):
    """Expert and classifier weights each example of a `tsne_moe` model uses.

    The used connections of the expert clusters (`ExpertClusters.used_weight_count`)
    plus the classifier rows of the active experts' units. The gate's own cost (the
    map, or the softmax gate's kernel) is not included: report it separately.

    Args:
        model: A built `tsne_moe` model.
        dispatch_mask: (n, num_experts) 0/1 array of active experts.

    Returns:
        (n,) float64 numpy array.
    """
    experts = model.get_layer("experts")
    head = model.get_layer("logits")
    active = (np.asarray(dispatch_mask) != 0).sum(axis=1)
    return experts.used_weight_count(dispatch_mask) + active * experts.expert_units * head.units

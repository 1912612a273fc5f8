"""The t-SNE gate of the spatially sparse mixture of experts (paper 000).

- `ParametricTSNEMap`: a mapping network (an MLP by default, any Keras layer or model
  allowed) from inputs to a low-dimensional map, trained with the parametric t-SNE
  objective either on its own (`fit_parametric_tsne`: the paper's "build the map first,
  then gate with it") or jointly with a classifier (an `add_loss` term
  `loss_weight * parametric_tsne_loss(x, map(x))`).
- `TSNEGate`: experts sit at positions in the plane; an input's gate values fall with its
  squared distance to each expert (`logits = -||z - c_e||^2 / temperature`), optionally
  kept to the `top_k` nearest experts (spatial sparsity). It returns the gate-output dict
  of `keras_moe.layers.gates`, so `MoEDense(gate=TSNEGate(...))` works.
- `expert_positions`: initial expert positions from a map (a grid over its extent, or
  k-means centres of its points).

Reference:
    Byrne & Santerre, "Spatially Sparse Mixture of Experts" (`shared/papers/000`);
    van der Maaten, "Learning a Parametric Embedding by Preserving Local Structure",
    AISTATS 2009.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_moe import validation
from keras_moe.layers.gates import softmax_gate_outputs
from keras_moe.layers.replica_losses import ReplicaLocalLossesMixin
from keras_moe.regularizers.tsne import parametric_tsne_loss

__all__ = [
    "ParametricTSNEMap",
    "TSNEGate",
    "expert_positions",
    "fit_parametric_tsne",
    "nearest_neighbour_sq_distance",
]

POSITION_METHODS = ("grid", "kmeans")


def _as_layer(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if not isinstance(value, keras.layers.Layer):
        raise ValueError(
            f"{name} must be a Keras layer or model" + (" or None" if allow_none else "")
            + f", got {value!r}"
        )
    return value


@keras.saving.register_keras_serializable(package="keras_moe")
class ParametricTSNEMap(ReplicaLocalLossesMixin, keras.layers.Layer):
    """A mapping network trained with the parametric t-SNE objective.

    `call(x)` returns `network(x)`. In training, while the layer is trainable and
    `loss_weight > 0`, it adds `loss_weight * parametric_tsne_loss(x, network(x),
    perplexity, dof)` with `add_loss`: the joint objective of a classifier that also
    keeps its map faithful to the input's neighbourhoods. A frozen map adds nothing (its
    t-SNE loss would be a constant). The affinities are per batch, so every training
    batch must be larger than `perplexity` (use `drop_remainder`).

    The default network is van der Maaten's MLP, `hidden_units=(500, 500, 2000)` with
    ReLU (the 2009 paper used sigmoid units pretrained as RBMs; we train from scratch),
    and a linear `output_dim`-unit output. Paper 000 gives no architecture.

    Args:
        network: None for the default MLP, or any Keras layer or model mapping
            `(batch, features)` to `(batch, output_dim)`.
        hidden_units: Widths of the default MLP's hidden layers (ignored with `network`).
        output_dim: Dimension of the map of the default MLP, >= 1 (2 for a gate).
        activation: Hidden activation of the default MLP.
        perplexity: Target perplexity of the input affinities, > 1 and smaller than the
            batch size (30 in van der Maaten 2009).
        dof: Degrees of freedom of the Student-t kernel, > 0; None for
            `max(output_dim - 1, 1)` (1 for a 2-D map, as in the paper).
        loss_weight: Weight of the t-SNE term added in training, >= 0 (0: none).
        **kwargs: Base layer arguments.

    Example:

    >>> tsne_map = ParametricTSNEMap(hidden_units=(64, 64), perplexity=10.0)
    >>> fit_parametric_tsne(tsne_map, x_train, batch_size=100, epochs=5)
    >>> tsne_map(x_test).shape
    (n, 2)

    Reference:
        van der Maaten, "Learning a Parametric Embedding by Preserving Local
        Structure", AISTATS 2009; Byrne & Santerre, "Spatially Sparse Mixture of
        Experts" (`shared/papers/000`).
    """

    def __init__(
        self,
        network=None,
        hidden_units=(500, 500, 2000),
        output_dim=2,
        activation="relu",
        perplexity=30.0,
        dof=None,
        loss_weight=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.output_dim = validation.positive_int("output_dim", output_dim)
        if isinstance(hidden_units, int):
            hidden_units = (hidden_units,)
        self.hidden_units = tuple(
            validation.positive_int("hidden_units", h) for h in hidden_units
        )
        self.activation = keras.activations.get(activation)
        self.perplexity = validation.number(
            "perplexity", perplexity, minimum=1, exclusive_minimum=True
        )
        if dof is None:
            dof = float(max(self.output_dim - 1, 1))
        self.dof = validation.positive_float("dof", dof)
        self.loss_weight = validation.non_negative_float("loss_weight", loss_weight)
        self._custom_network = network is not None
        if self._custom_network:
            self.network = _as_layer("network", network, allow_none=False)
        else:
            layers = [
                keras.layers.Dense(h, activation=self.activation, name=f"hidden_{i}")
                for i, h in enumerate(self.hidden_units)
            ]
            layers.append(keras.layers.Dense(self.output_dim, name="map"))
            self.network = keras.Sequential(layers, name="network")

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"inputs of {type(self).__name__} must have shape (batch, features), "
                f"got {input_shape}"
            )
        if not self.network.built:
            self.network.build(tuple(input_shape))

    def call(self, inputs, training=None):
        outputs = self.network(inputs, training=training)
        if training and self.trainable and self.loss_weight > 0:
            self.add_loss(self.tsne_loss(inputs, outputs))
        return outputs

    def tsne_loss(self, inputs, outputs):
        """`loss_weight * parametric_tsne_loss(inputs, outputs, perplexity, dof)`."""
        return self.loss_weight * parametric_tsne_loss(
            inputs, outputs, self.perplexity, self.dof
        )

    def compute_output_shape(self, input_shape):
        return self.network.compute_output_shape(tuple(input_shape))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "network": (
                    keras.saving.serialize_keras_object(self.network)
                    if self._custom_network
                    else None
                ),
                "hidden_units": list(self.hidden_units),
                "output_dim": self.output_dim,
                "activation": keras.activations.serialize(self.activation),
                "perplexity": self.perplexity,
                "dof": self.dof,
                "loss_weight": self.loss_weight,
            }
        )
        return config


def fit_parametric_tsne(
    mapping,
    x,
    batch_size=500,
    epochs=10,
    learning_rate=1e-3,
    seed=0,
    verbose=0,
):
    """Trains a `ParametricTSNEMap` on its own with the parametric t-SNE loss.

    The paper's first stage ("build the map first, then gate with it"). Batches are
    shuffled each epoch (seeded) and the last incomplete batch is dropped, since the
    affinities are computed per batch. The map is trained with weight 1 whatever its
    `loss_weight`, and is left trainable as it was.

    Args:
        mapping: A `ParametricTSNEMap`.
        x: (n, features) numpy array, n >= batch_size.
        batch_size: Batch size; must exceed the map's perplexity (5000 in van der
            Maaten 2009; smaller here to fit the CPU budget).
        epochs: Number of passes over `x`, >= 1.
        learning_rate: Adam learning rate, > 0.
        seed: Seed of the shuffling.
        verbose: Keras `fit` verbosity.

    Returns:
        The Keras `History` of the run (its "loss" is the KL divergence).

    Example:

    >>> tsne_map = ParametricTSNEMap(hidden_units=(256, 256))
    >>> history = fit_parametric_tsne(tsne_map, x_train, batch_size=500, epochs=10)
    """
    import tensorflow as tf

    if not isinstance(mapping, ParametricTSNEMap):
        raise ValueError(f"mapping must be a ParametricTSNEMap, got {mapping!r}")
    x = np.asarray(x, dtype="float32").reshape(len(x), -1)
    batch_size = validation.positive_int("batch_size", batch_size)
    if batch_size <= mapping.perplexity:
        raise ValueError(
            f"batch_size must be larger than the perplexity ({mapping.perplexity:g}), "
            f"got {batch_size}"
        )
    if len(x) < batch_size:
        raise ValueError(f"x must have at least batch_size ({batch_size}) rows, got {len(x)}")
    epochs = validation.positive_int("epochs", epochs)
    learning_rate = validation.positive_float("learning_rate", learning_rate)

    saved = mapping.loss_weight, mapping.trainable
    mapping.loss_weight, mapping.trainable = 1.0, True
    try:
        inputs = keras.Input((x.shape[1],))
        model = keras.Model(inputs, mapping(inputs))
        model.compile(keras.optimizers.Adam(learning_rate), loss=None)
        data = (
            tf.data.Dataset.from_tensor_slices(x)
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size, drop_remainder=True)
        )
        history = model.fit(data, epochs=epochs, verbose=verbose, shuffle=False)
    finally:
        mapping.loss_weight, mapping.trainable = saved
    return history


def _plane(name, embedding):
    values = np.asarray(ops.convert_to_numpy(embedding), dtype="float64")
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(
            f"{name} must be a 2-D map of shape (n, 2) (the gate's plane), got shape "
            f"{values.shape}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite")
    return values


def _grid_box(lo, hi, num_experts):
    """Centres of the first `num_experts` cells (row-major) of a grid over [lo, hi]."""
    cols = int(math.ceil(math.sqrt(num_experts)))
    rows = int(math.ceil(num_experts / cols))
    xs = lo[0] + (np.arange(cols) + 0.5) / cols * (hi[0] - lo[0])
    ys = lo[1] + (np.arange(rows) + 0.5) / rows * (hi[1] - lo[1])
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    return grid[:num_experts].astype("float32")


def _kmeans(points, k, seed, iterations=100):
    """Lloyd's k-means with k-means++ seeding (numpy, float64)."""
    rng = np.random.RandomState(seed)
    centres = [points[rng.randint(len(points))]]
    for _ in range(1, k):
        d2 = np.min(((points[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        index = rng.choice(len(points), p=d2 / total) if total > 0 else rng.randint(len(points))
        centres.append(points[index])
    centres = np.asarray(centres)
    for _ in range(iterations):
        d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        assign = np.argmin(d2, axis=1)
        new = centres.copy()
        for j in range(k):
            members = points[assign == j]
            if len(members):
                new[j] = members.mean(axis=0)
            else:  # empty cluster: move it to the point farthest from its centre
                far = np.argmax(d2[np.arange(len(points)), assign])
                new[j] = points[far]
        if np.allclose(new, centres):
            break
        centres = new
    return centres


def expert_positions(embedding, num_experts, method="grid", seed=0):
    """Initial expert positions in the plane from points of a 2-D map.

    - `"grid"`: the centres of a `rows x cols` grid (`cols = ceil(sqrt(E))`,
      `rows = ceil(E / cols)`) over the map's extent, taken as the 1st to 99th
      percentile of each coordinate (robust to a few far points); the first E cells in
      row-major order.
    - `"kmeans"`: k-means centres of the points (k-means++ seeding from `seed`, Lloyd
      iterations), so experts sit where the data are dense.

    Paper 000 says only that experts are placed in the map; both rules are our choice.

    Args:
        embedding: (n, 2) points of the map (e.g. `tsne_map(x_train)`).
        num_experts: Number of positions, >= 1 (<= n for k-means).
        method: `"grid"` or `"kmeans"`.
        seed: Seed of the k-means initialisation.

    Returns:
        (num_experts, 2) float32 numpy array.

    Example:

    >>> positions = expert_positions(tsne_map(x_train), 16, method="kmeans")
    """
    points = _plane("embedding", embedding)
    num_experts = validation.positive_int("num_experts", num_experts)
    validation.one_of("method", method, POSITION_METHODS)
    if method == "grid":
        lo = np.percentile(points, 1, axis=0)
        hi = np.percentile(points, 99, axis=0)
        return _grid_box(lo, hi, num_experts)
    if len(points) < num_experts:
        raise ValueError(
            f"embedding must have at least num_experts ({num_experts}) points for "
            f"k-means, got {len(points)}"
        )
    return _kmeans(points, num_experts, seed).astype("float32")


def nearest_neighbour_sq_distance(positions):
    """Mean over experts of the squared distance to the nearest other expert.

    A natural temperature for `TSNEGate`: at that temperature, a point on an expert sees
    its nearest neighbour's logit lower by about 1.
    """
    c = _plane("positions", positions)
    if len(c) < 2:
        raise ValueError("positions must hold at least 2 experts")
    d2 = ((c[:, None, :] - c[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    return float(d2.min(axis=1).mean())


@keras.saving.register_keras_serializable(package="keras_moe")
class TSNEGate(keras.layers.Layer):
    """Spatial gate: experts at positions in a 2-D map, gates fall with distance.

    With `z` the input's point in the plane (`mapping(x)`, or `x` itself when it already
    is a 2-D embedding) and `c_e` expert e's position:

        logits_e = -||z - c_e||^2 / temperature,    probs = softmax(logits)

    Without `top_k` the gates are `probs` (every expert, weight falling with distance;
    `dispatch_mask` marks the nearest expert). With `top_k=k` only the k nearest experts
    get a gate, a softmax over their k logits, every other expert exactly zero (spatial
    sparsity); `top_k_indices` / `top_k_gates` let `MoEDense` dispatch sparsely. The
    output dict also holds `"embedding"`, the (tokens, 2) map points. All gate math is in
    float32 (the layer's dtype defaults to float32).

    Paper 000 says gates come from positions in the t-SNE map but gives no formula: the
    Gaussian-in-distance softmax, its `temperature`, the top-k rule and the default grid
    of positions over [-1, 1]^2 are our choices. Positions can be set from a map with
    `init_positions` / `set_positions`.

    Args:
        num_experts: Number of experts, >= 1.
        top_k: None (all experts) or the number of nearest experts kept,
            1 <= top_k <= num_experts.
        temperature: Distance scale of the gate, > 0 (in squared map units).
        mapping: None when the inputs already are (tokens, 2) points, or a Keras layer or
            model (e.g. a `ParametricTSNEMap`) mapping the inputs to the plane.
        trainable_positions: Whether the expert positions are learned.
        positions_initializer: None for a grid over [-1, 1]^2, or a Keras initializer
            of the (num_experts, 2) positions.
        **kwargs: Base layer arguments.

    Example:

    >>> gate = TSNEGate(num_experts=16, top_k=2, temperature=4.0,
    ...                 mapping=ParametricTSNEMap(hidden_units=(256, 256)))
    >>> moe = MoEDense(64, num_experts=16, top_k=2, gate=gate)
    >>> moe(np.random.rand(32, 784).astype("float32")).shape
    (32, 64)

    Reference:
        Byrne & Santerre, "Spatially Sparse Mixture of Experts" (`shared/papers/000`).
    """

    def __init__(
        self,
        num_experts,
        top_k=None,
        temperature=1.0,
        mapping=None,
        trainable_positions=True,
        positions_initializer=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.top_k = validation.top_k(top_k, self.num_experts)
        self.temperature = validation.positive_float("temperature", temperature)
        self.mapping = _as_layer("mapping", mapping)
        self.trainable_positions = bool(trainable_positions)
        self.positions_initializer = (
            None
            if positions_initializer is None
            else keras.initializers.get(positions_initializer)
        )

    # Its `"load"` is a hard count (no gradient); `LoadLoss` is refused on it.
    smooth_load = False

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if self.mapping is None:
            if len(input_shape) < 2 or input_shape[-1] != 2:
                raise ValueError(
                    "inputs of a TSNEGate without `mapping` must be 2-D map points of "
                    f"shape (tokens, 2), got shape {input_shape}; pass mapping= to map "
                    "them to the plane"
                )
        else:
            if not self.mapping.built:
                self.mapping.build(input_shape)
            map_shape = tuple(self.mapping.compute_output_shape(input_shape))
            if map_shape[-1] != 2:
                raise ValueError(
                    "mapping must map the inputs to the plane (output of shape "
                    f"(tokens, 2)), got output shape {map_shape}"
                )
        self.positions = self.add_weight(
            name="positions",
            shape=(self.num_experts, 2),
            initializer=self.positions_initializer or "zeros",
            trainable=self.trainable_positions,
            dtype="float32",
        )
        if self.positions_initializer is None:
            self.positions.assign(_grid_box((-1.0, -1.0), (1.0, 1.0), self.num_experts))

    def set_positions(self, positions):
        """Sets the expert positions to a (num_experts, 2) array (builds the layer)."""
        values = _plane("positions", positions)
        if values.shape[0] != self.num_experts:
            raise ValueError(
                f"positions must have shape ({self.num_experts}, 2), got {values.shape}"
            )
        if not self.built:
            raise ValueError("set_positions needs a built layer: call it on data first")
        self.positions.assign(values.astype("float32"))

    def init_positions(self, embedding, method="kmeans", seed=0):
        """Places the experts from points of the map; returns the positions.

        Args:
            embedding: (n, 2) map points (e.g. the map of the training inputs).
            method: `"grid"` over the map's extent or `"kmeans"` centres.
            seed: Seed of the k-means initialisation.
        """
        positions = expert_positions(embedding, self.num_experts, method, seed)
        self.set_positions(positions)
        return positions

    def call(self, inputs, training=None):
        if self.mapping is not None:
            z = self.mapping(inputs, training=training)
        else:
            z = inputs
        z = ops.cast(z, "float32")
        diff = z[:, None, :] - ops.cast(self.positions, "float32")[None, :, :]
        sq_dist = ops.sum(ops.square(diff), axis=-1)
        logits = -sq_dist / self.temperature
        outputs = softmax_gate_outputs(logits, self.top_k, training)
        outputs["embedding"] = z
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "temperature": self.temperature,
                "mapping": (
                    None
                    if self.mapping is None
                    else keras.saving.serialize_keras_object(self.mapping)
                ),
                "trainable_positions": self.trainable_positions,
                "positions_initializer": (
                    None
                    if self.positions_initializer is None
                    else keras.initializers.serialize(self.positions_initializer)
                ),
            }
        )
        return config

"""Sparse expert clusters: dense within an expert, sparse between experts (paper 000).

- `cluster_mask`: a block connectivity mask; entry (i, j) links input unit i to output
  unit j, with density `local_density` when both belong to the same expert's block and
  `remote_density` otherwise.
- `ExpertClusterDense`: a `SparseDense` whose mask is that block mask.
- `ExpertClusters`: the gated sparse experts of the spatially sparse MoE: every expert
  has `expert_units` hidden units fed from the input through a sparse random mask
  (StochasticNet), then a second cluster layer in which each expert's units see their
  own expert's units at `local_density` and every other expert's at `remote_density`;
  both layers' expert blocks are scaled by the expert's gate.

Reference:
    Byrne & Santerre, "Spatially Sparse Mixture of Experts" (`shared/papers/000`);
    Shafiee, Siva & Wong, "StochasticNet", IEEE Access 2016.
"""

import keras
import numpy as np
from keras import ops

from keras_moe import validation
from keras_moe.layers.sparse_connectivity import SparseDense

__all__ = ["ExpertClusterDense", "ExpertClusters", "cluster_mask", "block_ids"]


def _density(name, value):
    return validation.number(name, value, minimum=0, maximum=1, exclusive_minimum=True)


def _check_densities(local_density, remote_density):
    local_density = _density("local_density", local_density)
    remote_density = _density("remote_density", remote_density)
    if remote_density > local_density:
        raise ValueError(
            f"remote_density must be <= local_density ({local_density:g}): links between "
            f"expert clusters are the sparser ones, got {remote_density!r}"
        )
    return local_density, remote_density


def block_ids(size, num_experts):
    """Expert index of each of `size` units split into `num_experts` contiguous blocks.

    Blocks are as even as possible (`np.array_split`: the first `size % num_experts`
    blocks have one more unit).
    """
    size = validation.positive_int("size", size)
    num_experts = validation.positive_int("num_experts", num_experts)
    if num_experts > size:
        raise ValueError(
            f"num_experts must be <= the number of units ({size}) so that every expert "
            f"has a block, got {num_experts}"
        )
    ids = np.empty(size, dtype="int64")
    for e, block in enumerate(np.array_split(np.arange(size), num_experts)):
        ids[block] = e
    return ids


def cluster_mask(input_dim, units, num_experts, local_density, remote_density, seed=None):
    """Block connectivity mask of an expert-cluster layer.

    Inputs and outputs are each split into `num_experts` contiguous blocks (`block_ids`).
    In every (input block, output block) pair exactly `round(density * block_size)`
    entries, drawn at random without replacement, are 1, with `density =
    local_density` on the diagonal blocks (within an expert) and `remote_density` off
    it (between experts). Exact counts per block (rather than independent coin flips)
    are our choice: every pair of experts gets the same number of links.

    Args:
        input_dim: Number of input units, >= num_experts.
        units: Number of output units, >= num_experts.
        num_experts: Number of expert blocks, >= 1.
        local_density: Density within an expert's block, 0 < d <= 1.
        remote_density: Density between blocks, 0 < d <= local_density.
        seed: Integer seed of the draw, or None for a fresh one.

    Returns:
        (input_dim, units) float32 numpy array of zeros and ones.

    Example:

    >>> m = cluster_mask(64, 64, 4, local_density=0.5, remote_density=0.05, seed=0)
    >>> m[:16, :16].mean(), m[:16, 16:].mean()
    (0.5, 0.05078125)
    """
    local_density, remote_density = _check_densities(local_density, remote_density)
    in_ids = block_ids(input_dim, num_experts)
    out_ids = block_ids(units, num_experts)
    seed = validation.integer("seed", seed, minimum=0, allow_none=True)
    rng = np.random.RandomState(seed)
    mask = np.zeros((input_dim, units), dtype="float32")
    for a in range(num_experts):
        rows = np.flatnonzero(in_ids == a)
        for b in range(num_experts):
            cols = np.flatnonzero(out_ids == b)
            size = len(rows) * len(cols)
            density = local_density if a == b else remote_density
            count = int(round(density * size))
            chosen = rng.permutation(size)[:count]
            block = np.zeros(size, dtype="float32")
            block[chosen] = 1.0
            mask[np.ix_(rows, cols)] = block.reshape(len(rows), len(cols))
    return mask


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertClusterDense(SparseDense):
    """`SparseDense` with a block mask: dense within expert clusters, sparse between.

    The mask is `cluster_mask(input_dim, units, num_experts, local_density,
    remote_density, seed)`, drawn at build time and stored in the non-trainable weight
    `"mask"`, so it is saved and reloaded exactly with the model.

    Args:
        units: Output width, >= num_experts.
        num_experts: Number of expert clusters, >= 1 (inputs and outputs are split into
            this many contiguous blocks).
        local_density: Connection density within a cluster, 0 < d <= 1 (paper 000
            gives no rate; 0.5 by default, StochasticNet-like).
        remote_density: Density between clusters, 0 < d <= local_density (paper: "at a
            smaller randomly assigned rate"; 0.05 by default, our choice).
        activation, use_bias, kernel_initializer, bias_initializer: As `SparseDense`.
        seed: Integer seed of the mask draw; None for a fresh random mask.
        **kwargs: Base layer arguments.

    Example:

    >>> layer = ExpertClusterDense(128, num_experts=8, local_density=0.5,
    ...                            remote_density=0.05, activation="relu", seed=0)
    >>> layer(np.zeros((4, 128), "float32")).shape
    (4, 128)

    Reference:
        Byrne & Santerre, "Spatially Sparse Mixture of Experts" (`shared/papers/000`).
    """

    def __init__(
        self,
        units,
        num_experts,
        local_density=0.5,
        remote_density=0.05,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        kwargs.pop("density", None)  # fixed by the two densities
        local_density, remote_density = _check_densities(local_density, remote_density)
        super().__init__(
            units,
            density=local_density,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            seed=seed,
            **kwargs,
        )
        self.num_experts = validation.positive_int("num_experts", num_experts)
        if self.num_experts > self.units:
            raise ValueError(
                f"num_experts must be <= units ({self.units}), got {self.num_experts}"
            )
        self.local_density = local_density
        self.remote_density = remote_density

    def _draw_mask(self, input_dim):
        return cluster_mask(
            input_dim,
            self.units,
            self.num_experts,
            self.local_density,
            self.remote_density,
            self.seed,
        )

    def get_config(self):
        config = super().get_config()
        config.pop("density")
        config.update(
            {
                "num_experts": self.num_experts,
                "local_density": self.local_density,
                "remote_density": self.remote_density,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertClusters(keras.layers.Layer):
    """Gated sparse expert clusters with sparse links between clusters.

    `call(inputs, gates)` with `gates` (batch, num_experts), e.g. a gate's `"gates"`:

        h1 = activation(SparseDense(inputs)) * g        # input_density, StochasticNet
        h2 = activation(ExpertClusterDense(h1)) * g     # local / remote densities

    where `g` repeats each expert's gate over its `expert_units` units. Expert e owns
    units `[e * expert_units, (e + 1) * expert_units)` of both layers; a zero gate
    silences the expert's units, so with top-k gates only the k chosen clusters, and
    the sparse links among them, carry the example. Returns h2,
    (batch, num_experts * expert_units).

    The layer computes every expert (masked matmuls); `used_weight_count` counts the
    connections a given routing actually uses, for comparisons at equal cost. Paper 000
    gives no layer count or widths; two layers per expert, gating of both, and the
    default densities are our choices.

    Args:
        num_experts: Number of experts, >= 1.
        expert_units: Hidden units per expert, >= 1.
        input_density: Density of the input-to-expert connections, 0 < d <= 1.
        local_density: Density within an expert in the cluster layer, 0 < d <= 1.
        remote_density: Density between experts in the cluster layer,
            0 < d <= local_density.
        activation: Activation of both layers.
        seed: Integer seed of both masks (the cluster layer uses seed + 1); None: random.
        **kwargs: Base layer arguments.

    Example:

    >>> experts = ExpertClusters(num_experts=16, expert_units=32, seed=0)
    >>> gates = TSNEGate(16, top_k=2, mapping=tsne_map)(x)["gates"]
    >>> experts(x, gates).shape
    (batch, 512)

    Reference:
        Byrne & Santerre, "Spatially Sparse Mixture of Experts" (`shared/papers/000`).
    """

    def __init__(
        self,
        num_experts,
        expert_units,
        input_density=0.5,
        local_density=0.5,
        remote_density=0.05,
        activation="relu",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = validation.positive_int("num_experts", num_experts)
        self.expert_units = validation.positive_int("expert_units", expert_units)
        self.input_density = _density("input_density", input_density)
        self.local_density, self.remote_density = _check_densities(
            local_density, remote_density
        )
        self.activation = keras.activations.get(activation)
        self.seed = validation.integer("seed", seed, minimum=0, allow_none=True)
        width = self.num_experts * self.expert_units
        self.input_layer = SparseDense(
            width, density=self.input_density, seed=self.seed, name="input_layer"
        )
        self.cluster_layer = ExpertClusterDense(
            width,
            num_experts=self.num_experts,
            local_density=self.local_density,
            remote_density=self.remote_density,
            seed=None if self.seed is None else self.seed + 1,
            name="cluster_layer",
        )

    @property
    def width(self):
        return self.num_experts * self.expert_units

    def build(self, inputs_shape, gates_shape=None):
        inputs_shape = tuple(inputs_shape)
        validation.last_dim(self, inputs_shape)
        if gates_shape is not None and tuple(gates_shape)[-1] != self.num_experts:
            raise ValueError(
                f"gates must have shape (batch, num_experts={self.num_experts}), got "
                f"{tuple(gates_shape)}"
            )
        self.input_layer.build(inputs_shape)
        self.cluster_layer.build(inputs_shape[:-1] + (self.width,))

    def call(self, inputs, gates):
        g = ops.repeat(ops.cast(gates, self.compute_dtype), self.expert_units, axis=-1)
        h = self.activation(self.input_layer(inputs)) * g
        return self.activation(self.cluster_layer(h)) * g

    def compute_output_shape(self, inputs_shape, gates_shape=None):
        return tuple(inputs_shape[:-1]) + (self.width,)

    def used_weight_count(self, dispatch_mask):
        """Connections (mask ones) each example uses, given which experts are active.

        An example uses the input-layer columns of its active experts and the cluster
        layer's entries between active experts (rows and columns both active). Biases
        are not counted.

        Args:
            dispatch_mask: (n, num_experts) array, nonzero where an expert is active.

        Returns:
            (n,) float64 numpy array.
        """
        active = (np.asarray(ops.convert_to_numpy(dispatch_mask)) != 0).astype("float64")
        if active.ndim != 2 or active.shape[1] != self.num_experts:
            raise ValueError(
                f"dispatch_mask must have shape (n, {self.num_experts}), got {active.shape}"
            )
        ids = np.repeat(np.arange(self.num_experts), self.expert_units)
        onehot = np.eye(self.num_experts)[ids]  # (width, E)
        m1 = np.asarray(ops.convert_to_numpy(self.input_layer.mask), "float64")
        m2 = np.asarray(ops.convert_to_numpy(self.cluster_layer.mask), "float64")
        per_expert_in = m1.sum(axis=0) @ onehot  # (E,)
        pair = onehot.T @ m2 @ onehot  # (E, E)
        return active @ per_expert_in + np.einsum("ne,ef,nf->n", active, pair, active)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "expert_units": self.expert_units,
                "input_density": self.input_density,
                "local_density": self.local_density,
                "remote_density": self.remote_density,
                "activation": keras.activations.serialize(self.activation),
                "seed": self.seed,
            }
        )
        return config

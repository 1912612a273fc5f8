"""Sparsely connected layers: dense layers with a fixed binary connectivity mask."""


import keras
import numpy as np
from keras import ops

from keras_moe import validation

__all__ = ["SparseDense"]


@keras.saving.register_keras_serializable(package="keras_moe")
class SparseDense(keras.layers.Layer):
    """Dense layer with a fixed random binary connectivity mask (StochasticNet).

    `y = activation(x @ (W * M) + b)`, where `M` is an `(input_dim, units)` 0/1 mask
    drawn once at build time, each connection kept independently with probability
    `density` (from `seed`). Masked weights get zero gradient, so the network starts and
    stays sparse. The mask is a non-trainable weight named `"mask"`: it is saved and
    reloaded exactly with the model. `set_mask` replaces it with a user-given wiring
    (e.g. dense within expert clusters and sparse between them).

    Args:
        units: Output width, >= 1.
        density: Probability that a connection exists, 0 < density <= 1 (the paper
            gives no rate; 0.5 by default).
        activation: Activation function, None for linear.
        use_bias: Whether to add a bias.
        kernel_initializer: Initializer of `W` (the full matrix; masked entries unused).
        bias_initializer: Initializer of `b`.
        seed: Integer seed of the mask draw; None for a fresh random mask.
        **kwargs: Base layer arguments.

    Example:

    >>> layer = SparseDense(64, density=0.5, activation="relu", seed=1)
    >>> layer(np.zeros((8, 32), "float32")).shape
    (8, 64)
    >>> 0 < layer.connection_count < 32 * 64  # about 0.5 * 32 * 64
    True

    Reference:
        Shafiee, Siva & Wong, "StochasticNet: Forming Deep Neural Networks via Stochastic
        Connectivity", IEEE Access 2016; "Spatially sparse mixture of experts"
        (`shared/papers/000`).
    """

    def __init__(
        self,
        units,
        density=0.5,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = validation.positive_int("units", units)
        self.density = validation.number(
            "density", density, minimum=0, maximum=1, exclusive_minimum=True
        )
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = validation.integer("seed", seed, minimum=0, allow_none=True)

    def build(self, input_shape):
        input_dim = validation.last_dim(self, input_shape)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            initializer=self.kernel_initializer,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer
            )
        else:
            self.bias = None
        self.mask = self.add_weight(
            name="mask",
            shape=(input_dim, self.units),
            initializer="zeros",
            dtype="float32",
            trainable=False,
        )
        self.mask.assign(self._draw_mask(input_dim))

    def _draw_mask(self, input_dim):
        shape = (input_dim, self.units)
        if self.density >= 1.0:
            return ops.ones(shape, dtype="float32")
        uniform = keras.random.uniform(shape, dtype="float32", seed=self.seed)
        return ops.cast(ops.less(uniform, self.density), "float32")

    def set_mask(self, mask):
        """Replaces the connectivity mask.

        Args:
            mask: `(input_dim, units)` array of zeros and ones. Builds the layer with
                `input_dim = mask.shape[0]` if it is not built yet.

        Raises:
            ValueError: if the shape does not match or an entry is not 0 or 1.
        """
        values = np.asarray(ops.convert_to_numpy(mask), dtype="float32")
        if values.ndim != 2 or values.shape[1] != self.units:
            raise ValueError(
                f"`mask` must have shape (input_dim, {self.units}), got {values.shape}."
            )
        if not self.built:
            self.build((None, values.shape[0]))
        expected = tuple(self.mask.shape)
        if values.shape != expected:
            raise ValueError(f"`mask` must have shape {expected}, got {values.shape}.")
        if not np.all((values == 0) | (values == 1)):
            raise ValueError("`mask` must contain only zeros and ones.")
        self.mask.assign(values)

    @property
    def connection_count(self):
        """Number of existing connections (ones in the mask); None before build."""
        if not self.built:
            return None
        return int(np.sum(ops.convert_to_numpy(self.mask)))

    def call(self, inputs):
        kernel = ops.cast(self.kernel, self.compute_dtype) * ops.cast(
            self.mask, self.compute_dtype
        )
        outputs = ops.matmul(ops.cast(inputs, self.compute_dtype), kernel)
        if self.bias is not None:
            outputs = outputs + ops.cast(self.bias, self.compute_dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "density": self.density,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "seed": self.seed,
            }
        )
        return config

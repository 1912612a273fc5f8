"""DeepMoE's building blocks: the gated convolution and the shallow embedding network.

Wang et al., "Deep Mixture of Experts via Shallow Embedding" (UAI 2019), section 3:

- `GatedConv2D`: a 2-D convolution whose *input* channels are scaled by a non-negative
  per-example gate vector, `z = sum_i g_i K_i * x_i` (eq. 3-5): every input channel is
  an expert, and a zero gate switches it off for that example.
- `ShallowEmbedding`: the shallow embedding network M(x) (3x3 stride-2 convolutions with
  batch norm and ReLU, global average pooling, a dense layer to the classes); its softmax
  output `e` are the latent mixture weights that DeepMoE's gate heads (`ReLUGate`, one per
  gated convolution) read.

Both are channels-last (NHWC) layers.
"""

import keras
from keras import ops

from keras_moe import validation

# Widths of the embedding network's stride-2 convolutions (our choice: the paper gives
# only their number, 4 for CIFAR and 5 for ImageNet, and "roughly 2% of the computation
# of the base models").
CIFAR_EMBEDDING_WIDTHS = (32, 64, 128, 256)
IMAGENET_EMBEDDING_WIDTHS = (16, 32, 64, 128, 256)


def _int_tuple(name, value, length):
    """`value` (an int or a sequence of `length` ints, each >= 1) as a tuple of ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != length:
            raise ValueError(
                f"{name} must be an integer >= 1 or a sequence of {length} such integers, "
                f"got {value!r}"
            )
        return tuple(validation.positive_int(name, v) for v in value)
    return (validation.positive_int(name, value),) * length


@keras.saving.register_keras_serializable(package="keras_moe")
class GatedConv2D(keras.layers.Layer):
    """2-D convolution of input channels scaled by per-example gates (DeepMoE eq. 3-5).

    `outputs = conv2d(x * g[:, None, None, :], kernel) (+ bias)`, i.e.
    `z = sum_i g_i K_i * x_i`: each input channel `i` is an expert `E_i(x) = K_i * x_i`
    and `g_i >= 0` its (unnormalised) weight for that example. With all gates equal to 1
    the layer is exactly a `keras.layers.Conv2D` with the same kernel.

    The layer takes two inputs, passed as one list (the Keras convention of merge and
    attention layers): `layer([feature_map, gates])` with `feature_map` of shape
    `(batch, height, width, in_channels)` (channels last) and `gates` of shape
    `(batch, in_channels)`, typically the `"gates"` output of a `ReLUGate` head. The gates
    are not checked for sign: the DeepMoE gates are non-negative by construction (ReLU).
    The gate multiplication runs in the layer's compute dtype (the gates are cast).

    Choices where the paper is silent: the gates scale the channels of the input tensor
    (so gating before a train-mode batch norm is not undone by the batch statistics; the
    DeepMoE builders apply this layer to post-BN-ReLU activations), and the defaults
    follow ResNet's convolutions (no bias, He-normal kernel, "same" padding).

    Args:
        filters: Number of output channels, >= 1.
        kernel_size: An int or a pair of ints >= 1.
        strides: An int or a pair of ints >= 1.
        padding: `"same"` or `"valid"`.
        use_bias: Whether to add a bias after the convolution.
        dilation_rate: An int or a pair of ints >= 1. Strides and dilation cannot both
            exceed 1 (as in `keras.layers.Conv2D`).
        kernel_initializer: Initializer of the `(kh, kw, in_channels, filters)` kernel.
        bias_initializer: Initializer of the bias.
        kernel_regularizer: Optional regularizer of the kernel (e.g. weight decay).
        bias_regularizer: Optional regularizer of the bias.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> x = np.ones((2, 8, 8, 4), "float32")
    >>> g = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], "float32")
    >>> GatedConv2D(16, 3)([x, g]).shape
    (2, 8, 8, 16)

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, eq. 3-5.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        use_bias=False,
        dilation_rate=1,
        kernel_initializer="he_normal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = validation.positive_int("filters", filters)
        self.kernel_size = _int_tuple("kernel_size", kernel_size, 2)
        self.strides = _int_tuple("strides", strides, 2)
        self.padding = validation.one_of("padding", padding, ("same", "valid"))
        self.use_bias = bool(use_bias)
        self.dilation_rate = _int_tuple("dilation_rate", dilation_rate, 2)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "strides and dilation_rate cannot both be > 1, got "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    def _split_shapes(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 or not all(
            isinstance(s, (list, tuple)) for s in input_shape
        ):
            raise ValueError(
                f"GatedConv2D '{self.name}' must be called on a list [feature_map, gates]; "
                f"got input shape {input_shape}"
            )
        return tuple(input_shape[0]), tuple(input_shape[1])

    def build(self, input_shape):
        x_shape, g_shape = self._split_shapes(input_shape)
        if len(x_shape) != 4 or x_shape[-1] is None:
            raise ValueError(
                f"GatedConv2D '{self.name}' needs a feature map of shape (batch, height, "
                f"width, channels) with known channels; got shape {x_shape}"
            )
        in_channels = int(x_shape[-1])
        if len(g_shape) != 2 or g_shape[-1] != in_channels:
            raise ValueError(
                f"gates must have shape (batch, {in_channels}): one gate per input channel "
                f"of the feature map (shape {x_shape}); got gates of shape {g_shape}"
            )
        # Later calls with another channel count fail in Keras's input check, which
        # names this layer and the expected shape, rather than inside the convolution.
        self.input_spec = [
            keras.InputSpec(ndim=4, axes={-1: in_channels}),
            keras.InputSpec(ndim=2, axes={-1: in_channels}),
        ]
        self.kernel = self.add_weight(
            name="kernel",
            shape=self.kernel_size + (in_channels, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )

    def call(self, inputs):
        x, gates = inputs
        gates = ops.cast(gates, x.dtype)
        x = x * gates[:, None, None, :]
        outputs = ops.conv(
            x,
            ops.cast(self.kernel, x.dtype),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format="channels_last",
        )
        if self.use_bias:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        x_shape, _ = self._split_shapes(input_shape)
        spatial = []
        for size, k, s, d in zip(
            x_shape[1:3], self.kernel_size, self.strides, self.dilation_rate
        ):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-size // s))
            else:
                spatial.append((size - d * (k - 1) - 1) // s + 1)
        return (x_shape[0], spatial[0], spatial[1], self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "use_bias": self.use_bias,
                "dilation_rate": self.dilation_rate,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_moe")
class ShallowEmbedding(keras.layers.Layer):
    """DeepMoE's shallow embedding network M(x): latent mixture weights over the classes.

    `len(widths)` blocks of (3x3 stride-2 convolution without bias, batch norm, ReLU),
    global average pooling, and a dense layer to `num_classes` logits; `e = softmax`.
    Returns a dict: `"probs"` (`e`, `(batch, num_classes)`, on the simplex; what the gate
    heads read) and `"logits"` (for the embedding loss `mu * CE(e, y)`, computed from the
    logits for numerical stability). Both are float32.

    Choices where the paper is silent: the widths (defaults `CIFAR_EMBEDDING_WIDTHS` =
    (32, 64, 128, 256) for 4 layers, about 3% of ResNet-56's multiply-adds on 32x32 inputs;
    `IMAGENET_EMBEDDING_WIDTHS` = (16, 32, 64, 128, 256) for 5 layers, about 3.5% of
    ResNet-18's and 1.5% of ResNet-50's on 224x224 inputs; the paper says "roughly 2%"),
    batch norm and ReLU after each convolution, and global average pooling before the
    dense layer.

    Args:
        num_classes: Number of latent experts = classes, >= 2.
        widths: Output channels of the stride-2 convolutions (4 for CIFAR, 5 for ImageNet
            in the paper), each >= 1.
        kernel_initializer: Initializer of the convolution kernels.
        **kwargs: Base layer arguments.

    Example:

    >>> emb = ShallowEmbedding(num_classes=10)
    >>> out = emb(np.zeros((2, 32, 32, 3), "float32"))
    >>> out["probs"].shape, out["logits"].shape
    ((2, 10), (2, 10))

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 3.3.
    """

    def __init__(
        self,
        num_classes,
        widths=CIFAR_EMBEDDING_WIDTHS,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = validation.integer("num_classes", num_classes, minimum=2)
        if not isinstance(widths, (list, tuple)) or not widths:
            raise ValueError(
                f"widths must be a non-empty sequence of integers >= 1, got {widths!r}"
            )
        self.widths = tuple(validation.positive_int("widths", w) for w in widths)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.convs = []
        self.norms = []
        for i, width in enumerate(self.widths):
            self.convs.append(
                keras.layers.Conv2D(
                    width,
                    3,
                    strides=2,
                    padding="same",
                    use_bias=False,
                    kernel_initializer=self.kernel_initializer,
                    dtype=self.dtype_policy,
                    name=f"conv{i + 1}",
                )
            )
            self.norms.append(
                keras.layers.BatchNormalization(dtype=self.dtype_policy, name=f"bn{i + 1}")
            )
        self.pool = keras.layers.GlobalAveragePooling2D(dtype=self.dtype_policy, name="pool")
        self.dense = keras.layers.Dense(self.num_classes, dtype="float32", name="logits")

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"ShallowEmbedding '{self.name}' needs images of shape (batch, height, "
                f"width, channels) with known channels; got shape {input_shape}"
            )
        shape = tuple(input_shape)
        for conv, norm in zip(self.convs, self.norms):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            norm.build(shape)
        self.dense.build((shape[0], shape[-1]))

    def call(self, inputs, training=None):
        x = inputs
        for conv, norm in zip(self.convs, self.norms):
            x = ops.relu(norm(conv(x), training=training))
        logits = self.dense(ops.cast(self.pool(x), "float32"))
        return {"probs": ops.softmax(logits, axis=-1), "logits": logits}

    def compute_output_spec(self, inputs, training=None):
        shape = (inputs.shape[0], self.num_classes)
        return {
            "probs": keras.KerasTensor(shape, dtype="float32"),
            "logits": keras.KerasTensor(shape, dtype="float32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "widths": self.widths,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config

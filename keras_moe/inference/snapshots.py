"""The pieces `SkipChannelRunner` runs a DeepMoE with: layers whose weights are snapshotted
as graph constants (batch norms folded into the convolution before them), the gate-head
groups, and the graph patterns it reduces (see `keras_moe.inference.deepmoe`).
"""

import keras
import numpy as np
import tensorflow as tf

from keras_moe.analysis import graph
from keras_moe.layers.gated_conv import GatedConv2D, ShallowEmbedding

ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "linear", "relu", "relu6", "elu", "selu", "gelu", "sigmoid", "tanh", "silu",
        "swish", "leaky_relu", "softplus", "softsign", "hard_sigmoid", "hard_silu",
        "hard_swish", "mish", "exponential",
    }
)


def numpy(weight):
    return np.asarray(keras.ops.convert_to_numpy(weight), "float64")


def folded_norm(norm):
    """Inference-mode batch norm as a per-channel affine map `y = z * scale + shift`
    (`y = (z - mean) * gamma / sqrt(var + eps) + beta`), in numpy."""
    scale = 1.0 / np.sqrt(numpy(norm.moving_variance) + norm.epsilon)
    if norm.scale:
        scale = scale * numpy(norm.gamma)
    shift = -numpy(norm.moving_mean) * scale
    if norm.center:
        shift = shift + numpy(norm.beta)
    return scale, shift


def const(array, dtype):
    """A snapshot as a constant: a graph constant when traced (not a captured input)."""
    return tf.constant(array, dtype)


def cast(x, dtype):
    return x if x.dtype == dtype else tf.cast(x, dtype)


def activation_is_elementwise(activation):
    return getattr(activation, "__name__", None) in ELEMENTWISE_ACTIVATIONS


def is_foldable_norm(op):
    return isinstance(op, keras.layers.BatchNormalization) and op.axis in (-1, 3)


def is_parameter_free_channelwise(op):
    """Whether `op` acts on each channel of a channels-last tensor alike, without weights."""
    if isinstance(op, (keras.layers.ReLU, keras.layers.Dropout)):
        return True
    if isinstance(op, keras.layers.Activation):
        return activation_is_elementwise(op.activation)
    if isinstance(op, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        return op.data_format == "channels_last"
    return False


def is_convolution(op):
    """A `GatedConv2D`, or a plain channels-last `Conv2D` (weights can be snapshotted)."""
    if isinstance(op, GatedConv2D):
        return True
    return (
        type(op) is keras.layers.Conv2D
        and op.data_format == "channels_last"
        and op.groups == 1
        and activation_is_elementwise(op.activation)
    )


def single_tensor_input(node):
    tensors = graph.call_inputs(node)
    return tensors[0] if len(tensors) == 1 else None


def gated_conv_inputs(node):
    args, _ = graph.call_arguments(node)
    if len(args) != 1 or not isinstance(args[0], (list, tuple)) or len(args[0]) != 2:
        raise ValueError(
            f"GatedConv2D '{graph.operation(node).name}' must be called as layer([x, gates])"
        )
    return args[0][0], args[0][1]


class SnapshotConv:
    """A convolution node with its weights snapshotted (a batch norm folded in)."""

    def __init__(self, node, norm=None):
        op = graph.operation(node)
        self.node = node
        self.gated = isinstance(op, GatedConv2D)
        kernel = numpy(op.kernel)
        bias = numpy(op.bias) if op.use_bias else None
        self.activation = None
        if not self.gated and op.activation is not keras.activations.linear:
            self.activation = op.activation
        if norm is not None:
            scale, shift = folded_norm(norm)
            kernel = kernel * scale
            bias = shift if bias is None else bias * scale + shift
        self.dtype = op.compute_dtype
        # NumPy snapshots, made graph constants when traced (not captured inputs).
        self.kernel = kernel.astype("float32")
        self.bias = None if bias is None else bias.astype("float32")
        self.in_channels = kernel.shape[2]
        self.strides = (1,) + tuple(op.strides) + (1,)
        self.padding = op.padding.upper()
        self.dilations = (1,) + tuple(op.dilation_rate) + (1,)
        # Set by the plan: the gate tensors indexing its input and output channels, and
        # whether its input arrives already reduced to the input gate's open channels.
        self.in_gate = None
        self.out_gate = None
        self.input_reduced = False

    def weights(self, in_idx=None, out_idx=None):
        """The kernel and bias (or None) sliced to the given input and output channels."""
        kernel = const(self.kernel, self.dtype)
        if in_idx is not None:
            kernel = tf.gather(kernel, in_idx, axis=2)
        if out_idx is not None:
            kernel = tf.gather(kernel, out_idx, axis=3)
        bias = None
        if self.bias is not None:
            bias = const(self.bias, self.dtype)
            if out_idx is not None:
                bias = tf.gather(bias, out_idx)
        return kernel, bias

    def __call__(self, x, weights):
        kernel, bias = weights
        outputs = tf.nn.conv2d(
            cast(x, self.dtype), kernel, strides=self.strides, padding=self.padding,
            dilations=self.dilations,
        )
        if bias is not None:
            outputs = tf.nn.bias_add(outputs, bias)
        return outputs if self.activation is None else self.activation(outputs)


class SnapshotDense:
    """A plain `Dense` layer on a rank-2 input, its weights snapshotted as constants."""

    def __init__(self, op):
        self.dtype = op.compute_dtype
        self.kernel = numpy(op.kernel).astype("float32")
        self.bias = numpy(op.bias).astype("float32") if op.use_bias else None
        self.activation = None if op.activation is keras.activations.linear else op.activation

    def __call__(self, x):
        outputs = tf.matmul(cast(x, self.dtype), const(self.kernel, self.dtype))
        if self.bias is not None:
            outputs = tf.nn.bias_add(outputs, const(self.bias, self.dtype))
        return outputs if self.activation is None else self.activation(outputs)


def is_snapshot_dense(op):
    return (
        type(op) is keras.layers.Dense
        and op.lora_rank is None
        and op.quantization_mode is None
        and activation_is_elementwise(op.activation)
        and len(op.input.shape) == 2
    )


class SnapshotEmbedding:
    """A `ShallowEmbedding` with its batch norms folded into its convolutions."""

    def __init__(self, op):
        self.dtype = op.compute_dtype
        self.convs = []
        for conv, norm in zip(op.convs, op.norms):
            scale, shift = folded_norm(norm)
            kernel = numpy(conv.kernel) * scale
            if conv.use_bias:
                shift = shift + numpy(conv.bias) * scale
            self.convs.append(
                (kernel.astype("float32"), shift.astype("float32"), (1,) + tuple(conv.strides) + (1,),
                 conv.padding.upper())
            )
        self.dense = SnapshotDense(op.dense)

    @staticmethod
    def supports(op):
        return (
            type(op) is ShallowEmbedding
            and all(is_foldable_norm(n) for n in op.norms)
            and all(
                type(c) is keras.layers.Conv2D and c.data_format == "channels_last"
                and c.groups == 1 and c.activation is keras.activations.linear
                and tuple(c.dilation_rate) == (1, 1)
                for c in op.convs
            )
            and op.dense.lora_rank is None
            and op.dense.quantization_mode is None
        )

    def __call__(self, images):
        x = cast(images, self.dtype)
        for kernel, bias, strides, padding in self.convs:
            x = tf.nn.conv2d(x, const(kernel, self.dtype), strides=strides, padding=padding)
            x = tf.nn.relu(tf.nn.bias_add(x, const(bias, self.dtype)))
        logits = self.dense(cast(tf.reduce_mean(x, axis=(1, 2)), "float32"))
        return {"probs": tf.nn.softmax(logits, axis=-1), "logits": logits}


class GateGroup:
    """`ReLUGate` heads reading one tensor: one matrix product, one open-set computation."""

    def __init__(self, nodes):
        self.nodes = nodes
        kernels = [numpy(graph.operation(n).kernel) for n in nodes]
        biases = [
            numpy(graph.operation(n).bias) if graph.operation(n).use_bias else np.zeros(k.shape[1])
            for n, k in zip(nodes, kernels)
        ]
        self.sizes = [k.shape[1] for k in kernels]
        self.kernel = np.concatenate(kernels, axis=1).astype("float32")
        self.bias = np.concatenate(biases).astype("float32")
        self.use_bias = any(graph.operation(n).use_bias for n in nodes)
        self.segments = np.repeat(np.arange(len(nodes)), self.sizes).astype("int32")
        self.local = np.concatenate([np.arange(n) for n in self.sizes]).astype("int32")
        self.first = self.local == 0

    def __call__(self, inputs, values, open_sets, column_sets):
        logits = tf.matmul(cast(inputs, "float32"), const(self.kernel, 'float32'))
        if self.use_bias:
            logits = tf.nn.bias_add(logits, const(self.bias, 'float32'))
        gates = tf.nn.relu(logits)
        # Open channels of every head at once (union over the batch; a head with none
        # open keeps its first channel), split into one index vector per head.
        col_max = tf.reduce_max(gates, axis=0)
        head_open = tf.math.segment_max(col_max, self.segments) > 0
        keep = tf.logical_or(
            col_max > 0,
            tf.logical_and(self.first, tf.logical_not(tf.gather(head_open, self.segments))),
        )
        counts = tf.math.segment_sum(tf.cast(keep, "int32"), self.segments)
        positions = tf.where(keep)[:, 0]
        local = tf.gather(self.local, positions)
        indices = tf.split(local, counts, num=len(self.nodes))
        # The open gates' values, shaped to scale channels-last activations, per head.
        open_gates = tf.reshape(tf.gather(gates, positions, axis=1), (-1, 1, 1, tf.size(local)))
        open_gates = tf.split(open_gates, counts, axis=3, num=len(self.nodes))
        columns = tf.split(gates[:, :, None], self.sizes, axis=1)  # (batch, channels, 1)
        masks = tf.split(tf.cast(gates > 0, "float32"), self.sizes, axis=-1)
        pieces = zip(
            self.nodes, tf.split(logits, self.sizes, axis=-1),
            tf.split(gates, self.sizes, axis=-1), masks, indices, open_gates, columns,
        )
        for node, logit, gate, mask, idx, open_gate, column in pieces:
            out = {"gates": gate, "logits": logit, "dispatch_mask": mask}
            keys = keras.tree.flatten({key: key for key in out})  # ReLUGate's output order
            for tensor, key in zip(graph.call_outputs(node), keys):
                values[id(tensor)] = out[key]
            gate_t = graph.call_outputs(node)[keys.index("gates")]
            open_sets[id(gate_t)] = (idx, open_gate)
            column_sets[id(gate_t)] = column

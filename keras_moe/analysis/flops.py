"""Multiply-add counts of Keras models, and DeepMoE's effective (gated) cost.

Three functions:

- `static_flops(model)`: the multiply-accumulates (MACs) of one example through every
  convolution and dense layer of any Keras model, from the layer configs and the
  tensor shapes of the functional graph.
- `gate_density(model, data)`: for a DeepMoE model, the fraction of gates > 0 of every
  gated convolution, averaged over examples and channels (the gate reader's,
  `keras_moe.analysis.gates`).
- `effective_flops(model, data)`: DeepMoE's cost when the gated-off channels are skipped.

What is counted (one multiply-add = one "FLOP", the convention of the DeepMoE paper's
tables and of the ResNet paper, where ResNet-50 has about 4.1e9):

- `Conv1D/2D/3D` and `GatedConv2D`: `prod(kernel) * (C_in / groups) * C_out *
  prod(output spatial)`.
- `DepthwiseConv1D/2D`: `prod(kernel) * C_in * depth_multiplier * prod(output spatial)`;
  `SeparableConv1D/2D`: that plus the pointwise `C_in * depth_multiplier * C_out *
  prod(output spatial)`.
- `Dense`: `input_dim * units * prod(leading non-batch dims)`.
- DeepMoE's `ReLUGate` head: `input_dim * units` (a dense layer on the embedding `e`);
  `ShallowEmbedding`: its convolutions and its dense layer.
- `MoEDense`, per token: its gate at inference (`SoftmaxGate`: `d * hidden + hidden *
  E`, or `d * E` when linear; `NoisyTopKGate`: the clean `d * E`, its noise runs in
  training only) plus the experts a token runs: `top_k` of them (all `E` with soft
  gating), each `d * units`, or `d * h + h * units` with `expert_hidden_units = h`.
- `ExpertMixture`: every expert and the gate (all computed for every example), each
  counted as a layer of its own or, for a functional model, recursively.
- Nested functional models: their own layers, recursively.

Not counted: bias additions, batch norm, activations, pooling, element-wise merges,
the gate multiplication of `GatedConv2D` (all linear in the activation size and small
beside the convolutions), transposed convolutions and any layer not listed above.

Effective cost (DESIGN.md, "DeepMoE (004)"): every gate of a DeepMoE network is known
once the embedding has run, before the base network starts, so a gated convolution can
skip both its gated-off input channels and the output channels that the *next* gate
closes. For each convolution of the base network and each example,

    MACs = prod(kernel) * prod(output spatial) * active_in * active_out

where `active_in` is the number of open gates (> 0) of that convolution's own gate (all
input channels for an ungated convolution) and `active_out` the number of output
channels that some following gate keeps open. The output of a convolution is followed
forward through per-channel layers (batch norm, ReLU, activations, dropout); if every
path ends in the feature-map input of a `GatedConv2D`, an output channel is needed
when any of those gates keeps it open; if any path reaches anything else (a residual
`Add`, pooling, a dense layer, the model output), every output channel counts. The
counts are averaged over the examples (the mean of the per-example products, not the
product of the means). Dense layers, the embedding network and the gate heads are
added at their static cost. Gates are computed in inference mode (`training=False`).

Reference:
    Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sections 3
    and 5 (FLOPs in Tables 3-5).
"""

import dataclasses
import math

import keras
import numpy as np

from keras_moe.analysis import gates as gate_reader
from keras_moe.analysis import graph
from keras_moe.analysis.gates import densities, gate_density  # noqa: F401 (re-exported)
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.expert_mixture import ExpertMixture
from keras_moe.layers.gates import NoisyTopKGate, ReLUGate, SoftmaxGate
from keras_moe.layers.moe_dense import MoEDense

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
# Layers that map channel c of their input to channel c of their output only: a skipped
# (zero-gated) channel stays irrelevant through them.
_PER_CHANNEL = (
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Dropout,
    keras.layers.LeakyReLU,
    keras.layers.Identity,
)


# Graph helpers ---------------------------------------------------------------------------


def _network(model):
    """The functional graph to analyse (`DeepMoEModel` is functional itself)."""
    return graph.functional(model)


def _nodes(model):
    """The call nodes of a functional model in topological order (inputs first)."""
    return graph.call_nodes(model)


def _shape(tensor):
    return tuple(tensor.shape)


def _prod(values):
    return int(math.prod(int(v) for v in values))


def _spatial(shape, data_format):
    return shape[2:] if data_format == "channels_first" else shape[1:-1]


def _channels(shape, data_format):
    return shape[1] if data_format == "channels_first" else shape[-1]


def _conv_macs(layer, in_shape, out_shape):
    """MACs of one example for a conv-like layer, or None if `layer` is not counted."""
    if isinstance(layer, GatedConv2D):
        return _prod(layer.kernel_size) * in_shape[-1] * layer.filters * _prod(out_shape[1:3])
    data_format = getattr(layer, "data_format", "channels_last")
    if isinstance(layer, _SEPARABLE):
        c_in = _channels(in_shape, data_format)
        spatial = _prod(_spatial(out_shape, data_format))
        inner = c_in * layer.depth_multiplier
        return _prod(layer.kernel_size) * inner * spatial + inner * layer.filters * spatial
    if isinstance(layer, _DEPTHWISE):
        c_in = _channels(in_shape, data_format)
        return (_prod(layer.kernel_size) * c_in * layer.depth_multiplier
                * _prod(_spatial(out_shape, data_format)))
    if isinstance(layer, _CONV):
        c_in = _channels(in_shape, data_format)
        return (_prod(layer.kernel_size) * (c_in // layer.groups) * layer.filters
                * _prod(_spatial(out_shape, data_format)))
    return None


def _dense_macs(layer, in_shape):
    if isinstance(layer, keras.layers.Dense):
        return _prod(in_shape[1:-1]) * in_shape[-1] * layer.units
    if isinstance(layer, ReLUGate):
        return _prod(in_shape[1:-1]) * in_shape[-1] * layer.units
    return None


def _embedding_macs(layer, in_shape):
    """MACs of a `ShallowEmbedding` (its convolutions and its dense layer)."""
    total = 0
    shape = tuple(in_shape)
    for conv in layer.convs:
        out = tuple(conv.compute_output_shape(shape))
        total += _conv_macs(conv, shape, out)
        shape = out
    total += shape[-1] * layer.dense.units
    return total


def _gate_macs(gate, input_dim):
    if isinstance(gate, SoftmaxGate):
        if gate.hidden_units is None:
            return input_dim * gate.num_experts
        return input_dim * gate.hidden_units + gate.hidden_units * gate.num_experts
    if isinstance(gate, NoisyTopKGate):
        return input_dim * gate.num_experts
    # Any other gate layer: its matrices, once each (a dense-like cost per token).
    return sum(_prod(w.shape) for w in gate.weights if len(w.shape) == 2)


def _moe_dense_macs(layer, in_shape):
    input_dim = in_shape[-1]
    if layer.expert_hidden_units is None:
        expert = input_dim * layer.units
    else:
        expert = input_dim * layer.expert_hidden_units + layer.expert_hidden_units * layer.units
    active = layer.num_experts if layer.top_k is None else layer.top_k
    return _prod(in_shape[1:-1]) * (_gate_macs(layer.gate, input_dim) + active * expert)


def _sublayer_macs(layer, in_shape):
    """MACs of a layer called on `in_shape` outside any graph we can read."""
    if isinstance(layer, keras.Model) and graph.has_graph(layer):  # a Sequential too
        return sum(_graph_macs(graph.functional(layer)).values())
    out_shape = tuple(layer.compute_output_shape(in_shape))
    macs = _dense_macs(layer, in_shape)
    if macs is None:
        macs = _conv_macs(layer, in_shape, out_shape)
    return macs or 0


def _node_macs(node):
    """{name: MACs} of one call node (a nested model gives one entry per inner layer)."""
    layer = graph.operation(node)
    inputs = graph.call_inputs(node)
    if isinstance(layer, keras.Model) and graph.has_graph(layer):
        return {f"{layer.name}/{k}": v for k, v in _graph_macs(graph.functional(layer)).items()}
    if not inputs:
        return {}
    in_shape = _shape(inputs[0])
    if isinstance(layer, ShallowEmbedding):
        return {layer.name: _embedding_macs(layer, in_shape)}
    if isinstance(layer, MoEDense):
        return {layer.name: _moe_dense_macs(layer, in_shape)}
    if isinstance(layer, ExpertMixture):
        parts = {f"{layer.name}/expert_{i}": _sublayer_macs(expert, in_shape)
                 for i, expert in enumerate(layer.experts)}
        if layer.gate is not None:
            parts[f"{layer.name}/gate"] = _sublayer_macs(layer.gate, in_shape)
        return parts
    macs = _dense_macs(layer, in_shape)
    if macs is None and graph.call_outputs(node):
        macs = _conv_macs(layer, in_shape, _shape(graph.call_outputs(node)[0]))
    return {} if macs is None else {layer.name: macs}


def _graph_macs(model):
    counts = {}
    for node in _nodes(model):
        for name, macs in _node_macs(node).items():
            key, i = name, 1
            while key in counts:  # a layer called more than once
                i += 1
                key = f"{name}#{i}"
            counts[key] = int(macs)
    return counts


def static_flops(model, by_layer=False):
    """Multiply-adds of one example through a model's convolutions and dense layers.

    See the module docstring for what is counted. For a `DeepMoEModel` the wrapped
    `network` is counted (base network, embedding network and gate heads), with every
    channel computed.

    Args:
        model: A functional (or Sequential with an input shape) Keras model, or a
            `DeepMoEModel`. Spatial sizes must be known.
        by_layer: Return `{layer name: MACs}` instead of the total.

    Returns:
        The total MACs per example (int), or the per-layer dict.

    Example:

    >>> x = keras.Input((8, 8, 3))
    >>> model = keras.Model(x, keras.layers.Conv2D(4, 3, padding="same")(x))
    >>> static_flops(model)   # 3 * 3 * 3 * 4 * 8 * 8
    6912

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, Tables 3-5.
    """
    counts = _graph_macs(_network(model))
    return counts if by_layer else int(sum(counts.values()))


# Gates ---------------------------------------------------------------------------------


def gate_values(model, data, batch_size=256):
    """The gate values of every gated convolution of a DeepMoE model on `data`.

    `keras_moe.analysis.gates.gate_values(model, data, kinds=("gated_conv",))`: see
    there. Returns `{GatedConv2D name: float32 array (N, C_in)}`, in the network's order.
    """
    return gate_reader.gate_values(model, data, kinds=("gated_conv",), batch_size=batch_size)


# Effective cost ---------------------------------------------------------------------------


@dataclasses.dataclass
class EffectiveFlops:
    """What `effective_flops` returns (all values are MACs per example).

    Attributes:
        total: Mean effective MACs: skipped base convolutions + `gating` + other layers.
        by_layer: `{layer name: mean MACs}` for every counted layer.
        static: Every channel computed (`static_flops` of the same model).
        gating: The embedding network and the gate heads (static).
    """

    total: float
    by_layer: dict
    static: int
    gating: int

    @property
    def ratio(self):
        """`total / static`."""
        return self.total / self.static


def _next_gates(tensor, consumers):
    """The GatedConv2D nodes whose feature input `tensor` reaches through per-channel
    layers, or None if some path goes anywhere else (then every channel counts)."""
    gated, stack, seen = [], [tensor], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        uses = consumers.get(id(t), [])
        if not uses:
            return None
        for node, position in uses:
            if node is None:  # a model output
                return None
            layer = graph.operation(node)
            if isinstance(layer, GatedConv2D):
                if position != 0:
                    return None
                gated.append(node)
            elif isinstance(layer, _PER_CHANNEL) and len(graph.call_inputs(node)) == 1:
                stack.extend(graph.call_outputs(node))
            else:
                return None
    return gated or None


def effective_flops(model, data, batch_size=256):
    """DeepMoE's mean cost per example when gated-off channels are skipped.

    See the module docstring for the rule (`active_in * active_out` per convolution,
    `active_out` from the next gate). Every `Conv*D` and `GatedConv2D` of the network is
    counted that way; other counted layers (dense layers, `ShallowEmbedding`,
    `ReLUGate` heads) at their static cost.

    Args:
        model: A `DeepMoEModel` (or its functional `network`) with at least one
            `GatedConv2D`; the network must be flat (no nested models).
        data: Images, `(images, labels)`, or a `tf.data.Dataset` (see `gate_values`).
        batch_size: Batch size for arrays.

    Returns:
        An `EffectiveFlops`.

    Example:

    >>> report = effective_flops(model, x_test[:1000])
    >>> report.total / static_flops(keras_moe.zoo.resnet56())

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 3.3
        and 5 (DESIGN.md, "DeepMoE (004)").
    """
    network = _network(model)
    nodes = _nodes(network)
    gated = [n for n in nodes if isinstance(graph.operation(n), GatedConv2D)]
    if not gated:
        raise ValueError(f"{model!r} has no GatedConv2D layer")
    values = gate_values(network, data, batch_size=batch_size)
    open_ = {graph.operation(n).name: values[graph.operation(n).name] > 0 for n in gated}
    count = len(next(iter(open_.values())))
    consumers = graph.consumers(nodes, network.outputs)

    by_layer, gating = {}, 0
    for node in nodes:
        layer = graph.operation(node)
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"effective_flops needs a flat network; {layer.name!r} is a nested model"
            )
        is_conv = isinstance(layer, (GatedConv2D,) + _CONV) and not isinstance(
            layer, _DEPTHWISE + _SEPARABLE
        )
        if not is_conv:
            for name, macs in _node_macs(node).items():
                by_layer[name] = float(macs)
                if isinstance(layer, (ShallowEmbedding, ReLUGate)):
                    gating += int(macs)
            continue
        in_shape = _shape(graph.call_inputs(node)[0])
        out_shape = _shape(graph.call_outputs(node)[0])
        data_format = getattr(layer, "data_format", "channels_last")
        groups = getattr(layer, "groups", 1)
        per_pair = _prod(layer.kernel_size) * _prod(_spatial(out_shape, data_format))
        c_in = _channels(in_shape, data_format)
        if isinstance(layer, GatedConv2D):
            active_in = open_[layer.name].sum(axis=1).astype(np.float64)
        else:
            active_in = np.full(count, float(c_in))
        following = _next_gates(graph.call_outputs(node)[0], consumers)
        if following is None:
            active_out = np.full(count, float(layer.filters))
        else:
            keep = np.zeros_like(open_[graph.operation(following[0]).name])
            for nxt in following:
                keep = keep | open_[graph.operation(nxt).name]
            active_out = keep.sum(axis=1).astype(np.float64)
        macs = per_pair * (active_in / groups) * active_out
        by_layer[layer.name] = float(macs.mean())
    return EffectiveFlops(
        total=float(sum(by_layer.values())),
        by_layer=by_layer,
        static=static_flops(network),
        gating=gating,
    )

"""DeepMoE inference that skips closed channels (Wang et al., UAI 2019, sections 3.2-3.4).

In a DeepMoE every gate is a function of the shallow embedding alone (`G^l(e)`, eq. 6),
so all gates are known before the base network runs. A gated convolution therefore
needs only the input channels its gates leave open (eq. 3-5: a closed channel's expert
contributes nothing), and when its output reaches the next gated convolution only
through per-channel layers (batch norm, ReLU), only the output channels that the next
gate leaves open. `SkipChannelRunner` runs a DeepMoE that way, in one `tf.function`:

1. it runs the embedding and every gate head first (the heads that read the same tensor
   as one matrix product) and turns the gates into index vectors of open channels;
2. for every gated convolution it gathers the kernel slice `[kh, kw, active_in,
   active_out]` (`active_in`: this convolution's open gates; `active_out`: the next
   gated convolution's open gates when this convolution feeds only it through a batch
   norm and per-channel layers, otherwise all output channels) and the matching bias
   slice (the batch norm after it, folded in);
3. it runs the base network on the reduced channels, scaling the inputs by the open gate
   values;
4. its logits equal the masked computation `model(x)` (every channel computed, closed
   ones multiplied by 0) up to float rounding.

The convolution cost then scales with `active_in * active_out`, the saved compute that
DESIGN.md ("DeepMoE (004)") counts.

Choices:

- Graph walk, not a re-implementation: the runner walks the functional graph of
  `model.network` (the depth-ordered node list Keras' own functional call uses) and
  finds the reducible chains by pattern: a `GatedConv2D` or plain `Conv2D` whose output
  passes, each tensor with exactly one consumer, through a batch norm (folded into the
  convolution) and parameter-free per-channel layers (`ReLU`, element-wise `Activation`,
  `Dropout`, `MaxPooling2D` / `AveragePooling2D`) into the feature input of one
  `GatedConv2D`. Every other node (the embedding, shortcuts, additions, the classifier,
  any layer it does not know) runs as in the model on all channels. So the same code
  serves the CIFAR and ImageNet ResNets (basic and bottleneck blocks) and VGG-16 of
  `keras_moe.zoo.deepmoe`; a layer it does not know costs savings, never correctness.
  Tensors that feed the residual stream (a block's last convolution) keep all channels,
  as the residual addition needs them.
- Batches: a gate's open set is the union over the batch of the channels open for any
  example, and each example's inputs are scaled by its own gates, so every batch size is
  exact; the savings are largest at batch size 1, the serving case.
- One trace: the channel counts are dynamic dimensions (`tf.gather` of kernels with
  run-time indices), so new images never retrace. The open sets of all the heads of a
  group come from one `tf.where` and one `tf.split`, not one per layer: at batch 1 on a
  CPU the cost of a CIFAR ResNet is dominated by per-op overhead, so op count matters as
  much as multiply-adds.
- Weights are snapshotted when the runner is built, with every batch norm that alone
  reads a linear convolution folded into it (the usual inference transformation, also
  applied to the ungated stem and shortcut convolutions), and become constants of the
  traced graph (not captured inputs of every call: at batch 1 that per-call cost is
  measurable). The `ShallowEmbedding` (its batch norms folded into its convolutions)
  and plain `Dense` layers (the classifier) are snapshotted the same way, so the
  embedding runs as a handful of fused ops instead of the Keras layers' dozens. Build a
  new runner after changing the model's weights.
- Op count: each head group also yields, per head, the open gates' values already shaped
  to scale activations, `(batch, 1, 1, open)`, and the gates as `(batch, channels, 1)`
  columns for the selection matrices, each from one op for all heads; so a gated
  convolution costs its kernel gathers, one scaling (or selection) and the convolution.
  `__call__` runs a trace that returns the logits only; `outputs` one that returns all.
- A convolution reading an unreduced tensor (the residual stream) selects and scales its
  open input channels with one batched matrix product by a 0/1 selection matrix times
  the gates (`skip_stream_inputs=True`, the default): `tf.gather` along the channel axis
  copies one element at a time and measured slower on CPU (as does gathering a kernel's
  output channels, its last axis; storing kernels output-major and transposing after
  the gather measured slower still, so kernels keep TensorFlow's HWIO layout). With `skip_stream_inputs=False` it reads every stream
  channel (closed ones multiplied by 0): no selection, no input saving for those
  convolutions; the output saving stays. `benchmarks/deepmoe.py` times both.
- A layer whose gates are all closed keeps one channel (index 0, gate value 0): its
  contribution is an exact zero, and no convolution ever has zero input channels (which
  TensorFlow rejects).
- Inference only: batch norms use their moving statistics (`training=False`).
- A model without gates runs through the same executor with its batch norms folded, the
  like-for-like baseline for timings.

Example:

>>> model = keras_moe.zoo.deepmoe_resnet56(wide=True)
>>> runner = SkipChannelRunner(model)
>>> logits = runner(images)            # == model(images), closed channels skipped
>>> runner.reduced_layers              # convolutions whose output channels are sliced

Reference:
    Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 3.2-3.4.
"""

import keras
import tensorflow as tf

from keras_moe import validation
from keras_moe.analysis import graph
from keras_moe.inference.snapshots import (
    GateGroup,
    SnapshotConv,
    SnapshotDense,
    SnapshotEmbedding,
    cast,
    gated_conv_inputs,
    is_convolution,
    is_foldable_norm,
    is_parameter_free_channelwise,
    is_snapshot_dense,
    single_tensor_input,
)
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gates import ReLUGate

class SkipChannelRunner:
    """Runs a DeepMoE skipping the channels its gates close (DeepMoE inference).

    Calling the runner on images returns the base network's logits, equal to
    `model(images)` (the masked computation) up to float rounding, computed with every
    gated convolution reduced to its open input channels and to the output channels the
    next gate keeps open (see the module docstring for the procedure and the choices).
    The weights are read (and batch norms folded into the convolutions before them) when
    the runner is built: build a new runner after changing the model's weights.

    A model without gates (e.g. `keras_moe.zoo.resnet56()`) runs through the same
    executor with its batch norms folded: the like-for-like baseline for timings.

    Args:
        model: A `keras_moe.zoo.deepmoe.DeepMoEModel` (as built by the DeepMoE builders),
            its `network` (a functional model with dict outputs `"logits"` and `"gates"`),
            or any single-input functional model.
        skip_stream_inputs: Whether a gated convolution reading an unreduced tensor (the
            residual stream) selects its open input channels (a matrix product with a
            0/1 selection matrix) instead of reading all of them, the closed ones
            multiplied by 0.

    Attributes:
        network: The functional model that is run.
        reduced_layers: Names of the convolutions whose output channels are sliced to
            the next gate's open set, in graph order.
        folded_norms: Names of the batch norms folded into the convolution before them.

    Example:

    >>> model = keras_moe.zoo.deepmoe_resnet_cifar(depth=8)
    >>> runner = SkipChannelRunner(model)
    >>> runner(np.zeros((1, 32, 32, 3), "float32")).shape
    TensorShape([1, 10])
    >>> runner.outputs(images)["gates"]   # the network's outputs, all of them

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 3.2-3.4.
    """

    def __init__(self, model, skip_stream_inputs=True):
        # The reduced network is written in TensorFlow ops (one tf.function).
        validation.require_tensorflow(
            "SkipChannelRunner (a TensorFlow graph)",
            "On JAX, model(images) computes the same logits with the closed channels masked.")
        network = getattr(model, "network", model)
        if (
            not isinstance(network, keras.Model)
            or not graph.has_graph(network)
            or len(network.inputs) != 1
        ):
            raise ValueError(
                "model must be a DeepMoEModel or a single-input functional keras.Model, "
                f"got {model!r}"
            )
        outputs = network.output
        if isinstance(outputs, dict) and "logits" not in outputs:
            raise ValueError(
                f"a model with dict outputs must have a 'logits' output, got {list(outputs)}"
            )
        self.network = network
        self.skip_stream_inputs = bool(skip_stream_inputs)
        self._input = network.inputs[0]
        self._plan(graph.call_nodes(network))
        spec = tf.TensorSpec((None,) + tuple(self._input.shape[1:]), self._input.dtype)
        # Two traces, each once for every batch size and open set: the logits alone (the
        # serving call: one output tensor per call) and all of the network's outputs.
        self._forward = tf.function(
            lambda images: self._logits(self._run(images)), input_signature=[spec],
            autograph=False,
        )
        self._forward_all = tf.function(
            lambda images: self._run(images), input_signature=[spec], autograph=False
        )

    # Planning (once, on the symbolic graph) ----------------------------------------------

    def _plan(self, nodes):
        producer = graph.producers(nodes)
        consumers = {key: [node for node, _ in uses] for key, uses in
                     graph.consumers(nodes, self.network.output).items()}

        def only_consumer(tensor):
            users = consumers.get(id(tensor), [])
            return users[0] if len(users) == 1 else None

        def ancestors(tensor):
            seen, stack = set(), [tensor]
            while stack:
                node = producer.get(id(stack.pop()))
                if node is not None and id(node) not in seen:
                    seen.add(id(node))
                    stack.extend(graph.call_inputs(node))
            return seen

        # 1. Convolutions, with the batch norm that alone reads a linear one folded in.
        convs = {}
        aliases = {}  # id(folded norm node) -> its convolution
        for node in nodes:
            op = graph.operation(node)
            if not is_convolution(op) or len(graph.call_outputs(node)) != 1:
                continue
            norm_node = only_consumer(graph.call_outputs(node)[0])
            norm = None
            if (
                norm_node is not None
                and is_foldable_norm(graph.operation(norm_node))
                and (isinstance(op, GatedConv2D) or op.activation is keras.activations.linear)
            ):
                norm = graph.operation(norm_node)
            convs[id(node)] = SnapshotConv(node, norm)
            if norm is not None:
                aliases[id(norm_node)] = convs[id(node)]

        # 2. Reducible chains: conv [-> folded norm] -> parameter-free per-channel layers
        #    -> one gated convolution, each tensor read only by the next.
        gate_tensors = []
        for node in nodes:
            if not isinstance(graph.operation(node), GatedConv2D):
                continue
            x_t, gate_t = gated_conv_inputs(node)
            convs[id(node)].in_gate = gate_t
            gate_tensors.append(gate_t)
            chain, tensor, source_conv = [], x_t, None
            while True:
                source = producer.get(id(tensor))
                if only_consumer(tensor) is None or source is None or len(graph.call_outputs(source)) != 1:
                    break
                chain.append(tensor)
                if id(source) in convs:
                    source_conv = convs[id(source)]
                    break
                if id(source) in aliases:
                    chain.append(single_tensor_input(source))
                    if only_consumer(chain[-1]) is None:
                        break
                    source_conv = aliases[id(source)]
                    break
                if not is_parameter_free_channelwise(graph.operation(source)):
                    break
                tensor = single_tensor_input(source)
                if tensor is None:
                    break
            if source_conv is None or id(source_conv.node) in ancestors(gate_t):
                continue
            source_conv.out_gate = gate_t
            convs[id(node)].input_reduced = True

        # 3. ReLUGate heads grouped by the tensor they read: one matrix product per group.
        groups = {}
        for node in nodes:
            if type(graph.operation(node)) is ReLUGate and single_tensor_input(node) is not None:
                groups.setdefault(id(single_tensor_input(node)), []).append(node)
        self._groups = {}
        for members in groups.values():
            group = GateGroup(members)
            for i, node in enumerate(members):
                self._groups[id(node)] = group if i == 0 else None

        # Order: the gates' ancestors (the embedding and the gate heads) first, as the
        # reductions need every gate before the base network runs; then the rest.
        early = set()
        for gate_t in gate_tensors:
            early |= ancestors(gate_t)
        self._nodes = [n for n in nodes if id(n) in early] + [
            n for n in nodes if id(n) not in early
        ]
        self._convs = convs
        self._aliases = aliases
        # 4. Other layers with weights snapshotted as constants (fewer ops per call).
        self._snapshots = {}
        for node in nodes:
            op = graph.operation(node)
            if SnapshotEmbedding.supports(op) and single_tensor_input(node) is not None:
                self._snapshots[id(node)] = SnapshotEmbedding(op)
            elif is_snapshot_dense(op) and single_tensor_input(node) is not None:
                self._snapshots[id(node)] = SnapshotDense(op)
        self.reduced_layers = [graph.operation(c.node).name for c in convs.values()
                               if c.out_gate is not None]
        self.folded_norms = [graph.operation(n).name for n in nodes if id(n) in aliases]

    # Execution ------------------------------------------------------------------------------

    def _run(self, images, shapes=None):
        values = {id(self._input): images}
        open_sets = {}
        column_sets = {}  # filled by GateGroup for its heads, else on demand

        def open_set(gate_t):
            """(open channel indices, their gates as (batch, 1, 1, open)) of a gate tensor."""
            if id(gate_t) not in open_sets:  # a gate not computed by a GateGroup
                gates = values[id(gate_t)]
                is_open = tf.reduce_any(gates > 0, axis=0)
                first = tf.equal(tf.range(tf.shape(is_open)[0]), 0)
                keep = tf.logical_or(
                    is_open, tf.logical_and(tf.logical_not(tf.reduce_any(is_open)), first)
                )
                idx = tf.where(keep)[:, 0]
                open_sets[id(gate_t)] = (idx, tf.gather(gates, idx, axis=1)[:, None, None, :])
            return open_sets[id(gate_t)]

        weights = {}
        shapes_by_size = {}

        def map_shape(height, width):  # (batch, height, width, -1), one tensor per size
            if (height, width) not in shapes_by_size:
                batch = tf.shape(images)[:1]
                shapes_by_size[(height, width)] = tf.concat([batch, [height, width, -1]], 0)
            return shapes_by_size[(height, width)]

        def column_gates(gate_t):  # a gate tensor as (batch, channels, 1)
            if id(gate_t) not in column_sets:
                column_sets[id(gate_t)] = values[id(gate_t)][:, :, None]
            return column_sets[id(gate_t)]


        def conv_weights(conv):  # the kernel (and bias) sliced to the open channels
            if id(conv.node) not in weights:
                in_idx = None
                if conv.gated and (conv.input_reduced or self.skip_stream_inputs):
                    in_idx = open_set(conv.in_gate)[0]
                out_idx = None if conv.out_gate is None else open_set(conv.out_gate)[0]
                weights[id(conv.node)] = conv.weights(in_idx, out_idx)
                if shapes is not None:
                    shapes[graph.operation(conv.node).name] = tuple(
                        int(d) for d in weights[id(conv.node)][0].shape
                    )
            return weights[id(conv.node)]

        for node in self._nodes:
            outputs = graph.call_outputs(node)
            out_t = outputs[0] if len(outputs) == 1 else None
            if id(node) in self._groups:
                group = self._groups[id(node)]
                if group is not None:
                    group(
                        values[id(single_tensor_input(group.nodes[0]))], values, open_sets,
                        column_sets,
                    )
            elif id(node) in self._aliases:  # a batch norm folded into its convolution
                values[id(out_t)] = values[id(single_tensor_input(node))]
            elif id(node) in self._convs:
                conv = self._convs[id(node)]
                if not conv.gated:
                    x = values[id(single_tensor_input(node))]
                    values[id(out_t)] = conv(x, conv_weights(conv))
                    continue
                x_t, gate_t = gated_conv_inputs(node)
                x = cast(values[id(x_t)], conv.dtype)
                if conv.input_reduced:  # x holds the open channels only, in order
                    x = x * cast(open_set(gate_t)[1], conv.dtype)
                elif self.skip_stream_inputs:
                    # Select and scale the open channels with one batched matrix product
                    # by (0/1 selection matrix) x (gates): faster than tf.gather along
                    # the channel axis, which copies one element at a time.
                    in_idx = open_set(gate_t)[0]
                    height, width = x.shape[1], x.shape[2]
                    select = tf.one_hot(in_idx, conv.in_channels, axis=0, dtype=conv.dtype)
                    select = select * cast(column_gates(gate_t), conv.dtype)
                    x = tf.matmul(tf.reshape(x, (-1, height * width, conv.in_channels)), select)
                    x = tf.reshape(x, map_shape(height, width))
                else:
                    x = x * cast(values[id(gate_t)], conv.dtype)[:, None, None, :]
                values[id(out_t)] = conv(x, conv_weights(conv))
            elif id(node) in self._snapshots:
                result = self._snapshots[id(node)](values[id(single_tensor_input(node))])
                if isinstance(result, dict):
                    keys = keras.tree.flatten({key: key for key in result})
                    for tensor, key in zip(graph.call_outputs(node), keys):
                        values[id(tensor)] = result[key]
                else:
                    values[id(out_t)] = result
            else:
                results = graph.run_node(node, values, training=False)
                for tensor, value in zip(graph.call_outputs(node), results):
                    values[id(tensor)] = value
        return keras.tree.map_structure(lambda t: values[id(t)], self.network.output)

    def outputs(self, images):
        """All of the network's outputs (for a DeepMoE: `"logits"`, `"embedding_logits"`,
        `"gates"`), computed on the skip-channel path.

        Args:
            images: `(batch, height, width, channels)` images, as for the model.

        Returns:
            The network's outputs in its output structure (tensors).
        """
        return self._forward_all(tf.convert_to_tensor(images, dtype=self._input.dtype))

    def kernel_shapes(self, images):
        """The kernel slices the skip path uses for `images` (runs eagerly, for analysis).

        Args:
            images: `(batch, height, width, channels)` images.

        Returns:
            Dict `{convolution name: (kh, kw, active_in, active_out)}` for every
            convolution of the base network; `kh * kw * active_in * active_out` times the
            output positions is its multiply-add count on this path.
        """
        shapes = {}
        self._run(tf.convert_to_tensor(images, dtype=self._input.dtype), shapes)
        return shapes

    @staticmethod
    def _logits(outputs):
        return outputs["logits"] if isinstance(outputs, dict) else outputs

    def __call__(self, images):
        """Logits `(batch, num_classes)` of `images` (a tensor), closed channels skipped."""
        return self._forward(tf.convert_to_tensor(images, dtype=self._input.dtype))


def compile_skip_inference(model, skip_stream_inputs=True):
    """A callable that runs `model` (a DeepMoE) skipping its closed channels.

    Equivalent to `SkipChannelRunner(model, skip_stream_inputs)`; see there.

    Args:
        model: A `DeepMoEModel` or its functional `network`.
        skip_stream_inputs: See `SkipChannelRunner`.

    Returns:
        A `SkipChannelRunner`: `runner(images)` returns the logits.

    Example:

    >>> predict = compile_skip_inference(keras_moe.zoo.deepmoe_resnet56(wide=True))
    >>> logits = predict(image[None])

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 3.2-3.4.
    """
    return SkipChannelRunner(model, skip_stream_inputs=skip_stream_inputs)

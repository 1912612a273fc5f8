"""The call graph of a functional Keras model: the one place that walks it.

A functional model (`keras.Model(inputs, outputs)`, a built `keras.Sequential`, and every
zoo model, `DeepMoEModel` included) is a graph of layer calls. FLOPs counting
(`keras_moe.analysis.flops`), the gate reader (`keras_moe.analysis.gates`), DeepMoE's
embedding shuffling (`keras_moe.analysis.shuffling`) and skip-channel inference
(`keras_moe.inference`) all walk it through these functions:

- `functional(model)`: the graph of a model (raises a `ValueError` that says what to
  build instead for a subclassed model).
- `call_nodes(model)`: its layer calls in topological order, inputs first.
- `producers(nodes)`, `consumers(nodes, outputs)`: who makes and who reads each tensor.
- `call_inputs(node)`, `call_arguments(node)`: a call's input tensors and arguments.
- `run_node(node, values)`: calls a node's operation on computed values (replaying the
  graph on new tensors or on real data).
- `layers(model)`: every layer inside a model, nested ones included.
- `submodel(model, outputs)`: a model from `model`'s inputs to some of its tensors.

Keras's `Node` objects and the graph attributes are not public API; they are read only
here (the private attribute names through `keras_moe.compat`).
"""

import keras

from keras_moe import compat


def functional(model):
    """The functional graph of `model`.

    Args:
        model: A functional model, or a built `keras.Sequential`.

    Returns:
        The functional model holding the graph (`model` itself, or a Sequential's inner one).

    Raises:
        ValueError: `model` has no graph of layer calls (a subclassed model, or an
            unbuilt Sequential).
    """
    if compat.nodes_by_depth(model) is not None:
        return model
    if isinstance(model, keras.Sequential) and compat.sequential_graph(model) is not None:
        return compat.sequential_graph(model)
    raise ValueError(
        f"{getattr(model, 'name', model)!r} ({type(model).__name__}) is not a functional "
        "model (no graph of layer calls); build it with keras.Input and "
        "keras.Model(inputs, outputs), or keras.Sequential with an Input first"
    )


def has_graph(model):
    """Whether `functional(model)` succeeds."""
    try:
        functional(model)
    except ValueError:
        return False
    return True


def call_nodes(model):
    """The layer (and op) calls of a functional model in topological order, inputs excluded."""
    by_depth = compat.nodes_by_depth(functional(model))
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]
            if node.operation is not None and not node.is_input]


def operation(node):
    """The layer (or op) a node calls."""
    return node.operation


def call_inputs(node):
    """The symbolic tensors a node reads, flattened, in argument order."""
    return list(node.input_tensors)


def call_outputs(node):
    """The symbolic tensors a node produces, flattened (dict outputs in sorted-key order)."""
    return list(node.outputs)


def call_arguments(node):
    """`(args, kwargs)` of a node's call, with symbolic tensors in place."""
    return node.arguments.args, node.arguments.kwargs


def producers(nodes):
    """`{id(tensor): node}` for every tensor the nodes produce."""
    return {id(tensor): node for node in nodes for tensor in node.outputs}


def consumers(nodes, outputs=()):
    """`{id(tensor): [(node, position)]}`: who reads each tensor and at which input position.

    Each tensor of `outputs` (a model's outputs) is also read by `(None, 0)`.
    """
    found = {}
    for node in nodes:
        for position, tensor in enumerate(node.input_tensors):
            found.setdefault(id(tensor), []).append((node, position))
    for tensor in keras.tree.flatten(outputs):
        found.setdefault(id(tensor), []).append((None, 0))
    return found


def run_node(node, values, **call_kwargs):
    """Calls `node`'s operation on computed values and returns its flattened outputs.

    Args:
        node: A call node of a functional graph.
        values: `{id(symbolic tensor): value}` holding every input of the node (values may
            be real tensors or symbolic tensors of another graph).
        **call_kwargs: Extra call arguments for a layer (e.g. `training=False`).

    Returns:
        The outputs as a flat list, in the order of `call_outputs(node)`.
    """
    args, kwargs = node.arguments.fill_in(values)
    if call_kwargs and isinstance(node.operation, keras.layers.Layer):
        kwargs = dict(kwargs, **call_kwargs)
    return keras.tree.flatten(node.operation(*args, **kwargs))


def named_outputs(node, structure):
    """A node's outputs in the structure its operation returns (e.g. a gate's dict).

    Args:
        node: A call node.
        structure: A value with the operation's output structure (e.g. `{"probs": 0,
            "logits": 0}`); only its structure is used.
    """
    return keras.tree.pack_sequence_as(structure, list(node.outputs))


def inputs_structure(model):
    """`model.inputs` as the model takes them: one tensor, or the list/dict it was built with."""
    graph = functional(model)
    inputs = graph.input
    return inputs


def submodel(model, outputs, name=None):
    """A functional model from `model`'s inputs to `outputs` (tensors of its graph).

    The new model shares every layer, hence every weight, with `model`.
    """
    return keras.Model(inputs_structure(model), outputs, name=name)


def layers(model, include_self=False):
    """Every layer inside `model`, nested models' layers included, each once."""
    found, seen = [], set()
    for layer in compat.flatten_layers(model, include_self=include_self, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


def first_call(layer):
    """The first call node of `layer` (the one a functional model built it with)."""
    nodes = compat.inbound_nodes(layer)
    if not nodes:
        raise ValueError(f"layer {layer.name!r} has not been called on symbolic inputs")
    return nodes[0]


def producing_layer(tensor):
    """The layer whose call produced a symbolic tensor (None for a model input)."""
    return compat.producing_operation(tensor)

"""The gate reader: where a model's gates are, and their values on data.

Every place that needs a model's gates reads them here: the SavedModel export
(`gates_<layer>` outputs), the training callbacks and the run report (expert shares,
gate density), the FLOPs count, DeepMoE's density controller, and the analysis of a
trained model (activation rates, heatmaps).

Three kinds of gating site are found in a model's functional graph
(`keras_moe.analysis.graph`), in graph order:

- `"moe"`: a `MoEDense` or `ExpertMixture` layer. Its gates are the second output of a
  layer built with `return_gates=True`; otherwise the layer's own gate applied to the
  layer's input (`MoEDense`: the gate of every token, reshaped back to the input's
  leading axes; `ExpertMixture`: `compute_gate_outputs`).
- `"gate"`: a gate layer called in the graph itself (`SoftmaxGate`, `NoisyTopKGate`,
  `ReLUGate`, e.g. DeepMoE's gate heads, `TSNEGate`): its `"gates"` output.
- `"gated_conv"`: a `GatedConv2D` (DeepMoE): the gates it scales its input channels by.

Everything is read from one probe model from the model's inputs to the wanted gate
tensors (shared layers, inference mode: no gate noise), built once per model and kind.
Layers inside a nested sub-model are not reachable from the outer graph and are left
out (`unreachable_moe_layers` names them).

Example:

>>> from keras_moe.analysis import gates
>>> gates.gate_values(model, x_test[:256])          # {"moe_0": (256, 8) array}
>>> gates.gate_statistics(model, x_test[:1024])["moe_0"]["load_cv"]
>>> gates.gate_density(deepmoe_model, x_test[:512], overall=True)
"""

import weakref

import keras
import numpy as np

from keras_moe.analysis import graph as graph_lib
from keras_moe.layers.expert_mixture import ExpertMixture
from keras_moe.layers.gated_conv import GatedConv2D
from keras_moe.layers.gates import NoisyTopKGate, ReLUGate, SoftmaxGate
from keras_moe.layers.moe_dense import MoEDense
from keras_moe.layers.tsne_gate import TSNEGate

KINDS = ("moe", "gate", "gated_conv")
MOE_LAYER_TYPES = (MoEDense, ExpertMixture)
GATE_LAYER_TYPES = (SoftmaxGate, NoisyTopKGate, ReLUGate, TSNEGate)

__all__ = ["KINDS", "densities", "gate_density", "gate_model", "gate_outputs",
           "gate_statistics", "gate_tensors", "gate_values", "gated_convolutions",
           "moe_layers", "unreachable_moe_layers"]


def moe_layers(model):
    """Every `MoEDense` and `ExpertMixture` inside `model` (nested models included)."""
    return [layer for layer in graph_lib.layers(model) if isinstance(layer, MOE_LAYER_TYPES)]


def gated_convolutions(model):
    """The `GatedConv2D` layers of a model's graph, in graph order (DeepMoE's gated layers)."""
    if not graph_lib.has_graph(model):
        return []
    return [graph_lib.operation(n) for n in graph_lib.call_nodes(model)
            if isinstance(graph_lib.operation(n), GatedConv2D)]


def _kind(layer):
    if isinstance(layer, MOE_LAYER_TYPES):
        return "moe"
    if isinstance(layer, GATE_LAYER_TYPES):
        return "gate"
    if isinstance(layer, GatedConv2D):
        return "gated_conv"
    return None


def _moe_outputs(node):
    """`(gates, full gate-output dict)` of a MoE layer's call, as symbolic tensors."""
    layer = graph_lib.operation(node)
    args, _ = graph_lib.call_arguments(node)
    inputs = args[0]
    if isinstance(layer, MoEDense):
        leading = tuple(inputs.shape[1:-1])
        tokens = inputs if not leading else keras.ops.reshape(inputs, (-1, inputs.shape[-1]))
        outputs = dict(layer.gate(tokens))
        gates = outputs["gates"]
        if leading:
            gates = keras.ops.reshape(gates, (-1,) + leading + (layer.num_experts,))
    else:
        outputs = dict(layer.compute_gate_outputs(inputs))
        gates = outputs["gates"]
    if layer.return_gates:
        gates = graph_lib.call_outputs(node)[1]
    return gates, outputs


def _sites(model, kinds):
    """`[(name, kind, gates tensor, full outputs dict or None)]` in graph order."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"gate kinds must be among {KINDS}, got {kind!r}")
    found = []
    for node in graph_lib.call_nodes(model):
        layer = graph_lib.operation(node)
        kind = _kind(layer)
        if kind not in kinds:
            continue
        if kind == "moe":
            gates, outputs = _moe_outputs(node)
        elif kind == "gate":
            args, _ = graph_lib.call_arguments(node)
            outputs = dict(layer(args[0]))  # calling again returns the dict, not a flat list
            gates = outputs["gates"]
        else:
            args, _ = graph_lib.call_arguments(node)
            gates, outputs = args[0][1], None
        found.append((layer.name, kind, gates, outputs))
    return found


def gate_tensors(model, kinds=("moe", "gate")):
    """Symbolic gate tensors of a model's gating sites, by layer name, in graph order.

    Args:
        model: A functional model (every zoo model).
        kinds: Which sites (see the module docstring).

    Returns:
        `{layer name: (batch, ..., experts) symbolic tensor}`.

    Raises:
        ValueError: The model has no graph of layer calls.
    """
    return {name: gates for name, _, gates, _ in _sites(model, kinds)}


def gate_outputs(model, kinds=("moe", "gate")):
    """Like `gate_tensors`, but each site's whole gate-output dict (`"gates"`,
    `"dispatch_mask"`, `"probs"`, ...; a t-SNE gate's `"embedding"`), without the
    per-batch `"load"`. A `GatedConv2D` site gives `{"gates": ...}`."""
    result = {}
    for name, _, gates, outputs in _sites(model, kinds):
        outputs = dict(outputs or {})
        outputs.pop("load", None)
        outputs["gates"] = gates
        result[name] = outputs
    return result


_MODELS = weakref.WeakKeyDictionary()


def gate_model(model, layer=None, *, kinds=("moe", "gate"), outputs="gates"):
    """A model from `model`'s inputs to its gates (shares its layers; built once).

    Args:
        model: A functional model.
        layer: None for every site of `kinds`, or one site's layer name: the model then
            returns that site's gates alone.
        kinds: Which sites (see the module docstring).
        outputs: `"gates"` (the gate values) or `"all"` (each site's gate-output dict).

    Returns:
        A `keras.Model`: `{layer name: gates}` (or dicts), or one site's.

    Raises:
        ValueError: No such site, or no graph.

    Example:

    >>> gates = gate_model(model, "mixture").predict(x)     # (N, experts)
    """
    if outputs not in ("gates", "all"):
        raise ValueError(f"outputs must be 'gates' or 'all', got {outputs!r}")
    key = (tuple(kinds), layer, outputs)
    cache = _MODELS.setdefault(model, {})
    if key not in cache:
        found = gate_outputs(model, kinds) if outputs == "all" else gate_tensors(model, kinds)
        if layer is not None:
            if layer not in found:
                raise ValueError(
                    f"{model.name!r} has no gating layer {layer!r} of kinds {tuple(kinds)}; "
                    f"it has {sorted(found) or 'none'}")
            found = found[layer]
        elif not found:
            raise ValueError(f"{model.name!r} has no gating layer of kinds {tuple(kinds)}")
        cache[key] = graph_lib.submodel(model, found, name=f"{model.name}_gates")
    return cache[key]


def _batches(data, batch_size):
    """Input batches from arrays (or dicts / lists of arrays), `(x, y)` tuples or a dataset."""
    if isinstance(data, tuple) and len(data) in (2, 3):
        data = data[0]
    if hasattr(data, "element_spec"):
        for item in data:
            yield item[0] if isinstance(item, (tuple, list)) else item
        return
    import tensorflow as tf

    arrays = tf.nest.map_structure(np.asarray, data)
    count = len(tf.nest.flatten(arrays)[0])
    for start in range(0, count, batch_size):
        yield tf.nest.map_structure(lambda a: a[start:start + batch_size], arrays)


def gate_values(model, data, *, kinds=("moe", "gate"), outputs="gates", batch_size=256):
    """The gates of `model` on `data`, as numpy, in inference mode.

    Args:
        model: A functional model.
        data: Inputs (an array, or the dict/list the model takes), an `(x, y)` tuple, or
            a `tf.data.Dataset` of inputs or `(x, y)` batches.
        kinds: Which sites (`("gated_conv",)` for DeepMoE's per-convolution gates).
        outputs: `"gates"` or `"all"` (see `gate_model`).
        batch_size: Batch size for arrays.

    Returns:
        `{layer name: array (N, ..., experts)}` (or dicts of arrays).

    Raises:
        ValueError: No gating site of `kinds`, or `data` is empty.
    """
    probe = gate_model(model, kinds=kinds, outputs=outputs)
    parts = []
    for batch in _batches(data, batch_size):
        parts.append(keras.tree.map_structure(keras.ops.convert_to_numpy,
                                              probe(batch, training=False)))
    if not parts:
        raise ValueError("data is empty")
    return keras.tree.map_structure(lambda *xs: np.concatenate(xs), *parts)


def densities(gates):
    """`(per-layer densities, overall density)` of `{name: gate values}`: the fraction of
    open gates (> 0) of each layer and over all channels of all layers."""
    open_ = sum(float((g > 0).sum()) for g in gates.values())
    total = sum(g.size for g in gates.values())
    return {name: float((g > 0).mean()) for name, g in gates.items()}, open_ / total


def gate_density(model, data, overall=False, batch_size=256):
    """Fraction of open gates (> 0) of every gated convolution of a DeepMoE model.

    Args:
        model: A model with `GatedConv2D` layers (`DeepMoEModel`).
        data: Images, `(images, labels)`, or a `tf.data.Dataset` (see `gate_values`).
        overall: One number instead: open gates over all gated channels of all layers.
        batch_size: Batch size for arrays.

    Returns:
        `{GatedConv2D name: density}` (mean over examples and channels), or the overall
        density.

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec. 5.1.1.
    """
    per_layer, total = densities(gate_values(model, data, kinds=("gated_conv",),
                                             batch_size=batch_size))
    return total if overall else per_layer


def unreachable_moe_layers(model):
    """MoE layers of `model` that its own graph does not call (inside nested models)."""
    reachable = set()
    if graph_lib.has_graph(model):
        reachable = {id(graph_lib.operation(n)) for n in graph_lib.call_nodes(model)}
    return [layer for layer in moe_layers(model) if id(layer) not in reachable]


def _statistics(gates, mask):
    """Utilisation statistics of `(tokens, experts)` gates and 0/1 dispatch mask."""
    gates = np.asarray(gates, np.float64).reshape(-1, gates.shape[-1])
    mask = np.asarray(mask, np.float64).reshape(-1, mask.shape[-1])
    counts = mask.sum(axis=0)
    share = counts / max(counts.sum(), 1.0)
    importance = gates.sum(axis=0)

    def cv(v):
        mean = v.mean()
        return float(v.std() / mean) if mean > 0 else 0.0

    safe = np.clip(gates, 1e-12, None)
    mean_gate = gates.mean(axis=0)
    return {
        "gates": gates,
        "counts": counts,
        "share": share,
        "importance": importance,
        "importance_cv": cv(importance),
        "load_cv": cv(counts),
        "gate_entropy": float(np.mean(-np.sum(gates * np.log(safe), axis=-1))),
        "mean_gate_entropy": float(
            -np.sum(mean_gate * np.log(np.clip(mean_gate, 1e-12, None)))
        ),
    }


def gate_statistics(model, probe, batch_size=512):
    """Per MoE layer of `model`, its gates and utilisation on `probe` (inference mode).

    Args:
        model: A functional model with `MoEDense` or `ExpertMixture` layers.
        probe: Inputs of `model` (array, list or dict as the model takes them).
        batch_size: Batch size of the probe pass.

    Returns:
        `{layer name: statistics}` with `"gates"` `(tokens, experts)`, `"counts"`
        (assignments per expert by the gate's dispatch mask; the largest gate for an
        `ExpertMixture`), `"share"` (counts / all assignments), `"importance"` (sum of
        gates), `"importance_cv"` and `"load_cv"` (std / mean, population std, of
        importance and of counts), `"gate_entropy"` (mean entropy of a token's gate, nats)
        and `"mean_gate_entropy"` (entropy of the mean gate). Empty for a model without
        reachable MoE layers.

    Example:

    >>> gate_statistics(model, x_test[:1024])["moe_0"]["load_cv"]
    """
    if not graph_lib.has_graph(model) or not moe_layers(model):
        return {}
    try:
        gate_model(model, kinds=("moe",), outputs="all")
    except ValueError:  # every MoE layer is inside a nested model
        return {}
    values = gate_values(model, probe, kinds=("moe",), outputs="all", batch_size=batch_size)
    return {name: _statistics(v["gates"], v["dispatch_mask"]) for name, v in values.items()}

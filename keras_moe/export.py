"""SavedModel export with a serving signature for TensorFlow Serving and `saved_model_cli`.

`export_saved_model(model, path)` writes a SavedModel whose `"serving_default"`
signature takes a float32 batch of images named `"images"` (batch dimension None) and
returns `"probabilities"`, the softmax of the model's logits (every zoo model outputs
logits). With `return_gates=True` it also returns the gates of every mixture-of-experts
layer, one output `"gates_<layer name>"` per layer. The SavedModel needs neither Keras
nor keras_moe to serve: `tf.saved_model.load(path).signatures["serving_default"]`.

Choices:

- Probabilities, not logits: a serving client wants class probabilities; the softmax
  is taken in float32 over the last axis. A model that already ends in a softmax (e.g.
  `two_domain_moe(output="probabilities")`) is exported with `from_logits=False`, and
  its outputs are served as they are.
- Gates come from the functional graph, not from a changed model: the gate reader
  (`keras_moe.analysis.gates.gate_tensors`, the `"moe"` and `"gate"` sites: every
  `MoEDense` and `ExpertMixture`, and every gate layer called in the graph itself, e.g.
  DeepMoE's gate heads) gives a symbolic tensor of each layer's gates, then one probe
  model from the inputs to the logits and all gates computes each gate once, in the
  same inference pass (`training=False`: no gate noise) as the probabilities.
- Inputs: a model with one input serves it as `"images"`. A model with a dict of
  inputs serves its `"image"` input as `"images"` and every other input under its own
  name and dtype (the oracle `two_domain_moe` takes `"domain"`, int32).
- An existing `path` is never replaced silently: `ValueError` unless `overwrite=True`;
  even then it is replaced only once the new SavedModel is completely written (into
  a temporary directory beside it, then renamed). Missing parent folders are created.
"""

import os
import shutil
import tempfile

import keras

SERVING_SIGNATURE = "serving_default"
IMAGES = "images"
PROBABILITIES = "probabilities"
GATES_PREFIX = "gates_"

__all__ = ["GATES_PREFIX", "IMAGES", "PROBABILITIES", "SERVING_SIGNATURE",
           "export_saved_model", "gate_tensors"]


def _graph_and_logits(model):
    """The functional graph of `model` and the symbolic tensor of its logits."""
    from keras_moe.analysis import graph

    try:
        functional = graph.functional(model)
    except ValueError as error:
        raise ValueError(f"return_gates needs a functional model: {error}") from None
    if len(functional.outputs) != 1:
        raise ValueError(
            f"return_gates needs a model with one output (its logits); {model.name!r} "
            f"has {len(functional.outputs)}.")
    return functional, functional.outputs[0]


def gate_tensors(model):
    """Symbolic gate tensors of every MoE layer of `model`, keyed `"gates_<layer name>"`.

    Args:
        model: A functional Keras model (every zoo model, `DeepMoEModel` included).

    Returns:
        `(graph, logits, gates)`: the functional model read, its logits tensor and a
        dict of gate tensors in layer order (empty for a model without MoE layers).

    Example:

    >>> graph, logits, gates = gate_tensors(keras_moe.zoo.dmoe_mnist())
    >>> sorted(gates)
    ['gates_moe_1', 'gates_moe_2']
    """
    from keras_moe.analysis import gates as gate_reader

    functional, logits = _graph_and_logits(model)
    gates = {GATES_PREFIX + name: tensor
             for name, tensor in gate_reader.gate_tensors(functional).items()}
    return functional, logits, gates


def _input_specs(model):
    """[(signature name, model input name or None, shape, dtype)] of `model`'s inputs."""
    try:
        inputs = model.input
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"export_saved_model needs a model with symbolic inputs (a functional model, "
            f"as every zoo model is); {model.name!r} has none: {error}"
        ) from None
    if isinstance(inputs, dict):
        if "image" not in inputs:
            raise ValueError(
                f"a model with a dict of inputs must have an 'image' input to serve as "
                f"{IMAGES!r}; got inputs {sorted(inputs)}."
            )
        specs = []
        for key, tensor in inputs.items():
            name = IMAGES if key == "image" else key
            dtype = "float32" if key == "image" else tensor.dtype
            specs.append((name, key, tuple(tensor.shape[1:]), dtype))
        return specs
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 1:
            raise ValueError(
                f"export_saved_model serves models with one image input (or a dict with "
                f"'image'); {model.name!r} has {len(inputs)} inputs."
            )
        inputs = inputs[0]
    return [(IMAGES, None, tuple(inputs.shape[1:]), "float32")]


def export_saved_model(model, path, *, return_gates=False, overwrite=False,
                       from_logits=True):
    """Writes `model` as a SavedModel with a `"serving_default"` signature.

    The signature takes `"images"` (float32, shape `(None,) + input_shape`; cast to the
    model input's dtype inside) and returns `"probabilities"` (float32, the softmax of
    the model's logits over the last axis), plus, with `return_gates=True`, one output
    `"gates_<layer name>"` per MoE layer (see the module docstring for which layers).
    Inference mode: no dropout, no gate noise, batch norm with its moving statistics.

    Args:
        model: A built Keras model that outputs logits (every zoo model does).
        path: Directory to write; must not exist unless `overwrite=True`.
        return_gates: Whether the signature also returns every MoE layer's gates.
        overwrite: Whether an existing `path` may be deleted and replaced.
        from_logits: True (default) when the model outputs logits; False when it
            already outputs probabilities, which are then served unchanged.

    Returns:
        `path`, as a string.

    Raises:
        ValueError: `model` is not a built Keras model; `path` exists and `overwrite`
            is False; `return_gates=True` on a model whose graph cannot be read; a model
            without an image input.

    Example:

    >>> model = keras_moe.zoo.sparse_moe_classifier(num_experts=4, units=16)
    >>> export_saved_model(model, "/tmp/moe", return_gates=True)
    >>> serve = tf.saved_model.load("/tmp/moe").signatures["serving_default"]
    >>> serve(images=tf.zeros((2, 28, 28, 1)))["probabilities"].shape
    TensorShape([2, 10])
    """
    import tensorflow as tf

    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model (e.g. keras_moe.zoo.get_model(...) or "
                         f"keras.saving.load_model(...)), got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built; call it on data first")
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise ValueError(
            f"export path {path!r} already exists; pass overwrite=True to replace it."
        )

    if return_gates:
        graph, logits, gates = gate_tensors(model)
        runner = keras.Model(graph.input, {"logits": logits, **gates},
                             name=f"{model.name}_serving")
    else:
        runner, gates = model, {}
    specs = _input_specs(model)

    def serve(*args):
        # keras.ops, not tf: on JAX, Keras's export traces this function with JAX and
        # converts it for TensorFlow (jax2tf), so it must be written in the backend's ops.
        values = args[0] if isinstance(args[0], dict) else {IMAGES: args[0]}
        feed = {}
        for name, key, _, dtype in specs:
            feed[key] = keras.ops.cast(values[name], dtype)
        model_input = feed[None] if None in feed else feed
        result = runner(model_input, training=False)
        logits = result["logits"] if return_gates else result
        logits = keras.ops.cast(logits, "float32")
        outputs = {PROBABILITIES: keras.ops.softmax(logits, axis=-1) if from_logits
                   else logits}
        for name in gates:
            outputs[name] = keras.ops.cast(result[name], "float32")
        return outputs

    tensor_specs = {name: tf.TensorSpec((None,) + shape, dtype, name=name)
                    for name, _, shape, dtype in specs}
    if len(specs) == 1 and specs[0][1] is None:
        signature = [tensor_specs[IMAGES]]
    else:
        signature = [tensor_specs]

    archive = keras.export.ExportArchive()
    archive.track(runner)
    archive.add_endpoint(SERVING_SIGNATURE, serve, input_signature=signature)
    # Written beside `path` first: an export that fails leaves an existing `path` intact.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(path.rstrip(os.sep)) + ".export-",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        archive.write_out(staging, verbose=False)
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return path

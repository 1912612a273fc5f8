"""Every private Keras and keras-tuner name keras-moe relies on, in one place.

Keras 3 has no public API for a few things this package needs: the call graph of a
functional model (FLOPs, skip-channel inference, gate reading, graph replay), a layer's
own loss list (per-replica losses under `MirroredStrategy`), a model's compile
arguments (recompiling with the same optimizer after a trainability change), the
pieces of `fit` that a custom distributed loop has to call, and keras-tuner's hook
that discovers the search space. Each such name is used only through this module, and
`tests/test_compat.py` checks that every one still exists in the installed versions.
`pyproject.toml` pins Keras and keras-tuner to the versions tested
(`KERAS_VERSIONS`, `KERAS_TUNER_VERSIONS`); moving that window means running those
tests against the new versions first.

Example:

>>> from keras_moe import compat
>>> [node.operation.name for node in compat.call_nodes(model)][:2]
['stem_conv', 'stem_bn']
"""

import importlib

KERAS_VERSIONS = ">=3.15,<3.16"
KERAS_TUNER_VERSIONS = ">=1.4.8,<1.5"

# Attribute names (methods or instance attributes) of Keras and keras-tuner objects.
FLATTEN_LAYERS = "_flatten_layers"  # keras.layers.Layer method
OWN_LOSSES = "_get_own_losses"  # keras.layers.Layer method (overridden)
CLEAR_LOSSES = "_clear_losses"  # keras.layers.Layer method (overridden)
CALL_HAS_TRAINING_ARG = "_call_has_training_arg"  # keras.layers.Layer instance attribute
NODES_BY_DEPTH = "_nodes_by_depth"  # Functional instance attribute
SEQUENTIAL_GRAPH = "_functional"  # keras.Sequential instance attribute (once built)
INBOUND_NODES = "_inbound_nodes"  # keras.layers.Layer instance attribute
KERAS_HISTORY = "_keras_history"  # KerasTensor attribute: (operation, node index, tensor index)
COMPILE_CONFIG = "_compile_config"  # keras.Model instance attribute (once compiled)
INITIAL_EPOCH = "_initial_epoch"  # keras.Model attribute a callback may set in on_train_begin
SYMBOLIC_BUILD = "_symbolic_build"  # keras.Model method (Trainer)
COMPUTE_LOSS = "_compute_loss"  # keras.Model method (Trainer)
POPULATE_INITIAL_SPACE = "_populate_initial_space"  # keras_tuner.Tuner method (overridden)
FUNCTIONAL_MODULE = "keras.src.models.functional"  # where the Functional class lives
BACKEND_MODULE = "keras.src.backend"  # in_stateless_scope
JAX_DISTRIBUTION_MODULE = "keras.src.backend.jax.distribution_lib"  # initialize_rng
VARIABLE_VALUE = "_value"  # keras.Variable attribute: the backend array behind `.value`

# What tests/test_compat.py checks: (module, object path inside it, attribute or None).
CLASS_ATTRIBUTES = (
    ("keras", "layers.Layer", FLATTEN_LAYERS),
    ("keras", "layers.Layer", OWN_LOSSES),
    ("keras", "layers.Layer", CLEAR_LOSSES),
    ("keras", "Model", SYMBOLIC_BUILD),
    ("keras", "Model", COMPUTE_LOSS),
    ("keras_tuner", "Tuner", POPULATE_INITIAL_SPACE),
    (FUNCTIONAL_MODULE, "Functional", None),
    (BACKEND_MODULE, "in_stateless_scope", None),
    (JAX_DISTRIBUTION_MODULE, "initialize_rng", None),
)
# Instance attributes, checked on a small compiled functional model and a built Sequential.
LAYER_ATTRIBUTES = (CALL_HAS_TRAINING_ARG, INBOUND_NODES)
MODEL_ATTRIBUTES = (NODES_BY_DEPTH, COMPILE_CONFIG, INITIAL_EPOCH)
SEQUENTIAL_ATTRIBUTES = (SEQUENTIAL_GRAPH,)
TENSOR_ATTRIBUTES = (KERAS_HISTORY,)


def _resolve(module, path):
    value = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    return value


def functional_class():
    """Keras's `Functional` model class (what `keras.Model(inputs, outputs)` returns)."""
    return _resolve(FUNCTIONAL_MODULE, "Functional")


def is_functional(model):
    """Whether `model` is a functional model (a graph of layer calls Keras can replay)."""
    return isinstance(model, functional_class())


def in_stateless_scope():
    """Whether Keras is tracing a stateless call (`StatelessScope`, as JAX training does)."""
    return _resolve(BACKEND_MODULE, "in_stateless_scope")()


def flatten_layers(layer, include_self=True, recursive=True):
    """Every layer inside `layer` (nested ones too with `recursive`), in tracking order."""
    return list(getattr(layer, FLATTEN_LAYERS)(include_self=include_self, recursive=recursive))


def nodes_by_depth(model):
    """`{depth: [Node]}` of a functional model, or None for a model without a graph."""
    return getattr(model, NODES_BY_DEPTH, None)


def sequential_graph(model):
    """The functional graph Keras keeps inside a built `Sequential` (None if unbuilt)."""
    return getattr(model, SEQUENTIAL_GRAPH, None)


def inbound_nodes(layer):
    """The call nodes of `layer` (one per symbolic call)."""
    return list(getattr(layer, INBOUND_NODES, []))


def producing_operation(tensor):
    """The operation whose call produced a symbolic `tensor` (None for an input)."""
    history = getattr(tensor, KERAS_HISTORY, None)
    return None if history is None else history[0]


def initialize_jax_rng():
    """What `keras.distribution.initialize` does after JAX's own initialize: one random
    seed shared by every process (needed where JAX is initialised with other options)."""
    importlib.import_module(JAX_DISTRIBUTION_MODULE).initialize_rng()


def variable_array(variable):
    """The backend array a Keras variable holds (what `variable.value` reads)."""
    return getattr(variable, VARIABLE_VALUE)


def set_variable_array(variable, array):
    """Puts `array` behind `variable.value` without an assignment (no sharding or dtype
    conversion: `expert_parallel.host_readable` shows a host copy to Keras's saving)."""
    setattr(variable, VARIABLE_VALUE, array)


def own_losses(layer):
    """The losses `layer` itself added in its last call (`layer.losses` adds its
    sublayers')."""
    return list(getattr(layer, OWN_LOSSES)())


def compile_arguments(model):
    """The keyword arguments of `model`'s last `compile` call (None if not compiled)."""
    config = getattr(model, COMPILE_CONFIG, None)
    return None if config is None else dict(config.config)


def call_has_training_arg(layer):
    """Whether `layer.call` takes a `training` argument."""
    return bool(getattr(layer, CALL_HAS_TRAINING_ARG))


def compute_loss(model, **kwargs):
    """`model._compute_loss(...)`: `compute_loss` plus Keras's loss-scaling bookkeeping."""
    return getattr(model, COMPUTE_LOSS)(**kwargs)


def symbolic_build(model, data_batch):
    """Builds `model`'s metrics and optimizer from one batch's structure, as `fit` does."""
    return getattr(model, SYMBOLIC_BUILD)(data_batch=data_batch)


def initial_epoch(model):
    """The epoch a callback asked `fit` to start at in `on_train_begin` (None if none)."""
    return getattr(model, INITIAL_EPOCH, None)


def set_initial_epoch(model, epoch):
    """Sets (or with None clears) the epoch `fit` starts at; see `initial_epoch`."""
    setattr(model, INITIAL_EPOCH, epoch)


def override(cls, name, function):
    """Installs `function` as the method `name` of `cls` (a private Keras hook).

    Used for the hooks a subclass must replace under their private names, so that the
    names themselves are written only here.
    """
    function.__name__ = name
    function.__qualname__ = f"{cls.__qualname__}.{name}"
    setattr(cls, name, function)
    return cls


TUNER_CONFIG_MODULE = "keras_tuner.src.config"  # holds DEBUG: print each failed trial's traceback
TUNER_DEBUG = "DEBUG"
CLASS_ATTRIBUTES = CLASS_ATTRIBUTES + ((TUNER_CONFIG_MODULE, TUNER_DEBUG, None),)


class tuner_tracebacks:
    """Context manager: whether keras-tuner prints the traceback of every failed trial
    (its module-level `DEBUG` flag, True by default). The traceback stays in the trial's
    `message` either way."""

    def __init__(self, enabled):
        self.enabled = bool(enabled)

    def __enter__(self):
        module = importlib.import_module(TUNER_CONFIG_MODULE)
        self._before = getattr(module, TUNER_DEBUG)
        setattr(module, TUNER_DEBUG, self.enabled)
        return self

    def __exit__(self, *exc):
        setattr(importlib.import_module(TUNER_CONFIG_MODULE), TUNER_DEBUG, self._before)
        return False

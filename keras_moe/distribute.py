"""`tf.distribute` strategies by name, for `model.fit` on one or many devices.

`get_strategy(name)` returns a strategy under whose `scope()` a zoo model is built and
compiled. Every balancing loss of this package is computed over the *global* batch
(`keras_moe.regularizers.reduction`), so a model trains under any of these strategies as
on one device with the global batch (tests: `tests/test_distribute.py`,
`tests/test_multi_worker.py`).

Names:

- `"default"`: TensorFlow's default strategy (one device, no replication).
- `"mirrored"`: `tf.distribute.MirroredStrategy` over the local GPUs, or the CPU.
- `"multi_worker"`: `tf.distribute.MultiWorkerMirroredStrategy`; the cluster comes from
  the `TF_CONFIG` environment variable (every worker runs the same script with its own
  `task.index`). Create it at program start, before any other TensorFlow op.
  Caveat: Keras 3.15's `model.fit` (and `evaluate`, `predict`) fail under this
  strategy before their first step (two bugs in
  `keras/src/backend/tensorflow/trainer.py`: `_maybe_symbolic_build` passes the
  `(x, y)` tuple of `PerReplica` values to `strategy.reduce`, and `reduce_per_replica`
  reduces scalar logs with `axis=0`). Until Keras fixes them, train with a custom
  loop: `keras_moe.training.custom_loop.fit_distributed(model, dataset, ...)` takes
  the place of `model.fit` (callbacks, validation, exact global loss and accuracy),
  and `keras-moe train --strategy multi_worker` (`train_recipe`) uses it, the chief
  alone writing the run directory. Its step is `strategy.run` of Keras's loss (the
  loss object's value, which divides by the replica count itself, plus
  `model.losses` divided by it, as
  `keras_moe.regularizers.reduction.scale_for_replicas(sum(model.losses))` does in
  `tests/_workers/two_domain_training.py`); two workers then train exactly like one
  device on the global batch (`tests/test_multi_worker.py`,
  `tests/test_multi_worker_cli.py`). It replicates every variable on every worker, so
  experts are never split across machines under it (`MoEDense(expert_devices=...)`
  refuses to build inside a strategy of several replicas); for experts across
  machines use `"expert_parallel"` over several processes (JAX).
- `"expert_parallel"` (JAX): not a `tf.distribute` strategy but Keras's distribution
  API: `expert_parallel(data=D, expert=X)` (see `keras_moe.expert_parallel`, re-exported
  here) splits every MoE layer's experts over the `expert` axis of a `D x X` device mesh
  and the batch over all devices; `get_strategy("expert_parallel", mesh="2x4")` returns
  it (`mesh=None`: one data row, every device on the expert axis). Like a strategy, it
  has a `scope()` to build and train the model in. MoE layers then use capacity
  dispatch and every batch must be full and divisible by the devices
  (`keras-moe train --strategy expert_parallel --mesh 2x4` sees to both). Over several
  processes (machines), call `keras_moe.expert_parallel.initialize(...)` first (or
  `keras-moe train ... --coordinator H:P --num-processes N --process-id I`): the mesh
  then spans every process's devices.
- `"tpu"`: `tf.distribute.TPUStrategy` on the TPU found by
  `TPUClusterResolver(tpu=...)`. TPUs compile with XLA and need static shapes: build
  MoE layers with `MoEDense(..., dispatch="capacity")` (fixed expert capacity; overflow
  is dropped and counted in `layer.dropped_fraction`); the default sparse dispatch has
  data-dependent shapes. Batches must have a fixed size (`drop_remainder=True`).
"""

import re

from keras_moe import validation
from keras_moe.expert_parallel import expert_parallel

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu", "expert_parallel")

__all__ = ["STRATEGIES", "expert_parallel", "get_strategy", "parse_mesh"]


def parse_mesh(mesh):
    """`"DATAxEXPERT"` (e.g. `"2x4"`) -> `(data, expert)`; None -> `(1, None)`.

    Raises:
        ValueError: naming `mesh` and the form it takes.
    """
    if mesh is None:
        return 1, None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(mesh))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(f"mesh must be DATAxEXPERT with two positive integers (e.g. "
                         f"'2x4'); got {mesh!r}.")
    return int(match.group(1)), int(match.group(2))


def get_strategy(name="default", *, devices=None, tpu=None, mesh=None):
    """Returns the `tf.distribute` strategy called `name`.

    Args:
        name: One of `"default"`, `"mirrored"`, `"multi_worker"`, `"tpu"`.
        devices: For `"mirrored"` only: device names to mirror over (None: all local
            GPUs, or the CPU without one).
        tpu: For `"tpu"` only: the TPU's name or address (None: the TPU VM's own TPU,
            or the one `TPU_NAME` names).
        mesh: For `"expert_parallel"` only: `"DATAxEXPERT"` (see `parse_mesh`).

    Returns:
        A `tf.distribute.Strategy` (for `"expert_parallel"`: a
        `keras_moe.expert_parallel.ExpertParallel` distribution).

    Raises:
        ValueError: `name` is not one of the names above (the message lists them), or
            an argument is given to a strategy that does not take it, or `TF_CONFIG`
            is malformed for `"multi_worker"`, or a `tf.distribute` strategy
            (`"mirrored"`, `"multi_worker"`, `"tpu"`) is asked for on another backend
            than TensorFlow.
        RuntimeError: `"tpu"` was asked for but no TPU can be reached (the message
            says why).

    Example:

    >>> strategy = get_strategy("mirrored")
    >>> with strategy.scope():
    ...     model = keras_moe.zoo.sparse_moe_classifier()
    ...     model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    >>> model.fit(dataset)  # each batch is split across the replicas
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; expected one of {', '.join(map(repr, STRATEGIES))}."
        )
    if devices is not None and name != "mirrored":
        raise ValueError(f"devices= is only for the 'mirrored' strategy, not {name!r}.")
    if tpu is not None and name != "tpu":
        raise ValueError(f"tpu= is only for the 'tpu' strategy, not {name!r}.")
    if mesh is not None and name != "expert_parallel":
        raise ValueError(f"mesh= is only for 'expert_parallel', not {name!r}.")
    if name == "expert_parallel":
        data, expert = parse_mesh(mesh)
        return expert_parallel(data=data, expert=expert)
    if name != "default":
        # Keras trains with tf.distribute only on TensorFlow: elsewhere the strategy's
        # scope would be entered and silently ignored (one device, no replication).
        validation.require_tensorflow(
            f"the {name!r} strategy (tf.distribute's)",
            "On JAX, spread a model over devices with 'expert_parallel' (keras.distribution).")
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return _tpu_strategy(tpu)


def _check_tf_config():
    import json
    import os

    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return  # TensorFlow then runs one worker: a valid (if unusual) cluster.
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {raw!r}") from None
    if not isinstance(config, dict) or "cluster" not in config or "task" not in config:
        raise ValueError(
            "TF_CONFIG must be a JSON object with 'cluster' (e.g. {'worker': "
            "['host1:port', 'host2:port']}) and 'task' ({'type': 'worker', 'index': i}); "
            f"got {raw!r}"
        )


def _tpu_strategy(tpu):
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise RuntimeError(
            "no TPU is available: TPUClusterResolver could not find or connect to one "
            f"({type(error).__name__}: {error}). Run on a Cloud TPU VM, or pass tpu= "
            "(or set TPU_NAME) to a reachable TPU; use get_strategy('mirrored') or "
            "'default' elsewhere."
        ) from error
    return tf.distribute.TPUStrategy(resolver)

"""Expert parallelism on Keras's distribution engine (JAX): experts split over devices.

Shazeer et al. (paper 003) shard a MoE layer's experts over devices so that the layer can
hold far more experts than one device, while the gate sees one large batch. With
`expert_parallel(data=D, expert=X)` the devices form a `(data, expert)` mesh and every
model built under the distribution's `scope()`

- splits the stacked weights of its MoE layers (every weight with a leading expert axis,
  created inside `expert_weights()`, which `MoEDense` does for its experts) along the
  `expert` axis, and replicates them along `data`: each device holds `E / X` experts;
- replicates every other weight;
- splits each batch over all `D * X` devices, and routes each device's share of the
  tokens on its own (GShard's groups: capacity dispatch with one token group per
  device), so that the layer's only exchanges are one all-to-all each way that moves
  token rows to the devices of their experts and back (plus, in training, the gradient
  all-reduce of the replicated weights and the global sums of the balancing losses).

The partitioning itself is XLA's SPMD partitioner's: this module only places weights and
annotates the dispatch buffers (`shard_dispatch`); it writes no communication of its own.

Several processes (machines): `initialize(...)` in each (Keras's
`keras.distribution.initialize` with checked settings, gloo CPU collectives and bounded
waits), then the same code as on one: the mesh spans every process's devices, the
expert axis laid across processes first, each process keeps its blocks of every global
batch (`ExpertParallel.distribute_dataset`), and `gathered` / `host_readable` read the
weights that no process holds whole (tests: `tests/test_expert_parallel.py`, two
processes on 127.0.0.1).

Keras's distribution API runs on JAX (its TensorFlow version is a prototype): on other
backends `expert_parallel` raises. TensorFlow users place experts on devices with
`MoEDense(expert_devices=[...])` instead.
"""

import contextlib
import threading

import keras
import numpy as np

from keras_moe import compat

__all__ = [
    "ExpertParallel",
    "expert_parallel",
    "expert_weights",
    "current",
    "shard_dispatch",
    "gathered",
    "host_readable",
    "initialize",
    "process_settings",
]

DATA_AXIS = "data"
EXPERT_AXIS = "expert"

_creating = threading.local()


@contextlib.contextmanager
def expert_weights(num_experts):
    """Marks the weights created inside as stacked along a leading expert axis.

    A layer creates its per-expert weights (shape `(num_experts, ...)`) in this context;
    under an `ExpertParallel` distribution they are then split along the mesh's expert
    axis (and checked for divisibility), elsewhere nothing changes.

    Args:
        num_experts: The size of the leading axis of the weights created inside.
    """
    previous = getattr(_creating, "num_experts", None)
    _creating.num_experts = int(num_experts)
    try:
        yield
    finally:
        _creating.num_experts = previous


def _creating_expert_weights():
    return getattr(_creating, "num_experts", None)


class ExpertParallel(keras.distribution.ModelParallel):
    """Data and expert parallelism over a `(data, expert)` device mesh (JAX).

    A `keras.distribution.ModelParallel` whose variable layouts come from a rule (split
    the weights created inside `expert_weights()` along the expert axis, replicate the
    rest) rather than from a `LayoutMap` of names, so that it applies to any model that
    contains MoE layers. Prefer the factory `expert_parallel(data=..., expert=...)`.

    Args:
        device_mesh: A `keras.distribution.DeviceMesh` with axes `("data", "expert")`.
    """

    def __init__(self, device_mesh):
        if tuple(device_mesh.axis_names) != (DATA_AXIS, EXPERT_AXIS):
            raise ValueError(
                f"device_mesh must have the axes {(DATA_AXIS, EXPERT_AXIS)}, got "
                f"{tuple(device_mesh.axis_names)}"
            )
        # Set before Keras's constructor: in a multi-process run it reads
        # `num_model_replicas` (hence `data` and `expert`) to check the process count.
        self.data, self.expert = (int(n) for n in device_mesh.shape)
        super().__init__(
            layout_map=keras.distribution.LayoutMap(device_mesh), batch_dim_name=DATA_AXIS
        )

    @property
    def num_devices(self):
        return self.data * self.expert

    @property
    def num_model_replicas(self):
        # Every device sees its own slice of the batch.
        return self.num_devices

    def _sharding(self, *axes):
        import jax

        return jax.sharding.NamedSharding(
            self.device_mesh.backend_mesh, jax.sharding.PartitionSpec(*axes)
        )

    def get_data_layout(self, data_shape):
        """The batch axis split over every device (data and expert axes together)."""
        sharding = self._sharding((DATA_AXIS, EXPERT_AXIS), *([None] * (len(data_shape) - 1)))
        return _ShardingLayout(sharding, self.device_mesh)

    def get_variable_layout(self, variable):
        experts = _creating_expert_weights()
        rank = len(variable.shape)
        if experts is None or rank == 0 or variable.shape[0] != experts:
            return keras.distribution.TensorLayout([None] * rank, self.device_mesh)
        if experts % self.expert:
            raise ValueError(
                f"{variable.path}: {experts} experts cannot be split evenly over the "
                f"mesh's expert axis of {self.expert} devices; use a number of experts "
                f"divisible by {self.expert}."
            )
        return keras.distribution.TensorLayout(
            [EXPERT_AXIS] + [None] * (rank - 1), self.device_mesh
        )

    def get_tensor_layout(self, path):
        return None

    def local_batch_blocks(self):
        """Which of the `data * expert` equal blocks of a global batch this process's
        devices hold (ascending): the batch is split over every device in mesh order, so
        with the expert axis laid across processes a process's blocks need not be
        adjacent (mesh 2x4 over two processes: blocks 0, 1, 4, 5 and 2, 3, 6, 7)."""
        import jax

        devices = self.device_mesh.backend_mesh.devices.reshape(-1)
        return [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]

    def distribute_dataset(self, dataset):
        """This process's part of every global batch of a `tf.data.Dataset`.

        One process: the dataset unchanged. Several (after
        `keras.distribution.initialize`): each global batch (its size must divide by
        the mesh's devices) is cut into one block per device, and the process keeps
        the blocks of its own devices, in order, which is the process-local data that
        `jax.make_array_from_process_local_data` (Keras's JAX trainer) expects. Every
        process must read the same global batches (the same dataset, same order).
        Keras's own `distribute_dataset` keeps one contiguous slice per process, which
        is wrong when the expert axis spans processes.
        """
        if not self._is_multi_process or not self.auto_shard_dataset:
            return dataset
        import tensorflow as tf

        if not isinstance(dataset, tf.data.Dataset):
            raise ValueError(
                "under expert_parallel over several processes, the training data must be "
                "a batched tf.data.Dataset that every process reads whole (each keeps its "
                f"part of every batch); got {type(dataset).__name__}."
            )
        blocks = tf.constant(self.local_batch_blocks(), tf.int32)
        devices = self.num_devices

        def local_part(x):
            shape = tf.shape(x)
            tf.debugging.assert_equal(
                shape[0] % devices, 0,
                message=f"a global batch must be divisible by the mesh's {devices} devices",
            )
            split = tf.reshape(x, tf.concat([[devices, shape[0] // devices], shape[1:]], 0))
            part = tf.gather(split, blocks)
            return tf.reshape(part, tf.concat([[-1], shape[1:]], 0))

        def select(*element):
            parts = tf.nest.map_structure(local_part, element)
            return parts if len(parts) > 1 else parts[0]

        return dataset.map(select).prefetch(tf.data.AUTOTUNE)

    def by_group(self, x):
        """A (groups, experts, ...) dispatch buffer: groups over every device."""
        return _constrain(x, self._sharding((DATA_AXIS, EXPERT_AXIS), *([None] * (len(x.shape) - 1))))

    def by_expert(self, x):
        """An (experts, groups, ...) dispatch buffer: experts over `expert`, groups over `data`."""
        return _constrain(
            x, self._sharding(EXPERT_AXIS, DATA_AXIS, *([None] * (len(x.shape) - 2)))
        )

    @property
    def process_id(self):
        """This process's index (0 in a one-process run)."""
        return self._process_id

    @property
    def is_writer(self):
        """Whether this process writes files (run directories, exports): process 0."""
        return self._process_id == 0

    def __repr__(self):
        processes = f", processes={self.num_processes}" if self._is_multi_process else ""
        return f"ExpertParallel(data={self.data}, expert={self.expert}{processes})"


class _ShardingLayout(keras.distribution.TensorLayout):
    """A `TensorLayout` for a given JAX sharding, whose axes may name several mesh axes
    for one dimension (the batch split over data and expert together), which
    `TensorLayout`'s own axis check does not accept."""

    def __init__(self, sharding, device_mesh):
        super().__init__([None] * len(sharding.spec), device_mesh)
        self.sharding = sharding

    @property
    def axes(self):
        return tuple(self.sharding.spec)

    @property
    def backend_layout(self):
        return self.sharding


def _constrain(x, sharding):
    import jax

    return jax.lax.with_sharding_constraint(x, sharding)


def expert_parallel(data=1, expert=None, devices=None, process_axis=EXPERT_AXIS):
    """A distribution that splits experts over `expert` devices and the batch over all.

    Several processes (after `keras.distribution.initialize(...)`, one per machine): the
    mesh spans every process's devices (`keras.distribution.list_devices()` is global),
    each process holds the expert slices of its own devices, and under `fit` each
    process reads only its part of every global batch (`distribute_dataset`).

    Args:
        data: Size of the mesh's data axis, >= 1.
        expert: Size of its expert axis, >= 1; None: every device not on the data axis.
        devices: Device names or JAX devices (default: every device of the default
            platform, `keras.distribution.list_devices()`); `data * expert` of them,
            laid into the mesh in the order given.
        process_axis: With several processes and `devices=None`: the mesh axis along
            which the processes are laid first. `"expert"` (default): the expert axis
            spans processes as far as it can, so that a process holds only its share
            of the experts (mesh 2x4 over two processes: each holds half the experts,
            the all-to-alls cross processes); `"data"`: the data axis spans processes
            first (2x4 over two: each process holds every expert, and only the
            gradient all-reduce crosses processes).

    Returns:
        An `ExpertParallel` distribution; build models under its `scope()`.

    Example:

    ```python
    distribution = keras_moe.distribute.expert_parallel(data=2, expert=4)
    with distribution.scope():
        model = keras_moe.zoo.sparse_moe_classifier(num_experts=64)
        model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=256)
    ```

    Raises:
        ValueError: on a backend other than JAX, or a mesh that does not fit the devices.
    """
    from keras_moe import validation

    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            "expert_parallel needs the JAX backend (Keras's distribution API runs on "
            f"JAX); this is {backend!r}. On TensorFlow, place the experts with "
            "MoEDense(expert_devices=[...])."
        )
    import jax

    data = validation.positive_int("data", data)
    if process_axis not in (DATA_AXIS, EXPERT_AXIS):
        raise ValueError(
            f"process_axis must be {DATA_AXIS!r} or {EXPERT_AXIS!r}; got {process_axis!r}."
        )
    given = devices is not None
    if devices is None:
        devices = keras.distribution.list_devices()
    devices = list(devices)
    if expert is None:
        if len(devices) % data:
            raise ValueError(
                f"data={data} does not divide the {len(devices)} devices; pass `expert`."
            )
        expert = len(devices) // data
    expert = validation.positive_int("expert", expert)
    if data * expert > len(devices):
        raise ValueError(
            f"a mesh of data={data} x expert={expert} needs {data * expert} devices; "
            f"{len(devices)} are available ({devices[:4]}{'...' if len(devices) > 4 else ''})."
        )
    processes = jax.process_count()
    if processes > 1 and not given:
        if data * expert != len(devices):
            raise ValueError(
                f"a mesh of data={data} x expert={expert} ({data * expert} devices) must "
                f"use every device of the {processes} processes: {len(devices)} "
                f"({len(devices) // processes} each); pass a mesh whose data x expert is "
                f"{len(devices)}."
            )
        grid = _process_layout(data, expert, processes, process_axis)
    else:
        grid = np.asarray(devices[: data * expert], dtype=object).reshape(data, expert)
    mesh = keras.distribution.DeviceMesh(
        shape=(data, expert), axis_names=(DATA_AXIS, EXPERT_AXIS), devices=grid
    )
    return ExpertParallel(mesh)


def _process_layout(data, expert, processes, process_axis):
    """The `(data, expert)` grid of every process's devices, each process a rectangle
    of it: `processes = p_data * p_expert`, laid along `process_axis` first."""
    import math

    import jax

    if process_axis == EXPERT_AXIS:
        p_expert = math.gcd(processes, expert)
        p_data = processes // p_expert
    else:
        p_data = math.gcd(processes, data)
        p_expert = processes // p_data
    if data % p_data or expert % p_expert:
        raise ValueError(
            f"the {processes} processes cannot each hold a rectangle of the mesh "
            f"data={data} x expert={expert}; use a mesh whose data x expert sizes divide "
            f"into {processes} equal parts (e.g. data=1, expert={data * expert})."
        )
    local_data, local_expert = data // p_data, expert // p_expert
    by_process = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    grid = np.empty((data, expert), dtype=object)
    for index, process in enumerate(sorted(by_process)):
        own = sorted(by_process[process], key=lambda d: d.id)
        row, column = divmod(index, p_expert)
        grid[row * local_data:(row + 1) * local_data,
             column * local_expert:(column + 1) * local_expert] = np.asarray(
                 own, dtype=object).reshape(local_data, local_expert)
    return grid


def gathered(values):
    """Full host copies (NumPy) of arrays or variables that may span processes.

    Under `ExpertParallel` over several processes an expert weight is split over
    devices that no one process can read. Every process must call this together (it
    compiles one replicating program, XLA's all-gather); each gets the full arrays.
    Fully addressable values are copied directly.
    """
    import jax

    arrays = [getattr(v, "value", v) for v in values]
    split = [i for i, a in enumerate(arrays)
             if isinstance(a, jax.Array) and not a.is_fully_addressable
             and not a.is_fully_replicated]
    result = [None if i in split else np.asarray(a) for i, a in enumerate(arrays)]
    if split:
        from jax.experimental import multihost_utils

        # For a global array process_allgather replicates it (it would instead stack
        # the processes' copies of a process-local one, hence only the split arrays).
        full = multihost_utils.process_allgather([arrays[i] for i in split], tiled=True)
        for i, array in zip(split, full):
            result[i] = np.asarray(array)
    return result


def current():
    """The active `ExpertParallel` distribution, or None."""
    if keras.backend.backend() != "jax":
        return None
    distribution = keras.distribution.distribution()
    return distribution if isinstance(distribution, ExpertParallel) else None


def shard_dispatch():
    """What capacity dispatch needs from the active distribution: `(groups, shard)`.

    One token group per device and the distribution (for `by_group` / `by_expert`)
    under `ExpertParallel`; `(1, None)` otherwise.
    """
    distribution = current()
    if distribution is None:
        return 1, None
    return distribution.num_devices, distribution


@contextlib.contextmanager
def host_readable(model):
    """Inside, every variable of `model` (its optimizer's too) reads as a full NumPy
    array, so that `model.save` / `save_weights` write the gathered weights, in the
    layout of a one-process run, even where the arrays span processes.

    Every process must enter it together: the weights that no process holds whole
    (expert weights split over processes) are gathered with one collective
    (`gathered`). Nothing changes outside it or in a one-process run.
    """
    import jax

    if jax.process_count() == 1:
        yield
        return
    variables, seen = [], set()
    optimizer = getattr(model, "optimizer", None)
    for v in list(model.variables) + list(getattr(optimizer, "variables", None) or []):
        if id(v) not in seen:
            seen.add(id(v))
            variables.append(v)
    split = [v for v in variables
             if isinstance(v.value, jax.Array) and not v.value.is_fully_addressable
             and not v.value.is_fully_replicated]
    if not split:
        yield
        return
    originals = [compat.variable_array(v) for v in split]
    # Keras's saving reads `variable.value` and converts it with NumPy: a host copy read
    # in place of the split array is what it writes. (Private, but only for the read.)
    for v, full in zip(split, gathered(split)):
        compat.set_variable_array(v, full)
    try:
        yield
    finally:
        for v, original in zip(split, originals):
            compat.set_variable_array(v, original)


ADDRESSES_ENV = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES_ENV = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_DISTRIBUTION_PROCESS_ID"


def process_settings(job_addresses=None, num_processes=None, process_id=None, *,
                     names=("job_addresses", "num_processes", "process_id")):
    """`(coordinator, num_processes, process_id)` from the arguments, else Keras's own
    environment variables (`KERAS_DISTRIBUTION_JOB_ADDRESSES`, `..._NUM_PROCESSES`,
    `..._PROCESS_ID`), checked; `(None, 1, 0)` when neither names more than one process.

    `names`: what to call the three arguments in errors (the command line's flags).

    Raises:
        ValueError: naming the argument (or variable) that is missing or out of range.
    """
    import os

    def named(value, env, flag):
        if value is not None:
            return value, flag
        if os.environ.get(env, "").strip():
            return os.environ[env].strip(), env
        return None, flag

    addresses, addresses_from = named(job_addresses, ADDRESSES_ENV, names[0])
    count, count_from = named(num_processes, NUM_PROCESSES_ENV, names[1])
    index, index_from = named(process_id, PROCESS_ID_ENV, names[2])
    listed = [a.strip() for a in str(addresses).split(",")] if addresses else []

    def whole(value, where, minimum):
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or str(value).strip() != str(number) or number < minimum:
            raise ValueError(f"{where} must be an integer >= {minimum}; got {value!r}.")
        return number

    count = whole(count, count_from, 1) if count is not None else (len(listed) or 1)
    if count == 1 and index is None:
        return None, 1, 0
    if not listed or not all(listed):
        raise ValueError(
            f"{count_from}={count}: {count} processes need the coordinator's address "
            f"({names[0]}, or {ADDRESSES_ENV}), host:port of process 0, e.g. "
            "'10.0.0.1:1234'; none was given.")
    if len(listed) > 1 and len(listed) != count:
        raise ValueError(
            f"{addresses_from} lists {len(listed)} addresses but {count_from} is {count}; "
            "give one address per process (the first is the coordinator) or only the "
            "coordinator's.")
    if index is None:
        raise ValueError(
            f"{count_from}={count}: each process needs its {names[2]} (or "
            f"{PROCESS_ID_ENV}), 0 to {count - 1}; none was given.")
    index = whole(index, index_from, 0)
    if index >= count:
        raise ValueError(
            f"{index_from}={index} is out of range for {count} processes: 0 to "
            f"{count - 1}.")
    return listed[0], count, index


def initialize(job_addresses=None, num_processes=None, process_id=None, *, timeout=60,
               names=("job_addresses", "num_processes", "process_id")):
    """`keras.distribution.initialize` with what a run over several processes needs.

    Starts JAX's multi-controller runtime (one call per process, before any JAX
    computation): the coordinator, count and id as `process_settings` reads and checks
    them; on CPU, JAX's gloo collectives (without them cross-process collectives fail
    on CPU); and bounded waits: a process that does not arrive within `timeout`
    seconds, or stops answering the coordinator's heartbeats for `timeout` seconds,
    ends the others with an error instead of leaving them waiting (JAX's defaults are
    300 and 100 s). Then the processes agree on one random seed, as Keras's does.

    Returns:
        `(num_processes, process_id)`; `(1, 0)` (and nothing started) for one process.

    Raises:
        ValueError: see `process_settings`; or not the JAX backend.
    """
    coordinator, count, index = process_settings(job_addresses, num_processes, process_id,
                                                 names=names)
    if count == 1:
        return 1, 0
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"{names[1]}={count}: expert parallelism over several processes needs the "
            f"JAX backend (Keras's distribution API); this is {backend!r}. TensorFlow's "
            "multi-worker strategy replicates every variable on every worker, so experts "
            "cannot be split across machines there.")
    import jax

    # Only the CPU client's collectives: harmless where the devices are GPUs or TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = int(timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=count, process_id=index,
        initialization_timeout=timeout, heartbeat_timeout_seconds=timeout)
    # What keras.distribution.initialize does after JAX's own initialize (which it calls
    # without these timeouts): one random seed for every process.
    compat.initialize_jax_rng()
    return count, index

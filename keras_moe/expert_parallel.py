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

Keras's distribution API runs on JAX (its TensorFlow version is a prototype): on other
backends `expert_parallel` raises. TensorFlow users place experts on devices with
`MoEDense(expert_devices=[...])` instead.
"""

import contextlib
import threading

import keras
import numpy as np

__all__ = [
    "ExpertParallel",
    "expert_parallel",
    "expert_weights",
    "current",
    "shard_dispatch",
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
        super().__init__(
            layout_map=keras.distribution.LayoutMap(device_mesh), batch_dim_name=DATA_AXIS
        )
        self.data, self.expert = (int(n) for n in device_mesh.shape)

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

    def distribute_dataset(self, dataset):
        return dataset

    def by_group(self, x):
        """A (groups, experts, ...) dispatch buffer: groups over every device."""
        return _constrain(x, self._sharding((DATA_AXIS, EXPERT_AXIS), *([None] * (len(x.shape) - 1))))

    def by_expert(self, x):
        """An (experts, groups, ...) dispatch buffer: experts over `expert`, groups over `data`."""
        return _constrain(
            x, self._sharding(EXPERT_AXIS, DATA_AXIS, *([None] * (len(x.shape) - 2)))
        )

    def __repr__(self):
        return f"ExpertParallel(data={self.data}, expert={self.expert})"


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


def expert_parallel(data=1, expert=None, devices=None):
    """A distribution that splits experts over `expert` devices and the batch over all.

    Args:
        data: Size of the mesh's data axis, >= 1.
        expert: Size of its expert axis, >= 1; None: every device not on the data axis.
        devices: Device names or JAX devices (default: every device of the default
            platform, `keras.distribution.list_devices()`); `data * expert` of them.

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
    data = validation.positive_int("data", data)
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
    mesh = keras.distribution.DeviceMesh(
        shape=(data, expert),
        axis_names=(DATA_AXIS, EXPERT_AXIS),
        devices=np.asarray(devices[: data * expert], dtype=object).reshape(data, expert),
    )
    return ExpertParallel(mesh)


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

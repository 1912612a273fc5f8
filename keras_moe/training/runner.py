"""Runs a recipe: data, model, phases, checkpoints, logs, report and export in a run directory.

`train_recipe(recipe, run_dir)` is what `keras-moe train` does. A run directory holds:

```
recipe.toml         the recipe as run (with every --set and flag applied)
command.txt         the command line that started it (and each resume)
logs/               TensorBoard: train/ and validation/ losses and metrics, moe/ expert
                    utilisation (MoE layers), gate density (DeepMoE)
history.jsonl       one line per finished epoch: phase, epoch, logs
backup/<phase>/     keras.callbacks.BackupAndRestore, saved at every epoch's end
checkpoints/<phase>.keras   the model (with optimizer state) after each finished phase
model.keras         the trained model
report.txt, report.json, report.png   the final report (see keras_moe.analysis.report)
saved_model/        the serving SavedModel (keras-moe export, or train's default)
```

Choices:

- Never silently overwritten: a directory that already holds a run is refused; an
  unfinished one is continued only with `resume=True` (and then with its own
  `recipe.toml`), a finished one never.
- Resuming: inside a phase, `BackupAndRestore` (`save_freq="epoch"`: Keras 3.15 ignores
  the batch it saves, so an interrupted epoch is redone from its start); between phases,
  the model saved after the last finished phase. With fixed seeds and
  `tf.config.experimental.enable_op_determinism()` a resumed run ends with the weights
  of an uninterrupted one (tested with SIGKILL).
- Validation data is the test split (or its first `test_size` examples), evaluated after
  every epoch. It is never used to select a model or stop early: the paper results
  these recipes reproduce are test errors after a fixed schedule.
- Phase settings (`freeze_gating`, `gate_l1`, `embedding_loss_weight`,
  `assignment_constraint`) apply from their phase on; a change of trainability or loss
  coefficient recompiles the model with the same optimizer instance, so its state and
  its iteration count (the learning-rate schedule) carry on, as in
  `train_deepmoe_two_phase` and `train_eigen_two_phase`.
- Multi-worker (`strategy` a `tf.distribute.MultiWorkerMirroredStrategy`; every worker
  runs the same command with its own `TF_CONFIG`): training runs
  `keras_moe.training.custom_loop.fit_distributed` instead of `model.fit` (which fails
  under that strategy in Keras 3.15). Only the chief (the `"chief"` task, else worker 0)
  writes into `run_dir` and checks it (`prepare_run_dir`). Every other worker never
  touches it: it runs the same callbacks into a temporary run directory of its own
  (backups, logs, history, checkpoints, `model.keras`), deleted when `train_recipe`
  returns; its `TrainResult.chief` is False (`keras-moe train` then writes no report).
  With `resume`, a non-chief worker first checks the chief's run and copies its
  `recipe.toml`, `backup/` and `checkpoints/` (so every worker restores the same
  state: `run_dir` must then be on a file system all workers see). The model returned
  is `model.keras` loaded outside the strategy, since Keras's `evaluate`/`predict`
  fail under it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time

import keras
import numpy as np

from keras_moe import recipes as _recipes
from keras_moe.recipes import RecipeError

__all__ = [
    "RecipeData",
    "RunDirectoryError",
    "apply_phase",
    "build_datasets",
    "build_model",
    "class_names",
    "make_optimizer",
    "TrainResult",
    "train_recipe",
]

_CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
    "jittered_mnist": [str(d) for d in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"],
}


class RunDirectoryError(ValueError):
    """A run directory that may not be written: the message says why and what to do."""


def class_names(dataset, num_classes, source=""):
    """Human-readable class names of `dataset` (`"class <k>"` where none are known).

    `source` is the data's description: an offline stand-in drawn from Fashion-MNIST
    (jittered MNIST without MNIST files) gets Fashion-MNIST's names.
    """
    if "stand-in" in source and "fashion_mnist" in source and dataset == "jittered_mnist":
        dataset = "fashion_mnist"
    names = _CLASS_NAMES.get(dataset)
    if names and len(names) == num_classes:
        return list(names)
    return [f"class {k}" for k in range(num_classes)]


_STREAMED = ("imagenet2012", "cityscapes")


@dataclasses.dataclass
class RecipeData:
    """The data of a run, as `build_datasets` returns it.

    `train_epochs(start, end)` is the training data of epochs `start` to `end - 1`, one
    epoch after the other (fit it with `steps_per_epoch=data.steps_per_epoch`). For the
    in-memory sets, epoch `e`'s order and augmentation are drawn from `(seed, e)` alone,
    so a run resumed at epoch `e` sees exactly the batches an uninterrupted run sees
    there. ImageNet and Cityscapes stream through `keras_moe.data.load`, whose shuffle
    and augmentation restart with a resumed run.
    """

    test: object
    input_shape: tuple
    num_classes: int
    source: str
    train_examples: int
    test_examples: int
    steps_per_epoch: int
    probe: object
    probe_labels: np.ndarray
    epoch_dataset: object = None
    ordered_train: object = None

    def train_inputs(self, limit=None):
        """The first `limit` training inputs (all with None) as the model sees them, in
        order and without augmentation, as numpy (a dict with extras)."""
        import tensorflow as tf

        if self.ordered_train is None:
            raise ValueError("training inputs of a streamed data set are not kept in memory")
        count = self.train_examples if limit is None else min(limit, self.train_examples)
        batch = next(iter(self.ordered_train.take(count).batch(count)))[0]
        return tf.nest.map_structure(lambda t: t.numpy(), batch)

    def train_epochs(self, start, end):
        import tensorflow as tf

        return (tf.data.Dataset.range(start, end).flat_map(self.epoch_dataset)
                .prefetch(tf.data.AUTOTUNE))


def _count(ds):
    """Examples in an unbatched dataset: its cardinality when known (no pass over it)."""
    count = int(ds.cardinality().numpy())
    if count < 0:
        count = int(ds.reduce(0, lambda n, _: n + 1).numpy())
    return count


def _in_memory(ds):
    """An unbatched `(features, label)` dataset as numpy arrays (features may be a dict)."""
    import tensorflow as tf

    features, labels = next(iter(ds.batch(max(_count(ds), 1))))
    features = tf.nest.map_structure(lambda t: t.numpy(), features)
    return features, labels.numpy()


def _image_transform(spec, mode, mean_std):
    """uint8 image (or batch) -> normalised, zero-padded to `pad_to`, tiled to `channels`."""
    import tensorflow as tf

    from keras_moe.data import pipelines

    def transform(image):
        if mode == "standard":
            image = pipelines.normalize(image, *mean_std)
        elif mode == "unit":
            image = pipelines.normalize(image)
        if spec.pad_to:
            height, width = int(image.shape[-3]), int(image.shape[-2])
            if spec.pad_to < max(height, width):
                raise RecipeError(
                    f"[data].pad_to must be 0 or >= the images' {height}x{width}, got "
                    f"{spec.pad_to}")
            top, left = (spec.pad_to - height) // 2, (spec.pad_to - width) // 2
            leading = [[0, 0]] * (len(image.shape) - 3)  # one image or a batch
            image = tf.pad(image, leading + [[top, spec.pad_to - height - top],
                                             [left, spec.pad_to - width - left], [0, 0]])
        if spec.channels and int(image.shape[-1]) != spec.channels:
            if int(image.shape[-1]) != 1:
                raise RecipeError(
                    f"[data].channels: only 1-channel images can be tiled, these have "
                    f"{int(image.shape[-1])}")
            image = tf.tile(image, [1] * (len(image.shape) - 1) + [spec.channels])
        return image

    return transform


def _on_image(function, features, *args):
    if isinstance(features, dict):
        return dict(features, image=function(features["image"], *args))
    return function(features, *args)


def build_datasets(recipe, *, data_dir=None, seed=0, probe_size=1024, drop_remainder=False):
    """The data of `recipe`: training epochs, batched test data, and what they hold.

    Training examples are the first `train_size` of the training split (all with 0),
    reshuffled each epoch from `(seed, epoch)` and, when `[data].augment` is true (or
    "auto" for CIFAR), given CIFAR's pad-4 crop and flip drawn from
    `(seed, epoch, example)`. Test examples are the first `test_size` of the test split,
    in order. Images are normalised (`[data].normalize`), zero-padded and
    channel-tiled as `[data]` says.

    `drop_remainder=True` drops each epoch's last partial training batch (static
    shapes, for TPUs).

    Returns:
        A `RecipeData`; `probe` is the first `probe_size` test inputs as numpy (a dict
        with extras), for the utilisation and gate statistics.

    Raises:
        keras_moe.data.DataNotFoundError: The data set is not on this machine (the
            message lists where it looked and how to get it).
    """
    import tensorflow as tf

    from keras_moe import data as kdata
    from keras_moe.data import pipelines

    spec = recipe.data
    if spec.augment == "auto":
        augment = spec.dataset in ("cifar10", "cifar100")
    else:
        augment = bool(spec.augment)
    mode = spec.normalize
    if mode == "auto":
        mode = "standard" if spec.dataset in ("cifar10", "cifar100") + _STREAMED else "unit"

    def raw(split, size, **options):
        ds, info = kdata.load(spec.dataset, split, batch_size=None, data_dir=data_dir,
                              seed=seed, with_extras=spec.with_extras, with_info=True,
                              **options)
        return (ds.take(size) if size else ds), info

    if spec.dataset in _STREAMED:
        train, info = raw("train", spec.train_size, shuffle=True, augment=augment,
                          normalize=mode)
        test, _ = raw("test", spec.test_size, shuffle=False, augment=False, normalize=mode)
        shape = _image_transform(spec, "none", None)
        train = train.map(lambda f, y: (_on_image(shape, f), y))
        test = test.map(lambda f, y: (_on_image(shape, f), y))
        n_train = info["num_examples"] if not spec.train_size else spec.train_size
        n_test = _count(test)
        batched = train.batch(spec.batch_size, drop_remainder=drop_remainder)

        def epoch_dataset(e):
            return batched

        ordered_train = None
    else:
        train, info = raw("train", spec.train_size, shuffle=False, augment=False,
                          normalize="none")
        x_train, y_train = _in_memory(train)
        test, _ = raw("test", spec.test_size, shuffle=False, augment=False, normalize="none")
        images = x_train["image"] if isinstance(x_train, dict) else x_train
        mean_std = pipelines.MEAN_STD.get(spec.dataset) or pipelines.channel_stats(images)
        transform = _image_transform(spec, mode, mean_std)
        test = test.map(lambda f, y: (_on_image(transform, f), y))
        n_train, n_test = len(y_train), _count(test)
        features = tf.nest.map_structure(tf.constant, x_train)
        labels = tf.constant(y_train)
        base_seed = tf.constant(seed, tf.int64)

        def augment_each(images, indices, e):
            # Per example, from (seed, epoch, example index) alone: resumable.
            return tf.map_fn(
                lambda pair: pipelines.cifar_augment(
                    pair[0], tf.stack([base_seed * 1000003 + e, pair[1]])),
                (images, indices), fn_output_signature=images.dtype)

        def examples(indices, e=None):
            """The examples at `indices` (a batch: gathered and transformed at once)."""
            picked = tf.nest.map_structure(lambda t: tf.gather(t, indices), features)
            picked = _on_image(transform, picked)
            if augment and e is not None:
                picked = _on_image(augment_each, picked, indices, e)
            return picked, tf.gather(labels, indices)

        def epoch_dataset(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n_train, dtype=tf.int64), seed=tf.stack([base_seed, e]))
            return (tf.data.Dataset.from_tensor_slices(order)
                    .batch(spec.batch_size, drop_remainder=drop_remainder)
                    .map(lambda batch: examples(batch, e), num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True))

        ordered_train = tf.data.Dataset.range(n_train).batch(1024).map(examples).unbatch()

    features_spec = test.element_spec[0]
    image_spec = features_spec["image"] if isinstance(features_spec, dict) else features_spec
    probe_batch = next(iter(test.batch(probe_size)))
    probe = tf.nest.map_structure(lambda t: t.numpy(), probe_batch[0])
    return RecipeData(
        test=test.batch(max(spec.batch_size, 256)).cache().prefetch(tf.data.AUTOTUNE),
        input_shape=tuple(int(d) for d in image_spec.shape),
        num_classes=int(info["num_classes"]), source=info["source"],
        train_examples=int(n_train), test_examples=n_test,
        steps_per_epoch=(n_train // spec.batch_size if drop_remainder
                         else _recipes.steps_per_epoch(n_train, spec.batch_size)),
        probe=probe, probe_labels=probe_batch[1].numpy(), epoch_dataset=epoch_dataset,
        ordered_train=ordered_train,
    )


def build_model(recipe, data=None):
    """Builds the recipe's zoo model; `input_shape`/`num_classes` come from `data` if unset.

    A DeepMoE model whose recipe steers lambda to a density (`gate_density_target` in a
    phase) gets its gate heads spread (`keras_moe.training.deepmoe.spread_gate_heads`:
    W_g ~ U(0, 2)), without which every gate of a layer closes at the same step.

    Raises:
        RecipeError: The recipe sets an `input_shape` or `num_classes` that the data
            contradicts, or the builder rejects an argument (its message is kept).
    """
    import inspect

    builder = _recipes.check_model_args(recipe.model, where=recipe.source)
    kwargs = recipe.model.builder_kwargs()
    accepted = inspect.signature(builder).parameters
    if data is not None:
        for key, value in (("input_shape", data.input_shape), ("num_classes", data.num_classes)):
            if key not in accepted:
                continue
            if key not in kwargs:
                kwargs[key] = value
            elif (tuple(kwargs[key]) if key == "input_shape" else kwargs[key]) != value:
                raise RecipeError(
                    f"{recipe.source} [model].{key} is {kwargs[key]!r} but the data "
                    f"({recipe.data.dataset}, as shaped by [data]) gives {value!r}; remove "
                    f"the key to take it from the data"
                )
    if "input_shape" in kwargs:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{recipe.source} [model] {recipe.model.name}: {error}") from error
    if _is_deepmoe(model) and any(p.gate_density_target is not None for p in recipe.phases):
        # The density controller needs gates that close one by one, not all together.
        from keras_moe.training.deepmoe import spread_gate_heads

        spread_gate_heads(model)
    return model


def for_tpu(recipe):
    """`recipe` made fit for `TPUStrategy`: XLA needs static shapes, so MoE layers use
    capacity dispatch (`dispatch = "capacity"` for builders that take `dispatch` and do
    not set it) and every batch is full (`build_datasets(..., drop_remainder=True)`)."""
    import inspect

    from keras_moe import zoo

    builder = zoo.get_builder(recipe.model.name)
    if "dispatch" in inspect.signature(builder).parameters and recipe.model.args.get(
            "dispatch") is None:
        recipe = recipe.override(['model.dispatch="capacity"'])
    return recipe


def make_optimizer(recipe, steps_per_epoch):
    """The recipe's optimizer, with its learning-rate schedule in optimizer steps."""
    spec, schedule = recipe.optimizer, recipe.schedule
    learning_rate = spec.learning_rate
    total_steps = recipe.total_epochs * steps_per_epoch
    if schedule.name == "step":
        boundaries = [b * steps_per_epoch for b in schedule.boundaries]
        values = [spec.learning_rate * schedule.factor ** i for i in range(len(boundaries) + 1)]
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    elif schedule.name == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(spec.learning_rate,
                                                               max(total_steps, 1))
    common = {"learning_rate": learning_rate}
    if spec.clipnorm:
        common["clipnorm"] = spec.clipnorm
    if spec.weight_decay:
        common["weight_decay"] = spec.weight_decay
    if spec.name == "sgd":
        return keras.optimizers.SGD(momentum=spec.momentum, nesterov=spec.nesterov, **common)
    if spec.name == "rmsprop":
        return keras.optimizers.RMSprop(momentum=spec.momentum, **common)
    if spec.name == "adamw":
        common.setdefault("weight_decay", 0.0)
        return keras.optimizers.AdamW(**common)
    return keras.optimizers.Adam(**common)


def compile_model(model, recipe, steps_per_epoch):
    """Compiles with the recipe's optimizer, sparse cross-entropy on logits and accuracy."""
    model.compile(
        optimizer=make_optimizer(recipe, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _is_deepmoe(model):
    from keras_moe.zoo.deepmoe import DeepMoEModel

    return isinstance(model, DeepMoEModel)


def fit_tsne_map(model, data, epochs, *, batch_size=500, num_examples=10000, seed=0):
    """The t-SNE-gated MoE's first step (paper 000): fits the model's t-SNE map on
    the training inputs, places the experts at k-means centres of the mapped points
    and sets the gate's temperature to the mean squared nearest-neighbour distance
    between experts (`keras_moe.layers.tsne_gate.nearest_neighbour_sq_distance`).

    Uses the first `num_examples` training inputs (the map's pairwise affinities are
    computed per batch of `batch_size`). The map keeps its trainability (frozen for
    `map_training="frozen"`, the paper's procedure).
    """
    from keras_moe.layers.tsne_gate import fit_parametric_tsne, nearest_neighbour_sq_distance

    from keras_moe.layers.tsne_gate import TSNEGate

    gate = next((layer for layer in model.layers if isinstance(layer, TSNEGate)), None)
    if gate is None or gate.mapping is None:
        raise RecipeError(
            f"tsne_map_epochs applies to t-SNE-gated models (a TSNEGate with a map); "
            f"{model.name!r} has none")
    tsne_map = gate.mapping
    features = keras.Model(model.inputs, gate.input).predict(
        data.train_inputs(num_examples), batch_size=1000, verbose=0)
    trainable = tsne_map.trainable
    fit_parametric_tsne(tsne_map, features, batch_size=min(batch_size, len(features)),
                        epochs=epochs, seed=seed, verbose=0)
    tsne_map.trainable = trainable
    points = keras.ops.convert_to_numpy(tsne_map(features))
    positions = gate.init_positions(points, method="kmeans", seed=seed)
    gate.temperature = float(nearest_neighbour_sq_distance(np.asarray(positions)))
    return points


def apply_phase(model, phase, *, starting=True, data=None):
    """Applies `phase`'s settings to `model`; recompiles if trainability or a loss changed.

    Args:
        model: The compiled model.
        phase: A `keras_moe.recipes.Phase`.
        starting: False when the phase is resumed from a backup (Eigen's running
            totals are then restored, not reset).

    Raises:
        RecipeError: A DeepMoE setting on a model that is not a `DeepMoEModel`, or an
            assignment constraint on a model without a constrained `MoEDense`.
    """
    from keras_moe.training import deepmoe as _deepmoe
    from keras_moe.training import phases as _phases

    deepmoe_keys = ("freeze_gating", "gate_l1", "embedding_loss_weight", "gate_density_target")
    used = [k for k in deepmoe_keys if getattr(phase, k) is not None]
    if used and not _is_deepmoe(model):
        raise RecipeError(
            f"phase {phase.name!r}: {', '.join(used)} apply to DeepMoE models only, and "
            f"{model.name!r} is not one"
        )
    recompile = False
    if phase.freeze_gating is not None:
        _deepmoe.set_gating_trainable(model, not phase.freeze_gating)
        recompile = True
    for key in ("gate_l1", "embedding_loss_weight"):
        value = getattr(phase, key)
        if value is not None and value != getattr(model, key):
            setattr(model, key, value)
            recompile = True
    if phase.assignment_constraint is not None:
        if not _phases.constrained_moe_layers(model):
            raise RecipeError(
                f"phase {phase.name!r}: assignment_constraint needs a MoEDense with "
                f"assignment_margin, and {model.name!r} has none"
            )
        if phase.assignment_constraint and starting:
            _phases.reset_assignment_totals(model)
        _phases.set_assignment_constraints(model, phase.assignment_constraint)
    if phase.tsne_map_epochs and starting:
        if data is None:
            raise RecipeError(f"phase {phase.name!r}: tsne_map_epochs needs the data")
        fit_tsne_map(model, data, phase.tsne_map_epochs)
        recompile = True
    if recompile:
        _deepmoe.recompile(model)
    return model


class _HistoryWriter(keras.callbacks.Callback):
    """Appends every finished epoch's logs to `history.jsonl` (survives resumes)."""

    def __init__(self, path, phase):
        super().__init__()
        self.path, self.phase = path, phase

    def on_epoch_end(self, epoch, logs=None):
        row = {"phase": self.phase, "epoch": int(epoch)}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class _GateDensityLogger(keras.callbacks.Callback):
    """Logs a DeepMoE model's gate density (overall and per gated conv) to TensorBoard."""

    def __init__(self, log_dir, probe):
        super().__init__()
        self.log_dir, self.probe = log_dir, probe
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        from keras_moe.analysis import flops

        per_layer, overall = flops.densities(flops.gate_values(self.model, self.probe))
        if logs is not None:
            logs["gate_density"] = float(overall)
            logs["gate_l1"] = float(self.model.gate_l1)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.scalar("gate_density/overall", overall, step=epoch)
            tf.summary.scalar("gate_l1", float(self.model.gate_l1), step=epoch)
            for name, value in per_layer.items():
                tf.summary.scalar(f"gate_density/{name}", float(value), step=epoch)
        self._writer.flush()


def read_history(run_dir):
    """The rows of `history.jsonl`, one per finished epoch, in order (duplicates of a
    re-run epoch keep the last)."""
    path = pathlib.Path(run_dir) / "history.jsonl"
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _backed_up_epoch(backup_dir, default):
    """The epoch `BackupAndRestore` will resume at from `backup_dir` (`default` if none)."""
    path = pathlib.Path(backup_dir) / "training_metadata.json"
    if not path.exists():
        return default
    return int(json.loads(path.read_text())["epoch"])


def _save_atomically(model, path):
    """`model.save(path)` that never leaves a partial file at `path` (a killed save
    must not look like a finished phase)."""
    partial = path.with_name(path.stem + ".partial.keras")
    model.save(partial)
    os.replace(partial, path)


def _phase_slug(index, phase):
    return f"{index}-{phase.name}"


def prepare_run_dir(run_dir, recipe, *, resume=False):
    """Creates `run_dir` for `recipe`, or checks that an unfinished run may be resumed.

    Returns:
        The recipe to run (the run's own `recipe.toml` when resuming).

    Raises:
        RunDirectoryError: The directory holds a finished run, holds an unfinished run
            and `resume` is False, is not empty and not a run, or `resume` is True and
            there is no run to resume.
    """
    run_dir = pathlib.Path(run_dir)
    saved = run_dir / "recipe.toml"
    if resume:
        if not saved.exists():
            raise RunDirectoryError(f"--resume: {str(run_dir)!r} holds no run (no recipe.toml)")
        if (run_dir / "model.keras").exists():
            raise RunDirectoryError(
                f"{str(run_dir)!r} holds a finished run; nothing to resume (evaluate or "
                "export it, or train into a new --out)"
            )
        return _recipes.load_recipe(saved)
    if run_dir.exists() and any(run_dir.iterdir()):
        if saved.exists():
            state = "a finished run" if (run_dir / "model.keras").exists() else (
                "an unfinished run (continue it with --resume)")
            raise RunDirectoryError(
                f"{str(run_dir)!r} already holds {state}; it is never overwritten: choose "
                "another --out or leave --out out for a fresh directory"
            )
        raise RunDirectoryError(f"{str(run_dir)!r} exists and is not empty; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    _recipes.save_recipe(recipe, saved, header=f"keras-moe run of {recipe.source}")
    return recipe


def default_run_dir(recipe, root="runs"):
    """`runs/<recipe name>-<UTC time>`, with a suffix if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = pathlib.Path(root) / f"{recipe.name}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = pathlib.Path(f"{base}-{n}")
    return candidate


@dataclasses.dataclass
class TrainResult:
    """What `train_recipe` returns. `seconds` counts this process's training only;
    `chief` is False on a non-chief worker of a multi-worker run (which wrote nothing
    into the run directory)."""

    model: object
    data: RecipeData
    history: list
    seconds: float
    recipe: object
    chief: bool = True


def is_chief(strategy):
    """Whether this process writes the run directory: True except on the non-chief
    workers of a `MultiWorkerMirroredStrategy` (the chief is the `"chief"` task if the
    cluster has one, else worker 0; without `TF_CONFIG` the only worker)."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and "chief" not in cluster and not resolver.task_id


def _worker_run_dir(run_dir, recipe, resume, strategy):
    """A non-chief worker's temporary run directory (see the module docstring)."""
    resolver = strategy.cluster_resolver
    scratch = pathlib.Path(tempfile.mkdtemp(
        prefix=f"keras-moe-{resolver.task_type}{resolver.task_id}-"))
    local = scratch / "run"
    if resume:
        recipe = prepare_run_dir(run_dir, recipe, resume=True)  # reads the chief's run
        local.mkdir()
        # The chief changes none of these before every worker has built the model
        # (variable creation is collective under this strategy).
        for name in ("backup", "checkpoints"):
            if (pathlib.Path(run_dir) / name).is_dir():
                shutil.copytree(pathlib.Path(run_dir) / name, local / name)
        shutil.copy2(pathlib.Path(run_dir) / "recipe.toml", local / "recipe.toml")
    return scratch, local, recipe


def train_recipe(recipe, run_dir, *, strategy=None, resume=False, data_dir=None, seed=0,
                 verbose="auto", command=None, extra_callbacks=()):
    """Trains `recipe` into `run_dir`; returns a `TrainResult`.

    Args:
        recipe: A `keras_moe.recipes.Recipe` (ignored with `resume`: the run's own).
        run_dir: The run directory (see the module docstring).
        strategy: A `tf.distribute.Strategy` (None: the default strategy).
        resume: Continue the unfinished run in `run_dir`.
        data_dir: Where the data files are (see `keras_moe.data.load`).
        seed: Seed of weights, shuffling, augmentation and gate noise.
        verbose: `model.fit` verbosity.
        command: The command line to record in `command.txt`.
        extra_callbacks: More callbacks for every phase.

    Raises:
        RunDirectoryError: See `prepare_run_dir`.
        RecipeError: The recipe does not fit the data or the model.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    if is_chief(strategy):
        return _train_recipe(recipe, run_dir, strategy=strategy, resume=resume,
                             data_dir=data_dir, seed=seed, verbose=verbose, command=command,
                             extra_callbacks=extra_callbacks)
    scratch, local, recipe = _worker_run_dir(run_dir, recipe, resume, strategy)
    try:
        result = _train_recipe(recipe, local, strategy=strategy, resume=resume,
                               data_dir=data_dir, seed=seed, verbose=verbose,
                               command=command, extra_callbacks=extra_callbacks)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dataclasses.replace(result, chief=False)


def _train_recipe(recipe, run_dir, *, strategy, resume, data_dir, seed, verbose, command,
                  extra_callbacks):
    import tensorflow as tf

    from keras_moe.training.callbacks import ExpertUtilizationMonitor, moe_layers
    from keras_moe.training.custom_loop import fit_distributed
    from keras_moe.training.deepmoe import GateDensityTarget

    run_dir = pathlib.Path(run_dir)
    recipe = prepare_run_dir(run_dir, recipe, resume=resume)
    with open(run_dir / "command.txt", "a") as f:
        f.write(" ".join(shlex.quote(a) for a in (command or sys.argv)) + "\n")
    keras.utils.set_random_seed(seed)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    on_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    if on_tpu:
        recipe = for_tpu(recipe)
    data = build_datasets(recipe, data_dir=data_dir, seed=seed, drop_remainder=on_tpu)

    checkpoints = run_dir / "checkpoints"
    finished = [i for i, p in enumerate(recipe.phases)
                if (checkpoints / f"{_phase_slug(i, p)}.keras").exists()]
    done = max(finished) + 1 if finished else 0
    with strategy.scope():
        if done:
            last = recipe.phases[done - 1]
            model = keras.saving.load_model(
                checkpoints / f"{_phase_slug(done - 1, last)}.keras", safe_mode=True)
        else:
            model = build_model(recipe, data)
            compile_model(model, recipe, data.steps_per_epoch)

    logs = run_dir / "logs"
    start = time.perf_counter()
    for index, phase in enumerate(recipe.phases):
        first_epoch = sum(p.epochs for p in recipe.phases[:index])
        if index < done:
            continue
        slug = _phase_slug(index, phase)
        backup = run_dir / "backup" / slug
        with strategy.scope():
            apply_phase(model, phase, starting=not backup.exists(), data=data)
        # Everything that changes the model or the logs at an epoch's end runs before
        # the epoch's backup, and the history row is written before it too: a kill
        # between the two re-runs the epoch (read_history keeps the later row).
        callbacks = []
        if _is_deepmoe(model):
            if phase.gate_density_target is not None:
                callbacks.append(GateDensityTarget(phase.gate_density_target,
                                                   data=data.probe))
            callbacks.append(_GateDensityLogger(str(logs / "gates"), data.probe))
        callbacks += [
            _HistoryWriter(run_dir / "history.jsonl", phase.name),
            keras.callbacks.BackupAndRestore(str(backup), save_freq="epoch",
                                             delete_checkpoint=False),
            keras.callbacks.TensorBoard(str(logs), write_graph=False),
        ]
        if moe_layers(model):
            callbacks.append(ExpertUtilizationMonitor(str(logs / "moe"), probe=data.probe))
        callbacks.extend(extra_callbacks)
        if phase.epochs:
            resume_epoch = _backed_up_epoch(backup, first_epoch)
            last_epoch = first_epoch + phase.epochs
            if multi_worker:  # model.fit fails under this strategy (Keras 3.15)
                fit_distributed(model, data.train_epochs(resume_epoch, last_epoch),
                                strategy=strategy, steps_per_epoch=data.steps_per_epoch,
                                validation_data=data.test, initial_epoch=first_epoch,
                                epochs=last_epoch, callbacks=callbacks, verbose=verbose)
            else:
                model.fit(data.train_epochs(resume_epoch, last_epoch),
                          steps_per_epoch=data.steps_per_epoch, validation_data=data.test,
                          initial_epoch=first_epoch, epochs=last_epoch, callbacks=callbacks,
                          verbose=verbose, shuffle=False)  # shuffled per epoch above
        checkpoints.mkdir(exist_ok=True)
        _save_atomically(model, checkpoints / f"{slug}.keras")
        shutil.rmtree(backup, ignore_errors=True)  # only once the phase's model is safe
    seconds = time.perf_counter() - start
    _save_atomically(model, run_dir / "model.keras")
    if multi_worker:  # a model that Keras's evaluate and predict can use
        model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    return TrainResult(model, data, read_history(run_dir), seconds, recipe)


def load_run_model(path):
    """Loads a run directory's `model.keras` (or a `.keras` file), `safe_mode=True`."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.exists():
        raise RunDirectoryError(f"no trained model at {str(path)!r} (is the run finished?)")
    return keras.saving.load_model(path, safe_mode=True)



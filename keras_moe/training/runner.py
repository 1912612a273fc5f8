"""Runs a recipe into a run directory: data, model, phases, backups, logs.

`train_recipe(recipe, run_dir)` is what `keras-moe train` does: it prepares the run
directory (`keras_moe.training.run_dir`), builds the data
(`keras_moe.training.datasets`) and the model, and runs the recipe's phases with the one
phase runner (`keras_moe.training.phases.run_phases`), saving an atomic backup after
every epoch and a checkpoint after every phase.

Choices:

- Resuming: inside a phase, the newest readable epoch backup (weights and optimizer
  state; a kill during an epoch redoes that epoch from its start); between phases, the
  checkpoint of the last finished phase. With fixed seeds and
  `tf.config.experimental.enable_op_determinism()` a resumed run ends with the weights
  of an uninterrupted one (tested with SIGKILL at many points).
- Validation data is the test split (or its first `test_size` examples), evaluated after
  every epoch. It is never used to select a model or stop early: the paper results
  these recipes reproduce are test errors after a fixed schedule.
- A phase's settings come from the model's family (`keras_moe.zoo.ModelFamily`); a
  change of trainability recompiles with the same optimizer instance, so its state and
  iteration count (the learning-rate schedule) carry on.
- Multi-worker (`strategy` a `tf.distribute.MultiWorkerMirroredStrategy`; every worker
  runs the same command with its own `TF_CONFIG`): training runs
  `keras_moe.training.custom_loop.fit_distributed` instead of `model.fit` (which fails
  under that strategy in Keras 3.15). Only the chief (the `"chief"` task, else worker 0)
  writes into `run_dir` and checks it. Every other worker runs the same callbacks into a
  temporary run directory of its own, deleted when `train_recipe` returns; its
  `TrainResult.chief` is False. With `resume`, a non-chief worker first copies the
  chief's `recipe.toml`, `run.json`, `backup/` and `checkpoints/` (so every worker
  restores the same state: `run_dir` must then be on a file system all workers see).
  The model returned is `model.keras` loaded outside the strategy, since Keras's
  `evaluate`/`predict` fail under it too.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import shlex
import shutil
import sys
import tempfile
import time

import keras

from keras_moe import expert_parallel
from keras_moe import recipes as _recipes
from keras_moe.recipes import RecipeError
from keras_moe.training import run_dir as _run_dir
from keras_moe.training.callbacks import StopOnNonFiniteLoss
from keras_moe.training.datasets import RecipeData, build_datasets
from keras_moe.training.phases import check_phase_settings, run_phases

__all__ = ["TrainResult", "build_model", "compile_model", "check_batch_fits_mesh",
           "divergence_hint", "for_static_shapes", "is_chief", "learning_rate",
           "load_run_model", "make_optimizer", "train_recipe"]


def build_model(recipe, data=None):
    """Builds the recipe's zoo model; `input_shape`/`num_classes` come from `data` if unset.

    Every phase setting the recipe uses gets its `on_build` step (the model's family
    defines it: a DeepMoE whose recipe steers lambda to a density gets its gate heads
    spread, without which every gate of a layer closes at the same step).

    Raises:
        RecipeError: The recipe sets an `input_shape` or `num_classes` that the data
            contradicts, or the builder rejects an argument (its message is kept).
    """
    from keras_moe import zoo

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
                    f"the key to take it from the data")
    if "input_shape" in kwargs:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{recipe.source} [model] {recipe.model.name}: {error}") from error
    family = zoo.get_family(recipe.model.name)
    done = set()
    for phase in recipe.phases:
        for key, setting in family.phase_settings.items():
            value = getattr(phase, key)
            if value is not None and setting.on_build is not None and key not in done:
                setting.on_build(model, value)
                done.add(key)
    return model


def for_static_shapes(recipe):
    """`recipe` made fit for `TPUStrategy` and `expert_parallel`: XLA needs static shapes
    and the SPMD partitioner splits only capacity dispatch, so MoE layers use capacity
    dispatch (`dispatch = "capacity"` for builders that take `dispatch` and do not set
    it); the runner also makes every batch full (`build_datasets(...,
    drop_remainder=True)`)."""
    from keras_moe import zoo

    builder = zoo.get_builder(recipe.model.name)
    if "dispatch" in inspect.signature(builder).parameters and recipe.model.args.get(
            "dispatch") is None:
        recipe = recipe.override(['model.dispatch="capacity"'])
    return recipe


def check_batch_fits_mesh(recipe, distribution):
    """Every device of an expert-parallel mesh gets an equal share of each batch (and
    routes it on its own): the batch size must divide by the devices."""
    devices = distribution.num_devices
    if recipe.data.batch_size % devices:
        raise ValueError(
            f"--strategy expert_parallel over {devices} devices ({distribution}): the batch "
            f"size {recipe.data.batch_size} must be a multiple of {devices}; pass "
            f"--batch-size {max(devices, recipe.data.batch_size // devices * devices)}.")


def learning_rate(recipe, steps_per_epoch):
    """The recipe's learning rate: a float, or its schedule in optimizer steps."""
    spec, schedule = recipe.optimizer, recipe.schedule
    total_steps = recipe.total_epochs * steps_per_epoch
    if schedule.name == "step" and schedule.boundaries:  # no boundary left: constant
        boundaries = [b * steps_per_epoch for b in schedule.boundaries]
        values = [spec.learning_rate * schedule.factor ** i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    if schedule.name == "cosine":
        return keras.optimizers.schedules.CosineDecay(spec.learning_rate, max(total_steps, 1))
    return spec.learning_rate


def make_optimizer(recipe, steps_per_epoch):
    """The recipe's optimizer, with its learning-rate schedule in optimizer steps."""
    spec = recipe.optimizer
    common = {"learning_rate": learning_rate(recipe, steps_per_epoch)}
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


def divergence_hint(recipe, run_dir):
    """What to try after a diverged run: a resume with a tenth of the learning rate."""
    lower = f"{recipe.optimizer.learning_rate / 10:.3g}"
    return (f"lower the learning rate (now {recipe.optimizer.learning_rate:g}): keras-moe "
            f"train --out {run_dir} --resume --set optimizer.learning_rate={lower}")


def phase_callbacks(model, run_dir, phase, data):
    """The monitoring callbacks of a run's phase (TensorBoard, expert use, gate density,
    history), in the order that keeps a backup consistent with the logs: everything that
    changes the model or the logs at an epoch's end runs before the epoch's backup."""
    from keras_moe.analysis import gates
    from keras_moe.training.callbacks import ExpertUtilizationMonitor, GateDensityLogger

    logs = pathlib.Path(run_dir) / "logs"
    callbacks = []
    if gates.gated_convolutions(model):
        callbacks.append(GateDensityLogger(str(logs / "gates"), data.probe))
    callbacks.append(_run_dir.HistoryWriter(pathlib.Path(run_dir) / "history.jsonl",
                                            phase.name))
    callbacks.append(keras.callbacks.TensorBoard(str(logs), write_graph=False))
    if gates.moe_layers(model):
        callbacks.append(ExpertUtilizationMonitor(str(logs / "moe"), probe=data.probe))
    return callbacks


@dataclasses.dataclass
class TrainResult:
    """What `train_recipe` returns. `seconds` counts this process's training only;
    `chief` is False on a non-chief worker of a multi-worker run (which wrote nothing
    into the run directory); `notes` are the resume's fallbacks, one line each."""

    model: object
    data: RecipeData
    history: list
    seconds: float
    recipe: object
    chief: bool = True
    notes: list = dataclasses.field(default_factory=list)


def is_chief(strategy):
    """Whether this process writes the run directory: True except on the non-chief
    workers of a `MultiWorkerMirroredStrategy` (the chief is the `"chief"` task if the
    cluster has one, else worker 0; without `TF_CONFIG` the only worker)."""
    import tensorflow as tf

    if isinstance(strategy, expert_parallel.ExpertParallel):
        return strategy.is_writer  # process 0 of a multi-process run
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
    if isinstance(strategy, expert_parallel.ExpertParallel):
        name = f"process{strategy.process_id}"
    else:
        name = f"{strategy.cluster_resolver.task_type}{strategy.cluster_resolver.task_id}"
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"keras-moe-{name}-"))
    local = scratch / "run"
    if resume:
        recipe, _ = _run_dir.prepare_run_dir(run_dir, recipe, resume=True)  # the chief's run
        local.mkdir()
        # The chief changes none of these before every worker has built the model
        # (variable creation is collective under this strategy).
        for name in ("backup", "checkpoints"):
            if (pathlib.Path(run_dir) / name).is_dir():
                shutil.copytree(pathlib.Path(run_dir) / name, local / name)
        for name in ("recipe.toml", _run_dir.SETTINGS_FILE):
            if (pathlib.Path(run_dir) / name).exists():
                shutil.copy2(pathlib.Path(run_dir) / name, local / name)
    return scratch, local, recipe


def train_recipe(recipe, run_dir, *, strategy=None, resume=False, data_dir=None, seed=0,
                 verbose="auto", command=None, extra_callbacks=(), settings=None):
    """Trains `recipe` into `run_dir`; returns a `TrainResult`.

    Args:
        recipe: A `keras_moe.recipes.Recipe` (ignored with `resume`: the run's own).
        run_dir: The run directory (see `keras_moe.training.run_dir`).
        strategy: A `tf.distribute.Strategy` (None: the default strategy).
        resume: Continue the unfinished run in `run_dir`.
        data_dir: Where the data files are (see `keras_moe.data.load`).
        seed: Seed of weights, shuffling, augmentation and gate noise.
        verbose: `model.fit` verbosity.
        command: The command line to record in `command.txt`.
        extra_callbacks: More callbacks for every phase.
        settings: The `RunSettings` to record in `run.json` (default: `seed` and
            `data_dir`, the rest defaults).

    Raises:
        RunDirectoryError: See `keras_moe.training.run_dir.prepare_run_dir`.
        RecipeError: The recipe does not fit the data or the model.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    if recipe is not None:
        check_phase_settings(recipe)
    if settings is None:
        settings = _run_dir.RunSettings(seed=seed, data_dir=data_dir)
    options = dict(strategy=strategy, resume=resume, data_dir=data_dir, seed=seed,
                   verbose=verbose, command=command, extra_callbacks=extra_callbacks,
                   settings=settings)
    if is_chief(strategy):
        return _train_recipe(recipe, run_dir, **options)
    scratch, local, recipe = _worker_run_dir(run_dir, recipe, resume, strategy)
    try:
        result = _train_recipe(recipe, local, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dataclasses.replace(result, chief=False)


def _remove_partials(run_dir):
    """Deletes temporary files a killed save left behind (never a complete file)."""
    for folder in [run_dir, run_dir / "checkpoints", *run_dir.glob("backup/*")]:
        if folder.is_dir():
            for item in folder.glob(".*.partial*"):
                item.unlink()


def _train_recipe(recipe, run_dir, *, strategy, resume, data_dir, seed, verbose, command,
                  extra_callbacks, settings):
    import tensorflow as tf

    from keras_moe import zoo
    from keras_moe.training.custom_loop import fit_distributed

    run_dir = pathlib.Path(run_dir)
    recipe, stored = _run_dir.prepare_run_dir(run_dir, recipe, resume=resume, settings=settings)
    if resume and settings is not None and stored is not None and settings != stored:
        _run_dir.write_settings(run_dir, settings)  # a resume's lowered learning rate
    with open(run_dir / "command.txt", "a") as f:
        f.write(" ".join(shlex.quote(a) for a in (command or sys.argv)) + "\n")
    _remove_partials(run_dir)
    keras.utils.set_random_seed(seed)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    static = (isinstance(strategy, tf.distribute.TPUStrategy)
              or isinstance(strategy, expert_parallel.ExpertParallel))
    if static:
        recipe = for_static_shapes(recipe)
    if isinstance(strategy, expert_parallel.ExpertParallel):
        check_batch_fits_mesh(recipe, strategy)
    if settings is not None and settings.learning_rate is not None:
        # A resume that lowered the learning rate (run.json keeps it; recipe.toml stays
        # as the run was started).
        recipe = recipe.override([f"optimizer.learning_rate={settings.learning_rate!r}"])
    data = build_datasets(recipe, data_dir=data_dir, seed=seed, drop_remainder=static)
    family = zoo.get_family(recipe.model.name)

    def set_learning_rate(model):
        if settings is not None and settings.learning_rate is not None:
            model.optimizer.learning_rate = learning_rate(recipe, data.steps_per_epoch)

    with strategy.scope():
        done, model, notes = _run_dir.finished_phases(run_dir, recipe.phases)
        if model is None:
            model = build_model(recipe, data)
            compile_model(model, recipe, data.steps_per_epoch)
        else:  # a phase checkpoint's optimizer has the learning rate it was saved with
            set_learning_rate(model)
    backups = {}
    for index, phase in enumerate(recipe.phases):
        backup = run_dir / "backup" / _run_dir.phase_slug(index, phase)
        if index < done:  # left by a kill between a phase's checkpoint and this cleanup
            shutil.rmtree(backup, ignore_errors=True)
        elif backup.is_dir():
            backups[index] = _run_dir.BackupState.find(backup)
    for index, state in backups.items():
        first = sum(p.epochs for p in recipe.phases[:index])
        notes.extend(state.describe(first))
    for line in notes:
        print(f"keras-moe train: {line}", file=sys.stderr, flush=True)

    def fit(index, phase, start, stop, callbacks):
        state = backups.get(index) or _run_dir.BackupState()
        if state.epoch is not None:
            start = max(start, min(state.epoch, stop))
        backup_dir = run_dir / "backup" / _run_dir.phase_slug(index, phase)
        # First, so that a diverged batch stops the epoch before any callback writes.
        stop_on_nan = StopOnNonFiniteLoss(probe=data.probe, phase=phase.name,
                                          hint=divergence_hint(recipe, run_dir))
        # Every other callback before the backup: their state is saved after their own
        # epoch-end updates and restored after their own on_train_begin.
        others = ([stop_on_nan] + callbacks + phase_callbacks(model, run_dir, phase, data)
                  + list(extra_callbacks))
        backup = _run_dir.EpochBackup(backup_dir, restore=state.path, stateful=others,
                                      after_restore=set_learning_rate)
        if start >= stop:  # the backup holds the whole phase: restore it, train nothing
            backup.set_model(model)
            backup.on_train_begin()
            return None
        callbacks = others + [backup]
        train = data.train_epochs(start, stop)
        if multi_worker:  # model.fit fails under this strategy (Keras 3.15)
            return fit_distributed(model, train, strategy=strategy,
                                   steps_per_epoch=data.steps_per_epoch,
                                   validation_data=data.test, initial_epoch=start, epochs=stop,
                                   callbacks=callbacks, verbose=verbose)
        return model.fit(train, steps_per_epoch=data.steps_per_epoch, validation_data=data.test,
                         initial_epoch=start, epochs=stop, callbacks=callbacks,
                         verbose=verbose, shuffle=False)  # shuffled per epoch above

    def after_phase(index, phase):
        _run_dir.check_finite(model, f"the checkpoint of phase {phase.name!r}")
        checkpoints = run_dir / "checkpoints"
        checkpoints.mkdir(exist_ok=True)
        _run_dir.save_model(model, checkpoints / f"{_run_dir.phase_slug(index, phase)}.keras")
        # Only once the phase's model is safe.
        shutil.rmtree(run_dir / "backup" / _run_dir.phase_slug(index, phase), ignore_errors=True)

    start_time = time.perf_counter()
    with strategy.scope():
        run_phases(model, recipe.phases, fit, family=family, data=data,
                   restored_phases=done, resumed=set(i for i, s in backups.items() if s.path),
                   after_phase=after_phase, verbose=1 if verbose else 0)
    seconds = time.perf_counter() - start_time
    _run_dir.check_finite(model, "model.keras")
    _run_dir.save_model(model, run_dir / "model.keras")
    if multi_worker or getattr(strategy, "num_processes", 1) > 1:
        # A model that Keras's evaluate and predict can use in this process alone.
        model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    return TrainResult(model, data, _run_dir.read_history(run_dir), seconds, recipe,
                       notes=notes)


def load_run_model(path, compile=True):
    """Loads a run directory's `model.keras` (or a `.keras` file), `safe_mode=True`.

    Args:
        path: A run directory or a `.keras` file.
        compile: Restore the optimizer too (False for evaluating or exporting: no
            optimizer state is read, and none is reported missing).

    Raises:
        RunDirectoryError: No model there, or the file is not a readable `.keras` file
            (the message says which, instead of Keras's own).
    """
    import zipfile

    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.exists():
        raise _run_dir.RunDirectoryError(
            f"no trained model at {str(path)!r} (is the run finished?)")
    if not zipfile.is_zipfile(path):
        raise _run_dir.RunDirectoryError(
            f"{str(path)!r} is not a .keras file (a zip archive written by model.save); "
            "it is damaged or of another format")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except (zipfile.BadZipFile, OSError, KeyError, EOFError) as error:
        raise _run_dir.RunDirectoryError(
            f"{str(path)!r} is a damaged .keras file ({type(error).__name__}: "
            f"{str(error)[:200]})") from None

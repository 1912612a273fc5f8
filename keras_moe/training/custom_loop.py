"""`fit_distributed`: `model.fit` for `MultiWorkerMirroredStrategy`, as a custom loop.

Keras 3.15's `model.fit` (and `evaluate`, `predict`) fail under
`tf.distribute.MultiWorkerMirroredStrategy` before their first step (see
`keras_moe.distribute`). `fit_distributed(model, dataset, ...)` takes the place of the
`model.fit(dataset, steps_per_epoch=..., initial_epoch=..., epochs=...,
validation_data=..., callbacks=...)` call of `keras_moe.training.runner.train_recipe`
and trains as `model.fit` does:

- The dataset is distributed with `strategy.experimental_distribute_dataset`: every
  worker builds the same global dataset and TensorFlow gives each replica its share of
  every global batch. A dataset left at the default `AutoShardPolicy.AUTO` is set to
  `AutoShardPolicy.DATA` (shard by element: correct for the in-memory pipelines of
  this package, which read no files; `AUTO` would try file sharding first and warn).
- One training step is `strategy.run` of Keras's own loss: `model.compute_loss` (the
  compiled loss object, which divides by the replica count itself, plus every
  `model.losses` term divided by the replica count by the TensorFlow trainer's
  `_aggregate_additional_loss`: the same as
  `keras_moe.regularizers.reduction.scale_for_replicas(sum(model.losses))`; subclass
  overrides such as `DeepMoEModel.compute_loss` are kept), the optimizer's loss
  scaling, gradients and `model.optimizer.apply_gradients` (which sums the replicas'
  gradients).
- Logs are exact over the global batch: each replica returns sums (loss times its
  example count, correct predictions, examples), summed across replicas and workers.
  `loss` is the example-weighted mean over the epoch's batches, as `fit` reports it;
  `accuracy` is sparse categorical accuracy (labels are class indices, the model's one
  output has one score per class). Validation (`val_loss`, `val_accuracy`) runs after
  every epoch the same way; replicas left without data by a partial last batch count
  zero examples.
- Callbacks are driven through a `keras.callbacks.CallbackList` (with a `History` and,
  for `verbose != 0`, a progress bar): `on_train_begin`, `on_epoch_begin`,
  `on_train_batch_begin/end`, `on_test_begin/end` around validation, `on_epoch_end`
  and `on_train_end`, with logs of Python floats. An epoch number that a callback
  stores as the model's initial epoch during `on_train_begin` (what
  `keras.callbacks.BackupAndRestore` does when it restores a backup; a private Keras
  attribute, `keras_moe.compat.initial_epoch`) is where training starts, as in
  `model.fit`; `model.stop_training` ends training after the current batch.

Every worker must call `fit_distributed` with the same arguments: the steps are
collective. Callbacks run on every worker; a callback that writes files must write to
a different place on each worker (`train_recipe` gives non-chief workers a temporary
run directory).
"""

from __future__ import annotations

import math
import numbers
import warnings

import keras

from keras_moe import compat
from keras_moe.validation import require_tensorflow

__all__ = ["fit_distributed"]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _with_data_sharding(dataset):
    import tensorflow as tf

    policy = dataset.options().experimental_distribute.auto_shard_policy
    if policy != tf.data.experimental.AutoShardPolicy.AUTO:
        return dataset  # the caller chose one
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


def _validate(model, dataset, strategy, steps_per_epoch, initial_epoch, epochs,
              validation_data, callbacks, verbose):
    import tensorflow as tf

    require_tensorflow("fit_distributed (a tf.distribute loop)", "On JAX, train with model.fit.")
    if not isinstance(strategy, tf.distribute.Strategy):
        raise ValueError(f"strategy must be a tf.distribute.Strategy, got {strategy!r}")
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    if getattr(model, "optimizer", None) is None or getattr(model, "_compile_loss", None) is None:
        raise ValueError(
            f"model {model.name!r} must be compiled with an optimizer and a loss before "
            "fit_distributed (model.compile(optimizer, loss))")
    if not model.built or not model.trainable_variables:
        raise ValueError(f"model {model.name!r} must be built and have trainable weights")
    variable = model.trainable_variables[0]
    if not strategy.extended.variable_created_in_scope(getattr(variable, "value", variable)):
        raise ValueError(
            f"model {model.name!r} was not built under this strategy's scope(): build "
            "and compile it inside `with strategy.scope():`")
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(
            f"dataset must be a tf.data.Dataset of global batches, got "
            f"{type(dataset).__name__}")
    if validation_data is not None and not isinstance(validation_data, tf.data.Dataset):
        raise ValueError(
            f"validation_data must be None or a tf.data.Dataset of batches, got "
            f"{type(validation_data).__name__}")
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
    initial_epoch = _check_int("initial_epoch", initial_epoch, 0)
    epochs = _check_int("epochs", epochs, 0)
    if epochs < initial_epoch:
        raise ValueError(
            f"epochs ({epochs}) is the index of the epoch to stop before and must be >= "
            f"initial_epoch ({initial_epoch})")
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")
    callbacks = list(callbacks or ())
    for callback in callbacks:
        if not isinstance(callback, keras.callbacks.Callback):
            raise ValueError(
                f"callbacks must be keras.callbacks.Callback instances, got "
                f"{type(callback).__name__}")
    return steps_per_epoch, initial_epoch, epochs, callbacks, 1 if verbose == "auto" else verbose


def _step_functions(model, strategy):
    """The distributed train and eval steps; each returns global (loss_sum, correct, count)."""
    import tensorflow as tf

    def sums(x, y, y_pred, loss, sample_weight):
        if isinstance(y_pred, (list, tuple, dict)):
            raise ValueError(
                "fit_distributed trains single-output classifiers; the model returned "
                f"{type(y_pred).__name__}")
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        count = tf.cast(tf.shape(keras.tree.flatten(x)[0])[0], tf.float32)
        # Keras's loss is this replica's mean divided by the replica count.
        loss_sum = tf.cast(loss, tf.float32) * float(replicas) * count
        predicted = tf.argmax(y_pred, axis=-1)
        labels = tf.cast(tf.reshape(y, tf.shape(predicted)), predicted.dtype)
        hits = tf.cast(tf.equal(predicted, labels), tf.float32)
        if sample_weight is None:
            return loss_sum, tf.reduce_sum(hits), count
        weight = tf.cast(tf.reshape(sample_weight, tf.shape(hits)), tf.float32)
        # Weighted accuracy, as Keras's metric; the loss mean stays per example.
        return loss_sum, tf.reduce_sum(hits * weight), count, tf.reduce_sum(weight)

    def call(x, training):
        if compat.call_has_training_arg(model):
            return model(x, training=training)
        return model(x)

    def replica_train(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = call(x, True)
            loss = compat.compute_loss(model, x=x, y=y, y_pred=y_pred,
                                       sample_weight=sample_weight, training=True)
            scaled = model.optimizer.scale_loss(loss)
        variables = model.trainable_weights
        gradients = tape.gradient(scaled, variables)
        model.optimizer.apply_gradients(zip(gradients, variables))
        return sums(x, y, y_pred, loss, sample_weight)

    def replica_eval(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = call(x, False)
        loss = compat.compute_loss(model, x=x, y=y, y_pred=y_pred,
                                   sample_weight=sample_weight, training=False)
        return sums(x, y, y_pred, loss, sample_weight)

    def reduced(replica_fn):
        @tf.function(reduce_retracing=True)
        def step(batch):
            per_replica = strategy.run(replica_fn, args=(batch,))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                    for v in per_replica]

        return step

    return reduced(replica_train), reduced(replica_eval)


class _Totals:
    """Running global sums of one epoch (training or validation)."""

    def __init__(self):
        self.loss = self.correct = self.count = self.weight = 0.0

    def add(self, values):
        values = [float(v) for v in values]
        self.loss += values[0]
        self.correct += values[1]
        self.count += values[2]
        self.weight += values[3] if len(values) > 3 else values[2]

    def logs(self, prefix=""):
        if not self.count:
            return {}
        accuracy = self.correct / self.weight if self.weight else math.nan
        return {f"{prefix}loss": self.loss / self.count, f"{prefix}accuracy": accuracy}


def fit_distributed(model, dataset, *, strategy, steps_per_epoch, initial_epoch, epochs,
                    validation_data=None, callbacks=(), verbose=0):
    """Trains `model` on `dataset` under `strategy` like `model.fit` (see the module doc).

    Args:
        model: A single-output classifier, built and compiled under `strategy.scope()`
            (labels are class indices, outputs one score per class).
        dataset: A `tf.data.Dataset` of global batches `(x, y)` or `(x, y, weights)`,
            holding the batches of every epoch from the first one run (one iterator
            runs through it, `steps_per_epoch` batches per epoch, as `model.fit` with
            `steps_per_epoch` does).
        strategy: The `tf.distribute.Strategy` the model was built under (any
            strategy works; `MultiWorkerMirroredStrategy` is what it is for).
        steps_per_epoch: Batches per epoch, >= 1.
        initial_epoch: Index of the first epoch (unless a callback sets the model's
            initial epoch in `on_train_begin`; see the module docstring).
        epochs: Index of the epoch to stop before, >= `initial_epoch`.
        validation_data: None or a `tf.data.Dataset` of batches, evaluated after every
            epoch.
        callbacks: `keras.callbacks.Callback` instances.
        verbose: 0 (silent), 1 (progress bar), 2 (a line per epoch) or "auto" (1).

    Returns:
        The `keras.callbacks.History` of the run (also `model.history`): `.history`
        maps `loss`, `accuracy` (and `val_loss`, `val_accuracy`, and whatever callbacks
        add to the logs) to one value per epoch run.

    Raises:
        ValueError: An argument is invalid (the message says which and why).
    """
    import tensorflow as tf

    steps_per_epoch, initial_epoch, epochs, callbacks, verbose = _validate(
        model, dataset, strategy, steps_per_epoch, initial_epoch, epochs, validation_data,
        callbacks, verbose)
    with strategy.scope():
        # What `model.fit` builds before its first step (compiled loss, optimizer
        # variables), from the batch's shapes only: no data is read.
        compat.symbolic_build(model, dataset.element_spec)
        distributed = strategy.experimental_distribute_dataset(_with_data_sharding(dataset))
        distributed_validation = None
        if validation_data is not None:
            distributed_validation = strategy.experimental_distribute_dataset(
                _with_data_sharding(validation_data))
    train_step, eval_step = _step_functions(model, strategy)

    callback_list = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=verbose != 0, model=model,
        verbose=verbose, epochs=epochs, steps=steps_per_epoch)
    history = next(c for c in callback_list.callbacks
                   if isinstance(c, keras.callbacks.History))
    model.stop_training = False
    # Only an epoch a callback restores now counts (not one left by an earlier fit).
    compat.set_initial_epoch(model, None)
    callback_list.on_train_begin()
    start = compat.initial_epoch(model) or initial_epoch
    iterator = iter(distributed)
    epoch_logs = None
    out_of_data = False
    for epoch in range(start, epochs):
        callback_list.on_epoch_begin(epoch)
        totals = _Totals()
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                out_of_data = True
                break
            totals.add(train_step(batch))
            callback_list.on_train_batch_end(step, totals.logs())
            if model.stop_training:
                break
        if out_of_data and not totals.count:
            warnings.warn(
                f"fit_distributed: the dataset ran out of data at the start of epoch "
                f"{epoch}; training stops (give it steps_per_epoch * (epochs - "
                f"initial_epoch) batches)", stacklevel=2)
            break
        epoch_logs = totals.logs()
        if distributed_validation is not None:
            callback_list.on_test_begin()
            validation = _Totals()
            for step, batch in enumerate(distributed_validation):
                callback_list.on_test_batch_begin(step)
                validation.add(eval_step(batch))
                callback_list.on_test_batch_end(step, validation.logs())
            val_logs = validation.logs()
            callback_list.on_test_end(val_logs)
            epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
        callback_list.on_epoch_end(epoch, epoch_logs)
        if out_of_data:
            warnings.warn(
                f"fit_distributed: the dataset ran out of data in epoch {epoch}; "
                "training stops", stacklevel=2)
            break
        if model.stop_training:
            break
    if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > start:
        with strategy.scope():
            model.optimizer.finalize_variable_values(model.trainable_weights)
    callback_list.on_train_end(logs=epoch_logs)
    model.history = history
    return history

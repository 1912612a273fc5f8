"""Callbacks that watch a mixture-of-experts model while it trains.

- `ExpertUtilizationMonitor`: logs every MoE layer's expert use to TensorBoard every
  epoch and warns when an expert collapses.
- `GateDensityLogger`: logs a DeepMoE model's gate density (overall and per gated
  convolution) to TensorBoard and to the epoch logs.
- `StopOnNonFiniteLoss`: stops training at the first batch whose loss is NaN or
  infinite, before anything of that batch is written (`TrainingDiverged`).

Both read the gates through the gate reader (`keras_moe.analysis.gates`);
`gate_statistics` (re-exported here) gives the same numbers outside training.
"""

import os
import warnings

import keras
import numpy as np

from keras_moe import validation
from keras_moe.analysis import gates as gate_reader
from keras_moe.analysis.gates import gate_statistics, moe_layers  # noqa: F401 (re-exported)

__all__ = ["ExpertCollapseWarning", "ExpertUtilizationMonitor", "GateDensityLogger",
           "StopOnNonFiniteLoss", "TrainingDiverged", "first_non_finite_term",
           "gate_statistics", "moe_layers", "write_scalar"]


class ExpertCollapseWarning(UserWarning):
    """An expert receives (almost) none of the probe batch's assignments."""


def _scalar_metadata():
    """TensorBoard's scalar-plugin metadata, built without importing tensorboard."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"  # TensorBoard's scalars plugin, version 0
    return metadata.SerializeToString()


def write_scalar(tag, value, step):
    """Writes one float32 scalar summary to the default `tf.summary` writer.

    Same record as `tf.summary.scalar`, which needs the `tensorboard` package installed;
    this uses TensorFlow's own `tf.summary.write`, so logging works without it.
    """
    import tensorflow as tf

    return tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step,
                            metadata=_scalar_metadata())


class ExpertUtilizationMonitor(keras.callbacks.Callback):
    """Logs expert utilisation of every MoE layer to TensorBoard and warns on collapse.

    Layers that cannot be reached from the model's inputs (inside a nested sub-model)
    are skipped with a warning.

    At the end of every `every_n_epochs`-th epoch the gates of each `MoEDense` and
    `ExpertMixture` layer are evaluated (inference mode: no gate noise) on a fixed probe
    batch (`keras_moe.analysis.gates.gate_statistics`), and these scalars are written
    with `tf.summary` under `log_dir` (step = epoch index):

    - `<layer>/expert_<e>/share`: fraction of the probe's assignments routed to expert e;
    - `<layer>/gate_entropy`: mean entropy of a token's gate vector (nats);
    - `<layer>/load_cv` and `<layer>/importance_cv`: coefficients of variation of the
      per-expert assignment counts and of the summed gates;
    - `<layer>/min_share`: the smallest expert share.

    An expert whose share is below `collapse_threshold` triggers one
    `ExpertCollapseWarning` (Python `warnings`: shown once per place by default). The default
    threshold, 10% of the uniform share (`0.1 / num_experts`, per layer), is our
    choice; Shazeer et al. give none. The last statistics are in `self.last_stats`
    and every collapse in `self.collapses` (a list of `(epoch, layer, expert, share)`).

    Args:
        log_dir: Directory for the TensorBoard event files (created if missing).
        probe: Model inputs of the fixed probe batch (array, list or dict).
        collapse_threshold: None (`0.1 / num_experts` per layer) or a share in [0, 1].
        every_n_epochs: Log every this many epochs, >= 1.
        batch_size: Batch size of the probe pass.

    Example:

    >>> monitor = ExpertUtilizationMonitor("logs/moe", probe=x_test[:2048])
    >>> model.fit(x_train, y_train, epochs=5, callbacks=[monitor])

    References:
        Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
        Mixture-of-Experts Layer", ICLR 2017 (importance and load, CV).
    """

    def __init__(self, log_dir, probe, collapse_threshold=None, every_n_epochs=1,
                 batch_size=512):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a path, got {log_dir!r}")
        self.log_dir = os.fspath(log_dir)
        self.probe = probe
        self.collapse_threshold = validation.number(
            "collapse_threshold", collapse_threshold, minimum=0, maximum=1, allow_none=True
        )
        self.every_n_epochs = validation.positive_int("every_n_epochs", every_n_epochs)
        self.batch_size = validation.positive_int("batch_size", batch_size)
        self.last_stats = {}
        self.collapses = []
        self._ready = False
        self._writer = None

    def _setup(self):
        import tensorflow as tf

        if not moe_layers(self.model):
            warnings.warn("ExpertUtilizationMonitor: the model has no MoE layer to monitor.",
                          stacklevel=2)
        for layer in gate_reader.unreachable_moe_layers(self.model):
            warnings.warn(f"ExpertUtilizationMonitor skips MoE layer {layer.name!r}: it is "
                          "inside a nested model, out of reach of the model's own graph",
                          stacklevel=2)
        os.makedirs(self.log_dir, exist_ok=True)
        self._writer = tf.summary.create_file_writer(self.log_dir)
        self._ready = True

    def on_train_begin(self, logs=None):
        self._setup()

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        if not self._ready:
            self._setup()
        self.last_stats = gate_statistics(self.model, self.probe, batch_size=self.batch_size)
        with self._writer.as_default():
            for name, stats in self.last_stats.items():
                for e, share in enumerate(stats["share"]):
                    write_scalar(f"{name}/expert_{e}/share", share, step=epoch)
                for key in ("gate_entropy", "load_cv", "importance_cv"):
                    write_scalar(f"{name}/{key}", stats[key], step=epoch)
                write_scalar(f"{name}/min_share", float(stats["share"].min()), step=epoch)
                self._check_collapse(epoch, name, stats["share"])
        self._writer.flush()

    def _check_collapse(self, epoch, name, share):
        threshold = self.collapse_threshold
        if threshold is None:
            threshold = 0.1 / len(share)
        for e in np.flatnonzero(share < threshold):
            self.collapses.append((epoch, name, int(e), float(share[e])))
            message = (
                f"epoch {epoch}: expert {int(e)} of MoE layer {name!r} receives "
                f"{share[e]:.4f} of the probe assignments (threshold {threshold:.4f}): "
                "it has collapsed; consider larger balancing-loss coefficients."
            )
            warnings.warn(message, ExpertCollapseWarning, stacklevel=2)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()


class GateDensityLogger(keras.callbacks.Callback):
    """Logs a DeepMoE model's gate density (overall and per gated conv) to TensorBoard.

    At every epoch's end it measures the fraction of open gates of every `GatedConv2D`
    on `probe` (inference mode) and writes `gate_density/overall`,
    `gate_density/<layer>` and `gate_l1` under `log_dir`; `gate_density` and `gate_l1`
    are added to the epoch logs (so `history.jsonl` has them).

    Args:
        log_dir: Directory for the TensorBoard event files.
        probe: Images to measure on.
    """

    def __init__(self, log_dir, probe):
        super().__init__()
        self.log_dir, self.probe = log_dir, probe
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        per_layer, overall = gate_reader.densities(
            gate_reader.gate_values(self.model, self.probe, kinds=("gated_conv",)))
        gate_l1 = getattr(self.model, "gate_l1", None)
        if logs is not None:
            logs["gate_density"] = float(overall)
            if gate_l1 is not None:
                logs["gate_l1"] = float(gate_l1)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            write_scalar("gate_density/overall", overall, step=epoch)
            if gate_l1 is not None:
                write_scalar("gate_l1", float(gate_l1), step=epoch)
            for name, value in per_layer.items():
                write_scalar(f"gate_density/{name}", float(value), step=epoch)
        self._writer.flush()


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss (or weights); nothing of it was written.

    Attributes:
        phase, epoch, batch: Where it happened (None where not known; epoch and batch
            count from 1).
        term: The first non-finite term of the loss, or None.
    """

    def __init__(self, message, *, phase=None, epoch=None, batch=None, term=None):
        super().__init__(message)
        self.phase, self.epoch, self.batch, self.term = phase, epoch, batch, term


def first_non_finite_term(model, inputs):
    """The first term of the training loss that is not finite on `inputs`, in the order
    the forward pass computes them: each layer's `add_loss` terms (balancing losses,
    DeepMoE's objective), then the model's output (the data loss's input). None if all
    are finite.

    Runs the model once in training mode (batch-norm statistics move: call it on a
    model that is being given up, or restored afterwards).
    """
    from keras_moe import compat
    from keras_moe.analysis import graph

    outputs = model(inputs, training=True)
    for layer in graph.layers(model):
        own = compat.own_losses(layer)
        for i, loss in enumerate(own):
            value = float(keras.ops.convert_to_numpy(loss))
            if not np.isfinite(value):
                which = f" {i + 1} of {len(own)}" if len(own) > 1 else ""
                return f"{layer.path}'s loss term{which} ({type(layer).__name__}) = {value}"
    for output in keras.tree.flatten(outputs):
        values = keras.ops.convert_to_numpy(output)
        if not np.all(np.isfinite(values)):
            return (f"the model's output (the data loss's input: "
                    f"{int(np.size(values) - np.isfinite(values).sum())} non-finite values)")
    return None


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Callback: stops `fit` at the first batch whose loss is NaN or infinite.

    The loss `fit` logs is the total: the data loss plus every balancing term added with
    `add_loss`, so one check catches any of them. It raises `TrainingDiverged` from that
    batch's end, so no later callback runs for the epoch: no epoch backup, history row
    or checkpoint of the diverged state is written, and `fit` (or `keras-moe train`,
    which exits non-zero) stops loudly instead of saving NaN weights. With `probe`, the
    message names the first non-finite term (`first_non_finite_term`).

    Args:
        probe: Inputs to find the first non-finite term on (None: not named).
        phase: The phase's name, for the message.
        hint: What to try, appended to the message.

    Example:

    >>> model.fit(x, y, epochs=5, callbacks=[StopOnNonFiniteLoss(probe=x[:64])])
    """

    def __init__(self, probe=None, phase=None, hint=None):
        super().__init__()
        self.probe, self.phase, self.hint = probe, phase, hint
        self._epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(keras.ops.convert_to_numpy(loss))
        if np.isfinite(loss):
            return
        term = None
        if self.probe is not None:
            try:
                term = first_non_finite_term(self.model, self.probe)
            except Exception as error:  # the diagnosis must not hide the stop itself
                term = f"(not found: {type(error).__name__}: {error})"
        epoch = None if self._epoch is None else self._epoch + 1
        where = ", ".join(part for part in (
            f"phase {self.phase!r}" if self.phase else None,
            f"epoch {epoch}" if epoch is not None else None, f"batch {batch + 1}") if part)
        message = f"training diverged in {where}: the loss is {loss}"
        if term:
            message += f"; first non-finite term: {term}"
        message += "; nothing of it was saved"
        if self.hint:
            message += f"; {self.hint}"
        raise TrainingDiverged(message, phase=self.phase, epoch=epoch, batch=batch + 1,
                               term=term)

"""Callbacks that watch a mixture-of-experts model while it trains.

- `gate_statistics(model, probe)`: per MoE layer, the gates on a probe batch and the
  utilisation statistics the callback logs (usable on its own, e.g. after training).
- `ExpertUtilizationMonitor`: logs them to TensorBoard every epoch and warns when an
  expert collapses.
"""

import logging
import os
import warnings

import keras
import numpy as np

from keras_moe import validation
from keras_moe.layers.expert_mixture import ExpertMixture
from keras_moe.layers.moe_dense import MoEDense

logger = logging.getLogger(__name__)

MOE_LAYER_TYPES = (MoEDense, ExpertMixture)


class ExpertCollapseWarning(UserWarning):
    """An expert receives (almost) none of the probe batch's assignments."""


def moe_layers(model):
    """Every `MoEDense` and `ExpertMixture` inside `model` (nested models included)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, MOE_LAYER_TYPES)]


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


class _Probe:
    """Evaluates the gates of one MoE layer on the model's inputs (inference mode)."""

    def __init__(self, model, layer):
        self.layer = layer
        try:
            self.features = keras.Model(model.input, layer.input)
        except Exception as error:  # nested or subclassed: no symbolic path to the layer
            raise ValueError(
                f"cannot reach the inputs of MoE layer {layer.name!r} from the model's "
                f"inputs ({error}); the monitor needs a functional or Sequential model."
            ) from error

    def __call__(self, probe, batch_size):
        inputs = self.features.predict(probe, batch_size=batch_size, verbose=0)
        layer = self.layer
        if isinstance(layer, MoEDense):
            inputs = np.asarray(inputs)
            tokens = inputs.reshape(-1, inputs.shape[-1])
            outputs = layer.gate(tokens, training=False)
        else:
            outputs = layer.compute_gate_outputs(inputs, training=False)
        return _statistics(
            keras.ops.convert_to_numpy(outputs["gates"]),
            keras.ops.convert_to_numpy(outputs["dispatch_mask"]),
        )


def gate_statistics(model, probe, batch_size=512):
    """Per MoE layer of `model`, its gates and utilisation on `probe` (inference mode).

    Args:
        model: A functional or Sequential Keras model containing `MoEDense` or
            `ExpertMixture` layers.
        probe: Inputs of `model` (array, list or dict as `model.predict` takes them).
        batch_size: Batch size of the probe pass.

    Returns:
        Dict from layer name to a dict with `"gates"` `(tokens, experts)`, `"counts"`
        (assignments per expert: tokens routed to it by the gate's dispatch mask;
        the largest gate for an `ExpertMixture`), `"share"` (counts / all
        assignments), `"importance"` (sum of gates), `"importance_cv"` and `"load_cv"`
        (coefficients of variation, std / mean with the population std, of importance
        and of counts), `"gate_entropy"` (mean entropy of a token's gate, nats) and
        `"mean_gate_entropy"` (entropy of the mean gate).

    Example:

    >>> stats = gate_statistics(model, x_test[:1024])
    >>> stats["moe_0"]["load_cv"]
    """
    return {layer.name: _Probe(model, layer)(probe, batch_size) for layer in moe_layers(model)}


class ExpertUtilizationMonitor(keras.callbacks.Callback):
    """Logs expert utilisation of every MoE layer to TensorBoard and warns on collapse.

    Layers that cannot be reached from the model's inputs (inside a nested sub-model)
    are skipped with a warning.

    At the end of every `every_n_epochs`-th epoch the gates of each `MoEDense` and
    `ExpertMixture` layer are evaluated (inference mode: no gate noise) on a fixed probe
    batch through a sub-model from the model's inputs to the layer's input, and these
    scalars are written with `tf.summary` under `log_dir` (step = epoch index):

    - `<layer>/expert_<e>/share`: fraction of the probe's assignments routed to expert e;
    - `<layer>/gate_entropy`: mean entropy of a token's gate vector (nats);
    - `<layer>/load_cv` and `<layer>/importance_cv`: coefficients of variation of the
      per-expert assignment counts and of the summed gates;
    - `<layer>/min_share`: the smallest expert share.

    An expert whose share is below `collapse_threshold` triggers an
    `ExpertCollapseWarning` (Python `warnings`) and a `logging` warning. The default
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
        self._probes = None
        self._writer = None

    def _setup(self):
        import tensorflow as tf

        layers = moe_layers(self.model)
        if not layers:
            warnings.warn("ExpertUtilizationMonitor: the model has no MoE layer to monitor.",
                          stacklevel=2)
        self._probes = []
        for layer in layers:
            try:
                self._probes.append(_Probe(self.model, layer))
            except ValueError as error:
                warnings.warn(f"ExpertUtilizationMonitor skips a layer: {error}", stacklevel=2)
        os.makedirs(self.log_dir, exist_ok=True)
        self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_begin(self, logs=None):
        self._setup()

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        if self._probes is None:
            self._setup()
        self.last_stats = {}
        with self._writer.as_default():
            for probe in self._probes:
                name = probe.layer.name
                stats = probe(self.probe, self.batch_size)
                self.last_stats[name] = stats
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
            logger.warning(message)
            warnings.warn(message, ExpertCollapseWarning, stacklevel=2)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()

"""ExpertUtilizationMonitor: TensorBoard scalars of expert use, collapse warnings."""

import glob
import warnings

import numpy as np
import pytest
import tensorflow as tf

import keras

from keras_moe.layers import MoEDense
from keras_moe.training.callbacks import (
    ExpertCollapseWarning,
    ExpertUtilizationMonitor,
    gate_statistics,
)
from keras_moe.zoo.two_domain import two_domain_moe


def _model(collapse):
    inputs = keras.Input((6,), name="x")
    hidden = MoEDense(4, num_experts=4, top_k=2, gate="noisy_top_k", name="moe")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    gate = model.get_layer("moe").gate
    kernel = np.zeros((6, 4), "float32")
    kernel[np.arange(4), np.arange(4)] = 3.0  # expert e wins where feature e is large
    if collapse:
        kernel[:, 3] = -100.0  # with positive inputs expert 3 is never in the top 2
    gate.kernel.assign(kernel)
    return model


def _events(log_dir):
    values = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return values


def _numpy_stats(model, x):
    gate = model.get_layer("moe").gate
    logits = x.astype(np.float64) @ np.asarray(gate.kernel, np.float64)
    mask = np.zeros_like(logits)
    gates = np.zeros_like(logits)
    for row, values in enumerate(logits):
        top = np.argsort(values)[-2:]
        mask[row, top] = 1.0
        e = np.exp(values[top] - values[top].max())
        gates[row, top] = e / e.sum()
    counts = mask.sum(0)
    return gates, counts


def test_writes_expected_tags_and_values(tmp_path):
    model = _model(collapse=False)
    x = np.random.default_rng(1).random((64, 6)).astype("float32")
    monitor = ExpertUtilizationMonitor(str(tmp_path), probe=x, collapse_threshold=0.0)
    monitor.set_model(model)
    monitor.on_train_begin()
    monitor.on_epoch_end(0)
    monitor.on_epoch_end(1)
    monitor.on_train_end()
    events = _events(str(tmp_path))
    expected_tags = {f"moe/expert_{e}/share" for e in range(4)} | {
        "moe/gate_entropy", "moe/load_cv", "moe/importance_cv", "moe/min_share"}
    assert expected_tags <= set(events)
    assert [step for step, _ in events["moe/load_cv"]] == [0, 1]

    gates, counts = _numpy_stats(model, x)
    share = counts / counts.sum()
    for e in range(4):
        np.testing.assert_allclose(events[f"moe/expert_{e}/share"][0][1], share[e], rtol=1e-6)
    np.testing.assert_allclose(events["moe/load_cv"][0][1], counts.std() / counts.mean(),
                               rtol=1e-5)
    importance = gates.sum(0)
    np.testing.assert_allclose(events["moe/importance_cv"][0][1],
                               importance.std() / importance.mean(), rtol=1e-4)
    entropy = -np.sum(np.where(gates > 0, gates * np.log(np.clip(gates, 1e-12, None)), 0), -1)
    np.testing.assert_allclose(events["moe/gate_entropy"][0][1], entropy.mean(), rtol=1e-4)
    assert monitor.collapses == []


def test_warns_on_collapsed_expert_during_fit(tmp_path, caplog):
    model = _model(collapse=True)
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(2).random((32, 6)).astype("float32")
    y = np.arange(32) % 2
    monitor = ExpertUtilizationMonitor(str(tmp_path / "logs"), probe=x)
    with pytest.warns(ExpertCollapseWarning, match="expert 3 of MoE layer 'moe'") as caught:
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[monitor])
    # One warning per collapse, printed once: no second copy through logging.
    assert len([w for w in caught if w.category is ExpertCollapseWarning]) == 2
    assert not [r for r in caplog.records if "collapsed" in r.getMessage()]
    assert [(epoch, layer, expert) for epoch, layer, expert, _ in monitor.collapses] == [
        (0, "moe", 3), (1, "moe", 3)]
    events = _events(str(tmp_path / "logs"))
    assert events["moe/expert_3/share"][0][1] == 0.0
    assert events["moe/min_share"][1][1] == 0.0


def test_no_warning_when_balanced(tmp_path):
    model = _model(collapse=False)
    x = np.random.default_rng(1).random((64, 6)).astype("float32")
    _, counts = _numpy_stats(model, x)
    monitor = ExpertUtilizationMonitor(str(tmp_path), probe=x,
                                       collapse_threshold=float(counts.min() / counts.sum()) / 2)
    monitor.set_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExpertCollapseWarning)
        monitor.on_epoch_end(0)


def test_expert_mixture_layers_are_monitored(tmp_path):
    model = two_domain_moe(gate="oracle", input_shape=(4, 4, 1), num_classes=3,
                           expert_filters=2, expert_units=3)
    x = np.random.default_rng(0).random((10, 4, 4, 1)).astype("float32")
    domain = np.zeros(10, "int32")  # every example in domain 0: expert 1 unused
    stats = gate_statistics(model, {"image": x, "domain": domain})
    np.testing.assert_array_equal(stats["mixture"]["counts"], [10, 0])
    monitor = ExpertUtilizationMonitor(str(tmp_path), probe={"image": x, "domain": domain})
    monitor.set_model(model)
    with pytest.warns(ExpertCollapseWarning, match="expert 1 of MoE layer 'mixture'"):
        monitor.on_epoch_end(0)


def test_argument_errors():
    with pytest.raises(ValueError, match="collapse_threshold"):
        ExpertUtilizationMonitor("logs", probe=np.zeros((1, 2)), collapse_threshold=2.0)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ExpertUtilizationMonitor("logs", probe=np.zeros((1, 2)), every_n_epochs=0)


class _LossOfLog(keras.layers.Layer):
    """Adds log(mean(x) - shift) as a loss in training: NaN once the mean is below it."""

    def __init__(self, shift, **kwargs):
        super().__init__(**kwargs)
        self.shift = shift

    def call(self, x, training=None):
        if training:
            self.add_loss(keras.ops.log(keras.ops.mean(x) - self.shift))
        return x


@pytest.mark.multi_backend
def test_stop_on_non_finite_loss_stops_at_the_first_bad_batch_and_names_the_term():
    from keras_moe.training.callbacks import StopOnNonFiniteLoss, TrainingDiverged

    inputs = keras.Input((2,))
    hidden = _LossOfLog(0.0, name="finite_term")(inputs)
    hidden = _LossOfLog(10.0, name="nan_term")(hidden)  # mean 1 - 10 < 0: log is NaN
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    model.compile("sgd", "mse")
    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")
    backup_ran = []
    later = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: backup_ran.append(e))
    stop = StopOnNonFiniteLoss(probe=x[:4], phase="joint", hint="lower the learning rate")
    with pytest.raises(TrainingDiverged) as caught:
        model.fit(x, y, batch_size=4, epochs=2, callbacks=[stop, later], verbose=0)
    error = caught.value
    assert (error.phase, error.epoch, error.batch) == ("joint", 1, 1)
    assert str(error).startswith("training diverged in phase 'joint', epoch 1, batch 1: "
                                 "the loss is nan; first non-finite term: nan_term's loss")
    assert str(error).endswith("nothing of it was saved; lower the learning rate")
    assert backup_ran == []  # no epoch end ran after the stop

    # All finite: nothing is named, and fit runs through.
    inputs = keras.Input((2,))
    fine = keras.Model(inputs, keras.layers.Dense(1)(_LossOfLog(0.0)(inputs)))
    fine.compile("sgd", "mse")
    from keras_moe.training.callbacks import first_non_finite_term

    assert first_non_finite_term(fine, x) is None
    fine.fit(x, y, batch_size=4, epochs=1, callbacks=[StopOnNonFiniteLoss(probe=x)], verbose=0)

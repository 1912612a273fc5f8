"""DeepMoE's training procedure (Procedure 1) and a gate-density controller.

Wang et al. train the embedding network, the gate heads and the base network jointly on
`J = CE + lambda L_g + mu CE(e, y)` for n0 epochs, then "freeze EmbeddingNetwork and
G^l, lambda <- 0, mu <- 0" and train n1 more epochs to refine the base network (CIFAR:
270 + 80 epochs). `train_deepmoe_two_phase` runs both phases on a compiled
`keras_moe.zoo.deepmoe.DeepMoEModel`.

Choices where the paper is silent:

- Freezing sets `trainable = False` on the `ShallowEmbedding` and on every `ReLUGate`
  head inside `model.network`. A frozen embedding runs its batch norms in inference
  mode (Keras' rule for non-trainable batch norm), so its moving statistics stop
  changing too: the gate function is fixed, weights and statistics.
- The model is then recompiled with the *same optimizer instance* and the same loss,
  metrics and other compile arguments (Keras captures the trainable variables when it
  builds the train function, so a trainable change needs a recompile). Keeping the
  instance keeps its configuration, its iteration count (a learning-rate schedule on
  iterations goes on where it was: the paper's /10 at 150 and 250 epochs spans both
  phases) and its slots (momentum) of the still-trainable base weights. Pass
  `finetune_optimizer` to use another one.
- `GateDensityTarget`, a callback to reach a gate density (wide-DeepMoE aims at "on
  average half of the convolutional channels ... selected at the inference time"; the
  paper tunes lambda by hand): it measures the fraction of open gates (> 0) on a fixed
  sample of training inputs in inference mode and multiplies lambda by `factor` when
  the density is above target, divides it when below, within bounds.

Example:

>>> model = keras_moe.zoo.deepmoe_resnet_cifar(depth=20, wide=True)
>>> model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
...               keras.losses.SparseCategoricalCrossentropy(from_logits=True),
...               metrics=["accuracy"])
>>> result = train_deepmoe_two_phase(model, train_ds, joint_epochs=270,
...                                  finetune_epochs=80, validation_data=test_ds)
>>> result.phases[-1], model.gate_l1, model.embedding_loss_weight
('finetune', 0.0, 0.0)

Reference:
    Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, Procedure 1
    and section 5 ("Training").
"""

import dataclasses

import keras
import numpy as np

from keras_moe import validation
from keras_moe.layers.gated_conv import ShallowEmbedding
from keras_moe.layers.gates import ReLUGate


def _require_deepmoe(model):
    network = getattr(model, "network", None)
    if not isinstance(network, keras.Model) or not hasattr(model, "gate_l1") or not hasattr(
        model, "embedding_loss_weight"
    ):
        raise ValueError(
            "model must be a DeepMoEModel (e.g. keras_moe.zoo.deepmoe_resnet_cifar()), "
            f"got {model!r}"
        )
    return network


def gating_layers(model):
    """The embedding network and the gate heads of a DeepMoE model.

    Args:
        model: A `DeepMoEModel`.

    Returns:
        The `ShallowEmbedding` and `ReLUGate` layers of `model.network`, in its order.

    Example:

    >>> [layer.name for layer in gating_layers(model)][:2]
    ['embedding', 'stage1_block1_conv1_gate']
    """
    network = _require_deepmoe(model)
    found = [layer for layer in network.layers if isinstance(layer, (ShallowEmbedding, ReLUGate))]
    if not found:
        raise ValueError(f"{model.name!r} has no ShallowEmbedding or ReLUGate layer")
    return found


def set_gating_trainable(model, trainable):
    """Sets `trainable` of the embedding network and every gate head (recompile after).

    Args:
        model: A `DeepMoEModel`.
        trainable: False to freeze the gating (Procedure 1, line 10), True to unfreeze.

    Returns:
        The layers changed.
    """
    layers = gating_layers(model)
    for layer in layers:
        layer.trainable = bool(trainable)
    return layers


def recompile(model, optimizer=None):
    """Compiles `model` again with its own compile arguments (and optimizer instance).

    Args:
        model: A compiled Keras model.
        optimizer: None to keep `model.optimizer` (the same instance, with its state and
            iteration count), or another optimizer.

    Returns:
        The model.
    """
    config = getattr(model, "_compile_config", None)
    if getattr(model, "optimizer", None) is None or config is None:
        raise ValueError("model must be compiled first")
    kwargs = dict(config.config)
    kwargs["optimizer"] = model.optimizer if optimizer is None else optimizer
    model.compile(**kwargs)
    return model


@dataclasses.dataclass
class DeepMoEHistory:
    """What `train_deepmoe_two_phase` returns.

    Attributes:
        joint: The `History` of the joint phase (None with 0 epochs).
        finetune: The `History` of the fine-tuning phase (None with 0 epochs).
        history: Per-metric lists over both phases, epoch by epoch (a key logged in one
            phase only, e.g. `gate_density` from `GateDensityTarget`, has that phase's
            entries only).
        phases: `"joint"` or `"finetune"` for each epoch of `history`.
    """

    joint: object
    finetune: object
    history: dict
    phases: list


def train_deepmoe_two_phase(
    model,
    train_data,
    *,
    joint_epochs,
    finetune_epochs,
    validation_data=None,
    callbacks=None,
    finetune_callbacks=None,
    finetune_optimizer=None,
    **fit_kwargs,
):
    """DeepMoE's Procedure 1: joint training, then frozen gating with lambda = mu = 0.

    Phase 1 (`joint_epochs`): `model.fit` with the model's own `gate_l1` (lambda) and
    `embedding_loss_weight` (mu). Phase 2 (`finetune_epochs`, epochs numbered on): the
    embedding network and every gate head are frozen (`set_gating_trainable(model,
    False)`), lambda and mu are set to 0, the model is recompiled (same optimizer
    instance unless `finetune_optimizer`; see the module docstring) and fit again. The
    model is left frozen with lambda = mu = 0.

    Args:
        model: A compiled `DeepMoEModel`.
        train_data: Training data for `model.fit`: a `tf.data.Dataset` of `(x, y)` or an
            `(x, y)` tuple of arrays.
        joint_epochs: Epochs of the joint phase (paper, CIFAR: 270), >= 0.
        finetune_epochs: Epochs of the fine-tuning phase (paper, CIFAR: 80), >= 0.
        validation_data: Passed to `model.fit`.
        callbacks: Callbacks of the joint phase (and of the fine-tuning phase when
            `finetune_callbacks` is None). A `GateDensityTarget` is dropped from the
            fine-tuning phase (lambda stays 0 there).
        finetune_callbacks: Callbacks of the fine-tuning phase, if different.
        finetune_optimizer: None to keep the optimizer instance, or an optimizer for
            phase 2.
        **fit_kwargs: Other `model.fit` arguments (`batch_size` for arrays, `verbose`,
            `steps_per_epoch`, ...); not `epochs`, `initial_epoch`, `x`, `y`.

    Returns:
        A `DeepMoEHistory`.

    Example:

    >>> result = train_deepmoe_two_phase(model, train_ds, joint_epochs=2,
    ...                                  finetune_epochs=1, verbose=0)
    >>> result.phases
    ['joint', 'joint', 'finetune']

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019,
        Procedure 1.
    """
    _require_deepmoe(model)
    joint_epochs = validation.integer("joint_epochs", joint_epochs, minimum=0)
    finetune_epochs = validation.integer("finetune_epochs", finetune_epochs, minimum=0)
    for key in ("epochs", "initial_epoch", "x", "y"):
        if key in fit_kwargs:
            raise ValueError(
                f"{key} must not be passed to train_deepmoe_two_phase; use train_data, "
                "joint_epochs and finetune_epochs"
            )
    if getattr(model, "optimizer", None) is None:
        raise ValueError("model must be compiled before train_deepmoe_two_phase")
    if isinstance(train_data, tuple) and len(train_data) in (2, 3):
        x, y = train_data[0], train_data[1]
        if len(train_data) == 3:
            fit_kwargs["sample_weight"] = train_data[2]
    else:
        x, y = train_data, None
    callbacks = list(callbacks or [])
    if finetune_callbacks is None:
        finetune_callbacks = [c for c in callbacks if not isinstance(c, GateDensityTarget)]

    histories = {"joint": None, "finetune": None}
    merged, phases = {}, []

    def run(phase, start, epochs, phase_callbacks):
        history = model.fit(x, y, initial_epoch=start, epochs=start + epochs,
                            validation_data=validation_data, callbacks=phase_callbacks,
                            **fit_kwargs)
        histories[phase] = history
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)
        phases.extend([phase] * len(next(iter(history.history.values()), [])))

    if joint_epochs:
        run("joint", 0, joint_epochs, callbacks)
    set_gating_trainable(model, False)
    model.gate_l1 = 0.0
    model.embedding_loss_weight = 0.0
    recompile(model, finetune_optimizer)
    if finetune_epochs:
        run("finetune", joint_epochs, finetune_epochs, list(finetune_callbacks))
    return DeepMoEHistory(histories["joint"], histories["finetune"], merged, phases)


class GateDensityTarget(keras.callbacks.Callback):
    """Callback: adapts lambda (`model.gate_l1`) until the gate density reaches a target.

    Every `every` batches (or at each epoch end with `every="epoch"`) it measures the
    density `d`, the fraction of open gates (> 0) over all gated channels and the
    examples of `data` (a fixed sample of training inputs, run in inference mode), and
    sets

        lambda <- min(lambda * factor, max_gate_l1)   if d > target + tolerance
                                                      and d did not fall since the
                                                      last measurement
        lambda <- max(lambda / factor, min_gate_l1)   if d < target - tolerance

    and otherwise keeps lambda (a lambda of 0 is first raised to `min_gate_l1`). The
    hold while the density falls (`hold_while_falling`) damps the loop: the density
    only counts gates at exactly zero, so it stays at 1 while lambda grows, then
    drops fast once the gates reach zero; raising lambda further then overshoots.
    Each measurement is appended to `self.records` as `(batches seen, density, lambda after the update)`; the last
    density and lambda are added to the epoch logs as `gate_density` and `gate_l1`.

    Choices where the paper is silent (it sets lambda by hand, in [0.001, 8] for its sum
    normalisation; `DeepMoEModel` uses a mean, see its docstring): a multiplicative,
    bounded rule (lambda spans orders of magnitude); the density of inference-mode
    gates (what the FLOPs count sees). Gates that the L1 term drives below zero get no
    gradient through the ReLU and may stay closed, so keep `factor` moderate.

    Args:
        target_density: Wanted fraction of open gates, in (0, 1] (wide-DeepMoE: 0.5).
        data: Training images `(N, H, W, C)` (or an `(images, labels)` tuple) on which
            the density is measured; a few hundred examples suffice. Required unless
            `density_fn` is given.
        every: `"epoch"` or a number of batches >= 1.
        factor: Multiplier per update, > 1.
        tolerance: Dead band around the target, >= 0.
        min_gate_l1: Lower bound of lambda, > 0.
        max_gate_l1: Upper bound of lambda, >= min_gate_l1.
        density_fn: Optional `density_fn(model) -> float` replacing the measurement.
        hold_while_falling: Do not raise lambda while the density is falling.
        batch_size: Batch size of the measurement.

    Example:

    >>> model.fit(x, y, epochs=10,
    ...           callbacks=[GateDensityTarget(0.5, data=x[:512], every=50)])

    Reference:
        Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019, sec.
        5.1.1.
    """

    def __init__(self, target_density, data=None, every="epoch", factor=1.5, tolerance=0.02,
                 min_gate_l1=1e-3, max_gate_l1=1e4, density_fn=None,
                 hold_while_falling=True, batch_size=256):
        super().__init__()
        self.target_density = validation.number(
            "target_density", target_density, minimum=0, maximum=1, exclusive_minimum=True
        )
        if every != "epoch":
            every = validation.positive_int("every", every)
        self.every = every
        self.factor = validation.number("factor", factor, minimum=1, exclusive_minimum=True)
        self.tolerance = validation.non_negative_float("tolerance", tolerance)
        self.min_gate_l1 = validation.positive_float("min_gate_l1", min_gate_l1)
        self.max_gate_l1 = validation.number(
            "max_gate_l1", max_gate_l1, minimum=self.min_gate_l1
        )
        if data is None and density_fn is None:
            raise ValueError("GateDensityTarget needs data (training images) or density_fn")
        if data is not None and isinstance(data, tuple):
            data = data[0]
        self.data = None if data is None else np.asarray(data)
        self.density_fn = density_fn
        self.hold_while_falling = bool(hold_while_falling)
        self.batch_size = validation.positive_int("batch_size", batch_size)
        self.records = []
        self._seen = 0

    def measure(self):
        """The current density (float in [0, 1])."""
        if self.density_fn is not None:
            return float(self.density_fn(self.model))
        from keras_moe.analysis.flops import gate_density

        return gate_density(self.model, self.data, overall=True, batch_size=self.batch_size)

    def update(self):
        """Measures the density and updates lambda once; returns `(density, lambda)`."""
        density = self.measure()
        gate_l1 = self.model.gate_l1
        falling = bool(self.records) and density < self.records[-1][1]
        if density > self.target_density + self.tolerance and not (
            falling and self.hold_while_falling
        ):
            gate_l1 = min(max(gate_l1, self.min_gate_l1) * self.factor, self.max_gate_l1)
        elif density < self.target_density - self.tolerance:
            gate_l1 = max(gate_l1 / self.factor, self.min_gate_l1)
        self.model.gate_l1 = gate_l1
        self.records.append((self._seen, density, gate_l1))
        return density, gate_l1

    def on_train_begin(self, logs=None):
        _require_deepmoe(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self.every != "epoch" and self._seen % self.every == 0:
            self.update()

    def on_epoch_end(self, epoch, logs=None):
        if self.every == "epoch":
            self.update()
        if logs is not None and self.records:
            logs["gate_density"] = self.records[-1][1]
            logs["gate_l1"] = self.records[-1][2]

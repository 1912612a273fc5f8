"""Eigen et al.'s training procedure: the constrained phase, then the constraint lifted.

Eigen et al. (paper 001) train a deep mixture of experts in two phases: first with the
running-assignment constraint in place (an expert whose running total of gate values
runs more than a margin `m` ahead of the mean is switched off for the example), then
with the constraint lifted, "in a second fine-tuning phase". The constraint lives in
`MoEDense(assignment_margin=m)`; the helpers that switch it for every such layer of a
model are the Eigen family's (`keras_moe.zoo.eigen`). Here: `train_eigen_two_phase`
(two phases through `keras_moe.training.phases.run_phases`) and the
`LiftAssignmentConstraint` callback (both phases inside one `fit`).

Choices where the paper is silent: the running totals start from zero at the start of
the constrained phase (`reset_totals=True`); the fine-tuning phase keeps the optimizer
and its state, optionally with a new learning rate (`free_learning_rate`).

Example:

>>> from keras_moe.zoo import eigen
>>> model = eigen.dmoe_mnist()
>>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> history = train_eigen_two_phase(model, x, y, constrained_epochs=2, free_epochs=1)
>>> history.phases
['constrained', 'constrained', 'free']

Reference:
    Eigen, Ranzato & Sutskever, "Learning Factored Representations in a Deep Mixture of
    Experts", 2013, section 3.
"""

import dataclasses

import keras

from keras_moe import validation
from keras_moe.recipes import Phase
from keras_moe.training.phases import run_phases
from keras_moe.zoo.eigen import EIGEN
from keras_moe.zoo.eigen_constraint import (
    constrained_moe_layers,
    require_constrained_layers,
    reset_assignment_totals,
    set_assignment_constraints,
)

__all__ = ["LiftAssignmentConstraint", "TwoPhaseHistory", "constrained_moe_layers",
           "reset_assignment_totals", "set_assignment_constraints", "train_eigen_two_phase"]


class LiftAssignmentConstraint(keras.callbacks.Callback):
    """Callback: constraint on before epoch `lift_at_epoch`, off from it (0-based).

    At the start of every epoch it sets the running-assignment constraint of every
    `MoEDense(assignment_margin=m)` of the model to `epoch < lift_at_epoch`, so one
    `model.fit(..., epochs=E)` runs Eigen et al.'s constrained phase for
    `lift_at_epoch` epochs and the free fine-tuning phase for the rest (resuming with
    `initial_epoch` works too). `lifted_at` records the epoch it was lifted.

    Args:
        lift_at_epoch: First epoch (0-based) without the constraint, >= 0.
        reset_totals: Zero the running totals when training starts inside the
            constrained phase.

    Example:

    >>> model.fit(x, y, epochs=5, callbacks=[LiftAssignmentConstraint(3)])

    Reference:
        Eigen, Ranzato & Sutskever, 2013, section 3.
    """

    def __init__(self, lift_at_epoch, reset_totals=True):
        super().__init__()
        self.lift_at_epoch = validation.integer("lift_at_epoch", lift_at_epoch, minimum=0)
        self.reset_totals = bool(reset_totals)
        self.lifted_at = None

    def on_train_begin(self, logs=None):
        self._layers = require_constrained_layers(self.model)
        self._started = False

    def on_epoch_begin(self, epoch, logs=None):
        active = epoch < self.lift_at_epoch
        if not self._started and active and self.reset_totals:
            for layer in self._layers:
                layer.reset_assignment_totals()
        self._started = True
        for layer in self._layers:
            layer.set_assignment_constraint(active)
        if not active and self.lifted_at is None:
            self.lifted_at = epoch

    def get_config(self):
        return {"lift_at_epoch": self.lift_at_epoch, "reset_totals": self.reset_totals}


@dataclasses.dataclass
class TwoPhaseHistory:
    """What `train_eigen_two_phase` returns.

    Attributes:
        constrained: The `History` of the constrained phase (None if it had 0 epochs).
        free: The `History` of the fine-tuning phase (None if it had 0 epochs).
        history: Per-metric lists over both phases, epoch by epoch.
        phases: `"constrained"` or `"free"` for each epoch of `history`.
    """

    constrained: object
    free: object
    history: dict
    phases: list


class _SetLearningRate(keras.callbacks.Callback):
    def __init__(self, learning_rate):
        super().__init__()
        self.learning_rate = learning_rate

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate.assign(self.learning_rate)


def train_eigen_two_phase(
    model,
    x=None,
    y=None,
    *,
    constrained_epochs,
    free_epochs,
    free_learning_rate=None,
    reset_totals=True,
    callbacks=None,
    **fit_kwargs,
):
    """Eigen et al.'s training: constrained phase, then the constraint lifted.

    Runs `model.fit` for `constrained_epochs` with the running-assignment constraint of
    every `MoEDense(assignment_margin=m)` switched on, then switches it off and runs
    `free_epochs` more (epochs numbered on from the first phase). The model must be
    compiled. The constraint is left off at the end (inference never applies it).

    Args:
        model: A compiled Keras model with at least one constrained `MoEDense`.
        x: Training inputs, as for `model.fit` (arrays or a `tf.data.Dataset`).
        y: Training targets, as for `model.fit`.
        constrained_epochs: Epochs with the constraint, >= 0.
        free_epochs: Fine-tuning epochs without it, >= 0.
        free_learning_rate: None to keep the optimizer's learning rate, or a new
            learning rate (> 0) for the fine-tuning phase (the paper gives none).
        reset_totals: Zero the running totals before the constrained phase.
        callbacks: Callbacks for both phases.
        **fit_kwargs: Other `model.fit` arguments (batch_size, validation_data,
            verbose, ...); not `epochs` or `initial_epoch`.

    Returns:
        A `TwoPhaseHistory`.

    Example:

    >>> history = train_eigen_two_phase(model, x, y, constrained_epochs=3,
    ...                                 free_epochs=2, batch_size=128, verbose=0)
    >>> history.phases
    ['constrained', 'constrained', 'constrained', 'free', 'free']

    Reference:
        Eigen, Ranzato & Sutskever, 2013, section 3.
    """
    constrained_epochs = validation.integer("constrained_epochs", constrained_epochs, 0)
    free_epochs = validation.integer("free_epochs", free_epochs, 0)
    if free_learning_rate is not None:
        validation.positive_float("free_learning_rate", free_learning_rate)
    for key in ("epochs", "initial_epoch"):
        if key in fit_kwargs:
            raise ValueError(
                f"{key} must not be passed to train_eigen_two_phase; use "
                "constrained_epochs and free_epochs"
            )
    if getattr(model, "optimizer", None) is None:
        raise ValueError("model must be compiled before train_eigen_two_phase")
    require_constrained_layers(model)
    extra = {}
    if free_learning_rate is not None:
        if not hasattr(model.optimizer.learning_rate, "assign"):
            raise ValueError(
                "free_learning_rate needs an optimizer with a constant learning rate "
                "(a variable), not a schedule"
            )
        extra[1] = [_SetLearningRate(free_learning_rate)]

    def fit(index, phase, start, stop, phase_callbacks):
        return model.fit(x, y, initial_epoch=start, epochs=stop, callbacks=phase_callbacks,
                         **fit_kwargs)

    phases = [Phase("constrained", constrained_epochs, assignment_constraint=True),
              Phase("free", free_epochs, assignment_constraint=False)]
    record = run_phases(model, phases, fit, family=EIGEN, callbacks=callbacks or (),
                        resumed=() if reset_totals else (0,),
                        phase_callbacks=lambda index, phase: extra.get(index, []))
    return TwoPhaseHistory(record.histories["constrained"], record.histories["free"],
                           record.history, record.phases)

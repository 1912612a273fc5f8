"""Training phases of the papers.

Eigen et al. (paper 001) train a deep mixture of experts in two phases: first with the
running-assignment constraint in place (an expert whose running total of gate values
runs more than a margin `m` ahead of the mean is switched off for the example), then
with the constraint lifted, "in a second fine-tuning phase". The constraint lives in
`MoEDense(assignment_margin=m)`; this module switches it for every such layer of a
model, either with `train_eigen_two_phase` (two `fit` calls) or with the
`LiftAssignmentConstraint` callback inside one `fit`.

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
from keras_moe.layers import MoEDense


def _all_layers(model):
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=True, recursive=True))
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


def constrained_moe_layers(model):
    """Every `MoEDense` in `model` (nested models included) with an assignment margin.

    Args:
        model: A Keras model or layer.

    Returns:
        A list of `MoEDense` layers with `assignment_margin` set, in the model's order.
    """
    layers, seen = [], set()
    for layer in _all_layers(model):
        if isinstance(layer, MoEDense) and layer.assignment_margin is not None:
            if id(layer) not in seen:
                seen.add(id(layer))
                layers.append(layer)
    return layers


def _require_layers(model):
    layers = constrained_moe_layers(model)
    if not layers:
        raise ValueError(
            "model has no MoEDense layer with `assignment_margin` set; Eigen's two-phase "
            "training needs at least one (e.g. keras_moe.zoo.dmoe_mnist())."
        )
    unbuilt = [layer.name for layer in layers if not layer.built]
    if unbuilt:
        raise ValueError(
            f"MoEDense layers {unbuilt} are not built yet; call the model on data (or "
            "build it) before switching the assignment constraint."
        )
    return layers


def set_assignment_constraints(model, active):
    """Switches the running-assignment constraint of every constrained `MoEDense` on/off.

    Args:
        model: A built Keras model with at least one `MoEDense(assignment_margin=m)`.
        active: True for the constrained phase, False for the fine-tuning phase.

    Returns:
        The layers switched.
    """
    layers = _require_layers(model)
    for layer in layers:
        layer.set_assignment_constraint(bool(active))
    return layers


def reset_assignment_totals(model):
    """Zeroes the running assignment totals of every constrained `MoEDense`.

    Args:
        model: A built Keras model with at least one `MoEDense(assignment_margin=m)`.

    Returns:
        The layers reset.
    """
    layers = _require_layers(model)
    for layer in layers:
        layer.reset_assignment_totals()
    return layers


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
        self._layers = _require_layers(self.model)
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


class PhaseLog:
    """Histories of consecutive `model.fit` phases, merged epoch by epoch.

    `add(name, history)` files one phase's `History`; `histories[name]` is that
    History, `merged` the per-metric lists over all phases (a key logged in one phase
    only has that phase's entries) and `phases` the phase name of each epoch.
    """

    def __init__(self, names):
        self.histories = {name: None for name in names}
        self.merged = {}
        self.phases = []

    def add(self, name, history):
        self.histories[name] = history
        for key, values in history.history.items():
            self.merged.setdefault(key, []).extend(values)
        self.phases.extend([name] * len(next(iter(history.history.values()), [])))


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
    _require_layers(model)

    log = PhaseLog(("constrained", "free"))

    def run(phase, start, epochs):
        log.add(phase, model.fit(x, y, initial_epoch=start, epochs=start + epochs,
                                 callbacks=callbacks, **fit_kwargs))

    if constrained_epochs:
        if reset_totals:
            reset_assignment_totals(model)
        set_assignment_constraints(model, True)
        run("constrained", 0, constrained_epochs)
    set_assignment_constraints(model, False)
    if free_epochs:
        if free_learning_rate is not None:
            learning_rate = model.optimizer.learning_rate
            if not hasattr(learning_rate, "assign"):
                raise ValueError(
                    "free_learning_rate needs an optimizer with a constant learning rate "
                    "(a variable), not a schedule"
                )
            learning_rate.assign(free_learning_rate)
        run("free", constrained_epochs, free_epochs)
    return TwoPhaseHistory(log.histories["constrained"], log.histories["free"], log.merged,
                           log.phases)

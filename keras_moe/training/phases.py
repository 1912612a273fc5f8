"""The phase runner: a sequence of training phases, each with its settings, on one model.

A recipe's `[[phases]]` (`keras_moe.recipes.Phase`) run in order, their epochs numbered
on. Every way of training here goes through `run_phases`: `keras-moe train`
(`keras_moe.training.runner`), every `keras-moe tune` trial, `keras-moe bench`, and the
papers' procedures (`train_deepmoe_two_phase`, `train_eigen_two_phase`), which are thin
wrappers that make their two phases and call it.

What a phase's settings do comes from the model's family
(`keras_moe.zoo.ModelFamily.phase_settings`): `apply_phase` looks each setting up there,
refuses one the family does not know (naming the families that do), applies it, and
collects the callbacks it asks for (DeepMoE's density controller). A change of
trainability recompiles the model with its own compile arguments and the optimizer's
state carried over: its iteration count (the learning-rate schedule) and the slots of
every variable that stays trainable, in an optimizer of the same configuration built for
the new trainable set (JAX's stateless optimizer step needs the two to match; the
update is the one the old optimizer would make on the remaining variables).

Example:

>>> from keras_moe.recipes import Phase
>>> phases = [Phase("joint", 2), Phase("finetune", 1, freeze_gating=True, gate_l1=0.0)]
>>> history = run_phases(model, phases, fit=lambda index, phase, start, stop, callbacks:
...     model.fit(x, y, initial_epoch=start, epochs=stop, callbacks=callbacks),
...     family=keras_moe.zoo.get_family("deepmoe_resnet56"))
>>> history.phases
['joint', 'joint', 'finetune']
"""

import dataclasses

from keras_moe import compat
from keras_moe.recipes import PHASE_SETTINGS, RecipeError
from keras_moe.zoo.registry import PhaseContext

__all__ = ["PhaseHistory", "apply_phase", "check_phase_settings", "optimizer_for_trainable",
           "phase_spans", "recompile", "run_phases", "setting_families"]


def recompile(model, optimizer=None):
    """Compiles `model` again with its own compile arguments (and optimizer state).

    Args:
        model: A compiled Keras model.
        optimizer: None to carry `model.optimizer`'s state over (see
            `optimizer_for_trainable`), or another optimizer.

    Returns:
        The model.
    """
    arguments = compat.compile_arguments(model)
    if getattr(model, "optimizer", None) is None or arguments is None:
        raise ValueError("model must be compiled first")
    arguments["optimizer"] = optimizer_for_trainable(model) if optimizer is None else optimizer
    model.compile(**arguments)
    return model


def optimizer_for_trainable(model):
    """`model.optimizer`'s state, in an optimizer built for the current trainable set.

    An unbuilt optimizer is returned as it is (it builds on the first step). A built one
    is copied from its configuration, built on `model.trainable_variables`, and given
    every state variable of the old one that it has too (matched by path: the iteration
    count, a variable learning rate, and each remaining variable's slots, whose names
    Keras derives from that variable's path); the slots of variables no longer
    trainable are dropped. TensorFlow's optimizer would also update a subset with its
    old state, JAX's stateless one needs a state that matches the variables 1:1.
    """
    old = model.optimizer
    if not old.built:
        return old
    new = type(old).from_config(old.get_config())
    new.build(model.trainable_variables)
    state = {v.path: v for v in old.variables}
    for variable in new.variables:
        if variable.path in state:
            variable.assign(state[variable.path])
    return new


def setting_families(key):
    """Names of the registered families whose models understand phase setting `key`."""
    from keras_moe import zoo

    return sorted(name for name, family in zoo.list_families().items()
                  if key in family.phase_settings)


def _undefined_setting(phase, key, family, model_name):
    owners = setting_families(key)
    return RecipeError(
        f"phase {phase.name!r}: {key} applies to models of the {' or '.join(owners) or 'no'} "
        f"family, and {model_name!r} is a {family.name} model")


def check_phase_settings(recipe):
    """Refuses, before any data is read or model built, a phase setting that the recipe's
    model family does not define.

    Raises:
        RecipeError: The setting, the families that define it and the model's family.
    """
    from keras_moe import zoo

    family = zoo.get_family(recipe.model.name)
    for phase in recipe.phases:
        for key in PHASE_SETTINGS:
            if getattr(phase, key) is not None and key not in family.phase_settings:
                raise _undefined_setting(phase, key, family, recipe.model.name)


def apply_phase(model, phase, family, context=None):
    """Applies `phase`'s settings to `model` as its family defines them.

    Args:
        model: The compiled model.
        phase: A `keras_moe.recipes.Phase`.
        family: The model's `keras_moe.zoo.ModelFamily`.
        context: A `keras_moe.zoo.PhaseContext` (default: a starting phase, no data).

    Returns:
        `(recompiled, callbacks)`: whether the model was recompiled, and the callbacks
        the settings ask for during the phase.

    Raises:
        RecipeError: A setting the family does not define (the message names the
            families that do), or one that needs the data without it.
    """
    context = context or PhaseContext(phase)
    recompiling, callbacks = False, []
    for key in PHASE_SETTINGS:
        value = getattr(phase, key)
        if value is None:
            continue
        setting = family.phase_settings.get(key)
        if setting is None:
            raise _undefined_setting(phase, key, family, model.name)
        if setting.needs_data and context.data is None:
            raise RecipeError(f"phase {phase.name!r}: {key} needs the training data")
        try:
            if setting.apply is not None:
                recompiling = bool(setting.apply(model, value, context)) or recompiling
            if setting.callbacks is not None:
                callbacks.extend(setting.callbacks(model, value, context))
        except ValueError as error:
            if isinstance(error, RecipeError):
                raise
            raise RecipeError(f"phase {phase.name!r}: {key}: {error}") from error
    if recompiling:
        recompile(model)
    return recompiling, callbacks


def phase_spans(phases):
    """`[(first epoch, end epoch)]` of each phase, epochs numbered on across phases."""
    spans, first = [], 0
    for phase in phases:
        spans.append((first, first + phase.epochs))
        first += phase.epochs
    return spans


@dataclasses.dataclass
class PhaseHistory:
    """What `run_phases` returns.

    Attributes:
        histories: `{phase name: the History of its fit}` (None for a phase that trained
            no epoch here).
        history: Per-metric lists over all phases, epoch by epoch (a key logged in one
            phase only has that phase's entries).
        phases: The phase name of each epoch of `history`.
        last_logs: The last epoch's logs (empty if no epoch ran).
    """

    histories: dict
    history: dict
    phases: list
    last_logs: dict

    def add(self, name, history):
        self.histories[name] = history
        if history is None:
            return
        for key, values in history.history.items():
            self.history.setdefault(key, []).extend(values)
        epochs = len(next(iter(history.history.values()), []))
        self.phases.extend([name] * epochs)
        if epochs:
            self.last_logs = {k: float(v[-1]) for k, v in history.history.items() if v}


def run_phases(model, phases, fit, *, family, data=None, probe=None, start_epoch=0,
               stop_epoch=None, restored_phases=0, resumed=(), callbacks=(),
               phase_callbacks=None, after_phase=None, recompile_with=None, verbose=0):
    """Runs `phases` on `model` in order: each phase's settings, then its epochs.

    Args:
        model: The compiled model.
        phases: `keras_moe.recipes.Phase` objects (a recipe's `phases`).
        fit: `fit(index, phase, start, stop, callbacks) -> History or None`: trains
            epochs `[start, stop)` of phase `index` (e.g. `model.fit(...,
            initial_epoch=start, epochs=stop, callbacks=callbacks)`).
        family: The model's `keras_moe.zoo.ModelFamily` (what the settings do).
        data: The `RecipeData`, for settings that need the training data.
        probe: Inputs for settings that measure the model (default `data.probe`).
        start_epoch: Epochs before this are done (a continued run): phases ending before
            it only get their settings re-applied, not as starting phases.
        stop_epoch: Train up to this epoch (None: all); later phases are not applied.
        restored_phases: This many leading phases are skipped entirely: the model was
            restored from a state that already has their settings (a phase checkpoint).
        resumed: Indices of phases continued part-way (from a backup): their settings
            are applied, their start-of-phase steps are not redone.
        callbacks: Callbacks for every phase.
        phase_callbacks: `phase_callbacks(index, phase) -> list` of more callbacks.
        after_phase: `after_phase(index, phase)`, called once each applied phase is done.
        recompile_with: `recompile_with(index, phase) -> optimizer or None`: an optimizer
            to recompile with before the phase (None: keep the model's).
        verbose: Progress output of the settings (e.g. the t-SNE map's fit).

    Returns:
        A `PhaseHistory`.

    Raises:
        RecipeError: A phase setting the family does not define, or that needs data.
    """
    spans = phase_spans(phases)
    total = spans[-1][1] if spans else 0
    stop = total if stop_epoch is None else min(int(stop_epoch), total)
    if probe is None and data is not None:
        probe = data.probe
    record = PhaseHistory({p.name: None for p in phases}, {}, [], {})
    for index, (phase, (first, last)) in enumerate(zip(phases, spans)):
        if index < restored_phases:
            continue
        if index > 0 and (first > stop or (first == stop and phase.epochs > 0)):
            break
        starting = first >= start_epoch and index not in resumed
        context = PhaseContext(phase, starting=starting, data=data, probe=probe,
                               verbose=verbose)
        optimizer = recompile_with(index, phase) if recompile_with else None
        if optimizer is not None:
            recompile(model, optimizer)
        _, setting_callbacks = apply_phase(model, phase, family, context)
        start, end = max(first, start_epoch), min(last, stop)
        if end > start:
            extra = list(phase_callbacks(index, phase)) if phase_callbacks else []
            record.add(phase.name, fit(index, phase, start, end,
                                       list(callbacks) + setting_callbacks + extra))
        if after_phase is not None:
            after_phase(index, phase)
    return record

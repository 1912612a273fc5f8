"""A `keras-moe tune` trial: the recipe with the trial's values, its phases scaled to the
trial's length, trained through the phase runner.

`scale_phases(recipe, epochs)` shortens (or lengthens) a recipe's phases in proportion;
`RecipeHyperModel` is the keras-tuner `HyperModel` whose `build` is the trial's compiled
model and whose `fit` runs the trial's phases with `keras_moe.training.phases.run_phases`
(the same settings, data and callbacks as `keras-moe train`), validating on the split
held out from the training data.
"""

from __future__ import annotations

import math

import keras_tuner

from keras_moe.tuning.space import TuningError, _literal

__all__ = ["OBJECTIVE", "RecipeHyperModel", "scale_phases"]

OBJECTIVE = "val_accuracy"


def _distribute(total, weights):
    """`total` split in proportion to `weights` (largest remainder); every positive
    weight gets at least 1 when `total` allows."""
    positive = [i for i, w in enumerate(weights) if w > 0]
    shares = [0] * len(weights)
    if not positive:
        return shares
    floor = 1 if total >= len(positive) else 0
    rest = total - floor * len(positive)
    weight_sum = sum(weights[i] for i in positive)
    exact = {i: rest * weights[i] / weight_sum for i in positive}
    for i in positive:
        shares[i] = floor + int(math.floor(exact[i]))
    left = total - sum(shares)
    order = sorted(positive, key=lambda i: (-(exact[i] - math.floor(exact[i])), -weights[i], i))
    for i in order[:left]:
        shares[i] += 1
    return shares


def scale_phases(recipe, epochs):
    """`recipe` with its phases scaled to `epochs` epochs in all, in proportion.

    Largest-remainder rounding; every phase that trains keeps at least one epoch when
    `epochs` is at least the number of such phases (else the longest phases get them);
    phases with 0 epochs stay at 0 (their settings still apply). `step` schedule
    boundaries are scaled alike (those that fall on or past the end are dropped).

    Args:
        recipe: A `keras_moe.recipes.Recipe`.
        epochs: Epochs in all, >= 1; None returns `recipe` unchanged.

    Returns:
        A valid `Recipe` (built through `Recipe.override`).

    Example:

    >>> [p.epochs for p in scale_phases(deepmoe_recipe, 4).phases]   # was 6 + 2
    [3, 1]
    """
    if epochs is None or epochs == recipe.total_epochs:
        return recipe
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise TuningError(f"epochs must be None or an integer >= 1, got {epochs!r}")
    old_total = recipe.total_epochs
    shares = _distribute(epochs, [p.epochs for p in recipe.phases])
    assignments = [f"phases.{i}.epochs={n}" for i, n in enumerate(shares)]
    if recipe.schedule.boundaries:
        scaled = sorted({int(round(b * epochs / old_total)) for b in recipe.schedule.boundaries})
        scaled = [b for b in scaled if 0 < b < epochs]
        assignments.append(f"schedule.boundaries={_literal(scaled)}")
    return recipe.override(assignments)


class RecipeHyperModel(keras_tuner.HyperModel):
    """A `keras_tuner.HyperModel` over a recipe: `build(hp)` is the trial's compiled model,
    `fit(hp, model, ...)` runs the trial's phases and returns its final metrics (the
    `val_` ones measured on the data's validation split).

    It works with any keras-tuner tuner (`tune_recipe` uses RandomSearch and Hyperband).

    Args:
        recipe: The `keras_moe.recipes.Recipe` searched.
        data: The `RecipeData` of `recipe` (`build_datasets` with a validation split),
            shared by trials.
        space: The `SearchSpace`.
        epochs: Epochs per trial (None: the recipe's phases as they are).
        seed: Seed set before every trial's model is built.
        fit_verbose: `model.fit` verbosity.
    """

    def __init__(self, recipe, data, space, *, epochs=None, seed=0, fit_verbose=0):
        super().__init__(name=recipe.name, tunable=True)
        self.recipe, self.data, self.space = recipe, data, space
        self.epochs, self.seed, self.fit_verbose = epochs, seed, fit_verbose

    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def trial_recipe(self, hp):
        """The recipe a trial with `hp` runs: its values applied, phases scaled."""
        values = self.space.declare(hp)
        return scale_phases(self.space.apply(values, self.recipe), self.epochs)

    def build(self, hp):
        import keras

        from keras_moe.training import runner

        recipe = self.trial_recipe(hp)
        keras.utils.set_random_seed(self.seed)
        model = runner.build_model(recipe, self.data)
        runner.compile_model(model, recipe, self.data.steps_per_epoch)
        # Built now, over every trainable variable (as fit would build it): keras-tuner's
        # saved trial weights, optimizer state included, then load back whole.
        model.optimizer.build(model.trainable_variables)
        return model

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0,
            verbose=None, **kwargs):
        """Runs the trial's phases over epochs `[initial_epoch, epochs)` of its plan.

        Hyperband continuing an earlier trial passes `initial_epoch`: the learning-rate
        schedule goes on from there and the settings of the phases passed are applied
        again (not as starting phases). `search(verbose=)` is keras-tuner's display's;
        `model.fit` runs with `fit_verbose`.
        """
        from keras_moe import zoo
        from keras_moe.training.callbacks import StopOnNonFiniteLoss
        from keras_moe.training.phases import run_phases

        recipe = self.trial_recipe(hp)
        data = self.data
        end = recipe.total_epochs if epochs is None else min(int(epochs), recipe.total_epochs)
        initial_epoch = int(initial_epoch or 0)
        if initial_epoch:
            model.optimizer.iterations.assign(initial_epoch * data.steps_per_epoch)

        def fit_phase(index, phase, start, stop, phase_callbacks):
            # A trial that diverges raises TrainingDiverged: keras-tuner records it as a
            # failed trial (with the message) and the search goes on.
            phase_callbacks = [StopOnNonFiniteLoss(probe=data.probe, phase=phase.name)
                               ] + list(phase_callbacks)
            return model.fit(data.train_epochs(start, stop), steps_per_epoch=data.steps_per_epoch,
                             validation_data=data.validation, initial_epoch=start, epochs=stop,
                             callbacks=phase_callbacks, verbose=self.fit_verbose,
                             shuffle=False)  # the epochs are shuffled from (seed, epoch)

        record = run_phases(model, recipe.phases, fit_phase,
                            family=zoo.get_family(recipe.model.name), data=data,
                            start_epoch=initial_epoch, stop_epoch=end,
                            callbacks=callbacks or (), verbose=self.fit_verbose)
        logs = dict(record.last_logs)
        if OBJECTIVE not in logs:
            metrics = model.evaluate(data.validation, return_dict=True, verbose=0)
            logs.update({f"val_{k}": float(v) for k, v in metrics.items()})
        return logs

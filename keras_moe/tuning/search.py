"""`tune_recipe`: the keras-tuner search over a recipe, its budgets, and its result.

See `keras_moe.tuning` for how a search runs and what it writes.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import keras_tuner

from keras_moe import compat
from keras_moe import recipes as _recipes
from keras_moe.recipes import RecipeError
from keras_moe.tuning.space import TuningError, _fmt, _is_number, _literal, build_search_space
from keras_moe.tuning.trials import OBJECTIVE, RecipeHyperModel, scale_phases

__all__ = ["DEFAULT_VALIDATION", "TUNERS", "TuneResult", "tune_recipe"]

TUNERS = ("random", "hyperband")
DEFAULT_VALIDATION = 0.1


def _budgeted(base):
    """`base` (a keras-tuner tuner class) with a wall-clock budget and no exploratory builds."""

    class Budgeted(base):
        def __init__(self, *args, deadline=None, **kwargs):
            self.deadline = deadline
            self.stopped_by_time = False
            super().__init__(*args, **kwargs)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                created = len(self.oracle.trials)
                if self.oracle.max_trials is None or created < self.oracle.max_trials:
                    self.stopped_by_time = True
                    self.oracle.max_trials = created  # the oracle then stops the search

    def populate_initial_space(self):
        # keras-tuner builds the model once per conditional scope to discover the space;
        # the RecipeHyperModel declares it all without building anything.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    compat.override(Budgeted, compat.POPULATE_INITIAL_SPACE, populate_initial_space)
    Budgeted.__name__ = Budgeted.__qualname__ = f"Budgeted{base.__name__}"
    return Budgeted


# result -------------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneResult:
    """What `tune_recipe` returns.

    Attributes:
        best_recipe: The tuned `Recipe` (original phases, best values).
        best_recipe_path: Where it was written (`<out>/best_recipe.toml`).
        best_value: The best trial's `val_accuracy`.
        best_hyperparameters: The best trial's recipe values, `{recipe key: value}`.
        trials: Trials run (failed ones included).
        seconds: Wall time of the whole call (data loading included).
        tuner: `"random"` or `"hyperband"`.
        directory: The tuning directory `out`.
        epochs_per_trial: Epochs of a full trial.
        stopped_by: Why the search ended: `"max_trials"`, `"time budget"` or
            `"tuner"` (the search space or Hyperband's schedule ran out).
        rows: One dict per trial: `trial`, `status`, `epochs`, `value`, `values`.
        best_trial: The best trial's id.
        keys: The searched keys, in order.
        test_examples: Test examples the best trial's model was measured on, once.
        validation_examples: Training examples held out; the objective's data.
        test_metrics: The best trial's model on the test split (`loss`, `accuracy`),
            measured once, after the search.
        best_model: The best trial's model (keras-tuner's checkpoint of it).
    """

    best_recipe: object
    best_recipe_path: pathlib.Path
    best_value: float
    best_hyperparameters: dict
    trials: int
    seconds: float
    tuner: str = "random"
    directory: pathlib.Path = None
    epochs_per_trial: int = None
    stopped_by: str = "max_trials"
    rows: list = dataclasses.field(default_factory=list)
    best_trial: str = None
    keys: list = dataclasses.field(default_factory=list)
    test_examples: int = None
    validation_examples: int = None
    test_metrics: dict = dataclasses.field(default_factory=dict)
    best_model: object = dataclasses.field(default=None, repr=False)

    def summary(self):
        """A text report: the search, a table of the trials, the best trial and recipe."""
        kind = "random search" if self.tuner == "random" else "Hyperband"
        lines = [
            f"keras-moe tune: {kind}, {self.trials} trial(s) in {self.seconds:.1f} s "
            f"(stopped by {self.stopped_by})",
            f"objective: {OBJECTIVE} on a validation split held out from the training data "
            f"({self.validation_examples} examples) after up to {self.epochs_per_trial} "
            "epoch(s) per trial",
            "",
        ]
        header = ["trial", "status", "epochs", OBJECTIVE] + list(self.keys)
        table = [header]
        for row in self.rows:
            value = "-" if row["value"] is None else f"{row['value']:.4f}"
            marker = " *" if row["trial"] == self.best_trial else ""
            cells = [f"{row['trial']}{marker}", row["status"], str(row["epochs"]), value]
            cells += [_fmt(row["values"].get(k, "-")) for k in self.keys]
            table.append(cells)
        widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
        for cells in table:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        lines += ["", f"best: trial {self.best_trial}, {OBJECTIVE} {self.best_value:.4f}"]
        for key, value in self.best_hyperparameters.items():
            lines.append(f"  {key} = {_literal(value)}")
        if self.test_metrics:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.test_metrics.items())
            lines.append(f"test split ({self.test_examples} examples), measured once, for the "
                         f"best trial's model only: {metrics}")
        lines.append(f"best recipe: {self.best_recipe_path} (phases: the original recipe's, "
                     f"{self.best_recipe.total_epochs} epoch(s))")
        lines.append(f"train it: keras-moe train {self.best_recipe_path}")
        return "\n".join(lines)


# tune_recipe ----------------------------------------------------------------------------------


def _check_arguments(tuner, max_trials, max_seconds, epochs, seed):
    if tuner not in TUNERS:
        raise TuningError(f"tuner must be one of {', '.join(TUNERS)}, got {tuner!r}")
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise TuningError(f"max_trials must be an integer >= 1, got {max_trials!r}")
    if max_seconds is not None and (not _is_number(max_seconds) or max_seconds < 0
                                    or math.isnan(max_seconds)):
        raise TuningError(f"max_seconds must be None or a number >= 0, got {max_seconds!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or epochs < 1):
        raise TuningError(f"epochs (per trial) must be None or an integer >= 1, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TuningError(f"seed must be an integer >= 0, got {seed!r}")


def _prepare_out(recipe, out, overwrite):
    from keras_moe.training.run_dir import RunDirectoryError, default_run_dir

    if out is None:
        return default_run_dir(recipe, root="tuning")
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"tuning directory {str(out)!r} is a file; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirectoryError(
            f"tuning directory {str(out)!r} already exists and is not empty; it is never "
            "reused: choose another --out, or pass --overwrite (overwrite=True) to search "
            "again there (keras-tuner's overwrite: its project is deleted)")
    return out


def _validation_size(validation):
    if isinstance(validation, bool) or not _is_number(validation) or not (
            (isinstance(validation, int) and validation >= 1)
            or (isinstance(validation, float) and 0 < validation < 1)):
        raise TuningError(
            "validation must be a fraction of the training examples in (0, 1) or a count "
            f">= 1 of them, got {validation!r}")
    return validation


def tune_recipe(recipe, *, tuner="random", max_trials=10, max_seconds=None, epochs=None,
                out=None, overwrite=False, data_dir=None, seed=0, search_space=None,
                verbose=1, validation=DEFAULT_VALIDATION):
    """Searches `recipe`'s settings with keras-tuner and writes the best as a recipe.

    See `keras_moe.tuning` for the search space, the objective (`val_accuracy` on a
    validation split held out from the training data; the test split is measured once,
    for the best trial's model), the budgets and what is written.

    Args:
        recipe: A `keras_moe.recipes.Recipe`.
        tuner: `"random"` (`keras_tuner.RandomSearch`) or `"hyperband"`
            (`keras_tuner.Hyperband`, `max_epochs` = epochs per trial, factor 3).
        max_trials: Trials at most, >= 1.
        max_seconds: Wall-clock budget in seconds (None: none): no trial starts after
            it; the first trial always runs.
        epochs: Epochs per trial (None: the recipe's phases); the phases are scaled to
            it in proportion (`scale_phases`).
        out: The tuning directory (default `tuning/<recipe name>-<UTC time>`).
        overwrite: Search again in an existing, non-empty `out`.
        data_dir: Where the data files are (see `keras_moe.data.load`).
        seed: Seed of the data order, every trial's weights and gate noise, and (plus
            one: keras-tuner takes 0 as "unseeded") the tuner's sampling.
        search_space: `--search` strings overriding or extending the default space
            (see `parse_search_spec`).
        verbose: 0 silent; 1 keras-tuner's trial reports; 2 also a line per epoch and
            the traceback of every failed trial.
        validation: Training examples held out for the objective: a fraction in
            (0, 1) of them (default 0.1) or a count.

    Returns:
        A `TuneResult`.

    Raises:
        TuningError: An argument out of range (named).
        RecipeError: A search key unknown or unsearchable (named), a value the recipe
            checks reject, or no trial finished (the trials' errors are given).
        keras_moe.training.runner.RunDirectoryError: `out` exists and is not empty,
            and `overwrite` is False.
        keras_moe.data.DataNotFoundError: The data set is not on this machine.

    Example:

    >>> result = tune_recipe(load_recipe("sparse_moe_fashion_mnist"), max_trials=8,
    ...                      epochs=2, max_seconds=600)
    >>> result.best_hyperparameters
    {'model.num_experts': 16, 'model.top_k': 2, ...}
    """
    started = time.monotonic()
    _check_arguments(tuner, max_trials, max_seconds, epochs, seed)
    if verbose not in (0, 1, 2):
        raise TuningError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    if not isinstance(recipe, _recipes.Recipe):
        raise TuningError(f"recipe must be a keras_moe.recipes.Recipe, got "
                          f"{type(recipe).__name__}")
    validation = _validation_size(validation)
    from keras_moe.training.phases import check_phase_settings

    check_phase_settings(recipe)
    space = build_search_space(recipe, search_space)
    trial_plan = scale_phases(recipe, epochs)  # checks the scaled recipe up front
    out = _prepare_out(recipe, out, overwrite)

    kt = keras_tuner
    from keras_moe.training.datasets import build_datasets, count_training_examples

    if isinstance(validation, float):
        available = count_training_examples(recipe, data_dir=data_dir)
        validation = max(1, int(round(validation * available)))
    data = build_datasets(recipe, data_dir=data_dir, seed=seed, validation_size=validation)
    hypermodel = RecipeHyperModel(recipe, data, space, epochs=epochs, seed=seed,
                                  fit_verbose=2 if verbose == 2 else 0)
    deadline = None if max_seconds is None else started + float(max_seconds)
    objective = kt.Objective(OBJECTIVE, direction="max")
    common = dict(hypermodel=hypermodel, objective=objective, seed=seed + 1,
                  directory=str(out), project_name=recipe.name, overwrite=bool(overwrite),
                  deadline=deadline)
    if tuner == "random":
        search = _budgeted(kt.RandomSearch)(max_trials=max_trials, **common)
    else:
        search = _budgeted(kt.Hyperband)(max_epochs=trial_plan.total_epochs, factor=3,
                                         **common)
        search.oracle.max_trials = max_trials
    out.mkdir(parents=True, exist_ok=True)
    try:
        with compat.tuner_tracebacks(verbose == 2):
            search.search(verbose=verbose)
    except RuntimeError as error:  # keras-tuner: too many consecutive failed trials
        if "consecutive failures" not in str(error):
            raise
    trials = [search.oracle.trials[t] for t in search.oracle.start_order]
    best = [t for t in search.oracle.get_best_trials(1) if t.score is not None]
    if not best:
        messages = "; ".join(
            f"trial {t.trial_id}: {((t.message or '').strip().splitlines() or ['?'])[-1]}"
            for t in trials) or "no trial started"
        raise RecipeError(f"no trial of {recipe.name!r} finished ({messages})")
    best = best[0]
    best_model = search.get_best_models(1)[0]
    test_metrics = {k: float(v) for k, v in
                    best_model.evaluate(data.test, return_dict=True, verbose=0).items()}
    best_values = space.values_for(best.hyperparameters)
    rows = []
    for trial in trials:
        hp_values = trial.hyperparameters.values
        rows.append({
            "trial": trial.trial_id, "status": str(trial.status),
            "epochs": hp_values.get("tuner/epochs", trial_plan.total_epochs),
            "value": trial.score, "values": space.values_for(trial.hyperparameters),
        })
    if search.stopped_by_time:
        stopped_by = "time budget"
    elif len(trials) >= max_trials:
        stopped_by = "max_trials"
    else:
        stopped_by = "tuner"

    tuned = space.apply(best_values, recipe)
    kind = "random search" if tuner == "random" else "Hyperband"
    tuned = tuned.override([
        f"recipe.name={_literal(recipe.name + '_tuned')}",
        "recipe.description=" + _literal(
            f"From `keras-moe tune` ({kind}, {len(trials)} trials, best {OBJECTIVE} "
            f"{best.score:.4f}) of {recipe.name}" +
            (f": {recipe.description}" if recipe.description else "")),
    ])
    header = "\n".join([
        f"Written by `keras-moe tune` from {recipe.origin or recipe.name}",
        f"tuner: {kind}; trials run: {len(trials)} (max {max_trials}"
        + (f", budget {max_seconds:g} s" if max_seconds is not None else "")
        + f"; stopped by {stopped_by})",
        f"best {OBJECTIVE}: {best.score:.4f} (trial {best.trial_id}; on {data.validation_examples} "
        f"training examples held out, after {trial_plan.total_epochs} epoch(s) per trial)",
        f"the best trial's model on the test split ({data.test_examples} examples, measured "
        "once): " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()),
        "hyperparameters:",
        *[f"  {key} = {_literal(value)}" for key, value in best_values.items()],
        f"phases: the original recipe's full phases ({recipe.total_epochs} epochs), not "
        "the trials' shortened ones",
    ])
    path = _recipes.save_recipe(tuned, out / "best_recipe.toml", overwrite=bool(overwrite),
                                header=header)
    result = TuneResult(
        best_recipe=tuned, best_recipe_path=path, best_value=float(best.score),
        best_hyperparameters=best_values, trials=len(trials),
        seconds=time.monotonic() - started, tuner=tuner, directory=out,
        epochs_per_trial=trial_plan.total_epochs, stopped_by=stopped_by, rows=rows,
        best_trial=best.trial_id, keys=space.keys, test_examples=data.test_examples,
        validation_examples=data.validation_examples, test_metrics=test_metrics,
        best_model=best_model,
    )
    (out / "summary.txt").write_text(result.summary() + "\n")
    return result

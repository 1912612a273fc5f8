"""`keras-moe tune`: a keras-tuner search over the MoE settings of a recipe.

Modules: `space` (the search space), `trials` (a trial: scaled phases, the hypermodel),
`search` (`tune_recipe`, budgets, the result).

`tune_recipe(recipe, ...)` runs a `keras_tuner.RandomSearch` or `keras_tuner.Hyperband`
over the settings that matter for the recipe's model family, within a trial and a time
budget, and writes the best configuration as a recipe (`<out>/best_recipe.toml`) that
`keras-moe train` runs as it is.

How a search runs:

- The data is built once (`keras_moe.training.datasets.build_datasets`), with a
  validation split held out from the training data. Every trial builds the recipe's
  model with the trial's values applied through `Recipe.override`, so each trial is a
  valid recipe (checked exactly as `keras-moe train --set` checks), compiles it as
  `keras-moe train` does and runs the recipe's phases with the phase runner
  (`keras_moe.training.phases.run_phases`: DeepMoE freezing and lambda/mu changes, the
  density controller, Eigen's constraint, the t-SNE map's fit, as in `keras-moe train`).
  Every trial starts from the same seed (weights, shuffling, gate noise), so trials
  differ by their hyperparameters only.
- Epochs per trial: the recipe's own phases, or with `epochs=E` the phases scaled to E
  epochs in all, keeping their proportions (largest remainder; each phase that trains
  keeps at least one epoch when E allows; `step` schedule boundaries scale with them,
  a cosine schedule spans the E epochs). A DeepMoE recipe thus keeps its fine-tuning
  phase. Hyperband's `max_epochs` is that per-trial length, and its short trials run the
  first epochs of the scaled phases; a continued trial loads the earlier trial's weights
  and optimizer state (keras-tuner's checkpoint; every trial's optimizer is built up
  front so that they load back whole), continues the learning-rate schedule where the
  earlier trial stopped and re-applies the settings of the phases it has passed.
- Objective: `val_accuracy` (maximised) at the end of the trial's last epoch, measured
  on the validation split: the last `validation` examples of the recipe's training
  examples (its first `[data].train_size`; default a tenth of them), which no trial
  trains on. The test split (the first `[data].test_size` test examples) takes no part
  in the search: once it is over, the best trial's model is evaluated on it once, and
  that is the accuracy reported (`TuneResult.test_metrics`, the summary, the best
  recipe's header).
- Budgets: at most `max_trials` trials; with `max_seconds`, no trial starts once that
  many seconds have passed since `tune_recipe` was called (the clock includes loading
  the data), a trial in progress finishes, and the first trial always runs, so a search
  always has a result (`max_seconds=0` runs exactly one trial). keras-tuner has no
  wall-clock budget of its own: the tuners here lower the oracle's `max_trials` to the
  trials already created once the time is spent, which makes the oracle stop the
  search. Hyperband's own schedule may end a search before `max_trials`.
- Output: `out` (default `tuning/<recipe name>-<UTC time>`) holds keras-tuner's
  project `<out>/<recipe name>/` (trials, checkpoints, oracle state),
  `<out>/best_recipe.toml` and `<out>/summary.txt`. An existing, non-empty `out` is
  refused unless `overwrite=True`, which passes keras-tuner's own `overwrite=True`
  (the project is deleted and searched again) and replaces `best_recipe.toml` and
  `summary.txt`; nothing is reused silently.
- The best recipe: the original recipe with the best trial's values, `[recipe] name`
  `<original>_tuned`, a description saying it came from `keras-moe tune`, and the
  ORIGINAL recipe's full phases (not the trial's shortened ones): the search ranks
  settings on short runs, the recipe is for the full run. The data section is the
  recipe's as tuned (a `train_size` slice stays in it). A header comment gives the
  tuner, the trials run, the best objective value and the hyperparameters.

Default search space (`default_search_space`), per model family (its registration,
`keras_moe.zoo.ModelFamily.search_space`), from the papers; only keys the recipe's
builder accepts (`inspect.signature` of `keras_moe.zoo.get_builder`):

- Shazeer et al. (`sparse_moe_classifier`): number of experts {E/2, E, 2E}, k in {1, 2,
  4} (k <= number of experts), importance and load weights (log scale, a decade either
  side of the recipe's value: the paper's 0.1 gives [0.01, 1]).
- t-SNE gated MoE (`tsne_moe`): number of experts, k as above, `tsne_weight` (log).
- DeepMoE: lambda (`gate_l1`, log-uniform over [1, 100], the range where a fixed lambda
  moves the gate density from all open to all closed on this package's scale:
  `space.GATE_L1_RANGE`) and mu (`embedding_loss_weight`, log, a decade either side of
  the recipe's value).
- Eigen et al. (`dmoe_*`): experts per layer (halved, as is, doubled) and the
  assignment-constraint margin (log).
- Two-domain MoE: its gate losses' alpha and beta (log).
- Every family: the learning rate (log, a decade either side).

A coefficient the recipe sets to 0 (a loss switched off, e.g. DeepMoE's mu on ImageNet)
is left at 0. Floats are rounded to 4 significant digits before they are applied, so
the values a trial trained with are the values written to the recipe.

`search_space` (`--search`, repeatable) overrides or extends the default, key by key:

- `section.key=v1,v2,...` -> `hp.Choice` (one value fixes the key; TOML values, so
  `model.experts=[4, 4],[8, 8]` and `optimizer.name=adam,sgd` work);
- `section.key=lo:hi` -> `hp.Int` when both bounds are integers and the key's value
  is an integer, else `hp.Float`; log scale when `lo > 0`, linear otherwise.

Keys are checked with `Recipe.override` (an unknown key is a `RecipeError` that names
it); `[data]` and `[recipe]` keys, `model.name` and phase epochs cannot be searched (the
data is built once; trial length is `epochs`). A builder keyword goes to the section
where the recipe has it (`model.importance_weight` and `losses.importance_weight` are
the same key).

k <= number of experts: when both are choices and some k exceeds some number of
experts, k is a `hp.Choice` inside one `hp.conditional_scope` per number of experts
(named `model.top_k|model.num_experts=E`), holding the k values that fit; otherwise
(ranges, or a fixed k) k is clamped to the number of experts and the clamped value is
what the trial runs and what is reported.

Example:

>>> from keras_moe.recipes import load_recipe
>>> recipe = load_recipe("sparse_moe_fashion_mnist").override(
...     ["data.train_size=2048", "data.test_size=1024"])
>>> result = tune_recipe(recipe, max_trials=4, epochs=1, out="/tmp/tune-demo",
...                      search_space=["model.num_experts=4,8,16"])
>>> print(result.summary())
>>> result.best_recipe_path
PosixPath('/tmp/tune-demo/best_recipe.toml')
"""


from keras_moe.tuning.search import DEFAULT_VALIDATION, TUNERS, TuneResult, tune_recipe
from keras_moe.tuning.space import (
    RULES,
    SearchParam,
    SearchSpace,
    TuningError,
    build_search_space,
    default_search_space,
    parse_search_spec,
)
from keras_moe.tuning.trials import OBJECTIVE, RecipeHyperModel, scale_phases

__all__ = [
    "DEFAULT_VALIDATION",
    "OBJECTIVE",
    "RULES",
    "RecipeHyperModel",
    "SearchParam",
    "SearchSpace",
    "TUNERS",
    "TuneResult",
    "TuningError",
    "build_search_space",
    "default_search_space",
    "parse_search_spec",
    "scale_phases",
    "tune_recipe",
]

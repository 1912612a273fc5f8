"""`keras-moe tune`: a keras-tuner search over the MoE settings of a recipe.

`tune_recipe(recipe, ...)` runs a `keras_tuner.RandomSearch` or `keras_tuner.Hyperband`
over the settings that matter for the recipe's model family, within a trial and a time
budget, and writes the best configuration as a recipe (`<out>/best_recipe.toml`) that
`keras-moe train` runs as it is.

How a search runs:

- The data is built once (`keras_moe.training.runner.build_datasets`). Every trial
  builds the recipe's model with the trial's values applied through `Recipe.override`,
  so each trial is a valid recipe (checked exactly as `keras-moe train --set` checks),
  compiles it as `keras-moe train` does and runs the recipe's phases with
  `runner.apply_phase` (DeepMoE freezing and lambda/mu changes, Eigen's constraint).
  Every trial starts from the same seed (weights, shuffling, gate noise), so trials
  differ by their hyperparameters only.
- Epochs per trial: the recipe's own phases, or with `epochs=E` the phases scaled to E
  epochs in all, keeping their proportions (largest remainder; each phase that trains
  keeps at least one epoch when E allows; `step` schedule boundaries scale with them,
  a cosine schedule spans the E epochs). A DeepMoE recipe thus keeps its fine-tuning
  phase. Hyperband's `max_epochs` is that per-trial length, and its short trials run the
  first epochs of the scaled phases; a continued trial loads the earlier trial's weights
  (keras-tuner's behaviour: the optimizer's state starts afresh, so Keras warns that it
  skips the saved optimizer variables), continues the learning-rate schedule where the
  earlier trial stopped and re-applies the settings of the phases it has passed.
- Objective: `val_accuracy` (maximised) at the end of the trial's last epoch, measured
  on the recipe's test data (its first `[data].test_size` test examples). As in the
  paper recipes, which report test error after a fixed schedule, the "validation" data
  is the test split; there is no hold-out from the training data, because
  `build_datasets` gives no clean way to carve one out of the training split (the
  in-memory epochs and augmentation are drawn over all its examples). Tuning on the
  test split makes the best trial's score an optimistic estimate: confirm a tuned
  recipe on data it was not tuned on before quoting it.
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

Default search space (`default_search_space`), per model family, from the papers; only
keys the recipe's builder accepts (`inspect.signature` of `keras_moe.zoo.get_builder`):

- Shazeer et al. (`sparse_moe_classifier`): number of experts {E/2, E, 2E}, k in {1, 2,
  4} (k <= number of experts), importance and load weights (log scale, a decade either
  side of the recipe's value: the paper's 0.1 gives [0.01, 1]).
- t-SNE gated MoE (`tsne_moe`): number of experts, k as above, `tsne_weight` (log).
- DeepMoE: lambda (`gate_l1`, log) and mu (`embedding_loss_weight`, log), each a decade
  either side of the recipe's value.
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

from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
import time

import keras_tuner

from keras_moe import recipes as _recipes
from keras_moe.recipes import RecipeError

__all__ = [
    "RecipeHyperModel",
    "SearchParam",
    "SearchSpace",
    "TuneResult",
    "TuningError",
    "build_search_space",
    "default_search_space",
    "parse_search_spec",
    "scale_phases",
    "tune_recipe",
]

OBJECTIVE = "val_accuracy"
TUNERS = ("random", "hyperband")
_SEARCHABLE_SECTIONS = ("model", "losses", "optimizer", "schedule", "phases")
_BUILDER_SECTIONS = ("model", "losses")
# Keywords that are loss coefficients go to [losses] when the recipe does not set them.
_LOSS_KEYWORDS = ("importance_weight", "load_weight", "tsne_weight", "alpha", "beta",
                  "gate_l1", "embedding_loss_weight")
_TOP_K_CHOICES = (1, 2, 4)


class TuningError(ValueError):
    """An argument of `tune_recipe` out of range; the message names it and what is allowed."""


# search space ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchParam:
    """One searched recipe key.

    Attributes:
        key: The recipe key, `section.key` (or `phases.N.key`).
        kind: `"choice"`, `"float"` or `"int"`.
        values: The choices (`kind="choice"`); TOML texts when `encoded`.
        low: Lower bound (`"float"`/`"int"`).
        high: Upper bound (`"float"`/`"int"`).
        log: Log-scale sampling (`"float"`/`"int"`).
        encoded: The choices are TOML texts (arrays), parsed when applied.
        default: The recipe's current value (keras-tuner's default for the key).
    """

    key: str
    kind: str
    values: tuple = ()
    low: float = None
    high: float = None
    log: bool = False
    encoded: bool = False
    default: object = None

    @property
    def name(self):
        """The bare key (`top_k` for `model.top_k`)."""
        return self.key.rsplit(".", 1)[-1]

    def describe(self):
        """One line: `model.num_experts: choice 4, 8, 16`."""
        if self.kind == "choice":
            return f"{self.key}: choice {', '.join(str(v) for v in self.values)}"
        scale = "log" if self.log else "linear"
        return f"{self.key}: {self.kind} {_fmt(self.low)}..{_fmt(self.high)} ({scale})"

    def declare(self, hp, values=None, name=None):
        """Registers the key with `hp` (a `keras_tuner.HyperParameters`) under `name`
        (default: the key); returns its value, or None where a conditional scope makes
        it inactive."""
        name = name or self.key
        if self.kind == "choice":
            choices = list(self.values if values is None else values)
            default = self.default if self.default in choices else choices[0]
            return hp.Choice(name, choices, default=default)
        sampling = "log" if self.log else "linear"
        if self.kind == "int":
            default = self.default if isinstance(self.default, int) else self.low
            default = min(max(default, self.low), self.high)
            return hp.Int(name, int(self.low), int(self.high), sampling=sampling,
                          default=int(default))
        default = self.default if _is_number(self.default) else self.low
        default = min(max(float(default), self.low), self.high)
        return hp.Float(name, float(self.low), float(self.high), sampling=sampling,
                        default=default)

    def value(self, sampled):
        """The recipe value for a sampled one (floats rounded to 4 significant digits)."""
        if sampled is None:
            return None
        if self.kind == "choice":
            return _recipes._parse_value(sampled) if self.encoded else sampled
        if self.kind == "int":
            return int(sampled)
        return float(f"{float(sampled):.4g}")


class SearchSpace:
    """The searched keys of a recipe and how a trial's values become recipe assignments.

    Build one with `default_search_space` or `build_search_space`.

    Args:
        recipe: The `keras_moe.recipes.Recipe` searched.
        params: `SearchParam`s, one per key.
    """

    def __init__(self, recipe, params):
        self.recipe = recipe
        self.params = tuple(params)
        keys = [p.key for p in self.params]
        if len(set(keys)) != len(keys):
            raise RecipeError(f"search space: a key is given twice in {keys}")

    def __len__(self):
        return len(self.params)

    def __iter__(self):
        return iter(self.params)

    def __getitem__(self, key):
        for param in self.params:
            if param.key == key:
                return param
        raise KeyError(key)

    @property
    def keys(self):
        return [p.key for p in self.params]

    def describe(self):
        """The search space, one key a line."""
        return "\n".join(p.describe() for p in self.params) or "(empty: the recipe as it is)"

    def _experts_keys(self):
        """(number-of-experts key, top-k key) of the recipe's builder, or (None, None)."""
        builder = _recipes.check_model_args(self.recipe.model, where=self.recipe.source)
        accepted = inspect.signature(builder).parameters
        if "num_experts" not in accepted or "top_k" not in accepted:
            return None, None
        return _builder_key(self.recipe, "num_experts"), _builder_key(self.recipe, "top_k")

    def declare(self, hp):
        """Registers every key with `hp`; returns the trial's recipe values.

        Returns:
            A dict `{recipe key: value}` of the values the trial runs with (floats
            rounded, k clamped to the number of experts where the space allows more).
        """
        experts_key, k_key = self._experts_keys()
        params = sorted(self.params, key=lambda p: p.key == k_key)  # experts before k
        experts = self._param(experts_key)
        top_k = self._param(k_key)
        scoped = (experts is not None and top_k is not None and experts.kind == "choice"
                  and top_k.kind == "choice"
                  and all(_is_int(v) for v in experts.values + top_k.values)
                  and max(top_k.values) > min(experts.values))
        values = {}
        for param in params:
            if scoped and param is top_k:
                for count in experts.values:
                    fits = [k for k in top_k.values if k <= count] or [count]
                    # One name per scope: keras-tuner's ensure_active_values drops a
                    # value by name when any same-named parameter is inactive.
                    with hp.conditional_scope(experts.key, [count]):
                        sampled = param.declare(hp, fits, f"{param.key}|{experts.key}={count}")
                    if sampled is not None:
                        values[param.key] = param.value(sampled)
                continue
            values[param.key] = param.value(param.declare(hp))
        values = {p.key: values[p.key] for p in self.params if p.key in values}
        if experts_key and (experts_key in values or k_key in values):
            count = values.get(experts_key, self._current(experts_key))
            k = values.get(k_key, self._current(k_key))
            if _is_int(count) and _is_int(k) and k > count:
                values[k_key] = count
        return values

    def _param(self, key):
        if key is None:
            return None
        for param in self.params:
            if param.key == key:
                return param
        return None

    def _current(self, key):
        return _current_value(self.recipe, key.rsplit(".", 1)[-1])

    def values_for(self, hyperparameters):
        """The recipe values a trial with these `keras_tuner.HyperParameters` ran."""
        return self.declare(hyperparameters.copy())

    def apply(self, values, recipe=None):
        """`recipe` (default: the searched one) with `values` applied via `Recipe.override`.

        Raises:
            RecipeError: A value the recipe checks reject.
        """
        recipe = recipe or self.recipe
        return recipe.override([f"{key}={_literal(value)}" for key, value in values.items()])


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _literal(value):
    """`value` as one line of TOML text (what `Recipe.override` parses)."""
    import tomli_w

    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _builder(recipe):
    return _recipes.check_model_args(recipe.model, where=recipe.source)


def _current_value(recipe, name):
    """The builder keyword `name` as the recipe sets it, else the builder's default."""
    kwargs = recipe.model.builder_kwargs()
    if name in kwargs:
        return kwargs[name]
    parameter = inspect.signature(_builder(recipe)).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _builder_key(recipe, name, section=None):
    """`section.name` for a builder keyword: the section where the recipe has it."""
    if name in recipe.model.args:
        return f"model.{name}"
    if name in recipe.model.losses:
        return f"losses.{name}"
    if section is None:
        section = "losses" if name in _LOSS_KEYWORDS else "model"
    return f"{section}.{name}"


def _decade(key, value):
    """Log-scale float a decade either side of `value` (None for 0 or a non-number)."""
    if not _is_number(value) or value <= 0:
        return None
    return SearchParam(key, "float", low=float(value) / 10, high=float(value) * 10,
                       log=True, default=float(value))


def _experts_choice(key, value):
    """The number of experts halved, as is and doubled."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    values = tuple(sorted({max(1, value // 2), value, value * 2}))
    return SearchParam(key, "choice", values=values, default=value)


def _top_k_choice(key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    values = tuple(sorted(set(_TOP_K_CHOICES) | {value}))
    return SearchParam(key, "choice", values=values, default=value)


def _experts_per_layer(key, value):
    """Eigen's experts per layer: every layer's count halved, as is and doubled."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _experts_choice(key, value)
    if not isinstance(value, (list, tuple)) or not value:
        return None
    variants = []
    for scale in (0.5, 1, 2):
        variant = [max(1, int(n * scale)) for n in value]
        if variant not in variants:
            variants.append(variant)
    return SearchParam(key, "choice", values=tuple(_literal(v) for v in variants),
                       encoded=True, default=_literal(list(value)))


# Per family (the builder's module): (keyword, rule) pairs. The papers' settings that
# matter; each is searched only if the builder accepts the keyword.
_FAMILY_RULES = {
    "shazeer": (("num_experts", _experts_choice), ("top_k", _top_k_choice),
                ("importance_weight", _decade), ("load_weight", _decade)),
    "spatially_sparse": (("num_experts", _experts_choice), ("top_k", _top_k_choice),
                         ("tsne_weight", _decade)),
    "deepmoe": (("gate_l1", _decade), ("embedding_loss_weight", _decade)),
    "eigen": (("experts", _experts_per_layer), ("assignment_margin", _decade)),
    "two_domain": (("alpha", _decade), ("beta", _decade)),
}


def default_search_space(recipe):
    """The default search space of `recipe`'s model family (see the module docstring).

    Args:
        recipe: A `keras_moe.recipes.Recipe`.

    Returns:
        A `SearchSpace`.

    Raises:
        RecipeError: The recipe's model is not in the zoo.

    Example:

    >>> default_search_space(load_recipe("sparse_moe_fashion_mnist")).keys
    ['model.num_experts', 'model.top_k', 'losses.importance_weight', 'losses.load_weight',
     'optimizer.learning_rate']
    """
    builder = _builder(recipe)
    accepted = inspect.signature(builder).parameters
    family = builder.__module__.rsplit(".", 1)[-1]
    params = []
    for name, rule in _FAMILY_RULES.get(family, ()):
        if name not in accepted:
            continue
        param = rule(_builder_key(recipe, name), _current_value(recipe, name))
        if param is not None:
            params.append(param)
    learning_rate = _decade("optimizer.learning_rate", recipe.optimizer.learning_rate)
    params.append(learning_rate)
    return SearchSpace(recipe, params)


def _split_top_level(text):
    """Splits on commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def _normalise_key(recipe, key, spec):
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise RecipeError(f"--search {spec!r}: expected section.key=..., got key {key!r}")
    section = parts[0]
    if section not in _SEARCHABLE_SECTIONS:
        why = ("the data is built once for all trials" if section == "data" else
               "it does not change training")
        allowed = ", ".join(_SEARCHABLE_SECTIONS)
        if section in ("data", "recipe"):
            raise RecipeError(f"--search {key}: [{section}] keys cannot be searched ({why}); "
                              f"searchable sections: {allowed}")
        raise RecipeError(f"--search {key}: unknown section {section!r}; searchable "
                          f"sections: {allowed}")
    if key == "model.name":
        raise RecipeError("--search model.name: the model cannot be searched; tune each "
                          "model's recipe")
    if section == "phases" and parts[-1] == "epochs":
        raise RecipeError(f"--search {key}: phase epochs cannot be searched; a trial's "
                          "length is set by epochs (--trial-epochs)")
    if section in _BUILDER_SECTIONS and len(parts) == 2:
        return _builder_key(recipe, parts[1], section)
    return key


def parse_search_spec(spec, recipe):
    """Parses one `--search` string into a `SearchParam`, checked against `recipe`.

    Args:
        spec: `section.key=v1,v2,...` (choices, TOML values) or `section.key=lo:hi`
            (a range: `hp.Int` for integer bounds on an integer key, else `hp.Float`;
            log scale when `lo > 0`).
        recipe: The `keras_moe.recipes.Recipe` searched.

    Returns:
        A `SearchParam`.

    Raises:
        RecipeError: Malformed text, an unknown or unsearchable key (named), an empty
            or inverted range, or a value the recipe's checks reject.

    Example:

    >>> parse_search_spec("model.num_experts=4,8", recipe).values
    (4, 8)
    >>> parse_search_spec("optimizer.learning_rate=1e-4:1e-2", recipe).log
    True
    """
    if not isinstance(spec, str):
        raise RecipeError(f"--search expects a string section.key=values, got {spec!r}")
    key, sep, text = spec.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key or not text:
        raise RecipeError(f"--search expects section.key=v1,v2,... or section.key=lo:hi, "
                          f"got {spec!r}")
    key = _normalise_key(recipe, key, spec)
    current = _current_of_key(recipe, key)
    param = None
    pieces = _split_top_level(text)
    if len(pieces) == 1 and text.count(":") == 1:
        low_text, high_text = (s.strip() for s in text.split(":"))
        low, high = _recipes._parse_value(low_text), _recipes._parse_value(high_text)
        if _is_number(low) and _is_number(high):
            if not low < high:
                raise RecipeError(f"--search {spec!r}: the range needs lo < hi")
            integer = (isinstance(low, int) and isinstance(high, int)
                       and (current is None or (isinstance(current, int)
                                                and not isinstance(current, bool))))
            param = SearchParam(key, "int" if integer else "float",
                                low=int(low) if integer else float(low),
                                high=int(high) if integer else float(high),
                                log=low > 0, default=current)
            _check_values(recipe, key, [param.low, param.high], spec)
    if param is None:
        if any(not piece for piece in pieces):
            raise RecipeError(f"--search {spec!r}: an empty value in the list")
        values = [_recipes._parse_value(piece) for piece in pieces]
        _check_values(recipe, key, values, spec)
        if all(isinstance(v, bool) for v in values):
            param = SearchParam(key, "choice", values=tuple(values), default=current)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            param = SearchParam(key, "choice", values=tuple(values), default=current)
        elif all(_is_number(v) for v in values):
            param = SearchParam(key, "choice", values=tuple(float(v) for v in values),
                                default=float(current) if _is_number(current) else None)
        elif all(isinstance(v, str) for v in values):
            param = SearchParam(key, "choice", values=tuple(values), default=current)
        else:
            param = SearchParam(key, "choice", values=tuple(_literal(v) for v in values),
                                encoded=True,
                                default=_literal(current) if current is not None else None)
        if len(set(param.values)) != len(param.values):
            raise RecipeError(f"--search {spec!r}: a value is listed twice")
    return param


def _current_of_key(recipe, key):
    parts = key.split(".")
    if parts[0] in _BUILDER_SECTIONS:
        value = _current_value(recipe, parts[1])
        return list(value) if isinstance(value, tuple) else value
    table = recipe.to_dict()
    node = table
    try:
        for part in parts:
            node = node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, ValueError):
        return None
    return node


def _check_values(recipe, key, values, spec):
    """Each value applied alone must make a valid recipe (`Recipe.override`'s checks)."""
    for value in values:
        try:
            recipe.override([f"{key}={_literal(value)}"])
        except RecipeError as error:
            raise RecipeError(f"--search {spec!r}: {error}") from None


def build_search_space(recipe, search_space=None):
    """The default search space of `recipe` with `search_space` strings applied.

    Args:
        recipe: A `keras_moe.recipes.Recipe`.
        search_space: None, or `--search` strings (see `parse_search_spec`); a key of
            the default space is replaced, a new key is added.

    Returns:
        A `SearchSpace`.

    Raises:
        RecipeError: See `parse_search_spec`; a key given twice.
    """
    space = default_search_space(recipe)
    if search_space is None:
        return space
    if isinstance(search_space, str):
        search_space = [search_space]
    parsed = [parse_search_spec(spec, recipe) for spec in search_space]
    given = [p.key for p in parsed]
    for key in given:
        if given.count(key) > 1:
            raise RecipeError(f"--search {key} is given {given.count(key)} times; give it once")
    params = {p.key: p for p in space}
    params.update({p.key: p for p in parsed})
    return SearchSpace(recipe, params.values())


# trials -----------------------------------------------------------------------------------


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
    `fit(hp, model, ...)` runs the trial's phases and returns its final metrics.

    It works with any keras-tuner tuner (`tune_recipe` uses RandomSearch and Hyperband).

    Args:
        recipe: The `keras_moe.recipes.Recipe` searched.
        data: The `RecipeData` of `recipe` (`runner.build_datasets`), shared by trials.
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
        return runner.compile_model(model, recipe, self.data.steps_per_epoch)

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0,
            verbose=None, **kwargs):
        """Runs the trial's phases over epochs `[initial_epoch, epochs)` of its plan.

        Returns:
            The last epoch's logs as floats, `val_accuracy` among them.
        """
        from keras_moe.training import runner
        from keras_moe.training.deepmoe import GateDensityTarget
        from keras_moe.zoo.deepmoe import DeepMoEModel

        recipe = self.trial_recipe(hp)
        data = self.data
        end = recipe.total_epochs if epochs is None else min(int(epochs), recipe.total_epochs)
        initial_epoch = int(initial_epoch or 0)
        if initial_epoch:  # Hyperband continuing an earlier trial: the schedule goes on.
            model.optimizer.iterations.assign(initial_epoch * data.steps_per_epoch)
        verbose = self.fit_verbose  # search(verbose=) is keras-tuner's display's
        logs = {}
        first = 0
        for index, phase in enumerate(recipe.phases):
            last = first + phase.epochs
            if first >= end and index > 0:
                break
            runner.apply_phase(model, phase, starting=first >= initial_epoch)
            start, stop = max(first, initial_epoch), min(last, end)
            if stop > start:
                phase_callbacks = list(callbacks or [])
                if phase.gate_density_target is not None and isinstance(model, DeepMoEModel):
                    phase_callbacks.append(GateDensityTarget(phase.gate_density_target,
                                                             data=data.probe))
                history = model.fit(data.train_epochs(start, stop),
                                    steps_per_epoch=data.steps_per_epoch,
                                    validation_data=data.test, initial_epoch=start,
                                    epochs=stop, callbacks=phase_callbacks,
                                    verbose=verbose)
                logs = {k: float(v[-1]) for k, v in history.history.items() if v}
            first = last
        if OBJECTIVE not in logs:
            metrics = model.evaluate(data.test, return_dict=True, verbose=0)
            logs.update({f"val_{k}": float(v) for k, v in metrics.items()})
        return logs


def _budgeted(base):
    """`base` (a keras-tuner tuner class) with a wall-clock budget and no exploratory builds."""

    class Budgeted(base):
        def __init__(self, *args, deadline=None, **kwargs):
            self.deadline = deadline
            self.stopped_by_time = False
            super().__init__(*args, **kwargs)

        def _populate_initial_space(self):
            # keras-tuner builds the model once per conditional scope to discover the
            # space; the RecipeHyperModel declares it all without building anything.
            hp = self.oracle.get_space()
            self.hypermodel.declare_hyperparameters(hp)
            self.oracle.update_space(hp)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                created = len(self.oracle.trials)
                if self.oracle.max_trials is None or created < self.oracle.max_trials:
                    self.stopped_by_time = True
                    self.oracle.max_trials = created  # the oracle then stops the search

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
        test_examples: Test examples the objective was measured on.
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

    def summary(self):
        """A text report: the search, a table of the trials, the best trial and recipe."""
        kind = "random search" if self.tuner == "random" else "Hyperband"
        lines = [
            f"keras-moe tune: {kind}, {self.trials} trial(s) in {self.seconds:.1f} s "
            f"(stopped by {self.stopped_by})",
            f"objective: {OBJECTIVE} on the test split ({self.test_examples} examples) "
            f"after up to {self.epochs_per_trial} epoch(s) per trial",
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
    from keras_moe.training.runner import RunDirectoryError, default_run_dir

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


def tune_recipe(recipe, *, tuner="random", max_trials=10, max_seconds=None, epochs=None,
                out=None, overwrite=False, data_dir=None, seed=0, search_space=None,
                verbose=1):
    """Searches `recipe`'s settings with keras-tuner and writes the best as a recipe.

    See the module docstring for the search space, the objective (`val_accuracy` on the
    test split), the budgets and what is written.

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
        verbose: 0 silent; 1 keras-tuner's trial reports; 2 also a line per epoch.

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
    space = build_search_space(recipe, search_space)
    trial_plan = scale_phases(recipe, epochs)  # checks the scaled recipe up front
    out = _prepare_out(recipe, out, overwrite)

    kt = keras_tuner
    from keras_moe.training import runner

    data = runner.build_datasets(recipe, data_dir=data_dir, seed=seed)
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
        search.search(verbose=verbose)
    except RuntimeError as error:  # keras-tuner: too many consecutive failed trials
        if "consecutive failures" not in str(error):
            raise
    trials = [search.oracle.trials[t] for t in search.oracle.start_order]
    best = [t for t in search.oracle.get_best_trials(1) if t.score is not None]
    if not best:
        messages = "; ".join(f"trial {t.trial_id}: {(t.message or '').strip().splitlines()[-1:]}"
                             for t in trials) or "no trial started"
        raise RecipeError(f"keras-moe tune: no trial of {recipe.name!r} finished ({messages})")
    best = best[0]
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
        f"Written by `keras-moe tune` from {recipe.source or recipe.name}",
        f"tuner: {kind}; trials run: {len(trials)} (max {max_trials}"
        + (f", budget {max_seconds:g} s" if max_seconds is not None else "")
        + f"; stopped by {stopped_by})",
        f"best {OBJECTIVE}: {best.score:.4f} (trial {best.trial_id}; on the test split, "
        f"{data.test_examples} examples, after {trial_plan.total_epochs} epoch(s) per trial)",
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
    )
    (out / "summary.txt").write_text(result.summary() + "\n")
    return result

"""The search space of `keras-moe tune`: which recipe keys, and how each is sampled.

`default_search_space(recipe)` takes the keys from the model's family
(`keras_moe.zoo.ModelFamily.search_space`: builder keywords, each with a rule of `RULES`),
keeps those the recipe's builder accepts, and adds the learning rate;
`build_search_space(recipe, ["section.key=..."])` overrides or extends it (`--search`).
See `keras_moe.tuning` for the rules and the syntax.
"""

from __future__ import annotations

import dataclasses
import inspect

from keras_moe import recipes as _recipes
from keras_moe.recipes import RecipeError

__all__ = ["RULES", "SearchParam", "SearchSpace", "TuningError", "build_search_space",
           "default_search_space", "parse_search_spec"]

_SEARCHABLE_SECTIONS = ("model", "losses", "optimizer", "schedule", "phases")
_BUILDER_SECTIONS = ("model", "losses")
# Keywords that are loss coefficients go to [losses] when the recipe does not set them.
_LOSS_KEYWORDS = ("importance_weight", "load_weight", "switch_weight", "z_loss_weight",
                  "tsne_weight", "alpha", "beta", "gate_l1", "embedding_loss_weight")
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


# DeepMoE's lambda on this package's scale (L_g divided by the number of gated channels,
# so lambda = the paper's x that number): measured on wide-DeepMoE ResNet-8 at the CPU
# recipe's budget, fixed lambda leaves every gate open up to 2, closes 87% at 20 and all
# at 100 (zoo/deepmoe.md); the paper's range [0.001, 8] is [0.29, 2304] here.
GATE_L1_RANGE = (1.0, 100.0)


def _gate_l1(key, value):
    """DeepMoE's lambda: log-uniform over `GATE_L1_RANGE`, where the gate density moves
    from all open to all closed (a decade either side of a controller's start value
    would mostly search where nothing changes). None for a recipe that sets it to 0."""
    if not _is_number(value) or value <= 0:
        return None
    low, high = GATE_L1_RANGE
    return SearchParam(key, "float", low=low, high=high, log=True,
                       default=min(max(float(value), low), high))


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


# The rules a family's search space names: (recipe key, current value) -> SearchParam
# or None (nothing to search, e.g. a coefficient the recipe switches off with 0).
RULES = {
    "decade": _decade,
    "gate_l1": _gate_l1,
    "experts": _experts_choice,
    "top_k": _top_k_choice,
    "experts_per_layer": _experts_per_layer,
}


def default_search_space(recipe):
    """The default search space of `recipe`'s model family (see `keras_moe.tuning`).

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
    from keras_moe import zoo

    builder = _builder(recipe)
    accepted = inspect.signature(builder).parameters
    params = []
    for name, rule in zoo.get_family(recipe.model.name).search_space:
        if name not in accepted:
            continue
        param = RULES[rule](_builder_key(recipe, name), _current_value(recipe, name))
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

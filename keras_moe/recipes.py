"""Recipes: one TOML file per paper result, giving model, data, losses, schedule and phases.

A recipe is what `keras-moe train` runs and what `keras-moe tune` writes. The format is
TOML, read with the standard library's `tomllib` (`tomli` on Python 3.10) and written
with `tomli_w`. The recipes of the zoo live in the repository's top-level `zoo/` folder
beside their model cards, and ship inside the package (`keras_moe/_zoo_files/` of an
installed wheel); `load_recipe("deepmoe_resnet56_cifar10")` finds them by name.

Sections and keys (every key but `model.name` and one phase's `epochs` has a default;
any other key is an error that names it and suggests the closest known key):

```toml
[recipe]                       # about the recipe
name = "fashion_mnist_moe"     # default: the file's stem
description = "..."            # one line
paper = "..."                  # the paper and the result it reproduces
model_card = "sparse_moe_classifier.md"   # beside the recipe in zoo/

[model]
name = "sparse_moe_classifier"  # a zoo model (`keras-moe list`)
num_experts = 8                 # any other key: a keyword of the builder
top_k = 2                       # input_shape and num_classes: taken from the data if absent

[losses]                        # loss coefficients: keywords of the builder too
importance_weight = 0.1         # (kept apart so a reader sees what the objective is)

[data]
dataset = "fashion_mnist"       # keras_moe.data.NAMES
batch_size = 128
train_size = 0                  # first N training examples (0: all)
test_size = 0                   # first N test examples (0: all); the test split validates
pad_to = 0                      # zero-pad images to pad_to x pad_to (0: as they are)
channels = 0                    # tile 1-channel images to this many channels (0: as they are)
augment = "auto"                # "auto" (the loader's default for the set), true or false
normalize = "auto"              # keras_moe.data.load's normalize
with_extras = false             # ({"image", <extra>}, y) inputs, e.g. the oracle gate's domain

[optimizer]
name = "adam"                   # adam, adamw, sgd, rmsprop
learning_rate = 0.001
momentum = 0.0                  # sgd and rmsprop
nesterov = false                # sgd
weight_decay = 0.0              # decoupled, as Keras's optimizers apply it
clipnorm = 0.0                  # 0: no clipping

[schedule]
name = "constant"               # constant, step (x factor at each boundary epoch), cosine
boundaries = []                 # step: epochs, counted over all phases
factor = 0.1                    # step

[[phases]]                      # one or more, run in order; epochs are numbered on;
name = "train"                  # --set phases.N.key=value sets phase N, counted from 0
epochs = 6
# optional, from this phase on (each for the model families that define it,
# keras_moe.zoo.ModelFamily.phase_settings):
# freeze_gating = true          DeepMoE: freeze the embedding and every gate head
# gate_l1 = 0.0                 DeepMoE lambda;  embedding_loss_weight = 0.0: mu
# assignment_constraint = false Eigen et al.'s running-assignment constraint on/off
# gate_density_target = 0.5     DeepMoE: steer lambda to this open-gate fraction (this
#                               phase; the model's gate heads then start spread, W_g ~ U(0, 2));
#                               false: no controller, lambda stays at gate_l1 (the paper's way)
# spread_gate_heads = true      DeepMoE, first phase only (acts when the model is built): start
#                               the gate heads spread (true) or as initialised (false); unset:
#                               spread exactly when a phase sets a gate_density_target
# tsne_map_epochs = 30          t-SNE MoE: first fit the map for this many epochs, place the
#                               experts at k-means centres of the mapped training images
```

Validation happens in `Recipe.from_dict` (structure, types, ranges) and in
`check_model_args` (builder keywords, against the builder's signature), both before any
data is read or model built.

Example:

>>> recipe = load_recipe("fashion_mnist_moe")
>>> recipe.model.name, recipe.total_epochs
('sparse_moe_classifier', 6)
>>> recipe = recipe.override(["data.batch_size=256", "phases.0.epochs=1"])
>>> save_recipe(recipe, "/tmp/quick.toml")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import pathlib
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DataSpec",
    "ModelSpec",
    "OptimizerSpec",
    "Phase",
    "Recipe",
    "RecipeError",
    "ScheduleSpec",
    "check_model_args",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_dir",
    "save_recipe",
]

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "step", "cosine")
AUGMENT = ("auto", True, False)


class RecipeError(ValueError):
    """A recipe that cannot be run: the message names the file, the key and what is allowed."""


PHASE_SETTINGS = ("freeze_gating", "gate_l1", "embedding_loss_weight", "assignment_constraint",
                  "spread_gate_heads", "gate_density_target", "tsne_map_epochs")

# An installed wheel carries the zoo's recipes inside the package (pyproject.toml maps the
# repository's zoo/ folder there); a source checkout has them in zoo/ beside the package.
SHIPPED_ZOO = pathlib.Path(__file__).resolve().parent / "_zoo_files"
CHECKOUT_ZOO = pathlib.Path(__file__).resolve().parent.parent / "zoo"


def recipe_dir():
    """The zoo's recipe folder: `$KERAS_MOE_RECIPES`, else the package's own copy (an
    installed wheel), else the source checkout's `zoo/`."""
    env = os.environ.get("KERAS_MOE_RECIPES")
    if env:
        return pathlib.Path(env)
    return SHIPPED_ZOO if SHIPPED_ZOO.is_dir() else CHECKOUT_ZOO


def list_recipes():
    """Sorted names of the recipes in `recipe_dir()`."""
    folder = recipe_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def find_recipe(name_or_path):
    """The path of a recipe given as a file path or as the name of a zoo recipe.

    Raises:
        RecipeError: Neither a file nor a known recipe name; close names are suggested.
    """
    path = pathlib.Path(name_or_path)
    if path.suffix == ".toml" or os.sep in str(name_or_path):
        if not path.is_file():
            raise RecipeError(f"recipe file {str(name_or_path)!r} does not exist")
        return path
    candidate = recipe_dir() / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = list_recipes()
    close = difflib.get_close_matches(str(name_or_path), known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise RecipeError(
        f"unknown recipe {str(name_or_path)!r}.{hint} Recipes in {recipe_dir()}: "
        f"{', '.join(known) or 'none'}"
    )


def _unknown(where, key, allowed):
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(
        f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(allowed))}"
    )


def _take(table, where, spec):
    """Checks `table`'s keys and types against `spec` {key: (types, default)}."""
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a table, got {type(table).__name__}")
    for key in table:
        if key not in spec:
            raise _unknown(where, key, spec)
    values = {}
    for key, (types, default) in spec.items():
        value = table.get(key, default)
        if key in table and not _is_instance(value, types):
            names = " or ".join(_type_name(t) for t in types)
            raise RecipeError(f"{where}.{key} must be {names}, got {value!r}")
        values[key] = copy.deepcopy(value)
    return values


def _is_instance(value, types):
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in (int, float) and isinstance(value, t):
            return True
    return False


def _type_name(t):
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "an array", dict: "a table"}.get(t, t.__name__)


def _check(condition, message):
    if not condition:
        raise RecipeError(message)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """`[model]` and `[losses]`: the zoo model and its builder keywords."""

    name: str
    args: dict
    losses: dict

    def builder_kwargs(self):
        """The builder's keyword arguments: the model's keys, then the losses'."""
        return {**self.args, **self.losses}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """`[data]`: which data set, how much of it, and how it is shaped."""

    dataset: str = "fashion_mnist"
    batch_size: int = 128
    train_size: int = 0
    test_size: int = 0
    pad_to: int = 0
    channels: int = 0
    augment: object = "auto"
    normalize: str = "auto"
    with_extras: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """`[optimizer]`."""

    name: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    clipnorm: float = 0.0


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """`[schedule]`: the learning rate over all phases' epochs."""

    name: str = "constant"
    boundaries: tuple = ()
    factor: float = 0.1


@dataclasses.dataclass(frozen=True)
class Phase:
    """One `[[phases]]` entry. `None` settings leave the model as the last phase left it."""

    name: str
    epochs: int
    freeze_gating: object = None
    gate_l1: object = None
    embedding_loss_weight: object = None
    assignment_constraint: object = None
    spread_gate_heads: object = None
    gate_density_target: object = None
    tsne_map_epochs: object = None


_RECIPE_KEYS = {"name": ((str,), None), "description": ((str,), ""), "paper": ((str,), ""),
                "model_card": ((str,), "")}
_DATA_KEYS = {f.name: (_types, f.default) for f, _types in zip(
    dataclasses.fields(DataSpec),
    [(str,), (int,), (int,), (int,), (int,), (int,), (str, bool), (str,), (bool,)])}
_OPTIMIZER_KEYS = {f.name: (_types, f.default) for f, _types in zip(
    dataclasses.fields(OptimizerSpec),
    [(str,), (float,), (float,), (bool,), (float,), (float,)])}
_SCHEDULE_KEYS = {"name": ((str,), "constant"), "boundaries": ((list,), []),
                  "factor": ((float,), 0.1)}
_PHASE_KEYS = {"name": ((str,), None), "epochs": ((int,), None),
               "freeze_gating": ((bool,), None), "gate_l1": ((float,), None),
               "embedding_loss_weight": ((float,), None),
               "assignment_constraint": ((bool,), None),
               "spread_gate_heads": ((bool,), None),
               "gate_density_target": ((float, bool), None),
               "tsne_map_epochs": ((int,), None)}
_SECTIONS = ("recipe", "model", "losses", "data", "optimizer", "schedule", "phases")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed, checked recipe. Build one with `load_recipe` or `Recipe.from_dict`."""

    name: str
    model: ModelSpec
    data: DataSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    phases: tuple
    description: str = ""
    paper: str = ""
    model_card: str = ""
    source: str = ""
    overrides: tuple = ()

    @property
    def total_epochs(self):
        return sum(p.epochs for p in self.phases)

    @property
    def origin(self):
        """Where the recipe came from, with the `--set` assignments applied to it."""
        if not self.overrides:
            return self.source
        return f"{self.source} with --set {' '.join(self.overrides)}"

    @classmethod
    def from_dict(cls, table, *, source="<recipe>", default_name=None, overrides=()):
        """Checks a recipe given as nested dicts (what `tomllib` returns).

        Args:
            table: The recipe's sections.
            source: Where it came from (a file, a zoo model), for messages.
            default_name: The name when `[recipe] name` is absent.
            overrides: The `section.key=value` assignments already applied to `table`.

        Raises:
            RecipeError: An unknown section or key (named, with the closest known one),
                a value of the wrong type or out of range, a model not in the zoo.
        """
        overrides = tuple(overrides)
        where = f"{source} (with --set {' '.join(overrides)})" if overrides else source
        for key in table:
            if key not in _SECTIONS:
                raise _unknown(where, key, _SECTIONS)
        about = _take(table.get("recipe", {}), f"{where} [recipe]", _RECIPE_KEYS)
        name = about["name"] or default_name
        _check(name, f"{where} [recipe]: name is missing")

        model_table = table.get("model")
        _check(isinstance(model_table, dict) and isinstance(model_table.get("name"), str),
               f"{where} [model]: name (a zoo model, see `keras-moe list`) is required")
        model_args = {k: v for k, v in model_table.items() if k != "name"}
        losses = table.get("losses", {})
        _check(isinstance(losses, dict), f"{where} [losses] must be a table")
        both = set(model_args) & set(losses)
        _check(not both, f"{where}: {', '.join(sorted(both))} given in both [model] and [losses]")
        model = ModelSpec(model_table["name"], dict(model_args), dict(losses))
        check_model_args(model, where=where)

        data = DataSpec(**_take(table.get("data", {}), f"{where} [data]", _DATA_KEYS))
        from keras_moe.data import NAMES

        _check(data.dataset in NAMES,
               f"{where} [data].dataset must be one of {', '.join(NAMES)}, got {data.dataset!r}")
        _check(data.batch_size >= 1, f"{where} [data].batch_size must be >= 1, got {data.batch_size}")
        for key in ("train_size", "test_size", "pad_to", "channels"):
            value = getattr(data, key)
            _check(value >= 0, f"{where} [data].{key} must be >= 0 (0: off), got {value}")
        _check(data.augment in AUGMENT,
               f"{where} [data].augment must be \"auto\", true or false, got {data.augment!r}")
        _check(data.normalize in ("auto", "standard", "unit", "none"),
               f"{where} [data].normalize must be \"auto\", \"standard\", \"unit\" or \"none\", "
               f"got {data.normalize!r}")

        opt = OptimizerSpec(**_take(table.get("optimizer", {}), f"{where} [optimizer]",
                                    _OPTIMIZER_KEYS))
        _check(opt.name in OPTIMIZERS,
               f"{where} [optimizer].name must be one of {', '.join(OPTIMIZERS)}, got {opt.name!r}")
        _check(opt.learning_rate > 0,
               f"{where} [optimizer].learning_rate must be > 0, got {opt.learning_rate}")
        for key in ("momentum", "weight_decay", "clipnorm"):
            _check(getattr(opt, key) >= 0,
                   f"{where} [optimizer].{key} must be >= 0, got {getattr(opt, key)}")
        _check(opt.momentum < 1, f"{where} [optimizer].momentum must be < 1, got {opt.momentum}")

        sched = _take(table.get("schedule", {}), f"{where} [schedule]", _SCHEDULE_KEYS)
        _check(sched["name"] in SCHEDULES,
               f"{where} [schedule].name must be one of {', '.join(SCHEDULES)}, "
               f"got {sched['name']!r}")
        boundaries = sched["boundaries"]
        _check(all(_is_instance(b, (int,)) and b > 0 for b in boundaries)
               and list(boundaries) == sorted(set(boundaries)),
               f"{where} [schedule].boundaries must be increasing positive epochs, "
               f"got {boundaries!r}")
        _check(0 < sched["factor"] <= 1,
               f"{where} [schedule].factor must be in (0, 1], got {sched['factor']}")
        _check(sched["name"] == "step" or not boundaries,
               f"{where} [schedule].boundaries are only used by name = \"step\"")
        schedule = ScheduleSpec(sched["name"], tuple(boundaries), float(sched["factor"]))

        raw_phases = table.get("phases")
        _check(isinstance(raw_phases, list) and raw_phases,
               f"{where}: at least one [[phases]] entry with epochs is required")
        phases = []
        for index, entry in enumerate(raw_phases):
            values = _take(entry, f"{where} [[phases]] #{index}", _PHASE_KEYS)
            _check(values["epochs"] is not None,
                   f"{where} [[phases]] #{index}: epochs is required")
            _check(values["epochs"] >= 0,
                   f"{where} [[phases]] #{index}: epochs must be >= 0, got {values['epochs']}")
            for key in ("gate_l1", "embedding_loss_weight"):
                _check(values[key] is None or values[key] >= 0,
                       f"{where} [[phases]] #{index}: {key} must be >= 0, got {values[key]}")
            _check(values["tsne_map_epochs"] is None or values["tsne_map_epochs"] >= 1,
                   f"{where} [[phases]] #{index}: tsne_map_epochs must be >= 1, got "
                   f"{values['tsne_map_epochs']}")
            target = values["gate_density_target"]
            _check(target is None or target is False
                   or (not isinstance(target, bool) and 0 < target < 1),
                   f"{where} [[phases]] #{index}: gate_density_target must be in (0, 1) or "
                   f"false (no controller), got {target}")
            # The heads are spread (or not) when the model is built, before any phase.
            _check(index == 0 or values["spread_gate_heads"] is None,
                   f"{where} [[phases]] #{index}: spread_gate_heads acts when the model is "
                   "built: set it in the first phase")
            values["name"] = values["name"] or f"phase{index}"
            phases.append(Phase(**values))
        names = [p.name for p in phases]
        _check(len(set(names)) == len(names), f"{where}: phase names must differ, got {names}")
        total = sum(p.epochs for p in phases)
        _check(total > 0, f"{where}: the phases have 0 epochs in all")
        return cls(name=name, model=model, data=data, optimizer=opt, schedule=schedule,
                   phases=tuple(phases), description=about["description"],
                   paper=about["paper"], model_card=about["model_card"], source=str(source),
                   overrides=overrides)

    def to_dict(self):
        """The recipe as nested dicts, ready for `tomli_w` (defaults written out)."""
        table = {"recipe": {"name": self.name}}
        for key in ("description", "paper", "model_card"):
            if getattr(self, key):
                table["recipe"][key] = getattr(self, key)
        table["model"] = {"name": self.model.name, **_plain(self.model.args)}
        if self.model.losses:
            table["losses"] = _plain(self.model.losses)
        table["data"] = _plain(dataclasses.asdict(self.data))
        table["optimizer"] = _plain(dataclasses.asdict(self.optimizer))
        schedule = dataclasses.asdict(self.schedule)
        schedule["boundaries"] = list(schedule["boundaries"])
        table["schedule"] = schedule
        table["phases"] = [{k: v for k, v in dataclasses.asdict(p).items() if v is not None}
                           for p in self.phases]
        return table

    def override(self, assignments):
        """A new recipe with `section.key=value` assignments applied (values in TOML syntax,
        bare words taken as strings); `phases.N.key` sets a key of phase N, N counted
        from 0. The result's `overrides` lists every assignment made so far.

        Raises:
            RecipeError: A malformed assignment, or a result that fails the checks.
        """
        table = self.to_dict()
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            _check(sep and key.strip(), f"--set expects section.key=value, got {assignment!r}")
            value = _parse_value(text.strip())
            parts = key.strip().split(".")
            node = table
            for depth, part in enumerate(parts[:-1]):
                if isinstance(node, list):
                    _check(part.isdigit() and int(part) < len(node),
                           f"--set {key}: phase index must be 0..{len(node) - 1} (phases "
                           f"count from 0), got {part!r}")
                    node = node[int(part)]
                else:
                    _check(part in _SECTIONS,
                           f"--set {key}: unknown section {part!r}; sections: "
                           f"{', '.join(_SECTIONS)}")
                    node = node.setdefault(part, {})
            _check(len(parts) >= 2, f"--set {key}: expected section.key=value")
            node[parts[-1]] = value
        return Recipe.from_dict(table, source=self.source,
                                overrides=self.overrides + tuple(assignments))


def _parse_value(text):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _plain(values):
    """Tuples to lists (TOML arrays); None values dropped (TOML has no null)."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def check_model_args(model, where="recipe"):
    """Checks `[model]`/`[losses]` keys against the zoo builder's keyword arguments.

    Raises:
        RecipeError: The model is not in the zoo (close names suggested), or a key is not
            one of its builder's keywords (named, with the closest keyword).
    """
    from keras_moe import zoo

    try:
        builder = zoo.get_builder(model.name)
    except ValueError as error:
        raise RecipeError(f"{where} [model].name: {error}") from None
    parameters = inspect.signature(builder).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return builder
    allowed = [n for n, p in parameters.items() if p.kind in (p.KEYWORD_ONLY,
                                                              p.POSITIONAL_OR_KEYWORD)]
    for section, values in (("model", model.args), ("losses", model.losses)):
        for key in values:
            if key not in allowed:
                error = _unknown(f"{where} [{section}] ({model.name})", key, allowed)
                raise RecipeError(str(error).replace("allowed keys", "keywords of the builder"))
    return builder


def load_recipe(name_or_path):
    """Reads and checks a recipe file, or the zoo recipe with that name.

    Raises:
        RecipeError: See `find_recipe` and `Recipe.from_dict`; a TOML syntax error gives
            the file, line and column.
    """
    path = find_recipe(name_or_path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}") from None
    return Recipe.from_dict(table, source=str(path), default_name=path.stem)


def save_recipe(recipe, path, *, overwrite=False, header=None):
    """Writes `recipe` as TOML (with an optional comment `header`); returns the path.

    Raises:
        ValueError: `path` exists and `overwrite` is False.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"recipe file {str(path)!r} already exists; pass overwrite=True")
    table = recipe.to_dict()
    text = _dumps(table)
    if tomllib.loads(text) != table:  # pragma: no cover - a bug in _dumps, not user input
        raise AssertionError(f"recipe writer round trip failed for {path}")
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _value(value):
    """One TOML value, arrays inline (recipes hold short arrays)."""
    import tomli_w

    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    return tomli_w.dumps({"v": value})[len("v = "):].strip()


def _key(key):
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(str(key))


def _dumps(table):
    """A recipe as TOML in the order a reader expects: sections, then [[phases]]."""
    lines = []
    for section, values in table.items():
        if section == "phases":
            continue
        lines.append(f"[{section}]")
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in values.items())
        lines.append("")
    for phase in table.get("phases", []):
        lines.append("[[phases]]")
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in phase.items())
        lines.append("")
    return "\n".join(lines)


def steps_per_epoch(num_examples, batch_size):
    """Batches per epoch when the last partial batch is kept."""
    return int(math.ceil(num_examples / batch_size))

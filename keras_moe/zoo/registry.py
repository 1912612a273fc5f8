"""The zoo's registry: every model builder, and the family each belongs to.

Every builder has the same signature shape, keyword-only and with defaults from its paper:

    builder(*, input_shape=..., num_classes=..., <model-specific keywords>) -> keras.Model

and is registered with `@register_model(family=...)`, which files it under its function
name. The first line of its docstring is its one-line description (`keras-moe list`).

A `ModelFamily` carries what the rest of the package needs to know about a paper's
models, so that nothing decides by a model's name or module (timm keeps a model's
default configuration beside its builder in the same way):

- `default_phases(epochs)`: the training phases of a bare model name (`keras-moe train
  deepmoe_resnet56`: DeepMoE's Procedure 1, two phases);
- `search_space`: the builder keywords `keras-moe tune` searches and the rule for each
  (`keras_moe.tuning.space.RULES`);
- `phase_settings`: the recipe phase keys this family's models understand
  (`freeze_gating`, `assignment_constraint`, ...), each with its `PhaseSetting`
  handler, which the phase runner (`keras_moe.training.phases.run_phases`) calls. A
  family whose settings belong to a training procedure (DeepMoE's Procedure 1 and its
  controller, `keras_moe.training.deepmoe`) gets them from that module with
  `register_phase_settings`, so that imports run one way: training -> zoo -> layers.

Example:

>>> from keras_moe import zoo
>>> zoo.get_family("deepmoe_resnet56").name
'deepmoe'
>>> sorted(zoo.get_family("dmoe_mnist").phase_settings)
['assignment_constraint']
"""

import dataclasses
import difflib
from typing import Callable, Optional

_BUILDERS = {}
_FAMILY_OF = {}
_FAMILIES = {}


@dataclasses.dataclass(frozen=True)
class PhaseContext:
    """What a phase handler may use besides the model and the setting's value.

    Attributes:
        phase: The `keras_moe.recipes.Phase` being applied.
        starting: False when the phase is resumed part-way (its start-of-phase steps,
            such as resetting running totals or fitting a map, are then not redone).
        data: The run's `keras_moe.training.datasets.RecipeData`, or None.
        probe: Inputs to measure gates on (the data's probe), or None.
        verbose: Progress output: 0 silent, 1 or 2 progress lines.
    """

    phase: object
    starting: bool = True
    data: object = None
    probe: object = None
    verbose: int = 0


@dataclasses.dataclass(frozen=True)
class PhaseSetting:
    """How one recipe phase key acts on a family's models.

    Attributes:
        apply: `apply(model, value, context) -> bool`: changes the model for the phase;
            returns whether the model must be recompiled (a trainability change).
        callbacks: `callbacks(model, value, context) -> list` of Keras callbacks for the
            phase's `fit` (e.g. a controller), or None.
        on_build: `on_build(model, value)`: prepares a freshly built model of a recipe
            that uses this setting in any phase, or None.
        needs_data: The setting uses the training data (the phase runner refuses to
            apply it without).
    """

    apply: Optional[Callable] = None
    callbacks: Optional[Callable] = None
    on_build: Optional[Callable] = None
    needs_data: bool = False


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the package knows about one paper family's models.

    Attributes:
        name: Short name (`"deepmoe"`).
        description: One line: the paper and its models.
        default_phases: `default_phases(epochs) -> list of phase dicts` for a bare model.
        search_space: `((builder keyword, rule name), ...)` searched by `keras-moe tune`.
        phase_settings: `{phase key: PhaseSetting}` the family's models understand.
    """

    name: str
    description: str
    default_phases: Callable = None
    search_space: tuple = ()
    phase_settings: dict = dataclasses.field(default_factory=dict)

    def phases_for(self, epochs):
        """The default phases of a bare model name for `epochs` epochs."""
        if self.default_phases is None:
            return [{"name": "train", "epochs": epochs}]
        return self.default_phases(epochs)


def register_family(family):
    """Adds a `ModelFamily` to the registry; returns it."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def register_phase_settings(family, settings):
    """Adds `{phase key: PhaseSetting}` to a registered family's `phase_settings`.

    For a training procedure that owns a family's phase keys (the zoo must not import
    `keras_moe.training`). Keys are added in the order given, after the family's own
    (the order in which their `on_build` steps run); registering the same handler again
    (a module reloaded) is a no-op.

    Args:
        family: A registered `ModelFamily`.
        settings: `{phase key: PhaseSetting}`.

    Returns:
        The family.

    Raises:
        ValueError: `family` is not registered, or a key has another handler already.
    """
    if not isinstance(family, ModelFamily) or _FAMILIES.get(family.name) is not family:
        raise ValueError(f"register_phase_settings: family must be a registered "
                         f"ModelFamily, got {family!r}")
    for key, setting in settings.items():
        if not isinstance(setting, PhaseSetting):
            raise ValueError(f"register_phase_settings({family.name}): {key!r} must be a "
                             f"PhaseSetting, got {setting!r}")
        held = family.phase_settings.get(key)
        if held is not None and held != setting and _qualname(held) != _qualname(setting):
            raise ValueError(f"family {family.name!r} already has a phase setting {key!r}")
    family.phase_settings.update(settings)
    return family


def _qualname(setting):
    """A setting's handlers by name: equal for a reloaded module's."""
    return tuple(None if f is None else f.__qualname__
                 for f in (setting.apply, setting.callbacks, setting.on_build)) + (
        setting.needs_data,)


def register_model(builder=None, *, family):
    """Decorator: adds `builder` to the zoo under its function name, in `family`.

    Use as `@register_model(family=FAMILY)`.
    """

    def register(function):
        name = function.__name__
        if name in _BUILDERS and _BUILDERS[name] is not function:
            raise ValueError(f"a zoo model named {name!r} is already registered")
        if not isinstance(family, ModelFamily) or family.name not in _FAMILIES:
            raise ValueError(f"register_model({name}): family must be a registered "
                             f"ModelFamily, got {family!r}")
        _BUILDERS[name] = function
        _FAMILY_OF[name] = family.name
        return function

    return register if builder is None else register(builder)


def list_models(pattern=None):
    """Sorted names of the registered models, optionally only those containing `pattern`."""
    names = sorted(_BUILDERS)
    return [n for n in names if pattern is None or pattern in n]


def list_families():
    """The registered `ModelFamily` objects, by name."""
    return dict(_FAMILIES)


def describe(name):
    """The one-line description of a registered model (its docstring's first line)."""
    doc = (get_builder(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def get_builder(name):
    """The builder function registered as `name`; unknown names suggest close matches."""
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown zoo model {name!r}.{hint} Known models: {', '.join(list_models())}"
        )
    return _BUILDERS[name]


def get_family(name):
    """The `ModelFamily` of the registered model `name`."""
    get_builder(name)
    return _FAMILIES[_FAMILY_OF[name]]


def get_model(name, **kwargs):
    """Builds the zoo model `name` with `kwargs` passed to its builder."""
    return get_builder(name)(**kwargs)

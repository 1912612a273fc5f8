"""The zoo's registry: one place that lists every model builder.

Every builder has the same signature shape, keyword-only and with defaults from its paper:

    builder(*, input_shape=..., num_classes=..., <model-specific keywords>) -> keras.Model

and is registered with `@register_model`, which files it under its function name. The
first line of its docstring is its one-line description (`keras-moe list`).
"""

import difflib

_BUILDERS = {}


def register_model(builder):
    """Decorator: adds `builder` to the zoo under its function name."""
    name = builder.__name__
    if name in _BUILDERS and _BUILDERS[name] is not builder:
        raise ValueError(f"a zoo model named {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def list_models(pattern=None):
    """Sorted names of the registered models, optionally only those containing `pattern`."""
    names = sorted(_BUILDERS)
    return [n for n in names if pattern is None or pattern in n]


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


def get_model(name, **kwargs):
    """Builds the zoo model `name` with `kwargs` passed to its builder."""
    return get_builder(name)(**kwargs)

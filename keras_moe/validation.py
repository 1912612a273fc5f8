"""Argument checks shared by layers and regularizers.

Each error names the argument and what is allowed, in one format:
"<name> must be <allowed>, got <value>".
"""

import math
import numbers


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name, value, minimum=1, allow_none=False):
    """`value` as an int >= `minimum` (or None when allowed)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def positive_int(name, value, allow_none=False):
    return integer(name, value, minimum=1, allow_none=allow_none)


def number(name, value, minimum=None, maximum=None, exclusive_minimum=False,
           allow_none=False):
    """`value` as a finite float within the bounds (or None when allowed).

    The lower bound is inclusive unless `exclusive_minimum`; the upper bound is inclusive.
    """
    if value is None and allow_none:
        return None
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    valid = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (minimum is None or (value > minimum if exclusive_minimum else value >= minimum))
        and (maximum is None or value <= maximum)
    )
    if not valid:
        allowed = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        allowed += " or None" if allow_none else ""
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def positive_float(name, value):
    return number(name, value, minimum=0, exclusive_minimum=True)


def non_negative_float(name, value, allow_none=False):
    return number(name, value, minimum=0, allow_none=allow_none)


def top_k(value, num_experts, required_by=None):
    """`value` as an int in [1, num_experts], or None; `required_by` (a name) refuses None."""
    if value is None:
        if required_by is not None:
            raise ValueError(
                f"{required_by} needs `top_k`: an integer with 1 <= top_k <= num_experts "
                f"({num_experts}); got None.")
        return None
    if not _is_int(value) or not 1 <= value <= num_experts:
        raise ValueError(
            f"top_k must be None or an integer with 1 <= top_k <= num_experts "
            f"({num_experts}), got {value!r}"
        )
    return int(value)


def one_of(name, value, allowed):
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def last_dim(layer, input_shape):
    """The known last dimension of `input_shape`, else a ValueError naming the layer."""
    if input_shape is None or len(input_shape) < 2:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' needs inputs of rank >= 2 "
            f"(batch, ..., features); got shape {input_shape}."
        )
    dim = input_shape[-1]
    if dim is None:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' needs the last dimension of its "
            f"input to be known at build time; got shape {input_shape}."
        )
    return int(dim)


def require_tensorflow(what, instead):
    """Refuses `what` (a TensorFlow-only part) on another Keras backend, saying `instead`."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"{what} needs the TensorFlow backend (KERAS_BACKEND=tensorflow); this is "
            f"{backend!r}. {instead}")

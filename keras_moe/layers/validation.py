"""Argument checks shared by the layers: each error names the argument and what is allowed."""

import math
import numbers


def positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "an integer >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return int(value)


def positive_float(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def non_negative_float(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        allowed = "a finite number >= 0" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return float(value)


def top_k(value, num_experts):
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 1 <= value <= num_experts
    ):
        raise ValueError(
            f"`top_k` must be None or an integer with 1 <= top_k <= num_experts "
            f"({num_experts}), got {value!r}."
        )
    return int(value)


def one_of(name, value, allowed):
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {listed}; got {value!r}.")
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

"""Argument types of the public Python API, checked at the call.

`checked` wraps a public function so that an argument whose type its annotation does not
allow (None where a path is needed, bytes for a string, a float for a count, an object for a
mesh) is an `InputError` (a `UsageError`) naming the argument, the expected type and what was given, rather
than whatever TypeError or AttributeError it would cause deep inside. Only the types are
checked here; each function still checks values (ranges, names) with its own UsageErrors.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import numbers
import types
import typing

from jaxaccel.errors import InputError, UsageError


def checked(function):
    """`function` with its annotated arguments' types checked at every call."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:  # a missing or unknown argument
            raise UsageError(f"{function.__qualname__}: {err}") from None
        hints = _hints(function)
        for name, value in bound.arguments.items():
            hint = hints.get(name)
            if hint is not None and not matches(value, hint):
                raise InputError(f"{function.__qualname__}: {name} must be {describe(hint)}, "
                                 f"got {type(value).__name__} {_short(value)}")
        return function(*args, **kwargs)
    return call


@functools.cache
def _hints(function) -> dict:
    try:
        return typing.get_type_hints(function)
    except Exception:  # an annotation that does not resolve: check nothing rather than fail
        return {}


def matches(value, hint) -> bool:
    """Whether `value` is of type `hint` (unions, Optional, Sequence[X], Mapping, Literal;
    bool is not an int here, and an int is a float). Unknown kinds of hints match."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin is not None:
        return _matches_generic(value, origin, args)
    if not isinstance(hint, type):
        return True
    if hint is int:  # numpy's integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint)


def _matches_generic(value, origin, args) -> bool:
    if not isinstance(origin, type):
        return True
    if not isinstance(value, origin):
        return False
    if origin in (str, bytes) or not args:
        return True
    if issubclass(origin, collections.abc.Mapping):
        return all(matches(k, args[0]) and matches(v, args[-1]) for k, v in value.items())
    if issubclass(origin, collections.abc.Sequence) and not isinstance(value, str | bytes):
        return all(matches(item, args[0]) for item in value)
    return True


def describe(hint) -> str:
    """A hint as a reader would say it: `str | Path`, `a sequence of str`, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if hint is None or hint is type(None):
        return "None"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(map(describe, args))}]"
    return getattr(hint, "__name__", str(hint))


def at_least(value: int | None, minimum: int, name: str) -> None:
    """UsageError naming `name` when `value` is given and below `minimum`."""
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

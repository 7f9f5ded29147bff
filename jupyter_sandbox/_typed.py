"""Dataclasses built from JSON read back from disk, with the type of every field checked.

Records the service wrote itself can still come back damaged or edited; a value of
the wrong type must be refused with a reason rather than fail later somewhere else.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def typed(cls: type[T], data: object) -> T:
    """An instance of the dataclass `cls` from `data`; ValueError naming the first bad field.

    Keys that are not fields are ignored; fields with a default may be missing.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected an object, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in data:
            has_default = field.default is not dataclasses.MISSING or (
                field.default_factory is not dataclasses.MISSING
            )
            if not has_default:
                raise ValueError(f"{field.name} is missing")
            continue
        value = data[field.name]
        if not conforms(value, hints[field.name]):
            raise ValueError(f"{field.name} is {value!r:.60}, not of type {hints[field.name]}")
        values[field.name] = value
    return cls(**values)


def conforms(value: object, hint: Any) -> bool:
    """Does `value` (as JSON decodes it) have the type `hint`? Numbers must be finite."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is str:
        return isinstance(value, str)
    if origin is dict:
        keys, items = typing.get_args(hint)
        return isinstance(value, dict) and all(
            conforms(k, keys) and conforms(v, items) for k, v in value.items()
        )
    if origin is list:
        (items,) = typing.get_args(hint)
        return isinstance(value, list) and all(conforms(v, items) for v in value)
    return False

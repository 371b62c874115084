"""Build frozen config dataclasses from plain dicts (YAML, CLI) with one-line errors.

Errors name the full key path (``analog.device.tau``) and what is allowed, so a typo in a
YAML file is reported where it is, not as a traceback from deep inside.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from aimcpipe.errors import ConfigError

__all__ = ["check_fields", "check_int", "from_dict", "to_dict"]

T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):  # list[int] | list[str] names "list" once
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(tp)))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        article = "an" if tp.__name__[0] in "AEIOU" else "a"
        return f"a mapping or {article} {tp.__name__}"
    named = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in named:
        return named[tp]
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{path}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``, else a ConfigError naming
    ``name`` (``seed: must be an integer >= 0, got 'a'``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


@functools.cache
def _hints(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def check_fields(obj: Any) -> None:
    """Check (and normalise: ints to floats, lists to tuples, mappings to nested configs)
    every field of the config dataclass ``obj`` against its annotation, as :func:`from_dict`
    does for plain data, so that a config built in Python gets the same one-line errors
    (``tau: expected a number, got '1'``). Called first in ``__post_init__``."""
    for name, tp in _hints(type(obj)):
        value = getattr(obj, name)
        checked = _coerce(tp, value, name)
        if checked is not value:
            object.__setattr__(obj, name, checked)


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError.

    ``__post_init__`` validation errors are re-raised with the key path prefixed.
    """
    prefix = f"{path}." if path else ""
    hints = dict(_hints(cls))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        if path and not msg.startswith(prefix):
            msg = prefix + msg
        raise ConfigError(msg) from None


def to_dict(obj: Any) -> Any:
    """Plain-data form of a (nested) config dataclass, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj

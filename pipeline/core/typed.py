"""Typed dataclasses from plain mappings (a parsed YAML file), strictly: an unknown key, a missing required key or a
value of the wrong type is a ConfigError naming the dotted key and the source. Numbers are coerced from the field's
declared type (PyYAML reads ``1e-5`` as a string). Supported field types: bool, int, float, str, Literal, Optional,
list, dict and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from pipeline.core.errors import ConfigError


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key`` and ``source``."""

    def fail(why: str = "") -> typing.NoReturn:
        raise ConfigError(f"{source}: key '{key}': expected {type_name(tp)}, got {value!r}{why}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            fail()
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp} for {key}")
        return coerce(value, inner[0], key, source)
    if value is None:
        fail()
    if origin is Literal:
        if value in args:
            return value
        fail()
    if origin is list:
        if not isinstance(value, list):
            fail()
        return [coerce(v, args[0], f"{key}.{i}", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return {
            coerce(k, args[0], f"{key}.{k}", source): coerce(v, args[1], f"{key}.{k}", source)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(" (a mapping)")
        return build(tp, value, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, bool):
            fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                fail()
            if number.is_integer():
                return int(number)
        fail()
    if tp is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    raise TypeError(f"unsupported field type {tp} for {key}")


def build(cls: type, data: dict, prefix: str, source: str) -> Any:
    """``cls(**data)`` with every value coerced to its field's type, recursively; an unknown or missing key or a value
    of the wrong type raises ConfigError naming the dotted key and ``source``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{where}' (known keys here: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = coerce(data[f.name], hints[f.name], key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'")
    return cls(**kwargs)


def field_type(root: type, path: list[str], source: str) -> None:
    """Check that a dotted path (``ppo.kl_coef``, ``data.sft.train.0.path``) names a field of the dataclass ``root``
    (list indices allowed)."""
    tp: Any = root
    walked: list[str] = []
    for part in path:
        walked.append(part)
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                raise ConfigError(f"{source}: unknown key '{'.'.join(walked)}'")
            tp = hints[part]
        elif origin is list:
            if not part.isdigit():
                raise ConfigError(f"{source}: '{'.'.join(walked)}' must be a list index")
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"{source}: '{'.'.join(walked[:-1])}' has no sub-key '{part}'")

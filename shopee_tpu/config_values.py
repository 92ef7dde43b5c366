"""The plumbing under ``RunConfig``: strict mapping → dataclass conversion, ``--set``
value parsing and config files. Every error is a ``ConfigError`` naming the key."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from shopee_tpu import fs


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_of(cls, name: str, key: str):
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    known = ", ".join(f.name for f in dataclasses.fields(cls))
    raise ConfigError(f"unknown config key {key!r} (known here: {known})")


def get_field(obj, name: str, key: str):
    field_of(type(obj), name, key)
    return getattr(obj, name)


def section_from_dict(cls, values: Mapping[str, Any], where: str):
    """Builds the dataclass ``cls`` from ``values``, converting each by its type."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    types_of = hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        f = field_of(cls, key, dotted)
        kwargs[key] = coerce(value, types_of[f.name], dotted)
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks and converts a JSON/YAML value to the field's declared type."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return section_from_dict(hint, value, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(coerce(v, item, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


_BOOLS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLS.update({"false": False, "0": False, "no": False, "off": False})


def parse(raw: str, hint: Any, key: str) -> Any:
    """Parses a --set string by the field's type."""
    origin = typing.get_origin(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(hint)
    )
    if optional and raw.lower() in ("none", "null", ""):
        return None
    return coerce(raw, hint, key)


def read_mapping(path: str) -> dict[str, Any]:
    """Reads a JSON or YAML (by suffix) file that must hold a mapping."""
    text = fs.read_text(path)
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return dict(values)


def nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def deep_update(base: dict, values: Mapping[str, Any], where: str) -> dict:
    out = dict(base)
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        if key not in out:
            raise ConfigError(f"unknown config key {dotted!r}")
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = deep_update(out[key], value, dotted)
        elif dataclasses.is_dataclass(value):
            out[key] = dataclasses.asdict(value)
        else:
            out[key] = value
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

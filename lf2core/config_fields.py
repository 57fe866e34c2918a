"""Typed dataclass fields with valid ranges, and their checking: the machinery of ``lf2core.config``.

A section of the config is a dataclass whose fields are declared with ``_f(default, ge=..., choices=...)``;
``_merge`` sets values from a nested dict checking each against the field's type (``_check_value``), and
``_check_ranges`` checks every value against its declared range. ``describe_fields`` lists them all (the
table of ``docs/config.md``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad recipe file, key or value. The message names the key or file at fault."""


def R(ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
      choices: tuple = (), pattern: str = "") -> dict[str, Any]:
    """Field metadata: the valid range of a numeric key, the allowed values, or a regular expression the
    whole string must match; checked by ``load_config`` and listed by ``describe_keys``; e.g.
    ``field(default=80, metadata=R(ge=1))``."""
    return {"range": {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices), "pattern": pattern}}


def _range_text(r: dict[str, Any]) -> str:
    if r["pattern"]:
        return f"match the regular expression {r['pattern']}"
    if r["choices"]:
        return " | ".join(str(c) for c in r["choices"])
    parts = [f"{op} {r[k]:g}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if r[k] is not None]
    return " and ".join(parts)


def _in_range(v: Any, r: dict[str, Any]) -> bool:
    if r["pattern"]:
        return re.fullmatch(r["pattern"], v) is not None
    if r["choices"]:
        return v in r["choices"]
    if isinstance(v, str):  # a word allowed by the key's type (e.g. eps: auto); numeric ranges do not apply
        return True
    vals = v if isinstance(v, list) else [v]
    return all((r["ge"] is None or x >= r["ge"]) and (r["gt"] is None or x > r["gt"])
               and (r["le"] is None or x <= r["le"]) and (r["lt"] is None or x < r["lt"]) for x in vals)


def _f(default: Any, **rng: Any) -> Any:
    """A dataclass field with a default (a list default is copied per instance) and a valid range."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=R(**rng))
    return field(default=default, metadata=R(**rng))


def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_value(value, inner[0], key)
        for alt in inner:  # the first alternative the value fits, e.g. float | Literal["auto"]
            try:
                return _check_value(value, alt, key)
            except ConfigError:
                pass
        names = [f"one of {list(typing.get_args(a))}" if typing.get_origin(a) is Literal else f"a {a.__name__}"
                 for a in inner]
        raise ConfigError(f"config key '{key}': {value!r} is not {' or '.join(names)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # YAML reads `version: 1.2` as a number; the choices / pattern still apply
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested dict into dataclass ``obj`` in place, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (valid here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _check_value(value, hints[key], dotted))


def _check_ranges(obj: Any, prefix: str = "") -> None:
    """Every field declared with ``R(...)`` metadata holds a value in its range (the key is named)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
        elif "range" in f.metadata and not _in_range(value, f.metadata["range"]):
            r = f.metadata["range"]
            what = "is not one of" if r["choices"] else "must" if r["pattern"] else "is out of range, valid:"
            raise ConfigError(f"config key '{prefix}{f.name}': {value!r} {what} {_range_text(r)}")


def _type_text(tp: Any) -> str:
    """``float``, ``Optional[str]``, ``float | 'auto'`` (a union with a Literal names its words)."""
    if typing.get_origin(tp) is None:
        return getattr(tp, "__name__", str(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) not in typing.get_args(tp):
        return " or ".join(" or ".join(repr(w) for w in typing.get_args(a)) if typing.get_origin(a) is Literal
                           else _type_text(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def describe_fields(root: Any) -> list[tuple[str, str, str, str]]:
    """``[(dotted key, type, default, valid range)]`` for every leaf field of the dataclass ``root``."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                rng = " | ".join(map(str, typing.get_args(tp)))
            else:
                rng = _range_text(f.metadata["range"]) if "range" in f.metadata else ""
            rows.append((prefix + f.name, _type_text(tp), repr(value), rng))

    walk(root, "")
    return rows

"""Typed settings from a config section: one loader for every settings dataclass.

The settings dataclasses (``TrainSettings``, ``FederationSettings``,
``DPSGDSettings``) declare fields *without defaults*: every value comes from the
``configs/`` tree, so the tree is the one source of defaults and the two cannot
disagree. This loader converts each value to its field's type and names the key
(``train.lr``) in every error: an unknown key, a missing one, a wrong type.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from fedscan.common.core.errors import ConfigError

S = TypeVar("S")

_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def typed(value: Any, kind: type, key: str) -> Any:
    """``value`` as ``kind`` (int, float, str, bool); a ConfigError naming ``key`` if not."""
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind in (int, float) and isinstance(value, (bool, str)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected {_WORDS[kind]}, got {value!r}") from None


def from_section(cls: type[S], section: Mapping[str, Any], prefix: str, **given: Any) -> S:
    """``cls(**section)`` with every value typed; ``given`` fills fields the section lacks
    (``seed`` for ``TrainSettings``). Keys named in errors are ``prefix.key``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = dict(given)
    for key, value in section.items():
        if key in given:
            continue
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}", f"unknown key; known: {sorted(fields)}")
        kind = hints[key]
        optional = type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if value is None:
            if not optional:
                raise ConfigError(f"{prefix}.{key}", f"must be set (expected {_WORDS[kind]})")
            values[key] = None
        else:
            values[key] = typed(value, kind, f"{prefix}.{key}")
    missing = sorted(fields - set(values))
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}", f"missing from the config (missing {missing})")
    return cls(**values)

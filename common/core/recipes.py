"""One-name recipes (``configs/recipe/<name>.yaml``): what a recipe sets, said at a run's start.

A recipe is a measured setting under one name (``fedscan simulate recipe=skew``). Its
file sets keys and picks group options; the command line still overrides any of them.
A run names what its recipe set, and where the command line changed it, in one INFO
line, so a log read later says which settings came from the recipe and which did not.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedscan.common.core.config import config_dir, flat_keys

log = logging.getLogger("fedscan.recipe")


def recipe_settings(name: str) -> dict[str, Any]:
    """What ``configs/recipe/<name>.yaml`` sets, in file order: its group choices
    (``partition`` -> ``dirichlet``) and keys (``rounds`` -> 10). The ``recipe`` key (its
    own name) is left out."""
    doc = OmegaConf.to_container(OmegaConf.load(config_dir() / "recipe" / f"{name}.yaml"))
    out: dict[str, Any] = {}
    for entry in doc.get("defaults", []):
        for key, option in entry.items() if isinstance(entry, dict) else []:
            group = key.removeprefix("override").strip().lstrip("/")
            out[group] = option
    out.update({k: v for k, v in flat_keys(doc).items() if k not in ("defaults", "recipe")})
    return out


def _in_effect(cfg: DictConfig, key: str) -> Any:
    """The value ``key`` has in ``cfg``; for a group, its ``name`` (None if it has none)."""
    node = OmegaConf.select(cfg, key, default=None)
    if isinstance(node, DictConfig):
        return node.get("name")
    return node


def _text(value: Any) -> str:
    """A value as it is written on the command line (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe_recipe(cfg: DictConfig) -> str | None:
    """``recipe=skew sets strategy=fedavg, partition=dirichlet, ..., rounds=10``; a value the
    command line changed is given as ``rounds=4 (recipe: 10)``. None without a recipe."""
    name = cfg.get("recipe")
    if not name:
        return None
    parts = []
    for key, value in recipe_settings(str(name)).items():
        now = _in_effect(cfg, key)
        if now is None or _text(now) == _text(value):
            parts.append(f"{key}={_text(value)}")
        else:
            parts.append(f"{key}={_text(now)} (recipe: {_text(value)})")
    return f"recipe={name} sets " + ", ".join(parts)


def log_recipe(cfg: DictConfig) -> None:
    """One INFO line at a run's start naming the keys its recipe set (nothing without one)."""
    text = describe_recipe(cfg)
    if text:
        log.info("%s", text)

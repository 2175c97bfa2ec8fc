"""Resolving settings from the one ``configs/`` tree (Hydra's compose API).

The CLI and the Flower apps call :func:`load_config` with ``key=value``
overrides, so there is exactly one source of defaults. A run that names no data
at all is switched to the synthetic dataset here, loudly; a named dataset whose
folder is missing is an error here, before anything heavy loads.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedscan.common.core.errors import ConfigError
from fedscan.common.core.paths import ROOTED_DATASETS, check_dataset_folder, data_root

log = logging.getLogger(__name__)
_warned: set[str] = set()


def config_dir() -> Path:
    import fedscan.configs as configs

    return Path(configs.__file__).parent


def _compose(overrides: list[str]) -> DictConfig:
    """Compose, memoised per process (a site composes the same config every round)."""
    return OmegaConf.create(_compose_yaml(tuple(overrides)))


@lru_cache(maxsize=64)
def _compose_yaml(overrides: tuple[str, ...]) -> str:
    return OmegaConf.to_yaml(_compose_uncached(list(overrides)))


def _compose_uncached(overrides: list[str]) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        hint = suggest(overrides)
        if hint is not None:
            raise ConfigError(*hint) from None
        key = next((o.split("=")[0] for o in overrides if o.split("=")[0] in str(exc)), "overrides")
        raise ConfigError(key, str(exc).splitlines()[0]) from None


def group_options() -> dict[str, list[str]]:
    """Config groups (``dataset``, ``model``, ...) and their options, from ``configs/``."""
    root = config_dir()
    return {
        d.name: sorted(f.stem for f in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith("_") and any(d.glob("*.yaml"))
    }


def _keys(tree: object, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix[:-1]]
    out = [prefix[:-1]] if prefix else []
    for k, v in tree.items():
        out += _keys(v, f"{prefix}{k}.")
    return out


def suggest(overrides: Sequence[str]) -> tuple[str, str] | None:
    """``(key, message)`` for the first override naming an unknown group option or key,
    with the nearest valid spellings (difflib); ``None`` when every name is known."""
    groups = group_options()
    chosen = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in groups:
            if value not in groups[key]:
                close = difflib.get_close_matches(value, groups[key], n=1, cutoff=0.5)
                hint = f"did you mean {key}={close[0]}? " if close else ""
                return key, f"no {key} '{value}'; {hint}options: {', '.join(groups[key])}"
            chosen.append(f"{key}={value}")
    try:  # the keys of the tree with the chosen group options (their keys differ)
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            tree = OmegaConf.to_container(compose(config_name="config", overrides=chosen))
    except (HydraException, OmegaConfBaseException):  # pragma: no cover - options checked above
        return None
    known = _keys(tree)
    for o in overrides:
        key, eq, _ = o.partition("=")
        if not eq or o.startswith("+") or key in groups:
            continue
        key = key.lstrip("~")
        if key not in known:
            leaves = [k for k in known if not any(o.startswith(k + ".") for o in known)]
            close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
            if close:  # only spellings about as close as the best one
                best = difflib.SequenceMatcher(None, key, close[0]).ratio()
                close = [
                    c for c in close if difflib.SequenceMatcher(None, key, c).ratio() >= best - 0.1
                ]
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            return key, f"no such config key{hint} (`fedscan config` prints the tree)"
    return None


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Hydra's basic-sweeper expansion of ``overrides`` into one override list per run."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError("overrides", str(exc).splitlines()[0]) from None
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(run) for batch in batches for run in batch]


# Keys removed from the tree: the value that reproduces today's behaviour (an old run
# folder holding it reads as if it did not have the key) and why it went, with what
# replaced it. An override of one is refused with that reason; old folders still read
# (common/runs/record.py). CHANGELOG.md records each removal with its figure.
REMOVED: dict[str, tuple[Any, str]] = {
    "model.freeze_bn": (
        False,
        "removed in fedscan 0.2.0: every BatchNorm held at its ImageNet statistics was "
        "measured only to harm (brain, Dirichlet 0.1, finetune_blocks=4: 43.7 / 31.4 % "
        "test_official after rounds 1-2 against FedAvg's 69.8 / 75.7 %; docs/results/skew.md). To "
        "hold the federation's own statistics from a later round use remedy=fixbn (FixBN)",
    ),
}


def refuse_removed(overrides: Sequence[str]) -> None:
    """A ConfigError for the first override naming a removed key (:data:`REMOVED`): the
    reason and its replacement, not Hydra's "key not in struct" and a near spelling."""
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in REMOVED:
            raise ConfigError(key, REMOVED[key][1])


def load_config(overrides: Sequence[str] = (), *, check_data: bool = True) -> DictConfig:
    """Compose ``configs/config.yaml`` with ``overrides``; check the data folders.

    The SYNTHETIC embedded default replaces the tree's default dataset only when the
    user chose no data at all: no ``dataset=``, ``dataset.path=`` or ``data_root=``
    override and no ``FEDSCAN_DATA`` (a warning says so; ``dataset.*`` overrides still
    apply to it). A dataset the user named is never swapped for another: a missing
    folder is a :class:`ConfigError` naming the setting to fix (``data_root``,
    ``FEDSCAN_DATA`` or ``dataset.path``), raised here, before torch or Flower load.

    ``check_data=False``: compose only, never look at folders (a deployed site reads
    its own ``data-path``, not the coordinator's data root; ``fedscan config`` prints
    the tree). The unnamed-data fallback still applies, so such a site composes the
    same dataset settings an unconfigured coordinator does.
    """
    refuse_removed(overrides)
    overrides = [
        ALIASES.get(o.split("=", 1)[0], o.split("=", 1)[0]) + o[o.find("=") :] if "=" in o else o
        for o in overrides
    ]
    keys = [o.split("=", 1)[0] for o in overrides if "=" in o]
    for key in set(ALIASES.values()):
        if keys.count(key) > 1:
            raise ConfigError(key, "set twice (num_sites / rounds and their federation.* aliases)")
    named = any(k.lstrip("+~") in NAMING_DATA for k in keys)
    # dataset.* keys may exist only in the fallback (dataset.per_class): not in the probe
    probe = _compose([o for o in overrides if not o.startswith("dataset.")])
    fallback = (
        not named
        and probe.dataset.name in ROOTED_DATASETS
        and not Path(str(probe.dataset.get("path") or "")).is_absolute()
        and data_root(probe.data_root) is None
    )
    if fallback:
        if probe.dataset.domain not in _warned:  # once per process, not per message
            _warned.add(probe.dataset.domain)
            log.warning(
                "No dataset named and no data configured (data_root / FEDSCAN_DATA): using "
                "the SYNTHETIC embedded default for %s",
                probe.dataset.domain,
            )
        overrides = [o for o in overrides if not o.startswith("dataset=")] + ["dataset=synthetic"]
        if not any(o.startswith("dataset.domain=") for o in overrides):
            overrides.append(f"dataset.domain={probe.dataset.domain}")
    cfg = _compose(overrides)
    if check_data and not fallback:
        check_dataset_folder(cfg.dataset, cfg.data_root)
    OmegaConf.set_readonly(cfg, False)
    return cfg


# Overrides that choose the data: with any of them (or FEDSCAN_DATA) there is no fallback.
NAMING_DATA = ("dataset", "dataset.path", "data_root")


# federation.num_sites / federation.rounds are interpolations of the top-level keys;
# an override of the alias is an override of the key, so there is one value.
ALIASES = {"federation.num_sites": "num_sites", "federation.rounds": "rounds"}

# Flower run-config keys (pyproject [tool.flwr.app.config]) -> config-tree overrides.
RUN_CONFIG_KEYS = {
    "recipe": "recipe",
    "dataset": "dataset",
    "model": "model",
    "strategy": "strategy",
    "num-rounds": "rounds",
    "runs-dir": "runs_dir",
    "data-root": "data_root",
}


def overrides_from_run_config(run_config: dict) -> list[str]:
    """``flwr run --run-config`` values as Hydra overrides of the one config tree.

    Empty values mean "the tree's default"; ``overrides`` carries any other
    ``key=value`` pairs, space-separated.
    """
    out = []
    for key, target in RUN_CONFIG_KEYS.items():
        value = run_config.get(key)
        if value not in (None, "", 0):
            # Paths may hold characters Hydra's override grammar rejects (~, :).
            quoted = target in ("runs_dir", "data_root")
            out.append(f"{target}='{value}'" if quoted else f"{target}={value}")
    out += str(run_config.get("overrides", "") or "").split()
    return out


def flat_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config (plain dicts) as dotted keys, ``{"train.lr": 0.001, ...}``: the
    form overrides, recipes and report columns name settings in."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat_keys(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}

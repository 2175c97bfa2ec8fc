"""Resolving settings from the one ``configs/`` tree (Hydra's compose API).

The CLI and the Flower apps call :func:`load_config` with ``key=value``
overrides, so there is exactly one source of defaults. A run with no data
configured is switched to the synthetic dataset here, loudly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.core.errors import ConfigError
from common.core.paths import data_root

log = logging.getLogger(__name__)
_warned: set[str] = set()


def config_dir() -> Path:
    import configs

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
        key = next((o.split("=")[0] for o in overrides if o.split("=")[0] in str(exc)), "overrides")
        raise ConfigError(key, str(exc).splitlines()[0]) from None


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with ``overrides`` and apply the data fallback.

    With no data root configured for a dataset that needs one, the synthetic
    dataset of the same domain is used instead (with a warning); ``dataset.*``
    overrides still apply to it.
    """
    overrides = [
        ALIASES.get(o.split("=", 1)[0], o.split("=", 1)[0]) + o[o.find("=") :] if "=" in o else o
        for o in overrides
    ]
    keys = [o.split("=", 1)[0] for o in overrides if "=" in o]
    for key in set(ALIASES.values()):
        if keys.count(key) > 1:
            raise ConfigError(key, "set twice (num_sites / rounds and their federation.* aliases)")
    probe = _compose([o for o in overrides if not o.startswith("dataset.")])
    ds_path = str(probe.dataset.get("path") or "")
    needs_root = probe.dataset.name in ("brain_mri", "lung_ct") and not Path(ds_path).is_absolute()
    if needs_root and data_root(probe.data_root) is None:
        if probe.dataset.domain not in _warned:  # once per process, not per message
            _warned.add(probe.dataset.domain)
            log.warning(
                "No data configured (data_root / FEDSCAN_DATA): using the SYNTHETIC "
                "embedded default for %s",
                probe.dataset.domain,
            )
        overrides = [o for o in overrides if not o.startswith("dataset=")] + ["dataset=synthetic"]
        if not any(o.startswith("dataset.domain=") for o in overrides):
            overrides.append(f"dataset.domain={probe.dataset.domain}")
    cfg = _compose(overrides)
    OmegaConf.set_readonly(cfg, False)
    return cfg


# federation.num_sites / federation.rounds are interpolations of the top-level keys;
# an override of the alias is an override of the key, so there is one value.
ALIASES = {"federation.num_sites": "num_sites", "federation.rounds": "rounds"}

# Flower run-config keys (pyproject [tool.flwr.app.config]) -> config-tree overrides.
RUN_CONFIG_KEYS = {
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

"""The ``federation`` and ``strategy`` config groups, validated without Flower.

No field has a default (``configs/config.yaml`` holds them). ``epoch_budget`` is
the one definition of a federated run's local compute, rounds x local epochs,
used by the local / pooled baselines, the DP-SGD noise calibration and the
study drivers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedscan.common.core.config import config_dir
from fedscan.common.core.errors import ConfigError
from fedscan.common.core.options import HEAD_INITS
from fedscan.common.core.settings import from_section

# The sites' validation metrics that can pick best.pt (example-weighted over the sites),
# and how the best.pt log line names each. Weighted by the sites' validation sizes,
# accuracy and loss are those of all the sites' validation images pooled; a site's
# macro-F1 covers the classes its own validation split holds, so their mean is no
# pooled figure (under label skew it rewards a site of one class as much as a site of four).
BEST_METRICS = ("val_accuracy", "val_loss", "val_macro_f1")
BEST_METRIC_NAMES = {
    "val_accuracy": "pooled validation accuracy",
    "val_loss": "pooled validation loss",
    "val_macro_f1": "validation macro-F1 (each site's over the classes it holds; mean)",
}
# What picked it until 2026-11-27: the server's first test split (no longer allowed)
OLD_BEST_METRICS = ("macro_f1", "accuracy", "balanced_accuracy", "loss")
# How ``fedscan simulate`` runs the sites (see simulations/engine.py)
ENGINES = ("auto", "inprocess", "ray")


@dataclass(frozen=True, kw_only=True)
class FederationSettings:
    num_sites: int
    rounds: int
    local_epochs: int
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    fedbn: bool
    site_val_fraction: float
    evaluate_every: int
    best_metric: str
    round_timeout_s: float
    wait_for_nodes_s: float
    resume: str | None
    cpus_per_site: int | None
    engine: str  # auto | inprocess | ray
    head_init: str  # none | fed3r | fedncm
    head_ridge: float
    head_scale: float
    head_freeze: bool
    head_refit: str  # none | fed3r | fedncm
    freeze_bn_from: int  # 0: off; N: from round N the sites train with BatchNorm statistics fixed
    bn_refit: bool  # a BatchNorm statistics round after the last round

    def __post_init__(self) -> None:
        checks = [
            # num_sites / rounds are top-level keys (federation.* are their aliases)
            ("num_sites", self.num_sites >= 1, "must be >= 1"),
            # after a one-shot statistics round, 0 rounds is the one-shot model alone
            (
                "rounds",
                self.rounds >= (0 if self.head_init != "none" else 1),
                "must be >= 1 (>= 0 after a federation.head_init statistics round)",
            ),
            ("federation.local_epochs", self.local_epochs >= 1, "must be >= 1"),
            ("federation.fraction_train", 0 < self.fraction_train <= 1, "must be in (0, 1]"),
            # 0: no federated evaluation
            ("federation.fraction_evaluate", 0 <= self.fraction_evaluate <= 1, "must be in [0, 1]"),
            ("federation.min_nodes", self.min_nodes >= 1, "must be >= 1"),
            ("federation.site_val_fraction", 0 < self.site_val_fraction < 1, "must be in (0, 1)"),
            ("federation.evaluate_every", self.evaluate_every >= 1, "must be >= 1"),
            (
                "federation.best_metric",
                self.best_metric in BEST_METRICS,
                f"use one of {BEST_METRICS}"
                + (
                    ": since 2026-11-27 the sites' validation picks best.pt, a test split "
                    "no longer does"
                    if self.best_metric in OLD_BEST_METRICS
                    else ""
                ),
            ),
            ("federation.round_timeout_s", self.round_timeout_s > 0, "must be > 0"),
            ("federation.wait_for_nodes_s", self.wait_for_nodes_s >= 0, "must be >= 0"),
            ("federation.engine", self.engine in ENGINES, f"use one of {ENGINES}"),
            ("federation.head_init", self.head_init in HEAD_INITS, f"use one of {HEAD_INITS}"),
            ("federation.head_refit", self.head_refit in HEAD_INITS, f"use one of {HEAD_INITS}"),
            (
                "federation.head_refit",
                self.head_refit == "none" or self.rounds >= 1,
                "refits the head after the last round: needs rounds >= 1",
            ),
            ("federation.freeze_bn_from", self.freeze_bn_from >= 0, "must be >= 0 (0: off)"),
            (
                "federation.bn_refit",
                not self.bn_refit or self.rounds >= 1,
                "re-estimates BatchNorm after the last round: needs rounds >= 1",
            ),
            (
                "federation.bn_refit",
                not self.bn_refit or not self.fedbn,
                "with federation.fedbn each site keeps its own BatchNorm; there is no global "
                "statistic to re-estimate",
            ),
            ("federation.head_ridge", self.head_ridge > 0, "must be > 0"),
            ("federation.head_scale", self.head_scale > 0, "must be > 0"),
            (
                "federation.cpus_per_site",
                self.cpus_per_site is None or self.cpus_per_site >= 1,
                "must be >= 1 (or null)",
            ),
        ]
        for key, ok, msg in checks:
            if not ok:
                value = getattr(self, key.split(".")[-1])
                raise ConfigError(key, f"{msg}, got {value!r}")

    @property
    def epoch_budget(self) -> int:
        """A site's local epochs over the whole run: rounds x local epochs."""
        return self.rounds * self.local_epochs

    @property
    def refits(self) -> bool:
        """Something is re-estimated after the last round (BatchNorm statistics, the head)."""
        return self.bn_refit or self.head_refit != "none"


def federation_settings(cfg: DictConfig) -> FederationSettings:
    """The ``federation`` group of ``cfg``, typed and validated."""
    try:  # by default the model's ridge for its mode (model.head_ridge.<mode>)
        cfg.federation.head_ridge  # noqa: B018 - resolves the interpolation
    except OmegaConfBaseException:
        mode = OmegaConf.select(cfg, "model.mode", default=None)
        modes = list(OmegaConf.select(cfg, "model.head_ridge", default=None) or [])
        raise ConfigError(
            "model.mode",
            f"'{mode}': model '{OmegaConf.select(cfg, 'model.name', default='?')}' has no "
            f"federation.head_ridge default for it (model.head_ridge has {modes}); use one "
            "of those modes or set federation.head_ridge",
        ) from None
    return from_section(FederationSettings, cfg.federation, "federation")


# Parameters of the strategies in configs/strategy/, and what each must satisfy.
_STRATEGY_RULES = {
    "mu": (lambda v: v >= 0, "must be >= 0"),
    "eta": (lambda v: v > 0, "must be > 0"),
    "eta_l": (lambda v: v > 0, "must be > 0"),
    "beta_1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "beta_2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "tau": (lambda v: v > 0, "must be > 0"),
    "beta": (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    "num_malicious_nodes": (lambda v: v >= 0 and float(v).is_integer(), "must be an integer >= 0"),
}


def strategy_names() -> list[str]:
    """The strategies the config tree offers (``configs/strategy/<name>.yaml``)."""
    return sorted(p.stem for p in (config_dir() / "strategy").glob("*.yaml"))


def check_strategy(section: Mapping[str, Any]) -> None:
    """Fail on a bad ``strategy`` setting without building anything: an unknown name,
    a parameter its ``configs/strategy/<name>.yaml`` does not declare, a value out of range."""
    name = str(section.get("name"))
    names = strategy_names()
    if name not in names:
        raise ConfigError("strategy.name", f"unknown strategy '{name}'; available: {names}")
    declared = set(OmegaConf.load(config_dir() / "strategy" / f"{name}.yaml")) - {"name"}
    for key, value in section.items():
        if key == "name":
            continue
        if key not in declared:
            raise ConfigError(
                f"strategy.{key}", f"'{name}' takes {sorted(declared) or 'no parameters'}"
            )
        ok, msg = _STRATEGY_RULES.get(key, (lambda v: True, ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"strategy.{key}", f"expected a number, got {value!r}")
        if not ok(value):
            raise ConfigError(f"strategy.{key}", f"{msg}, got {value!r}")

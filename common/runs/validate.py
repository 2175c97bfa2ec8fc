"""Validation before any work: one module every entry point calls first.

``fedscan train``, ``fedscan simulate`` (each run of a sweep), the ServerApp
(``flwr run``, simulation and deployment) and ``fedscan site check`` call
:func:`validate` before they create a run folder, wait for sites or start Ray,
so a bad value fails in seconds with the key named, not after an hour.
Everything here is cheap: no image is read and no model is built.
:func:`check_sites` is the one check that reads data (the partition of the
actual dataset); simulations call it before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.partition import check_partition_config
from fedscan.common.data.pipeline import check_dataset_config, prepare_data
from fedscan.common.federated.bn_stats import check_bn_refit
from fedscan.common.federated.head_init import linear_head
from fedscan.common.federated.privacy import (
    PRIVACY_NAMES,
    CentralDPSettings,
    DPSGDSettings,
    central_dp_settings,
    dp_settings,
    planned_noise,
)
from fedscan.common.federated.secure import (
    SecureAggregationSettings,
    check_combination,
    secure_settings,
)
from fedscan.common.federated.settings import (
    FederationSettings,
    check_strategy,
    federation_settings,
)
from fedscan.common.federated.site import site_indices
from fedscan.common.learn.intervals import IntervalSettings, interval_settings
from fedscan.common.learn.models import build_model, check_model_config
from fedscan.common.learn.settings import TrainSettings, train_settings
from fedscan.common.runs.tracking import tracking_name

METHODS = ("federated", "local", "pooled")
# What is being started: the centralised baseline, one `fedscan simulate` method,
# the ServerApp (any deployment, where `num_sites` means nothing), a site check.
KINDS = ("centralised", "pooled", "local", "federated", "server", "site")


@dataclass(frozen=True)
class Settings:
    """The validated, typed settings of a run."""

    train: TrainSettings
    federation: FederationSettings
    dp: DPSGDSettings | None
    central_dp: CentralDPSettings | None
    intervals: IntervalSettings | None  # the test metrics' bootstrap (None: old config)
    secure: SecureAggregationSettings | None = None  # SecAgg+ (None: off)


def validate(cfg: DictConfig, kind: str) -> Settings:
    """Check ``cfg`` for starting a run of ``kind`` (see :data:`KINDS`); raises ConfigError."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind '{kind}'; use one of {KINDS}")
    check_dataset_config(cfg.dataset)
    check_model_config(cfg.model)
    settings = Settings(
        train=train_settings(cfg),
        federation=federation_settings(cfg),
        dp=dp_settings(cfg.privacy),
        central_dp=central_dp_settings(cfg.privacy),
        intervals=interval_settings(cfg),
        secure=secure_settings(cfg.get("secure_aggregation")),
    )
    tracking_name(cfg)  # an unknown tracking backend fails before any data is read
    privacy = str(cfg.privacy.name)
    if privacy not in PRIVACY_NAMES:
        raise ConfigError("privacy", f"unknown '{privacy}'; use one of {list(PRIVACY_NAMES)}")
    if kind in ("federated", "local", "pooled") and str(cfg.method) not in METHODS:
        raise ConfigError("method", f"unknown method '{cfg.method}'; use one of {list(METHODS)}")
    if kind in ("centralised", "pooled") and privacy != "off":
        raise ConfigError(
            "privacy",
            f"'{privacy}' protects what sites send; use it with fedscan simulate "
            "or flwr run (the centralised baseline pools the data by definition)",
        )
    if kind == "local" and privacy != "off":
        raise ConfigError("privacy", "the local-only baseline shares nothing; use privacy=off")
    fed = settings.federation
    if kind in ("federated", "local"):
        check_partition_config(cfg.partition, fed.num_sites)
    if kind in ("federated", "server"):
        check_strategy(cfg.strategy)
        if fed.resume is not None:
            last = Path(fed.resume).expanduser() / "last.pt"
            if not last.exists():
                raise ConfigError("federation.resume", f"no checkpoint to resume from: {last}")
    for key, on in (
        ("head_init", fed.head_init != "none"),
        ("head_refit", fed.head_refit != "none"),
        ("bn_refit", fed.bn_refit),
    ):
        if kind in ("federated", "server") and on and privacy != "off":
            raise ConfigError(
                f"federation.{key}",
                f"the statistics round sends feature sums without noise; it cannot run with "
                f"privacy={privacy}",
            )
    if fed.head_freeze and str(cfg.model.get("mode", "scratch")) == "features":
        raise ConfigError(
            "federation.head_freeze",
            "in feature mode the head is all that trains; with it frozen nothing is left "
            "(use rounds=0 for the one-shot model)",
        )
    scaffold = str(cfg.strategy.name) == "scaffold"
    if kind in ("federated", "server") and scaffold and privacy != "off":
        raise ConfigError(
            "strategy",
            f"scaffold's control variates leave the sites without DP; not with privacy={privacy}",
        )
    if kind in ("federated", "server") and settings.secure is not None:
        check_combination(
            settings.secure,
            strategy=str(cfg.strategy.name),
            num_sites=fed.num_sites,
            privacy=privacy,
            central_side=str(cfg.privacy.get("side", "client")),
            central_clipping=str(cfg.privacy.get("clipping", "fixed")),
            simulated=kind == "federated",
        )
    if kind in ("local", "pooled", "centralised") and settings.secure is not None:
        raise ConfigError(
            "secure_aggregation",
            f"protects what sites send to the server; a {kind} run sends nothing (use off)",
        )
    if kind == "federated" and fed.min_nodes > fed.num_sites:
        raise ConfigError(
            "federation.min_nodes", f"{fed.min_nodes} is more than the {fed.num_sites} sites"
        )
    if kind == "federated":
        check_sampling(fed)
    return settings


def check_sampling(fed: FederationSettings) -> None:
    """A fraction of the sites per round needs ``min_nodes`` at or below it: Flower samples
    max(fraction x sites, min_nodes), and min_nodes follows num_sites unless set, so
    ``fraction_train=0.5`` alone would still train every site, silently."""
    for key, fraction in (
        ("fraction_train", fed.fraction_train),
        ("fraction_evaluate", fed.fraction_evaluate),
    ):
        sampled = int(fraction * fed.num_sites)
        if 0 < fraction < 1 and fed.min_nodes > max(sampled, 1):
            raise ConfigError(
                "federation.min_nodes",
                f"{fed.min_nodes} sites are sampled every round whatever federation.{key}="
                f"{fraction:g} says (Flower samples at least min_nodes); for {sampled} of the "
                f"{fed.num_sites} sites set federation.min_nodes={max(sampled, 1)} or lower",
            )


def check_sites(cfg: DictConfig) -> None:
    """Partition the data as the simulated sites will: a partition that cannot give
    every site its minimum, or a site too small to hold out its own validation split,
    fails here with the site named; so does a DP-SGD plan that cannot reach its
    epsilon at a site's size (:func:`planned_noise`). The decode cache this builds
    is the one the sites then read."""
    data = prepare_data(cfg)
    keys = [k for k in ("head_init", "head_refit") if str(cfg.federation.get(k, "none")) != "none"]
    if bool(cfg.federation.get("head_freeze", False)):
        keys.append("head_freeze")
    bn = bool(cfg.federation.get("bn_refit", False))
    if keys or bn:  # a statistics round, or a head to hold fixed, needs a linear head
        model = build_model(cfg.model, len(data.collection.classes))
        for key in keys:
            linear_head(model, key=f"federation.{key}")
        if bn:  # ... and a BatchNorm statistics round, BatchNorm in the trained stages
            check_bn_refit(model, model.frozen_until)
    n = int(cfg.federation.num_sites)
    dp = dp_settings(cfg.privacy)
    for pid in range(n):
        train, _ = site_indices(cfg, data, partition_id=pid, num_partitions=n)
        if dp is not None:  # each site's DP-SGD plan: its noise, or the key that breaks it
            planned_noise(
                dp,
                n_train=len(train),
                batch_size=int(cfg.train.batch_size),
                epochs_total=federation_settings(cfg).epoch_budget,
                delta=dp.site_delta(len(train)),
            )

"""A site's view of the data: its own samples, split into local train and validation.

In simulation a site is partition ``partition_id`` of the configured dataset's
training pool (the global test sets stay with the server). In deployment it is
the hospital's own folder (``data_path``), read with the generic site layout.
Both paths end in the same :class:`SiteData`, so the ClientApp has one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError, DataError
from common.models import StagedModel, build_model
from common.partition import partition
from common.pipeline import PreparedData
from common.sitereport import class_counts_metrics
from common.splits import group_holdout


@dataclass
class SiteData:
    prepared: PreparedData
    x: np.ndarray  # cached images or frozen-trunk features
    start: int  # first stage the arrays feed
    train: np.ndarray
    val: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return self.prepared.collection.labels

    def train_class_counts(self) -> dict[str, int]:
        """Per-class training counts as reply metrics (see :mod:`common.sitereport`)."""
        return class_counts_metrics(self.labels[self.train], self.prepared.collection.classes)


def site_config(cfg: DictConfig, data_path: str | None) -> DictConfig:
    """Point ``cfg`` at a hospital folder when the node was given a ``data-path``."""
    if not data_path:
        return cfg
    path = Path(str(data_path)).expanduser()
    if not path.is_dir():
        raise DataError(path, "node config 'data-path' does not exist or is not a folder")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    domain = cfg.dataset.domain
    cfg.dataset = OmegaConf.merge(
        cfg.dataset, {"name": "site", "path": str(path), "domain": domain}
    )
    cfg.dataset.split.policy = "grouped"
    return cfg


def site_indices(
    cfg: DictConfig,
    prepared: PreparedData,
    *,
    partition_id: int | None,
    num_partitions: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The site's (train, val) indices: its partition, or its whole folder in deployment."""
    s = prepared.splits
    labels = prepared.collection.labels
    if partition_id is None:  # deployment: every readable sample of the site's folder
        pool = np.flatnonzero(prepared.cache.ok)
    else:
        if num_partitions is None or not 0 <= partition_id < num_partitions:
            raise ConfigError("partition-id", f"{partition_id} not in [0, {num_partitions})")
        pool_all = np.sort(np.concatenate([s.train, s.val]))
        pool = partition(
            pool_all, s.groups, labels, num_partitions, cfg=cfg.partition, seed=int(cfg.seed)
        )[partition_id]
    fraction = float(cfg.federation.site_val_fraction)
    try:
        return group_holdout(
            pool, labels, s.groups, fraction, int(cfg.seed), "site val", few_groups_ok=True
        )
    except DataError as exc:
        raise DataError(prepared.collection.root, f"site has too little data: {exc}") from None


def fresh_model(cfg: DictConfig, num_classes: int) -> StagedModel:
    return build_model(cfg.model, num_classes)

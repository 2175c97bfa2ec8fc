"""A site's view of the data: its own samples, split into local train and validation.

In simulation a site is partition ``partition_id`` of the configured dataset's
training pool (the global test sets stay with the server). In deployment it is
the hospital's own folder (``data_path``), read with the generic site layout.
Both paths end in the same :class:`SiteData`, so a site has one code path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.core.paths import cache_root
from fedscan.common.data.partition import min_training_samples, partition
from fedscan.common.data.pipeline import PreparedData
from fedscan.common.data.splits import group_holdout
from fedscan.common.federated.wire import COUNT_PREFIX, DATA_PATH, PARTITION_ID
from fedscan.common.learn.features import mirrored_features
from fedscan.common.learn.prepare import PreparedRun, prepare_run
from fedscan.common.learn.training import MirroredRows

log = logging.getLogger("fedscan.site")


@dataclass
class SiteData:
    run: PreparedRun  # the process's data, model template and model inputs
    train: np.ndarray  # this site's training indices
    val: np.ndarray  # and its own validation split
    _mirrored: list[MirroredRows | None] = field(default_factory=list, repr=False)

    def mirrored(self, cfg: DictConfig) -> MirroredRows | None:
        """The cached prefix of this site's mirrored training images (``train.cached_flips``),
        computed at the first round that trains and kept for the rounds after it."""
        if not self._mirrored:
            run = self.run
            self._mirrored.append(
                mirrored_features(run.model, run.data, cfg, run.device, self.train)
            )
        return self._mirrored[0]

    @property
    def x(self) -> np.ndarray:
        return self.run.x

    @property
    def start(self) -> int:
        return self.run.start

    @property
    def prepared(self) -> PreparedData:
        return self.run.data

    @property
    def labels(self) -> np.ndarray:
        return self.run.labels

    def train_class_counts(self) -> dict[str, int]:
        """Per-class training counts as reply metrics (aggregates, no sample ids)."""
        return class_counts_metrics(self.labels[self.train], self.run.classes)


def class_counts_metrics(labels: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """A site's per-class training counts as metric entries (``n_train_<class>``)."""
    counts = np.bincount(labels, minlength=len(classes))
    return {f"{COUNT_PREFIX}{c}": int(n) for c, n in zip(classes, counts, strict=True)}


def site_file(
    what: str, suffix: str, *, run_key: str, data_path: str, runs_dir: str, site: int
) -> Path | None:
    """Where a site keeps ``what`` (its privacy ledger, its SCAFFOLD variate) between
    rounds and across a resumed run; ``None`` without a run key.

    Deployment (``data_path`` set): in the site's own folder, so a restarted SuperNode
    still has it. Simulation: beside the run folder, one file per virtual site (node
    state alone is lost when a run is resumed).
    """
    if not run_key:
        return None
    if data_path:
        return Path(data_path).expanduser() / f".fedscan-{what}" / f"{run_key}{suffix}"
    return Path(runs_dir) / run_key / f"site-{what}" / f"site-{site}{suffix}"


def site_config(cfg: DictConfig, data_path: str | None) -> DictConfig:
    """Point ``cfg`` at a hospital folder when the node was given a ``data-path``."""
    if not data_path:
        return cfg
    path = Path(str(data_path)).expanduser()
    if not path.is_dir():
        raise DataError(path, f"node config '{DATA_PATH}' does not exist or is not a folder")
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
            raise ConfigError(PARTITION_ID, f"{partition_id} not in [0, {num_partitions})")
        pool_all = np.sort(np.concatenate([s.train, s.val]))
    fraction = float(cfg.federation.site_val_fraction)
    if partition_id is not None:
        pool = partition(
            pool_all,
            s.groups,
            labels,
            num_partitions,
            cfg=cfg.partition,
            seed=int(cfg.seed),
        )[partition_id]
    try:
        # cached on disk under a digest of its inputs: every run of a study (and every
        # site of it, and the pre-flight check) holds out the same validation groups,
        # and scikit-learn's StratifiedGroupKFold costs ~0.4 s a site on the brain set
        train, val = group_holdout(
            pool,
            labels,
            s.groups,
            fraction,
            int(cfg.seed),
            "site val",
            few_groups_ok=True,
            cache=cache_root(cfg.cache_dir) / "splits",
        )
    except DataError as exc:
        raise DataError(prepared.collection.root, f"site has too little data: {exc}") from None
    least = min_training_samples(cfg.partition)
    if partition_id is not None and len(train) < least:
        # partition.min_samples counts a site's training and validation images together
        # (changing that would redraw published partitions); say when training is short
        log.warning(
            "site %d keeps %d training images after holding out %d for its validation "
            "split (partition.min_samples=%d counts both)",
            partition_id,
            len(train),
            len(val),
            least,
        )
    return train, val


@lru_cache(maxsize=2)
def _prepared(cfg_yaml: str, data_path: str) -> tuple[DictConfig, PreparedRun]:
    """Per process, once per config: data, decode cache, model template, trunk features.

    Shared by every partition a simulation actor serves, so rotating sites through
    a few actors never re-reads the dataset.
    """
    cfg = site_config(OmegaConf.create(cfg_yaml), data_path or None)
    return cfg, prepare_run(cfg)


@lru_cache(maxsize=1024)
def load_site(
    cfg_yaml: str, partition_id: int | None, num_partitions: int | None, data_path: str
) -> tuple[DictConfig, SiteData]:
    """The site's config (pointed at its folder in deployment) and its data, cached."""
    cfg, run = _prepared(cfg_yaml, data_path)
    train, val = site_indices(
        cfg, run.data, partition_id=partition_id, num_partitions=num_partitions
    )
    return cfg, SiteData(run=run, train=train, val=val)

"""A site's view of the data: its own samples, split into local train and validation.

In simulation a site is partition ``partition_id`` of the configured dataset's
training pool (the global test sets stay with the server). In deployment it is
the hospital's own folder (``data_path``), read with the generic site layout.
Both paths end in the same :class:`SiteData`, so a site has one code path.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

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


class SiteCache:
    """What a ClientApp keeps between messages: prepared runs (data, decode cache, model
    template, frozen-trunk features: the expensive part) and each site's split.

    Owned by the ClientApp that creates it (``make_client_app``), bounded by ``runs``
    prepared runs and ``sites`` site splits, least recently used first out, and gone
    with its owner: a ``fedscan simulate`` sweep does not keep every run's data alive.

    Flower's Ray backend pickles the ClientApp into its actor with *every* message, so
    a pickled cache carries only its identity and sizes; in the actor's process it
    resolves to that process's cache of the same owner (created on first use), so an
    actor serving many sites and rounds prepares a run once, as before.
    """

    _in_process: ClassVar[dict[str, SiteCache]] = {}  # owner token -> cache, in a Ray actor

    def __init__(self, *, runs: int = 2, sites: int = 1024, token: str | None = None) -> None:
        if runs < 1 or sites < 1:
            raise ValueError(f"SiteCache sizes must be >= 1, got runs={runs}, sites={sites}")
        self.runs, self.sites = runs, sites
        self.token = token or uuid.uuid4().hex
        self._runs: OrderedDict[tuple, tuple[DictConfig, PreparedRun]] = OrderedDict()
        self._sites: OrderedDict[tuple, tuple[DictConfig, SiteData]] = OrderedDict()
        self._lock = threading.Lock()

    def __reduce__(self):
        return (SiteCache._resolve, (self.token, self.runs, self.sites))

    @classmethod
    def _resolve(cls, token: str, runs: int, sites: int) -> SiteCache:
        """The process's cache of owner ``token`` (the unpickled side of :meth:`__reduce__`)."""
        if token not in cls._in_process:
            cls._in_process[token] = cls(runs=runs, sites=sites, token=token)
        return cls._in_process[token]

    def __len__(self) -> int:
        return len(self._runs)

    def load(
        self, cfg_yaml: str, partition_id: int | None, num_partitions: int | None, data_path: str
    ) -> tuple[DictConfig, SiteData]:
        """The site's config (pointed at its folder in deployment) and its data."""
        key = (cfg_yaml, partition_id, num_partitions, data_path)
        with self._lock:
            if key in self._sites:
                self._sites.move_to_end(key)
                return self._sites[key]
        cfg, run = self._prepared(cfg_yaml, data_path)
        train, val = site_indices(
            cfg, run.data, partition_id=partition_id, num_partitions=num_partitions
        )
        with self._lock:
            self._sites[key] = (cfg, SiteData(run=run, train=train, val=val))
            _trim(self._sites, self.sites)
            return self._sites[key]

    def _prepared(self, cfg_yaml: str, data_path: str) -> tuple[DictConfig, PreparedRun]:
        """Once per config: shared by every partition this process serves, so rotating
        sites through a few workers never re-reads the dataset."""
        key = (cfg_yaml, data_path)
        with self._lock:
            if key in self._runs:
                self._runs.move_to_end(key)
                return self._runs[key]
        cfg = site_config(OmegaConf.create(cfg_yaml), data_path or None)
        prepared = (cfg, prepare_run(cfg))
        with self._lock:
            self._runs[key] = prepared
            _trim(self._runs, self.runs)
        return prepared


def _trim(entries: OrderedDict, size: int) -> None:
    while len(entries) > size:
        entries.popitem(last=False)

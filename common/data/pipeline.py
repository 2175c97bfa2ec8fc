"""From the ``dataset`` config to data ready for any model: read, fingerprint, split, cache.

Shared by the centralised baseline, the server and every federated site, so that
all of them see the same splits and the same cached pixels for the same config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.core.paths import cache_root, data_root
from fedscan.common.core.settings import typed
from fedscan.common.data.cache import ImageCache, PreprocessSpec, build_cache
from fedscan.common.data.datasets import ImageCollection, load_dataset
from fedscan.common.data.datasets.synthetic import SYNTHETIC_LABEL
from fedscan.common.data.dicom import domain_window
from fedscan.common.data.fingerprint import Fingerprints, compute_fingerprints
from fedscan.common.data.splits import Splits, make_splits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    collection: ImageCollection
    fingerprints: Fingerprints
    splits: Splits
    cache: ImageCache

    @property
    def label(self) -> str:
        """Human label for titles and logs; synthetic data is never unlabelled."""
        c = self.collection
        return f"{SYNTHETIC_LABEL} [{c.domain}]" if c.synthetic else c.name


def _typed(section: DictConfig | dict, key: str, kind: type, prefix: str) -> Any:
    return typed(section[key], kind, f"{prefix}.{key}")


def check_dataset_config(ds: DictConfig) -> int:
    """Cheap checks of the ``dataset`` group before anything is read; returns the image size."""
    size = _typed(ds, "image_size", int, "dataset")
    if not 16 <= size <= 1024:
        raise ConfigError("dataset.image_size", f"must be in [16, 1024], got {size}")
    if ds.on_unreadable not in ("error", "skip"):
        raise ConfigError("dataset.on_unreadable", f"use error or skip, got {ds.on_unreadable}")
    return size


def prepare_data(cfg: DictConfig) -> PreparedData:
    ds = cfg.dataset
    size = check_dataset_config(ds)
    croot = cache_root(cfg.cache_dir)
    collection = load_dataset(
        OmegaConf.to_container(ds), data_root=data_root(cfg.data_root), cache_root=croot
    )
    fp = compute_fingerprints(collection, croot)
    bad = np.flatnonzero(~fp.readable)
    if len(bad):
        listing = "; ".join(f"{collection.paths[i]} ({fp.error[i]})" for i in bad[:5])
        if ds.on_unreadable == "error":
            raise DataError(
                collection.paths[bad[0]],
                f"{len(bad)} unreadable image(s): {listing}"
                " — fix them or set dataset.on_unreadable=skip",
            )
        log.warning("skipping %d unreadable image(s): %s", len(bad), listing)
    sp = ds.split
    splits = make_splits(
        collection,
        fp,
        policy=str(sp.policy),
        val_fraction=_typed(sp, "val_fraction", float, "dataset.split"),
        test_fraction=_typed(sp, "test_fraction", float, "dataset.split"),
        seed=int(cfg.seed),
        scan_threshold=float(sp.get("scan_threshold", 15.0)),
        scan_min_size=int(sp.get("scan_min_size", 3)),
        near_distance=None if sp.get("near_distance") is None else int(sp.near_distance),
        fold=_typed(sp, "fold", int, "dataset.split") if "fold" in sp else 0,
        cache=croot / "splits",
    )
    spec = PreprocessSpec(size=size, ct_window=domain_window(collection.domain))
    cache = build_cache(collection, spec, croot)
    return PreparedData(collection, fp, splits, cache)

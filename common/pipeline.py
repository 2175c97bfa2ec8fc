"""From a resolved config to model-ready arrays: read, fingerprint, split, cache.

Shared by the centralised baseline and (later) every federated site, so that all
of them see the same splits, the same cached pixels and the same frozen-trunk
features for the same config.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.cache import ImageCache, PreprocessSpec, build_cache
from common.datasets import ImageCollection, load_dataset
from common.datasets.synthetic import SYNTHETIC_LABEL
from common.dicom import domain_window
from common.errors import ConfigError, DataError
from common.fingerprint import Fingerprints, compute_fingerprints
from common.models import StagedModel
from common.paths import cache_root, data_root
from common.splits import Splits, make_splits
from common.training import TrainSettings, cached_features, prefix_digest

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
    value = section[key]
    try:
        if kind is bool and isinstance(value, str):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix}.{key}", f"expected {kind.__name__}, got {value!r}") from None


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The ``train`` group as validated :class:`TrainSettings` (errors name the key)."""
    fields = {f.name: f for f in dataclasses.fields(TrainSettings)}
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    values = {}
    for key in cfg.train:
        if key not in fields:
            raise ConfigError(f"train.{key}", f"unknown key; known: {sorted(fields)}")
        values[key] = _typed(cfg.train, key, kinds[str(fields[key].type)], "train")
    return TrainSettings(**values, seed=int(cfg.seed))


def prepare_data(cfg: DictConfig) -> PreparedData:
    ds = cfg.dataset
    size = _typed(ds, "image_size", int, "dataset")
    if not 16 <= size <= 1024:
        raise ConfigError("dataset.image_size", f"must be in [16, 1024], got {size}")
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
        if ds.on_unreadable != "skip":
            raise ConfigError("dataset.on_unreadable", f"use error or skip, got {ds.on_unreadable}")
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


def model_inputs(
    model: StagedModel, data: PreparedData, cfg: DictConfig, device: torch.device
) -> tuple[np.ndarray, int]:
    """The array the trainable stages read, and the stage they start at.

    With ``model.feature_cache`` and a frozen trunk this is the trunk's cached
    output (augmentation cannot apply to it); otherwise the cached uint8 images.
    """
    cut = model.frozen_until
    if not (cfg.model.get("feature_cache", False) and cut > 0):
        return data.cache.images, 0
    # Every readable image, not just this split's: the cache key does not depend on
    # the split, so a later run with another seed or fold must find its rows filled.
    needed = np.flatnonzero(data.cache.ok)
    folder = cache_root(cfg.cache_dir) / "features"
    name = f"{data.cache.key}-{model.name}-cut{cut}-{prefix_digest(model, cut)}.npy"
    model.to(device)
    feats = cached_features(
        model, data.cache.images, needed, cut=cut, cache_file=folder / name, device=device
    )
    return feats, cut

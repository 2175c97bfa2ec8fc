"""Honest train / validation / test splits.

* ``official`` (brain MRI): the publisher's train/test split, a validation set
  carved from train, and ``test_dedup``: the official test without the images
  that are pixel-identical to a training image (exact duplicates inside a split
  are collapsed to one, too). Both test figures are reported side by side.
* ``grouped`` (lung CT, hospital folders, synthetic): a deterministic,
  stratified split over leakage groups (scan groups joined with duplicate
  groups), so no scan and no duplicate ever appears on two sides.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.data.datasets.base import ImageCollection
from fedscan.common.data.fingerprint import Fingerprints
from fedscan.common.data.grouping import leakage_groups, scan_groups


@dataclass(frozen=True)
class Splits:
    """Index arrays into the collection; ``tests`` maps a reported split name to indices."""

    train: np.ndarray
    val: np.ndarray
    tests: dict[str, np.ndarray]
    groups: np.ndarray  # leakage-group id per image (-1: excluded / unreadable)
    excluded: dict[str, list[int]] = field(default_factory=dict)

    def summary(self, collection: ImageCollection) -> dict[str, dict[str, int]]:
        parts = {"train": self.train, "val": self.val, **self.tests}
        return {k: {"total": len(v), **collection.class_counts(v)} for k, v in parts.items()}


def _keep_first_per_hash(indices: np.ndarray, fp: Fingerprints) -> tuple[np.ndarray, list[int]]:
    seen: set[str] = set()
    keep, dropped = [], []
    for i in indices.tolist():
        h = fp.pixel_hash[i]
        (dropped if h in seen else keep).append(i)
        seen.add(h)
    return np.array(keep, dtype=np.int64), dropped


def group_holdout(
    indices: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    seed: int,
    what: str,
    fold: int = 0,
    *,
    cache: Path | None = None,
    few_groups_ok: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, held-out ~fraction) by whole groups, stratified by label.

    ``fold`` picks which of the ``round(1 / fraction)`` folds is held out, so that
    rotating it gives grouped cross-validation. ``few_groups_ok``: with fewer groups
    than folds (a small site holding a few scans), hold out a random ~fraction of
    whole groups instead, at least one, unstratified. ``cache``: a folder where the result
    is kept under a digest of every input (scikit-learn's StratifiedGroupKFold
    takes ~4 s on the brain set's 5,000 groups, and every simulated site process
    would pay it again).
    """
    store = None
    if cache is not None:
        h = hashlib.sha1(f"{fraction}|{seed}|{fold}|{sklearn.__version__}".encode())
        for a in (indices, labels[indices], groups[indices]):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        store = Path(cache) / f"holdout-{h.hexdigest()[:20]}.npz"
        if store.exists():
            with np.load(store) as z:
                return z["rest"], z["held"]
    n_splits = max(2, round(1.0 / fraction))
    n_groups = len(np.unique(groups[indices]))
    if few_groups_ok and 2 <= n_groups < n_splits:
        gss = GroupShuffleSplit(
            n_splits=1, test_size=max(1, round(fraction * n_groups)), random_state=seed
        )
        rest, held = next(gss.split(indices, labels[indices], groups[indices]))
        return np.sort(indices[rest]), np.sort(indices[held])
    if n_groups < n_splits:
        raise DataError(
            "split",
            f"only {n_groups} groups for the {what} split; need at least {n_splits} "
            f"(lower split.{what}_fraction or add data)",
        )
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    if not 0 <= fold < n_splits:
        raise ConfigError("dataset.split.fold", f"must be in [0, {n_splits - 1}], got {fold}")
    with warnings.catch_warnings():
        # A class with fewer images than folds (6 of a class at a small or skewed site,
        # 7 folds for a 15 % holdout) only lands in fewer folds: whole groups are still
        # held out, which is all this split promises. scikit-learn warns on stderr of
        # every site process; the filter is scoped to this call, never global.
        warnings.filterwarnings(
            "ignore", message="The least populated class in y has only", category=UserWarning
        )
        folds = sgkf.split(indices, labels[indices], groups[indices])
        rest, held = next(f for i, f in enumerate(folds) if i == fold)
    rest, held = np.sort(indices[rest]), np.sort(indices[held])
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, rest=rest, held=held)
        tmp.replace(store)
    return rest, held


def make_splits(
    collection: ImageCollection,
    fp: Fingerprints,
    *,
    policy: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    scan_threshold: float = 15.0,
    scan_min_size: int = 3,
    near_distance: int | None = 0,
    fold: int = 0,
    cache: Path | None = None,
) -> Splits:
    """Build the splits for ``collection``; unreadable images are excluded and listed."""
    for key, v in (("split.val_fraction", val_fraction), ("split.test_fraction", test_fraction)):
        if not 0.0 < v < 0.5:
            raise ConfigError(key, f"must be in (0, 0.5), got {v}")
    readable = np.flatnonzero(fp.readable)
    excluded = {"unreadable": np.flatnonzero(~fp.readable).tolist()}
    labels = collection.labels

    if policy == "official":
        split = np.array([s or "" for s in collection.official_split])
        if not {"train", "test"} <= set(split.tolist()):
            raise ConfigError("dataset.split.policy", "'official' needs a dataset with train/test")
        base = np.arange(len(collection))
        groups = leakage_groups(base, fp, near_distance=near_distance)
        train_all = readable[split[readable] == "train"]
        test_all = readable[split[readable] == "test"]
        train_pool, dropped_train = _keep_first_per_hash(train_all, fp)
        train, val = group_holdout(
            train_pool, labels, groups, val_fraction, seed, "val", cache=cache
        )
        train_hashes = set(fp.pixel_hash[train_all].tolist())
        test_unique, _ = _keep_first_per_hash(test_all, fp)
        dedup = np.array([i for i in test_unique if fp.pixel_hash[i] not in train_hashes], np.int64)
        excluded["train_duplicate_collapsed"] = dropped_train
        excluded["test_pixel_identical_to_train"] = sorted(
            set(test_all.tolist()) - set(dedup.tolist())
        )
        tests = {"test_official": test_all, "test_dedup": dedup}
    elif policy in ("scan_groups", "grouped"):
        if policy == "scan_groups":
            base = scan_groups(collection, fp, threshold=scan_threshold, min_size=scan_min_size)
            test_name = "test_scan_grouped"
        else:
            base = np.arange(len(collection))
            test_name = "test_grouped"
        groups = leakage_groups(base, fp, near_distance=near_distance)
        rest, test = group_holdout(
            readable, labels, groups, test_fraction, seed, "test", fold, cache=cache
        )
        train, val = group_holdout(
            rest, labels, groups, val_fraction / (1 - test_fraction), seed + 1, "val", cache=cache
        )
        tests = {test_name: test}
    else:
        raise ConfigError(
            "dataset.split.policy",
            f"unknown policy '{policy}'; use official, scan_groups or grouped",
        )
    groups = groups.astype(np.int64)
    groups[~fp.readable] = -1
    return Splits(train=train, val=val, tests=tests, groups=groups, excluded=excluded)


def groups_are_scans(dataset_cfg: Mapping[str, Any]) -> bool:
    """Whether a test split's leakage groups are CT scans (lung: ``scan_groups``), so
    its metrics are also reported per scan (:mod:`common.learn.scans`)."""
    return str(dataset_cfg.get("split", {}).get("policy", "")) == "scan_groups"

"""Confidence intervals for test metrics, from a bootstrap over leakage groups.

A test split's images are not independent draws: the brain test holds exact
duplicates, a lung test split a few dozen slices of each of about 20 scans. A
bootstrap over images would treat 40 slices of one benign scan as 40 independent
benign cases and print an interval far too narrow. Here the unit resampled is the
*leakage group* the splits were made over (``Splits.groups``: scan groups joined
with duplicate groups; a singleton otherwise), so the interval reflects how many
independent cases the figure rests on.

The resampling is scipy's (``scipy.stats.bootstrap``, percentile method) over the
group ids; one resample's metrics come from its weighted confusion matrix, so the
B resamples cost one matrix product, not B calls to scikit-learn. The metrics use
scikit-learn's conventions (``zero_division=0``: a class a resample lacks scores 0
in the macro-F1 and has no recall).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap

from fedscan.common.core.errors import ConfigError

MIN_RESAMPLES = 100


@dataclass(frozen=True, kw_only=True)
class IntervalSettings:
    """``bootstrap.*``: how many resamples, at what confidence, from which seed."""

    resamples: int
    confidence: float
    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.resamples, int) or self.resamples < MIN_RESAMPLES:
            raise ConfigError(
                "bootstrap.resamples",
                f"must be an integer >= {MIN_RESAMPLES} (fewer resamples give an interval "
                f"whose ends move from seed to seed), got {self.resamples}",
            )
        if not 0 < self.confidence < 1:
            raise ConfigError("bootstrap.confidence", f"must be in (0, 1), got {self.confidence}")


def interval_settings(cfg: Mapping[str, Any]) -> IntervalSettings | None:
    """The ``bootstrap`` section of a resolved config (seeded by ``seed``); ``None`` for a
    config from before the section existed (a resumed old run)."""
    section = cfg.get("bootstrap")
    if section is None:
        return None
    return IntervalSettings(
        resamples=section.get("resamples"),
        confidence=float(section.get("confidence")),
        seed=int(cfg.get("seed", 0)),
    )


def _confusions(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray, c: int) -> np.ndarray:
    """[R, C, C] confusion matrices (rows true) of ``R`` rows of per-sample weights."""
    cell = np.eye(c * c)[y_true * c + y_pred]  # [N, C*C] one-hot of each sample's cell
    return (weights @ cell).reshape(-1, c, c)


def _scores(cm: np.ndarray) -> np.ndarray:
    """[R, 3 + C]: accuracy, balanced accuracy, macro-F1, then the recall of each class
    (NaN where the resample holds none of that class)."""
    diag = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = diag / support  # NaN: class absent
        precision = np.where(predicted > 0, diag / np.maximum(predicted, 1e-300), 0.0)
        r0 = np.nan_to_num(recall)
        f1 = np.where(precision + r0 > 0, 2 * precision * r0 / (precision + r0), 0.0)
        accuracy = diag.sum(axis=1) / cm.sum(axis=(1, 2))
        balanced = np.nanmean(recall, axis=1)
    return np.column_stack([accuracy, balanced, f1.mean(axis=1), recall])


def group_bootstrap(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    settings: IntervalSettings,
) -> dict:
    """Percentile intervals of accuracy, balanced accuracy, macro-F1 and each class's
    recall, resampling whole groups (``groups[i]``: the group of sample ``i``).

    Returns ``{"method", "resamples", "confidence", "groups", "accuracy": [lo, hi],
    ..., "recall": {class: [lo, hi] or None}}``; a class's interval is ``None`` when it
    occurs in no group.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    groups = np.asarray(groups)
    if not len(y_true) == len(y_pred) == len(groups):
        raise ValueError(f"{len(y_true)} labels, {len(y_pred)} predictions, {len(groups)} groups")
    if len(y_true) == 0:
        raise ValueError("no samples to bootstrap")
    c = len(classes)
    _, member = np.unique(groups, return_inverse=True)  # sample -> 0..G-1
    n_groups = int(member.max()) + 1

    def statistic(ids: np.ndarray, axis: int = -1) -> np.ndarray:
        ids = np.moveaxis(np.asarray(ids), axis, -1)
        flat = ids.reshape(-1, ids.shape[-1])
        counts = np.zeros((len(flat), n_groups))
        np.add.at(counts, (np.arange(len(flat))[:, None], flat), 1.0)
        out = _scores(_confusions(y_true, y_pred, counts[:, member], c))  # [R, 3 + C]
        return np.moveaxis(out.reshape(*ids.shape[:-1], -1), -1, 0)

    with warnings.catch_warnings():  # scipy's own interval of a constant metric; unused
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(
            (np.arange(n_groups),),
            statistic,
            n_resamples=settings.resamples,
            confidence_level=settings.confidence,
            method="percentile",
            vectorized=True,
            batch=250,
            random_state=np.random.default_rng(settings.seed),
        )
    dist = np.asarray(res.bootstrap_distribution)  # [3 + C, resamples]
    tail = 100 * (1 - settings.confidence) / 2

    def ends(row: np.ndarray) -> list[float] | None:
        row = row[np.isfinite(row)]
        if len(row) == 0:
            return None
        return [float(np.percentile(row, tail)), float(np.percentile(row, 100 - tail))]

    return {
        "method": "percentile bootstrap over leakage groups",
        "resamples": settings.resamples,
        "confidence": settings.confidence,
        "groups": n_groups,
        "accuracy": ends(dist[0]),
        "balanced_accuracy": ends(dist[1]),
        "macro_f1": ends(dist[2]),
        "recall": {
            name: (ends(dist[3 + i]) if (y_true == i).any() else None)
            for i, name in enumerate(classes)
        },
    }

"""Lung CT metrics per scan, not per slice.

A radiologist reads a CT scan, not one slice of it; IQ-OTH/NCCD's test split holds
a few dozen slices of each of about 20 scans, so slice accuracy counts one scan's
slices many times over. Here the slices of one scan group (``Splits.groups`` under
``dataset.split.policy=scan_groups``: inferred scans joined with duplicate groups)
become one case:

- the scan's label is its slices' label (the most frequent one, should a duplicate
  group have joined slices of two classes);
- **the scan's prediction is the argmax of the mean of its slices' class
  probabilities.** The rule has no parameter, so nothing is tuned, on validation or
  elsewhere.

The metrics are :func:`classification_metrics`' on the scans, and their intervals
resample scans (:mod:`common.learn.intervals`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedscan.common.learn.intervals import IntervalSettings, group_bootstrap
from fedscan.common.learn.metrics import classification_metrics

RULE = "argmax of the mean of the scan's slice probabilities"


def per_scan(
    y_true: np.ndarray, probs: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(label [S], mean probabilities [S, C]) of the ``S`` scans in ``groups``."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    _, scan = np.unique(np.asarray(groups), return_inverse=True)
    n_scans, n_classes = int(scan.max()) + 1, probs.shape[1]
    mean = np.zeros((n_scans, n_classes))
    np.add.at(mean, scan, probs)
    mean /= np.bincount(scan, minlength=n_scans)[:, None]
    votes = np.zeros((n_scans, n_classes), dtype=np.int64)
    np.add.at(votes, (scan, y_true), 1)
    return votes.argmax(1), mean


def scan_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    intervals: IntervalSettings | None = None,
) -> dict:
    """Metrics over scans (see the module text), with ``rule`` naming how a scan is
    predicted and ``ci`` when ``intervals`` is given."""
    labels, mean = per_scan(y_true, probs, groups)
    out = classification_metrics(labels, mean, classes)
    out["rule"] = RULE
    if intervals is not None:
        out["ci"] = group_bootstrap(
            labels, mean.argmax(1), np.arange(len(labels)), classes, intervals
        )
    return out

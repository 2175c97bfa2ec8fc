"""The statistics rounds' one contract: whose sums, in which order, installed how.

A statistics round asks the holders of the data for sums under the model's current
weights, adds them up, and installs what they determine: the BatchNorm statistics
(``bn``, :mod:`bn_stats`), the centre of the unit features (``centre``,
:mod:`centre`, before round 1) or a closed-form head (``fed3r`` / ``fedncm``,
:mod:`head_init`). Three callers run them and differ only in *whose* sums they add:

- a federation asks its sites (plain replies summed, or one SecAgg+ round);
- the pooled / centralised baseline sums one data set, the pooled training split;
- the local baseline sums each site's own split, for that site's model.

So what a statistics round computes at one data holder (:func:`local_statistics`),
how a total is installed (:func:`install_statistics`) and the refit order after the
last round (:func:`refit`: BatchNorm statistics first, then the head, because the
head is solved on the features the re-estimated statistics produce) are written
once, here, and every caller passes only its way of getting the total.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from fedscan.common.federated.bn_stats import BN_KIND, install_bn, site_bn_statistics
from fedscan.common.federated.centre import (
    CENTRE_KIND,
    centre_module,
    install_centre,
    site_centre_statistics,
)
from fedscan.common.federated.head_init import (
    classifier_features,
    linear_head,
    set_head,
    site_statistics,
    solve_head,
)
from fedscan.common.federated.settings import FederationSettings
from fedscan.common.learn.models.staged import StagedModel

# A way to get the summed ``kind`` statistics under the model's current weights
Sums = Callable[[str], Mapping[str, np.ndarray]]


def initial_kinds(model: StagedModel, fed: FederationSettings) -> list[str]:
    """The statistics rounds before round 1, in their order: the feature centre
    (``model.feature_norm=centred``), then the head (``federation.head_init``), solved
    on the centred features."""
    kinds = [CENTRE_KIND] if centre_module(model) is not None else []
    return kinds + ([fed.head_init] if fed.head_init != "none" else [])


def refit_kinds(fed: FederationSettings) -> list[str]:
    """The statistics rounds after the last round, in their order: the BatchNorm
    statistics (``federation.bn_refit``), then the head (``federation.head_refit``)."""
    kinds = [BN_KIND] if fed.bn_refit else []
    return kinds + ([fed.head_refit] if fed.head_refit != "none" else [])


def describe(kinds: list[str]) -> str:
    """``BatchNorm statistics, fed3r head``: what a refit re-estimated, for log lines."""
    return ", ".join("BatchNorm statistics" if k == BN_KIND else f"{k} head" for k in kinds)


def local_statistics(
    model: StagedModel,
    kind: str,
    x: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    start: int,
    device: torch.device,
    batch_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """One data holder's ``kind`` sums over ``x[indices]`` under ``model``'s weights: a
    site's reply to a statistics round, or the whole total of a pooled / local run.
    ``batch_size`` and ``seed`` are the BatchNorm pass's (shuffled batches, as in
    training); the head's sums do not depend on them."""
    if kind == BN_KIND:
        return site_bn_statistics(
            model, x, indices, start=start, device=device, batch_size=batch_size, seed=seed
        )
    if kind == CENTRE_KIND:
        return site_centre_statistics(model, x, indices, start=start, device=device)
    feats = classifier_features(model, x, indices, start=start, device=device)
    return site_statistics(kind, feats, labels[indices], linear_head(model).out_features)


def install_statistics(
    model: StagedModel, kind: str, total: Mapping[str, np.ndarray], *, ridge: float, scale: float
) -> None:
    """Write what the summed ``kind`` statistics determine into ``model``: the BatchNorm
    layers' running statistics, the feature centre, or the solved head times ``scale``."""
    if kind == BN_KIND:
        install_bn(model, total)
    elif kind == CENTRE_KIND:
        install_centre(model, total)
    else:
        set_head(model, *solve_head(kind, total, ridge=ridge), scale=scale)


def install_round(model: StagedModel, kind: str, sums: Sums, fed: FederationSettings) -> None:
    """One statistics round: ``sums(kind)`` under the model's current weights, installed."""
    install_statistics(model, kind, sums(kind), ridge=fed.head_ridge, scale=fed.head_scale)


def refit(model: StagedModel, fed: FederationSettings, sums: Sums) -> list[str]:
    """``federation.bn_refit`` / ``head_refit`` after training: each statistics round of
    :func:`refit_kinds` in turn, each on the model the previous one left. Returns the
    kinds run (empty when nothing is refitted)."""
    kinds = refit_kinds(fed)
    for kind in kinds:
        install_round(model, kind, sums, fed)
    return kinds

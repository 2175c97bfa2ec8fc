"""The centring statistics round of ``model.feature_norm=centred``, framework-free.

Before round 1 each site sends the sum of its training images' unit feature vectors
and their count; the server installs the pooled mean as the centre of the model's
:class:`~fedscan.common.learn.models.staged.L2Normalize` (why centring helps DP-SGD:
its docstring). The sum of unit vectors changes by at most 1 when one image is added
or removed, so under ``privacy=dp_sgd`` a site adds Gaussian noise of standard
deviation ``sigma`` to it before it leaves: the Gaussian mechanism, accounted in the
site's privacy ledger as one step at sample rate 1 (``common/federated/privacy.py``
plans the training noise so that the run, this query included, spends the target).
The count is not noised: a site reports its number of training images in every
round anyway (``num-examples``; docs/explanation/threat-model.md).

Pure functions, like :mod:`head_init`'s; :mod:`refit` runs them for every caller.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedscan.common.core.errors import DataError
from fedscan.common.federated.head_init import classifier_features
from fedscan.common.learn.models.staged import L2Normalize, StagedModel

CENTRE_KIND = "centre"
CENTRE_KEYS = ("unit_sum", "count")


def centre_module(model: StagedModel) -> L2Normalize | None:
    """The model's centred :class:`L2Normalize`, or ``None`` (no centring round)."""
    return next(
        (m for m in model.stages[-1].modules() if isinstance(m, L2Normalize) and m.centred),
        None,
    )


def site_centre_statistics(
    model: StagedModel,
    x: np.ndarray,
    indices: np.ndarray,
    *,
    start: int,
    device: torch.device,
    noise: float = 0.0,
    generator: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """One data holder's sum of unit features (plus Gaussian noise of standard
    deviation ``noise``, drawn from ``generator``) and its count, in float64."""
    norm = centre_module(model)
    if norm is None:
        raise DataError("statistics round", f"{model.name} has no centred feature norm")
    kept = norm.centre.clone()
    norm.centre.zero_()  # the plain unit features, whatever centre the model holds
    try:
        feats = classifier_features(model, x, indices, start=start, device=device)
    finally:
        norm.centre.copy_(kept)
    unit_sum = feats.sum(0)
    if noise > 0:
        if generator is None:
            raise ValueError("a noised centring sum needs a generator")
        unit_sum = unit_sum + generator.normal(0.0, noise, unit_sum.shape)
    return {"unit_sum": unit_sum, "count": np.array([float(len(indices))])}


def install_centre(model: StagedModel, total: Mapping[str, np.ndarray]) -> None:
    """The pooled mean unit feature as the model's centre."""
    norm = centre_module(model)
    if norm is None:
        raise DataError("statistics round", f"{model.name} has no centred feature norm")
    count = float(np.asarray(total["count"]).sum())
    if not count > 0:
        raise DataError("statistics round", "the sites' centring sums count no image")
    mean = np.asarray(total["unit_sum"], dtype=np.float64) / count
    with torch.no_grad():
        norm.centre.copy_(torch.from_numpy(mean).to(norm.centre))

"""A one-shot classifier from the sites' feature statistics: Fed3R and FedNCM.

With a pretrained trunk, the linear classifier can be fitted exactly from sums
each site computes once over the features that enter it, on its own training
split, in float64:

- **Fed3R** (Fanì et al., ICML 2024): site k sends ``A_k = Phi_k^T Phi_k`` and
  ``b_k = Phi_k^T Y_k`` (``Phi`` with a bias column, ``Y`` one-hot); the server
  solves ``(lambda I + sum A_k) W = sum b_k``. Sums commute with concatenation,
  so the result *is* the ridge classifier of the pooled training features, for
  any partition: label skew cannot bias it.
- **FedNCM** (Legate et al., NeurIPS 2023): site k sends per-class feature sums
  and counts; the head is the pooled class means, each scaled to unit norm.

The head then initialises the global model's classifier and the configured
strategy fine-tunes it ("+FT"). What a site reveals: its class counts and its
class-conditional feature sums (FedNCM), or the feature Gram matrix and the
feature x class cross-term (Fed3R). No per-image row leaves the site.

Pure functions (``site_statistics``, ``sum_statistics``, ``solve_head``), like
Flower's ``aggregate``; the server and the site glue only move arrays, and
:mod:`refit` runs them for every caller (federation, pooled and local runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import nn

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.core.options import HEAD_INITS
from fedscan.common.data.transforms import to_float
from fedscan.common.learn.models.staged import L2Normalize, StagedModel
from fedscan.common.learn.training import autocast

STAT_KEYS = {"fed3r": ("gram", "cross"), "fedncm": ("class_sums", "class_counts")}


def linear_head(model: StagedModel, *, key: str = "federation.head_init") -> nn.Linear:
    """The model's final ``nn.Linear`` (the classifier stage, after dropout / identity /
    ``model.feature_norm``'s normalisation); a model without one is refused naming
    ``key``, the setting that needs it."""
    stage = model.stages[-1]
    modules = list(stage) if isinstance(stage, nn.Sequential) else [stage]
    head, rest = modules[-1], modules[:-1]
    if not isinstance(head, nn.Linear) or not all(
        isinstance(m, nn.Dropout | nn.Identity | L2Normalize) for m in rest
    ):
        raise ConfigError(
            key,
            f"{model.name}'s classifier stage is not a linear layer "
            f"({type(stage).__name__}); use {key}={'false' if key.endswith('freeze') else 'none'}",
        )
    return head


@torch.inference_mode()
def classifier_features(
    model: StagedModel,
    x: np.ndarray,
    indices: np.ndarray,
    *,
    start: int,
    device: torch.device,
    batch_size: int = 128,
) -> np.ndarray:
    """float64 inputs of the final linear layer for ``x[indices]`` (``x`` feeds
    ``stages[start]``).

    Runs ``stages[start:-1]`` of the current model in eval mode, then what precedes
    the linear layer in the classifier stage (dropout: nothing in eval mode; the
    normalisation of ``model.feature_norm=l2``), so a solved head sees what the model
    feeds it; in feature mode (``start`` = the classifier) the cached rows are the
    features before that.
    """
    model.eval()
    model.to(device)
    stop = len(model.stages) - 1
    head = linear_head(model)
    last = model.stages[-1]
    before_head = list(last)[:-1] if isinstance(last, nn.Sequential) else []
    out = [np.zeros((0, head.in_features))]
    for s in range(0, len(indices), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[np.asarray(indices[s : s + batch_size])]))
        xb = (to_float(xb) if xb.dtype == torch.uint8 else xb.float()).to(device)
        with autocast(device):
            for stage in [*model.stages[start:stop], *before_head]:
                xb = stage(xb)
        out.append(xb.float().flatten(1).cpu().numpy().astype(np.float64))
    return np.concatenate(out)


def site_statistics(
    kind: str, features: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """One site's sums (float64) for ``kind`` (fed3r | fedncm); no per-sample row."""
    if kind not in STAT_KEYS:
        raise ConfigError("federation.head_init", f"use one of {HEAD_INITS}, got '{kind}'")
    phi = np.asarray(features, dtype=np.float64)
    y = np.eye(num_classes)[np.asarray(labels, dtype=np.int64)]
    if kind == "fed3r":
        phi1 = np.hstack([phi, np.ones((len(phi), 1))])
        return {"gram": phi1.T @ phi1, "cross": phi1.T @ y}
    return {"class_sums": y.T @ phi, "class_counts": y.sum(0)}


def sum_statistics(stats: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum of the sites' statistics; mismatched or non-finite ones are refused."""
    if not stats:
        raise DataError("statistics round", "no site sent statistics")
    keys = set(stats[0])
    total = {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in stats[0].items()}
    for i, s in enumerate(stats):
        if set(s) != keys:
            raise DataError(
                "statistics round", f"reply {i} has keys {sorted(s)}, not {sorted(keys)}"
            )
        for k, v in s.items():
            v = np.asarray(v, dtype=np.float64)
            if v.shape != total[k].shape or not np.isfinite(v).all():
                raise DataError("statistics round", f"reply {i}: '{k}' has the wrong shape or NaN")
            total[k] += v
    return total


def solve_head(
    kind: str, total: Mapping[str, np.ndarray], *, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(weight [C, d], bias [C])`` of the classifier from the summed statistics."""
    if kind == "fed3r":
        if not ridge > 0:
            raise ConfigError("federation.head_ridge", f"must be > 0, got {ridge}")
        gram, cross = total["gram"], total["cross"]
        a = gram + ridge * np.eye(len(gram))
        wb = scipy.linalg.solve(a, cross, assume_a="pos")  # Cholesky; never an inverse
        return wb[:-1].T.copy(), wb[-1].copy()
    sums, counts = total["class_sums"], total["class_counts"]
    means = sums / np.maximum(counts, 1)[:, None]
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    weight = np.where(norms > 0, means / np.maximum(norms, 1e-12), 0.0)
    return weight, np.zeros(len(weight))


def set_head(model: StagedModel, weight: np.ndarray, bias: np.ndarray, *, scale: float) -> None:
    """Write the solved head, times ``scale``, into the model's final linear layer.

    ``scale`` (``federation.head_scale``) turns the head's outputs into logits for
    the softmax fine-tuning that follows: a ridge head regresses one-hot targets, so
    its outputs span about [0, 1] and their softmax is nearly uniform; unit-norm NCM
    weights likewise. Scaling leaves every prediction (the argmax) unchanged, so the
    one-shot model is the same; what it changes is how far the first fine-tuning
    steps move the head (with Adam, a step of ``lr`` is ``1 / scale`` as large
    relative to the head's logits), i.e. how much of the exact head survives local
    training on skewed sites.
    """
    if not scale > 0:
        raise ConfigError("federation.head_scale", f"must be > 0, got {scale}")
    head = linear_head(model)
    if weight.shape != tuple(head.weight.shape):
        raise ValueError(f"head is {tuple(head.weight.shape)}, solved {weight.shape}")
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(scale * weight).to(head.weight))
        if head.bias is not None:
            head.bias.copy_(torch.from_numpy(scale * bias).to(head.bias))

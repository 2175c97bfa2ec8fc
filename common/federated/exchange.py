"""What a site exchanges with the server: which tensors travel, which stay (framework-free).

Only the *trainable* stages travel: the frozen pretrained trunk is identical at
every site (it ships with the package), so sending it would cost bandwidth and,
through float rounding in the weighted average, perturb weights that must stay
bit-identical for the per-site feature caches to remain valid.

BatchNorm (``fedbn``): with ``fedbn=False`` (default) BatchNorm weights and
running statistics of the trainable stages are averaged like every other
tensor; with ``fedbn=True`` they never leave the site (FedBN, Li et al. 2021),
which helps when sites' scanners differ in intensity statistics. The server's
global model then carries the initial BatchNorm state.
"""

from __future__ import annotations

import torch
from torch import nn

from fedscan.common.learn.models.staged import StagedModel

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def exchanged_keys(model: StagedModel, *, fedbn: bool = False) -> list[str]:
    """State-dict keys of the trainable stages, minus BatchNorm ones under FedBN."""
    skip: set[str] = set()
    if fedbn:
        for name, mod in model.named_modules():
            if isinstance(mod, _NORM_TYPES):
                skip.update(f"{name}.{k}" for k in mod.state_dict())
    prefix = tuple(f"stages.{i}." for i in range(model.frozen_until, len(model.stages)))
    return [
        k
        for k in model.state_dict()
        if k.startswith(prefix) and k not in skip and not k.endswith("num_batches_tracked")
    ]


def local_keys(model: StagedModel, keys: list[str]) -> list[str]:
    """Trainable-stage state that stays at the site (BatchNorm under FedBN)."""
    exchanged = set(keys)
    prefix = tuple(f"stages.{i}." for i in range(model.frozen_until, len(model.stages)))
    return [k for k in model.state_dict() if k.startswith(prefix) and k not in exchanged]


def get_exchanged(model: StagedModel, keys: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].detach().cpu().clone() for k in keys}


def set_exchanged(model: StagedModel, arrays: dict[str, torch.Tensor], keys: list[str]) -> None:
    """Load received tensors; a missing, extra, mis-shaped or non-finite tensor is refused."""
    state = model.state_dict()
    if set(arrays) != set(keys):
        missing, extra = sorted(set(keys) - set(arrays)), sorted(set(arrays) - set(keys))
        raise ValueError(f"parameter names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"'{k}' has shape {tuple(v.shape)}, expected {tuple(state[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"'{k}' contains NaN or Inf")
    model.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in arrays.items()}})

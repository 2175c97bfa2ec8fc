"""Models as an ordered list of stages, so "freeze all but the last N blocks" is one index.

Every fedscan model takes grayscale [B, 1, H, W] input in [0, 1]; its first stage
adapts that to what the network expects (channel replication, normalisation).
Keeping normalisation inside the model means an exported model needs nothing
but the image size to preprocess correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedscan.common.core.errors import ConfigError

MODES = ("scratch", "features", "finetune")
FEATURE_NORMS = ("none", "l2", "centred")


class InputAdapter(nn.Module):
    """Grayscale [0, 1] -> ``channels`` normalised channels."""

    def __init__(self, channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std


class L2Normalize(nn.Module):
    """Each sample's features scaled to unit Euclidean norm (``model.feature_norm=l2``),
    and with ``centre_dim`` (``centred``) then moved by the federation's mean unit
    feature (the ``centre`` buffer) and scaled to unit norm again.

    DP-SGD clips every per-sample gradient to ``privacy.max_grad_norm``; for a linear
    head that gradient is (softmax - one-hot) x features, so with unit-norm features
    its norm is at most 2 for every image and clipping no longer throws away the
    signal of the bright or large-activation images. It is the classifier stage's
    first module, not part of the cached prefix: the exported model normalises the
    same way, and the feature cache stays shared with un-normalised runs. Per sample,
    so Opacus needs nothing of it.

    Why centre: pretrained features of one kind of scan all point one way (on brain,
    the mean unit feature has norm 0.73), so most of each unit vector is the part all
    images share; it cancels in the averaged gradient but fills the clipping norm, and
    the noise is scaled to that norm. Centred and rescaled, the part that tells the
    classes apart fills it instead. The centre is one statistics round before round 1
    (``common/federated/centre.py``); it stays zero until then (plain ``l2``).
    """

    def __init__(self, centre_dim: int | None = None) -> None:
        super().__init__()
        if centre_dim is not None:
            self.register_buffer("centre", torch.zeros(centre_dim))

    @property
    def centred(self) -> bool:
        return hasattr(self, "centre")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.flatten(1), dim=1)
        if self.centred:
            y = F.normalize(y - self.centre, dim=1)
        return y.view_as(x)


class StagedModel(nn.Module):
    """``stages[0]`` adapts the input, ``stages[-1]`` is the classifier."""

    def __init__(
        self, name: str, stages: Sequence[tuple[str, nn.Module]], num_classes: int
    ) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.stage_names = [n for n, _ in stages]
        self.stages = nn.ModuleList([m for _, m in stages])
        self.frozen_until = 0  # stages[:frozen_until] are frozen
        self.bn_frozen = False  # True: every BatchNorm keeps its stored statistics (FixBN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        for stage in self.stages[start:]:
            x = stage(x)
        return x

    def forward_until(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        for stage in self.stages[:stop]:
            x = stage(x)
        return x

    def train(self, mode: bool = True) -> StagedModel:
        """Frozen stages stay in eval mode so their BatchNorm statistics do not drift.

        With ``bn_frozen`` every BatchNorm layer stays in eval mode too: it normalises
        with its stored statistics and does not update them (its scale and shift still
        train). Under label skew a site's batch holds one or two classes; normalising
        by that batch removes the very shift that tells the classes apart, and the
        average of the sites' running statistics misses the variance between sites.
        """
        super().train(mode)
        for stage in self.stages[: self.frozen_until]:
            stage.eval()
        if self.bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def num_blocks(self) -> int:
        """Stages between the input adapter and the classifier."""
        return len(self.stages) - 2


def cut_index(model: StagedModel, mode: str, finetune_blocks: int) -> int:
    """First trainable stage: 0 (scratch), the classifier (features) or N blocks before it."""
    if mode not in MODES:
        raise ConfigError("model.mode", f"unknown mode '{mode}'; use one of {MODES}")
    if mode == "scratch":
        return 0
    if mode == "features":
        return len(model.stages) - 1
    if not 1 <= finetune_blocks <= model.num_blocks:
        raise ConfigError(
            "model.finetune_blocks",
            f"must be in [1, {model.num_blocks}] for {model.name}, got {finetune_blocks}",
        )
    return len(model.stages) - 1 - finetune_blocks


def set_trainable(model: StagedModel, cut: int) -> StagedModel:
    """Freeze ``stages[:cut]``; the rest trains."""
    model.frozen_until = cut
    for i, stage in enumerate(model.stages):
        for p in stage.parameters():
            p.requires_grad_(i >= cut)
    return model.train(model.training)


def normalise_classifier_input(model: StagedModel, *, centred: bool = False) -> StagedModel:
    """Put :class:`L2Normalize` first in the classifier stage (``model.feature_norm=l2``;
    ``centred``: with a centre the size of the classifier's input)."""
    stage = model.stages[-1]
    modules = list(stage) if isinstance(stage, nn.Sequential) else [stage]
    if not any(isinstance(m, L2Normalize) for m in modules):
        dim = next((m.in_features for m in modules if isinstance(m, nn.Linear)), None)
        if centred and dim is None:
            raise ConfigError("model.feature_norm", "centred needs a linear classifier")
        model.stages[-1] = nn.Sequential(L2Normalize(dim if centred else None), *modules)
    return model


def batchnorm_to_groupnorm(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm2d with GroupNorm (per-sample statistics).

    DP-SGD needs per-sample gradients, which BatchNorm's batch statistics break;
    federated sites with tiny or skewed batches also fare better without them.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            groups = next(g for g in range(min(max_groups, c), 0, -1) if c % g == 0)
            gn: nn.Module = nn.GroupNorm(groups, c, eps=child.eps, affine=child.affine)
            if child.affine:  # keep the learned per-channel scale and shift
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
            # timm's BatchNormAct2d is a BatchNorm2d that also applies its activation.
            extra = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m]
            if extra:
                gn = nn.Sequential(gn, *extra)
            setattr(module, name, gn)
        else:
            batchnorm_to_groupnorm(child, max_groups)
    return module

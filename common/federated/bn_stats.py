"""The global model's BatchNorm statistics re-estimated from the sites' exact sums.

Under label skew FedAvg's BatchNorm statistics are wrong in a way no round of
training repairs: each site's running mean and variance track its own two or three
classes, and the server averages them. The average of the means is close to the
pooled mean, but the average of the variances is the *within-site* variance; the
variance *between* sites, which under label skew is much of the class signal, is
missing. Every BatchNorm then divides by too small a number, and the features the
head reads are distorted (brain, Dirichlet 0.1, the worst seed: a ridge head on
the final model's features scored 95.3 % with the averaged statistics and 96.7 %
with statistics recomputed on the pooled training split, docs/skew.md).

The pooled statistics are sums, so the sites can send them exactly (like Fed3R's):
for every BatchNorm layer of the trainable stages, per channel, the sum over the
site's training images of the image's spatial mean of the layer input and of its
square, and the image count. The server divides and installs ``mean`` and
``E[x^2] - mean^2``. One pass sets every layer from inputs normalised by the
*previous* statistics of the layers before it; a second pass (the default of
``federation.bn_refit``) re-estimates them from corrected inputs: a fixed-point
iteration towards the layer-by-layer pooled statistics. What a site reveals: the
per-channel means and second moments of its activations, no per-image row.

Pure functions (``site_bn_statistics``, ``install_bn``), like ``head_init``'s.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from common.core.errors import ConfigError
from common.data.transforms import to_float
from common.learn.models.staged import StagedModel
from common.learn.training import autocast

BN_KIND = "bn"  # the statistics round's kind on the wire, beside fed3r / fedncm
COUNT = "bn.count"


def bn_layers(model: StagedModel, start: int) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers the sites train (``stages[start:]``), by state-dict prefix."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and name.startswith("stages.")
        and int(name.split(".")[1]) >= start
        and m.track_running_stats
    }


def check_bn_refit(model: StagedModel, start: int) -> None:
    """Refuse ``federation.bn_refit`` for a model whose trained stages hold no BatchNorm."""
    if not bn_layers(model, start):
        raise ConfigError(
            "federation.bn_refit",
            f"{model.name} has no BatchNorm layer in its trained stages (feature mode, or "
            "GroupNorm); use federation.bn_refit=0",
        )


@torch.inference_mode()
def site_bn_statistics(
    model: StagedModel,
    x: np.ndarray,
    indices: np.ndarray,
    *,
    start: int,
    device: torch.device,
    batch_size: int = 128,
) -> dict[str, np.ndarray]:
    """Per trained BatchNorm layer and channel, float64 sums over ``x[indices]`` of each
    image's spatial mean of the layer's input and of its square, plus the image count;
    the model runs in eval mode (each layer normalised by its current statistics)."""
    layers = bn_layers(model, start)
    sums = {n: [0.0, 0.0] for n in layers}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].float()  # per-image means in float32, their sums in float64
            dims = tuple(range(2, a.dim()))
            first = a.mean(dims) if dims else a
            second = (a * a).mean(dims) if dims else a * a
            sums[name][0] += first.double().sum(0).cpu().numpy()
            sums[name][1] += second.double().sum(0).cpu().numpy()

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        model.to(device)
        for s in range(0, len(indices), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[np.asarray(indices[s : s + batch_size])]))
            xb = (to_float(xb) if xb.dtype == torch.uint8 else xb.float()).to(device)
            with autocast(device):
                model.forward_from(xb, start)
    finally:
        for h in handles:
            h.remove()
    out = {COUNT: np.array([float(len(indices))])}
    for name, (first, second) in sums.items():
        out[f"{name}.sum"] = np.asarray(first, dtype=np.float64)
        out[f"{name}.sumsq"] = np.asarray(second, dtype=np.float64)
    return out


def install_bn(model: StagedModel, total: Mapping[str, np.ndarray]) -> int:
    """Write the pooled mean and variance from summed statistics into every trained
    BatchNorm layer they name; returns how many layers were set."""
    n = float(np.asarray(total[COUNT]).ravel()[0])
    if not n > 0:
        raise ValueError("BatchNorm statistics over no image")
    modules = dict(model.named_modules())
    names = [k[: -len(".sum")] for k in total if k.endswith(".sum")]
    for name in names:
        bn = modules[name]
        mean = np.asarray(total[f"{name}.sum"]) / n
        var = np.maximum(np.asarray(total[f"{name}.sumsq"]) / n - mean * mean, 0.0)
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(mean).to(bn.running_mean))
            bn.running_var.copy_(torch.from_numpy(var).to(bn.running_var))
    return len(names)


def recalibrate_bn(
    model: StagedModel,
    x: np.ndarray,
    indices: np.ndarray,
    *,
    passes: int,
    start: int,
    device: torch.device,
) -> None:
    """The same passes over one data set (the pooled and local references: the sums
    a federation would send, never sent)."""
    for _ in range(passes):
        install_bn(model, site_bn_statistics(model, x, indices, start=start, device=device))

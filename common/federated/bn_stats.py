"""The global model's BatchNorm statistics re-estimated at the sites after the last round.

Under label skew FedAvg's BatchNorm statistics do not belong to the global model. Each
site's running statistics are an exponential average over its *local* model's last
batches, a model that drifted from the global one during the round; the server then
averages them. The global weights were never run with those statistics.

``federation.bn_refit=true`` runs one more statistics round: every site runs the final
global model over its own training images, in its own shuffled batches of
``train.batch_size``, with every trained BatchNorm layer in training mode (each batch
normalised by its own statistics, as in the site's training) and cumulative running
statistics; it sends the image count ``n_k`` and ``n_k`` times each layer's running mean
and variance. The server installs the image-weighted means. These are the
statistics FedAvg's BatchNorm would hold had every site trained with the global weights:
the normalisation the global blocks were trained under (within-site batches), not the
pooled data's. Brain, Dirichlet 0.1, the worst seed: a ridge head on the final model's
features scored 95.0 % with FedAvg's averaged statistics, 94.9 % with the pooled
statistics of each layer's input (a fixed point of exact pooled sums, measured and
rejected) and 97.1 % with these (docs/results/skew.md).

What a site reveals: per trained BatchNorm channel, the mean and variance of its
activations over its training split, and its image count; no per-image row.

Pure functions (``site_bn_statistics``, ``install_bn``), like ``head_init``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.transforms import to_float
from fedscan.common.learn.models.staged import StagedModel
from fedscan.common.learn.training import autocast

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
            "GroupNorm); use federation.bn_refit=false",
        )


@torch.inference_mode()
def site_bn_statistics(
    model: StagedModel,
    x: np.ndarray,
    indices: np.ndarray,
    *,
    start: int,
    device: torch.device,
    batch_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """The image count and, per trained BatchNorm layer, ``n`` times its running mean and
    variance after one pass of ``model`` over ``x[indices]`` in shuffled batches of
    ``batch_size``, every such layer in training mode with cumulative statistics
    (float64); ``model`` itself is left as it was."""
    work = copy.deepcopy(model).to(device)
    work.eval()
    layers = bn_layers(work, start)
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative: every batch counts the same
        m.train()
    order = np.random.default_rng(seed).permutation(np.asarray(indices))
    batches = 0
    for s in range(0, len(order), batch_size):
        b = np.sort(order[s : s + batch_size])
        if len(b) < 2:  # a batch of one has no variance
            continue
        xb = torch.from_numpy(np.ascontiguousarray(x[b]))
        xb = (to_float(xb) if xb.dtype == torch.uint8 else xb.float()).to(device)
        with autocast(device):
            work.forward_from(xb, start)
        batches += 1
    if not batches:
        raise ValueError(f"BatchNorm statistics need at least 2 images, got {len(order)}")
    n = float(len(order))
    out = {COUNT: np.array([n])}
    for name, m in layers.items():
        out[f"{name}.mean"] = n * m.running_mean.double().cpu().numpy()
        out[f"{name}.var"] = n * m.running_var.double().cpu().numpy()
    return out


def install_bn(model: StagedModel, total: Mapping[str, np.ndarray]) -> int:
    """Write the image-weighted means of the sites' statistics (summed: ``n_k`` times
    each) into every BatchNorm layer they name; returns how many layers were set."""
    n = float(np.asarray(total[COUNT]).ravel()[0])
    if not n > 0:
        raise ValueError("BatchNorm statistics over no image")
    modules = dict(model.named_modules())
    names = [k[: -len(".mean")] for k in total if k.endswith(".mean")]
    for name in names:
        bn = modules[name]
        mean = np.asarray(total[f"{name}.mean"]) / n
        var = np.maximum(np.asarray(total[f"{name}.var"]) / n, 0.0)
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(mean).to(bn.running_mean))
            bn.running_var.copy_(torch.from_numpy(var).to(bn.running_var))
    return len(names)

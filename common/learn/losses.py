"""Losses for label skew: the balanced softmax (logit adjustment by the training prior).

Under label skew a site's cross-entropy pushes the logits of the classes it does
not hold down at every step, so each round's local training un-learns them and
the average drifts (the "absent class" effect behind FedAvg's loss at Dirichlet
0.1). The balanced softmax (Ren et al., NeurIPS 2020; in federated learning the
logit calibration of FedLC, Zhang et al., ICML 2022, and the restricted softmax
of FedRS, Li & Zhan, KDD 2021) trains ``softmax(z + log pi)`` where ``pi`` is the
training split's class prior: the model's own logits ``z`` then estimate the
class-balanced posterior, and a class with ``pi = 0`` gets no gradient at all,
so a site cannot un-learn what it never saw. Prediction uses ``z`` alone; nothing
leaves the site beyond the usual update (its counts stay local).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class BalancedSoftmaxLoss(nn.Module):
    """Cross-entropy of ``logits + log(prior)``; ``prior`` from the training labels.

    Classes absent from ``train_labels`` get ``log 0 = -inf``: probability 0 and
    gradient 0, whatever their logit. Without label smoothing only (a smoothed
    target would put mass on an impossible class).
    """

    log_prior: torch.Tensor

    def __init__(self, train_labels: np.ndarray, num_classes: int) -> None:
        super().__init__()
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes)
        with np.errstate(divide="ignore"):
            log_prior = np.log(counts / max(counts.sum(), 1))
        self.register_buffer("log_prior", torch.tensor(log_prior, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), target)

"""SCAFFOLD's control variates (Karimireddy et al., ICML 2020), framework-free.

Client drift under label skew is each site's gradient pulling away from the
global one. SCAFFOLD keeps a server variate ``c`` and one variate ``c_i`` per site
and corrects every local gradient by ``c - c_i``. After ``K`` local steps of
learning rate ``lr`` from the global weights ``x`` to ``y_i`` (Option II):

    c_i+ = c_i - c + (x - y_i) / (K * lr)

the site sends ``delta_c_i = c_i+ - c_i`` beside its weights, and the server
updates ``c <- c + (|S| / N) * mean_i(delta_c_i)`` over the ``|S|`` sites that
replied of ``N`` connected. Variates cover the trainable *parameters* only
(BatchNorm statistics are not gradients). Pure functions on name -> tensor dicts;
the site trainer and the server strategy only store and move them.

The paper's analysis is for plain SGD (``train.optimizer=sgd``); with AdamW the
correction is added to the gradient before Adam's normalisation, a common heuristic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Arrays = Mapping[str, torch.Tensor]


def correction(server_c: Arrays, site_c: Arrays, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``c - c_i`` for each parameter name; a missing variate counts as zero (round 1)."""
    out = {}
    for n in names:
        c, ci = server_c.get(n), site_c.get(n)
        if c is None and ci is None:
            continue
        ref = c if c is not None else ci
        out[n] = (c if c is not None else torch.zeros_like(ref)) - (
            ci if ci is not None else torch.zeros_like(ref)
        )
    return out


def site_variate(
    server_c: Arrays,
    site_c: Arrays,
    global_w: Arrays,
    local_w: Arrays,
    names: Sequence[str],
    *,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(c_i+, delta_c_i)`` after ``steps`` local steps (Option II of the paper)."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"SCAFFOLD needs steps >= 1 and lr > 0 (got {steps}, {lr})")
    new, delta = {}, {}
    for n in names:
        x, y = global_w[n].double(), local_w[n].double()
        c = server_c[n].double() if n in server_c else torch.zeros_like(x)
        ci = site_c[n].double() if n in site_c else torch.zeros_like(x)
        new[n] = (ci - c + (x - y) / (steps * lr)).float()
        delta[n] = (new[n].double() - ci).float()
    return new, delta


def server_variate(
    server_c: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    *,
    num_sites: int,
) -> dict[str, np.ndarray]:
    """``c + (|S| / N) * mean(delta_c_i)``; ``num_sites`` is N, the connected sites."""
    if not deltas:
        return dict(server_c)
    names = set(server_c) | set().union(*(d.keys() for d in deltas))
    out = {}
    for n in sorted(names):
        parts = [np.asarray(d[n], dtype=np.float64) for d in deltas if n in d]
        c = np.asarray(server_c.get(n, np.zeros_like(parts[0])), dtype=np.float64)
        out[n] = (c + (len(deltas) / num_sites) * np.mean(parts, axis=0)).astype(np.float32)
    return out

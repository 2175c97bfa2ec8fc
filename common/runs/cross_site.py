"""Cross-site evaluation: every model of a run scored on every site's data.

A multi-hospital study reports how a model trained at one site fares at the
others (NVIDIA FLARE's cross-site validation). The matrix has one row per model
(each site's own model in the local baseline; the global model of a federated
run) and one column per site's validation split, then one per global test split.
Cells are accuracies; ``None`` where a model was not scored on that data (a
federated run with ``federation.fraction_evaluate=0`` asks no site).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedscan.common.federated.site_names import site_label
from fedscan.common.runs.plots import _save

FILE = "cross_site.png"


def matrix(
    models: Sequence[str], columns: Sequence[str], accuracy: Sequence[Sequence[float | None]]
) -> dict:
    """The ``cross_site`` entry of ``metrics.json``."""
    if len(accuracy) != len(models) or any(len(r) != len(columns) for r in accuracy):
        raise ValueError(f"{len(models)} x {len(columns)} names for a differently shaped matrix")
    return {"models": list(models), "data": list(columns), "accuracy": [list(r) for r in accuracy]}


def site_column(site: str) -> str:
    """The column of a site's validation split: ``site 0 val``, ``hospital-a val``."""
    return f"{site} val"


def federated_matrix(last_evaluate: Sequence[dict], tests: dict[str, dict]) -> dict:
    """The global model's row: each site's validation accuracy of it (the sites'
    ``evaluate`` replies of the last round), then the server's test accuracies."""
    by_site = {site_label(r): r for r in last_evaluate}
    sites = sorted(by_site, key=lambda s: (len(s), s))  # site 2 before site 10
    row = [float(by_site[s]["val_accuracy"]) for s in sites]
    row += [float(m["accuracy"]) for m in tests.values()]
    return matrix(["global model"], [*map(site_column, sites), *tests], [row])


def plot(cm: dict, path: Path, *, title: str) -> Path:
    """A heatmap with each cell's accuracy written in it."""
    acc = np.array([[np.nan if v is None else v for v in r] for r in cm["accuracy"]], float)
    fig, ax = plt.subplots(figsize=(1.1 * len(cm["data"]) + 2.5, 0.55 * len(cm["models"]) + 2.0))
    ax.imshow(acc, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cm["data"])), cm["data"], rotation=30, ha="right")
    ax.set_yticks(range(len(cm["models"])), cm["models"])
    for i, r in enumerate(acc):
        for j, v in enumerate(r):
            text = "-" if np.isnan(v) else f"{100 * v:.1f}"
            ax.text(j, i, text, ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set(xlabel="evaluated on", ylabel="model")
    return _save(fig, path, title=title)

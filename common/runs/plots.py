"""The paper's figures: accuracy/loss curves and confusion matrices (matplotlib, headless)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay


def _save(fig, path: Path, *, title: str | None = None) -> Path:
    """Title, lay out, write and close: every figure leaves the same way.

    A long title (``SYNTHETIC [brain_mri] | ...``) is wrapped to the figure's width
    and the saved box grows to hold it, so no word of it (least of all SYNTHETIC)
    is cut off at the edges of a narrow one-panel figure.
    """
    if title is not None:
        width = max(20, int(fig.get_figwidth() * 13))  # ~13 characters per inch at 10 pt
        fig.suptitle(textwrap.fill(title, width), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _accuracy_loss(
    series: dict[str, tuple[list, list, list, str]],
    path: Path,
    *,
    xlabel: str,
    title: str,
    prefix: str = "",
    markers: dict[str, tuple[float, float, float]] | None = None,
) -> Path:
    """Two panels, accuracy and loss; ``series`` maps label -> (x, accuracy, loss, style).
    ``markers`` maps a series' label to one (x, accuracy, loss) drawn apart from its line
    in its colour (a refit after the last round: no training step). Epochs and rounds
    are whole numbers, and so are the ticks."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    markers = markers or {}
    for label, (xs, acc, loss, style) in series.items():
        (line,) = ax_acc.plot(xs, acc, style, label=label)
        ax_loss.plot(xs, loss, style, label=label)
        if label in markers:
            x, a, lo = markers[label]
            kw = {"marker": "*", "s": 120, "color": line.get_color(), "zorder": 3}
            ax_acc.scatter([x], [a], label=f"{label} after the refit", **kw)
            ax_loss.scatter([x], [lo], label=f"{label} after the refit", **kw)
    ax_acc.set(xlabel=xlabel, ylabel="accuracy", title=f"{prefix}accuracy".capitalize())
    ax_loss.set(xlabel=xlabel, ylabel="loss", title=f"{prefix}loss".capitalize())
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path, title=title)


def plot_curves(history: Sequence[dict], path: Path, *, title: str) -> Path:
    """Training and validation accuracy and loss per epoch (the paper's figures)."""
    epochs = [h["epoch"] for h in history]
    series = {
        split: (
            epochs,
            [h[f"{split}_accuracy"] for h in history],
            [h[f"{split}_loss"] for h in history],
            style,
        )
        for split, style in (("train", "-o"), ("val", "-s"))
    }
    return _accuracy_loss(series, path, xlabel="epoch", title=title)


def plot_confusion(
    matrices: dict[str, Sequence[Sequence[int]]], classes: Sequence[str], path: Path, *, title: str
) -> Path:
    """One confusion-matrix panel per evaluated split, side by side."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.4), squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items(), strict=True):
        ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(classes)).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=30
        )
        ax.set_title(name)
    return _save(fig, path, title=title)


def plot_round_curves(rounds: Sequence[dict], path: Path, *, title: str) -> Path:
    """Global accuracy and loss per federated round, one line per test split. A round
    re-recorded by a refit (``before_refit``) is on the line with its figures before the
    refit, and the refitted model is a marker of its own."""
    rounds = [r for r in rounds if r["global"]]  # rounds evaluated on the server
    xs = [r["round"] for r in rounds]
    trained = [r.get("before_refit") or r["global"] for r in rounds]
    series = {
        split: (
            xs,
            [g[split]["accuracy"] for g in trained],
            [g[split]["loss"] for g in trained],
            "-o",
        )
        for split in rounds[-1]["global"]
        if all(split in g for g in trained)
    }
    refit = next((r for r in reversed(rounds) if r.get("before_refit")), None)
    markers = {}
    if refit is not None:
        markers = {
            s: (refit["round"], m["accuracy"], m["loss"])
            for s, m in refit["global"].items()
            if s in series
        }
    return _accuracy_loss(
        series, path, xlabel="round", title=title, prefix="global ", markers=markers
    )


def plot_site_histogram(
    counts: np.ndarray, classes: Sequence[str], path: Path, *, title: str, sites: Sequence[str]
) -> Path:
    """Stacked bars: each site's training samples per class (the partition report)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(sites) + 2), 3.6))
    bottom = np.zeros(len(sites))
    for k, cls in enumerate(classes):
        ax.bar(range(len(sites)), counts[:, k], bottom=bottom, label=cls)
        bottom += counts[:, k]
    ax.set_xticks(range(len(sites)), sites, rotation=90 if len(sites) > 12 else 0, fontsize=8)
    ax.set_xlabel("site")
    ax.set_ylabel("training samples")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(float(bottom.max()), 1.0) * 1.05)  # the tallest bar's top in view
    # beside the bars: inside the axes it covered the tallest one
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class")
    return _save(fig, path)

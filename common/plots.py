"""The paper's figures: accuracy/loss curves and confusion matrices (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay


def plot_curves(history: Sequence[dict], path: Path, *, title: str) -> Path:
    """Training and validation accuracy and loss per epoch (two panels)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("val", "-s")):
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], style, label=split)
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_round_curves(rounds: Sequence[dict], path: Path, *, title: str) -> Path:
    """Global accuracy and loss per federated round, one line per test split."""
    rounds = [r for r in rounds if r["global"]]  # rounds evaluated on the server
    xs = [r["round"] for r in rounds]
    splits = list(rounds[-1]["global"])
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for split in splits:
        ax_acc.plot(xs, [r["global"][split]["accuracy"] for r in rounds], "-o", label=split)
        ax_loss.plot(xs, [r["global"][split]["loss"] for r in rounds], "-o", label=split)
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Global accuracy")
    ax_loss.set(xlabel="round", ylabel="loss", title="Global loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

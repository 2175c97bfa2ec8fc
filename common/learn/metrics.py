"""Classification metrics from scikit-learn, in the shape the paper reports them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, loss: float | None = None
) -> dict:
    """Accuracy, balanced accuracy, macro and per-class P/R/F1, confusion matrix, OvR ROC-AUC.

    ``probs`` is [N, C]; predictions are its argmax. ROC-AUC is ``None`` when a
    class is absent from ``y_true`` (it is undefined there, not zero).
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    auc = None
    if len(np.unique(y_true)) == len(classes) and len(classes) > 1:
        norm = probs / probs.sum(axis=1, keepdims=True)
        auc = float(roc_auc_score(y_true, norm, multi_class="ovr", labels=labels))
    out = {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # sklearn's definition (mean recall over the classes present), without its
        # warning for a site's validation split that lacks a class the model predicts
        "balanced_accuracy": float(r[s > 0].mean()) if (s > 0).any() else 0.0,
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "roc_auc_ovr": auc,
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out

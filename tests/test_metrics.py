import numpy as np
import pytest

from fedscan.common.learn.metrics import classification_metrics


def test_metrics_against_hand_computed():
    # true: 0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[pred] * 0.7 + 0.1
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls: a 2/3, b 1/2, c 1/1 -> balanced accuracy = mean
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # precisions: a 2/2, b 1/2, c 1/2
    assert m["per_class"]["c"]["precision"] == pytest.approx(1 / 2)
    f1 = [2 * p * r / (p + r) for p, r in [(1, 2 / 3), (1 / 2, 1 / 2), (1 / 2, 1)]]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["a"]["support"] == 3


def test_auc_is_none_when_a_class_is_absent():
    y = np.array([0, 0, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    assert classification_metrics(y, probs, ["a", "b", "c"])["roc_auc_ovr"] is None
    y3 = np.array([0, 1, 2])
    assert classification_metrics(y3, np.eye(3), ["a", "b", "c"])["roc_auc_ovr"] == 1.0


def test_balanced_accuracy_equals_sklearn_without_its_warning_for_absent_classes() -> None:
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 2, 1, 1, 2])  # class 2 predicted, absent from y_true
    probs = np.eye(3)[y_pred]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(y_true, y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fedscan's own computation warns about nothing
        m = classification_metrics(y_true, probs, ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx(expected)

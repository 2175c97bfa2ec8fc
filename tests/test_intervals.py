"""Intervals of test metrics from a bootstrap over leakage groups."""

import numpy as np
import pytest

from fedscan.common.core.errors import ConfigError
from fedscan.common.learn.intervals import IntervalSettings, _confusions, _scores, group_bootstrap
from fedscan.common.learn.metrics import classification_metrics
from fedscan.common.learn.scans import per_scan, scan_metrics

CLASSES = ["a", "b", "c"]


def settings(resamples=2000, confidence=0.95, seed=0):
    return IntervalSettings(resamples=resamples, confidence=confidence, seed=seed)


def test_one_resample_scores_like_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    probs = np.eye(3)[pred]
    ref = classification_metrics(y, probs, CLASSES)
    acc, bal, f1, *recall = _scores(_confusions(y, pred, np.ones((1, 200)), 3))[0]
    assert acc == pytest.approx(ref["accuracy"])
    assert bal == pytest.approx(ref["balanced_accuracy"])
    assert f1 == pytest.approx(ref["macro_f1"])
    assert recall == pytest.approx([ref["per_class"][c]["recall"] for c in CLASSES])


def test_hand_computed_two_group_case():
    """Two groups of 10: one all right, one all wrong. Drawing 2 groups with
    replacement gives accuracy 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    95 % interval is [0, 1] and the central 40 % (30th-70th percentile) is [0.5, 0.5].
    Resampling single images would give accuracies all over [0, 1]."""
    y = np.zeros(20, dtype=int)
    pred = np.r_[np.zeros(10, dtype=int), np.ones(10, dtype=int)]
    groups = np.r_[np.full(10, 7), np.full(10, 3)]
    wide = group_bootstrap(y, pred, groups, CLASSES, settings())
    assert wide["accuracy"] == [0.0, 1.0] and wide["groups"] == 2
    narrow = group_bootstrap(y, pred, groups, CLASSES, settings(confidence=0.4))
    assert narrow["accuracy"] == [0.5, 0.5]
    assert narrow["recall"]["a"] == [0.5, 0.5]
    assert narrow["recall"]["b"] is None  # no sample of class b: no interval


def test_resampling_respects_groups_and_is_seeded():
    """The same data as one group per image gives a narrower interval than as a few
    large groups (fewer independent cases); the same seed gives the same interval."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.8, y, (y + 1) % 3)
    singles = group_bootstrap(y, pred, np.arange(300), CLASSES, settings())
    clumped = group_bootstrap(y, pred, np.arange(300) // 30, CLASSES, settings())
    width = lambda r: r["accuracy"][1] - r["accuracy"][0]  # noqa: E731
    assert width(clumped) > width(singles)
    lo, hi = singles["accuracy"]
    assert lo < (pred == y).mean() < hi
    assert group_bootstrap(y, pred, np.arange(300), CLASSES, settings()) == singles
    assert group_bootstrap(y, pred, np.arange(300), CLASSES, settings(seed=1)) != singles


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"bootstrap\.resamples.*>= 100"):
        settings(resamples=50)
    with pytest.raises(ConfigError, match=r"bootstrap\.confidence"):
        settings(confidence=1.5)
    with pytest.raises(ValueError, match="groups"):
        group_bootstrap(np.zeros(3, int), np.zeros(3, int), np.zeros(2), CLASSES, settings())


def test_a_scan_is_predicted_from_the_mean_of_its_slices():
    """Scan 5 (class a): slices favour a, b, b, a, but the mean (0.6375 for a) -> right.
    Scan 9 (class c): slices favour c, b; the mean [0.15, 0.475, 0.375] -> b, wrong."""
    probs = np.array(
        [
            [0.9, 0.1, 0.0],
            [0.4, 0.6, 0.0],
            [0.45, 0.55, 0.0],
            [0.2, 0.1, 0.7],
            [0.1, 0.85, 0.05],
            [0.8, 0.1, 0.1],
        ]
    )
    y = np.array([0, 0, 0, 2, 2, 0])
    groups = np.array([5, 5, 5, 9, 9, 5])
    labels, mean = per_scan(y, probs, groups)
    assert labels.tolist() == [0, 2]
    np.testing.assert_allclose(mean, [[0.6375, 0.3375, 0.025], [0.15, 0.475, 0.375]])
    m = scan_metrics(y, probs, groups, CLASSES, settings(resamples=200))
    assert m["n"] == 2 and m["accuracy"] == 0.5 and "mean" in m["rule"]
    assert m["per_class"]["a"]["recall"] == 1.0 and m["per_class"]["c"]["recall"] == 0.0
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert m["ci"]["groups"] == 2


def test_the_report_gives_per_scan_rows(tmp_path):
    import json

    from fedscan.common.commands.report import load_run
    from tests.test_harness import _fake_run

    run = _fake_run(tmp_path, "a", seed=0, acc=0.8, method="pooled")
    metrics = json.loads((run / "metrics.json").read_text())
    scan = {**metrics["final"]["test_grouped"], "n": 4, "accuracy": 0.75}
    metrics["final"]["test_grouped"]["per_scan"] = scan
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = {r["split"]: r for r in load_run(run)}
    assert rows["test_grouped"]["accuracy"] == 0.8
    assert rows["test_grouped, per scan"]["accuracy"] == 0.75

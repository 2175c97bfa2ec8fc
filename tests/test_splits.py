"""Split integrity: no leakage group and no exact duplicate on two sides."""

from pathlib import Path

import numpy as np
import pytest

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.data.datasets import load_dataset
from fedscan.common.data.datasets.site_folder import read_site_folder
from fedscan.common.data.fingerprint import compute_fingerprints
from fedscan.common.data.grouping import exact_duplicate_groups, scan_groups
from fedscan.common.data.splits import make_splits
from tests.conftest import noise, save_gray


def assert_no_leak(splits, fp):
    parts = {"train": splits.train, "val": splits.val, **splits.tests}
    names = list(parts)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            ia, ib = parts[names[a]], parts[names[b]]
            if {names[a], names[b]} == {"test_official", "test_dedup"}:
                continue
            if "test_official" in (names[a], names[b]):
                continue  # the official split is leaky by construction; reported, not used
            assert not set(ia) & set(ib), (names[a], names[b])
            assert not set(splits.groups[ia]) & set(splits.groups[ib]), (names[a], names[b])
            assert not set(fp.pixel_hash[ia]) & set(fp.pixel_hash[ib]), (names[a], names[b])


def _site_with_duplicates(root: Path, per_class: int = 20) -> Path:
    for k, cls in enumerate(["normal", "benign", "malignant"]):
        for i in range(per_class):
            save_gray(root / cls / f"{i:03d}.png", noise(100 * k + i))
        # planted exact duplicates of file 0 inside the class
        save_gray(root / cls / "dup_a.png", noise(100 * k))
        save_gray(root / cls / "dup_b.png", noise(100 * k))
    return root


def test_grouped_split_keeps_duplicates_together(tmp_path: Path):
    c = read_site_folder(_site_with_duplicates(tmp_path / "site"), "lung_ct")
    fp = compute_fingerprints(c, tmp_path / "cache")
    s = make_splits(c, fp, policy="grouped", val_fraction=0.15, test_fraction=0.2, seed=0)
    assert sorted(np.concatenate([s.train, s.val, s.tests["test_grouped"]])) == list(range(len(c)))
    assert_no_leak(s, fp)
    # deterministic for a seed, different for another
    s2 = make_splits(c, fp, policy="grouped", val_fraction=0.15, test_fraction=0.2, seed=0)
    assert np.array_equal(s.tests["test_grouped"], s2.tests["test_grouped"])


def test_official_split_dedups_test(tmp_path: Path):
    root = tmp_path / "brain"
    for k, cls in enumerate(["glioma", "meningioma", "notumor", "pituitary"]):
        for i in range(12):
            save_gray(root / "Training" / cls / f"tr{i}.png", noise(1000 + 50 * k + i))
        for i in range(4):
            save_gray(root / "Testing" / cls / f"te{i}.png", noise(5000 + 50 * k + i))
        save_gray(root / "Testing" / cls / "leak.png", noise(1000 + 50 * k))  # = tr0
        save_gray(root / "Training" / cls / "tr0_copy.png", noise(1000 + 50 * k))  # dup in train
    c = load_dataset({"name": "brain_mri", "path": str(root)}, data_root=None, cache_root=tmp_path)
    fp = compute_fingerprints(c, tmp_path / "cache")
    s = make_splits(c, fp, policy="official", val_fraction=0.2, seed=0)
    assert len(s.tests["test_official"]) == 20
    assert len(s.tests["test_dedup"]) == 16
    assert not any(c.paths[i].name == "leak.png" for i in s.tests["test_dedup"])
    assert len(s.excluded["train_duplicate_collapsed"]) == 4
    assert len(s.train) + len(s.val) == 48
    assert_no_leak(s, fp)


def test_too_few_groups_is_a_clear_error(tmp_path: Path):
    c = read_site_folder(_site_with_duplicates(tmp_path / "s", per_class=1), "lung_ct")
    fp = compute_fingerprints(c, tmp_path / "cache")
    with pytest.raises(DataError, match="groups"):
        make_splits(c, fp, policy="grouped", test_fraction=0.2)


def test_bad_fraction_names_key(tmp_path: Path):
    c = read_site_folder(_site_with_duplicates(tmp_path / "s"), "lung_ct")
    fp = compute_fingerprints(c, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"split\.val_fraction"):
        make_splits(c, fp, policy="grouped", val_fraction=0.9)


def test_scan_groups_follow_slice_similarity(tmp_path: Path):
    """Three 'scans' of smoothly varying slices, numbered consecutively."""
    rng = np.random.default_rng(0)
    n = 0
    for _scan in range(3):
        base = rng.integers(0, 256, (32, 32)).astype(float)
        for s in range(6):
            n += 1
            save_gray(
                tmp_path / "Normal cases" / f"Normal case ({n}).png", np.clip(base + s, 0, 255)
            )
    save_gray(tmp_path / "Bengin cases" / "Bengin case (1).png", noise(9))
    save_gray(tmp_path / "Malignant cases" / "Malignant case (1).png", noise(8))
    c = load_dataset(
        {"name": "lung_ct", "path": str(tmp_path)}, data_root=None, cache_root=tmp_path
    )
    fp = compute_fingerprints(c, tmp_path / "cache")
    g = scan_groups(c, fp, threshold=15, min_size=3)
    normal = np.flatnonzero(c.labels == 0)
    normal = normal[np.argsort(c.numbers[normal])]
    assert [len(set(g[normal[i * 6 : (i + 1) * 6]])) for i in range(3)] == [1, 1, 1]
    assert len(set(g[normal])) == 3


@pytest.mark.realdata
def test_real_lung_scan_grouped_split_has_no_leak(real_data: Path, tmp_path: Path):
    c = load_dataset({"name": "lung_ct"}, data_root=real_data, cache_root=tmp_path)
    fp = compute_fingerprints(c, tmp_path)
    assert len(exact_duplicate_groups(fp)) > 0  # scan-group rule, step 4 (docs/explanation/data.md)
    s = make_splits(c, fp, policy="scan_groups", val_fraction=0.15, test_fraction=0.2, seed=0)
    assert_no_leak(s, fp)
    test = s.tests["test_scan_grouped"]
    counts = c.class_counts(test)
    assert all(v > 0 for v in counts.values()), counts
    assert 0.12 < len(test) / len(c) < 0.3


@pytest.mark.realdata
def test_real_brain_subset_dedup(brain_subset: Path, tmp_path: Path):
    c = load_dataset(
        {"name": "brain_mri", "path": str(brain_subset)}, data_root=None, cache_root=tmp_path
    )
    fp = compute_fingerprints(c, tmp_path)
    s = make_splits(c, fp, policy="official", val_fraction=0.2, seed=0)
    assert len(s.tests["test_dedup"]) <= len(s.tests["test_official"])
    assert_no_leak(s, fp)


def test_rotating_the_fold_covers_every_image_once(tmp_path: Path):
    c = read_site_folder(_site_with_duplicates(tmp_path / "s"), "lung_ct")
    fp = compute_fingerprints(c, tmp_path / "cache")
    tests = [
        make_splits(c, fp, policy="grouped", test_fraction=0.2, fold=k).tests["test_grouped"]
        for k in range(5)
    ]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(c)))
    with pytest.raises(ConfigError, match=r"split\.fold"):
        make_splits(c, fp, policy="grouped", test_fraction=0.2, fold=5)


def test_a_small_site_holds_out_whole_groups_when_folds_cannot_be_made():
    from fedscan.common.data.splits import group_holdout

    groups = np.repeat(np.arange(4), 10)  # four scans of ten slices
    labels = np.repeat([0, 1, 0, 1], 10)
    idx = np.arange(40)
    with pytest.raises(DataError, match="only 4 groups"):
        group_holdout(idx, labels, groups, 0.15, 0, "site val")
    rest, held = group_holdout(idx, labels, groups, 0.15, 0, "site val", few_groups_ok=True)
    assert len(np.unique(groups[held])) == 1 and len(held) == 10  # one whole scan
    assert not set(groups[rest]) & set(groups[held])
    assert sorted(np.concatenate([rest, held]).tolist()) == idx.tolist()
    with pytest.raises(DataError, match="only 1 groups"):
        group_holdout(idx[:10], labels, groups, 0.15, 0, "site val", few_groups_ok=True)


def test_a_class_smaller_than_the_folds_is_held_out_without_a_library_warning() -> None:
    """6 images of a class and 7 folds (a 15 % holdout): scikit-learn warns "The least
    populated class in y has only 6 members"; the split is still by whole groups, so
    fedscan keeps that off the user's log, and leaves the global warning filters alone."""
    import warnings

    from fedscan.common.data.splits import group_holdout

    labels = np.array([0] * 30 + [1] * 6)
    idx, groups = np.arange(36), np.arange(36)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rest, held = group_holdout(idx, labels, groups, 0.15, 0, "site val")
    assert [str(w.message) for w in seen] == []
    assert warnings.filters == before
    assert sorted([*rest, *held]) == list(idx) and 0 < len(held) < 10

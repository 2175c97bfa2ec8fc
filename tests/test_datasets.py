from pathlib import Path

import numpy as np
import pytest

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.data.classes import BRAIN_CLASSES, LUNG_CLASSES, canonical_class
from fedscan.common.data.datasets import load_dataset
from fedscan.common.data.datasets.site_folder import read_site_folder
from tests.conftest import noise, save_gray


@pytest.mark.parametrize(
    ("domain", "name", "expected"),
    [
        ("lung_ct", "Bengin cases", "benign"),
        ("lung_ct", "Benign", "benign"),
        ("lung_ct", "Malignant cases", "malignant"),
        ("brain_mri", "no_tumor", "notumor"),
        ("brain_mri", "Glioma Tumor", "glioma"),
        ("brain_mri", "pituitary_tumor", "pituitary"),
        ("brain_mri", "benign", None),
    ],
)
def test_class_aliases(domain, name, expected):
    assert canonical_class(domain, name) == expected


def test_site_folder_reads_classes_and_ignores_non_images(tmp_path: Path):
    for i, cls in enumerate(["Normal", "Bengin", "malignant"]):
        for j in range(3):
            save_gray(tmp_path / cls / f"{j}.png", noise(10 * i + j))
    (tmp_path / "Normal" / "notes.txt").write_text("not an image")
    c = read_site_folder(tmp_path, "lung_ct")
    assert c.classes == LUNG_CLASSES
    assert c.class_counts() == {"normal": 3, "benign": 3, "malignant": 3}
    assert [p.name for p in c.skipped] == ["notes.txt"]


def test_unknown_class_folder_is_named(tmp_path: Path):
    save_gray(tmp_path / "glioma" / "a.png", noise(0))
    save_gray(tmp_path / "astrocytoma" / "b.png", noise(1))
    with pytest.raises(DataError, match="astrocytoma"):
        read_site_folder(tmp_path, "brain_mri")


def test_missing_folder_is_named(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset({"name": "lung_ct"}, data_root=tmp_path, cache_root=tmp_path)


def test_dataset_without_root_names_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match="data_root"):
        load_dataset({"name": "brain_mri"}, data_root=None, cache_root=tmp_path)


def test_unknown_dataset_names_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"dataset\.name.*brain_mri"):
        load_dataset({"name": "chest_xray"}, data_root=None, cache_root=tmp_path)


@pytest.mark.realdata
def test_real_brain_reader(real_data: Path, tmp_path: Path):
    c = load_dataset({"name": "brain_mri"}, data_root=real_data, cache_root=tmp_path)
    assert c.classes == BRAIN_CLASSES
    assert len(c) == 7023
    split = np.array(c.official_split)
    assert (split == "train").sum() == 5712 and (split == "test").sum() == 1311
    assert c.class_counts(np.flatnonzero(split == "test")) == {
        "glioma": 300,
        "meningioma": 306,
        "notumor": 405,
        "pituitary": 300,
    }
    # labels follow the folder, not the file name
    assert all(c.paths[i].parent.name == c.classes[c.labels[i]] for i in range(0, len(c), 97))


@pytest.mark.realdata
def test_real_lung_reader_accepts_upstream_spelling(real_data: Path, tmp_path: Path):
    c = load_dataset({"name": "lung_ct"}, data_root=real_data, cache_root=tmp_path)
    assert c.class_counts() == {"normal": 416, "benign": 120, "malignant": 561}
    benign = np.flatnonzero(c.labels == LUNG_CLASSES.index("benign"))
    assert all(c.paths[i].parent.name == "Bengin cases" for i in benign)
    assert sorted(c.numbers[benign].tolist()) == list(range(1, 121))


def test_synthetic_default_is_labelled(tmp_path: Path):
    c = load_dataset(
        {"name": "synthetic", "per_class": 12, "size": 32}, data_root=None, cache_root=tmp_path
    )
    assert c.synthetic and c.name.startswith("synthetic")
    assert c.class_counts() == dict.fromkeys(BRAIN_CLASSES, 12)

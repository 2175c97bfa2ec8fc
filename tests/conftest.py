"""Shared fixtures: tiny generated image folders and the real-data subset.

Real-data tests read ``FEDSCAN_DATA``. Outside CI they are skipped when it is
unset; in CI (``CI=true``) a missing dataset is a loud failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A tiny federation on the embedded synthetic default: paper CNN, 32 px, two sites, no
# experiment tracking (a test of tracking adds tracking=mlflow after these: the last wins).
SIM_BASE = [
    "tracking=none",
    "model=paper_cnn",
    "dataset.image_size=32",
    "dataset.size=32",
    "dataset.per_class=24",
    "train.batch_size=16",
    "federation.num_sites=2",
    "federation.min_nodes=2",
]


@pytest.fixture
def _no_real_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs on the embedded synthetic default even where FEDSCAN_DATA is set."""
    monkeypatch.delenv("FEDSCAN_DATA", raising=False)


def split_metrics(acc: float, classes: tuple[str, ...] = ("glioma", "notumor")) -> dict:
    """One test split's metrics as a run records them, every score equal to ``acc``."""
    per = {"recall": acc, "precision": acc, "f1": acc, "support": 5}
    return {
        "n": 5 * len(classes),
        "accuracy": acc,
        **{k: acc for k in ("balanced_accuracy", "macro_precision", "macro_recall", "macro_f1")},
        "loss": 1 - acc,
        "per_class": {c: per for c in classes},
        "confusion_matrix": np.diag([5] * len(classes)).tolist(),
    }


def tree_train_settings(**changes):
    """``TrainSettings`` as the config tree's defaults give them, with ``changes``."""
    import dataclasses

    from fedscan.common.core.config import load_config
    from fedscan.common.learn.settings import train_settings

    return dataclasses.replace(train_settings(load_config(["dataset=synthetic"])), **changes)


def tree_dp_settings(**changes):
    """``DPSGDSettings`` as ``privacy=dp_sgd`` in the config tree gives them, with ``changes``."""
    import dataclasses

    from fedscan.common.federated.privacy import dp_settings

    return dataclasses.replace(dp_settings(tree_privacy("dp_sgd")), **changes)


def tree_privacy(name: str, **changes) -> dict:
    """The ``privacy`` group ``name`` as the config tree gives it, with ``changes``."""
    from omegaconf import OmegaConf

    from fedscan.common.core.config import load_config

    section = OmegaConf.to_container(load_config(["dataset=synthetic", f"privacy={name}"]).privacy)
    return {**section, **changes}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets a private cache so tests never see each other's state."""
    monkeypatch.setenv("FEDSCAN_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def real_data() -> Path:
    value = os.environ.get("FEDSCAN_DATA")
    root = Path(value) if value else None
    if (
        root is None
        or not (root / "brain-tumor-mri").is_dir()
        or not (root / "iq-oth-nccd").is_dir()
    ):
        msg = f"FEDSCAN_DATA={value!r} does not hold brain-tumor-mri/ and iq-oth-nccd/"
        if os.environ.get("CI"):
            pytest.fail(f"real data missing in CI: {msg}")
        pytest.skip(msg)
    return root


def save_gray(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def noise(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


@pytest.fixture
def brain_subset(real_data: Path, tmp_path: Path) -> Path:
    """A small copy of the real brain layout: 6 files per class and split, plus the
    test files the upstream moved from Training (``Te-meTr_*``), so duplicates exist."""
    src, dst = real_data / "brain-tumor-mri", tmp_path / "brain-tumor-mri"
    for split in ("Training", "Testing"):
        for cls_dir in sorted((src / split).iterdir()):
            files = sorted(cls_dir.iterdir())[:6]
            if split == "Testing":
                files += sorted(cls_dir.glob("Te-*Tr_*"))[:3]
            for f in files:
                (dst / split / cls_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst / split / cls_dir.name / f.name)
    return dst


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small centralised run on the embedded synthetic default (EfficientNet-Lite0, 64 px)."""
    from fedscan.common.core.config import load_config
    from fedscan.simulations.centralised import run_centralised

    tmp = tmp_path_factory.mktemp("trained")
    cfg = load_config(
        [
            "dataset=synthetic",
            "train.epochs=2",
            f"runs_dir={tmp}",
            "run_name=syn",
            f"cache_dir={tmp / 'cache'}",
        ]
    )
    return run_centralised(cfg)


@pytest.fixture(scope="session")
def packages(trained_run: Path) -> dict[str, Path]:
    """The trained run exported in both formats: ``{"onnx": dir, "torchscript": dir}``."""
    from fedscan.deploy.export import export_run

    return {fmt: export_run(trained_run, fmt=fmt) for fmt in ("onnx", "torchscript")}

"""Every documented benchmark command runs: smoke runs with the smallest settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BRAIN = ("glioma", "meningioma", "notumor", "pituitary")

# Each test runs a benchmark or study driver end to end (minutes on 2 cores): .ci/run's slow
# stage runs them; the default suite stays fast.
pytestmark = pytest.mark.slow


def _brain_like(root: Path, per_class: int = 12) -> Path:
    """A tiny ``brain-tumor-mri/Training|Testing/<class>/*.jpg`` tree of distinct images."""
    rng = np.random.default_rng(0)
    for split in ("Training", "Testing"):
        for k, cls in enumerate(BRAIN):
            d = root / "brain-tumor-mri" / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (64, 64)).astype(np.uint8)
                img[8 * k : 8 * k + 16, :] += 150  # a class-dependent band
                Image.fromarray(img).save(d / f"{split[:2]}{i}.jpg", quality=95)
    return root


def _run(args: list[str], *, drop_data: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not (drop_data and k == "FEDSCAN_DATA")}
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def test_plain_baseline_runs(tmp_path: Path) -> None:
    data = _brain_like(tmp_path) / "brain-tumor-mri"
    res = tmp_path / "plain.json"
    _run(
        [
            "benchmarks/plain_baseline.py",
            f"--data={data}",
            "--epochs=1",
            "--size=32",
            f"--out={res}",
        ]
    )
    doc = json.loads(res.read_text())
    assert len(doc["predictions"]) == 4 * 12 and 0 <= doc["accuracy"] <= 1


def test_default_vs_plain_runs_side_by_side(tmp_path: Path) -> None:
    data = _brain_like(tmp_path / "data")
    res = tmp_path / "vs.json"
    small = ["dataset.image_size=32", "train.epochs=1", "model.finetune_blocks=1"]
    out = _run(
        [
            "benchmarks/default_vs_plain.py",
            f"--data={data}",
            "--plain-epochs=1",
            "--seeds",
            "0",
            "1",
            f"--json={res}",
            *small,
        ]
    )
    doc = json.loads(res.read_text())
    pairs = doc["by_seed"].values()
    assert list(doc["by_seed"]) == ["0", "1"]
    for pair in pairs:
        assert set(pair["plain"]) == {"test_official", "test_dedup", "seconds"}
    plain_s = sum(p["plain"]["seconds"] for p in pairs)
    assert doc["ratio"] == pytest.approx(sum(p["fedscan"]["seconds"] for p in pairs) / plain_s)
    mean = sum(p["fedscan"]["test_dedup"] for p in pairs) / 2
    assert "| mean | fedscan train (defaults) | " in out.stdout
    assert f"| {mean:.2f} |" in out.stdout.split("| mean | fedscan")[1].splitlines()[0]
    assert "wall-time ratio fedscan / plain" in out.stdout


SMALL = ["dataset.image_size=32", "dataset.size=32", "dataset.per_class=24"]


def _synthetic(args: list[str]) -> subprocess.CompletedProcess:
    """A benchmark or driver on the embedded default (FEDSCAN_DATA unset)."""
    return _run(args, drop_data=True)


def test_input_throughput_runs() -> None:
    out = _synthetic(
        ["benchmarks/input_throughput.py", "--images=40", "--size=32", "--batch-size=8"]
    )
    assert "x" in out.stdout  # the speed-up line


def test_inference_latency_runs() -> None:
    _synthetic(["benchmarks/inference_latency.py", "--size=32", "--repeats=2", "--batch=2"])


def test_federated_overhead_runs() -> None:
    _synthetic(
        [
            "benchmarks/federated_overhead.py",
            "--dataset=synthetic",
            "--sites=2",
            "--rounds=2",
            *SMALL,
        ]
    )


def test_dp_accuracy_runs(tmp_path: Path) -> None:
    note = tmp_path / "stopped.md"
    note.write_text("## Fine-tune mode\n\nNot reached: stopped at round 3.\n")
    out = _synthetic(
        [
            "benchmarks/dp_accuracy.py",
            "--dataset=synthetic",
            "--sites=2",
            "--rounds=1",
            "--epsilons=8",  # the = form: a bare list option would swallow the overrides
            "--modes=features",
            f"--out={tmp_path / 'out'}",
            f"--page={tmp_path / 'dp.md'}",
            f"--append={note}",
            *SMALL,
        ]
    )
    assert "| iid | features | 8 |" in out.stdout
    page = (tmp_path / "dp.md").read_text()
    assert "| iid | features | 8 |" in page and "`privacy.batchnorm=group`" in page
    assert "Not reached: stopped at round 3." in page  # the hand-written section, kept


def test_secure_aggregation_benchmark_runs() -> None:
    out = _synthetic(
        [
            "benchmarks/secure_aggregation.py",
            "--dataset=synthetic",
            "--sites=3",
            "--rounds=2",
            "--modes=features",
            *SMALL,
        ]
    )
    assert "| features | off |" in out.stdout
    for masks in ("flower", "shake256"):  # both generators, side by side
        assert f"| features | secaggplus | {masks} | 1 |" in out.stdout
    assert "features: SecAgg+ s per round, shake256" in out.stdout


def test_site_scale_runs(tmp_path: Path) -> None:
    _synthetic(["benchmarks/site_scale.py", "--sites", "2", "3", "--rounds=1", f"--out={tmp_path}"])


def test_the_study_runs_and_writes_its_page(tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "results" / "study.md"
    _synthetic(
        [
            "-m",
            "fedscan.simulations.study",
            "--datasets",
            "synthetic",
            "--seeds",
            "0",
            "--alphas",
            "0.1",
            "--mus",
            "1",
            "--sites=2",
            "--rounds=1",
            "--local-epochs=1",
            f"--out={tmp_path / 'runs'}",
            f"--docs={docs}",
            *SMALL,
        ]
    )
    page = docs.read_text()
    for row in (
        "| pooled |",
        "| pooled+fed3r |",
        "| fed3r one-shot |",
        "| fed3r+fedavg |",
        "| scaffold |",
        "| fedncm+fedavg |",
        "| local |",
    ):
        assert row in page, row
    # the figures beside the page, linked relative to it
    (curves,) = sorted(docs.parent.glob("curves_*.png"))
    assert f"![{curves.stem}]({curves.name})" in page


def test_the_horizon_driver_runs(tmp_path: Path) -> None:
    docs = tmp_path / "docs" / "results" / "horizon.md"
    _synthetic(
        [
            "-m",
            "fedscan.simulations.horizon",
            "--dataset=synthetic",
            "--sites=2",
            "--checkpoints",
            "1",
            "2",
            "--every=1",
            f"--out={tmp_path / 'runs'}",
            f"--docs={docs}",
            *SMALL,
        ]
    )
    assert docs.exists()

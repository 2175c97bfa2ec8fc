"""Exported model packages: parity across runtimes, self-description, Grad-CAM, predict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fedscan.common.core.errors import DataError
from fedscan.common.data.transforms import to_float
from fedscan.common.runs.record import read_run
from fedscan.deploy.explain import gradcam, overlay
from fedscan.deploy.export import load_run_model
from fedscan.deploy.package import SPEC_FILE, ModelPackage, model_input
from fedscan.deploy.predict import predict_files
from fedscan.simulations.cli import main as cli


def scans(n: int = 6, size: int = 80, seed: int = 0) -> np.ndarray:
    """Uint8 test images of another size than the model's, so the resize is exercised."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8)


def test_onnx_torchscript_and_the_trained_model_agree(packages: dict[str, Path]) -> None:
    onnx, ts = ModelPackage(packages["onnx"]), ModelPackage(packages["torchscript"])
    batch = np.stack([onnx.prepare(img) for img in scans()])
    model, _ = load_run_model(packages["onnx"].parent)
    with torch.no_grad():
        reference = torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()
    np.testing.assert_allclose(onnx.probabilities(batch), reference, atol=1e-4)
    np.testing.assert_allclose(ts.probabilities(batch), reference, atol=1e-4)
    # the ONNX package also runs on torch (its TorchScript halves), with the same answer
    as_torch = ModelPackage(packages["onnx"], runtime="torchscript")
    np.testing.assert_allclose(as_torch.probabilities(batch), reference, atol=1e-4)


def test_package_describes_itself(packages: dict[str, Path]) -> None:
    spec = json.loads((packages["onnx"] / SPEC_FILE).read_text())
    assert spec["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert spec["preprocessing"]["resize"]["size"] == 64
    assert spec["preprocessing"]["dicom"]["ct_window"]["name"] == "brain"
    prov = spec["provenance"]
    assert prov["kind"] == "centralised" and prov["synthetic"] is True
    assert prov["dataset"] == "synthetic" and prov["split_policy"] == "grouped"
    test = prov["test_metrics"]["test_grouped"]
    assert 0.0 <= test["accuracy"] <= 1.0 and set(test["recall"]) == set(spec["classes"])
    assert set(spec["files"]) == {"onnx", "trunk", "head"}


def test_package_loads_without_training_code(packages: dict[str, Path]) -> None:
    """Block the model registry, training loop, timm and Flower; the package still predicts."""
    code = f"""
import sys
for mod in ("fedscan.common.learn.models", "fedscan.common.learn.training",
            "fedscan.common.data.pipeline", "timm", "flwr"):
    sys.modules[mod] = None  # any import of these now fails
import numpy as np
from fedscan.deploy.package import ModelPackage
for runtime in ("onnx", "torchscript"):
    p = ModelPackage({str(packages["onnx"])!r}, runtime=runtime)
    print(p.predict(np.zeros((1, 1, 64, 64), np.float32))[0].label)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    labels = out.stdout.split()
    assert len(labels) == 2 and labels[0] == labels[1]


def test_altered_or_missing_package_is_a_clear_error(packages: dict[str, Path], tmp_path: Path):
    with pytest.raises(DataError, match=r"no fedscan-model\.json"):
        ModelPackage(tmp_path)

    copy = Path(shutil.copytree(packages["torchscript"], tmp_path / "pkg"))
    with (copy / "head.pt").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(DataError, match=r"head.pt: checksum mismatch"):
        ModelPackage(copy)
    with pytest.raises(DataError, match="no ONNX model"):
        ModelPackage(packages["torchscript"], runtime="onnx", verify=False)


class _Halves:
    """A stand-in package: the feature map is the image, class 1's logit its mean."""

    def __init__(self, frozen: bool) -> None:
        self.frozen = frozen

    def torch_halves(self) -> tuple[nn.Module, nn.Module]:
        trunk = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(trunk.weight)
        trunk.weight.requires_grad_(not self.frozen)  # exported `features` models are frozen

        class Head(nn.Module):
            def forward(self, f: torch.Tensor) -> torch.Tensor:
                evidence = f.mean(dim=(1, 2, 3))
                return torch.stack([-evidence, evidence], dim=1)

        return trunk, Head()


@pytest.mark.parametrize("frozen", [False, True])
def test_gradcam_is_hot_where_the_class_evidence_is(frozen: bool) -> None:
    image = np.full((1, 16, 16), 0.1, np.float32)
    image[:, :8, :8] = 1.0  # the evidence for class 1 sits top left
    heat = gradcam(_Halves(frozen), image, class_index=1)  # type: ignore[arg-type]
    assert heat.shape == (16, 16) and heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat[:8, :8].mean() > 0.9 and heat[8:, 8:].mean() < 0.1
    rgb = np.asarray(overlay(image, heat))
    assert rgb.shape == (16, 16, 3)
    assert rgb[2, 2, 0] > rgb[2, 2, 2]  # hot = red
    assert rgb[12, 12, 2] > rgb[12, 12, 0]  # cold = blue


def test_predict_cli_table_json_explain_and_bad_file(
    packages: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for i, img in enumerate(scans(2)):
        files.append(tmp_path / f"scan{i}.png")
        Image.fromarray(img).save(files[-1])
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    cams = tmp_path / "cams"
    rc = cli(["predict", str(packages["onnx"]), *map(str, files), str(bad), "--explain", str(cams)])
    out = capsys.readouterr().out
    assert rc == 1  # one file failed, the others were classified
    assert "notes.jpg  ERROR: not an image PIL can identify" in out
    assert sorted(p.name for p in cams.iterdir()) == [
        "0000-scan0-gradcam.png",
        "0001-scan1-gradcam.png",
    ]
    cam = np.asarray(Image.open(cams / "0000-scan0-gradcam.png").convert("RGB")).astype(int)
    assert cam.shape == (64 + 40, 240, 3)  # the image, then a band: caption and colour scale
    band = cam[64:]
    assert (band.sum(axis=2) < 200).any()  # caption text
    bar = cam[64 + 22, 30:34], cam[64 + 22, -34:-30]  # the scale runs from blue to red
    assert (bar[0][:, 2] > bar[0][:, 0]).all() and (bar[1][:, 0] > bar[1][:, 2]).all()

    assert cli(["predict", str(packages["torchscript"]), str(files[0]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["label"] in result["probabilities"]
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    ref = ModelPackage(packages["onnx"]).predict(
        ModelPackage(packages["onnx"]).load_file(files[0])[None]
    )
    assert result["label"] == ref[0].label


def test_export_of_a_folder_that_is_no_run_names_it(tmp_path: Path, capsys) -> None:
    assert cli(["export", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a fedscan run folder" in capsys.readouterr().err


def package_scores(run_dir: Path, package: ModelPackage) -> dict[str, dict]:
    """Every test split of ``run_dir`` scored by ``package`` from the image files on disk,
    decoded by the package as a user's files are: the confusion matrix of ``fedscan
    predict``'s labels, and the accuracy and mean cross-entropy of its probabilities."""
    from fedscan.common.data.pipeline import prepare_data

    data = prepare_data(read_run(run_dir).cfg)  # the run's own splits (warm cache)
    c, out = data.collection, {}
    for name, idx in data.splits.tests.items():
        files = [c.paths[i] for i in idx]
        labels = c.labels[idx]
        predicted = [r["label"] for r in predict_files(package, files)]
        k = len(c.classes)
        confusion = np.zeros((k, k), int)
        for y, p in zip(labels, predicted, strict=True):
            confusion[y, c.classes.index(p)] += 1
        probs = np.concatenate(
            [
                package.probabilities(np.stack([package.load_file(f) for f in files[s : s + 64]]))
                for s in range(0, len(files), 64)
            ]
        )
        loss = float(-np.log(probs[np.arange(len(labels)), labels]).mean())
        out[name] = {"confusion_matrix": confusion.tolist(), "loss": loss}
    return out


def assert_package_scores_as_recorded(
    run_dir: Path, package_dir: Path, runtimes: tuple[str, ...] = ("onnx", "torchscript")
) -> None:
    """``metrics.json``'s test figures are the package's, to the image (and its loss to
    float32 rounding: a bfloat16 or float16 prefix moves it by 1e-3 or more)."""
    recorded = read_run(run_dir).final()
    for runtime in runtimes:
        got = package_scores(run_dir, ModelPackage(package_dir, runtime=runtime))
        assert set(got) == set(recorded)
        for name, m in got.items():
            assert m["confusion_matrix"] == recorded[name]["confusion_matrix"], (runtime, name)
            assert m["loss"] == pytest.approx(recorded[name]["loss"], abs=2e-5), (runtime, name)


def test_package_scaling_is_the_training_scaling_bit_for_bit() -> None:
    """All 256 pixel values: the package's uint8 -> float is ``to_float``'s exactly."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(
        model_input(values), to_float(torch.from_numpy(values[None]))[0].numpy()
    )


@pytest.fixture
def untrained_package(tmp_path: Path) -> ModelPackage:
    """A package of an untrained paper CNN at 48 px (seconds to export)."""
    from fedscan.common.learn.models import build_model
    from fedscan.deploy.export import export_model

    model = build_model({"name": "paper_cnn", "mode": "scratch"}, 4)
    prov = {
        "classes": ["glioma", "meningioma", "notumor", "pituitary"],
        "image_size": 48,
        "domain": "brain_mri",
        "run": "untrained",
    }
    return ModelPackage(export_model(model, tmp_path / "pkg", fmt="torchscript", provenance=prov))


def test_package_pixels_are_the_image_cache_pixels(
    untrained_package: ModelPackage, tmp_path: Path
) -> None:
    """Each kind of file a site holds, at another size than the model's: the package feeds
    its network exactly what the decode-once cache stored for it in training."""
    from fedscan.common.data.cache import PreprocessSpec, build_cache
    from fedscan.common.data.datasets.site_folder import read_site_folder
    from fedscan.common.data.dicom import domain_window

    rng = np.random.default_rng(1)
    folder = tmp_path / "site"
    kinds = {
        "gray.png": Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)),
        "rgb.jpg": Image.fromarray(rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8)),
        "deep.png": Image.fromarray(rng.integers(0, 60000, (80, 80), dtype=np.uint16)),
    }
    for i, (name, img) in enumerate(kinds.items()):
        cls = folder / ("glioma" if i % 2 else "notumor")
        cls.mkdir(parents=True, exist_ok=True)
        img.save(cls / name)
    collection = read_site_folder(folder, "brain_mri")
    package = untrained_package
    spec = PreprocessSpec(size=package.size, ct_window=domain_window("brain_mri"))
    assert package.ct_window == spec.ct_window
    cache = build_cache(collection, spec, tmp_path / "cache")
    assert cache.ok.all() and len(collection) == len(kinds)
    for i, path in enumerate(collection.paths):
        trained_on = to_float(torch.from_numpy(np.array(cache.images[i : i + 1])))[0].numpy()
        np.testing.assert_array_equal(package.load_file(path), trained_on, err_msg=path.name)
        with_bytes = package.load_bytes(path.read_bytes(), path.name)  # the HTTP upload path
        np.testing.assert_array_equal(with_bytes, trained_on, err_msg=path.name)


def test_metrics_json_is_the_exported_packages_score(
    trained_run: Path, packages: dict[str, Path]
) -> None:
    """The synthetic run (frozen prefix cached in the machine's fast precision): its
    recorded test figures are what the package scores on the same files."""
    assert_package_scores_as_recorded(trained_run, packages["onnx"])


@pytest.mark.realdata
def test_export_then_evaluate_equals_metrics_json_on_real_brain(
    brain_subset: Path, tmp_path: Path
) -> None:
    """Acceptance (issue 30, item 7): a small real brain run trained on a bfloat16 prefix,
    exported, and every test image decoded from disk by the package, gives exactly the
    confusion matrices recorded in ``metrics.json``."""
    runs = tmp_path / "runs"
    assert (
        cli(
            [
                "train",
                "dataset=brain_mri",
                f"data_root={brain_subset.parent}",
                f"cache_dir={tmp_path / 'cache'}",
                f"runs_dir={runs}",
                "run_name=parity",
                "tracking=none",
                "train.epochs=1",
                "model.prefix_precision=bfloat16",  # the fast training precision on any CPU
                "dataset.split.val_fraction=0.2",  # 6 training images a class: 5 folds
            ]
        )
        == 0
    )
    (run_dir,) = runs.iterdir()
    assert cli(["export", str(run_dir)]) == 0
    assert_package_scores_as_recorded(run_dir, run_dir / "export-onnx")


@pytest.mark.usefixtures("_no_real_data")
def test_a_federated_runs_test_figures_are_its_packages(tmp_path: Path) -> None:
    """The server's test metrics (EfficientNet-Lite0, its prefix cached in bfloat16 for
    the sites' training): the package exported from the run scores the same."""
    from fedscan.deploy.export import export_run
    from fedscan.simulations.federated import run_federated

    run_dir = run_federated(
        [
            "dataset=synthetic",
            "dataset.per_class=24",
            "dataset.size=32",
            "dataset.image_size=32",
            "model.prefix_precision=bfloat16",
            "train.batch_size=12",  # no site's last batch is a single image
            "rounds=1",  # best.pt is the last evaluated round, the one final() reads
            "tracking=none",
            f"runs_dir={tmp_path}",
        ]
    )
    # TorchScript: seconds to export (ONNX's parity with it is tested above)
    package = export_run(run_dir, fmt="torchscript")
    assert_package_scores_as_recorded(run_dir, package, runtimes=("torchscript",))

"""``fedscan site check`` on a folder with every kind of bad file a hospital export has.

The check runs as an unprivileged user (like a SuperNode service account), so a
file without read permission is really unreadable even when the tests run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from fedscan.common.commands.sitecheck import site_check, survey_layout
from fedscan.simulations.cli import main
from tests.conftest import noise, save_gray
from tests.test_dicom import PATIENT, write_dicom

NOBODY = 65534


def _good(root: Path, per_class: int = 9) -> None:
    for k, cls in enumerate(["normal", "benign", "malignant"]):
        for i in range(per_class):
            save_gray(root / cls / f"{cls}-{i:02d}.png", noise(1000 * k + i, 72))


def _bad(root: Path) -> dict[str, str]:
    """Plant the bad files; returns {file name: expected reason or note fragment}."""
    d = root / "normal"
    (d / "empty.jpg").write_bytes(b"")
    jpeg = save_gray(d / "whole.jpg", noise(5, 96)).read_bytes()
    (d / "whole.jpg").unlink()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (d / "notes.jpg").write_text("patient transferred, see paper chart")
    (d / "._normal-00.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    rgba = np.dstack([noise(6, 72)] * 3 + [np.full((72, 72), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(noise(7, 72).astype(np.uint16) * 257).save(d / "deep.png")
    Image.new("L", (8200, 8200)).save(d / "huge.png")
    write_dicom(d / "nopixels.dcm", np.zeros((64, 64)), with_pixels=False)
    write_dicom(d / "ultrasound.dcm", np.zeros((64, 64)), modality="US")
    write_dicom(d / "ct.dcm", np.arange(64 * 64).reshape(64, 64) % 2000)
    write_dicom(d / "stack.dcm", np.arange(3 * 64 * 64).reshape(3, 64, 64) % 2000)
    write_dicom(
        d / "mono1.dcm", np.arange(64 * 64).reshape(64, 64) % 2000, photometric="MONOCHROME1"
    )
    ds = pydicom.dcmread(d / "ct.dcm")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS"])
    ds.save_as(d / "jpegls.dcm")
    whole = (d / "ct.dcm").read_bytes()  # cut off in a copy: in the pixels, in the header
    (d / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    (d / "stub.dcm").write_bytes(whole[:300])
    locked = save_gray(d / "locked.jpg", noise(8, 72))
    locked.chmod(0)
    (d / "loop.jpg").symlink_to("loop.jpg")
    (d / "dangling.jpg").symlink_to("gone.jpg")
    os.mkfifo(d / "pipe.jpg")
    (d / "folder.jpg").mkdir()  # a directory with an image suffix: not a file, ignored
    (d / "Thumbs.db").write_bytes(b"\x00" * 64)
    (d / "report.pdf").write_bytes(b"%PDF-1.4")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    Image.fromarray(noise(9, 72)).save(d / "bitmap.png", format="BMP")
    colour = np.random.default_rng(10).integers(0, 256, (72, 72, 3), dtype=np.uint8)
    Image.fromarray(colour, "RGB").save(d / "photo.jpg")
    save_gray(d / "tiny.png", noise(11, 8))
    # wrong series: an MR slice in a lung-CT site
    write_dicom(root / "benign" / "mr.dcm", np.arange(64 * 64).reshape(64, 64), modality="MR")
    # one image filed under two classes
    shutil.copy(root / "normal" / "normal-03.png", root / "malignant" / "copied.png")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "corrupt image data",
        "notes.jpg": "not an image PIL can identify",
        "._normal-00.png": "not an image PIL can identify",
        "huge.png": "image too large",
        "nopixels.dcm": "DICOM has no pixel data",
        "ultrasound.dcm": "DICOM modality US is not supported",
        "jpegls.dcm": "cannot be decoded here",
        "cut.dcm": "truncated DICOM: ",
        "stub.dcm": "truncated or incomplete DICOM",
        "locked.jpg": "permission denied",
        "loop.jpg": "Too many levels of symbolic links",
        "dangling.jpg": "broken symbolic link",
        "pipe.jpg": "not a regular file",
    }


NOTES = {
    "alpha.png": "alpha channel",
    "deep.png": "16-bit",
    "bitmap.png": "content is BMP",
    "photo.jpg": "colour image",
    "tiny.png": "very small (8x8)",
    "stack.dcm": "multi-frame (3 frames)",
    "mono1.dcm": "MONOCHROME1",
}


@pytest.fixture
def messy_site() -> Iterator[tuple[Path, dict[str, str]]]:
    # world-readable (pytest's tmp_path is private to root), so an unprivileged
    # user can run the check on it
    top = Path(tempfile.mkdtemp(prefix="fedscan-site-"))
    top.chmod(0o755)
    root = top / "site"
    _good(root)
    expected = _bad(root)
    (top / "cache").mkdir(mode=0o777)
    (top / "cache").chmod(0o777)
    for p in root.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    yield root, expected
    shutil.rmtree(top)


def _check_unprivileged(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDSCAN_CACHE": str(root.parent / "cache"), "HOME": str(root.parent)}
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")  # util-linux; drops root like a service account
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot test a permission-denied file")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    cmd = [sys.executable, "-m", "fedscan", "site", "check", "--data-path", str(root)]
    return subprocess.run(
        [*prefix, *cmd, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )


def test_site_check_reports_every_kind_of_bad_file(messy_site) -> None:
    root, expected = messy_site
    proc = _check_unprivileged(root, "--json", "--no-estimate")
    assert proc.returncode == 1, proc.stderr
    r = json.loads(proc.stdout)
    reasons = {Path(u["path"]).name: u["reason"] for u in r["unreadable"]}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    notes = {Path(n["path"]).name: n["note"] for n in r["notes"]}
    for name, fragment in NOTES.items():
        assert fragment in notes[name], (name, notes.get(name))
    assert set(r["non_image_files"]) == {
        "normal/Thumbs.db",
        "normal/report.pdf",
        "normal/.DS_Store",
    }
    # 27 good PNGs + the readable odd ones + ct/stack/mono1/mr DICOMs + the copy
    assert r["readable"] == 27 + 5 + 3 + 1 + 1
    assert r["classes"] == {"normal": 9 + 5 + 3, "benign": 9 + 1, "malignant": 9 + 1}
    assert r["formats"] == {"PNG": 27 + 3 + 1, "DICOM": 4, "JPEG": 1, "BMP": 1}
    assert r["modalities"] == {"CT": 3, "MR": 1}
    conflicts = [sorted(g) for g in r["label_conflicts"]]
    assert conflicts == [["malignant/copied.png", "normal/normal-03.png"]]
    assert r["usable"] is False
    problems = " | ".join(r["problems"])
    assert f"{len(expected)} unreadable file(s)" in problems
    assert "1 MR DICOM file(s) in a lung_ct site" in problems
    assert "stored under two different classes" in problems
    assert "site is not ready" in proc.stderr
    assert PATIENT not in proc.stdout and "ID-4711" not in proc.stdout


def test_site_check_passes_a_clean_folder_and_estimates_a_round(tmp_path: Path, capsys) -> None:
    root = tmp_path / "site"
    _good(root)
    write_dicom(root / "benign" / "scan.dcm", np.arange(64 * 64).reshape(64, 64) % 2000)
    args = ["model=paper_cnn", "dataset.image_size=32", "train.batch_size=8"]
    assert main(["site", "check", "--data-path", str(root), *args]) == 0
    text = capsys.readouterr().out
    assert "READY to join" in text and "lung_ct" in text
    assert main(["site", "check", "--data-path", str(root), "--json", *args]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["usable"] and r["problems"] == [] and r["readable"] == 28
    e = r["estimate"]
    assert e["model"] == "paper_cnn" and e["image_size"] == 32 and e["batch_size"] == 8
    assert e["train_samples"] + e["val_samples"] == 28
    assert e["seconds_per_round"] > 0 and e["first_round_extra_seconds"] > 0


def test_unreadable_files_are_not_a_problem_when_the_site_skips_them(tmp_path: Path) -> None:
    root = tmp_path / "site"
    _good(root)
    (root / "normal" / "empty.jpg").write_bytes(b"")
    strict = site_check(root, cache_root=tmp_path / "c", on_unreadable="error")
    lenient = site_check(root, cache_root=tmp_path / "c", on_unreadable="skip")
    assert not strict["usable"] and lenient["usable"]
    assert lenient["unreadable"] == [{"path": "normal/empty.jpg", "reason": "empty file"}]


def test_unusable_folders_exit_non_zero_with_the_reason(tmp_path: Path, capsys) -> None:
    assert main(["site", "check", "--data-path", str(tmp_path / "nope"), "--no-estimate"]) == 2
    assert f"{tmp_path / 'nope'}" in capsys.readouterr().err
    save_gray(tmp_path / "few" / "normal" / "a.png", noise(1))
    assert main(["site", "check", "--data-path", str(tmp_path / "few"), "--no-estimate"]) == 1
    assert "only 1 readable images; a site needs at least 20" in capsys.readouterr().err
    save_gray(tmp_path / "odd" / "tumour-ish" / "a.png", noise(1))
    assert main(["site", "check", "--data-path", str(tmp_path / "odd"), "--no-estimate"]) == 1
    out = capsys.readouterr()
    assert "tumour-ish: not a" in out.out and "tumour-ish" in out.err


def test_one_pass_names_every_layout_problem_beside_the_bad_files(tmp_path: Path, capsys) -> None:
    root = tmp_path / "site"
    _good(root)  # a lung_ct site: normal / benign / malignant
    save_gray(root / "scratch" / "x.png", noise(1))  # a stray sub-folder
    save_gray(root / "glioma" / "g.png", noise(2))  # another domain's class
    (root / "Bengin cases").mkdir()  # a class folder, empty (the benign one exists too)
    (root / "normal" / "loop").symlink_to(root)  # a symlink loop
    (root / "notes.txt").write_text("hello")  # files at the top level
    save_gray(root / "stray.png", noise(3))
    (root / "normal" / "empty.jpg").write_bytes(b"")  # and a bad image
    args = ["site", "check", "--data-path", str(root), "--no-estimate", "--domain", "lung_ct"]
    assert main([*args, "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    layout = {f["path"]: f["what"] for f in r["layout"]}
    assert "not a lung_ct class folder" in layout["scratch"]
    assert "another domain (brain_mri class 'glioma')" in layout["glioma"]
    assert "a second folder for class 'benign'" in layout["benign"] or (
        "a second folder for class 'benign'" in layout["Bengin cases"]
    )
    assert "symbolic link to a folder" in layout["normal/loop"]
    assert "top level" in layout["notes.txt"] and "top level" in layout["stray.png"]
    assert r["unreadable"] == [{"path": "normal/empty.jpg", "reason": "empty file"}]
    assert r["usable"] is False and any("scratch" in p for p in r["problems"])
    assert main(args) == 1  # the same findings as text
    text = capsys.readouterr().out
    for name in ("scratch", "glioma", "normal/loop", "notes.txt", "stray.png", "normal/empty.jpg"):
        assert name in text, name
    # an empty class folder is named too (a warning: a site may lack a class)
    shutil.rmtree(root / "malignant")
    (root / "malignant").mkdir()
    _, findings = survey_layout(root, "lung_ct")
    assert {
        "path": "malignant",
        "what": "class folder 'malignant' holds no JPEG, PNG or DICOM file",
        "blocking": False,
    } in findings


def test_a_sub_folder_inside_a_class_folder_is_named_not_counted_silently(
    tmp_path: Path, capsys
) -> None:
    """Training reads class folders recursively, so ``pituitary/old_exports/`` counts as
    pituitary: the check says so, as it names stray top-level folders."""
    root = tmp_path / "site"
    for k, cls in enumerate(["glioma", "meningioma", "notumor", "pituitary"]):
        for i in range(6):
            save_gray(root / cls / f"{i}.png", noise(100 * k + i, 72))
    for i in range(3):
        save_gray(root / "pituitary" / "old_exports" / "2019" / f"{i}.png", noise(900 + i, 72))
    args = ["site", "check", "--data-path", str(root), "--no-estimate"]
    assert main([*args, "--json"]) == 0  # a warning, not a problem (DICOM series nest too)
    r = json.loads(capsys.readouterr().out)
    assert r["classes"]["pituitary"] == 9
    found = [f for f in r["layout"] if f["path"] == "pituitary/old_exports"]
    assert len(found) == 1 and not found[0]["blocking"]
    assert "3 image(s) are read as pituitary" in found[0]["what"]
    assert main(args) == 0
    assert "warning: pituitary/old_exports: a sub-folder inside class folder" in (
        capsys.readouterr().out
    )


def test_the_estimate_uses_the_domains_image_size_and_progress_is_logged(
    tmp_path: Path, capsys, caplog
) -> None:
    """A brain federation trains at brain_mri's image size (160 px), a lung one at
    lung_ct's (224 px), not the generic site default; each phase says what it does."""
    import logging

    brain, lung = tmp_path / "brain", tmp_path / "lung"
    _good(lung)
    for k, cls in enumerate(["glioma", "meningioma", "notumor", "pituitary"]):
        for i in range(6):
            save_gray(brain / cls / f"{i}.png", noise(100 * k + i, 72))
    args = ["--json", "model=paper_cnn", "train.batch_size=4"]
    sizes = {}
    with caplog.at_level(logging.INFO, logger="fedscan.sitecheck"):
        for name, root in (("brain", brain), ("lung", lung)):
            assert main(["site", "check", "--data-path", str(root), *args]) == 0
            sizes[name] = json.loads(capsys.readouterr().out)["estimate"]["image_size"]
    assert sizes == {"brain": 160, "lung": 224}
    said = [r.getMessage() for r in caplog.records if r.name == "fedscan.sitecheck"]
    for phase in ("loading the checks", "24 files in 4 class folders", "timing training steps"):
        assert any(phase in m for m in said), (phase, said)
    # an override still wins
    assert main(["site", "check", "--data-path", str(brain), *args, "dataset.image_size=64"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["image_size"] == 64

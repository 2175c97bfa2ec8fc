import json
import shutil
from pathlib import Path

from fedscan.common.commands.audit import audit, format_report
from fedscan.simulations.cli import main
from tests.conftest import noise, save_gray


def _brain_fixture(root: Path) -> Path:
    for k, cls in enumerate(["glioma", "meningioma", "notumor", "pituitary"]):
        for i in range(3):
            save_gray(root / "Training" / cls / f"Tr-{i}.jpg", noise(100 * k + i))
            save_gray(root / "Testing" / cls / f"Te-{i}.jpg", noise(900 + 100 * k + i))
    # planted: an exact duplicate pair inside Training, and a test copy of a train image
    shutil.copy(
        root / "Training" / "glioma" / "Tr-0.jpg", root / "Training" / "glioma" / "Tr-copy.jpg"
    )
    shutil.copy(
        root / "Training" / "meningioma" / "Tr-1.jpg", root / "Testing" / "notumor" / "Te-leak.jpg"
    )
    # corrupt files: empty, text named .jpg, truncated jpeg
    (root / "Training" / "glioma" / "empty.jpg").write_bytes(b"")
    (root / "Training" / "meningioma" / "text.jpg").write_text("definitely not a jpeg")
    good = save_gray(root / "Training" / "pituitary" / "full.jpg", noise(7, 128)).read_bytes()
    (root / "Training" / "pituitary" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "Training" / "pituitary" / "full.jpg").unlink()
    (root / "Testing" / "glioma" / "README.txt").write_text("stray")
    return root


def test_audit_finds_planted_problems(tmp_path: Path):
    r = audit(_brain_fixture(tmp_path / "b"), tmp_path / "cache")
    assert r["images"] == 24 + 2 + 3
    assert r["classes"]["glioma"] == 3 + 3 + 1 + 1
    reasons = {u["path"].split("/")[-1]: u["reason"] for u in r["unreadable"]}
    assert set(reasons) == {"empty.jpg", "text.jpg", "truncated.jpg"}
    assert reasons["empty.jpg"] == "empty file"
    assert r["non_image_files"] == ["Testing/glioma/README.txt"]
    groups = sorted(sorted(g) for g in r["exact_duplicate_groups"])
    assert groups == [
        ["Testing/notumor/Te-leak.jpg", "Training/meningioma/Tr-1.jpg"],
        ["Training/glioma/Tr-0.jpg", "Training/glioma/Tr-copy.jpg"],
    ]
    assert len(r["removable_duplicates"]) == 2
    assert r["cross_split_duplicates"] == ["Testing/notumor/Te-leak.jpg"]
    assert len(r["label_conflicts"]) == 1  # the leaked copy sits in another class
    assert "unreadable: 3" in format_report(r)


def test_audit_cli_json(tmp_path: Path, capsys):
    root = _brain_fixture(tmp_path / "b")
    assert main(["audit", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "images",
        "classes",
        "unreadable",
        "exact_duplicate_groups",
        "removable_duplicates",
        "cross_split_duplicates",
    ):
        assert key in out


def test_audit_missing_folder_exits_2(tmp_path: Path, capsys):
    assert main(["audit", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err

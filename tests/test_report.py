"""``fedscan report``: the figures of the model ``fedscan export`` ships, and folders that
are no finished run (still running, interrupted, empty) skipped with one line each."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedscan.common.commands.report import load_run, write_report
from fedscan.common.core.errors import DataError
from fedscan.simulations.cli import main
from tests.conftest import split_metrics
from tests.test_harness import _fake_run, _header, _write_config


def _federated(
    root: Path,
    name: str,
    accs: dict[int, float],
    *,
    best: dict | None,
    rounds: int | None = None,
    refit: float | None = None,
    extra: tuple[str, ...] = (),
) -> Path:
    """A federated folder whose round r has test accuracy ``accs[r]`` (rounds missing
    from ``accs`` were not evaluated); ``refit``: the last round re-recorded with this
    accuracy after a head refit (its own figures kept as ``before_refit``); ``best``:
    metrics.json's best entry (best.pt written), else only last.pt."""
    d = root / name
    d.mkdir(parents=True)
    recorded = max(accs, default=0)
    n = rounds if rounds is not None else recorded
    refit_key = ("federation.head_refit=fed3r",) if refit is not None else ()
    _write_config(d, "dataset=synthetic", f"rounds={n}", *refit_key, *extra)
    site = {"num-examples": 5, "node_id": 7, "partition-id": 0, "val_accuracy": 0.5}
    other = {**site, "node_id": 8, "partition-id": 1}
    rows = []
    for r in range(1, recorded + 1):
        tests = {"test_grouped": split_metrics(accs[r])} if r in accs else {}
        rows.append({"round": r, "global": tests, "sites": {"evaluate": [site, other]}})
    if refit is not None:
        rows[-1]["before_refit"] = rows[-1]["global"]
        rows[-1]["global"] = {"test_grouped": split_metrics(refit)}
    doc = {**_header("federated", "synthetic"), "rounds": rows}
    if best is not None:
        doc["best"] = best
        (d / "best.pt").write_bytes(b"")
    (d / "last.pt").write_bytes(b"")
    (d / "metrics.json").write_text(json.dumps(doc))
    return d


def _figure(run: Path) -> tuple[str, float]:
    row = next(r for r in load_run(run) if r["split"] == "test_grouped")
    return row["model"], row["accuracy"]


def test_report_shows_the_shipped_models_figures_and_names_its_round(tmp_path: Path) -> None:
    """best.pt of round 2 (of 3): round 2's figures, not the last round's; a refitted
    best: the refit's; best.pt from before the refit of the last round: the figures before
    it; no best.pt: last.pt, the last round."""
    best2 = _federated(tmp_path, "a", {1: 0.5, 2: 0.9, 3: 0.7}, best={"round": 2})
    assert _figure(best2) == ("best.pt, round 2", 0.9)
    refitted = _federated(
        tmp_path, "b", {1: 0.5, 2: 0.6, 3: 0.7}, best={"round": 3, "refitted": True}, refit=0.8
    )
    assert _figure(refitted) == ("best.pt, round 3 (refitted)", 0.8)
    # the curve is the training (round 3 before its refit); the refit is a point apart
    row = next(r for r in load_run(refitted) if r["split"] == "test_grouped")
    assert [(x, acc) for x, acc, _ in row["curve"]] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert row["refit_point"][:2] == (3, 0.8)
    before = _federated(tmp_path, "c", {1: 0.5, 2: 0.6, 3: 0.7}, best={"round": 3}, refit=0.8)
    assert _figure(before) == ("best.pt, round 3", 0.7)
    last = _federated(tmp_path, "d", {1: 0.5, 2: 0.6}, best=None, refit=0.65)
    assert _figure(last) == ("last.pt, round 2 (refitted)", 0.65)
    # the study drivers compare methods after the same rounds: the last evaluated one
    row = next(r for r in load_run(best2, figures="last") if r["split"] == "test_grouped")
    assert (row["model"], row["accuracy"]) == ("round 3", 0.7)
    # the table says it, with how many sites and rounds each run used
    out = tmp_path / "report"
    assert main(["report", str(best2), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| 2 sites, 3 rounds | best.pt, round 2 | 90.0 |" in md
    assert "the one `fedscan export` ships" in md


def test_a_shipped_round_without_test_figures_is_not_reported_as_another(tmp_path: Path) -> None:
    run = _federated(
        tmp_path, "a", {2: 0.9, 4: 0.7}, best={"round": 3}, extra=("federation.evaluate_every=2",)
    )
    with pytest.raises(DataError, match=r"round 3, which was not evaluated.*evaluate_every=2"):
        load_run(run)


def test_report_skips_folders_that_are_no_finished_run_with_one_line_each(
    tmp_path: Path, capsys, caplog
) -> None:
    """``fedscan report runs/*/`` while one run still runs and another was interrupted:
    the finished ones are reported, each other folder named once with why."""
    done = _fake_run(tmp_path, "done", seed=0, acc=0.8, method="federated")
    pooled = _fake_run(tmp_path, "pooled", seed=0, acc=0.9, method="pooled")
    empty = tmp_path / "empty"  # a run that has just started: no file yet
    empty.mkdir()
    started = tmp_path / "started"  # config.yaml written, no round yet
    started.mkdir()
    _write_config(started, "dataset=synthetic")
    running = _federated(tmp_path, "running", {1: 0.5, 2: 0.6}, best={"round": 2}, rounds=5)
    unevaluated = _federated(tmp_path, "unevaluated", {}, best=None, rounds=3)
    no_refit = _federated(tmp_path, "no-refit", {1: 0.5}, best={"round": 1}, refit=0.6)
    doc = json.loads((no_refit / "metrics.json").read_text())
    doc["rounds"][-1]["global"] = doc["rounds"][-1].pop("before_refit")  # killed before it
    (no_refit / "metrics.json").write_text(json.dumps(doc))
    folders = [done, empty, started, running, unevaluated, pooled, no_refit]
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING, logger="fedscan.report"):
        assert main(["report", *map(str, folders), "--out", str(out)]) == 0
    skipped = [r.getMessage() for r in caplog.records if r.name == "fedscan.report"]
    assert len(skipped) == 5, skipped
    reasons = {
        empty: "not a fedscan run folder",
        started: "not a fedscan run folder",
        running: "round 2 of 5 recorded: running, or interrupted",
        unevaluated: "round 0 of 3 recorded",
        no_refit: "the refit after round 1 is not recorded",
    }
    for folder, why in reasons.items():
        line = next(m for m in skipped if f"{folder}:" in m)
        assert why in line, line
    md = (out / "report.md").read_text()
    assert "| fedprox(mu=0.01) |" in md and "| pooled |" in md
    assert "Skipped (not finished runs):" in md and str(running) in md
    # nothing left: an error naming every folder
    with pytest.raises(DataError, match=r"no finished run folder to report.*running.*empty"):
        write_report([running, empty], tmp_path / "r2")
    assert main(["report", str(running), "--out", str(tmp_path / "r3")]) == 2
    assert "no finished run folder" in capsys.readouterr().err


def test_a_synthetic_federation_and_its_centralised_reference_share_one_table(
    tmp_path: Path,
) -> None:
    """A federated folder records the dataset as ``synthetic``, a centralised one as
    ``synthetic_brain_mri`` (the collection's name): one table, the reference beside."""
    fed = _federated(tmp_path, "fed", {1: 0.5, 2: 0.6}, best={"round": 2})
    cent = tmp_path / "cent"
    cent.mkdir()
    _write_config(cent, "dataset=synthetic")
    final = {"test_grouped": split_metrics(0.9)}
    doc = {**_header("centralised", "synthetic_brain_mri"), "history": [{}], "final": final}
    (cent / "metrics.json").write_text(json.dumps(doc))
    (cent / "model.pt").write_bytes(b"")
    datasets = {r["dataset"] for d in (fed, cent) for r in load_run(d)}
    assert datasets == {"synthetic_brain_mri"}

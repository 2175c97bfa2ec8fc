"""The research harness: sweeps, baselines, refusals before training, and the report."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from fedscan.common.commands.report import aggregate, load_run, to_markdown, write_report
from fedscan.common.core.errors import ConfigError, DataError
from fedscan.simulations.cli import main
from fedscan.simulations.harness import expand_sweep, run_one
from tests.conftest import SIM_BASE as BASE
from tests.conftest import split_metrics

pytestmark = pytest.mark.usefixtures("_no_real_data")


def test_num_sites_and_its_alias_cannot_disagree():
    with pytest.raises(ConfigError, match=r"num_sites.*set twice"):
        run_one(["federation.num_sites=5", "num_sites=3"])


def test_sweep_expands_like_hydra():
    runs = expand_sweep(["dataset=lung_ct", "partition.alpha=1.0,0.1", "seed=range(0,2)"])
    assert runs == [
        ["dataset=lung_ct", "partition.alpha=1.0", "seed=0"],
        ["dataset=lung_ct", "partition.alpha=1.0", "seed=1"],
        ["dataset=lung_ct", "partition.alpha=0.1", "seed=0"],
        ["dataset=lung_ct", "partition.alpha=0.1", "seed=1"],
    ]


def test_a_two_site_sweep_of_two_runs_writes_two_run_folders(tmp_path: Path, capsys):
    args = [*BASE, "rounds=1", "partition=dirichlet", "partition.alpha=1.0", "seed=0,1"]
    assert main(["simulate", "-m", *args, f"runs_dir={tmp_path}"]) == 0
    runs = sorted(p for p in tmp_path.iterdir() if (p / "metrics.json").exists())
    assert len(runs) == 2
    seeds = sorted(yaml.safe_load((r / "config.yaml").read_text())["seed"] for r in runs)
    assert seeds == [0, 1]
    for r in runs:
        with open(r / "partition.csv") as fh:
            table = list(csv.reader(fh))
        assert table[0] == ["site", "glioma", "meningioma", "notumor", "pituitary", "total"]
        assert [row[0] for row in table[1:]] == ["site 0", "site 1"]
        assert (r / "partition.png").exists()
    # the two seeds drew different Dirichlet partitions
    assert (runs[0] / "partition.csv").read_text() != (runs[1] / "partition.csv").read_text()
    assert capsys.readouterr().out.count("results: ") == 2


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("partition=zipf", ConfigError, r"partition"),
        ("partition.alpha=0", ConfigError, r"partition\.alpha.*must be > 0"),
        ("method=magic", ConfigError, r"method.*unknown method"),
        ("num_sites=500", DataError, r"cannot fill 500 sites"),
    ],
)
def test_bad_overrides_fail_before_any_training(tmp_path: Path, override, error, match):
    extra = ["partition=dirichlet"] if override.startswith("partition.alpha") else []
    base = [o for o in BASE if not o.startswith("federation.num_sites")]
    with pytest.raises(error, match=match):
        run_one([*base, *extra, override, "federation.min_nodes=1", f"runs_dir={tmp_path}"])
    assert not list(tmp_path.glob("*/metrics.json"))  # nothing ran


def test_local_and_pooled_baselines_share_the_partition(tmp_path: Path):
    common = [*BASE, "rounds=2", "federation.local_epochs=1", f"runs_dir={tmp_path}"]
    local = run_one([*common, "method=local"])
    pooled = run_one([*common, "method=pooled"])
    m = json.loads((local / "metrics.json").read_text())
    assert m["kind"] == "local" and m["epochs"] == 2 and len(m["sites"]) == 2
    for s in m["sites"]:
        assert 0.0 <= s["final"]["test_grouped"]["accuracy"] <= 1.0
    # cross-site: each site's model on both sites' validation splits, then the test
    cross = m["cross_site"]
    assert cross["models"] == ["site 0", "site 1"]
    assert cross["data"] == ["site 0 val", "site 1 val", "test_grouped"]
    for row, s in zip(cross["accuracy"], m["sites"], strict=True):
        assert row[-1] == s["final"]["test_grouped"]["accuracy"]
        assert all(0.0 <= v <= 1.0 for v in row)
    assert (local / "cross_site.png").stat().st_size > 0
    assert json.loads((pooled / "metrics.json").read_text())["kind"] == "pooled"
    files = write_report([local, pooled], tmp_path / "report")
    text = files["markdown"].read_text()
    assert "| local | iid |" in text and "| pooled | - |" in text
    (heatmap,) = [v for k, v in files.items() if k.startswith("cross_site_") and "_local_" in k]
    assert heatmap.stat().st_size > 0


def _fake_run(
    root: Path, name: str, *, seed: int, acc: float, method: str, sites=None, extra=(), ci=None
) -> Path:
    """A finished federated (2 rounds, best.pt of round 2) or pooled (model.pt) run folder
    with chosen numbers (2 classes, 10 test images)."""
    d = root / name
    d.mkdir(parents=True)
    _write_config(
        d,
        f"seed={seed}",
        "dataset=lung_ct",
        "strategy=fedprox",
        "strategy.mu=0.01",
        "partition=dirichlet",
        "partition.alpha=0.1",
        "rounds=2",
        *extra,
    )
    correct = round(acc * 10)
    m = {
        "n": 10,
        "accuracy": acc,
        "balanced_accuracy": acc,
        "macro_precision": acc,
        "macro_recall": acc,
        "macro_f1": acc,
        "loss": 1.0 - acc,
        "per_class": {
            "normal": {"recall": acc, "precision": acc, "f1": acc, "support": 5},
            "malignant": {"recall": 1.0, "precision": acc, "f1": acc, "support": 5},
        },
        "confusion_matrix": [[correct - 5, 10 - correct], [0, 5]],
    }
    if ci is not None:  # an interval of (acc - ci, acc + ci) on accuracy, none on recall
        m["ci"] = {
            "accuracy": [acc - ci, acc + ci],
            "recall": {"normal": None, "malignant": [1.0 - ci, 1.0]},
        }
    if method == "federated":
        rounds = [
            {"round": 1, "global": {"test_grouped": {**m, "accuracy": 0.5}}, "sites": {}},
            {"round": 2, "global": {"test_grouped": m}, "sites": {"evaluate": sites or []}},
        ]
        best = {"round": 2, "metric": "val_accuracy", "score": 0.5}
        metrics = {**_header("federated", "lung_ct"), "rounds": rounds, "best": best}
        (d / "best.pt").write_bytes(b"")  # what export ships; the report reads metrics.json
    else:
        history = [{"epoch": 1}, {"epoch": 2}]
        metrics = {
            **_header("pooled", "lung_ct"),
            "history": history,
            "final": {"test_grouped": m, "val": m},
        }
        (d / "model.pt").write_bytes(b"")
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _write_config(d: Path, *overrides: str) -> None:
    """A run folder's config.yaml as the tree resolves it (data_root set: no fallback;
    composed only, the folder holds no dataset)."""
    from omegaconf import OmegaConf

    from fedscan.common.core.config import load_config

    cfg = load_config([f"data_root={d}", *overrides], check_data=False)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _header(kind: str, dataset: str) -> dict:
    from fedscan.common.runs.record import VERSION

    return {
        "version": VERSION,
        "kind": kind,
        "label": dataset,
        "synthetic": False,
        "dataset": dataset,
    }


def test_report_on_tiny_run_folders_gives_the_right_numbers(tmp_path: Path, capsys):
    runs = [
        _fake_run(
            tmp_path,
            "a",
            seed=0,
            acc=0.8,
            method="federated",
            sites=[{"val_accuracy": 0.6}, {"val_accuracy": 0.9}],
        ),
        _fake_run(
            tmp_path,
            "b",
            seed=1,
            acc=0.6,
            method="federated",
            sites=[{"val_accuracy": 0.7}, {"val_accuracy": 0.75}],
        ),
        _fake_run(tmp_path, "c", seed=0, acc=0.9, method="pooled"),
    ]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "### lung_ct, test split `test_grouped`" in md
    # pooled first, one seed; fedprox: mean 70.0 +- std 10.0 over two seeds,
    # worst-site accuracy the mean of each run's worst site (60 and 70)
    # each row says what its run trained with and which model its figures are of
    lines = [line for line in md.splitlines() if line.startswith("| pooled") or "fedprox" in line]
    assert lines[0].startswith("| pooled | - | 1 | 2 epochs | model.pt | 90.0 |")
    assert lines[1].startswith(
        "| fedprox(mu=0.01) | dirichlet(alpha=0.1) | 2 | 2 sites, 2 rounds | best.pt, round 2 "
        "| 70.0 ± 10.0 |"
    )
    assert lines[1].endswith("| 70.0 ± 10.0 | 100.0 ± 0.0 | 65.0 ± 5.0 |")
    with open(out / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    fed = next(r for r in rows if r["method"].startswith("fedprox"))
    assert float(fed["accuracy_mean"]) == pytest.approx(0.7)
    assert float(fed["accuracy_std"]) == pytest.approx(0.1)
    assert float(fed["worst_site_accuracy_mean"]) == pytest.approx(0.65)
    assert (out / "curves_lung_ct.png").exists()
    assert (out / "confusion_lung_ct_test_grouped_0.png").exists()
    with pytest.raises(DataError, match="not a fedscan run folder"):
        write_report([tmp_path / "report"], tmp_path / "r2")


def test_report_prints_intervals_beside_the_figures(tmp_path: Path) -> None:
    """A run's bootstrap interval is printed after its figure; over seeds, the seeds'
    interval ends are averaged; a run without intervals prints none."""
    runs = [
        _fake_run(tmp_path, "a", seed=0, acc=0.8, method="federated", ci=0.1),
        _fake_run(tmp_path, "b", seed=1, acc=0.6, method="federated", ci=0.2),
        _fake_run(tmp_path, "c", seed=0, acc=0.9, method="pooled", ci=0.05),
    ]
    md = to_markdown(aggregate(row for d in runs for row in load_run(d)))
    assert "bootstrap over the test split's leakage groups" in md
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    pooled = next(line for line in lines if line.startswith("| pooled"))
    fed = next(line for line in lines if "fedprox" in line)
    assert pooled.startswith("| pooled | - | 1 | 2 epochs | model.pt | 90.0 [85.0, 95.0] | 90.0 |")
    # ends (0.7, 0.9) and (0.4, 0.8) averaged: [55.0, 85.0]
    assert "| best.pt, round 2 | 70.0 ± 10.0 [55.0, 85.0] | 70.0 ± 10.0 |" in fed
    # the recall columns are the classes, intervals beside them, no column of their own
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    assert head.count("recall") == 2 and "_ci" not in head
    assert "| 100.0 [95.0, 100.0] |" in pooled and "| 90.0 |" in pooled
    files = write_report(runs, tmp_path / "report")  # the plots too
    assert files["confusion_lung_ct_test_grouped_0"].stat().st_size > 0
    plain = to_markdown(
        aggregate(load_run(_fake_run(tmp_path, "d", seed=0, acc=0.5, method="pooled")))
    )
    assert "[" not in plain and "bootstrap" not in plain


def _horizon_run(root: Path, name: str, overrides: list[str], metrics: dict) -> Path:
    d = root / name
    d.mkdir(parents=True)
    _write_config(d, "partition=dirichlet", "partition.alpha=0.1", *overrides)
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_horizon_reads_each_checkpoint_from_one_trajectory_beside_an_equal_budget_pool(
    tmp_path: Path,
):
    from fedscan.simulations.horizon import horizon_rows, to_markdown, write_page

    def fed(name: str, strategy: list[str], accs: dict[int, float]) -> Path:
        rounds = [
            {"round": r, "global": {"test_official": split_metrics(a)} if a else {}, "sites": {}}
            for r, a in accs.items()
        ]
        metrics = {**_header("federated", "brain_mri"), "rounds": rounds}
        return _horizon_run(tmp_path, name, [*strategy, "rounds=4"], metrics)

    def pooled(name: str, rounds: int, acc: float) -> Path:
        final = {"test_official": split_metrics(acc), "val": split_metrics(acc)}
        metrics = {**_header("pooled", "brain_mri"), "final": final}
        return _horizon_run(tmp_path, name, [f"rounds={rounds}"], metrics)

    runs = [
        fed("a", [], {1: None, 2: 0.5, 3: None, 4: 0.7}),
        fed("b", ["strategy=fedprox", "strategy.mu=1.0"], {1: None, 2: 0.6, 3: None, 4: 0.75}),
        pooled("p2", 2, 0.8),
        pooled("p4", 4, 0.9),
    ]
    table = horizon_rows(runs, [2, 4], "test_official")
    assert [r["round"] for r in table] == [2, 4]
    assert table[0]["pooled"] == 0.8 and table[1]["pooled"] == 0.9  # budget-matched
    assert table[0]["fedavg"] == 0.5 and table[1]["fedprox(mu=1)"] == 0.75
    assert table[1]["gap_fedavg"] == pytest.approx(0.2)
    assert table[1]["gap_fedprox(mu=1)"] == pytest.approx(0.15)
    md = to_markdown(table)
    assert "| 4 | 90.0 | 70.0 | 75.0 | 20.0 | 15.0 |" in md
    with pytest.raises(ValueError, match="no test_official evaluation at round 3"):
        horizon_rows(runs, [3], "test_official")
    (runs[0] / "partition.csv").write_text("site,glioma,notumor,total\nsite 0,3,0,3\n")
    args = argparse.Namespace(
        alpha=0.1,
        sites=2,
        seed=0,
        every=2,
        checkpoints=[2, 4],
        image_size=224,
        label_smoothing=0.0,
    )
    page = write_page(runs, args, tmp_path / "docs" / "results" / "horizon.md")
    assert "| site 0 | 3 | 0 | 3 |" in page
    assert "- fedavg: 30.0 points below pooled at round 2, 20.0 at round 4." in page
    # the figure beside the page, linked relative to it
    assert (tmp_path / "docs" / "results" / "horizon_brain_mri_test_official.png").exists()
    assert "![horizon test_official](horizon_brain_mri_test_official.png)" in page


def test_study_wall_time_reports_the_cache_build_apart_only_when_it_was_timed():
    from fedscan.simulations.study import _wall_time

    runs = {"brain_mri": 600.0, "lung_ct": 300.0, "total": 900.0}
    timed = _wall_time({"seconds": runs, "cache_seconds": {"brain_mri": 120.0, "lung_ct": 60.0}})
    assert "brain_mri 10.0 min, lung_ct 5.0 min" in timed
    assert "cache build" in timed and "brain_mri 2.0 min, lung_ct 1.0 min" in timed
    assert timed.endswith("Total 18.0 min.")
    untimed = _wall_time({"seconds": runs, "cache_seconds": {"brain_mri": 120.0}})
    assert "(total 15.0 min), with warm caches" in untimed and "not timed here" in untimed


def test_study_rows_override_the_base_without_setting_a_key_twice() -> None:
    from fedscan.simulations.harness import merged

    out = merged(["dataset=brain_mri", "rounds=10", "seed=0"], ["rounds=0", "seed=2"])
    assert out == ["dataset=brain_mri", "rounds=0", "seed=2"]


def test_report_keeps_runs_that_differ_in_more_than_the_seed_apart(tmp_path: Path) -> None:
    from fedscan.common.commands.report import aggregate, load_run

    a = _fake_run(tmp_path, "a", seed=0, acc=0.8, method="federated", extra=["num_sites=3"])
    b = _fake_run(tmp_path, "b", seed=1, acc=0.6, method="federated", extra=["num_sites=3"])
    c = _fake_run(tmp_path, "c", seed=0, acc=0.9, method="federated", extra=["num_sites=2"])
    d = _fake_run(tmp_path, "d", seed=1, acc=0.9, method="federated", extra=["runs_dir=/x"])
    table = aggregate(row for r in (a, b, c) for row in load_run(r))
    methods = {r["method"]: r["seeds"] for r in table}
    assert methods == {"fedprox(mu=0.01) [num_sites=3]": 2, "fedprox(mu=0.01) [num_sites=2]": 1}
    # where a run was written is not a difference: one row over both seeds
    same = aggregate(row for r in (c, d) for row in load_run(r))
    assert [(r["method"], r["seeds"]) for r in same] == [("fedprox(mu=0.01)", 2)]


@pytest.mark.slow
def test_the_finetune_driver_runs_and_writes_its_page(tmp_path: Path) -> None:
    from fedscan.simulations.finetune import main as finetune

    docs = tmp_path / "docs" / "results" / "finetune.md"
    small = ["dataset.image_size=32", "dataset.size=32", "dataset.per_class=24"]
    args = ["--datasets", "synthetic", "--alphas", "0", "--sites", "2", "--rounds", "1"]
    assert (
        finetune([*args, "--blocks", "1", f"--out={tmp_path / 'runs'}", f"--docs={docs}", *small])
        == 0
    )
    page = docs.read_text()
    assert "## synthetic" in page and "| centralised | - |" in page
    # the command typed, not the driver's image-size pin, which the typed size overrode
    assert "python -m fedscan.simulations.finetune " + " ".join(small) + "\n" in page
    assert "seed 0, 32 px," in page
    assert "**fed3r+fedavg+bsm, iid**, per round:" in page
    assert "**fed3r+fedavg, iid**, per round:" in page and "| 0 |" in page  # round 0: one-shot
    assert "**fedavg+refit, iid**, per round:" in page
    assert "**fedavg+bnrefit, iid**, per round:" in page
    # a FedAvg cell's folder copied to a refit cell's name: resumed, only the refit runs
    runs = tmp_path / "runs" / "synthetic"
    cell = runs / "synthetic-fedavg+bnrefit-iid"
    shutil.rmtree(cell)
    shutil.copytree(runs / "synthetic-fedavg-iid", cell)
    again = [*args, "--methods", "fedavg+bnrefit", "--blocks", "1", f"--out={tmp_path / 'runs'}"]
    assert finetune([*again, f"--docs={docs}", *small]) == 0
    rows = json.loads((cell / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1] and "before_refit" in rows[0]
    assert "bn_statistics" in rows[0]["sites"] and "statistics" in rows[0]["sites"]
    assert "| 1, before the refit |" in page  # round 1 before and after its head refit
    # the figures in finetune/ beside the page, linked relative to it
    assert (tmp_path / "docs" / "results" / "finetune" / "curves_synthetic.png").exists()
    assert "![synthetic](finetune/curves_synthetic.png)" in page


def test_a_run_from_before_an_added_key_compares_as_its_old_behaviour() -> None:
    from omegaconf import OmegaConf

    from fedscan.common.commands.report import compared_config
    from fedscan.common.core.config import load_config

    now = load_config(["dataset=synthetic"])
    before = OmegaConf.to_container(now, resolve=True)
    del before["train"]["loss"]  # a config.yaml written before train.loss existed
    assert compared_config(OmegaConf.create(before)) == compared_config(now)
    other = load_config(["dataset=synthetic", "train.loss=balanced_softmax"])
    assert compared_config(other) != compared_config(now)
    del before["federation"]["head_refit"]  # ... and before federation.head_refit
    assert compared_config(OmegaConf.create(before)) == compared_config(now)
    # ... and before dataset.label_smoothing: the effective train.label_smoothing is
    # what is compared, so a study's old cells (no smoothing) match its pinned runs
    del before["dataset"]["label_smoothing"]
    assert compared_config(OmegaConf.create(before)) == compared_config(now)
    smoothed = load_config(["dataset=synthetic", "train.label_smoothing=0.1"])
    assert compared_config(smoothed) != compared_config(now)


def test_a_run_folder_from_before_an_added_key_reads_with_its_old_value(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from fedscan.common.core.config import load_config
    from fedscan.common.runs.record import _header, read_run, write_json

    old = OmegaConf.to_container(load_config(["dataset=synthetic", "rounds=3"]), resolve=True)
    del old["federation"]["head_refit"]
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    header = _header("federated", label="old", synthetic=True, dataset="synthetic")
    write_json(tmp_path / "metrics.json", {**header, "rounds": []})
    rec = read_run(tmp_path)
    assert rec.head_refit == "none" and rec.cfg.federation.head_refit == "none"
    assert rec.epoch_budget == 3 * int(old["federation"]["local_epochs"])


def test_drivers_pin_the_image_size_and_smoothing_their_pages_were_measured_at() -> None:
    from fedscan.simulations.harness import (
        PAGES_IMAGE_SIZE,
        PAGES_LABEL_SMOOTHING,
        driver_args,
        smoothing_text,
    )

    def parse(argv: list[str]) -> argparse.Namespace:
        return driver_args(argparse.ArgumentParser(), argv, out="o", docs=Path("d.md"))

    smoothing = f"train.label_smoothing={PAGES_LABEL_SMOOTHING}"
    flips = "train.cached_flips=false"
    pinned = parse(["seed=1"])
    size = f"dataset.image_size={PAGES_IMAGE_SIZE}"
    assert pinned.overrides == [size, smoothing, flips, "seed=1"]
    assert pinned.typed == ["seed=1"]  # what a page's regenerate command shows
    assert smoothing_text(pinned) == "no label smoothing"
    assert parse(["--image-size", "160"]).overrides == ["dataset.image_size=160", smoothing, flips]
    # an override typed after the driver's options wins over its pin
    typed = parse(["dataset.image_size=32", "train.label_smoothing=0.1"])
    assert typed.overrides == ["dataset.image_size=32", "train.label_smoothing=0.1", flips]
    assert typed.image_size == 32 and smoothing_text(typed) == "label smoothing 0.1"
    flipped = parse(["train.cached_flips=true"])
    assert flipped.overrides == [size, smoothing, "train.cached_flips=true"]
    assert smoothing_text(flipped) == "no label smoothing, left/right flips of the cached prefix"

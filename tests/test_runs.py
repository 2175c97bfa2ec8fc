"""The run-folder contract: every kind of run is written and read through one module,
and a folder of another shape is refused with a message, never guessed at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedscan.common.core.config import load_config
from fedscan.common.core.errors import DataError
from fedscan.common.runs.record import (
    VERSION,
    FederatedRun,
    new_run_dir,
    read_run,
    write_centralised,
    write_config,
    write_local,
)
from tests.conftest import split_metrics

pytestmark = pytest.mark.usefixtures("_no_real_data")


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(["dataset=synthetic", f"runs_dir={tmp_path}", *overrides])


def test_centralised_run_reads_back_with_its_kind_and_splits(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "seed=3")
    run_dir = new_run_dir(cfg, "pooled")
    write_config(run_dir, cfg)
    write_centralised(
        run_dir,
        kind="pooled",
        label="SYNTHETIC",
        synthetic=True,
        dataset="synthetic",
        history=[{"epoch": 1}],
        final={"val": split_metrics(0.5), "test_grouped": split_metrics(0.9)},
    )
    run = read_run(run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["version"] == VERSION
    assert (run.kind, run.method, run.partition, run.seed) == ("pooled", "pooled", "-", 3)
    assert list(run.final()) == ["test_grouped"]  # the validation split is not a test
    assert run.synthetic and run.history == [{"epoch": 1}]
    with pytest.raises(DataError, match="nothing to export"):
        run.checkpoint()


def test_federated_run_reads_strategy_parameters_from_its_config(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "strategy=fedprox",
        "strategy.mu=0.1",
        "partition=dirichlet",
        "partition.alpha=0.3",
        "rounds=4",
        "federation.local_epochs=2",
    )
    run_dir = new_run_dir(cfg, "federated")
    fed = FederatedRun(run_dir, cfg, label="L", synthetic=False, classes=["a", "b"])
    fed.record(1, {}, {"train": [], "evaluate": []})
    rows = [{"num-examples": 30, "val_accuracy": 0.5}, {"num-examples": 10, "val_accuracy": 1.0}]
    fed.record(2, {"test_grouped": split_metrics(0.8)}, {"train": [], "evaluate": rows})
    fed.checkpoint(2, {"w": torch.zeros(1)}, {}, best=True)
    run = read_run(run_dir)
    assert run.kind == "federated" and run.method == "fedprox(mu=0.1)"
    assert run.strategy_params == {"mu": 0.1}
    assert run.partition == "dirichlet(alpha=0.3)"
    assert run.epoch_budget == 8
    assert [r["round"] for r in run.evaluated_rounds] == [2]
    assert run.final()["test_grouped"]["accuracy"] == 0.8
    assert run.mean_site_val_accuracy() == pytest.approx((0.5 * 30 + 1.0 * 10) / 40)
    assert run.checkpoint().name == "best.pt"


def _val(acc: float, f1: float, loss: float, n: int = 10) -> dict:
    return {"num-examples": n, "val_accuracy": acc, "val_macro_f1": f1, "val_loss": loss}


@pytest.mark.parametrize(("metric", "best_round"), [("val_macro_f1", 2), ("val_loss", 3)])
def test_best_pt_is_chosen_on_the_sites_validation_never_on_a_test_split(
    tmp_path: Path, metric: str, best_round: int
) -> None:
    """Round 3 has the best test accuracy and worse validation F1: F1 picks round 2;
    the loss (lower is better) picks round 3. Sites are example-weighted."""
    cfg = _cfg(tmp_path, "rounds=3", f"federation.best_metric={metric}")
    fed = FederatedRun(
        new_run_dir(cfg, "federated"), cfg, label="L", synthetic=False, classes=["a"]
    )
    rounds = {
        1: ([_val(0.6, 0.6, 0.9)], 0.70),
        # weighted F1 (0.9 * 30 + 0.5 * 10) / 40 = 0.8; unweighted it would be 0.7
        2: ([_val(0.9, 0.9, 0.5, n=30), _val(0.5, 0.5, 0.5)], 0.75),
        3: ([_val(0.7, 0.75, 0.2, n=30), _val(0.7, 0.75, 0.2)], 0.99),
    }
    picked = []
    for rnd, (rows, test) in rounds.items():
        sites = {"train": [], "evaluate": rows}
        fed.record(rnd, {"test_grouped": split_metrics(test)}, sites)
        if fed.is_best(rnd, sites):
            picked.append(rnd)
    assert picked[-1] == best_round
    doc = json.loads((fed.dir / "metrics.json").read_text())
    assert doc["best"]["round"] == best_round and doc["best"]["metric"] == metric
    if metric == "val_macro_f1":
        assert picked == [1, 2] and doc["best"]["score"] == pytest.approx(0.8)
    # a round the sites did not evaluate is never best, whatever its test score
    assert not fed.is_best(4, {"train": [], "evaluate": []})


def test_best_pt_is_chosen_by_default_on_the_pooled_validation_accuracy_and_says_so(
    tmp_path: Path, caplog
) -> None:
    """The default best_metric is the sites' validation accuracy weighted by their sizes:
    the accuracy over all their validation images, a figure a reader can set beside the
    test accuracy; the log line names it and how many images and sites it rests on."""
    import logging

    cfg = _cfg(tmp_path, "rounds=1")
    assert cfg.federation.best_metric == "val_accuracy"
    run_dir = new_run_dir(cfg, "federated")
    fed = FederatedRun(run_dir, cfg, label="L", synthetic=False, classes=["glioma", "notumor"])
    sites = {"train": [], "evaluate": [_val(0.9, 0.9, 0.5, n=30), _val(0.5, 0.6, 0.5)]}
    fed.record(1, {"test_grouped": split_metrics(0.75)}, sites)
    assert fed.is_best(1, sites)
    with caplog.at_level(logging.INFO, logger="fedscan.run"):
        fed.finish()
    assert (
        "best.pt: round 1, chosen on the sites' pooled validation accuracy 0.8000 "
        "(val_accuracy over 40 images at 2 sites); its test accuracy: test_grouped 0.7500"
    ) in caplog.text
    doc = json.loads((fed.dir / "metrics.json").read_text())
    assert doc["best"] == {
        "round": 1,
        "metric": "val_accuracy",
        "score": pytest.approx(0.8),
        "images": 40,
        "sites": 2,
    }


def test_an_interrupted_best_pt_write_leaves_the_previous_best_pt_intact(
    tmp_path: Path, monkeypatch
) -> None:
    """``best.pt`` is what ``fedscan export`` ships: a write killed half-way (here: torch
    writes half the bytes, then the process "dies") must leave the round-1 file whole,
    as ``last.pt`` always was, and no temporary file behind."""
    cfg = _cfg(tmp_path, "rounds=3")
    fed = FederatedRun(
        new_run_dir(cfg, "federated"), cfg, label="L", synthetic=False, classes=["a"]
    )
    fed.checkpoint(1, {"w": torch.full((4,), 1.0)}, {}, best=True)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        if Path(f).name.startswith("best.pt"):
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as fh:  # what a killed writer leaves: the first half
                fh.truncate(Path(f).stat().st_size // 2)
            raise KeyboardInterrupt("killed while writing best.pt")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        fed.checkpoint(2, {"w": torch.full((4,), 2.0)}, {}, best=True)
    monkeypatch.setattr(torch, "save", real_save)
    best = torch.load(fed.dir / "best.pt", weights_only=False)
    assert best["round"] == 1 and torch.equal(best["arrays"]["w"], torch.full((4,), 1.0))
    assert torch.load(fed.dir / "last.pt", weights_only=False)["round"] == 2  # written first
    assert sorted(p.name for p in fed.dir.glob("*.tmp")) == []


def test_a_test_metric_cannot_pick_best_pt(tmp_path: Path) -> None:
    from fedscan.common.core.errors import ConfigError
    from fedscan.common.federated.settings import federation_settings

    with pytest.raises(ConfigError, match=r"federation\.best_metric.*a test split no longer"):
        federation_settings(_cfg(tmp_path, "federation.best_metric=accuracy"))


def test_local_run_is_refused_for_export_with_the_reason(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run_dir = new_run_dir(cfg, "local")
    write_config(run_dir, cfg)
    sites = [{"partition-id": 0, "n_train": 5, "final": {"test_grouped": split_metrics(0.7)}}]
    write_local(run_dir, label="L", synthetic=True, dataset="synthetic", sites=sites)
    run = read_run(run_dir)
    assert run.kind == "local" and run.sites == sites
    with pytest.raises(DataError, match="local-only baseline keeps no shared model"):
        run.checkpoint()
    with pytest.raises(DataError, match="a local run has no such record"):
        run.final()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"label": "old", "rounds": []}, "no format version: written by an older fedscan"),
        ({"version": VERSION + 1, "kind": "federated"}, f"format version {VERSION + 1}"),
        ({"version": VERSION, "kind": "magic"}, "unknown run kind 'magic'"),
    ],
)
def test_a_folder_of_another_shape_is_refused(tmp_path: Path, doc: dict, message: str) -> None:
    write_config(tmp_path, _cfg(tmp_path))
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message):
        read_run(tmp_path)


def test_a_folder_without_metrics_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a fedscan run folder"):
        read_run(tmp_path)
    write_config(tmp_path, _cfg(tmp_path))
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match=r"metrics\.json: unreadable metrics"):
        read_run(tmp_path)


@pytest.mark.parametrize(
    ("kind", "overrides", "method"),
    [
        ("federated", [], "fedavg"),
        ("federated", ["federation.head_init=fed3r", "rounds=0"], "fed3r one-shot"),
        ("federated", ["federation.head_init=fed3r"], "fed3r+fedavg"),
        (
            "federated",
            ["federation.head_init=fed3r", "federation.head_freeze=true"],
            "fed3r_frozen+fedavg",
        ),
        ("federated", ["federation.head_freeze=true"], "fedavg+fedbabu"),
        ("federated", ["federation.freeze_bn_from=3"], "fedavg+fixbn(3)"),
        ("federated", ["remedy=fedbn"], "fedavg+fedbn"),
        ("federated", ["remedy=balanced_softmax"], "fedavg+balanced_softmax"),
        ("federated", ["recipe=skew"], "fedavg+refit(bn,fed3r)"),
        ("local", ["remedy=fixbn"], "local"),  # FixBN is federated only
        ("pooled", ["federation.head_init=fed3r", "rounds=0"], "pooled+fed3r"),
        ("pooled", ["federation.head_init=fed3r"], "pooled+fed3r+ft"),
        ("local", [], "local"),
    ],
)
def test_unlike_runs_get_unlike_method_labels(
    tmp_path: Path, kind: str, overrides: list[str], method: str
) -> None:
    """The report groups rows by this label: runs that differ must not share one."""
    from fedscan.common.runs.record import RunRecord

    record = RunRecord(dir=tmp_path, kind=kind, cfg=_cfg(tmp_path, *overrides), doc={})
    assert record.method == method


def _pooled_run(tmp_path: Path, name: str, seed: int, **old_keys: object) -> Path:
    """A pooled run folder; ``old_keys`` (``freeze_bn=False``) are written into its
    ``model`` section as a fedscan that still had them wrote it, and the keys added
    since then are taken out."""
    cfg = _cfg(tmp_path, f"seed={seed}", f"run_name={name}")
    run_dir = new_run_dir(cfg, "pooled")
    write_config(run_dir, cfg)
    if old_keys:
        saved = OmegaConf.load(run_dir / "config.yaml")
        saved.model.update(old_keys)
        del saved.model["head_ridge"], saved["recipe"]
        OmegaConf.save(saved, run_dir / "config.yaml")
    final = {"val": split_metrics(0.5), "test_grouped": split_metrics(0.8 + seed / 100)}
    write_centralised(
        run_dir,
        kind="pooled",
        label="L",
        synthetic=True,
        dataset="synthetic",
        history=[],
        final=final,
    )
    return run_dir


def test_old_run_folders_with_removed_keys_still_read_and_compare(tmp_path: Path) -> None:
    """A folder from before model.freeze_bn was removed (REMOVED) reads as a run of today
    when it held today's behaviour (false), and `fedscan report` averages it with a new
    run; one that held the removed setting (true) keeps it, in a row of its own."""
    from fedscan.common.commands.report import aggregate, load_run

    old = _pooled_run(tmp_path, "old", 0, freeze_bn=False)
    new = _pooled_run(tmp_path, "new", 1)
    frozen = _pooled_run(tmp_path, "frozen", 2, freeze_bn=True)
    assert "freeze_bn" in OmegaConf.load(old / "config.yaml").model
    assert "freeze_bn" not in read_run(old).cfg.model
    assert read_run(frozen).cfg.model.freeze_bn is True
    rows = [
        r
        for d in (old, new, frozen)
        for r in load_run(d, figures="last")
        if r["split"] == "test_grouped"
    ]
    table = {r["method"]: r for r in aggregate(rows)}
    assert sorted(table) == ["pooled [model.freeze_bn=-]", "pooled [model.freeze_bn=True]"]
    assert table["pooled [model.freeze_bn=-]"]["seeds"] == 2


def test_a_dp_sgd_folder_from_before_privacy_batchnorm_reads_as_the_groupnorm_route(
    tmp_path: Path,
) -> None:
    """privacy.batchnorm (and the model's copy) are added only to folders that chose
    privacy=dp_sgd, at the route DP-SGD had before the key (GroupNorm); a non-private
    folder gains no privacy key (privacy=central would refuse an unknown one)."""
    private = _cfg(tmp_path, "privacy=dp_sgd", "run_name=dp")
    plain = _cfg(tmp_path, "run_name=plain")
    dirs = []
    for cfg in (private, plain):
        run_dir = new_run_dir(cfg, "pooled")
        write_config(run_dir, cfg)
        saved = OmegaConf.load(run_dir / "config.yaml")
        saved.privacy.pop("batchnorm", None)
        saved.model.pop("dp_batchnorm", None)
        OmegaConf.save(saved, run_dir / "config.yaml")
        final = {"val": split_metrics(0.5), "test_grouped": split_metrics(0.8)}
        write_centralised(
            run_dir, kind="pooled", label="L", synthetic=True, dataset="synthetic",
            history=[], final=final,
        )  # fmt: skip
        dirs.append(run_dir)
    old_dp, old_plain = (read_run(d).cfg for d in dirs)
    assert old_dp.privacy.batchnorm == "group" and old_dp.model.dp_batchnorm == "group"
    assert "batchnorm" not in old_plain.privacy and "dp_batchnorm" not in old_plain.model

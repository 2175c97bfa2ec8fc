"""Experiment tracking: runs mirrored into a real local MLflow store, read back with
MlflowClient; a tracking failure never costs the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedscan.common.core.config import load_config
from fedscan.common.core.errors import ConfigError
from fedscan.common.runs.tracking import LINK, site_scalars, split_scalars, start_tracking
from fedscan.common.runs.validate import validate
from fedscan.simulations.federated import run_federated
from fedscan.simulations.harness import sweep_experiment
from tests.conftest import SIM_BASE

BASE = ["dataset=synthetic", *SIM_BASE, "tracking=mlflow"]


def _client(runs: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{runs / '.mlflow' / 'mlflow.db'}")


def test_a_two_round_simulation_is_read_back_from_the_local_mlflow_store(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run_dir = run_federated([*BASE, "rounds=2", f"runs_dir={runs}"])
    client = _client(runs)
    experiment = client.get_experiment_by_name("fedscan")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_dir.name
    assert run.data.tags["fedscan.kind"] == "federated"
    # params: the flattened resolved config
    params = run.data.params
    assert params["strategy.name"] == "fedavg"
    assert params["federation.rounds"] == "2"
    assert params["dataset.name"] == "synthetic"
    # one point per round of the global test metrics, with interval ends
    split = next(iter(json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["global"]))
    history = client.get_metric_history(run.info.run_id, f"{split}/accuracy")
    assert [m.step for m in history] == [1, 2]
    last = json.loads((run_dir / "metrics.json").read_text())["rounds"][-1]["global"][split]
    assert history[-1].value == pytest.approx(last["accuracy"])
    assert run.data.metrics[f"{split}/accuracy/ci_low"] <= last["accuracy"]
    # every site's reply metrics under its own key
    for site in (0, 1):
        assert f"site{site}/train/train_loss" in run.data.metrics
        assert f"site{site}/evaluate/val_accuracy" in run.data.metrics
        steps = client.get_metric_history(run.info.run_id, f"site{site}/train/train_loss")
        assert [m.step for m in steps] == [1, 2]
    # the run folder's records and plots as artifacts, not its checkpoints
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "curves.png"} <= artifacts
    assert not any(a.endswith(".pt") for a in artifacts)
    assert (runs / ".mlflow" / "artifacts").is_dir()  # beside the store, not in the cwd


def test_an_unreachable_tracking_server_costs_a_warning_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "runs"
    uri = "http://127.0.0.1:9"  # the discard port: nothing answers
    with caplog.at_level(logging.WARNING, logger="fedscan.tracking"):
        run_dir = run_federated([*BASE, "rounds=1", f"runs_dir={runs}", f"tracking.uri={uri}"])
    assert (run_dir / "metrics.json").exists() and (run_dir / "last.pt").exists()
    warned = [r.getMessage() for r in caplog.records if r.name == "fedscan.tracking"]
    assert any(f"tracking.uri={uri}" in m and "not tracked" in m for m in warned), warned
    assert not (runs / ".mlflow").exists()


def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path) -> None:
    cfg = load_config([*BASE, f"runs_dir={tmp_path}"])
    run_dir = tmp_path / "some-run"
    run_dir.mkdir()
    first = start_tracking(cfg, run_dir, kind="federated")
    first.log_metrics({"x": 1.0}, 1)
    first.finish(run_dir, failed=True)
    again = start_tracking(cfg, run_dir, kind="federated")
    assert again.run_id == first.run_id
    again.log_metrics({"x": 2.0}, 2)
    again.finish(run_dir)
    client = _client(tmp_path)
    assert [m.value for m in client.get_metric_history(first.run_id, "x")] == [1.0, 2.0]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert json.loads((run_dir / LINK).read_text())["run_id"] == first.run_id


def test_tracking_none_writes_no_store(tmp_path: Path) -> None:
    cfg = load_config([*BASE, f"runs_dir={tmp_path}", "tracking=none"])
    tracker = start_tracking(cfg, tmp_path, kind="federated")
    assert not tracker.active
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.finish(tmp_path)
    assert not (tmp_path / ".mlflow").exists()


def test_an_unknown_tracking_backend_names_the_key() -> None:
    cfg = load_config([*BASE, "tracking.name=wandb"])
    with pytest.raises(ConfigError, match="tracking"):
        validate(cfg, "federated")


def test_a_sweep_is_one_experiment() -> None:
    runs = [[*BASE, "seed=0"], [*BASE, "seed=1"]]
    swept = sweep_experiment(runs)
    names = {next(o for o in r if o.startswith("tracking.experiment=")) for r in swept}
    assert len(names) == 1 and names.pop().startswith("tracking.experiment=sweep-")
    mine = [[*r, "tracking.experiment=mine"] for r in runs]
    assert sweep_experiment(mine) == mine
    off = [[*r, "tracking=none"] for r in runs]
    assert sweep_experiment(off) == off


def test_metric_keys_follow_the_metrics_json() -> None:
    tests = {
        "test_scan_grouped": {
            "n": 40,
            "accuracy": 0.75,
            "per_class": {"benign": {"recall": 0.5, "f1": 0.4}},
            "confusion_matrix": [[1, 0], [0, 1]],
            "ci": {
                "method": "percentile",
                "resamples": 1000,
                "accuracy": [0.6, 0.9],
                "recall": {"benign": [0.0, 1.0]},
            },
            "per_scan": {"accuracy": 0.8, "ci": {"accuracy": [0.5, 1.0]}},
        }
    }
    assert split_scalars(tests) == {
        "test_scan_grouped/n": 40.0,
        "test_scan_grouped/accuracy": 0.75,
        "test_scan_grouped/recall/benign": 0.5,
        "test_scan_grouped/f1/benign": 0.4,
        "test_scan_grouped/accuracy/ci_low": 0.6,
        "test_scan_grouped/accuracy/ci_high": 0.9,
        "test_scan_grouped/recall/benign/ci_low": 0.0,
        "test_scan_grouped/recall/benign/ci_high": 1.0,
        "test_scan_grouped/per_scan/accuracy": 0.8,
        "test_scan_grouped/per_scan/accuracy/ci_low": 0.5,
        "test_scan_grouped/per_scan/accuracy/ci_high": 1.0,
    }
    sites = {"train": [{"partition-id": 3, "node_id": 99, "train_loss": 0.5, "note": "x"}]}
    assert site_scalars(sites) == {"site3/train/train_loss": 0.5}


def test_a_centralised_run_is_mirrored_epoch_by_epoch(tmp_path: Path, monkeypatch) -> None:
    from fedscan.simulations.cli import main

    monkeypatch.delenv("FEDSCAN_DATA", raising=False)
    runs = tmp_path / "runs"
    code = main(
        [
            "train",
            f"runs_dir={runs}",
            "model=paper_cnn",
            "dataset.image_size=32",
            "dataset.size=32",
            "dataset.per_class=16",
            "train.epochs=2",
        ]
    )
    assert code == 0
    client = _client(runs)
    (run,) = client.search_runs([client.get_experiment_by_name("fedscan").experiment_id])
    assert run.data.tags["fedscan.kind"] == "centralised"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert "test_grouped/accuracy/ci_high" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.json" in artifacts and "model.pt" not in artifacts


def test_a_local_baseline_is_mirrored_site_by_site(tmp_path: Path) -> None:
    from fedscan.simulations.harness import run_one

    runs = tmp_path / "runs"
    run_one([*BASE, "method=local", "rounds=1", f"runs_dir={runs}"])
    client = _client(runs)
    (run,) = client.search_runs([client.get_experiment_by_name("fedscan").experiment_id])
    assert run.data.tags["fedscan.kind"] == "local"
    assert {"site0/test_grouped/accuracy", "site1/test_grouped/accuracy"} <= set(run.data.metrics)


def test_opening_the_store_changes_no_logger_and_no_warning_filter(tmp_path: Path) -> None:
    """The store's Alembic lines and SQLAlchemy warning are quieted by the entry points
    and a scoped filter, not by the library changing the process's logging."""
    import warnings

    names = ("alembic", "mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:  # a level of the caller's own, which the library must leave
        logging.getLogger(n).setLevel(5)
    filters = list(warnings.filters)
    try:
        cfg = load_config([*BASE, f"runs_dir={tmp_path}"])
        tracker = start_tracking(cfg, tmp_path, kind="federated")
        assert tracker.active
        tracker.finish(tmp_path)
        assert {n: logging.getLogger(n).level for n in names} == dict.fromkeys(names, 5)
        assert list(warnings.filters) == filters
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)

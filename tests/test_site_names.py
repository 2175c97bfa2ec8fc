"""A site is named stably everywhere: its partition in simulation; in deployment its
``site-name`` node config, else the node id the SuperLink assigned. Before, every
deployed site reported partition-id -1 and MLflow kept one ``site-1`` of them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.datasets.synthetic import generate
from fedscan.common.federated.privacy import PrivacyLedger
from fedscan.common.federated.site_names import check_site_name, site_key, site_label
from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE

pytestmark = pytest.mark.usefixtures("_no_real_data")


def deployed(folders: dict[int, Path], names: dict[int, str]):
    """An outermost site mod that turns simulated node ``i`` into a deployed site, as
    ``flower-supernode --node-config 'data-path=... [site-name=...]'`` makes one: its
    own folder, no partition."""

    def mod(msg, context, call_next):
        pid = context.node_config.get("partition-id")
        if pid is not None:  # first message: this node becomes site `pid`'s hospital
            node = {"data-path": str(folders[int(pid)])}
            if names.get(int(pid)):
                node["site-name"] = names[int(pid)]
            context.node_config = node
        return call_next(msg, context)

    return mod


def test_two_deployed_sites_get_two_names_everywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folders = {
        i: generate(tmp_path / f"hospital-{i}", "brain_mri", per_class=12, size=32, seed=20 + i)
        for i in (0, 1)
    }
    runs = tmp_path / "runs"
    overrides = [
        *SIM_BASE,
        "tracking=mlflow",  # the MLflow keys are part of what is checked
        "dataset=synthetic",
        "rounds=1",
        "privacy=dp_sgd",
        f"runs_dir={runs}",
    ]
    with caplog.at_level(logging.INFO, logger="fedscan"):
        run_dir = run_federated(overrides, client_mods=[deployed(folders, {0: "hospital-a"})])
    (row,) = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    train, evaluate = row["sites"]["train"], row["sites"]["evaluate"]
    assert [r["partition-id"] for r in train] == [-1, -1]  # deployed: no partition
    node = next(r["node_id"] for r in train if "site-name" not in r)
    names = {"hospital-a", f"node {node}"}
    # metrics.json: two rows per phase, each site under its own name
    assert {site_label(r) for r in train} == {site_label(r) for r in evaluate} == names
    # MLflow: two keys, each with its own site's value
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / '.mlflow' / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("fedscan").experiment_id])
    for r in train:
        key = f"{site_key(r)}/train/dp_epsilon"
        assert mlrun.data.metrics[key] == pytest.approx(r["dp_epsilon"]), key
    assert {"hospital-a/evaluate/val_accuracy", f"node{node}/evaluate/val_accuracy"} <= set(
        mlrun.data.metrics
    )
    # the privacy ledger: each hospital's own account, in its own folder, and the log
    # lines of its accounting and training under its name
    for pid, folder in folders.items():
        ledger = PrivacyLedger.load(folder / ".fedscan-privacy" / f"{run_dir.name}.json", "rdp")
        mine = next(r for r in train if (r.get("site-name") == "hospital-a") == (pid == 0))
        assert ledger.epsilon(mine["dp_delta"]) == pytest.approx(mine["dp_epsilon"])
    for name in names:
        assert f"{name}, round 1: training on" in caplog.text, name
    # the partition report and the cross-site matrix: two rows, two columns
    partition = (run_dir / "partition.csv").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in partition[1:]) == sorted(names)
    cross = json.loads((run_dir / "metrics.json").read_text())["cross_site"]["data"]
    assert sorted(cross[:2]) == sorted(f"{n} val" for n in names)


def test_a_site_name_is_checked_where_it_is_set() -> None:
    assert check_site_name("hospital-a.north_2") == "hospital-a.north_2"
    assert check_site_name("") is None and check_site_name(None) is None
    for bad in ("site 0", "a/b", "-lead", "x" * 65):
        with pytest.raises(ConfigError) as err:
            check_site_name(bad)
        assert err.value.key == "site-name"
    assert site_label({"partition-id": 3, "node_id": 9}) == "site 3"  # simulation: partition
    assert site_key({"partition-id": 3}) == "site3"  # MLflow keys as before
    assert site_label({"partition-id": -1, "node_id": 9, "site-name": "h"}) == "h"
    assert site_label({"partition-id": -1, "node_id": 9}) == "node 9"

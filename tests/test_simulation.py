"""Federations on the embedded synthetic default, in-process (Ray), end to end."""

import json
from pathlib import Path

import pytest
import torch

from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE as BASE

pytestmark = pytest.mark.usefixtures("_no_real_data")


def test_two_round_simulation_writes_per_site_metrics(tmp_path: Path):
    run = run_federated(
        [*BASE, f"runs_dir={tmp_path}", "federation.rounds=2", "federation.evaluate_every=2"]
    )
    m = json.loads((run / "metrics.json").read_text())
    assert "SYNTHETIC" in m["label"]
    assert [r["round"] for r in m["rounds"]] == [1, 2]
    assert m["rounds"][0]["global"] == {}  # evaluate_every=2: the server skipped round 1
    assert m["rounds"][0]["sites"]["train"]  # ... but still recorded every site
    last = m["rounds"][-1]
    g = last["global"]["test_grouped"]
    for key in ("loss", "accuracy", "macro_f1", "per_class"):
        assert key in g
    sites = last["sites"]["train"]
    assert sorted(s["partition-id"] for s in sites) == [0, 1]
    assert all(s["num-examples"] > 0 and "val_recall_glioma" in s for s in sites)
    for name in ("config.yaml", "curves.png", "confusion_matrix.png", "last.pt", "best.pt"):
        assert (run / name).exists(), name
    assert g["ci"]["accuracy"][0] <= g["accuracy"] <= g["ci"]["accuracy"][1]
    # cross-site: the global model on each site's validation split, then the test
    cross = m["cross_site"]
    assert cross["models"] == ["global model"]
    assert cross["data"] == ["site 0 val", "site 1 val", "test_grouped"]
    by_site = {e["partition-id"]: e["val_accuracy"] for e in last["sites"]["evaluate"]}
    assert cross["accuracy"][0] == [by_site[0], by_site[1], g["accuracy"]]
    assert (run / "cross_site.png").stat().st_size > 0


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, strategy: str):
    """FedAdam: its moments come back from last.pt, and round 2 is round 2 to it after
    the resume too (its bias correction depends on the round number)."""
    base = [*BASE, f"strategy={strategy}"]
    full = run_federated([*base, f"runs_dir={tmp_path / 'a'}", "federation.rounds=2"])
    part = run_federated([*base, f"runs_dir={tmp_path / 'b'}", "federation.rounds=1"])
    assert torch.load(part / "last.pt", weights_only=False)["round"] == 1
    resumed = run_federated(
        [*base, f"runs_dir={tmp_path / 'b'}", "federation.rounds=2", f"federation.resume={part}"]
    )
    assert resumed == part
    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["round"] == b["round"] == 2
    for k in a["arrays"]:
        torch.testing.assert_close(a["arrays"][k], b["arrays"][k], rtol=0, atol=1e-6)
    rounds = json.loads((resumed / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]


def test_more_min_nodes_than_sites_is_refused(tmp_path: Path):
    from fedscan.common.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"federation\.min_nodes"):
        run_federated([*BASE, f"runs_dir={tmp_path}", "federation.min_nodes=3"])


def test_a_small_simulation_logs_nothing_from_third_party_noise(tmp_path: Path) -> None:
    """No alembic plugin lines, no Flower deprecation, no Ray FutureWarning, no sklearn
    warnings from the sites: what a user reads is fedscan's progress and results.

    Three sites of this small set hold 6 images of some class, fewer than the 7 folds
    of a site's 15 % validation holdout: the case where scikit-learn warns "The least
    populated class in y has only 6 members" (two sites never reach it)."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FEDSCAN_DATA"}
    base = [o for o in BASE if not o.startswith("federation.num_sites=")]
    cmd = [sys.executable, "-m", "fedscan", "simulate", *base, "num_sites=3", "rounds=2"]
    out = subprocess.run(
        [*cmd, f"runs_dir={tmp_path}"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for noise in (
        "setup plugin",
        "DEPRECATED FEATURE",
        "FutureWarning",
        "UndefinedMetricWarning",
        "y_pred contains classes not in y_true",
        "least populated class",
    ):
        assert noise not in text, noise
    # any other library warning: "<site-packages path>:<line>: SomeWarning: ..."
    leaked = re.findall(r"site-packages/\S+:\d+: \w*Warning: .*", text)
    assert not leaked, leaked
    assert "results:" in text

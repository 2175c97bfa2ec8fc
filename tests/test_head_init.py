"""The one-shot head from the sites' feature statistics (Fed3R, FedNCM): exact for any
partition, and run end to end as a statistics round before round 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.partition import PARTITIONERS, Groups
from fedscan.common.federated.head_init import (
    classifier_features,
    linear_head,
    set_head,
    site_statistics,
    solve_head,
    sum_statistics,
)
from fedscan.common.learn.models import build_model
from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE

C, D = 4, 6


def _pooled_ridge(phi: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference: ridge regression on the concatenated features, solved another way
    (least squares on the augmented system [Phi 1; sqrt(lam) I] W = [Y; 0])."""
    phi1 = np.hstack([phi, np.ones((len(phi), 1))])
    a = np.vstack([phi1, np.sqrt(lam) * np.eye(phi1.shape[1])])
    b = np.vstack([np.eye(C)[y], np.zeros((phi1.shape[1], C))])
    wb = np.linalg.lstsq(a, b, rcond=None)[0]
    return wb[:-1].T, wb[-1]


def _split(n: int, labels: np.ndarray, sites: int, partition: str, seed: int) -> list[np.ndarray]:
    """Site index sets from fedscan's own partitioners (singleton groups)."""
    rng = np.random.default_rng(seed)
    groups = Groups.of(np.arange(n), np.arange(n), labels)
    params = {
        "iid": {},
        "dirichlet": {"alpha": 0.1},
        "pathological": {"classes_per_site": -(-groups.num_classes // sites)},
        "quantity": {"alpha": 0.5},
    }[partition]
    owner = PARTITIONERS.get(partition)(groups, sites, rng, **params)
    return [np.flatnonzero(owner == s) for s in range(sites)]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 120),
    sites=st.integers(1, 6),
    partition=st.sampled_from(["iid", "dirichlet", "pathological", "quantity"]),
    seed=st.integers(0, 10_000),
    lam=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
)
def test_federated_heads_equal_the_pooled_heads_for_any_partition(
    n: int, sites: int, partition: str, seed: int, lam: float
) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    phi = rng.normal(size=(n, D)) + labels[:, None] * 0.5
    parts = _split(n, labels, sites, partition, seed)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))

    fed3r = sum_statistics([site_statistics("fed3r", phi[p], labels[p], C) for p in parts])
    w, b = solve_head("fed3r", fed3r, ridge=lam)
    w_ref, b_ref = _pooled_ridge(phi, labels, lam)
    assert np.abs(w - w_ref).max() < 1e-6 and np.abs(b - b_ref).max() < 1e-6

    ncm = sum_statistics([site_statistics("fedncm", phi[p], labels[p], C) for p in parts])
    w, b = solve_head("fedncm", ncm, ridge=lam)
    for c in range(C):
        if (labels == c).any():
            mean = phi[labels == c].mean(0)
            assert np.abs(w[c] - mean / np.linalg.norm(mean)).max() < 1e-6
        else:
            assert not w[c].any()
    assert not b.any()


def test_statistics_hold_sums_not_rows() -> None:
    phi = np.arange(12.0).reshape(4, 3)
    stats = site_statistics("fed3r", phi, np.array([0, 1, 1, 3]), C)
    assert stats["gram"].shape == (D - 2, D - 2) and stats["cross"].shape == (D - 2, C)
    assert stats["gram"][-1, -1] == 4  # the bias column's count
    ncm = site_statistics("fedncm", phi, np.array([0, 1, 1, 3]), C)
    assert ncm["class_counts"].tolist() == [1, 2, 0, 1]
    assert ncm["class_sums"][1].tolist() == (phi[1] + phi[2]).tolist()


def test_bad_inputs_are_refused() -> None:
    good = site_statistics("fed3r", np.ones((3, 2)), np.array([0, 1, 2]), C)
    with pytest.raises(ConfigError, match=r"federation\.head_ridge"):
        solve_head("fed3r", good, ridge=0.0)
    bad = {**good, "gram": np.full_like(good["gram"], np.nan)}
    with pytest.raises(Exception, match="NaN"):
        sum_statistics([good, bad])
    with pytest.raises(Exception, match="keys"):
        sum_statistics([good, {"gram": good["gram"]}])


def test_models_expose_their_linear_head() -> None:
    for name, mode in (("paper_cnn", "scratch"), ("efficientnet_lite0", "features")):
        head = linear_head(build_model({"name": name, "mode": mode}, 3))
        assert isinstance(head, torch.nn.Linear) and head.out_features == 3


def test_head_scale_sharpens_the_softmax_and_keeps_every_prediction() -> None:
    rng = np.random.default_rng(0)
    phi, y = rng.normal(size=(40, 8)), rng.integers(0, 3, 40)
    w, b = solve_head("fed3r", site_statistics("fed3r", phi, y, 3), ridge=1.0)
    x = torch.from_numpy(phi)
    logits = {}
    for scale in (1.0, 10.0):
        lin = torch.nn.Linear(8, 3).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(scale * w))
            lin.bias.copy_(torch.from_numpy(scale * b))
        logits[scale] = lin(x).detach()
    assert torch.equal(logits[1.0].argmax(1), logits[10.0].argmax(1))
    assert torch.allclose(logits[10.0], 10 * logits[1.0])
    # set_head writes exactly that into the model, and refuses a non-positive scale
    model = build_model({"name": "efficientnet_lite0", "mode": "features"}, 3)
    feat = linear_head(model).in_features
    w2, b2 = rng.normal(size=(3, feat)), rng.normal(size=3)
    set_head(model, w2, b2, scale=10.0)
    assert np.allclose(linear_head(model).weight.detach().numpy(), 10 * w2, atol=1e-5)
    assert np.allclose(linear_head(model).bias.detach().numpy(), 10 * b2, atol=1e-5)
    with pytest.raises(ConfigError, match=r"federation\.head_scale"):
        set_head(model, w2, b2, scale=0.0)


# ------------------------------------------------------------------ in a federation
@pytest.mark.usefixtures("_no_real_data")
def test_statistics_round_then_rounds_and_resume(tmp_path: Path) -> None:
    """2 sites on the embedded default: the round-0 one-shot head is recorded and
    checkpointed; a resumed run continues without a second statistics round."""
    d = 256  # paper_cnn's classifier input
    base = [*SIM_BASE, "federation.fraction_evaluate=0"]
    fed3r = run_federated(
        [*base, "federation.head_init=fed3r", "rounds=0", f"runs_dir={tmp_path / 'fed3r'}"]
    )
    rounds = json.loads((fed3r / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0]
    stats = rounds[0]["sites"]["statistics"]
    assert len(stats) == 2 and all(s["num-examples"] > 0 for s in stats)
    assert all(s["bytes"] == 8 * ((d + 1) ** 2 + (d + 1) * 4) for s in stats)  # float64 sums
    assert rounds[0]["global"]["test_grouped"]["n"] > 0  # the one-shot model is evaluated
    assert (fed3r / "last.pt").exists() and (fed3r / "curves.png").exists()

    ncm = [*base, "federation.head_init=fedncm", f"runs_dir={tmp_path / 'ncm'}"]
    part = run_federated([*ncm, "rounds=1"])
    rows = json.loads((part / "metrics.json").read_text())["rounds"]
    assert rows[0]["sites"]["statistics"][0]["bytes"] == 8 * (4 * d + 4)
    # random conv features still separate the synthetic classes' means
    assert rows[0]["global"]["test_grouped"]["accuracy"] > 0.5
    resumed = run_federated([*ncm, "rounds=2", f"federation.resume={part}"])
    rows = json.loads((resumed / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sum("statistics" in r["sites"] for r in rows) == 1  # not repeated on resume


@pytest.mark.usefixtures("_no_real_data")
def test_statistics_round_is_refused_with_privacy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"federation\.head_init.*privacy=dp_sgd"):
        run_federated(
            [*SIM_BASE, "federation.head_init=fedncm", "privacy=dp_sgd", f"runs_dir={tmp_path}"]
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.usefixtures("_no_real_data")
def test_pooled_and_local_references_of_the_closed_form_head(tmp_path: Path) -> None:
    from fedscan.common.commands.report import load_run
    from fedscan.simulations.harness import run_one

    base = [*SIM_BASE, "federation.head_init=fedncm", f"runs_dir={tmp_path}"]
    pooled = run_one([*base, "method=pooled", "rounds=0"])
    local = run_one([*base, "method=local", "rounds=0"])
    tuned = run_one([*base, "method=pooled", "rounds=1"])
    rows = {r["method"]: r for run in (pooled, local) for r in load_run(run)}
    assert set(rows) == {"pooled+fedncm", "local+fedncm"}
    assert rows["pooled+fedncm"]["accuracy"] > 0.5  # class means separate the synthetic set
    assert json.loads((pooled / "metrics.json").read_text())["history"] == []
    assert len(json.loads((tuned / "metrics.json").read_text())["history"]) == 1
    with pytest.raises(ConfigError, match=r"rounds.*>= 0 after a federation\.head_init"):
        run_one([*SIM_BASE, "method=pooled", "rounds=0", f"runs_dir={tmp_path}"])


@pytest.mark.usefixtures("_no_real_data")
@pytest.mark.parametrize("head_init", ["fedncm", "none"])
def test_a_frozen_head_stays_while_the_blocks_train(head_init: str) -> None:
    """A solved head, or with ``head_init=none`` the initial one (FedBABU), is held."""
    from fedscan.common.core.config import load_config
    from fedscan.common.federated.exchange import exchanged_keys, get_exchanged
    from fedscan.common.federated.trainer import SiteState, SiteTrainer

    cfg = load_config(
        [*SIM_BASE, f"federation.head_init={head_init}", "federation.head_freeze=true"]
    )
    trainer = SiteTrainer.for_node(cfg, {"partition-id": 0, "num-partitions": 2})
    model = trainer.site.run.model
    sent = get_exchanged(model, exchanged_keys(model))
    got = trainer.train(sent, rnd=1, state=SiteState()).arrays
    head = [k for k in sent if k.startswith(f"stages.{len(model.stages) - 1}.")]
    assert head and all(torch.equal(sent[k], got[k]) for k in head)
    assert any(not torch.equal(sent[k], got[k]) for k in sent if k not in head)


@pytest.mark.usefixtures("_no_real_data")
def test_the_pooled_reference_holds_its_initial_head_too(tmp_path: Path) -> None:
    """``method=pooled`` with ``head_freeze`` and no solved head: the blocks train, the
    seeded initial head is what ``model.pt`` carries (FedBABU's centralised twin)."""
    from fedscan.common.core.config import load_config
    from fedscan.simulations.harness import run_one

    base = [*SIM_BASE, "federation.head_freeze=true", f"runs_dir={tmp_path}"]
    run = run_one([*base, "method=pooled", "rounds=1"])
    cfg = load_config(base)
    torch.manual_seed(int(cfg.seed))  # as prepare_run seeds before it builds the model
    model = build_model(cfg.model, 4)
    start = model.state_dict()
    trained = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    head = [k for k in start if k.startswith(f"stages.{len(model.stages) - 1}.")]
    assert head and all(torch.equal(start[k], trained[k]) for k in head)
    assert any(not torch.equal(start[k], trained[k]) for k in start if k not in head)


@pytest.mark.usefixtures("_no_real_data")
def test_a_frozen_head_needs_something_else_to_train() -> None:
    from fedscan.common.core.config import load_config
    from fedscan.common.runs.validate import validate

    features = ["model=efficientnet_lite0", "model.mode=features", "federation.head_freeze=true"]
    with pytest.raises(ConfigError, match=r"head_freeze.*feature mode"):
        validate(load_config([*SIM_BASE, *features, "federation.head_init=fed3r"]), "federated")


@pytest.mark.realdata
def test_exact_on_real_cached_features_of_a_small_brain_subset(brain_subset: Path) -> None:
    """The pretrained trunk's cached features of real brain images, dealt to 4 sites by a
    Dirichlet(0.1) partition: the federated heads equal the pooled ones (Fed3R against a
    least-squares solve of the pooled features, FedNCM against the pooled class means)."""
    from fedscan.common.core.config import load_config
    from fedscan.common.data.partition import partition
    from fedscan.common.learn.prepare import prepare_run

    cfg = load_config(
        [
            f"data_root={brain_subset.parent}",
            "model.mode=features",
            "dataset.image_size=64",
            "dataset.split.val_fraction=0.34",  # 6 images a class: 3 folds
        ]
    )
    run = prepare_run(cfg)
    s = run.data.splits
    pool = np.sort(np.concatenate([s.train, s.val]))
    phi = classifier_features(run.model, run.x, pool, start=run.start, device=run.device)
    labels = run.labels[pool]
    row = {int(i): k for k, i in enumerate(pool)}
    part = {"name": "dirichlet", "alpha": 0.1, "min_samples": 1}
    sites = partition(pool, s.groups, run.labels, 4, cfg=part, seed=0)
    rows = [np.array([row[int(i)] for i in site]) for site in sites]
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(pool)))

    fed3r = sum_statistics([site_statistics("fed3r", phi[r], labels[r], C) for r in rows])
    w, b = solve_head("fed3r", fed3r, ridge=1.0)
    w_ref, b_ref = _pooled_ridge(phi, labels, 1.0)
    assert np.abs(w - w_ref).max() < 1e-6 and np.abs(b - b_ref).max() < 1e-6

    ncm = sum_statistics([site_statistics("fedncm", phi[r], labels[r], C) for r in rows])
    w, _ = solve_head("fedncm", ncm, ridge=1.0)
    for c in range(C):
        mean = phi[labels == c].mean(0)
        assert np.abs(w[c] - mean / np.linalg.norm(mean)).max() < 1e-6


# ------------------------------------------------------------------ the head refit
def _refit_reference(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The refitted head in ``last.pt`` and the pooled ridge head of the final model's
    features over both sites' training splits, computed here in one place."""
    from omegaconf import OmegaConf

    from fedscan.common.federated.exchange import set_exchanged
    from fedscan.common.federated.site import site_indices
    from fedscan.common.learn.prepare import prepare_run

    cfg = OmegaConf.load(run_dir / "config.yaml")
    run = prepare_run(cfg)
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    set_exchanged(run.model, state["arrays"], list(state["arrays"]))
    train = np.concatenate(
        [site_indices(cfg, run.data, partition_id=p, num_partitions=2)[0] for p in range(2)]
    )
    phi = classifier_features(run.model, run.x, train, start=run.start, device=torch.device("cpu"))
    labels = run.data.collection.labels[train]
    w, b = solve_head("fed3r", site_statistics("fed3r", phi, labels, 4), ridge=1.0)
    head = linear_head(run.model)
    scale = float(cfg.federation.head_scale)
    got_w = head.weight.detach().double().numpy() / scale
    got_b = head.bias.detach().double().numpy() / scale
    return got_w, got_b, w, b


@pytest.mark.usefixtures("_no_real_data")
def test_the_head_refit_after_the_last_round_is_the_pooled_ridge_head(tmp_path: Path) -> None:
    """``federation.head_refit=fed3r``: after round 1 a statistics round re-solves the
    head on the final model's features; round 1 is recorded with the refitted model,
    the metrics before it kept beside; the sites score the refitted model on their
    validation splits; the method says so."""
    from fedscan.common.commands.report import load_run

    base = [*SIM_BASE, "federation.fraction_evaluate=1", f"runs_dir={tmp_path}"]
    run_dir = run_federated([*base, "rounds=1", "federation.head_refit=fed3r"])
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1]
    row = rows[0]
    assert set(row["before_refit"]) == set(row["global"]) and row["before_refit"]
    assert len(row["sites"]["statistics"]) == 2 and len(row["sites"]["train"]) == 2
    assert len(row["sites"]["evaluate"]) == 2 and len(row["sites_before_refit"]) == 2
    assert row["sites"]["evaluate"] != row["sites_before_refit"]  # the refitted model's
    got_w, got_b, w, b = _refit_reference(run_dir)
    # float32 weights in the model: the solved head is float64, written as float32
    assert np.abs(got_w - w).max() < 1e-5 * max(1.0, np.abs(w).max())
    assert np.abs(got_b - b).max() < 1e-5 * max(1.0, np.abs(b).max())
    assert {r["method"] for r in load_run(run_dir)} == {"fedavg+refit(fed3r)"}


@pytest.mark.usefixtures("_no_real_data")
def test_a_run_stopped_before_its_refit_refits_on_resume_and_only_once(tmp_path: Path) -> None:
    base = [*SIM_BASE, "federation.fraction_evaluate=0", "rounds=1", f"runs_dir={tmp_path}"]
    run_dir = run_federated(base)  # its last.pt: round 1 done, no refit
    before = json.loads((run_dir / "metrics.json").read_text())["rounds"][0]["global"]
    refit = [*base, "federation.head_refit=fed3r", f"federation.resume={run_dir}"]
    run_federated(refit)
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1] and "statistics" in rows[0]["sites"]
    assert rows[0]["before_refit"] == before
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    run_federated(refit)  # refitted already: nothing to do, nothing rewritten
    again = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert all(torch.equal(state["arrays"][k], again["arrays"][k]) for k in state["arrays"])
    assert json.loads((run_dir / "metrics.json").read_text())["rounds"] == rows


@pytest.mark.usefixtures("_no_real_data")
@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.head_refit=ridge"],
        ["federation.head_refit=fed3r", "federation.head_init=fed3r", "rounds=0"],
        ["federation.head_refit=fed3r", "privacy=dp_sgd"],
    ],
)
def test_bad_head_refit_settings_are_refused_naming_the_key(overrides) -> None:
    from fedscan.common.core.config import load_config
    from fedscan.common.runs.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(load_config([*SIM_BASE, *overrides]), "federated")
    assert err.value.key == "federation.head_refit"


@pytest.mark.parametrize(
    ("key", "fix"), [("federation.head_refit", "=none"), ("federation.head_freeze", "=false")]
)
def test_a_head_setting_needs_a_linear_head_and_says_which_key(key: str, fix: str) -> None:
    model = build_model({"name": "efficientnet_lite0", "mode": "features"}, 3)
    model.stages[-1] = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ConfigError) as err:
        linear_head(model, key=key)
    assert err.value.key == key and f"use {key}{fix}" in str(err.value)


@pytest.mark.usefixtures("_no_real_data")
def test_pooled_and_local_runs_refit_their_trained_head(tmp_path: Path) -> None:
    """``method=pooled`` / ``local`` with ``federation.head_refit``: the trained model's
    head is re-solved from the pooled / each site's own features; the pooled model's
    head is the ridge head of its training split's features under its final weights."""
    from omegaconf import OmegaConf

    from fedscan.common.commands.report import load_run
    from fedscan.common.learn.prepare import prepare_run
    from fedscan.simulations.harness import run_one

    base = [*SIM_BASE, "rounds=1", "federation.head_refit=fed3r", f"runs_dir={tmp_path}"]
    pooled = run_one([*base, "method=pooled"])
    local = run_one([*base, "method=local"])
    methods = {r["method"] for run in (pooled, local) for r in load_run(run)}
    assert methods == {"pooled+refit(fed3r)", "local+refit(fed3r)"}
    cfg = OmegaConf.load(pooled / "config.yaml")
    run = prepare_run(cfg)
    saved = torch.load(pooled / "model.pt", map_location="cpu", weights_only=False)
    run.model.load_state_dict(saved["state_dict"])
    train = run.data.splits.train
    phi = classifier_features(run.model, run.x, train, start=run.start, device=torch.device("cpu"))
    w, b = solve_head(
        "fed3r", site_statistics("fed3r", phi, run.data.collection.labels[train], 4), ridge=1.0
    )
    head, scale = linear_head(run.model), float(cfg.federation.head_scale)
    assert np.abs(head.weight.detach().double().numpy() / scale - w).max() < 1e-5 * max(
        1.0, np.abs(w).max()
    )
    assert np.abs(head.bias.detach().double().numpy() / scale - b).max() < 1e-5 * max(
        1.0, np.abs(b).max()
    )

"""``model.feature_norm=centred``: the centring statistics round, exact without DP,
noised and accounted with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedscan.common.federated.centre import (
    centre_module,
    install_centre,
    site_centre_statistics,
)
from fedscan.common.federated.head_init import sum_statistics
from fedscan.common.federated.privacy import (
    PrivacyLedger,
    centre_noise,
    planned_noise,
    steps_per_epoch,
)
from fedscan.common.learn.models.staged import StagedModel, normalise_classifier_input
from tests.conftest import SIM_BASE, tree_dp_settings

CPU = torch.device("cpu")


def _head(d: int = 6) -> StagedModel:
    torch.manual_seed(0)
    model = StagedModel("head", [("classifier", nn.Linear(d, 3))], 3)
    return normalise_classifier_input(model, centred=True)


def _features(n: int = 40, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((n, d)) + np.linspace(0, 2, d)).astype(np.float32)  # one shared direction


def test_the_centre_is_the_pooled_mean_unit_feature_and_the_model_uses_it() -> None:
    """Two sites' sums installed: the centre is the mean of all unit feature vectors; the
    model feeds its head the unit features minus it, scaled to unit norm again; before
    the round (centre zero) it is plain l2."""
    model, x = _head(), _features()
    xt = torch.from_numpy(x)
    head = model.stages[-1][-1]
    plain = F.linear(F.normalize(xt, dim=1), head.weight, head.bias)
    assert torch.allclose(model(xt), plain, atol=1e-6)
    halves = [np.arange(0, 15), np.arange(15, 40)]
    sums = [site_centre_statistics(model, x, i, start=0, device=CPU) for i in halves]
    install_centre(model, sum_statistics(sums))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    norm = centre_module(model)
    assert norm is not None
    assert np.allclose(norm.centre.numpy(), unit.mean(0), atol=1e-6)
    assert norm.centre.norm() > 0.5  # these features share a direction
    centred = F.normalize(F.normalize(xt, dim=1) - norm.centre, dim=1)
    assert torch.allclose(model(xt), F.linear(centred, head.weight, head.bias), atol=1e-5)
    # a second round's sums are of the plain unit features, whatever centre is installed
    again = site_centre_statistics(model, x, np.arange(40), start=0, device=CPU)
    assert np.allclose(again["unit_sum"], unit.sum(0), atol=1e-5)


def test_the_centring_noise_has_the_standard_deviation_asked_for() -> None:
    """Statistical (can fail): the noised sum minus the clean one, over 4,000 coordinates,
    has mean 0 and standard deviation sigma (to 5 %; the sample std's own spread is 1 %)."""
    d, sigma = 4000, 3.0
    model = _head(d)
    x = np.abs(np.random.default_rng(1).normal(size=(30, d))).astype(np.float32)
    idx = np.arange(30)
    clean = site_centre_statistics(model, x, idx, start=0, device=CPU)["unit_sum"]
    noised = site_centre_statistics(
        model, x, idx, start=0, device=CPU, noise=sigma, generator=np.random.default_rng(7)
    )["unit_sum"]
    diff = noised - clean
    assert abs(diff.mean()) < 4 * sigma / np.sqrt(d)
    assert diff.std() == pytest.approx(sigma, rel=0.05)


def test_the_plan_with_the_centring_query_spends_exactly_the_target() -> None:
    """The training noise planned with the centring query first: the whole history spends
    the target; at sample rate 1 the query composes like CENTRE_SHARE of the steps
    (the Gaussian mechanism's composition, which RDP states exactly)."""
    dp = tree_dp_settings(target_epsilon=3.0, delta=1e-4, accountant="rdp")
    plan = {"n_train": 400, "batch_size": 4096, "epochs_total": 200, "delta": 1e-4}
    alone = planned_noise(dp, **plan)
    sigma = planned_noise(dp, **plan, centred=True)
    assert sigma > alone
    steps = steps_per_epoch(400, 4096) * 200
    query = centre_noise(sigma, steps)
    assert query == pytest.approx(sigma / np.sqrt(20))
    ledger = PrivacyLedger([(query, 1.0, 1), (sigma, 1.0, steps)], "rdp")
    assert ledger.epsilon(1e-4) == pytest.approx(3.0, rel=1e-4)
    same = PrivacyLedger([(sigma, 1.0, steps + 20)], "rdp")
    assert same.epsilon(1e-4) == pytest.approx(ledger.epsilon(1e-4), rel=1e-9)


@pytest.mark.usefixtures("_no_real_data")
def test_the_federation_and_the_pooled_run_centre_on_their_training_images(
    tmp_path: Path,
) -> None:
    """Without DP the sites' summed sums are exact: the federated model's centre is the
    mean unit feature of the sites' training images under the initial model, the pooled
    run's that of the pooled training split; both travel in the checkpoints."""
    from fedscan.common.core.config import load_config
    from fedscan.common.federated.site import site_indices
    from fedscan.common.learn.prepare import prepare_run
    from fedscan.simulations.federated import run_federated
    from fedscan.simulations.harness import run_one

    base = [*SIM_BASE, "model.feature_norm=centred", "federation.rounds=1"]
    cfg = load_config(base)
    run = prepare_run(cfg)  # the seeded initial model both runs start from

    def mean_unit(indices: np.ndarray) -> torch.Tensor:
        sums = site_centre_statistics(run.model, run.x, indices, start=run.start, device=CPU)
        return torch.from_numpy(sums["unit_sum"] / len(indices)).float()

    sites = [site_indices(cfg, run.data, partition_id=p, num_partitions=2)[0] for p in (0, 1)]
    fed = run_federated([*base, f"runs_dir={tmp_path / 'fed'}"])
    arrays = torch.load(fed / "last.pt", weights_only=False)["arrays"]
    (key,) = [k for k in arrays if k.endswith(".centre")]
    assert arrays[key].norm() > 0.1
    assert torch.allclose(arrays[key], mean_unit(np.concatenate(sites)), atol=1e-6)
    pooled = run_one([*base, "method=pooled", f"runs_dir={tmp_path / 'pooled'}"])
    state = torch.load(pooled / "model.pt", weights_only=False)["state_dict"]
    assert torch.allclose(state[key], mean_unit(run.data.splits.train), atol=1e-6)


@pytest.mark.usefixtures("_no_real_data")
def test_under_dp_the_centring_query_is_accounted_and_the_run_spends_its_target(
    tmp_path: Path,
) -> None:
    """privacy=dp_sgd with a centred feature norm: each site's ledger starts with the
    centring query (one step at rate 1, the planned multiplier), after the planned
    rounds the site has spent its target, no more, and the installed centre is the
    exact mean unit feature plus Gaussian noise of the accounted size (statistical,
    over the 256 coordinates: the sample std's own spread is about 4 %)."""
    from fedscan.common.core.config import load_config
    from fedscan.common.federated.site import site_indices
    from fedscan.common.learn.prepare import prepare_run
    from fedscan.simulations.federated import run_federated

    overrides = [
        *SIM_BASE,
        "model.feature_norm=centred",
        "privacy=dp_sgd",
        "privacy.target_epsilon=4",
        "federation.rounds=2",
    ]
    run = run_federated([*overrides, f"runs_dir={tmp_path}"])
    last = json.loads((run / "metrics.json").read_text())["rounds"][-1]
    queries = []
    for row in last["sites"]["train"]:
        pid = row["partition-id"]
        ledger = PrivacyLedger.load(run / "site-privacy" / f"site-{pid}.json")
        query, *training = ledger.history
        steps = sum(n for _, _, n in training)
        assert query == (pytest.approx(centre_noise(row["dp_noise_multiplier"], steps)), 1.0, 1)
        assert row["dp_epsilon"] == pytest.approx(ledger.epsilon(row["dp_delta"]))
        assert 4 * 0.98 < row["dp_epsilon"] <= 4 * 1.001
        queries.append(query[0])
    cfg = load_config(overrides)
    prep = prepare_run(cfg)  # the initial model the centring round ran on
    idx = np.concatenate(
        [site_indices(cfg, prep.data, partition_id=p, num_partitions=2)[0] for p in (0, 1)]
    )
    exact = site_centre_statistics(prep.model, prep.x, idx, start=prep.start, device=CPU)
    arrays = torch.load(run / "last.pt", weights_only=False)["arrays"]
    (key,) = [k for k in arrays if k.endswith(".centre")]
    noise = arrays[key].double().numpy() - exact["unit_sum"] / len(idx)
    expected = np.sqrt(np.sum(np.square(queries))) / len(idx)  # the sum's noise / the count
    assert noise.size == 256
    assert noise.std() == pytest.approx(expected, rel=0.25)

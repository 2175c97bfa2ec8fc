"""SCAFFOLD: the control-variate updates against a hand-computed two-site example, the
strategy's variate across rounds, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedscan.common.federated.scaffold import correction, server_variate, site_variate
from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE
from tests.test_strategies import FED, reply

T = torch.tensor


def test_two_sites_by_hand() -> None:
    """Round 1: sites A and B have full-batch gradients 2 and -1 at the global weights."""
    new_a, delta_a = site_variate({}, {"w": T([2.0])})  # no variate yet: c_i = 0
    new_b, delta_b = site_variate({}, {"w": T([-1.0])})
    assert new_a["w"].item() == 2.0 and delta_a["w"].item() == 2.0
    assert new_b["w"].item() == -1.0 and delta_b["w"].item() == -1.0
    # both of 4 connected sites replied: c = 0 + (2 / 4) * mean(2, -1) = 0.25
    c1 = server_variate({}, [{"w": np.array([2.0])}, {"w": np.array([-1.0])}], num_sites=4)
    assert c1["w"].tolist() == pytest.approx([0.25])
    # round 2, site A: its gradient is corrected by c - c_A = 0.25 - 2 = -1.75
    assert correction({"w": T(c1["w"])}, new_a, ["w"])["w"].item() == pytest.approx(-1.75)
    # A's gradient is now 2.5: c_A = 2.5, delta = 0.5; a round without B leaves c_B alone
    again, delta = site_variate(new_a, {"w": T([2.5])})
    assert again["w"].item() == 2.5 and delta["w"].item() == pytest.approx(0.5)
    c2 = server_variate(c1, [{"w": np.array([0.5])}], num_sites=4)
    assert c2["w"].tolist() == pytest.approx([0.25 + 0.25 * 0.5])


def test_mean_gradient_is_the_softmax_regression_gradient() -> None:
    """grad_W of mean cross-entropy = mean((p - y) x^T), grad_b = mean(p - y)."""
    from torch import nn

    from fedscan.common.learn.models.staged import StagedModel
    from fedscan.common.learn.training import Batches, mean_gradient

    torch.manual_seed(0)
    model = StagedModel("lin", [("input", nn.Identity()), ("classifier", nn.Linear(2, 3))], 3)
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.5], [0.3, 0.3]], np.float32)
    y = np.array([0, 1, 2, 0, 1])
    grads = mean_gradient(
        model,
        Batches(x, y, np.arange(5), batch_size=2),
        nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
    )
    w, b = model.stages[1].weight.detach().numpy(), model.stages[1].bias.detach().numpy()
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    err = p - np.eye(3)[y]
    np.testing.assert_allclose(grads["stages.1.weight"].numpy(), err.T @ x / 5, atol=1e-6)
    np.testing.assert_allclose(grads["stages.1.bias"].numpy(), err.mean(0), atol=1e-6)


def test_strategy_sends_c_takes_deltas_out_and_updates_c() -> None:
    from fedscan.server.strategies import build_strategy, export_state

    s = build_strategy({"name": "scaffold"}, FED)
    a, b = reply(1, 1.0, 10), reply(2, 3.0, 10)
    a.content["scaffold-dc"] = ArrayRecord({"w": torch.full((3,), 2.0)})
    b.content["scaffold-dc"] = ArrayRecord({"w": torch.full((3,), -1.0)})
    s._connected = 4
    arrays, _ = s.aggregate_train(1, [a, b])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 2.0))  # FedAvg of the weights
    np.testing.assert_allclose(s.scaffold_c["w"], np.full(3, 0.25))
    assert "scaffold_c" in export_state(s)


@pytest.mark.usefixtures("_no_real_data")
def test_scaffold_federation_resumes_like_an_uninterrupted_run(tmp_path: Path) -> None:
    base = [*SIM_BASE, "strategy=scaffold", "train.optimizer=sgd", "train.lr=0.05"]
    full = run_federated([*base, f"runs_dir={tmp_path / 'a'}", "federation.rounds=2"])
    part = run_federated([*base, f"runs_dir={tmp_path / 'b'}", "federation.rounds=1"])
    resumed = run_federated(
        [*base, f"runs_dir={tmp_path / 'b'}", "federation.rounds=2", f"federation.resume={part}"]
    )
    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["strategy_state"]["scaffold_c"]  # the server variate is checkpointed
    for k in a["arrays"]:
        torch.testing.assert_close(a["arrays"][k], b["arrays"][k], rtol=0, atol=1e-6)
    for k, v in a["strategy_state"]["scaffold_c"].items():
        np.testing.assert_allclose(v, b["strategy_state"]["scaffold_c"][k], atol=1e-6)
    sites = sorted((tmp_path / "b").glob("*/site-scaffold/site-*.pt"))
    assert len(sites) == 2  # each site's c_i survives the resume in a file
    rounds = json.loads((resumed / "metrics.json").read_text())["rounds"]
    assert all(np.isfinite(s["train_loss"]) for r in rounds for s in r["sites"]["train"])

"""``federation.bn_refit``: the global BatchNorm statistics re-estimated from the sites'
exact per-channel sums after the last round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.errors import ConfigError
from common.data.transforms import to_float
from common.federated.bn_stats import (
    bn_layers,
    check_bn_refit,
    install_bn,
    recalibrate_bn,
    site_bn_statistics,
)
from common.federated.head_init import sum_statistics
from common.learn.models import build_model
from simulations.federated import run_federated
from tests.conftest import SIM_BASE

CPU = torch.device("cpu")


def _model_and_images(seed: int = 0) -> tuple[torch.nn.Module, np.ndarray]:
    torch.manual_seed(seed)
    model = build_model({"name": "paper_cnn"}, 4)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(40, 32, 32), dtype=np.uint8)
    return model, x


def _stats(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        n: (m.running_mean.double().numpy().copy(), m.running_var.double().numpy().copy())
        for n, m in bn_layers(model, 0).items()
    }


def test_the_sites_sums_are_the_pooled_sums_and_set_the_first_layer_exactly() -> None:
    model, x = _model_and_images()
    parts = [np.arange(0, 7), np.arange(7, 30), np.arange(30, 40)]
    sites = [site_bn_statistics(model, x, p, start=0, device=CPU) for p in parts]
    pooled = site_bn_statistics(model, x, np.arange(40), start=0, device=CPU)
    total = sum_statistics(sites)
    assert set(total) == set(pooled) and total["bn.count"][0] == 40
    assert all(np.allclose(total[k], pooled[k], rtol=1e-12, atol=1e-9) for k in pooled)
    assert not any(v.ndim > 1 for v in pooled.values())  # per channel, never per image

    # the first BatchNorm's input does not depend on any BatchNorm: one pass is exact
    first = next(iter(bn_layers(model, 0).values()))
    seen = []
    handle = first.register_forward_pre_hook(lambda _m, a: seen.append(a[0].double()))
    model.eval()
    with torch.no_grad():
        model(to_float(torch.from_numpy(x)))
    handle.remove()
    a = torch.cat(seen)
    assert install_bn(model, total) == len(bn_layers(model, 0))
    mean = a.mean((0, 2, 3)).numpy()
    var = a.var((0, 2, 3), unbiased=False).numpy()
    assert np.allclose(first.running_mean.double().numpy(), mean, atol=1e-5)
    assert np.allclose(first.running_var.double().numpy(), var, rtol=1e-4, atol=1e-6)


def test_as_many_passes_as_layers_reach_the_fixed_point() -> None:
    """Pass p makes layer p exact given the layers before it, so after L passes one
    more changes nothing: the layer-by-layer pooled statistics."""
    model, x = _model_and_images(1)
    before = _stats(model)
    layers = len(bn_layers(model, 0))
    recalibrate_bn(model, x, np.arange(40), passes=layers, start=0, device=CPU)
    fixed = _stats(model)
    assert any(not np.allclose(before[n][0], fixed[n][0]) for n in fixed)
    recalibrate_bn(model, x, np.arange(40), passes=1, start=0, device=CPU)
    again = _stats(model)
    for n in fixed:
        assert np.allclose(fixed[n][0], again[n][0], rtol=1e-4, atol=1e-5), n
        assert np.allclose(fixed[n][1], again[n][1], rtol=1e-4, atol=1e-5), n


def test_a_model_without_trained_batchnorm_is_refused_naming_the_key() -> None:
    model = build_model({"name": "efficientnet_lite0", "mode": "features"}, 3)
    with pytest.raises(ConfigError) as err:
        check_bn_refit(model, model.frozen_until)
    assert err.value.key == "federation.bn_refit" and "bn_refit=0" in str(err.value)
    check_bn_refit(build_model({"name": "paper_cnn"}, 4), 0)  # has some: no error


@pytest.mark.usefixtures("_no_real_data")
@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.bn_refit=-1"],
        ["federation.bn_refit=1", "rounds=0", "federation.head_init=fed3r"],
        ["federation.bn_refit=1", "federation.fedbn=true"],
        ["federation.bn_refit=1", "privacy=dp_sgd"],
    ],
)
def test_bad_bn_refit_settings_are_refused_naming_the_key(overrides: list[str]) -> None:
    from common.core.config import load_config
    from common.runs.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(load_config([*SIM_BASE, *overrides]), "federated")
    assert err.value.key == "federation.bn_refit"


@pytest.mark.usefixtures("_no_real_data")
def test_the_bn_refit_installs_the_pooled_statistics_of_the_final_model(tmp_path: Path) -> None:
    """A 2-site run, then the same run resumed with ``bn_refit=2``: the global model's
    BatchNorm statistics are what two passes over both sites' training images give
    the round-1 model, computed here in one place; the refit is recorded and labelled."""
    from omegaconf import OmegaConf

    from common.commands.report import load_run
    from common.federated.exchange import set_exchanged
    from common.federated.site import site_indices
    from common.learn.prepare import prepare_run

    base = [*SIM_BASE, "federation.fraction_evaluate=1", "rounds=1", f"runs_dir={tmp_path}"]
    plain = run_federated(base)
    refitted = tmp_path / "refitted"
    shutil.copytree(plain, refitted)
    run_federated([*base, "federation.bn_refit=2", f"federation.resume={refitted}"])

    cfg = OmegaConf.load(plain / "config.yaml")
    run = prepare_run(cfg)
    state = torch.load(plain / "last.pt", map_location="cpu", weights_only=False)
    set_exchanged(run.model, state["arrays"], list(state["arrays"]))
    train = np.concatenate(
        [site_indices(cfg, run.data, partition_id=p, num_partitions=2)[0] for p in range(2)]
    )
    recalibrate_bn(run.model, run.x, train, passes=2, start=run.start, device=CPU)
    want = run.model.state_dict()
    got = torch.load(refitted / "last.pt", map_location="cpu", weights_only=False)["arrays"]
    stats = [k for k in got if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-4, atol=1e-5), k
    assert all(torch.equal(got[k], state["arrays"][k]) for k in got if k not in stats)

    row = json.loads((refitted / "metrics.json").read_text())["rounds"][-1]
    assert len(row["sites"]["bn_statistics_1"]) == len(row["sites"]["bn_statistics_2"]) == 2
    assert row["before_refit"] and len(row["sites"]["evaluate"]) == 2
    assert {r["method"] for r in load_run(refitted)} == {"fedavg+refit(bn2)"}

"""``federation.bn_refit``: the global BatchNorm statistics re-estimated from the sites'
exact per-channel sums after the last round."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.transforms import to_float
from fedscan.common.federated.bn_stats import (
    bn_layers,
    check_bn_refit,
    install_bn,
    site_bn_statistics,
)
from fedscan.common.federated.head_init import sum_statistics
from fedscan.common.learn.models import build_model
from fedscan.simulations.federated import run_federated
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


def _site(model, x, idx, batch_size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    return site_bn_statistics(model, x, idx, start=0, device=CPU, batch_size=batch_size, seed=seed)


def test_one_batch_gives_the_batch_statistics_and_leaves_the_model_alone() -> None:
    """With every image in one batch, the first BatchNorm (whose input no BatchNorm
    touches) gets exactly that batch's mean and unbiased variance of its input."""
    model, x = _model_and_images()
    before = _stats(model)
    stats = _site(model, x, np.arange(40), batch_size=64)
    assert all(np.array_equal(before[n][0], _stats(model)[n][0]) for n in before)
    assert stats["bn.count"][0] == 40
    assert not any(v.ndim > 1 for v in stats.values())  # per channel, never per image

    name, first = next(iter(bn_layers(model, 0).items()))
    seen = []
    handle = first.register_forward_pre_hook(lambda _m, a: seen.append(a[0].double()))
    model.eval()
    with torch.no_grad():
        model(to_float(torch.from_numpy(x)))
    handle.remove()
    a = torch.cat(seen)
    assert np.allclose(stats[f"{name}.mean"] / 40, a.mean((0, 2, 3)).numpy(), atol=1e-5)
    var = a.var((0, 2, 3), unbiased=True).numpy()
    assert np.allclose(stats[f"{name}.var"] / 40, var, rtol=1e-4, atol=1e-6)


def test_the_total_installs_the_image_weighted_mean_of_the_sites() -> None:
    model, x = _model_and_images(1)
    parts = [np.arange(0, 7), np.arange(7, 30), np.arange(30, 40)]
    sites = [_site(model, x, p, seed=k) for k, p in enumerate(parts)]
    own = []
    for stats in sites:  # each site's statistics installed alone
        alone = copy.deepcopy(model)
        install_bn(alone, stats)
        own.append(_stats(alone))
    assert install_bn(model, sum_statistics(sites)) == len(bn_layers(model, 0))
    got = _stats(model)
    n = np.array([len(p) for p in parts], dtype=float)
    for name in got:
        for i in (0, 1):  # running mean, running variance
            want = sum(w * o[name][i] for w, o in zip(n, own, strict=True)) / n.sum()
            assert np.allclose(got[name][i], want, rtol=1e-6, atol=1e-9), name
    assert any(not np.allclose(own[0][k][1], own[1][k][1]) for k in got)  # sites differ


def test_a_model_without_trained_batchnorm_is_refused_naming_the_key() -> None:
    model = build_model({"name": "efficientnet_lite0", "mode": "features"}, 3)
    with pytest.raises(ConfigError) as err:
        check_bn_refit(model, model.frozen_until)
    assert err.value.key == "federation.bn_refit" and "bn_refit=false" in str(err.value)
    check_bn_refit(build_model({"name": "paper_cnn"}, 4), 0)  # has some: no error


@pytest.mark.usefixtures("_no_real_data")
@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.bn_refit=maybe"],
        ["federation.bn_refit=true", "rounds=0", "federation.head_init=fed3r"],
        ["federation.bn_refit=true", "federation.fedbn=true"],
        ["federation.bn_refit=true", "privacy=dp_sgd"],
    ],
)
def test_bad_bn_refit_settings_are_refused_naming_the_key(overrides: list[str]) -> None:
    from fedscan.common.core.config import load_config
    from fedscan.common.runs.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(load_config([*SIM_BASE, *overrides]), "federated")
    assert err.value.key == "federation.bn_refit"


@pytest.mark.usefixtures("_no_real_data")
def test_the_bn_refit_installs_the_sites_statistics_of_the_final_model(tmp_path: Path) -> None:
    """A 2-site run, then the same run resumed with ``bn_refit``: the global model's
    BatchNorm statistics are the image-weighted mean of what each site's pass over its
    training split gives the round-1 model, computed here; nothing else changes; the
    refit is recorded and labelled."""
    from omegaconf import OmegaConf

    from fedscan.common.commands.report import load_run
    from fedscan.common.federated.exchange import set_exchanged
    from fedscan.common.federated.site import site_indices
    from fedscan.common.federated.trainer import site_seed
    from fedscan.common.learn.prepare import prepare_run

    base = [*SIM_BASE, "federation.fraction_evaluate=1", "rounds=1", f"runs_dir={tmp_path}"]
    plain = run_federated(base)
    refitted = tmp_path / "refitted"
    shutil.copytree(plain, refitted)
    run_federated([*base, "federation.bn_refit=true", f"federation.resume={refitted}"])

    cfg = OmegaConf.load(plain / "config.yaml")
    run = prepare_run(cfg)
    state = torch.load(plain / "last.pt", map_location="cpu", weights_only=False)
    set_exchanged(run.model, state["arrays"], list(state["arrays"]))
    sites = [
        site_bn_statistics(
            run.model,
            run.x,
            site_indices(cfg, run.data, partition_id=p, num_partitions=2)[0],
            start=run.start,
            device=CPU,
            batch_size=int(cfg.train.batch_size),
            seed=site_seed(int(cfg.seed), 0, p),
        )
        for p in range(2)
    ]
    install_bn(run.model, sum_statistics(sites))
    want = run.model.state_dict()
    got = torch.load(refitted / "last.pt", map_location="cpu", weights_only=False)["arrays"]
    stats = [k for k in got if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-6), k
    assert all(torch.equal(got[k], state["arrays"][k]) for k in got if k not in stats)

    row = json.loads((refitted / "metrics.json").read_text())["rounds"][-1]
    assert len(row["sites"]["bn_statistics"]) == 2
    assert row["before_refit"] and len(row["sites"]["evaluate"]) == 2
    assert {r["method"] for r in load_run(refitted)} == {"fedavg+refit(bn)"}

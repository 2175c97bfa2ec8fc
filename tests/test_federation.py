import pytest
import torch

from fedscan.common.federated.exchange import (
    exchanged_keys,
    get_exchanged,
    local_keys,
    set_exchanged,
)
from fedscan.common.learn.models import build_model
from tests.conftest import tree_train_settings


def test_only_trainable_stages_travel():
    m = build_model({"name": "efficientnet_lite0", "mode": "features"}, 4)
    keys = exchanged_keys(m)
    assert keys and all(k.startswith(f"stages.{len(m.stages) - 1}.") for k in keys)


def test_fedbn_keeps_batchnorm_local():
    m = build_model({"name": "paper_cnn"}, 3)
    shared, fedbn = exchanged_keys(m), exchanged_keys(m, fedbn=True)
    assert any("running_mean" in k for k in shared)
    assert not any("running_mean" in k for k in fedbn)
    assert set(local_keys(m, fedbn)) >= {k for k in shared if k not in fedbn}


def test_set_exchanged_refuses_bad_updates():
    m = build_model({"name": "paper_cnn"}, 3)
    keys = exchanged_keys(m)
    good = get_exchanged(m, keys)
    set_exchanged(m, good, keys)
    bad = dict(good)
    bad[keys[0]] = torch.full_like(good[keys[0]], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        set_exchanged(m, bad, keys)
    bad = dict(good)
    bad[keys[0]] = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        set_exchanged(m, bad, keys)
    with pytest.raises(ValueError, match="names"):
        set_exchanged(m, {**good, "stages.99.weight": torch.zeros(1)}, keys)


def test_proximal_term_pulls_local_model_towards_global():
    import numpy as np

    from fedscan.common.federated.trainer import local_fit

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 3, 64)
    settings = tree_train_settings(batch_size=16, lr=0.05, optimizer="sgd", augment="none")

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        m = build_model({"name": "paper_cnn"}, 3)
        start = [p.detach().clone() for p in m.parameters()]
        local_fit(
            m,
            x,
            y,
            np.arange(64),
            settings,
            device=torch.device("cpu"),
            start=0,
            epochs=3,
            proximal_mu=mu,
            seed=1,
        )
        return sum(
            float(((p.detach() - s) ** 2).sum()) for p, s in zip(m.parameters(), start, strict=True)
        )

    def plain() -> float:
        """The same local epochs without FedProx's machinery: train_one_epoch, no anchor."""
        from fedscan.common.learn.training import (
            Batches,
            loss_function,
            make_optimizer,
            place_model,
            train_one_epoch,
        )

        torch.manual_seed(0)
        m = place_model(build_model({"name": "paper_cnn"}, 3), torch.device("cpu"))
        start = [p.detach().clone() for p in m.parameters()]
        batches = Batches(x, y, np.arange(64), batch_size=16, shuffle=True, seed=1)
        opt = make_optimizer(m, settings)
        loss_fn = loss_function(settings, y, 3)
        for _ in range(3):
            train_one_epoch(m, batches, opt, loss_fn, device=torch.device("cpu"))
        return sum(
            float(((p.detach() - s) ** 2).sum()) for p, s in zip(m.parameters(), start, strict=True)
        )

    free, weak, prox = drift(0.0), drift(0.1), drift(1.0)
    assert free == plain()  # mu = 0 is plain local training, to the bit
    assert prox < weak < free  # a stronger pull, a smaller drift
    assert prox < 0.5 * free


def test_missing_data_path_is_named(tmp_path):
    from omegaconf import OmegaConf

    from fedscan.common.core.errors import DataError
    from fedscan.common.federated.site import site_config

    cfg = OmegaConf.create({"dataset": {"domain": "lung_ct", "split": {"policy": "scan_groups"}}})
    with pytest.raises(DataError, match="data-path"):
        site_config(cfg, str(tmp_path / "no-such-site"))
    (tmp_path / "site").mkdir()
    out = site_config(cfg, str(tmp_path / "site"))
    assert out.dataset.name == "site" and out.dataset.split.policy == "grouped"


def test_the_site_cache_is_owned_bounded_and_one_per_ray_actor(monkeypatch) -> None:
    """What a ClientApp keeps between messages: at most ``runs`` prepared runs, least
    recently used out; a pickled copy (Flower's Ray backend sends the ClientApp with
    every message) resolves to one cache per process, empty there, not a copy of the
    owner's data."""
    import pickle
    from types import SimpleNamespace

    import numpy as np

    from fedscan.common.federated import site as site_module
    from fedscan.common.federated.site import SiteCache

    prepared: list[str] = []
    monkeypatch.setattr(site_module, "site_config", lambda cfg, path: cfg)
    monkeypatch.setattr(
        site_module,
        "prepare_run",
        lambda cfg: prepared.append(cfg.seed) or SimpleNamespace(data=None),
    )
    monkeypatch.setattr(
        site_module, "site_indices", lambda cfg, data, **_: (np.arange(3), np.arange(1))
    )
    monkeypatch.setattr(SiteCache, "_in_process", {})
    cache = SiteCache(runs=2, sites=8)
    for seed in (0, 1, 0, 2, 0):
        cache.load(f"seed: {seed}\n", 0, 2, "")
        cache.load(f"seed: {seed}\n", 1, 2, "")  # another site of the same run: no prepare
    assert prepared == [0, 1, 2] and len(cache) == 2  # run 1 was least recently used
    cache.load("seed: 1\n", 0, 2, "")  # its site's entry is still cached (sites=8)
    assert prepared == [0, 1, 2]
    a, b = pickle.loads(pickle.dumps(cache)), pickle.loads(pickle.dumps(cache))
    assert a is b and a is not cache and len(a) == 0 and (a.runs, a.sites) == (2, 8)
    with pytest.raises(ValueError, match="sizes"):
        SiteCache(runs=0)

import pytest
import torch

from common.federation import exchanged_keys, get_exchanged, local_keys, set_exchanged
from common.models import build_model


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

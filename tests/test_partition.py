import numpy as np
import pytest

from common.errors import ConfigError, DataError
from common.partition import iid_partition


def test_iid_partition_keeps_groups_and_covers_once():
    rng = np.random.default_rng(0)
    n = 300
    groups = np.repeat(np.arange(60), 5)
    labels = (groups % 3).astype(np.int64)
    idx = rng.permutation(n)[:250]
    sites = iid_partition(idx, groups, labels, 5, seed=1)
    flat = np.concatenate(sites)
    assert sorted(flat.tolist()) == sorted(idx.tolist())
    owner = {}
    for s, members in enumerate(sites):
        for g in set(groups[members].tolist()):
            assert owner.setdefault(g, s) == s
    sizes = [len(s) for s in sites]
    assert max(sizes) - min(sizes) <= 10
    for s in sites:
        assert len(set(labels[s].tolist())) == 3
    again = iid_partition(idx, groups, labels, 5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(sites, again, strict=True))


def test_iid_partition_errors():
    g = np.arange(4)
    with pytest.raises(DataError, match="4 groups"):
        iid_partition(g, g, g % 2, 5, seed=0)
    with pytest.raises(ConfigError, match="num_sites"):
        iid_partition(g, g, g % 2, 0, seed=0)

"""Partitioners: properties over random group structures (hypothesis), and their skews."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.data.partition import class_histogram, iid_partition, partition

CONFIGS = [
    {"name": "iid", "min_samples": 1},
    {"name": "dirichlet", "alpha": 0.1, "min_samples": 1},
    {"name": "dirichlet", "alpha": 1.0, "min_samples": 1},
    {"name": "pathological", "classes_per_site": 2, "min_samples": 1},
    {"name": "quantity", "alpha": 0.5, "min_samples": 1},
]


@st.composite
def datasets(draw):
    """Random groups (1-8 samples each, like scans) with a class each, a random subset
    of them in the training pool, and a number of sites the groups can fill."""
    n_classes = draw(st.integers(2, 4))
    n_groups = draw(st.integers(6, 60))
    sizes = draw(st.lists(st.integers(1, 8), min_size=n_groups, max_size=n_groups))
    cls = draw(st.lists(st.integers(0, n_classes - 1), min_size=n_groups, max_size=n_groups))
    # every class present at least once
    cls[:n_classes] = list(range(n_classes))
    groups = np.repeat(np.arange(n_groups), sizes)
    labels = np.repeat(np.array(cls), sizes)
    perm = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(n_groups)
    # a shuffled id space: group ids need not be contiguous or sorted
    groups = perm[groups] * 7 + 3
    sites = draw(st.integers(1, min(6, n_groups // 2)))
    return groups, labels, sites


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['name']}-{c.get('alpha', '')}")
@settings(max_examples=40, deadline=None)
@given(data=datasets(), seed=st.integers(0, 1000))
def test_every_sample_once_groups_intact_and_seed_reproducible(cfg, data, seed):
    groups, labels, n_sites = data
    indices = np.arange(len(groups))
    if cfg["name"] == "pathological" and n_sites * 2 < labels.max() + 1:
        with pytest.raises(ConfigError, match="cannot cover"):
            partition(indices, groups, labels, n_sites, cfg=cfg, seed=seed)
        return
    try:
        sites = partition(indices, groups, labels, n_sites, cfg=cfg, seed=seed)
    except DataError as exc:  # an empty site after every draw: a clear, named refusal
        assert "site" in str(exc) and "min_samples" in str(exc)
        return
    assert len(sites) == n_sites
    flat = np.concatenate(sites)
    assert np.array_equal(np.sort(flat), indices)  # every sample exactly once
    owner = {}
    for s, members in enumerate(sites):
        assert len(members) >= 1
        for g in np.unique(groups[members]):
            assert owner.setdefault(int(g), s) == s  # a group never spans two sites
    again = partition(indices, groups, labels, n_sites, cfg=cfg, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(sites, again, strict=True))


def _blocks(n_groups=400, n_classes=4, size=3):
    groups = np.repeat(np.arange(n_groups), size)
    labels = groups % n_classes
    return np.arange(len(groups)), groups, labels


def _skew(sites, labels, n_classes=4):
    """Mean over sites of the largest class share: 1/n_classes when IID, 1 when one-class."""
    h = class_histogram(sites, labels, n_classes).astype(float)
    return float((h.max(1) / h.sum(1)).mean())


def test_skew_grows_as_alpha_falls_and_iid_matches_the_global_mix():
    idx, groups, labels = _blocks()
    skew = {
        a: np.mean(
            [
                _skew(
                    partition(
                        idx, groups, labels, 10, cfg={"name": "dirichlet", "alpha": a}, seed=s
                    ),
                    labels,
                )
                for s in range(5)
            ]
        )
        for a in (100.0, 1.0, 0.3, 0.1)
    }
    assert skew[100.0] < skew[1.0] < skew[0.3] < skew[0.1]
    iid = partition(idx, groups, labels, 10, cfg={"name": "iid"}, seed=0)
    assert _skew(iid, labels) == pytest.approx(0.25, abs=0.03)
    sizes = [len(s) for s in iid]
    assert max(sizes) - min(sizes) <= 3  # one group


def test_pathological_gives_each_site_exactly_k_classes():
    idx, groups, labels = _blocks()
    sites = partition(
        idx, groups, labels, 6, cfg={"name": "pathological", "classes_per_site": 2}, seed=3
    )
    h = class_histogram(sites, labels, 4)
    assert ((h > 0).sum(1) == 2).all()
    assert (h.sum(0) > 0).all()


def test_quantity_skews_sizes_not_labels():
    idx, groups, labels = _blocks()
    sites = partition(idx, groups, labels, 5, cfg={"name": "quantity", "alpha": 0.5}, seed=1)
    sizes = np.array([len(s) for s in sites])
    assert sizes.max() > 2 * sizes.min()
    for s in sites:
        if len(s) >= 60:
            share = np.bincount(labels[s], minlength=4) / len(s)
            assert np.abs(share - 0.25).max() < 0.08


def test_bad_settings_are_named():
    idx, groups, labels = _blocks(n_groups=12)
    with pytest.raises(ConfigError, match=r"partition\.name.*unknown partitioner 'zipf'"):
        partition(idx, groups, labels, 2, cfg={"name": "zipf"}, seed=0)
    with pytest.raises(ConfigError, match=r"partition\.alpha.*must be > 0"):
        partition(idx, groups, labels, 2, cfg={"name": "dirichlet", "alpha": 0}, seed=0)
    with pytest.raises(ConfigError, match=r"partition.*missing \['alpha'\]"):
        partition(idx, groups, labels, 2, cfg={"name": "dirichlet"}, seed=0)
    with pytest.raises(DataError, match=r"12 groups .* cannot fill 20 sites"):
        partition(idx, groups, labels, 20, cfg={"name": "iid"}, seed=0)
    with pytest.raises(DataError, match=r"site \d+ gets \d+ samples .*min_samples=30"):
        partition(idx, groups, labels, 2, cfg={"name": "iid", "min_samples": 30}, seed=0)


def test_iid_partition_keeps_groups_and_covers_once():
    rng = np.random.default_rng(0)
    n = 300
    groups = np.repeat(np.arange(60), 5)
    labels = (groups % 3).astype(np.int64)
    idx = rng.permutation(n)[:250]
    sites = iid_partition(idx, groups, labels, 5, seed=1)
    assert sorted(np.concatenate(sites).tolist()) == sorted(idx.tolist())
    for s in sites:
        assert len(set(labels[s].tolist())) == 3
    sizes = [len(s) for s in sites]
    assert max(sizes) - min(sizes) <= 10


@pytest.mark.usefixtures("_no_real_data")
def test_a_site_short_of_training_images_after_its_holdout_is_named(monkeypatch, caplog) -> None:
    """partition.min_samples counts training and validation images together; a site
    whose whole-group holdout leaves fewer training images than that is named."""
    import logging

    import fedscan.common.federated.site as site
    from fedscan.common.core.config import load_config
    from fedscan.common.data.pipeline import prepare_data
    from tests.conftest import SIM_BASE

    cfg = load_config([*SIM_BASE, "partition.min_samples=10"])
    data = prepare_data(cfg)
    caplog.set_level(logging.WARNING, logger="fedscan.site")
    train, _ = site.site_indices(cfg, data, partition_id=1, num_partitions=2)
    assert len(train) >= 10 and "training images" not in caplog.text
    monkeypatch.setattr(site, "group_holdout", lambda pool, *a, **k: (pool[:7], pool[7:]))
    train, _ = site.site_indices(cfg, data, partition_id=1, num_partitions=2)
    assert len(train) == 7
    assert "site 1 keeps 7 training images" in caplog.text
    assert "partition.min_samples=10 counts both" in caplog.text

"""Assigning training samples to virtual sites, by whole leakage groups.

A scan (or a set of duplicates) lives in one hospital; splitting it across two
virtual sites would inflate federated results. Every partitioner here assigns
groups, never single images.
"""

from __future__ import annotations

import numpy as np

from common.errors import ConfigError, DataError


def iid_partition(
    indices: np.ndarray, groups: np.ndarray, labels: np.ndarray, num_sites: int, *, seed: int
) -> list[np.ndarray]:
    """Stratified, size-balanced assignment of whole groups to ``num_sites`` sites.

    Groups are dealt out per majority class in random order, each to the site
    that currently holds the fewest samples of that class, so every site sees
    roughly the global class mix.
    """
    if num_sites < 1:
        raise ConfigError("num_sites", f"must be >= 1, got {num_sites}")
    indices = np.asarray(indices)
    gids, inverse = np.unique(groups[indices], return_inverse=True)
    if len(gids) < num_sites:
        raise DataError("partition", f"{len(gids)} groups cannot fill {num_sites} sites")
    members = [indices[inverse == g] for g in range(len(gids))]
    major = np.array([np.bincount(labels[m]).argmax() for m in members])
    rng = np.random.default_rng(seed)
    n_classes = int(labels[indices].max()) + 1
    load = np.zeros((num_sites, n_classes))
    total = np.zeros(num_sites)
    sites: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    order = rng.permutation(len(members))
    # Larger groups first so the greedy balance has small ones left to even out.
    order = order[np.argsort([-len(members[g]) for g in order], kind="stable")]
    for g in order:
        c = major[g]
        target = np.lexsort((rng.random(num_sites), total, load[:, c]))[0]
        sites[target].append(members[g])
        load[target, c] += len(members[g])
        total[target] += len(members[g])
    return [np.sort(np.concatenate(s)) for s in sites]

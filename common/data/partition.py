"""Assigning training samples to virtual sites, by whole leakage groups.

A scan (or a set of duplicates) lives in one hospital; splitting it across two
virtual sites would inflate federated results. Every partitioner here assigns
groups, never single images, which is why fedscan does not use flwr-datasets'
partitioners (they split by sample).

Partitioners are pure functions of (groups, labels, number of sites, seed) and
share one registry: ``partition.name`` picks one, the rest of the ``partition``
config group are its parameters. A group's class is its majority label (a group
is nearly always one class: slices of one scan, or copies of one image).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedscan.common.core.errors import ConfigError, DataError
from fedscan.common.core.registry import Registry

DRAWS = 20  # random draws a skewed partitioner may take to give every site its minimum


@dataclass(frozen=True)
class Groups:
    """The unit of assignment: members (sample indices), majority class and size."""

    members: list[np.ndarray]
    major: np.ndarray
    sizes: np.ndarray
    num_classes: int

    @classmethod
    def of(cls, indices: np.ndarray, groups: np.ndarray, labels: np.ndarray) -> Groups:
        indices = np.asarray(indices, dtype=np.int64)
        _, inverse = np.unique(groups[indices], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        members = [np.sort(m) for m in np.split(indices[order], bounds)] if len(indices) else []
        major = np.array([np.bincount(labels[m]).argmax() for m in members], dtype=np.int64)
        sizes = np.array([len(m) for m in members], dtype=np.int64)
        n_classes = int(labels[indices].max()) + 1 if len(indices) else 0
        return cls(members, major, sizes, n_classes)

    def __len__(self) -> int:
        return len(self.members)


Partitioner = Callable[..., np.ndarray]  # (Groups, num_sites, rng, **params) -> site per group
PARTITIONERS: Registry[Partitioner] = Registry("partitioner", "partition.name")


def _deal(groups: Groups, pick: np.ndarray, targets: np.ndarray, owner: np.ndarray, rng) -> None:
    """Give the groups ``pick`` to sites, largest first, each to the site furthest
    below its target sample count (ties broken at random)."""
    held = np.zeros(len(targets))
    order = rng.permutation(pick)
    order = order[np.argsort(-groups.sizes[order], kind="stable")]
    for g in order:
        deficit = targets - held
        site = np.lexsort((rng.random(len(targets)), -deficit))[0]
        owner[g] = site
        held[site] += groups.sizes[g]


@PARTITIONERS.register("iid")
def iid(groups: Groups, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Every site gets about the same number of samples and the global class mix."""
    owner = np.full(len(groups), -1)
    for c in range(groups.num_classes):
        pick = np.flatnonzero(groups.major == c)
        total = groups.sizes[pick].sum()
        _deal(groups, pick, np.full(num_sites, total / num_sites), owner, rng)
    return owner


@PARTITIONERS.register("dirichlet")
def dirichlet(
    groups: Groups, num_sites: int, rng: np.random.Generator, *, alpha: float
) -> np.ndarray:
    """Label skew: each class is spread over sites in Dirichlet(alpha) proportions.

    alpha = 100 is close to IID; alpha = 0.1 leaves most classes at one or two sites.
    """
    owner = np.full(len(groups), -1)
    for c in range(groups.num_classes):
        pick = np.flatnonzero(groups.major == c)
        share = rng.dirichlet(np.full(num_sites, float(alpha)))
        _deal(groups, pick, share * groups.sizes[pick].sum(), owner, rng)
    return owner


@PARTITIONERS.register("pathological")
def pathological(
    groups: Groups, num_sites: int, rng: np.random.Generator, *, classes_per_site: int
) -> np.ndarray:
    """Each site holds exactly ``classes_per_site`` classes (McMahan et al.'s shards).

    Classes are handed out round-robin over a shuffled class order, so every class
    has a site whenever ``num_sites * classes_per_site >= number of classes``.
    """
    k, n_cls = int(classes_per_site), groups.num_classes
    if not 1 <= k <= n_cls:
        raise ConfigError("partition.classes_per_site", f"must be in [1, {n_cls}], got {k}")
    if num_sites * k < n_cls:
        raise ConfigError(
            "partition.classes_per_site",
            f"{num_sites} sites x {k} classes cannot cover {n_cls} classes",
        )
    perm = rng.permutation(n_cls)
    holders: dict[int, list[int]] = {c: [] for c in range(n_cls)}
    for s in range(num_sites):
        for j in range(k):
            holders[int(perm[(s * k + j) % n_cls])].append(s)
    owner = np.full(len(groups), -1)
    for c, sites in holders.items():
        pick = np.flatnonzero(groups.major == c)
        sub = np.full(len(sites), groups.sizes[pick].sum() / len(sites))
        local = np.full(len(groups), -1)
        _deal(groups, pick, sub, local, rng)
        owner[pick] = np.asarray(sites)[local[pick]]
    return owner


@PARTITIONERS.register("quantity")
def quantity(
    groups: Groups, num_sites: int, rng: np.random.Generator, *, alpha: float
) -> np.ndarray:
    """Quantity skew: site sizes in Dirichlet(alpha) proportions, each with the global mix."""
    share = rng.dirichlet(np.full(num_sites, float(alpha)))
    owner = np.full(len(groups), -1)
    for c in range(groups.num_classes):
        pick = np.flatnonzero(groups.major == c)
        _deal(groups, pick, share * groups.sizes[pick].sum(), owner, rng)
    return owner


def _params(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any], int]:
    params = {k: v for k, v in cfg.items() if k not in ("name", "min_samples")}
    if "alpha" in params:
        try:
            params["alpha"] = float(params["alpha"])
        except (TypeError, ValueError):
            raise ConfigError(
                "partition.alpha", f"must be a number, got {params['alpha']!r}"
            ) from None
        if not params["alpha"] > 0:
            raise ConfigError("partition.alpha", f"must be > 0, got {params['alpha']}")
    min_samples = int(cfg.get("min_samples", 1))
    if min_samples < 1:
        raise ConfigError("partition.min_samples", f"must be >= 1, got {min_samples}")
    return str(cfg.get("name", "iid")), params, min_samples


def min_training_samples(cfg: Mapping[str, Any]) -> int:
    """``partition.min_samples``, checked: the training images every site is promised."""
    return _params(cfg)[2]


def check_partition_config(cfg: Mapping[str, Any], num_sites: int) -> None:
    """Fail on a bad ``partition`` setting before any data is read."""
    name, params, _ = _params(cfg)
    fn = PARTITIONERS.get(name)
    if num_sites < 1:
        raise ConfigError("num_sites", f"must be >= 1, got {num_sites}")
    accepted = {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY
    }
    unknown, missing = set(params) - accepted, accepted - set(params)
    if unknown or missing:
        raise ConfigError(
            "partition",
            f"'{name}' takes {sorted(accepted) or 'no parameters'}"
            + (f"; unknown {sorted(unknown)}" if unknown else "")
            + (f"; missing {sorted(missing)}" if missing else ""),
        )


def partition(
    indices: np.ndarray,
    groups: np.ndarray,
    labels: np.ndarray,
    num_sites: int,
    *,
    cfg: Mapping[str, Any],
    seed: int,
) -> list[np.ndarray]:
    """Split ``indices`` into ``num_sites`` sorted index arrays by whole ``groups``.

    Every index lands in exactly one site; every site gets at least
    ``partition.min_samples`` (its training images and its own validation split
    together), else a :class:`DataError` says which site and why.
    """
    check_partition_config(cfg, num_sites)
    name, params, min_samples = _params(cfg)
    g = Groups.of(indices, groups, labels)
    if len(g) < num_sites:
        raise DataError(
            "partition",
            f"{len(g)} groups (scans / duplicate sets) cannot fill {num_sites} sites; "
            "lower num_sites",
        )
    fn = PARTITIONERS.get(name)
    skewed = name != "iid"
    sizes = None
    for draw in range(DRAWS if skewed else 1):
        rng = np.random.default_rng([seed, draw])
        owner = fn(g, num_sites, rng, **params)
        sizes = np.bincount(owner, weights=g.sizes, minlength=num_sites)
        if sizes.min() >= min_samples:
            break
    else:
        worst = int(np.argmin(sizes))
        raise DataError(
            "partition",
            f"site {worst} gets {int(sizes[worst])} samples (< partition.min_samples="
            f"{min_samples}) in every one of {DRAWS} draws of '{name}' {params}; "
            "raise partition.alpha, lower num_sites or partition.min_samples",
        )
    sites = [[] for _ in range(num_sites)]
    for gi, s in enumerate(owner):
        sites[s].append(g.members[gi])
    return [np.sort(np.concatenate(s)) if s else np.zeros(0, np.int64) for s in sites]


def iid_partition(
    indices: np.ndarray, groups: np.ndarray, labels: np.ndarray, num_sites: int, *, seed: int
) -> list[np.ndarray]:
    """Stratified, size-balanced assignment of whole groups (``partition=iid``)."""
    return partition(indices, groups, labels, num_sites, cfg={"name": "iid"}, seed=seed)


def class_histogram(sites: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[site, class] sample counts: the partition report's table."""
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in sites])

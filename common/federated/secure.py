"""``secure_aggregation``: the settings of Flower's SecAgg+ and what they exclude.

Under SecAgg+ the server receives only the masked sum of the sampled sites'
updates. Everything that needs one site's update (a robust aggregate, SCAFFOLD's
per-site control deltas, a sum it must see to clip) cannot run on it; the checks
here refuse those combinations before any site trains, naming both keys. The
protocol itself is Flower's (``server/secure.py``, ``client/secure.py``): fedscan
writes no cryptography.

What a site sends is its *update*, new weights minus the global weights, not
its weights: an update is small, so the clipping range (``clipping_range``)
rarely bites and the quantisation step (2 x clipping_range / quantization_range)
is small against it. :func:`quantization_bound` is the largest error the
protocol can add to one value of the weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedscan.common.core.errors import ConfigError
from fedscan.common.federated.masks import GENERATORS

NAMES = ("off", "secaggplus")
# The statistics round under SecAgg+ quantises finer than training rounds: 2**30 levels
# (the most Flower's int32 rounding holds) in a 2**40 modulus (room for 1,024 sites)
STATISTICS_QUANTIZATION = 2**30
STATISTICS_MODULUS = 2**40
# Strategies whose aggregate is a weighted mean of the updates: the masked sum suffices
SUM_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True, kw_only=True)
class SecureAggregationSettings:
    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    statistics_scale: float
    timeout_s: float | None
    mask_generator: str  # what derives the masks (masks.py); announced to and checked by sites

    def __post_init__(self) -> None:
        checks = [
            ("num_shares", self.num_shares >= 3, "must be an integer >= 3 (Flower: > 2)"),
            (
                "reconstruction_threshold",
                2 <= self.reconstruction_threshold < self.num_shares,
                f"must be >= 2 and < secure_aggregation.num_shares ({self.num_shares})",
            ),
            ("clipping_range", self.clipping_range > 0, "must be > 0"),
            ("quantization_range", self.quantization_range > 0, "must be an integer > 0"),
            (
                "modulus_range",
                self.modulus_range > self.quantization_range
                and self.modulus_range & (self.modulus_range - 1) == 0,
                "must be a power of 2 greater than secure_aggregation.quantization_range",
            ),
            ("max_weight", self.max_weight > 0, "must be > 0"),
            ("statistics_scale", self.statistics_scale > 0, "must be > 0"),
            ("timeout_s", self.timeout_s is None or self.timeout_s > 0, "must be > 0 or null"),
            (
                "mask_generator",
                self.mask_generator in GENERATORS,
                f"must be one of {list(GENERATORS)} (the SecAgg+ mask generators this "
                "fedscan implements)",
            ),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"secure_aggregation.{key}", f"{msg}, got {getattr(self, key)!r}")


def secure_settings(section: Mapping[str, Any] | None) -> SecureAggregationSettings | None:
    """The ``secure_aggregation`` section, typed and checked; ``None`` when off (or a
    config from before the section existed)."""
    name = "off" if section is None else str(section.get("name"))
    if name not in NAMES:
        raise ConfigError("secure_aggregation", f"unknown '{name}'; use one of {list(NAMES)}")
    if name == "off":
        return None
    values: dict[str, Any] = {}
    for key in ("num_shares", "reconstruction_threshold", "quantization_range", "modulus_range"):
        value = section.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"secure_aggregation.{key}", f"must be an integer, got {value!r}")
        values[key] = value
    for key in ("clipping_range", "max_weight", "statistics_scale"):
        try:
            values[key] = float(section.get(key))
        except (TypeError, ValueError):
            raise ConfigError(
                f"secure_aggregation.{key}", f"must be a number, got {section.get(key)!r}"
            ) from None
    timeout = section.get("timeout_s")
    values["timeout_s"] = None if timeout is None else float(timeout)
    values["mask_generator"] = section.get("mask_generator")
    return SecureAggregationSettings(**values)


def check_combination(
    settings: SecureAggregationSettings,
    *,
    strategy: str,
    num_sites: int,
    privacy: str,
    central_side: str = "client",
    central_clipping: str = "fixed",
    simulated: bool,
) -> None:
    """Refuse what cannot run on a masked sum, before any training."""
    if strategy not in SUM_STRATEGIES:
        raise ConfigError(
            "strategy",
            f"strategy={strategy} needs every site's own update, and "
            "secure_aggregation=secaggplus shows the server only their sum; use "
            f"{' or '.join(SUM_STRATEGIES)}, or secure_aggregation=off",
        )
    # In deployment the number of sites is not known in advance (min_nodes is a floor);
    # Flower then shares among all sampled sites when they are fewer than num_shares.
    if simulated and settings.num_shares > num_sites:
        raise ConfigError(
            "secure_aggregation.num_shares",
            f"{settings.num_shares} shares need at least as many sites; num_sites is {num_sites}",
        )
    if privacy == "central" and (central_side, central_clipping) != ("client", "fixed"):
        raise ConfigError(
            "privacy.side" if central_side != "client" else "privacy.clipping",
            "secure_aggregation=secaggplus works with central DP whose updates are clipped "
            "at the sites with a fixed norm (privacy.side=client, privacy.clipping=fixed): "
            "the server cannot clip or count what it cannot see",
        )


def quantization_bound(settings: SecureAggregationSettings, weights: list[float]) -> float:
    """The largest error SecAgg+'s quantisation can add to one value of the weighted
    mean of updates, for sites of these ``weights`` (num-examples).

    Each site's update x its weight / max_weight is rounded to a grid of step
    2 c / q (c = clipping range, q = quantisation range): at most c / q off; its
    weight ratio is rounded to 1 / q. The mean divides by the summed ratios, so the
    value errors add up to at most n (c / q) / sum(ratio), plus the ratio rounding
    (at most n / q relative, times the largest value c).
    """
    c, q = settings.clipping_range, settings.quantization_range
    ratios = [w / settings.max_weight for w in weights]
    total = sum(ratios)
    n = len(weights)
    return n * (c / q) / total + c * n / (q * total)


def statistics_bound(settings: SecureAggregationSettings, sites: int) -> float:
    """The largest error SecAgg+ can add to one entry of the summed statistics: each
    site's sums / ``statistics_scale`` are rounded to a step of 2 c / q
    (:data:`STATISTICS_QUANTIZATION`), their mean is off by at most one step, and
    the total is that mean times sites x scale."""
    step = 2 * settings.clipping_range / STATISTICS_QUANTIZATION
    return sites * settings.statistics_scale * step


def scaled_statistics(
    stats: Mapping[str, np.ndarray], *, scale: float, clipping_range: float
) -> tuple[list[str], list[np.ndarray]]:
    """A site's feature sums as a SecAgg+ "update": sorted names and each array
    divided by ``statistics_scale`` (float64). Values outside the clipping range
    would be clipped silently by the protocol, so they are refused here, naming the
    key that fixes it."""
    names = sorted(stats)
    scaled = [np.asarray(stats[k], dtype=np.float64) / scale for k in names]
    worst = max((float(np.abs(a).max()) for a in scaled if a.size), default=0.0)
    if worst > clipping_range:
        raise ConfigError(
            "secure_aggregation.statistics_scale",
            f"{scale:g}: this site's statistics / scale reach {worst:.3g}, outside the "
            f"clipping range {clipping_range:g}; raise the scale",
        )
    return names, scaled


def weighted_peak(update: Sequence[np.ndarray], n: int, *, max_weight: float) -> float:
    """The largest value SecAgg+ clips of this site's update: ``|update| x n /
    max_weight`` (the protocol weights each update before clipping it to the range)."""
    peak = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    return peak * n / max_weight

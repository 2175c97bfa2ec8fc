"""``fedscan simulate``: one run, or a Hydra sweep (``-m``), of any method.

``method=federated`` drives the same ServerApp / ClientApp as ``flwr run``
(:mod:`simulations.federated`); ``method=local`` and ``method=pooled`` are the
baselines of :mod:`simulations.baselines`. A sweep is expanded with Hydra's own
sweeper syntax (``seed=0,1,2``, ``partition.alpha=1.0,0.3,0.1``,
``seed=range(0,3)``), and every run of it is validated before the first one
trains, so a typo in the fifth combination does not surface an hour later.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from fedscan.common.core.config import expand_sweep, load_config
from fedscan.common.core.recipes import log_recipe
from fedscan.common.runs.validate import METHODS, check_sites, validate

log = logging.getLogger("fedscan.simulate")


def merged(*groups: Sequence[str]) -> list[str]:
    """Overrides in order, a later ``key=value`` replacing an earlier one of the same key
    (Hydra refuses a key set twice; a driver's cell must win over its base)."""
    out: dict[str, str] = {}
    for group in groups:
        for item in group:
            out[item.split("=", 1)[0]] = item
    return list(out.values())


def smoothing_text(args: argparse.Namespace) -> str:
    """The label smoothing every run of a driver got, for its page's Setting line."""
    v = args.label_smoothing
    text = "no label smoothing" if v == 0 else f"label smoothing {v:g}"
    # the pages were measured without them (PAGES_CACHED_FLIPS): named only when on
    flips = getattr(args, "cached_flips", False)  # a page written from old arguments: off
    return text + (", left/right flips of the cached prefix" if flips else "")


def validate_overrides(overrides: Sequence[str]) -> DictConfig:
    """The resolved config of one run, checked for its ``method`` (no data read)."""
    cfg = load_config(overrides)
    method = str(cfg.method)
    validate(cfg, method if method in METHODS else "federated")
    return cfg


def run_one(overrides: Sequence[str]) -> Path:
    """One run of any method; the first thing it logs is what its recipe set, if any."""
    cfg = validate_overrides(overrides)
    log_recipe(cfg)
    method = str(cfg.method)
    if method == "local":
        from fedscan.simulations.baselines import run_local

        return run_local(cfg)
    if method == "pooled":
        from fedscan.simulations.baselines import run_pooled

        return run_pooled(cfg)
    from fedscan.simulations.federated import run_federated

    return run_federated(overrides)


def sweep_experiment(runs: list[list[str]]) -> list[list[str]]:
    """Every run of a sweep into one MLflow experiment, ``sweep-<time>``, so ``mlflow ui``
    compares them in one table; a ``tracking.experiment`` the user set is kept."""
    if not runs or any(o.startswith("tracking.experiment=") for o in runs[0]):
        return runs
    if str(load_config(runs[0]).tracking.name) == "none":
        return runs
    name = f"tracking.experiment=sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    log.info("sweep: tracked as MLflow experiment %s", name.split("=", 1)[1])
    return [[*r, name] for r in runs]


def run_sweep(overrides: Sequence[str]) -> list[Path]:
    runs = sweep_experiment(expand_sweep(overrides))
    for r in runs:  # all of them before any training: keys, values, then the partitions
        validate_overrides(r)
    for r in runs:  # a partition that cannot fill its sites fails now, not after hours
        cfg = load_config(r)
        if str(cfg.method) in ("federated", "local") and not cfg.federation.resume:
            check_sites(cfg)
    log.info("sweep: %d runs", len(runs))
    out = []
    for i, r in enumerate(runs, 1):
        log.info("sweep run %d/%d: %s", i, len(runs), " ".join(r))
        out.append(run_one(r))
    return out


# The image size the drivers' pages were measured at: brain's default until 2026-11-27
# (160 px since, docs/results/default-vs-plain.md). Pinned so that each page's command still
# regenerates it, and a re-run reuses its finished cells.
PAGES_IMAGE_SIZE = 224
# Likewise the label smoothing: none until 2026-11-27 (0.1 since, chosen on brain's
# validation split, docs/results/default-vs-plain.md). An override of it wins.
PAGES_LABEL_SMOOTHING = 0.0
# And without flips of a cached prefix (brain's default since 2026-11-27).
PAGES_CACHED_FLIPS = False


def driver_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, out: str, docs: Path
) -> argparse.Namespace:
    """Parse a study driver's command line with the options all drivers share.

    Every driver trains into run folders under ``--out`` and writes one page
    (``--docs``) from them; ``--report-only`` rewrites the page from existing
    folders without training, and trailing overrides reach every run, after
    ``dataset.image_size=--image-size``, ``train.label_smoothing=0`` and
    ``train.cached_flips=false`` (the settings the pages were measured with; an
    override of any wins).
    """
    parser.add_argument("--out", default=out)
    parser.add_argument("--docs", default=str(docs))
    parser.add_argument(
        "--image-size",
        type=int,
        default=PAGES_IMAGE_SIZE,
        help=f"dataset.image_size of every run (default {PAGES_IMAGE_SIZE}: the page's)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the page from the run folders under --out, training nothing",
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args(argv)
    args.typed = list(args.overrides)  # as given, for a page's regenerate command
    pinned = [
        f"dataset.image_size={args.image_size}",
        f"train.label_smoothing={PAGES_LABEL_SMOOTHING}",
        f"train.cached_flips={str(PAGES_CACHED_FLIPS).lower()}",
    ]
    args.overrides = merged(pinned, args.overrides)
    args.label_smoothing = PAGES_LABEL_SMOOTHING
    args.cached_flips = PAGES_CACHED_FLIPS
    for item in args.overrides:  # what the runs get, for the page's text
        key, _, value = item.partition("=")
        if key == "dataset.image_size" and value.isdigit():  # else the config check names it
            args.image_size = int(value)
        if key == "train.cached_flips":  # a value Hydra reads as true (else the check names it)
            args.cached_flips = value.strip().lower() == "true"
        if key == "train.label_smoothing":
            with contextlib.suppress(ValueError):  # else the config check names the key
                args.label_smoothing = float(value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a line per plugin at INFO
    return args

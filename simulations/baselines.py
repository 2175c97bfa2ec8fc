"""The two references a federated result is read against (FLamby-style):

- **local**: every site trains alone on its own partition, with the same local
  compute a federated run gives it (rounds x local epochs), and is evaluated on
  the global test sets. What a hospital gets without federating.
- **pooled**: one model trained on all sites' data together (the centralised
  baseline, ``fedscan train``, with the same epochs). What federation tries to
  reach without moving the data.

Both use the same partition (``partition`` group, ``seed``) as ``fedscan
simulate`` and the same ``common`` training code as the sites.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedscan.common.data.splits import groups_are_scans
from fedscan.common.federated.head_init import linear_head
from fedscan.common.federated.refit import initial_kinds, install_round, local_statistics, refit
from fedscan.common.federated.site import site_indices
from fedscan.common.federated.site_names import site_label
from fedscan.common.federated.trainer import site_seed
from fedscan.common.federated.wire import SITE_ID
from fedscan.common.learn.features import mirrored_features
from fedscan.common.learn.models import build_model
from fedscan.common.learn.prepare import prepare_run
from fedscan.common.learn.shipped import shipped_inputs
from fedscan.common.learn.training import Batches, evaluate_model, fit
from fedscan.common.runs import cross_site
from fedscan.common.runs.partition_report import write_partition_report
from fedscan.common.runs.record import new_run_dir, partition_label, write_config, write_local
from fedscan.common.runs.tracking import track_finished
from fedscan.common.runs.validate import validate

log = logging.getLogger("fedscan.baseline")


def run_pooled(cfg: DictConfig) -> Path:
    """All sites' data together, trained for the federated run's epoch budget."""
    from fedscan.simulations.centralised import run_centralised

    fed = validate(cfg, "pooled").federation
    budget = fed.epoch_budget
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.train.epochs = max(budget, 1)  # rounds=0: the closed-form head alone, no epoch
    return run_centralised(cfg, kind="pooled", train=budget > 0)


def run_local(cfg: DictConfig) -> Path:
    """Each site alone; ``metrics.json`` holds every site's test metrics."""
    t0 = time.perf_counter()
    checked = validate(cfg, "local")
    fed = checked.federation
    budget = fed.epoch_budget
    settings = dataclasses.replace(checked.train, epochs=max(budget, 1))
    n_sites = fed.num_sites
    run = prepare_run(cfg)
    device, data, x, start = run.device, run.data, run.x, run.start
    c = data.collection
    # every partition first: a bad partition fails before any site trains
    parts = [
        site_indices(cfg, data, partition_id=p, num_partitions=n_sites) for p in range(n_sites)
    ]
    run_dir = new_run_dir(cfg, "local")
    write_config(run_dir, cfg)
    counts = np.stack([np.bincount(c.labels[tr], minlength=len(c.classes)) for tr, _ in parts])
    names = [site_label({SITE_ID: p}) for p in range(n_sites)]  # as a federation names them
    write_partition_report(
        run_dir,
        names,
        counts,
        c.classes,
        title=f"{data.label} | partition {partition_label(cfg)} | training samples per site",
    )
    x_test = shipped_inputs(run, cfg)  # the test splits as the exported model computes them
    tests = {
        n: Batches(x_test, c.labels, idx, batch_size=64) for n, idx in data.splits.tests.items()
    }
    sites, cross = [], []
    for pid, (train_idx, val_idx) in enumerate(parts):
        torch.manual_seed(site_seed(settings.seed, 0, pid))  # a site's round-0 seed
        model = build_model(cfg.model, len(c.classes))

        def own_sums(kind: str, model=model, train_idx=train_idx, pid=pid) -> dict:
            """The site's own ``kind`` statistics, from its data alone (as it would
            answer a federation's statistics round)."""
            return local_statistics(
                model,
                kind,
                x,
                c.labels,
                train_idx,
                start=start,
                device=device,
                batch_size=settings.batch_size,
                seed=site_seed(settings.seed, 0, pid),
            )

        for stat in initial_kinds(model, fed):  # the centre, then the head
            install_round(model, stat, own_sums, fed)
        if fed.head_freeze:  # as at a federated site: the head stays as it starts
            linear_head(model).requires_grad_(False)
        train = Batches(
            x,
            c.labels,
            train_idx,
            batch_size=settings.batch_size,
            shuffle=True,
            balanced=settings.sampler == "balanced",
            mirrored=mirrored_features(run.model, data, cfg, device, train_idx) if budget else None,
            seed=settings.seed + pid,
        )
        val = Batches(x, c.labels, val_idx, batch_size=64)
        if budget > 0:
            fit(model, train, val, settings, device=device, start=start)
            refit(model, fed, own_sums)  # the site's own statistics, as a federation's
        final = {
            name: evaluate_model(
                model,
                b,
                c.classes,
                device=device,
                start=start,
                groups=data.splits.groups,
                intervals=checked.intervals,
                scans=groups_are_scans(cfg.dataset),
            )
            for name, b in tests.items()
        }
        scores = [  # this site's model on every site's validation split, then the tests
            evaluate_model(
                model, Batches(x, c.labels, v, batch_size=64), c.classes, device=device, start=start
            )["accuracy"]
            for _, v in parts
        ]
        cross.append(scores + [m["accuracy"] for m in final.values()])
        first = next(iter(final))
        log.info(
            "site %d (sites 0-%d, as in partition.csv; %d train): %s acc %.4f macro-F1 %.4f",
            pid,
            n_sites - 1,
            len(train_idx),
            first,
            final[first]["accuracy"],
            final[first]["macro_f1"],
        )
        sites.append({SITE_ID: pid, "n_train": len(train_idx), "final": final})
    write_local(
        run_dir,
        label=data.label,
        synthetic=c.synthetic,
        dataset=c.name,
        model=run.model.name,
        epochs=budget,
        wall_time_s=round(time.perf_counter() - t0, 1),
        sites=sites,
        cross_site=(
            cm := cross_site.matrix(
                names,
                [*map(cross_site.site_column, names), *tests],
                cross,
            )
        ),
    )
    cross_site.plot(
        cm, run_dir / cross_site.FILE, title=f"{data.label} | each site's own model | accuracy"
    )
    log.info("results: %s", run_dir)
    track_finished(cfg, run_dir)
    return run_dir

"""The partition report: how many training samples of each class every site holds.

Written into a run folder as ``partition.csv`` (site, class counts, total) and
``partition.png`` (stacked bars). In a federation the counts are what the sites
themselves report with their first update, so the report is true in deployment
too, not only in simulation.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedscan.common.federated.site_names import site_label
from fedscan.common.federated.wire import COUNT_PREFIX
from fedscan.common.runs.plots import plot_site_histogram


def counts_from_sites(
    rows: Sequence[Mapping], classes: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """(site labels, [site, class] counts) from sites' train metrics rows."""
    by_site: dict[str, list[int]] = {}
    for r in rows:
        if f"{COUNT_PREFIX}{classes[0]}" not in r:
            continue
        by_site[site_label(r)] = [int(r[f"{COUNT_PREFIX}{c}"]) for c in classes]
    names = sorted(by_site, key=lambda s: (len(s), s))
    counts = np.array([by_site[s] for s in names], dtype=np.int64).reshape(len(names), -1)
    return names, counts


def write_partition_report(
    run_dir: Path, sites: Sequence[str], counts: np.ndarray, classes: Sequence[str], *, title: str
) -> None:
    with open(run_dir / "partition.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["site", *classes, "total"])
        for s, row in zip(sites, counts, strict=True):
            w.writerow([s, *map(int, row), int(row.sum())])
    if len(sites):
        plot_site_histogram(counts, classes, run_dir / "partition.png", title=title, sites=sites)

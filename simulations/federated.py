"""In-process federated simulation: the same ServerApp and ClientApp as ``flwr run``.

``flwr.simulation.run_simulation`` leaves ``run_config`` empty, so the apps are
built with the overrides baked in (``make_server_app(overrides)``); everything
else, including the config tree, is shared with ``flwr run``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from common.errors import ConfigError
from common.parallel import available_cpus
from simulations.harness import validate

log = logging.getLogger("fedscan.simulate")


def check_sites(cfg) -> None:
    """Partition the data as the sites will, before Ray starts: a partition that
    cannot give every site its minimum, or a site too small to hold out its own
    validation split, fails here with the site named. The decode cache this
    builds is the one the sites read."""
    from common.pipeline import prepare_data
    from common.site import site_indices

    data = prepare_data(cfg)
    n = int(cfg.federation.num_sites)
    for pid in range(n):
        site_indices(cfg, data, partition_id=pid, num_partitions=n)


def run_federated(overrides: Sequence[str], *, client_mods: Sequence = ()) -> Path:
    """Simulate the federation of ``overrides``; returns the run folder.

    ``client_mods``: Flower mods placed outermost in every site's ClientApp.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    overrides = list(overrides)
    cfg = validate(overrides)  # fail on a bad override before Ray starts
    if cfg.federation.resume is None:
        check_sites(cfg)
    runs_dir = Path(str(cfg.runs_dir)).expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    before = set(runs_dir.iterdir())
    # Absolute paths: Ray actors may start in another working directory.
    overrides = [*overrides, f"runs_dir={runs_dir}"]
    cpus = available_cpus()
    per_site = int(cfg.federation.cpus_per_site or cpus)
    if not 1 <= per_site <= cpus:
        raise ConfigError("federation.cpus_per_site", f"must be in [1, {cpus}], got {per_site}")
    run_simulation(
        server_app=make_server_app(tuple(overrides)),
        # torch threads = the CPUs Ray gives each site actor: no oversubscription
        client_app=make_client_app((*overrides, f"num_threads={per_site}"), client_mods),
        num_supernodes=int(cfg.federation.num_sites),
        backend_config={
            "client_resources": {"num_cpus": per_site, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False},
        },
    )
    if cfg.federation.resume:
        return Path(str(cfg.federation.resume)).resolve()
    new = sorted(set(runs_dir.iterdir()) - before)
    if not new:
        raise RuntimeError("the simulation finished without writing a run folder; see the log")
    return new[-1]

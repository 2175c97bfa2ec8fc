"""In-process federated simulation: the same ServerApp and ClientApp as ``flwr run``.

``flwr.simulation.run_simulation`` leaves ``run_config`` empty, so the apps are
built with the overrides baked in (``make_server_app(overrides)``); everything
else, including the config tree, is shared with ``flwr run``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fedscan.common.core.config import load_config
from fedscan.common.core.errors import ConfigError
from fedscan.common.core.parallel import available_cpus
from fedscan.common.runs.validate import check_sites, validate

log = logging.getLogger("fedscan.simulate")


class _NotRunSimulationDeprecation(logging.Filter):
    """Drops Flower's "run_simulation is deprecated" warning: ``fedscan simulate`` calls it
    on purpose (in-process, one Python object per app; ``flwr run`` is the supported
    path and needs no such call) and the user cannot act on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any("run_simulation" in str(a) for a in args) or (
            "DEPRECATED FEATURE" not in str(record.msg)
        )


@contextmanager
def _deprecation_quiet() -> Iterator[None]:
    """The filter on Flower's logger for one ``run_simulation`` call, removed after it:
    nothing else Flower logs is touched, and no later caller inherits it."""
    flwr_log, quiet = logging.getLogger("flwr"), _NotRunSimulationDeprecation()
    flwr_log.addFilter(quiet)
    try:
        yield
    finally:
        flwr_log.removeFilter(quiet)


def run_federated(overrides: Sequence[str], *, client_mods: Sequence = ()) -> Path:
    """Simulate the federation of ``overrides``; returns the run folder.

    ``client_mods``: Flower mods placed outermost in every site's ClientApp.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Ray >= 2.40 warns on every start unless told how to treat CUDA_VISIBLE_DEVICES
    # for zero-GPU actors; 0 keeps today's behaviour, without the FutureWarning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    overrides = list(overrides)
    cfg = load_config(overrides)
    fed = validate(cfg, "federated").federation  # a bad override fails before Ray starts
    cpus = available_cpus()
    per_site = fed.cpus_per_site or cpus
    if per_site > cpus:
        raise ConfigError("federation.cpus_per_site", f"must be in [1, {cpus}], got {per_site}")
    if fed.resume is None:
        check_sites(cfg)

    from flwr.simulation import run_simulation

    from fedscan.client.app import make_client_app
    from fedscan.server.app import make_server_app
    from fedscan.simulations.engine import choose_engine, inprocess_backend

    engine = choose_engine(fed.engine, cpus_per_site=per_site, cpus=cpus)
    log.info(
        "simulation engine: %s (%d site(s), %d CPU(s) per site)",
        engine,
        fed.num_sites,
        per_site,
    )

    runs_dir = Path(str(cfg.runs_dir)).expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Absolute paths: Ray actors may start in another working directory.
    overrides = [*overrides, f"runs_dir={runs_dir}"]
    opened: list[Path] = []  # the ServerApp names its run folder here
    in_process = engine == "inprocess"
    swap = inprocess_backend() if in_process else contextlib.nullcontext()
    with swap as check, _deprecation_quiet():
        run_simulation(
            server_app=make_server_app(
                tuple(overrides),
                announce=False,
                before=check.wait if in_process else None,
                on_run_dir=opened.append,
            ),
            # torch threads = the CPUs Ray gives each site actor: no oversubscription
            client_app=make_client_app(
                (*overrides, f"num_threads={per_site}"), client_mods, entry_point=not in_process
            ),
            num_supernodes=fed.num_sites,
            backend_config={
                "client_resources": {"num_cpus": per_site, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "include_dashboard": False},
            },
        )
    if not opened:
        raise RuntimeError("the simulation finished without opening a run folder; see the log")
    return opened[-1]

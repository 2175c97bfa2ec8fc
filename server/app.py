"""fedscan ServerApp: check the config, wait for the sites, open (or resume) the run
folder, and hand the run to :class:`~fedscan.server.federation.Federation`, driven by
the plain Message-API path or by SecAgg+."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedscan.common.core.config import load_config, overrides_from_run_config
from fedscan.common.core.errors import ConfigError
from fedscan.common.core.logs import configure_logging
from fedscan.common.core.recipes import log_recipe
from fedscan.common.federated.exchange import exchanged_keys, set_exchanged
from fedscan.common.learn.prepare import prepare_run
from fedscan.common.runs.record import REFITTED, FederatedRun, new_run_dir
from fedscan.common.runs.tracking import start_tracking
from fedscan.common.runs.validate import Settings, validate
from fedscan.server.federation import Federation
from fedscan.server.rounds import Aggregator, MessageRounds
from fedscan.server.strategies import SiteRecording, build_strategy, wrap_central_dp

log = logging.getLogger("fedscan.server")


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float) -> int:
    """Block until ``min_nodes`` sites are connected; fail clearly instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= min_nodes:
            return n
        if time.monotonic() >= deadline:
            raise ConfigError(
                "federation.min_nodes",
                f"{min_nodes} sites required but only {n} connected after {timeout_s:.0f} s "
                "(lower federation.min_nodes or start more SuperNodes)",
            )
        time.sleep(1.0)


def _aggregator(
    grid: Grid,
    cfg: DictConfig,
    settings: Settings,
    recording: SiteRecording,
    keys: list[str],
    key: str,
) -> Aggregator:
    """The path's aggregator: the configured strategy (``recording``: it keeps the
    sites' rows and the resumable state) over the Message API, in Flower's central-DP
    wrapper with ``privacy=central``; or SecAgg+ rounds whose sites evaluate through
    that same strategy."""
    fed = settings.federation
    strategy = recording
    # under SecAgg+ server/secure.py wraps Flower's legacy workflow in its own DP wrapper
    if settings.central_dp is not None and settings.secure is None:
        sampled = max(1, round(len(list(grid.get_node_ids())) * fed.fraction_train))
        strategy = wrap_central_dp(recording, settings.central_dp, sampled)
        log.info("central DP: %s", strategy)
    rounds = MessageRounds(grid, strategy, recording, fed, run_key=key)
    if settings.secure is None:
        return rounds
    from fedscan.server.secure import SecureRounds  # only the sums' total is seen

    return SecureRounds(
        grid,
        settings.secure,
        fed,
        names=keys,
        strategy_cfg=cfg.strategy,
        central_dp=settings.central_dp,
        run_key=key,
        evaluation=rounds,
    )


def run_server(
    grid: Grid, cfg: DictConfig, *, on_run_dir: Callable[[Path], None] | None = None
) -> Path:
    """Everything the ServerApp does, callable from tests and ``fedscan simulate``;
    ``on_run_dir`` is handed the run folder as soon as it is open (``fedscan simulate``
    names its result by it)."""
    settings = validate(cfg, "server")  # before waiting for sites or reading data
    fed = settings.federation
    recording = build_strategy(cfg.strategy, fed)  # a bad strategy fails before waiting
    log.info("%d sites connected", wait_for_nodes(grid, fed.min_nodes, fed.wait_for_nodes_s))
    run = prepare_run(cfg)
    keys = exchanged_keys(run.model, fedbn=fed.fedbn)
    folder = {"label": run.data.label, "synthetic": run.data.collection.synthetic}
    folder["classes"] = run.classes
    done, refitted, state = 0, False, None
    if fed.resume:
        run_dir = Path(fed.resume).expanduser().resolve()
        record, state = FederatedRun.resume(run_dir, cfg, **folder)
        done, refitted = int(state["round"]), bool(state.get(REFITTED, False))
        set_exchanged(run.model, state["arrays"], keys)
        log.info("resuming %s after round %d of %d", run_dir, done, fed.rounds)
    else:
        run_dir = new_run_dir(cfg, "federated")
        record = FederatedRun(run_dir, cfg, **folder)
    log.info("run folder: %s", run_dir)
    if on_run_dir is not None:
        on_run_dir(run_dir)
    tracker = start_tracking(cfg, run_dir, kind="federated")  # resumed: the same MLflow run
    aggregator = None
    try:
        aggregator = _aggregator(grid, cfg, settings, recording, keys, run_dir.name)
        if state is not None:
            aggregator.import_state(state["strategy_state"])
        Federation(
            cfg=cfg,
            settings=settings,
            run=run,
            keys=keys,
            aggregator=aggregator,
            record=record,
            tracker=tracker,
            done=done,
            refitted=refitted,
        ).run()
    except BaseException:
        tracker.finish(run_dir, failed=True)
        raise
    finally:
        if aggregator is not None:
            aggregator.close()
    tracker.finish(run_dir)
    return run_dir


def make_server_app(
    overrides: tuple[str, ...] = (),
    *,
    announce: bool = True,
    entry_point: bool = False,
    before: Callable[[], None] | None = None,
    on_run_dir: Callable[[Path], None] | None = None,
) -> ServerApp:
    """The ServerApp. ``announce``: print where the results are (``flwr run`` users read
    it in the stream; ``fedscan simulate`` prints its own ``results:`` line instead).
    ``entry_point``: this app is what ``flwr run`` loads, so it sets up logging (library
    code never does). ``before`` runs before any work (``fedscan simulate``'s check
    that its in-process engine is the one running); ``on_run_dir`` is handed the run
    folder."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if entry_point:
            configure_logging()
        if before is not None:
            before()
        cfg = load_config([*overrides_from_run_config(dict(context.run_config)), *overrides])
        if announce:  # fedscan simulate has said it already
            log_recipe(cfg)
        run_dir = run_server(grid, cfg, on_run_dir=on_run_dir)
        if announce:
            print(f"fedscan: results in {run_dir}", flush=True)

    return app


app = make_server_app(entry_point=True)

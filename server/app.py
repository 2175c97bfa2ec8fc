"""fedscan ServerApp: pick the strategy from config, evaluate the global model on the
held-out test sets every round, write the run folder, checkpoint and resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedscan.common.core.config import load_config, overrides_from_run_config
from fedscan.common.core.errors import ConfigError
from fedscan.common.data.splits import groups_are_scans
from fedscan.common.federated.bn_stats import BN_KIND, check_bn_refit, install_bn
from fedscan.common.federated.exchange import exchanged_keys, get_exchanged, set_exchanged
from fedscan.common.federated.head_init import linear_head, set_head, solve_head, sum_statistics
from fedscan.common.federated.settings import FederationSettings
from fedscan.common.federated.wire import (
    ARRAYS,
    CONFIG,
    HEAD_INIT,
    METRICS,
    NODE_ID,
    ROUND_OFFSET,
    RUN_KEY,
    SERVER_ROUND,
)
from fedscan.common.learn.models import StagedModel
from fedscan.common.learn.prepare import prepare_run
from fedscan.common.learn.shipped import shipped_inputs
from fedscan.common.learn.training import Batches, evaluate_model, place_model
from fedscan.common.runs.record import REFITTED, FederatedRun, new_run_dir
from fedscan.common.runs.tracking import Tracker, start_tracking
from fedscan.common.runs.validate import validate
from fedscan.server.strategies import build_strategy, wrap_central_dp

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


def install_head(model: StagedModel, total: dict, fed: FederationSettings, kind: str) -> None:
    """Solve the ``kind`` head from the sites' summed statistics and write it, times
    ``fed.head_scale``, into ``model`` (plain and SecAgg+ rounds alike)."""
    weight, bias = solve_head(kind, total, ridge=fed.head_ridge)
    set_head(model, weight, bias, scale=fed.head_scale)


def statistics_round(
    grid: Grid, model: StagedModel, keys: list[str], fed: FederationSettings, kind: str
) -> tuple[dict, list[dict]]:
    """A statistics round (``federation.head_init`` before round 1, ``bn_refit`` and
    ``head_refit`` after the last): every site sends the ``kind`` sums under ``model``'s
    weights. Returns their total and the sites' reply metrics (sizes, bytes sent)."""
    nodes = list(grid.get_node_ids())
    messages = [
        Message(
            content=RecordDict(
                {
                    ARRAYS: ArrayRecord(get_exchanged(model.cpu(), keys)),
                    CONFIG: ConfigRecord({HEAD_INIT: kind}),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in nodes
    ]
    log.info("statistics round (%s): asking %d sites", kind, len(nodes))
    start = time.perf_counter()
    stats, rows = [], []
    for reply in grid.send_and_receive(messages, timeout=fed.round_timeout_s):
        site = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("statistics round: site %s failed: %s", site, reply.error.reason)
            continue
        arrays = {k: a.numpy() for k, a in reply.content[ARRAYS].items()}
        stats.append(arrays)
        row = dict(reply.content[METRICS])
        row[NODE_ID] = int(site)
        row["bytes"] = int(sum(a.nbytes for a in arrays.values()))
        rows.append(row)
    if len(stats) < fed.min_nodes:
        raise ConfigError(
            "federation.min_nodes",
            f"statistics round: {len(stats)} of {len(nodes)} sites answered, "
            f"fewer than {fed.min_nodes}",
        )
    log.info(
        "statistics round (%s): %d sites answered, %.1f s, %.1f KiB per site",
        kind,
        len(stats),
        time.perf_counter() - start,
        sum(r["bytes"] for r in rows) / len(rows) / 1024,
    )
    return sum_statistics(stats), rows


def evaluate_sites(grid: Grid, arrays: dict, fed: FederationSettings, rnd: int) -> list[dict]:
    """Every site scores ``arrays`` on its own validation split (a Flower ``evaluate``
    message, as the strategy sends): the sites' validation metrics of a model the
    strategy did not make, e.g. the head refit after the last round."""
    messages = [
        Message(
            content=RecordDict(
                {
                    ARRAYS: ArrayRecord(arrays),
                    CONFIG: ConfigRecord({SERVER_ROUND: rnd, ROUND_OFFSET: 0}),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in grid.get_node_ids()
    ]
    rows = []
    for reply in grid.send_and_receive(messages, timeout=fed.round_timeout_s):
        if reply.has_error():
            log.warning("site %s failed to evaluate: %s", reply.metadata.src_node_id, reply.error)
            continue
        row = dict(reply.content[METRICS])
        row[NODE_ID] = int(reply.metadata.src_node_id)
        rows.append(row)
    return rows


def run_server(grid: Grid, cfg: DictConfig) -> Path:
    """Everything the ServerApp does, callable from tests and ``fedscan simulate``."""
    settings = validate(cfg, "server")  # before waiting for sites or reading data
    fed = settings.federation
    strategy = build_strategy(cfg.strategy, fed)
    rounds = fed.rounds
    n_nodes = wait_for_nodes(grid, fed.min_nodes, fed.wait_for_nodes_s)
    log.info("%d sites connected", n_nodes)
    recording = strategy  # keeps per-site metrics and the resumable state
    # under SecAgg+ server/secure.py wraps Flower's legacy workflow in its own DP wrapper
    if settings.central_dp is not None and settings.secure is None:
        sampled = max(1, round(n_nodes * fed.fraction_train))
        strategy = wrap_central_dp(recording, settings.central_dp, sampled)
        log.info("central DP: %s", strategy)
    run = prepare_run(cfg)
    data, model = run.data, run.model
    keys = exchanged_keys(model, fedbn=fed.fedbn)
    folder = {"label": data.label, "synthetic": data.collection.synthetic, "classes": run.classes}
    if fed.resume:
        run_dir = Path(fed.resume).expanduser().resolve()
        record, state = FederatedRun.resume(run_dir, cfg, **folder)
        done = int(state["round"])
        refitted = bool(state.get(REFITTED, False))
        set_exchanged(model, state["arrays"], keys)
        recording.import_state(state["strategy_state"])
        log.info("resuming %s after round %d of %d", run_dir, done, rounds)
    else:
        run_dir = new_run_dir(cfg, "federated")
        record = FederatedRun(run_dir, cfg, **folder)
        done, refitted = 0, False
    log.info("run folder: %s", run_dir)
    tracker = start_tracking(cfg, run_dir, kind="federated")  # resumed: the same MLflow run
    try:
        _federate(
            grid, cfg, settings, strategy, recording, run, keys, record, done, refitted, tracker
        )
    except BaseException:
        tracker.finish(run_dir, failed=True)
        raise
    tracker.finish(run_dir)
    return run_dir


def _federate(
    grid: Grid,
    cfg: DictConfig,
    settings: Any,
    strategy: Any,
    recording: Any,
    run: Any,
    keys: list[str],
    record: FederatedRun,
    done: int,
    refitted: bool,
    tracker: Tracker,
) -> None:
    """The statistics round (if any), the strategy's rounds and the head refit (if
    any), recorded in ``record`` and mirrored to ``tracker`` round by round."""
    fed = settings.federation
    rounds = fed.rounds
    device, data, model, start = run.device, run.data, run.model, run.start
    classes = run.classes
    x_test = shipped_inputs(run, cfg)  # the test splits as the exported model computes them
    tests = {
        n: Batches(x_test, run.labels, idx, batch_size=64) for n, idx in data.splits.tests.items()
    }
    run_dir = record.dir

    def test_metrics(state: dict) -> dict[str, dict]:
        set_exchanged(model, state, keys)
        place_model(model, device)
        return {
            n: evaluate_model(
                model,
                b,
                classes,
                device=device,
                start=start,
                groups=data.splits.groups,
                intervals=settings.intervals,
                scans=groups_are_scans(cfg.dataset),
            )
            for n, b in tests.items()
        }

    log.info(
        "the first message to each site makes it read, decode and cache its data (and its "
        "frozen-trunk features); round %d is slower than the rest",
        0 if fed.head_init != "none" and not fed.resume else done + 1,
    )

    def statistics(kind: str) -> list[dict]:
        """One statistics round on ``model``'s current weights; the head it solves (or
        for ``kind="bn"`` the BatchNorm statistics) is written into ``model``. Returns
        the sites' reply metrics."""
        if settings.secure is None:
            total, sites = statistics_round(grid, model, keys, fed, kind)
        else:
            from fedscan.server.secure import secure_statistics  # only the sums' total is seen

            total, sites = secure_statistics(
                grid, settings.secure, fed, get_exchanged(model.cpu(), keys), kind=kind
            )
        if kind == BN_KIND:
            n = install_bn(model, total)
            log.info("statistics round (bn): %d BatchNorm layers re-estimated", n)
        else:
            install_head(model, total, fed, kind)
            log.info("statistics round (%s): head solved", kind)
        return sites

    def refit() -> None:
        """``federation.bn_refit`` / ``head_refit``: the final global model's BatchNorm
        statistics re-estimated, then its head re-solved, from the sites' sums over its
        own features; round ``rounds`` is recorded again with the refitted model, which
        the sites score on their validation splits too (the metrics before the refit
        kept beside: ``before_refit``, and the sites' as ``sites_before_refit``)."""
        before = next((r for r in record.rounds if r["round"] == rounds), {})
        sites = dict(before.get("sites", {}))
        if fed.bn_refit:
            sites["bn_statistics"] = statistics(BN_KIND)
        if fed.head_refit != "none":
            sites["statistics"] = statistics(fed.head_refit)
        state = get_exchanged(model.cpu(), keys)
        if fed.fraction_evaluate > 0:
            sites["evaluate"] = evaluate_sites(grid, state, fed, rounds)
        results = test_metrics(state)
        record.record(
            rounds,
            results,
            sites,
            before_refit=before.get("global", {}),
            sites_before_refit=before.get("sites", {}).get("evaluate", []),
        )
        tracker.log_round(
            rounds, results, {k: sites[k] for k in ("statistics", "evaluate") if k in sites}
        )
        record.checkpoint(
            rounds,
            state,
            recording.export_state(),
            best=record.is_best(rounds, sites, refitted=True),
            **{REFITTED: True},
        )
        first = next(iter(results))
        log.info(
            "round %d refitted (%s)  %s acc %.4f  macro-F1 %.4f",
            rounds,
            ", ".join(
                (["BatchNorm statistics"] if fed.bn_refit else [])
                + ([f"{fed.head_refit} head"] if fed.head_refit != "none" else [])
            ),
            first,
            results[first]["accuracy"],
            results[first]["macro_f1"],
        )

    if fed.head_refit != "none":
        linear_head(model, key="federation.head_refit")  # before any site works
    if fed.bn_refit:
        check_bn_refit(model, start)
    if fed.head_init != "none" and not fed.resume:  # a resumed run has its head already
        linear_head(model)  # a model without a linear classifier fails before any site works
        sites = statistics(fed.head_init)
        state0 = get_exchanged(model.cpu(), keys)
        results = test_metrics(state0)
        record.record(0, results, {"statistics": sites})
        tracker.log_round(0, results, {"statistics": sites})
        # not evaluated by the sites, so never best.pt (a run of rounds=0 keeps last.pt)
        record.checkpoint(0, state0, recording.export_state(), best=False)
        first = next(iter(results))
        log.info(
            "round 0 (one-shot %s head)  %s acc %.4f  macro-F1 %.4f",
            fed.head_init,
            first,
            results[first]["accuracy"],
            results[first]["macro_f1"],
        )
    if done >= rounds:
        if fed.refits and not refitted:  # stopped between the last round and the refit
            refit()
        else:
            log.info("nothing to do: %d of %d rounds already done", done, rounds)
        record.finish()
        return

    every = fed.evaluate_every
    final = [get_exchanged(model.cpu(), keys)]  # the latest global weights, for the refit

    def finish_round(rnd: int, state: dict, sites: dict, strategy_state: dict) -> dict:
        """Per round: test metrics when scheduled, site metrics and a checkpoint always."""
        final[0] = state
        results = {}
        if rnd % every == 0 or rnd == rounds:
            results = test_metrics(state)
        row = record.record(rnd, results, sites)  # its seconds include this evaluation
        tracker.log_round(rnd, results, sites)
        best = record.is_best(rnd, sites)  # on the sites' validation, never a test split
        record.checkpoint(rnd, state, strategy_state, best=best)
        n_sites = len(sites.get("train", []))
        if not results:
            log.info("round %d/%d  (%d sites)  %.1f s", rnd, rounds, n_sites, row["seconds"])
            return results
        first = next(iter(results))
        log.info(
            "round %d/%d  %s acc %.4f  macro-F1 %.4f  (%d sites)  %.1f s",
            rnd,
            rounds,
            first,
            results[first]["accuracy"],
            results[first]["macro_f1"],
            n_sites,
            row["seconds"],
        )
        return results

    if settings.secure is not None:  # SecAgg+: Flower's legacy workflow, same rounds
        from fedscan.server.secure import run_secure_rounds

        run_secure_rounds(
            grid,
            settings.secure,
            fed,
            strategy_cfg=cfg.strategy,
            initial=get_exchanged(model.cpu(), keys),
            done=done,
            run_key=run_dir.name,
            finish_round=finish_round,
            central_dp=settings.central_dp,
        )
        if fed.refits:
            set_exchanged(model, final[0], keys)
            refit()
        record.finish()
        return

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        sites = recording.site_metrics.get(server_round, {})
        state = arrays.to_torch_state_dict()
        results = finish_round(server_round + done, state, sites, recording.export_state())
        if not results:
            return None
        return MetricRecord({f"{n}_accuracy": m["accuracy"] for n, m in results.items()})

    initial = ArrayRecord(get_exchanged(model.cpu(), keys))
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds - done,
        timeout=float(fed.round_timeout_s),
        # run-key: sites keep their privacy ledger per run folder, so a resumed run
        # continues their accounting instead of starting from zero
        train_config=ConfigRecord({ROUND_OFFSET: done, RUN_KEY: run_dir.name}),
        evaluate_config=ConfigRecord({ROUND_OFFSET: done}),
        evaluate_fn=evaluate_fn,
    )
    if fed.refits:
        set_exchanged(model, final[0], keys)
        refit()
    record.finish()


def make_server_app(overrides: tuple[str, ...] = (), *, announce: bool = True) -> ServerApp:
    """The ServerApp; ``announce``: print where the results are (``flwr run`` users read
    it in the stream; ``fedscan simulate`` prints its own ``results:`` line instead)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("flwr").propagate = False
        logging.getLogger("httpx").setLevel(logging.WARNING)
        cfg = load_config([*overrides_from_run_config(dict(context.run_config)), *overrides])
        run_dir = run_server(grid, cfg)
        if announce:
            print(f"fedscan: results in {run_dir}", flush=True)

    return app


app = make_server_app()

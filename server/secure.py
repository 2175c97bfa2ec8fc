"""The coordinator's side of secure aggregation: Flower's ``SecAggPlusWorkflow``
driving fedscan's rounds.

Flower 1.42's SecAgg+ runs inside its legacy ``DefaultWorkflow`` with a legacy
``Strategy``; the Message-API strategies do not plug into it. :class:`SecureMean`
is that legacy strategy, kept as thin as the protocol allows: it samples sites
and sends fedscan's train / evaluate configs (round, run key, FedProx's mu, the
parameter names), and turns what the protocol hands it, the unmasked weighted
mean of the sites' *updates*, into the next global weights. Everything else a
round does (test metrics, the run folder, checkpoints, tracking) is the same
``finish_round`` the Message-API path calls, so the two paths cannot drift.

What the server sees per site: its metrics and its sample count (not masked),
never its update (see ``tests/test_secure.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Context, RecordDict
from flwr.common import (
    EvaluateIns,
    FitIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from fedscan.common.federated.privacy import CentralDPSettings
from fedscan.common.federated.secure import (
    STATISTICS_MODULUS,
    STATISTICS_QUANTIZATION,
    SecureAggregationSettings,
)
from fedscan.common.federated.settings import FederationSettings
from fedscan.common.federated.wire import (
    CLIPPING_RANGE,
    HEAD_INIT,
    MAX_WEIGHT,
    NODE_ID,
    PARAMETER_NAMES,
    PROXIMAL_MU,
    ROUND_OFFSET,
    RUN_KEY,
    SERVER_ROUND,
    STATISTICS_KEYS,
    STATISTICS_SCALE,
)
from fedscan.server.secagg import PinnedSecAggPlusWorkflow

log = logging.getLogger("fedscan.server")

FinishRound = Callable[[int, dict, dict, dict], dict]


class WaitingClientManager(SimpleClientManager):
    """Flower's legacy client manager waits up to a day for ``min_nodes`` sites before
    sampling; fedscan's rounds wait ``federation.wait_for_nodes_s`` and then stop with
    an error naming it, as the Message-API path does (the run folder keeps its rounds
    and resumes)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self.wait_s = wait_s

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        if super().wait_for(num_clients, timeout=int(max(self.wait_s, 1))):
            return True
        raise RuntimeError(
            f"only {self.num_available()} of the {num_clients} sites needed "
            f"(federation.min_nodes) connected within federation.wait_for_nodes_s="
            f"{self.wait_s:g} s; resume with federation.resume=<run folder> once they are back"
        )


class SecureMean(LegacyFedAvg):
    """Legacy FedAvg whose aggregate is the protocol's unmasked mean update, added
    to the global weights; per-site metrics recorded as the sites sent them."""

    def __init__(
        self,
        *,
        initial: Mapping[str, torch.Tensor],
        fed: FederationSettings,
        proximal_mu: float,
        run_key: str,
        done: int,
        finish_round: FinishRound,
        clipping_range: float,
        max_weight: float,
    ) -> None:
        self.names = list(initial)
        self.clipping_range, self.max_weight = clipping_range, max_weight
        self.current = [initial[k].detach().cpu().numpy() for k in self.names]
        super().__init__(
            fraction_fit=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_fit_clients=fed.min_nodes,
            min_evaluate_clients=fed.min_nodes,
            min_available_clients=fed.min_nodes,
            initial_parameters=ndarrays_to_parameters(self.current),
        )
        self.proximal_mu, self.run_key, self.done = proximal_mu, run_key, done
        self.finish_round = finish_round
        self.sites: dict[int, dict[str, list[dict]]] = {}

    def __repr__(self) -> str:
        return f"SecureMean(SecAgg+, {len(self.names)} arrays)"

    def _config(self, server_round: int) -> dict[str, Any]:
        config = {
            SERVER_ROUND: server_round,
            ROUND_OFFSET: self.done,
            RUN_KEY: self.run_key,
            PARAMETER_NAMES: json.dumps(self.names),
            CLIPPING_RANGE: self.clipping_range,  # the site warns when its update is clipped
            MAX_WEIGHT: self.max_weight,
        }
        if self.proximal_mu:
            config[PROXIMAL_MU] = self.proximal_mu
        return config

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        # The workflow's global weights: with central DP they carry the noise its
        # wrapper added to the last aggregate, so the update is added to those
        self.current = parameters_to_ndarrays(parameters)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        extra = self._config(server_round)
        return [(p, FitIns(ins.parameters, {**ins.config, **extra})) for p, ins in pairs]

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager):
        pairs = super().configure_evaluate(server_round, parameters, client_manager)
        extra = self._config(server_round)
        return [(p, EvaluateIns(ins.parameters, {**ins.config, **extra})) for p, ins in pairs]

    def _rows(self, server_round: int, phase: str, results: list) -> None:
        rows = self.sites.setdefault(server_round, {}).setdefault(phase, [])
        for proxy, res in results:
            rows.append({**dict(res.metrics), NODE_ID: int(proxy.node_id)})

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        for failure in failures:
            log.warning("round %d: a site failed under SecAgg+: %s", server_round, failure)
        if not results:
            log.warning(
                "round %d: no update survived SecAgg+; global model unchanged", server_round
            )
            return ndarrays_to_parameters(self.current), {}
        # After unmasking every result carries the same parameters: the weighted mean
        mean = parameters_to_ndarrays(results[0][1].parameters)
        if len(mean) != len(self.current) or not all(np.isfinite(u).all() for u in mean):
            log.warning(
                "round %d: the aggregate is not finite; global model unchanged", server_round
            )
            return ndarrays_to_parameters(self.current), {}
        self.current = [
            (g.astype(np.float64) + u).astype(g.dtype)
            if np.issubdtype(g.dtype, np.floating)
            else np.rint(g + u).astype(g.dtype)  # BatchNorm's batch counter
            for g, u in zip(self.current, mean, strict=True)
        ]
        self._rows(server_round, "train", results)
        return ndarrays_to_parameters(self.current), {}

    def _finish(self, server_round: int) -> None:
        state = {
            k: torch.from_numpy(np.array(a)) for k, a in zip(self.names, self.current, strict=True)
        }
        self.finish_round(server_round + self.done, state, self.sites.pop(server_round, {}), {})

    def evaluate(self, server_round: int, parameters: Parameters):
        """Centralised evaluation; the round is finished here unless the sites evaluate
        it too (then in :meth:`aggregate_evaluate`, with their metrics)."""
        if server_round > 0:
            self.current = parameters_to_ndarrays(parameters)  # noised, under central DP
            if self.fraction_evaluate == 0:
                self._finish(server_round)
        return None

    def aggregate_evaluate(self, server_round: int, results: list, failures: list):
        self._rows(server_round, "evaluate", results)
        self._finish(server_round)
        return None, {}


class SecureSums(LegacyFedAvg):
    """The statistics round as one SecAgg+ round: every connected site sends its
    feature sums / ``statistics_scale``, all with the same weight; the unmasked mean
    times (sites x scale) is the total. Run with a finer quantisation than training
    rounds (:data:`STATISTICS_QUANTIZATION`): a Gram matrix's rounding noise must
    stay well below the ridge ``lambda`` or it stops being positive definite."""

    def __init__(
        self,
        *,
        arrays: Mapping[str, torch.Tensor],
        kind: str,
        scale: float,
        clipping_range: float,
        max_weight: float,
        min_nodes: int,
    ) -> None:
        self.names = list(arrays)
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=min_nodes,
            min_available_clients=min_nodes,
            initial_parameters=ndarrays_to_parameters(
                [arrays[k].detach().cpu().numpy() for k in self.names]
            ),
        )
        self.kind, self.scale, self.clipping_range = kind, scale, clipping_range
        self.max_weight = max_weight
        self.total: dict[str, np.ndarray] | None = None
        self.rows: list[dict] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        pairs = super().configure_fit(server_round, parameters, client_manager)
        extra = {
            HEAD_INIT: self.kind,
            PARAMETER_NAMES: json.dumps(self.names),
            STATISTICS_SCALE: self.scale,
            CLIPPING_RANGE: self.clipping_range,
            MAX_WEIGHT: self.max_weight,
        }
        return [(p, FitIns(ins.parameters, {**ins.config, **extra})) for p, ins in pairs]

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        for failure in failures:
            log.warning("statistics round: a site failed under SecAgg+: %s", failure)
        if not results:
            return None, {}
        mean = parameters_to_ndarrays(results[0][1].parameters)
        names = json.loads(str(results[0][1].metrics[STATISTICS_KEYS]))
        self.total = {
            k: np.asarray(v, dtype=np.float64) * len(results) * self.scale
            for k, v in zip(names, mean, strict=True)
        }
        for proxy, res in results:
            row = {k: v for k, v in res.metrics.items() if k != STATISTICS_KEYS}
            self.rows.append({**row, NODE_ID: int(proxy.node_id)})
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None


def secure_statistics(
    grid: Grid,
    settings: SecureAggregationSettings,
    fed: FederationSettings,
    arrays: Mapping[str, torch.Tensor],
    *,
    kind: str,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The summed ``kind`` statistics (fed3r | fedncm) from one SecAgg+ round, and the
    sites' reply metrics; the server never holds one site's sums."""
    strategy = SecureSums(
        arrays=arrays,
        kind=kind,
        scale=settings.statistics_scale,
        clipping_range=settings.clipping_range,
        max_weight=settings.max_weight,
        min_nodes=fed.min_nodes,
    )
    fine = dataclasses.replace(
        settings,
        quantization_range=STATISTICS_QUANTIZATION,
        modulus_range=STATISTICS_MODULUS,
    )
    _workflow(grid, fine, fed, strategy, rounds=1)
    if strategy.total is None:
        raise RuntimeError(
            "statistics round under SecAgg+: no aggregate (too few sites answered or kept "
            "their shares; see the log above)"
        )
    return strategy.total, strategy.rows


def _workflow(
    grid: Grid,
    settings: SecureAggregationSettings,
    fed: FederationSettings,
    strategy: LegacyStrategy,
    *,
    rounds: int,
) -> None:
    """``rounds`` rounds of Flower's DefaultWorkflow with SecAgg+ as its fit workflow."""
    timeout = settings.timeout_s or fed.round_timeout_s
    context = LegacyContext(
        context=Context(
            run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=rounds, round_timeout=timeout),
        strategy=strategy,
        client_manager=WaitingClientManager(fed.wait_for_nodes_s),
    )
    DefaultWorkflow(
        fit_workflow=PinnedSecAggPlusWorkflow(
            num_shares=settings.num_shares,
            reconstruction_threshold=settings.reconstruction_threshold,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            modulus_range=settings.modulus_range,
            max_weight=settings.max_weight,
            timeout=timeout,
            mask_generator=settings.mask_generator,
        )
    )(grid, context)


def run_secure_rounds(
    grid: Grid,
    settings: SecureAggregationSettings,
    fed: FederationSettings,
    *,
    strategy_cfg: Mapping[str, Any],
    initial: Mapping[str, torch.Tensor],
    done: int,
    run_key: str,
    finish_round: FinishRound,
    central_dp: CentralDPSettings | None = None,
) -> None:
    """``fed.rounds - done`` rounds of FedAvg (or FedProx) under SecAgg+; with
    ``central_dp`` (client-side fixed clipping), Flower's legacy DP wrapper adds the
    noise to the unmasked aggregate, as Flower's ``fl-dp-sa`` example composes them."""
    strategy = SecureMean(
        initial=initial,
        fed=fed,
        proximal_mu=float(strategy_cfg.get("mu", 0.0) or 0.0),
        run_key=run_key,
        done=done,
        finish_round=finish_round,
        clipping_range=settings.clipping_range,
        max_weight=settings.max_weight,
    )
    outer: LegacyStrategy = strategy
    if central_dp is not None:
        sampled = max(1, round(len(list(grid.get_node_ids())) * fed.fraction_train))
        outer = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=central_dp.noise_multiplier,
            clipping_norm=central_dp.clipping_norm,
            num_sampled_clients=sampled,
        )
        log.info("central DP under SecAgg+: %s", outer)
    log.info(
        "secure aggregation: SecAgg+ with %d shares, threshold %d, clipping range %g",
        settings.num_shares,
        settings.reconstruction_threshold,
        settings.clipping_range,
    )
    _workflow(grid, settings, fed, outer, rounds=fed.rounds - done)

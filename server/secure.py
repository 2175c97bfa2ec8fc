"""The coordinator's side of secure aggregation: one round of Flower's
``SecAggPlusWorkflow`` whenever the federation loop asks for an aggregate.

Flower 1.42's SecAgg+ runs on its legacy messages with a legacy ``Strategy`` in a
``LegacyContext``; the Message-API strategies do not plug into it.
:class:`SecureRounds` keeps one such context for the whole run and, per loop
iteration, runs one SecAgg+ round on it: :class:`SecureMean` (the legacy strategy,
kept as thin as the protocol allows) samples the sites, sends fedscan's train
config, and adds what the protocol hands it, the unmasked weighted mean of the
sites' *updates*, to the global weights. A statistics round is one more SecAgg+
round, of :class:`SecureSums`. Everything else (the sites' evaluation by
Message-API evaluate messages, test metrics, the run folder, checkpoints, tracking)
is the plain path's (:class:`~fedscan.server.rounds.MessageRounds`,
:class:`~fedscan.server.federation.Federation`), so the two paths cannot drift.

What the server sees per site: its metrics and its sample count (not masked),
never its update (see ``tests/test_secure.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
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
    RUN_KEY,
    SERVER_ROUND,
    STATISTICS_KEYS,
    STATISTICS_SCALE,
)
from fedscan.server.rounds import Arrays, MessageRounds
from fedscan.server.secagg import PinnedSecAggPlusWorkflow

log = logging.getLogger("fedscan.server")


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


def _rows(results: list) -> list[dict]:
    """The sites' reply rows of a SecAgg+ round (what they sent beside the masked vector)."""
    return [{**dict(res.metrics), NODE_ID: int(proxy.node_id)} for proxy, res in results]


class SecureMean(LegacyFedAvg):
    """Legacy FedAvg whose aggregate is the protocol's unmasked mean update, added
    to the global weights; per-site metrics recorded as the sites sent them."""

    def __init__(
        self,
        *,
        names: list[str],
        fed: FederationSettings,
        proximal_mu: float,
        run_key: str,
        clipping_range: float,
        max_weight: float,
    ) -> None:
        self.names = names
        self.clipping_range, self.max_weight = clipping_range, max_weight
        self.current: list[np.ndarray] = []
        super().__init__(
            fraction_fit=fed.fraction_train,
            fraction_evaluate=0.0,  # the sites evaluate by Message-API messages
            min_fit_clients=fed.min_nodes,
            min_available_clients=fed.min_nodes,
        )
        self.proximal_mu, self.run_key = proximal_mu, run_key
        self.rows: dict[int, list[dict]] = {}

    def __repr__(self) -> str:
        return f"SecureMean(SecAgg+, {len(self.names)} arrays)"

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        # The global weights: with central DP they carry the noise its wrapper added
        # to the last aggregate, so the update is added to those
        self.current = parameters_to_ndarrays(parameters)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        extra = {
            SERVER_ROUND: server_round,
            RUN_KEY: self.run_key,
            PARAMETER_NAMES: json.dumps(self.names),
            CLIPPING_RANGE: self.clipping_range,  # the site warns when its update is clipped
            MAX_WEIGHT: self.max_weight,
        }
        if self.proximal_mu:
            extra[PROXIMAL_MU] = self.proximal_mu
        return [(p, FitIns(ins.parameters, {**ins.config, **extra})) for p, ins in pairs]

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
        self.rows[server_round] = _rows(results)
        return ndarrays_to_parameters(self.current), {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None


class SecureSums(LegacyFedAvg):
    """The statistics round as one SecAgg+ round: every connected site sends its
    feature sums / ``statistics_scale``, all with the same weight; the unmasked mean
    times (sites x scale) is the total. Run with a finer quantisation than training
    rounds (:data:`STATISTICS_QUANTIZATION`): a Gram matrix's rounding noise must
    stay well below the ridge ``lambda`` or it stops being positive definite."""

    def __init__(
        self,
        *,
        names: list[str],
        kind: str,
        settings: SecureAggregationSettings,
        min_nodes: int,
        run_key: str = "",
    ) -> None:
        self.names, self.run_key = names, run_key
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=min_nodes,
            min_available_clients=min_nodes,
        )
        self.kind, self.scale = kind, settings.statistics_scale
        self.clipping_range, self.max_weight = settings.clipping_range, settings.max_weight
        self.total: dict[str, np.ndarray] | None = None
        self.rows: list[dict] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        pairs = super().configure_fit(server_round, parameters, client_manager)
        extra = {
            HEAD_INIT: self.kind,
            RUN_KEY: self.run_key,  # a DP site accounts the centring query in its ledger
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
        rows = _rows(results)
        self.rows = [{k: v for k, v in r.items() if k != STATISTICS_KEYS} for r in rows]
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None


def _workflow(settings: SecureAggregationSettings, timeout: float) -> PinnedSecAggPlusWorkflow:
    """Flower's SecAgg+ workflow for ``settings`` (one round per call), with fedscan's
    mask generator pinned (``server/secagg.py``)."""
    return PinnedSecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        max_weight=settings.max_weight,
        timeout=timeout,
        mask_generator=settings.mask_generator,
    )


class SecureRounds:
    """Training and statistics rounds under SecAgg+ (FedAvg or FedProx); the sites'
    evaluation is ``evaluation``'s (Message-API evaluate messages, which the sites'
    ``secure_mod`` passes through). With ``central_dp`` (client-side fixed clipping)
    Flower's legacy DP wrapper adds the noise to the unmasked aggregate, as Flower's
    ``fl-dp-sa`` example composes them."""

    def __init__(
        self,
        grid: Grid,
        settings: SecureAggregationSettings,
        fed: FederationSettings,
        *,
        names: list[str],
        strategy_cfg: Mapping[str, Any],
        central_dp: CentralDPSettings | None,
        run_key: str,
        evaluation: MessageRounds,
    ) -> None:
        self.grid, self.settings, self.fed, self.keys = grid, settings, fed, names
        self.evaluation, self.names = evaluation, evaluation.names
        self.timeout = settings.timeout_s or fed.round_timeout_s
        self.mean = SecureMean(
            names=names,
            fed=fed,
            proximal_mu=float(strategy_cfg.get("mu", 0.0) or 0.0),
            run_key=run_key,
            clipping_range=settings.clipping_range,
            max_weight=settings.max_weight,
        )
        outer: LegacyStrategy = self.mean
        if central_dp is not None:
            outer = DifferentialPrivacyClientSideFixedClipping(
                self.mean,
                noise_multiplier=central_dp.noise_multiplier,
                clipping_norm=central_dp.clipping_norm,
                num_sampled_clients=max(
                    1, round(len(list(grid.get_node_ids())) * fed.fraction_train)
                ),
            )
            log.info("central DP under SecAgg+: %s", outer)
        self.clients = WaitingClientManager(fed.wait_for_nodes_s)
        self._thread, self._stop, registered = start_update_client_manager_thread(
            grid, self.clients
        )
        registered.wait()
        self.context = self._context(outer)
        self.workflow = _workflow(settings, self.timeout)
        log.info(
            "secure aggregation: SecAgg+ with %d shares, threshold %d, clipping range %g",
            settings.num_shares,
            settings.reconstruction_threshold,
            settings.clipping_range,
        )

    def _context(self, strategy: LegacyStrategy) -> LegacyContext:
        context = Context(
            run_id=self.grid.run.run_id,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config={},
        )
        return LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=1, round_timeout=self.timeout),
            strategy=strategy,
            client_manager=self.clients,
        )

    def _round(
        self, workflow: PinnedSecAggPlusWorkflow, context: LegacyContext, rnd: int, arrays: Arrays
    ) -> Arrays:
        """One SecAgg+ round on ``context`` from the global ``arrays``; returns the global
        arrays after it (unchanged when the protocol halted)."""
        parameters = ndarrays_to_parameters([arrays[k].detach().cpu().numpy() for k in self.keys])
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            parameters, keep_input=True
        )
        config = context.state.config_records.setdefault(MAIN_CONFIGS_RECORD, ConfigRecord())
        config[Key.CURRENT_ROUND] = rnd
        workflow(self.grid, context)
        out = compat.arrayrecord_to_parameters(
            context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
        return {
            k: torch.from_numpy(np.array(a))
            for k, a in zip(self.keys, parameters_to_ndarrays(out), strict=True)
        }

    def train(self, rnd: int, arrays: Arrays) -> tuple[Arrays, list[dict]]:
        new = self._round(self.workflow, self.context, rnd, arrays)
        rows = self.mean.rows.pop(rnd, [])
        for row in rows:
            self.names.learn(row)
        return new, rows

    def evaluate(self, rnd: int, arrays: Arrays) -> list[dict]:
        return self.evaluation.evaluate(rnd, arrays)

    def sum_statistics(self, kind: str, arrays: Arrays) -> tuple[dict | None, list[dict]]:
        """The summed ``kind`` statistics (centre | fed3r | fedncm | bn) from one SecAgg+ round, at
        the statistics round's finer quantisation; the server never holds one site's
        sums."""
        sums = SecureSums(
            names=self.keys,
            kind=kind,
            settings=self.settings,
            min_nodes=self.fed.min_nodes,
            run_key=self.mean.run_key,
        )
        fine = dataclasses.replace(
            self.settings,
            quantization_range=STATISTICS_QUANTIZATION,
            modulus_range=STATISTICS_MODULUS,
        )
        self._round(_workflow(fine, self.timeout), self._context(sums), 1, arrays)
        for row in sums.rows:
            self.names.learn(row)
        return sums.total, sums.rows

    def export_state(self) -> dict[str, Any]:
        return {}  # SecureMean keeps nothing across rounds; the fixed-clipping DP wrapper neither

    def import_state(self, state: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

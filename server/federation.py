"""One federated run: fedscan's round loop and everything a round records.

:class:`Federation` owns the loop. Each round it asks an *aggregator* for the new
global arrays and the sites' metrics (:class:`~fedscan.server.rounds.MessageRounds`:
the configured Flower strategy over the Message API; :class:`~fedscan.server.secure.
SecureRounds`: one SecAgg+ round), and then does the round's bookkeeping, written
once for every kind of round (:meth:`Federation._book`): the server's test metrics
when scheduled, the run folder's row, the MLflow mirror, ``best.pt`` / ``last.pt``
and the log line. The statistics rounds (``federation.head_init`` before round 1,
``bn_refit`` / ``head_refit`` after the last) take their totals from the same
aggregator and their order and installation from
:mod:`fedscan.common.federated.refit`, as the pooled and local baselines do.

Round numbers are the run's own, 1 to ``federation.rounds``, across a resume: the
strategy sees round 3 as round 3 after a resume at round 2 (FedAdam's bias
correction depends on it), and the sites derive their seeds from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fedscan.common.core.errors import ConfigError
from fedscan.common.data.splits import groups_are_scans
from fedscan.common.federated.bn_stats import BN_KIND, check_bn_refit
from fedscan.common.federated.centre import CENTRE_KIND, centre_module
from fedscan.common.federated.exchange import get_exchanged, set_exchanged
from fedscan.common.federated.head_init import linear_head
from fedscan.common.federated.refit import describe, install_round, refit
from fedscan.common.learn.prepare import PreparedRun
from fedscan.common.learn.shipped import shipped_inputs
from fedscan.common.learn.training import Batches, evaluate_model, place_model
from fedscan.common.runs.record import REFITTED, FederatedRun
from fedscan.common.runs.tracking import Tracker
from fedscan.common.runs.validate import Settings
from fedscan.server.rounds import Aggregator, kib_per_site

log = logging.getLogger("fedscan.server")

Arrays = dict[str, torch.Tensor]
# The row key of each statistics round's site replies in metrics.json
STATISTICS_ROWS = {BN_KIND: "bn_statistics"}  # every head kind: "statistics"


class Federation:
    """The statistics round (if any), the rounds and the refit (if any) of one run,
    recorded in ``record`` and mirrored to ``tracker`` round by round.

    ``done`` rounds are already in ``record`` (a resumed run; ``refitted``: its refit
    too); ``run`` is the server's prepared data and model, whose exchanged tensors
    (``keys``) hold the global model to start from.
    """

    def __init__(
        self,
        *,
        cfg: DictConfig,
        settings: Settings,
        run: PreparedRun,
        keys: list[str],
        aggregator: Aggregator,
        record: FederatedRun,
        tracker: Tracker,
        done: int = 0,
        refitted: bool = False,
    ) -> None:
        self.cfg, self.settings, self.fed = cfg, settings, settings.federation
        self.prepared, self.model, self.keys = run, run.model, keys
        self.aggregator, self.record, self.tracker = aggregator, record, tracker
        self.done, self.refitted = done, refitted
        x_test = shipped_inputs(run, cfg)  # the test splits as the exported model computes them
        self.tests = {
            n: Batches(x_test, run.labels, idx, batch_size=64)
            for n, idx in run.data.splits.tests.items()
        }

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Everything left of the run, then its plots and cross-site matrix."""
        fed = self.fed
        if fed.head_refit != "none":
            linear_head(self.model, key="federation.head_refit")  # before any site works
        if fed.bn_refit:
            check_bn_refit(self.model, self.prepared.start)
        first = self.done + 1
        if fed.head_init != "none" and not fed.resume:  # a resumed run has its head already
            first = 0
        log.info(
            "the first message to each site makes it read, decode and cache its data (and its "
            "frozen-trunk features); round %d is slower than the rest",
            first,
        )
        if self.done == 0 and not fed.resume and centre_module(self.model) is not None:
            self._centre()  # before the head: a head_init is solved on the centred features
        if first == 0:
            self._initial_head()
        arrays = get_exchanged(self.model.cpu(), self.keys)
        if self.done >= fed.rounds and (self.refitted or not fed.refits):
            log.info("nothing to do: %d of %d rounds already done", self.done, fed.rounds)
        for rnd in range(self.done + 1, fed.rounds + 1):
            arrays, train = self.aggregator.train(rnd, arrays)
            evaluated = self.aggregator.evaluate(rnd, arrays)
            scheduled = rnd % fed.evaluate_every == 0 or rnd == fed.rounds
            self._book(rnd, arrays, {"train": train, "evaluate": evaluated}, test=scheduled)
        if fed.refits and not self.refitted:  # also a run stopped before its refit
            self._refit(arrays)
        self.record.finish()

    def _centre(self) -> None:
        """``model.feature_norm=centred``: the sites' mean unit feature, one statistics
        round before round 1 (noised at each site under DP-SGD, ``centre.py``)."""
        sites: dict[str, list[dict]] = {}
        install_round(self.model, CENTRE_KIND, partial(self._statistics, sites), self.fed)
        norm = centre_module(self.model)
        assert norm is not None
        log.info("feature centre: norm %.3f, the sites' mean unit feature", norm.centre.norm())

    def _initial_head(self) -> None:
        """``federation.head_init``: the one-shot head from the sites' sums, round 0.
        Not evaluated by the sites, so never ``best.pt`` (a run of rounds=0 keeps
        ``last.pt``)."""
        linear_head(self.model)  # a model without a linear classifier fails before any site works
        sites: dict[str, list[dict]] = {}
        install_round(self.model, self.fed.head_init, partial(self._statistics, sites), self.fed)
        arrays = get_exchanged(self.model.cpu(), self.keys)
        self._book(0, arrays, sites, test=True, what=f"one-shot {self.fed.head_init} head")

    def _refit(self, arrays: Arrays) -> None:
        """``federation.bn_refit`` / ``head_refit`` on the final global model; its round
        is recorded again with the refitted model, which the sites score on their
        validation splits too (the metrics before the refit kept beside:
        ``before_refit``, and the sites' as ``sites_before_refit``)."""
        rounds = self.fed.rounds
        set_exchanged(self.model, arrays, self.keys)
        before = next((r for r in self.record.rounds if r["round"] == rounds), {})
        sites = dict(before.get("sites", {}))
        kinds = refit(self.model, self.fed, partial(self._statistics, sites))
        arrays = get_exchanged(self.model.cpu(), self.keys)
        sites["evaluate"] = self.aggregator.evaluate(rounds, arrays)
        self._book(
            rounds,
            arrays,
            sites,
            test=True,
            what=f"refitted: {describe(kinds)}",
            tracked={k: sites[k] for k in ("statistics", "evaluate") if k in sites},
            refitted=True,
            before_refit=before.get("global", {}),
            sites_before_refit=before.get("sites", {}).get("evaluate", []),
        )

    # ------------------------------------------------------------------ one round's parts
    def _statistics(self, sites: dict[str, list[dict]], kind: str) -> Mapping[str, np.ndarray]:
        """The statistics round, coded once for both paths: the sites' summed ``kind``
        statistics under the model's current weights, from the aggregator (plain
        replies added up, or one SecAgg+ round); their reply rows go to ``sites``.
        :mod:`~fedscan.common.federated.refit` installs the total."""
        arrays = get_exchanged(self.model.cpu(), self.keys)
        log.info("statistics round (%s): asking the sites", kind)
        start = time.perf_counter()
        total, rows = self.aggregator.sum_statistics(kind, arrays)
        if total is None or len(rows) < self.fed.min_nodes:
            raise ConfigError(
                "federation.min_nodes",
                f"statistics round ({kind}): {len(rows)} site(s) answered, fewer than "
                f"{self.fed.min_nodes} (see the warnings above)",
            )
        kib = kib_per_site(rows)
        log.info(
            "statistics round (%s): %d sites answered, %.1f s%s",
            kind,
            len(rows),
            time.perf_counter() - start,
            "" if kib is None else f", {kib:.1f} KiB per site",
        )
        sites[STATISTICS_ROWS.get(kind, "statistics")] = rows
        return total

    def _test_metrics(self, arrays: Arrays) -> dict[str, dict]:
        """The global model on the server's held-out test splits."""
        model, run = self.model, self.prepared
        set_exchanged(model, arrays, self.keys)
        place_model(model, run.device)
        return {
            n: evaluate_model(
                model,
                b,
                run.classes,
                device=run.device,
                start=run.start,
                groups=run.data.splits.groups,
                intervals=self.settings.intervals,
                scans=groups_are_scans(self.cfg.dataset),
            )
            for n, b in self.tests.items()
        }

    def _book(
        self,
        rnd: int,
        arrays: Arrays,
        sites: dict[str, list[dict]],
        *,
        test: bool,
        what: str = "",
        tracked: dict[str, list[dict]] | None = None,
        refitted: bool = False,
        **extra: Any,
    ) -> None:
        """A round's bookkeeping, for every kind of round: test metrics (``test``), the
        run folder's row (``extra`` kept in it), the MLflow mirror (``tracked``: the
        sites' rows to log, default all), ``best.pt`` (chosen on the sites' validation,
        never a test split) and ``last.pt``, and the log line."""
        results = self._test_metrics(arrays) if test else {}
        row = self.record.record(rnd, results, sites, **extra)  # seconds include the tests
        self.tracker.log_round(rnd, results, sites if tracked is None else tracked)
        best = rnd > 0 and self.record.is_best(rnd, sites, refitted=refitted)
        meta = {REFITTED: True} if refitted else {}
        self.record.checkpoint(rnd, arrays, self.aggregator.export_state(), best=best, **meta)
        answered = sites.get("train") or next(iter(sites.values()), [])  # round 0: statistics
        self._log(rnd, what, results, len(answered), row["seconds"])

    def _log(self, rnd: int, what: str, results: dict, n_sites: int, seconds: float) -> None:
        """The round's one log line: ``round 2/5  test_official acc 0.9512  macro-F1
        0.9480  (5 sites)  12.3 s``."""
        head = f"round {rnd}/{self.fed.rounds}" + (f" ({what})" if what else "")
        scores = ""
        if results:
            first = next(iter(results))
            m = results[first]
            scores = f"  {first} acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"
        log.info("%s%s  (%d sites)  %.1f s", head, scores, n_sites, seconds)

"""Strategy registry: Flower's strategies, subclassed only where behaviour must change.

The one change: every strategy records each site's own metrics (Flower keeps
aggregates only) and, before the parent's aggregation runs, drops replies that
would corrupt the global model (arrays that are not finite, or whose names or
shapes differ from what the server sent), naming the site.

What a strategy must carry across a resume (FedAdam's moments, SCAFFOLD's variate,
adaptive clipping's norm) is read and restored by one adapter,
:func:`export_state` / :func:`import_state`: Flower 1.42's strategies have no state
interface of their own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy.fedopt import FedOpt

from fedscan.common.core.errors import ConfigError
from fedscan.common.core.registry import Registry
from fedscan.common.federated.privacy import CentralDPSettings
from fedscan.common.federated.scaffold import server_variate
from fedscan.common.federated.settings import FederationSettings, check_strategy
from fedscan.common.federated.site_names import site_label
from fedscan.common.federated.wire import (
    ARRAYS,
    COUNT_PREFIX,
    METRICS,
    NODE_ID,
    NUM_EXAMPLES,
    SCAFFOLD_C,
    SCAFFOLD_DELTA,
    SITE,
    SITE_ID,
    SITE_NAME,
)

log = logging.getLogger("fedscan.server")

STRATEGIES: Registry[type] = Registry("strategy", "strategy.name")


def reply_row(msg: Message) -> dict[str, Any]:
    """A site's reply as the run folder records it: its metrics, the node id the
    server saw it from, and the site's ``site-name`` when it sent one."""
    row = dict(msg.content[METRICS])
    row[NODE_ID] = int(msg.metadata.src_node_id)
    if SITE in msg.content and SITE_NAME in msg.content[SITE]:
        row[SITE_NAME] = str(msg.content[SITE][SITE_NAME])
    return row


class SiteNames:
    """The names of the sites that have replied, by node id: a warning about a site
    that failed (its error reply carries no metrics) names it as its last reply did."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def learn(self, row: Mapping[str, Any]) -> str:
        name = site_label(row)
        self._names[int(row[NODE_ID])] = name
        return name

    def __call__(self, node_id: int) -> str:
        return self._names.get(int(node_id), site_label({NODE_ID: node_id}))


class SiteRecording:
    """Mixin: keeps per-site metrics per round and refuses non-finite updates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.site_metrics: dict[int, dict[str, list[dict]]] = {}
        self.names = SiteNames()

    def _record(self, rnd: int, phase: str, replies: Iterable[Message]) -> None:
        rows = self.site_metrics.setdefault(rnd, {}).setdefault(phase, [])
        for msg in replies:
            if msg.has_content() and METRICS in msg.content:
                row = reply_row(msg)
                self.names.learn(row)
                rows.append(row)

    def take_rows(self, rnd: int, phase: str) -> list[dict]:
        """The sites' rows of round ``rnd``'s ``phase`` (train | evaluate), handed over
        once: the federation loop records them in the run folder."""
        phases = self.site_metrics.get(rnd, {})
        rows = phases.pop(phase, [])
        if not phases:
            self.site_metrics.pop(rnd, None)
        return rows

    def _name(self, msg: Message) -> str:
        """The site a reply came from, as the run folder names it."""
        if msg.has_content() and METRICS in msg.content:
            return site_label(reply_row(msg))
        return self.names(msg.metadata.src_node_id)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        # What every reply must match: the names and shapes the server sent.
        self._expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled = {int(m.metadata.dst_node_id) for m in messages}
        return messages

    def rejection(self, msg: Message) -> str | None:
        """Why a site's train reply must not be aggregated, or ``None`` if it may."""
        arrays = msg.content.get(ARRAYS) if msg.has_content() else None
        if arrays is None:
            return "no arrays in the reply"
        expected = getattr(self, "_expected", None)
        if expected is not None:
            missing, extra = (
                sorted(set(expected) - set(arrays)),
                sorted(set(arrays) - set(expected)),
            )
            if missing or extra:
                return f"parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})"
            for k, a in arrays.items():
                if (tuple(a.shape), a.dtype) != expected[k]:
                    want = expected[k]
                    return f"'{k}' is {a.dtype}{list(a.shape)}, expected {want[1]}{list(want[0])}"
        for k, a in arrays.items():
            if not np.isfinite(a.numpy()).all():
                return f"NaN/Inf in '{k}'"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        kept = []
        for msg in replies:
            site = self._name(msg)
            if msg.has_error():
                log.warning("round %d: %s failed: %s", server_round, site, msg.error.reason)
            elif (why := self.rejection(msg)) is not None:
                log.warning("round %d: update from %s rejected: %s", server_round, site, why)
            else:
                kept.append(msg)
        # A dead site's reply is an error the SuperLink writes on its behalf (it does
        # not carry the site's id), so name the silent sites by what was sent.
        answered = {int(m.metadata.src_node_id) for m in replies if not m.has_error()}
        silent = sorted(getattr(self, "_sampled", set()) - answered)
        if silent:
            log.warning(
                "round %d: no update from %s (failed, disconnected or timed out); "
                "aggregating the other %d",
                server_round,
                ", ".join(self.names(n) for n in silent),
                len(kept),
            )
        self._record(server_round, "train", kept)
        floor = int(getattr(self, "min_train_nodes", 1))
        if len(kept) < floor:
            # One site's update as the new global model would hand it to every other site.
            log.warning(
                "round %d: only %d usable update(s), fewer than federation.min_nodes=%d; "
                "the global model stays as it was",
                server_round,
                len(kept),
                floor,
            )
            return None, None
        # A site that did not train (its privacy budget is spent) reports with zero
        # weight: its metrics are recorded, its unchanged copy is not averaged in.
        weighted = [m for m in kept if float(m.content[METRICS].get(NUM_EXAMPLES, 1)) > 0]
        if len(weighted) < len(kept):
            log.info(
                "round %d: %d site(s) sent no update (zero weight)",
                server_round,
                len(kept) - len(weighted),
            )
        arrays, metrics = super().aggregate_train(server_round, weighted)
        return self._as_sent(arrays), metrics

    def _as_sent(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the dtypes the server sent. Flower 1.42's FedAdam returns
        float64 arrays (its bias-corrected step is a float64 numpy scalar times float32
        arrays); sent on as the next global model, every site's float32 reply then failed
        the dtype check above, and FedAdam stopped training after round 1. The sites and
        the server's evaluation store the global model in these dtypes anyway, so the
        cast changes no value they use."""
        expected = getattr(self, "_expected", None)
        if arrays is None or not expected:
            return arrays
        if all(a.dtype == expected[k][1] for k, a in arrays.items() if k in expected):
            return arrays  # every other strategy: unchanged, not copied
        return ArrayRecord(
            {
                k: Array(np.asarray(a.numpy(), dtype=expected[k][1])) if k in expected else a
                for k, a in arrays.items()
            }
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        replies = [m for m in replies if not m.has_error()]
        self._record(server_round, "evaluate", replies)
        return super().aggregate_evaluate(server_round, replies)


class Scaffold(fl.FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020) on Flower's Message-API FedAvg.

    Every train message carries the server variate ``c`` beside the weights; every
    reply carries the site's ``delta c_i`` beside its weights. The deltas are taken
    out before FedAvg averages the weights (it expects one ArrayRecord per reply) and
    update ``c`` with :func:`common.federated.scaffold.server_variate`. ``c`` is part
    of the resumable strategy state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scaffold_c: dict[str, np.ndarray] = {}
        self._connected = 1

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._connected = max(1, len(list(grid.get_node_ids())))
        for m in messages:
            c = {k: Array(v) for k, v in self.scaffold_c.items()}
            m.content[SCAFFOLD_C] = ArrayRecord(array_dict=c)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        deltas = []
        for m in replies:
            if m.has_content() and SCAFFOLD_DELTA in m.content:
                record = m.content.pop(SCAFFOLD_DELTA)
                deltas.append({k: a.numpy() for k, a in record.items()})
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.scaffold_c = server_variate(self.scaffold_c, deltas, num_sites=self._connected)
        return arrays, metrics


def _register(name: str, base: type) -> None:
    STRATEGIES.register(name)(type(f"Recording{base.__name__}", (SiteRecording, base), {}))


for _name, _base in {
    "fedavg": fl.FedAvg,
    "fedprox": fl.FedProx,
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedmedian": fl.FedMedian,
    "fedtrimmedavg": fl.FedTrimmedAvg,
    "krum": fl.Krum,
    "scaffold": Scaffold,
}.items():
    _register(_name, _base)


def site_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """What Flower prints as a round's aggregated site metrics, made meaningful.

    Flower's default weights *every* key by the sites' example counts, so it printed
    an average site id and fractional class counts. Here ids are dropped, counts
    (``num-examples``, ``n_train_<class>``) are summed, and rates (accuracy, loss)
    are averaged weighted by ``weighting_metric_name``, as before.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighting_metric_name]) for m in metrics]
    out = MetricRecord()
    rates: dict[str, list[tuple[float, float]]] = {}
    for m, w in zip(metrics, weights, strict=True):
        for key, value in m.items():
            if key in (SITE_ID, NODE_ID) or isinstance(value, list):
                continue
            if key == weighting_metric_name or key.startswith(COUNT_PREFIX):
                out[key] = out.get(key, 0) + value
            else:
                rates.setdefault(key, []).append((float(value), w))
    for key, pairs in rates.items():  # over the sites where it is defined: a site's recall
        pairs = [(v, w) for v, w in pairs if math.isfinite(v)]  # of a class it has no
        if pairs:  # validation image of is NaN
            total = sum(w for _, w in pairs) or 1.0
            out[key] = sum(v * w for v, w in pairs) / total
    return out


def build_strategy(cfg: Mapping[str, Any], federation: FederationSettings) -> SiteRecording:
    """Instantiate the configured strategy with the federation's sampling settings.

    ``cfg`` is checked by :func:`common.federated.settings.check_strategy` first (the
    same check :func:`common.runs.validate.validate` runs before any work).
    """
    check_strategy(cfg)
    cls = STRATEGIES.get(str(cfg["name"]))
    params = {k: v for k, v in cfg.items() if k != "name"}
    if "mu" in params:
        params["proximal_mu"] = params.pop("mu")
    try:
        strategy = cls(
            fraction_train=federation.fraction_train,
            fraction_evaluate=federation.fraction_evaluate,
            min_train_nodes=federation.min_nodes,
            min_evaluate_nodes=federation.min_nodes,
            min_available_nodes=federation.min_nodes,
            train_metrics_aggr_fn=site_metrics,
            evaluate_metrics_aggr_fn=site_metrics,
            **params,
        )
    except TypeError as exc:
        raise ConfigError("strategy", f"bad parameter for {cfg['name']}: {exc}") from None
    check_state_fields(strategy)
    return strategy


CENTRAL_DP = {
    ("client", "fixed"): fl.DifferentialPrivacyClientSideFixedClipping,
    ("server", "fixed"): fl.DifferentialPrivacyServerSideFixedClipping,
    ("client", "adaptive"): fl.DifferentialPrivacyClientSideAdaptiveClipping,
    ("server", "adaptive"): fl.DifferentialPrivacyServerSideAdaptiveClipping,
}


def wrap_central_dp(strategy: fl.Strategy, settings: CentralDPSettings, num_sampled: int):
    """``privacy=central``: Flower's update-level DP wrapper around ``strategy``.

    Client-side clipping needs the sites' ``fixedclipping_mod`` /
    ``adaptiveclipping_mod``; fedscan's ClientApp applies them whenever the
    server's train config carries a clipping norm.
    """
    cls = CENTRAL_DP[(settings.side, settings.clipping)]
    noise, norm = settings.noise_multiplier, settings.clipping_norm
    if settings.clipping == "fixed":
        return cls(strategy, noise, norm, num_sampled)
    wrapped = cls(strategy, noise, num_sampled, initial_clipping_norm=norm)
    check_state_fields(wrapped)
    return wrapped


# ------------------------------------------------------------------ resume adapter
# What each stateful strategy must carry across a resume, by the attribute it keeps
# it in. Flower 1.42's strategies have no state_dict / load_state_dict (FedOpt keeps
# its moments in the public attributes m_t and v_t and reads them in aggregate_train);
# FedOpt's current_arrays is not state: configure_train sets it every round.
STATE_FIELDS: dict[type, tuple[str, ...]] = {
    FedOpt: ("m_t", "v_t"),  # FedAdam, FedYogi (and FedAdagrad)
    Scaffold: ("scaffold_c",),
    fl.DifferentialPrivacyClientSideAdaptiveClipping: ("clipping_norm",),
    fl.DifferentialPrivacyServerSideAdaptiveClipping: ("clipping_norm",),
}
_WRAPPER_PREFIX = "wrapper."  # a central-DP wrapper's fields, beside the inner strategy's


def _layers(strategy: Any) -> list[tuple[str, Any]]:
    """``(prefix, strategy)`` for a central-DP wrapper (``wrapper.``) and the strategy
    it wraps (no prefix: the keys of checkpoints from before the wrapper's state)."""
    inner = getattr(strategy, "strategy", None)
    if isinstance(strategy, fl.Strategy) and isinstance(inner, fl.Strategy):
        return [(_WRAPPER_PREFIX, strategy), ("", inner)]
    return [("", strategy)]


def _fields(strategy: Any) -> tuple[str, ...]:
    return tuple(f for c, names in STATE_FIELDS.items() if isinstance(strategy, c) for f in names)


def check_state_fields(strategy: Any) -> None:
    """Fail loudly, when the strategy is built, if a Flower upgrade renamed an attribute
    the resume adapter reads and writes (a resumed run would silently start over)."""
    for _, layer in _layers(strategy):
        missing = [f for f in _fields(layer) if not hasattr(layer, f)]
        if missing:
            raise RuntimeError(
                f"{type(layer).__name__} has no attribute {missing}: server/strategies.py's "
                "STATE_FIELDS no longer matches the installed Flower; resume would lose the "
                "strategy's state"
            )


def export_state(strategy: Any) -> dict[str, Any]:
    """The strategy's resumable state (``last.pt``'s ``strategy_state``)."""
    return {
        prefix + f: getattr(layer, f)
        for prefix, layer in _layers(strategy)
        for f in _fields(layer)
        if getattr(layer, f) is not None
    }


def import_state(strategy: Any, state: Mapping[str, Any]) -> None:
    """Restore :func:`export_state`'s output; a key this strategy does not keep is
    ignored (``current_arrays`` in checkpoints written before this adapter)."""
    for prefix, layer in _layers(strategy):
        for f in _fields(layer):
            if prefix + f in state:
                setattr(layer, f, state[prefix + f])

"""fedscan ClientApp: unpack the global weights, call the site's trainer, pack the update
and aggregate metrics. Nothing else leaves the site.

All site behaviour is :class:`common.federated.trainer.SiteTrainer`; this module only
converts between Flower records and its arguments, and keeps its state across rounds
in the node's ``context.state``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from omegaconf import DictConfig

from fedscan.client.secure import secure_mod
from fedscan.common.core.config import load_config, overrides_from_run_config
from fedscan.common.core.logs import configure_site_logging
from fedscan.common.federated.site import SiteCache
from fedscan.common.federated.trainer import SiteState, SiteTrainer
from fedscan.common.federated.wire import (
    ARRAYS,
    CONFIG,
    DATA_PATH,
    HEAD_INIT,
    METRICS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    RUN_KEY,
    SCAFFOLD_C,
    SCAFFOLD_DELTA,
    SITE,
    SITE_ID,
    SITE_NAME,
    round_number,
)

LOCAL_STATE = "fedscan-local-state"  # FedBN tensors that never leave the site
LEDGER_STATE = "fedscan-privacy-ledger"  # the site's DP-SGD accountant history
CONTROL_STATE = "fedscan-scaffold"  # the site's SCAFFOLD variate c_i


def _config(context: Context, overrides: Sequence[str]) -> DictConfig:
    """The run's config as this site composes it. A deployed site (a ``data-path`` in its
    node config) reads its own folder: the coordinator's dataset and data root name the
    dataset's settings (image size, classes) but are not folders on this machine, so
    they are not checked here."""
    deployed = bool(context.node_config.get(DATA_PATH))
    return load_config(
        [*overrides_from_run_config(dict(context.run_config)), *overrides],
        check_data=not deployed,
    )


def _load_state(context: Context) -> SiteState:
    state = SiteState()
    if LOCAL_STATE in context.state:
        state.local_arrays = context.state[LOCAL_STATE].to_torch_state_dict()
    if LEDGER_STATE in context.state:
        state.ledger = json.loads(str(context.state[LEDGER_STATE]["json"]))
    if CONTROL_STATE in context.state:
        state.control = context.state[CONTROL_STATE].to_torch_state_dict()
    return state


def _save_state(context: Context, state: SiteState) -> None:
    if state.local_arrays:
        context.state[LOCAL_STATE] = ArrayRecord(state.local_arrays)
    if state.ledger is not None:
        context.state[LEDGER_STATE] = ConfigRecord({"json": json.dumps(state.ledger)})
    if state.control:
        context.state[CONTROL_STATE] = ArrayRecord(state.control)


def _reply(content: RecordDict, trainer: SiteTrainer, msg: Message) -> Message:
    """A reply, carrying the site's ``site-name`` when it has one (deployment): the
    server names the site by it (a nameless deployed site by its node id)."""
    if trainer.site_name:
        content[SITE] = ConfigRecord({SITE_NAME: trainer.site_name})
    return Message(content=content, reply_to=msg)


class _Site:
    """The ClientApp's handlers: each message's config (tree + run config +
    ``overrides``), its trainer (its data from ``cache``), and the reply."""

    def __init__(self, overrides: tuple[str, ...], cache: SiteCache, entry_point: bool) -> None:
        self.overrides, self.cache, self.entry_point = overrides, cache, entry_point

    def trainer(self, context: Context) -> SiteTrainer:
        if self.entry_point:
            configure_site_logging()
        cfg = _config(context, self.overrides)
        return SiteTrainer.for_node(
            cfg, context.node_config, cache=self.cache, node_id=context.node_id
        )

    def central_dp_mod(self, msg: Message, context: Context, call_next) -> Message:
        """``privacy=central``, client-side clipping: Flower's clipping mods, applied when
        the server's DP wrapper sent a clipping norm (it does on train messages)."""
        if KEY_CLIPPING_NORM not in msg.content.get(CONFIG, {}):
            return call_next(msg, context)
        privacy = _config(context, self.overrides).privacy
        adaptive = str(privacy.get("clipping", "fixed")) == "adaptive"
        mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
        return mod(msg, context, call_next)

    def train(self, msg: Message, context: Context) -> Message:
        config = msg.content[CONFIG]
        if HEAD_INIT in config:  # the statistics round under SecAgg+ (train messages only)
            return self.statistics(msg, context)
        trainer = self.trainer(context)
        state = _load_state(context)
        control = msg.content.get(SCAFFOLD_C)  # sent by strategy=scaffold only
        update = trainer.train(
            msg.content[ARRAYS].to_torch_state_dict(),
            rnd=round_number(config),
            proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
            run_key=str(config.get(RUN_KEY, "")),
            state=state,
            server_control=None if control is None else control.to_torch_state_dict(),
        )
        _save_state(context, state)
        content = RecordDict(
            {ARRAYS: ArrayRecord(update.arrays), METRICS: MetricRecord(update.metrics)}
        )
        if update.control_delta is not None:
            content[SCAFFOLD_DELTA] = ArrayRecord(update.control_delta)
        return _reply(content, trainer, msg)

    def statistics(self, msg: Message, context: Context) -> Message:
        """A statistics round (``federation.head_init``, ``bn_refit``, ``head_refit``):
        sums only."""
        trainer = self.trainer(context)
        config = msg.content[CONFIG]
        state = _load_state(context)
        stats = trainer.statistics(
            msg.content[ARRAYS].to_torch_state_dict(),
            kind=str(config[HEAD_INIT]),
            state=state,
            run_key=str(config.get(RUN_KEY, "")),
        )
        _save_state(context, state)  # a DP site's ledger holds the centring query
        metrics = {NUM_EXAMPLES: len(trainer.site.train), SITE_ID: trainer.site_id}
        content = RecordDict(
            {
                ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in stats.items()}),
                METRICS: MetricRecord(metrics),
            }
        )
        return _reply(content, trainer, msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        trainer = self.trainer(context)
        metrics = trainer.evaluate(
            msg.content[ARRAYS].to_torch_state_dict(), state=_load_state(context)
        )
        return _reply(RecordDict({METRICS: MetricRecord(metrics)}), trainer, msg)


def make_client_app(
    overrides: tuple[str, ...] = (),
    outer_mods: Sequence = (),
    *,
    entry_point: bool = False,
    cache: SiteCache | None = None,
) -> ClientApp:
    """A ClientApp whose config is the tree + run config + ``overrides`` (tests, simulate).

    ``outer_mods`` wrap everything else, so they see exactly what leaves the site
    (the egress test records replies with one). ``entry_point``: the app is its
    process's entry point (what ``flwr run`` loads; a simulation's Ray actor), so it
    sets up the site's logging. ``cache``: what the app keeps between messages (its
    sites' prepared data); one of its own by default.
    """
    site = _Site(tuple(overrides), SiteCache() if cache is None else cache, entry_point)
    # secure_mod: SecAgg+ rounds (the server's secure_aggregation decides; sites need no key)
    app = ClientApp(mods=[*outer_mods, secure_mod, site.central_dp_mod])
    app.train()(site.train)
    app.query()(site.statistics)
    app.evaluate()(site.evaluate)
    return app


app = make_client_app(entry_point=True)

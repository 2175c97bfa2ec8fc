"""fedscan ClientApp: unpack the global weights, call the site's trainer, pack the update
and aggregate metrics. Nothing else leaves the site.

All site behaviour is :class:`common.federated.trainer.SiteTrainer`; this module only
converts between Flower records and its arguments, and keeps its state across rounds
in the node's ``context.state``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from omegaconf import DictConfig

from fedscan.client.secure import secure_mod
from fedscan.common.core.config import load_config, overrides_from_run_config
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
    SITE_ID,
    round_number,
)

LOCAL_STATE = "fedscan-local-state"  # FedBN tensors that never leave the site
LEDGER_STATE = "fedscan-privacy-ledger"  # the site's DP-SGD accountant history
CONTROL_STATE = "fedscan-scaffold"  # the site's SCAFFOLD variate c_i


def _site_logging() -> None:
    """Show the site's progress lines where the ClientApp runs.

    A simulated site runs in a Ray actor and a deployed one in a ``flwr-clientapp``
    process; neither configures Python logging, so fedscan's INFO lines (training,
    the frozen-trunk cache, data preparation) were dropped and a fine-tune round
    looked like minutes of silence. Where the process already has handlers (the
    driver, pytest), nothing changes.
    """
    fedscan = logging.getLogger("fedscan")
    if logging.getLogger().handlers or fedscan.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    fedscan.addHandler(handler)
    fedscan.setLevel(logging.INFO)
    fedscan.propagate = False  # a library that later configures the root (Opacus) doubles lines


def _config(context: Context, overrides: Sequence[str]) -> DictConfig:
    """The run's config as this site composes it. A deployed site (a ``data-path`` in its
    node config) reads its own folder: the coordinator's dataset and data root name the
    dataset's settings (image size, classes) but are not folders on this machine, so
    they are not checked here."""
    _site_logging()
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


def make_client_app(overrides: tuple[str, ...] = (), outer_mods: Sequence = ()) -> ClientApp:
    """A ClientApp whose config is the tree + run config + ``overrides`` (tests, simulate).

    ``outer_mods`` wrap everything else, so they see exactly what leaves the site
    (the egress test records replies with one).
    """

    def central_dp_mod(msg: Message, context: Context, call_next) -> Message:
        """``privacy=central``, client-side clipping: Flower's clipping mods, applied when
        the server's DP wrapper sent a clipping norm (it does on train messages)."""
        if KEY_CLIPPING_NORM not in msg.content.get(CONFIG, {}):
            return call_next(msg, context)
        adaptive = str(_config(context, overrides).privacy.get("clipping", "fixed")) == "adaptive"
        mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
        return mod(msg, context, call_next)

    # secure_mod: SecAgg+ rounds (the server's secure_aggregation decides; sites need no key)
    app = ClientApp(mods=[*outer_mods, secure_mod, central_dp_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content[CONFIG]
        if HEAD_INIT in config:  # the statistics round under SecAgg+ (train messages only)
            return statistics(msg, context)
        trainer = SiteTrainer.for_node(_config(context, overrides), context.node_config)
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
        return Message(content=content, reply_to=msg)

    @app.query()
    def statistics(msg: Message, context: Context) -> Message:
        """The one-shot statistics round (``federation.head_init``): sums only."""
        trainer = SiteTrainer.for_node(_config(context, overrides), context.node_config)
        kind = str(msg.content[CONFIG][HEAD_INIT])
        stats = trainer.statistics(
            msg.content[ARRAYS].to_torch_state_dict(), kind=kind, state=_load_state(context)
        )
        metrics = {NUM_EXAMPLES: len(trainer.site.train), SITE_ID: trainer.site_id}
        content = RecordDict(
            {
                ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in stats.items()}),
                METRICS: MetricRecord(metrics),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        trainer = SiteTrainer.for_node(_config(context, overrides), context.node_config)
        metrics = trainer.evaluate(
            msg.content[ARRAYS].to_torch_state_dict(), state=_load_state(context)
        )
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()

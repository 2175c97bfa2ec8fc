"""The site's side of secure aggregation: Flower's ``secaggplus_mod``, and the thin
adapter between the legacy messages it speaks and fedscan's train.

Flower's SecAgg+ runs on its legacy message format (``fitins.*`` / ``fitres.*``
records, parameters as an ordered list of arrays). The adapter converts those to
the Message-API content fedscan's handlers read (``arrays`` by name, ``config``)
and back, so the site trains with exactly the code it uses without secure
aggregation: one training loop, one model exchange, one metrics definition.

Two things differ on the way out:

- the site sends its **update** (new weights - the weights it received), which
  ``secaggplus_mod`` clips, quantises and masks; the server adds the unmasked
  mean of the updates to the global weights;
- parameter names travel in the config (``fedscan-keys``), since the legacy
  format has none.

:func:`secure_mod` sits in every ClientApp and acts only on SecAgg+ messages, so
a site needs no setting: the server's ``secure_aggregation`` decides.
"""

from __future__ import annotations

import json
import logging
import zlib

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedscan.client.secagg import pinned_secaggplus_mod
from fedscan.common.federated.secure import scaled_statistics, weighted_peak
from fedscan.common.federated.wire import (
    ARRAYS,
    CLIPPING_RANGE,
    CONFIG,
    HEAD_INIT,
    MAX_WEIGHT,
    METRICS,
    NO_SITE,
    NUM_EXAMPLES,
    PARAMETER_NAMES,
    PARTITION_ID,
    SITE,
    SITE_NAME,
    STATISTICS_KEYS,
    STATISTICS_SCALE,
    round_number,
)

log = logging.getLogger("fedscan.site")

FIT_INS = "fitins.parameters"


def _named(ins_parameters: list[np.ndarray], config: dict) -> tuple[list[str], dict]:
    names = json.loads(str(config[PARAMETER_NAMES]))
    if len(names) != len(ins_parameters):
        raise ValueError(f"secure aggregation: {len(ins_parameters)} arrays but {len(names)} names")
    return names, dict(zip(names, ins_parameters, strict=True))


def _as_message_api(msg: Message) -> tuple[list[str], dict[str, np.ndarray]]:
    """Rewrite a legacy ``fitins`` message in place into the ``arrays`` + ``config``
    content fedscan's handlers read."""
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(ins.parameters)
    names, named = _named(arrays, ins.config)
    config = {k: v for k, v in ins.config.items() if k != PARAMETER_NAMES}
    msg.content = RecordDict(
        {
            ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in named.items()}),
            CONFIG: ConfigRecord(config),
        }
    )
    return names, named


def _metrics(reply: Message) -> dict:
    """The reply's metrics as a legacy result carries them, with the site's ``site-name``
    (legacy metrics may hold text; the server names the site by it)."""
    metrics = dict(reply.content[METRICS])
    if SITE in reply.content and SITE_NAME in reply.content[SITE]:
        metrics[SITE_NAME] = str(reply.content[SITE][SITE_NAME])
    return metrics


def legacy_train(msg: Message, context: Context, call_next) -> Message:
    """fitins -> fedscan train -> fitres carrying the update (new - received); or, for
    the statistics round, the site's sums scaled into the clipping range."""
    names, received = _as_message_api(msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if HEAD_INIT in msg.content[CONFIG]:
        return _statistics_fitres(msg, reply, context)
    new = reply.content[ARRAYS]
    update = [np.asarray(new[k].numpy(), dtype=np.float64) - received[k] for k in names]
    # float64: SecAgg+ shifts values by the clipping range before rounding, and at 256 a
    # float32 keeps only ~3e-5 (this array never leaves the site: the mod masks it)
    metrics = _metrics(reply)
    _warn_if_clipped(update, int(metrics[NUM_EXAMPLES]), msg.content[CONFIG])
    _seed_rounding(msg, context)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(update),
        num_examples=int(metrics[NUM_EXAMPLES]),
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _statistics_fitres(msg: Message, reply: Message, context: Context) -> Message:
    """The site's feature sums as a SecAgg+ "update": each divided by
    ``statistics-scale`` and sent with weight 1 (num-examples = max_weight), so the
    protocol's mean times (sites x scale) is the total (values outside the clipping
    range are refused: :func:`scaled_statistics`). The site's real image count stays
    in its metrics (visible, as without SecAgg+)."""
    config = msg.content[CONFIG]
    metrics = _metrics(reply)
    names, scaled = scaled_statistics(
        {k: a.numpy() for k, a in reply.content[ARRAYS].items()},
        scale=float(config[STATISTICS_SCALE]),
        clipping_range=float(config[CLIPPING_RANGE]),
    )
    metrics[STATISTICS_KEYS] = json.dumps(names)
    _seed_rounding(msg, context)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(scaled),
        num_examples=int(config[MAX_WEIGHT]),  # weight 1: the mean of the sites' sums
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _warn_if_clipped(update: list[np.ndarray], n: int, config) -> None:
    """SecAgg+ clips the weighted update (update x n / max_weight) to the clipping
    range without a word; a clipped site pulls the mean towards zero. Say so here,
    where the values are known, naming the key that fixes it."""
    if CLIPPING_RANGE not in config or MAX_WEIGHT not in config:
        return
    bound, max_weight = float(config[CLIPPING_RANGE]), float(config[MAX_WEIGHT])
    worst = weighted_peak(update, n, max_weight=max_weight)
    if worst > bound:
        log.warning(
            "secure_aggregation.clipping_range=%g: this site's weighted update reaches %.3g "
            "and is clipped by SecAgg+ (the mean is pulled towards zero); raise it",
            bound,
            worst,
        )
    if n > max_weight:
        log.warning(
            "secure_aggregation.max_weight=%g is below this site's %d training images; "
            "raise it to at least %d",
            max_weight,
            n,
            n,
        )


def _seed_rounding(msg: Message, context: Context) -> None:
    """Make SecAgg+'s stochastic rounding reproducible.

    ``secaggplus_mod`` quantises the update with stochastic rounding drawn from
    numpy's *global* generator (``flwr.common.secure_aggregation.quantization``),
    right after this adapter returns; unseeded, two runs of the same config (or a
    resumed run and an uninterrupted one) differ by up to a quantisation step per
    value, which training then amplifies. Seeding it from the round and the site
    here makes them equal; :func:`secure_mod` puts the generator's state back as soon
    as the mod returns, so nothing else in the process (in a simulation: the server,
    the other sites) draws from a reseeded generator. The rounding is not a secret:
    the masks come from the protocol's own seeds, untouched by this.
    """
    rnd = round_number(msg.content[CONFIG])
    site = context.node_config.get(PARTITION_ID, NO_SITE)
    np.random.seed(zlib.crc32(f"fedscan-secagg-rounding:{rnd}:{site}".encode()))


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Route SecAgg+ train messages through Flower's ``secaggplus_mod`` (setup, key
    sharing, masked update, unmasking; fedscan's masks: ``client/secagg.py``); every other
    message (the sites' evaluation, which the server sends as Message-API evaluate messages)
    passes untouched."""
    content = msg.content if msg.has_content() else RecordDict()
    if RECORD_KEY_CONFIGS in content.config_records:
        # numpy's global generator as it was before _seed_rounding, once the mod returns
        # (fedscan's training draws from its own seeded generators, never this one)
        saved = np.random.get_state()
        try:
            return pinned_secaggplus_mod(msg, context, lambda m, c: legacy_train(m, c, call_next))
        finally:
            np.random.set_state(saved)
    return call_next(msg, context)

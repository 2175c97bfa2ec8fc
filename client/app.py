"""fedscan ClientApp: unpack the global weights, train or evaluate on the site's data,
pack the update and aggregate metrics. Nothing else leaves the site."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from omegaconf import DictConfig, OmegaConf

from common.classes import CLASSES
from common.config import load_config, overrides_from_run_config
from common.federation import (
    exchanged_keys,
    get_exchanged,
    local_fit,
    local_keys,
    set_exchanged,
)
from common.pipeline import model_inputs, prepare_data, train_settings
from common.privacy import PrivacyLedger, dp_settings, dp_site_round, ledger_file
from common.site import SiteData, fresh_model, site_config, site_indices
from common.training import Batches, evaluate_model, place_model, select_device
from common.transforms import Augment

log = logging.getLogger("fedscan.client")


@lru_cache(maxsize=2)
def _template(cfg_yaml: str):
    cfg = OmegaConf.create(cfg_yaml)
    return fresh_model(cfg, len(CLASSES[cfg.dataset.domain]))


@lru_cache(maxsize=2)
def _prepared(cfg_yaml: str, data_path: str):
    """Per process, once per config: data, decode cache and frozen-trunk features.

    Shared by every partition a simulation actor serves, so rotating sites through
    a few actors never re-reads the dataset.
    """
    cfg = site_config(OmegaConf.create(cfg_yaml), data_path or None)
    device = select_device(str(cfg.device), cfg.num_threads)
    probe = _template(cfg_yaml)  # its frozen stages feed the feature cache
    prepared = prepare_data(cfg)
    x, start = model_inputs(probe, prepared, cfg, device)
    return cfg, device, prepared, x, start


@lru_cache(maxsize=1024)
def _site(cfg_yaml: str, partition_id: int | None, num_partitions: int | None, data_path: str):
    cfg, device, prepared, x, start = _prepared(cfg_yaml, data_path)
    train, val = site_indices(
        cfg, prepared, partition_id=partition_id, num_partitions=num_partitions
    )
    return cfg, device, SiteData(prepared=prepared, x=x, start=start, train=train, val=val)


def resolve(
    context: Context, overrides: tuple[str, ...] = ()
) -> tuple[DictConfig, torch.device, SiteData]:
    cfg = load_config([*overrides_from_run_config(dict(context.run_config)), *overrides])
    nc = context.node_config
    data_path = str(nc.get("data-path", "") or "")
    pid = None if data_path else int(nc.get("partition-id", 0))
    n = None if data_path else int(nc.get("num-partitions", 1))
    return _site(OmegaConf.to_yaml(cfg), pid, n, data_path)


LOCAL_STATE = "fedscan-local-state"
LEDGER_STATE = "fedscan-privacy-ledger"


def load_ledger(context: Context, path: Path | None, accountant: str) -> PrivacyLedger:
    if LEDGER_STATE in context.state:  # this node's state across rounds
        return PrivacyLedger.from_dict(json.loads(str(context.state[LEDGER_STATE]["json"])))
    if path is not None:
        return PrivacyLedger.load(path, accountant)
    return PrivacyLedger([], accountant)


def save_ledger(context: Context, path: Path | None, ledger: PrivacyLedger) -> None:
    context.state[LEDGER_STATE] = ConfigRecord({"json": json.dumps(ledger.to_dict())})
    if path is not None:
        ledger.save(path)


def _model_with(cfg: DictConfig, site: SiteData, msg: Message, context: Context):
    """The global weights, plus this site's own kept state (FedBN) from earlier rounds."""
    # A copy of the per-process template: cheaper than rebuilding and re-reading weights.
    model = copy.deepcopy(_template(OmegaConf.to_yaml(cfg)))
    keys = exchanged_keys(model, fedbn=bool(cfg.federation.fedbn))
    set_exchanged(model, msg.content["arrays"].to_torch_state_dict(), keys)
    if LOCAL_STATE in context.state:
        model.load_state_dict(context.state[LOCAL_STATE].to_torch_state_dict(), strict=False)
    return model, keys


def _val_metrics(model, cfg, site, device) -> dict[str, float]:
    batches = Batches(site.x, site.labels, site.val, batch_size=64)
    m = evaluate_model(
        model, batches, site.prepared.collection.classes, device=device, start=site.start
    )
    out = {"val_loss": m["loss"], "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"]}
    out.update({f"val_recall_{c}": v["recall"] for c, v in m["per_class"].items()})
    return out


def make_client_app(overrides: tuple[str, ...] = (), outer_mods: Sequence = ()) -> ClientApp:
    """A ClientApp whose config is the tree + run config + ``overrides`` (tests, simulate).

    ``outer_mods`` wrap everything else, so they see exactly what leaves the site
    (the egress test records replies with one).
    """

    def central_dp_mod(msg: Message, context: Context, call_next) -> Message:
        """``privacy=central``, client-side clipping: Flower's clipping mods, applied when
        the server's DP wrapper sent a clipping norm (it does on train messages)."""
        config = msg.content.get("config", {})
        if KEY_CLIPPING_NORM not in config:
            return call_next(msg, context)
        cfg = load_config([*overrides_from_run_config(dict(context.run_config)), *overrides])
        adaptive = str(cfg.privacy.get("clipping", "fixed")) == "adaptive"
        mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
        return mod(msg, context, call_next)

    app = ClientApp(mods=[*outer_mods, central_dp_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, device, site = resolve(context, overrides)
        model, keys = _model_with(cfg, site, msg, context)
        settings = train_settings(cfg)
        config = msg.content["config"]
        rnd = int(config.get("server-round", 1)) + int(config.get("round-offset", 0))
        seed = (
            int(cfg.seed) * 100_003 + rnd * 1_009 + int(context.node_config.get("partition-id", 0))
        )
        torch.manual_seed(seed)
        augment = Augment(settings.augment, seed=seed) if site.start == 0 else None
        common = {
            "device": device,
            "start": site.start,
            "epochs": int(cfg.federation.local_epochs),
            "proximal_mu": float(config.get("proximal-mu", 0.0)),
            "seed": seed,
            "augment": augment,
        }
        pid = int(context.node_config.get("partition-id", -1))
        metrics: dict[str, float | int] = {"num-examples": len(site.train), "partition-id": pid}
        # per-class counts (aggregate): the partition report is what sites really hold.
        # (No `.classes` attribute in this closure: cloudpickle would drag torch.classes
        # into the Ray payload and fail.)
        metrics.update(site.train_class_counts())
        dp = dp_settings(cfg.privacy)
        if dp is None:
            loss, acc = local_fit(model, site.x, site.labels, site.train, settings, **common)
            metrics.update(train_loss=loss, train_accuracy=acc)
        else:
            path = ledger_file(
                run_key=str(config.get("run-key", "")),
                data_path=str(context.node_config.get("data-path", "") or ""),
                runs_dir=str(cfg.runs_dir),
                site=int(context.node_config.get("partition-id", 0)),
            )
            ledger = load_ledger(context, path, dp.accountant)
            total = int(cfg.federation.rounds) * int(cfg.federation.local_epochs)
            args = (model, site.x, site.labels, site.train, settings, dp, ledger)
            metrics.update(dp_site_round(*args, site=pid, rnd=rnd, epochs_total=total, **common))
            save_ledger(context, path, ledger)
        metrics.update(_val_metrics(model, cfg, site, device))
        kept = local_keys(model, keys)
        if kept:
            context.state[LOCAL_STATE] = ArrayRecord(get_exchanged(model.cpu(), kept))
        content = RecordDict(
            {
                "arrays": ArrayRecord(get_exchanged(model.cpu(), keys)),
                "metrics": MetricRecord(metrics),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, device, site = resolve(context, overrides)
        model, _ = _model_with(cfg, site, msg, context)
        place_model(model, device)
        metrics = {
            "num-examples": len(site.val),
            "partition-id": int(context.node_config.get("partition-id", -1)),
            **_val_metrics(model, cfg, site, device),
        }
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()

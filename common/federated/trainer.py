"""The site contract: what one site does with the global model, framework-free.

Modelled on ``monai.fl``'s ``ClientAlgo``: :class:`SiteTrainer` has
``train(global arrays, round) -> (arrays, metrics)`` and ``evaluate(global
arrays) -> metrics``; the Flower ClientApp only unpacks a message, calls one of
them and packs the reply. Everything a site decides lives here: the seed rule,
plain / FedProx / DP-SGD local training, the privacy ledger, the validation
metrics, and which tensors stay at the site (FedBN).

What a site keeps between rounds is a :class:`SiteState` the caller stores (Flower
node state in the ClientApp), so the trainer itself holds no per-round state.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedscan.common.core.errors import DataError
from fedscan.common.data.transforms import Augment
from fedscan.common.federated.centre import CENTRE_KIND, centre_module, site_centre_statistics
from fedscan.common.federated.exchange import (
    exchanged_keys,
    get_exchanged,
    local_keys,
    set_exchanged,
)
from fedscan.common.federated.head_init import linear_head
from fedscan.common.federated.privacy import (
    PrivacyLedger,
    dp_centre_query,
    dp_settings,
    dp_site_round,
    noise_seed,
)
from fedscan.common.federated.refit import local_statistics
from fedscan.common.federated.scaffold import correction, site_variate
from fedscan.common.federated.settings import federation_settings
from fedscan.common.federated.site import SiteCache, SiteData, site_file
from fedscan.common.federated.site_names import check_site_name, site_label
from fedscan.common.federated.wire import (
    NO_SITE,
    NODE_ID,
    NUM_EXAMPLES,
    SITE_ID,
    SITE_NAME,
    node_site,
)
from fedscan.common.learn.models.staged import StagedModel
from fedscan.common.learn.settings import TrainSettings, train_settings
from fedscan.common.learn.training import (
    Batches,
    MirroredRows,
    evaluate_model,
    loss_function,
    make_optimizer,
    mean_gradient,
    place_model,
    train_one_epoch,
)

Arrays = dict[str, torch.Tensor]

log = logging.getLogger("fedscan.site")


@dataclass
class SiteState:
    """What a site keeps across rounds: its own tensors (FedBN) and its privacy ledger."""

    local_arrays: Arrays = field(default_factory=dict)
    ledger: dict[str, Any] | None = None  # PrivacyLedger.to_dict()
    control: Arrays = field(default_factory=dict)  # SCAFFOLD's c_i


class SiteUpdate(NamedTuple):
    """What ``train`` returns: the weights and metrics every strategy gets, and SCAFFOLD's
    ``delta c_i`` when the server sent a variate."""

    arrays: Arrays
    metrics: dict[str, float | int]
    control_delta: Arrays | None = None


def site_seed(seed: int, rnd: int, partition_id: int | None) -> int:
    """The seed of a site's round: differs per run seed, round and site."""
    return seed * 100_003 + rnd * 1_009 + (partition_id or 0)


def local_fit(
    model: StagedModel,
    x: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    settings: TrainSettings,
    *,
    device: torch.device,
    start: int,
    epochs: int,
    proximal_mu: float = 0.0,
    seed: int = 0,
    augment: Augment | None = None,
    mirrored: MirroredRows | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
    desc: str = "train",
) -> tuple[float, float]:
    """A site's local epochs from the received global weights; FedProx when ``mu`` > 0,
    SCAFFOLD when ``correction`` (parameter name -> ``c - c_i``) is given. ``desc``
    names the site and round in the progress lines of a long epoch.

    The optimizer is created fresh each round (Flower's examples do the same):
    momentum from a previous global model would point the wrong way.
    """
    place_model(model, device)
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    batches = Batches(
        x,
        labels,
        indices,
        batch_size=settings.batch_size,
        shuffle=True,
        balanced=settings.sampler == "balanced",
        augment=augment,
        mirrored=mirrored,
        seed=seed,
    )
    loss_fn = loss_function(settings, labels[indices], model.num_classes)
    optimizer = make_optimizer(model, settings)
    per_param = None
    if correction is not None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        per_param = [
            correction[n].to(p) if n in correction else torch.zeros_like(p) for n, p in trainable
        ]
    loss, acc = float("nan"), float("nan")
    for e in range(epochs):
        loss, acc = train_one_epoch(
            model,
            batches,
            optimizer,
            loss_fn,
            device=device,
            start=start,
            proximal_mu=proximal_mu,
            anchor=anchor,
            correction=per_param,
            desc=f"{desc}, epoch {e + 1}/{epochs}",
        )
    return loss, acc


class SiteTrainer:
    """One site: its data, its settings, and the two things a server asks of it."""

    def __init__(
        self,
        cfg: DictConfig,
        site: SiteData,
        *,
        partition_id: int | None,
        data_path: str = "",
        site_name: str | None = None,
        node_id: int | None = None,
    ) -> None:
        self.cfg, self.site = cfg, site
        self.partition_id, self.data_path = partition_id, data_path
        self.site_name = site_name  # deployment: the node's site-name, sent with every reply
        # one name in every line this site logs, as the server names it (site_names)
        named = {SITE_ID: self.site_id, SITE_NAME: site_name}
        self.name = site_label(named if node_id is None else {**named, NODE_ID: node_id})
        self.settings = train_settings(cfg)
        self.federation = federation_settings(cfg)
        self.dp = dp_settings(cfg.privacy)
        self.device = site.run.device
        if self.dp is not None and self.settings.cached_flips and site.start > 0:
            log.info("train.cached_flips is off under DP-SGD: Opacus draws its own batches")

    @classmethod
    def for_node(
        cls,
        cfg: DictConfig,
        node_config: Mapping[str, Any],
        *,
        cache: SiteCache | None = None,
        node_id: int | None = None,
    ) -> SiteTrainer:
        """The trainer of the node described by ``node_config``: its data from ``cache``
        (the ClientApp's; none: prepared for this trainer alone); ``node_id`` names a
        deployed site without a ``site-name``."""
        pid, n, data_path = node_site(node_config)
        name = check_site_name(node_config.get(SITE_NAME))
        cache = SiteCache(runs=1, sites=1) if cache is None else cache
        site_cfg, site = cache.load(OmegaConf.to_yaml(cfg), pid, n, data_path)
        return cls(
            site_cfg, site, partition_id=pid, data_path=data_path, site_name=name, node_id=node_id
        )

    @property
    def site_id(self) -> int:
        """The ``partition-id`` a site reports: its partition, or ``NO_SITE`` when deployed."""
        return NO_SITE if self.partition_id is None else self.partition_id

    # ------------------------------------------------------------------ contract
    def train(
        self,
        arrays: Arrays,
        *,
        rnd: int,
        state: SiteState,
        proximal_mu: float = 0.0,
        run_key: str = "",
        server_control: Arrays | None = None,
    ) -> SiteUpdate:
        """Local training from the global ``arrays``; returns the update and reply metrics.

        ``state`` is read and updated in place (FedBN tensors, privacy ledger, SCAFFOLD
        variate). ``server_control`` (SCAFFOLD's ``c``, possibly empty in round 1)
        turns on the drift correction.
        """
        model, keys = self._model(arrays, state)
        if 0 < self.federation.freeze_bn_from <= rnd:  # FixBN: the global model's statistics
            model.bn_frozen = True
        seed = site_seed(self.settings.seed, rnd, self.partition_id)
        torch.manual_seed(seed)
        site = self.site
        augment = Augment(self.settings.augment, seed=seed) if site.start == 0 else None
        fit = {
            "device": self.device,
            "start": site.start,
            "epochs": self.federation.local_epochs,
            "proximal_mu": proximal_mu,
            "seed": seed,
            "augment": augment,
        }
        label = f"{self.name}, round {rnd}"
        started = time.perf_counter()
        log.info(
            "%s: training on %d images, %d local epoch(s) ...",
            label,
            len(site.train),
            self.federation.local_epochs,
        )
        metrics: dict[str, float | int] = {NUM_EXAMPLES: len(site.train), SITE_ID: self.site_id}
        # per-class counts (aggregate): the partition report is what sites really hold
        metrics.update(site.train_class_counts())
        delta = None
        if self.dp is not None:  # Opacus draws its own batches: no cached flips under DP-SGD
            metrics.update(self._dp_round(model, rnd, run_key, state, fit))
        elif server_control is not None:
            loss, acc, delta = self._scaffold_fit(
                model,
                arrays,
                server_control,
                run_key,
                state,
                {**fit, "desc": label, "mirrored": site.mirrored(self.cfg)},
            )
            metrics.update(train_loss=loss, train_accuracy=acc)
        else:
            loss, acc = local_fit(
                model,
                site.x,
                site.labels,
                site.train,
                self.settings,
                desc=label,
                mirrored=site.mirrored(self.cfg),
                **fit,
            )
            metrics.update(train_loss=loss, train_accuracy=acc)
        metrics.update(self._val_metrics(model))
        log.info(
            "%s: done in %.1f s (validation accuracy %.4f)",
            label,
            time.perf_counter() - started,
            float(metrics.get("val_accuracy", float("nan"))),
        )
        kept = local_keys(model, keys)
        if kept:
            state.local_arrays = get_exchanged(model.cpu(), kept)
        return SiteUpdate(get_exchanged(model.cpu(), keys), metrics, delta)

    def evaluate(self, arrays: Arrays, *, state: SiteState) -> dict[str, float | int]:
        """The global model (with this site's own FedBN tensors) on the site's validation split."""
        model, _ = self._model(arrays, state)
        place_model(model, self.device)
        return {
            NUM_EXAMPLES: len(self.site.val),
            SITE_ID: self.site_id,
            **self._val_metrics(model),
        }

    def statistics(
        self, arrays: Arrays, *, kind: str, state: SiteState, run_key: str = ""
    ) -> dict[str, np.ndarray]:
        """A statistics round: sums over the features entering the classifier of the
        global model (see ``head_init``), over its BatchNorm inputs (``kind="bn"``, see
        ``bn_stats``) or over its unit features (``kind="centre"``, see ``centre``; noised
        and accounted under DP-SGD), on this site's training split only."""
        if len(self.site.train) == 0:
            raise DataError(
                self.site.prepared.collection.root,
                f"{self.name} has no training samples for the statistics round",
            )
        model, _ = self._model(arrays, state)
        site = self.site
        if kind == CENTRE_KIND and self.dp is not None:
            return self._dp_centre(model, run_key, state)
        return local_statistics(
            model,
            kind,
            site.x,
            site.labels,
            site.train,
            start=site.start,
            device=self.device,
            batch_size=self.settings.batch_size,
            seed=site_seed(self.settings.seed, 0, self.partition_id),
        )

    # ------------------------------------------------------------------ helpers
    def _file(self, what: str, suffix: str, run_key: str):
        return site_file(
            what,
            suffix,
            run_key=run_key,
            data_path=self.data_path,
            runs_dir=str(self.cfg.runs_dir),
            site=self.partition_id or 0,
        )

    def _scaffold_fit(
        self,
        model: StagedModel,
        global_arrays: Arrays,
        server_c: Arrays,
        run_key: str,
        state: SiteState,
        fit: dict[str, Any],
    ) -> tuple[float, float, Arrays]:
        """Local epochs with SCAFFOLD's correction ``c - c_i``; ``c_i`` becomes the site's
        full-batch gradient at the global weights (node state and file); returns
        (loss, accuracy, ``delta c_i``)."""
        path = self._file("scaffold", ".pt", run_key)
        if not state.control and path is not None and path.exists():  # a resumed run
            state.control = torch.load(path, weights_only=True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        site = self.site
        place_model(model, self.device)
        full = Batches(site.x, site.labels, site.train, batch_size=64)
        loss_fn = loss_function(self.settings, site.labels[site.train], model.num_classes)
        gradient = mean_gradient(model, full, loss_fn, device=self.device, start=site.start)
        loss, acc = local_fit(
            model,
            site.x,
            site.labels,
            site.train,
            self.settings,
            correction=correction(server_c, state.control, names),
            **fit,
        )
        new, delta = site_variate(state.control, gradient)
        state.control = new
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(new, path)
        return loss, acc, delta

    def _model(self, arrays: Arrays, state: SiteState) -> tuple[StagedModel, list[str]]:
        """The global weights, plus this site's own kept tensors (FedBN) from earlier rounds."""
        # A copy of the per-process template: cheaper than rebuilding and re-reading weights.
        model = copy.deepcopy(self.site.run.model)
        keys = exchanged_keys(model, fedbn=self.federation.fedbn)
        set_exchanged(model, arrays, keys)
        if state.local_arrays:
            model.load_state_dict(state.local_arrays, strict=False)
        if self.federation.head_freeze:  # the head stays as the server set it (solved or initial)
            linear_head(model).requires_grad_(False)
        return model, keys

    def _ledger(self, state: SiteState, run_key: str) -> tuple[PrivacyLedger, Path | None]:
        """The site's privacy ledger: from node state, else from its file; and that file."""
        assert self.dp is not None
        path = self._file("privacy", ".json", run_key)
        if state.ledger is not None:
            return PrivacyLedger.from_dict(state.ledger), path
        if path is not None:
            return PrivacyLedger.load(path, self.dp.accountant), path
        return PrivacyLedger([], self.dp.accountant), path

    def _keep(self, ledger: PrivacyLedger, state: SiteState, path: Path | None) -> None:
        state.ledger = ledger.to_dict()
        if path is not None:
            ledger.save(path)

    def _dp_centre(self, model: StagedModel, run_key: str, state: SiteState) -> dict:
        """The centring sums under DP-SGD: the unit-feature sum noised with the planned
        centring noise, the query written into the ledger before the sums leave."""
        assert self.dp is not None
        ledger, path = self._ledger(state, run_key)
        site = self.site
        noise = dp_centre_query(
            self.dp,
            ledger,
            n=len(site.train),
            batch_size=self.settings.batch_size,
            epochs_total=self.federation.epoch_budget,
        )
        self._keep(ledger, state, path)
        log.info("%s: centring sum noised (noise multiplier %.3g)", self.name, noise)
        seed = noise_seed(self.dp, site_seed(self.settings.seed, 0, self.partition_id))
        return site_centre_statistics(
            model,
            site.x,
            site.train,
            start=site.start,
            device=self.device,
            noise=noise,
            generator=np.random.default_rng(seed),
        )

    def _dp_round(
        self, model: StagedModel, rnd: int, run_key: str, state: SiteState, fit: dict[str, Any]
    ) -> dict[str, float | int]:
        """DP-SGD for this round; the ledger continues from node state, else from its file."""
        assert self.dp is not None
        ledger, path = self._ledger(state, run_key)
        site = self.site
        out = dp_site_round(
            model,
            site.x,
            site.labels,
            site.train,
            self.settings,
            self.dp,
            ledger,
            site=self.name,
            rnd=rnd,
            epochs_total=self.federation.epoch_budget,
            centred=centre_module(model) is not None,
            **fit,
        )
        self._keep(ledger, state, path)
        return out

    def _val_metrics(self, model: StagedModel) -> dict[str, float]:
        """The model on this site's validation split. ``val_macro_f1`` covers only the
        classes this split holds (``val_classes`` of them), and ``val_recall_<class>`` is
        NaN (undefined, not 0) for a class it has no image of: under label skew a site
        holding only notumor has no recall for glioma, and a macro-F1 over all four
        classes would be a quarter of its one class's F1 (0.246 beside an accuracy of
        0.972). Every site sends every key (Flower aggregates only replies of equal keys);
        the aggregates and the best.pt choice skip NaN."""
        site = self.site
        batches = Batches(site.x, site.labels, site.val, batch_size=64)
        m = evaluate_model(model, batches, site.run.classes, device=self.device, start=site.start)
        held = [v for v in m["per_class"].values() if v["support"] > 0]
        return {
            "val_loss": m["loss"],
            "val_accuracy": m["accuracy"],
            "val_classes": len(held),
            "val_macro_f1": float(np.mean([v["f1"] for v in held])) if held else float("nan"),
            **{
                f"val_recall_{c}": v["recall"] if v["support"] > 0 else float("nan")
                for c, v in m["per_class"].items()
            },
        }

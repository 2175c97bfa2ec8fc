"""``fedscan train``: the centralised baseline every federated number is compared to."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from fedscan.common.data.splits import groups_are_scans
from fedscan.common.data.transforms import Augment
from fedscan.common.federated.head_init import linear_head
from fedscan.common.federated.refit import (
    describe,
    initial_kinds,
    install_round,
    local_statistics,
    refit,
)
from fedscan.common.learn.features import mirrored_features
from fedscan.common.learn.prepare import prepare_run
from fedscan.common.learn.shipped import shipped_inputs
from fedscan.common.learn.training import Batches, evaluate_model, fit
from fedscan.common.runs.plots import plot_confusion, plot_curves
from fedscan.common.runs.record import new_run_dir, write_centralised, write_config, write_model
from fedscan.common.runs.tracking import track_finished
from fedscan.common.runs.validate import validate

log = logging.getLogger("fedscan.train")


def run_centralised(cfg: DictConfig, *, kind: str = "centralised", train: bool = True) -> Path:
    """Train on the pooled training split, evaluate every test split, write a run folder.

    ``kind`` names the run (``pooled`` when it is the harness's pooled baseline). With
    ``federation.head_init`` the classifier starts from the closed-form head of the
    pooled training features (ridge or class means: what Fed3R / FedNCM reach
    federated); ``train=False`` evaluates that head alone.
    """
    t0 = time.perf_counter()
    checked = validate(cfg, kind)  # before any expensive work
    settings = checked.train
    run = prepare_run(cfg)
    device, data, model, x, start = run.device, run.data, run.model, run.x, run.start
    c, s = data.collection, data.splits
    fed = checked.federation
    head = fed.head_init

    def pooled_sums(kind: str) -> dict:
        """The ``kind`` statistics of the pooled training split under the current model:
        what a federation of every site would sum, computed in one place."""
        return local_statistics(
            model,
            kind,
            x,
            c.labels,
            s.train,
            start=start,
            device=device,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )

    for stat in initial_kinds(model, fed):  # the centre, then the head
        install_round(model, stat, pooled_sums, fed)
    if head != "none":
        log.info("classifier: the closed-form %s head of %d training images", head, len(s.train))
    if fed.head_freeze:  # the solved head, or with head_init=none the initial one (FedBABU)
        linear_head(model).requires_grad_(False)
    augment = Augment(settings.augment, seed=settings.seed) if start == 0 else None
    mirrored = mirrored_features(model, data, cfg, device, s.train) if train else None
    t_prep = time.perf_counter() - t0
    if mirrored is not None:
        log.info("augmentation: left/right flips of the cached frozen-trunk features")
    elif augment is None and settings.augment != "none":
        log.info("augmentation off: the trainable stages read cached frozen-trunk features")
    batches = Batches(
        x,
        c.labels,
        s.train,
        batch_size=settings.batch_size,
        shuffle=True,
        balanced=settings.sampler == "balanced",
        augment=augment,
        mirrored=mirrored,
        seed=settings.seed,
    )
    val = Batches(x, c.labels, s.val, batch_size=64)

    run_dir = new_run_dir(cfg, kind)
    write_config(run_dir, cfg)
    log.info("run folder: %s", run_dir)
    log.info(
        "data: %s | %s", data.label, ", ".join(f"{k} {v['total']}" for k, v in s.summary(c).items())
    )

    def on_epoch(row: dict) -> None:
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f",
            row["epoch"],
            settings.epochs,
            row["train_loss"],
            row["train_accuracy"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_macro_f1"],
        )

    t_fit = time.perf_counter()
    history = (
        fit(
            model,
            batches,
            val,
            settings,
            device=device,
            start=start,
            on_epoch=on_epoch,
        )
        if train
        else []
    )
    # the pooled reference of a federated refit: the same statistics rounds, in order
    refitted = refit(model, fed, pooled_sums) if train else []
    if refitted:
        log.info("re-estimated on the training split: %s", describe(refitted))
    t_fit = time.perf_counter() - t_fit

    # the test splits as the exported model computes them (common.learn.shipped);
    # validation keeps the training features, as it did during fit
    x_test = shipped_inputs(run, cfg)
    eval_sets = {
        "val": val,
        **{name: Batches(x_test, c.labels, idx, batch_size=64) for name, idx in s.tests.items()},
    }
    results = {}
    for name, batches in eval_sets.items():
        results[name] = evaluate_model(
            model,
            batches,
            c.classes,
            device=device,
            start=start,
            groups=None if name == "val" else s.groups,
            intervals=checked.intervals,
            scans=groups_are_scans(cfg.dataset),
        )
    wall = time.perf_counter() - t0

    title = f"{data.label} | {model.name} ({cfg.model.mode}) | {cfg.dataset.image_size}px"
    plot_curves(history, run_dir / "curves.png", title=title)
    plot_confusion(
        {k: v["confusion_matrix"] for k, v in results.items() if k != "val"},
        c.classes,
        run_dir / "confusion_matrix.png",
        title=title,
    )
    write_model(
        run_dir,
        model.cpu(),
        cfg,
        classes=list(c.classes),
        image_size=int(cfg.dataset.image_size),
        dataset=c.name,
        synthetic=c.synthetic,
    )
    write_centralised(
        run_dir,
        kind=kind,
        label=data.label,
        synthetic=c.synthetic,
        dataset=c.name,
        model=model.name,
        mode=str(cfg.model.mode),
        image_size=int(cfg.dataset.image_size),
        device=str(device),
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        wall_time_s=round(wall, 1),
        prepare_time_s=round(t_prep, 1),
        fit_time_s=round(t_fit, 1),
        splits=s.summary(c),
        excluded={k: len(v) for k, v in s.excluded.items()},
        history=history,
        final=results,
    )
    shown = {}
    for name, m in results.items():
        shown[name] = m
        if m.get("per_scan"):  # lung: the same split, each scan one case
            shown[f"{name} per scan"] = m["per_scan"]
    for name, m in shown.items():
        recalls = ", ".join(f"{k} {v['recall']:.3f}" for k, v in m["per_class"].items())
        ci = m.get("ci")
        log.info(
            "%-18s n=%-5d acc %.4f%s  bal-acc %.4f  macro-F1 %.4f%s | recall: %s",
            name,
            m["n"],
            m["accuracy"],
            _ends(ci, "accuracy"),
            m["balanced_accuracy"],
            m["macro_f1"],
            _ends(ci, "macro_f1"),
            recalls,
        )
    log.info(
        "wall time %.1f s (prepare %.1f s, fit %.1f s); results in %s", wall, t_prep, t_fit, run_dir
    )
    track_finished(cfg, run_dir)
    return run_dir


def _ends(ci: dict | None, key: str) -> str:
    """`` [low, high]`` of a metric's interval, or nothing (validation has none)."""
    if not ci or not ci.get(key):
        return ""
    lo, hi = ci[key]
    return f" [{lo:.4f}, {hi:.4f}]"

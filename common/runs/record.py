"""The run folder: one self-contained directory per run, and the one definition of it.

Three kinds of run write a folder, and everything that reads one (``fedscan
report``, ``fedscan export``, the study drivers, the benchmarks) reads it through
:func:`read_run`, never by sniffing JSON:

- ``centralised`` / ``pooled`` (:func:`write_centralised`): ``config.yaml``,
  ``metrics.json`` (per-epoch ``history``, ``final`` metrics per split),
  ``model.pt``, ``curves.png``, ``confusion_matrix.png``.
- ``local`` (:func:`write_local`): every site alone; ``metrics.json`` holds each
  site's ``final`` test metrics; ``partition.csv`` / ``.png``.
- ``federated`` (:class:`FederatedRun`): ``metrics.json`` rewritten after every
  round (global test metrics, each site's reply metrics, seconds), ``last.pt`` /
  ``best.pt`` checkpoints, ``partition.csv`` / ``.png``, plots at the end.

``metrics.json`` carries ``version`` (:data:`VERSION`) and ``kind``: a folder of
another shape is refused with a message, not guessed at. Strategy parameters and
partitions are read from ``config.yaml``, never parsed back out of labels.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedscan.common.core.config import REMOVED
from fedscan.common.core.errors import DataError
from fedscan.common.federated.settings import BEST_METRIC_NAMES, federation_settings
from fedscan.common.federated.wire import COUNT_PREFIX, NODE_ID, NUM_EXAMPLES, SITE_ID
from fedscan.common.runs import cross_site
from fedscan.common.runs.partition_report import counts_from_sites, write_partition_report
from fedscan.common.runs.plots import plot_confusion, plot_round_curves

log = logging.getLogger("fedscan.run")

VERSION = 2  # of metrics.json; 1 (unversioned) was fedscan <= 0.1
KINDS = ("centralised", "pooled", "local", "federated")
CHECKPOINTS = ("model.pt", "best.pt", "last.pt")  # centralised, then federated best / last


# ---------------------------------------------------------------------- writing
def new_run_dir(cfg: DictConfig, kind: str) -> Path:
    """``runs_dir/<time>-<kind>-<dataset>-<model>`` (absolute), created empty."""
    base = Path(str(cfg.runs_dir)).expanduser().resolve()
    name = cfg.get("run_name") or "-".join(
        [time.strftime("%Y%m%d-%H%M%S"), kind, str(cfg.dataset.name), str(cfg.model.name)]
    )
    path = base / name
    suffix = 1
    while path.exists():
        path = base / f"{name}-{suffix}"
        suffix += 1
    path.mkdir(parents=True)
    return path


def write_config(run_dir: Path, cfg: DictConfig) -> Path:
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def write_json(path: Path, payload: Any) -> Path:
    """Atomic: a reader never sees half a file, even while a run is being written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def save_atomic(state: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file, then an atomic rename: an interrupted write
    (a killed coordinator, a full disk) leaves the previous ``path`` intact, never a
    truncated checkpoint that ``fedscan export`` would ship or a resume would read."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _header(kind: str, *, label: str, synthetic: bool, dataset: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown run kind '{kind}'")
    return {
        "version": VERSION,
        "kind": kind,
        "label": label,
        "synthetic": synthetic,
        "dataset": dataset,
    }


def write_centralised(
    run_dir: Path,
    *,
    kind: str,
    label: str,
    synthetic: bool,
    dataset: str,
    history: list[dict],
    final: dict[str, dict],
    **details: Any,
) -> Path:
    """``metrics.json`` of a centralised or pooled run (``details``: timings, splits...)."""
    if kind not in ("centralised", "pooled"):
        raise ValueError(f"write_centralised: kind must be centralised or pooled, not {kind}")
    doc = _header(kind, label=label, synthetic=synthetic, dataset=dataset)
    doc.update(details, history=history, final=final)
    return write_json(run_dir / "metrics.json", doc)


def write_model(run_dir: Path, model: torch.nn.Module, cfg: DictConfig, **meta: Any) -> Path:
    """``model.pt``: the trained weights with what rebuilding the model needs."""
    path = run_dir / "model.pt"
    # resolved: model.dp_batchnorm is an interpolation of privacy.batchnorm
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    state = {"state_dict": model.state_dict(), "model": model_cfg}
    torch.save({**state, **meta}, path)
    return path


def write_local(
    run_dir: Path,
    *,
    label: str,
    synthetic: bool,
    dataset: str,
    sites: list[dict],
    **details: Any,
) -> Path:
    """``metrics.json`` of the local-only baseline: ``sites`` = [{partition-id, n_train, final}]."""
    doc = _header("local", label=label, synthetic=synthetic, dataset=dataset)
    doc.update(details, sites=sites)
    return write_json(run_dir / "metrics.json", doc)


# Keys added after run folders were recorded, with the value that reproduces the
# behaviour before them: a run from before the key reads (and compares, in reports) as
# if it had it, so a study continues across the change instead of re-running everything.
ADDED_LATER = {
    "train.loss": "cross_entropy",
    "secure_aggregation.name": "off",
    "federation.head_refit": "none",
    "federation.freeze_bn_from": 0,
    "federation.bn_refit": False,
    # before it the frozen prefix computed in float32 on CPUs and autocast on GPUs; "auto"
    # is the same on CPUs without native bfloat16, and the features differ by bfloat16
    # rounding where they have it (docs/results/benchmarks.md), too little to re-run a study over
    "model.prefix_precision": "auto",
    # before it a cached prefix meant no augmentation at all
    "train.cached_flips": False,
    # before it the classifier read the features as they came
    "model.feature_norm": "none",
}

# Keys one choice of a group added later (``key: (choice key, choice, value)``): added,
# like ADDED_LATER's, only to a run folder that made that choice. Before
# privacy.batchnorm, DP-SGD always swapped BatchNorm for GroupNorm.
ADDED_LATER_IN = {
    "privacy.batchnorm": ("privacy.name", "dp_sgd", "group"),
    # before privacy.noise_seed, DP-SGD's sampling and noise were seeded from the run's seed
    "privacy.noise_seed": ("privacy.name", "dp_sgd", "run"),
    "model.dp_batchnorm": ("privacy.name", "dp_sgd", "group"),
}

# In a federated checkpoint: the head refit after the last round (federation.head_refit)
# is done, so a resumed run does not repeat it
REFITTED = "head_refit_done"


def site_weighted_mean(rows: Sequence[dict], key: str) -> float | None:
    """``key`` over the sites' reply rows, weighted by their example counts; None when
    no row holds it (or they hold no examples)."""
    rows = [r for r in rows if key in r and math.isfinite(float(r[key]))]  # NaN: undefined
    n = sum(float(r[NUM_EXAMPLES]) for r in rows)
    if n <= 0:
        return None
    return sum(float(r[key]) * float(r[NUM_EXAMPLES]) for r in rows) / n


class FederatedRun:
    """The federated folder, written round by round: an interrupted run leaves a
    readable record up to its last round, and ``last.pt`` holds everything needed to
    continue at the next one."""

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        *,
        label: str,
        synthetic: bool,
        classes: Sequence[str],
    ) -> None:
        self.dir, self.cfg, self.label, self.classes = run_dir, cfg, label, list(classes)
        self.synthetic = synthetic
        self.rounds: list[dict[str, Any]] = []
        self.best_score = float("-inf")
        self.best_metric = federation_settings(cfg).best_metric
        self.best: dict[str, Any] | None = None  # the round best.pt holds, and its score
        self.cross_site: dict | None = None  # set when the run finishes
        self._t = time.perf_counter()
        write_config(run_dir, cfg)

    @classmethod
    def resume(
        cls,
        run_dir: Path,
        cfg: DictConfig,
        *,
        label: str,
        synthetic: bool,
        classes: Sequence[str],
    ) -> tuple[FederatedRun, dict[str, Any]]:
        ckpt = run_dir / "last.pt"
        if not ckpt.exists():
            raise DataError(ckpt, "cannot resume: no last.pt checkpoint in this run folder")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        run = cls(run_dir, cfg, label=label, synthetic=synthetic, classes=classes)
        run.rounds = state["rounds"]
        run.best_score = state["best_score"]
        run.best = state.get("best")  # None in checkpoints from before it
        return run, state

    def record(
        self, rnd: int, tests: dict[str, dict], sites: dict[str, list[dict]], **extra: Any
    ) -> dict:
        """One round's global test metrics (may be empty) and the sites' reply metrics;
        ``extra`` (e.g. ``before_refit``) is kept in the round's row. Recording a round
        again replaces its row."""
        now = time.perf_counter()
        row = {
            "round": rnd,
            "seconds": round(now - self._t, 2),
            "global": tests,
            "sites": sites,
            **extra,
        }
        self._t = now
        self.rounds = [r for r in self.rounds if r["round"] != rnd] + [row]
        self._write()
        if any(f"{COUNT_PREFIX}{self.classes[0]}" in r for r in sites.get("train", [])):
            self._partition_report()
        return row

    def _partition_report(self) -> None:
        """Per-site class counts as the sites last reported them, over all rounds so far."""
        rows = [r for rnd in self.rounds for r in rnd["sites"].get("train", [])]
        names, counts = counts_from_sites(rows, self.classes)
        title = f"{self.label} | partition {partition_label(self.cfg)} | training samples per site"
        write_partition_report(self.dir, names, counts, self.classes, title=title)

    def is_best(self, rnd: int, sites: dict[str, list[dict]], *, refitted: bool = False) -> bool:
        """Whether round ``rnd``'s global model is the best so far on the sites' own
        validation splits (``federation.best_metric``, example-weighted over the sites
        that evaluated it); it then becomes ``best`` in ``metrics.json``.

        Never a test split: ``best.pt`` is what ``fedscan export`` ships, and a model
        chosen on the test split would make that split's figure optimistic. A round
        the sites did not evaluate (``federation.fraction_evaluate=0``) is never best.
        """
        rows = [
            r
            for r in sites.get("evaluate", [])
            if self.best_metric in r and math.isfinite(float(r[self.best_metric]))
        ]
        score = site_weighted_mean(rows, self.best_metric)
        if score is None:
            return False
        signed = -score if self.best_metric.endswith("loss") else score
        if signed > self.best_score:
            self.best_score = signed
            self.best = {
                "round": rnd,
                "metric": self.best_metric,
                "score": score,
                "images": int(sum(float(r[NUM_EXAMPLES]) for r in rows)),  # validation images
                "sites": len(rows),
            }
            if refitted:  # the model after federation.bn_refit / head_refit
                self.best["refitted"] = True
            self._write()
            return True
        return False

    def checkpoint(
        self,
        rnd: int,
        arrays: dict[str, torch.Tensor],
        strategy_state: dict,
        *,
        best: bool,
        **meta: Any,
    ) -> None:
        """``last.pt`` (and ``best.pt`` when ``best``); ``meta`` is stored beside the
        weights (``REFITTED``: the head refit after the last round is done)."""
        state = {
            **meta,
            "round": rnd,
            "arrays": arrays,
            "strategy_state": strategy_state,
            "rounds": self.rounds,
            "best_score": self.best_score,
            "best": self.best,
            "classes": self.classes,
            "model": OmegaConf.to_container(self.cfg.model, resolve=True),
        }
        save_atomic(state, self.dir / "last.pt")
        if best:
            save_atomic(state, self.dir / "best.pt")

    def _write(self) -> None:
        doc = _header(
            "federated",
            label=self.label,
            synthetic=self.synthetic,
            dataset=str(self.cfg.dataset.name),
        )
        extra: dict[str, Any] = {"best": self.best} if self.best else {}
        if self.cross_site:
            extra["cross_site"] = self.cross_site
        write_json(self.dir / "metrics.json", {**doc, "rounds": self.rounds, **extra})

    def finish(self) -> None:
        if not self.rounds:
            return
        if self.best:
            b = self.best
            row = next((r for r in self.rounds if r["round"] == b["round"]), {})
            # a refit re-records its round; the model before it is kept as before_refit
            held = row.get("global") if b.get("refitted") else row.get("before_refit")
            held = held or row.get("global") or {}
            tests = ", ".join(f"{n} {m['accuracy']:.4f}" for n, m in held.items())
            pooled = f" over {b['images']} images at {b['sites']} sites" if "images" in b else ""
            log.info(
                "best.pt: round %d%s, chosen on the sites' %s %.4f (%s%s)%s",
                b["round"],
                " (refitted)" if b.get("refitted") else "",
                BEST_METRIC_NAMES.get(b["metric"], b["metric"]),
                b["score"],
                b["metric"],
                pooled,
                f"; its test accuracy: {tests}" if tests else "",
            )
        title = f"{self.label} | {self.cfg.strategy.name} | {self.cfg.model.name}"
        plot_round_curves(self.rounds, self.dir / "curves.png", title=title)
        last = next((r["global"] for r in reversed(self.rounds) if r["global"]), None)
        evaluated = next(
            (r["sites"]["evaluate"] for r in reversed(self.rounds) if r["sites"].get("evaluate")),
            [],
        )
        if last:
            self.cross_site = cross_site.federated_matrix(evaluated, last)
            self._write()
            cross_site.plot(
                self.cross_site,
                self.dir / cross_site.FILE,
                title=f"{title} | global model | accuracy",
            )
            plot_confusion(
                {k: v["confusion_matrix"] for k, v in last.items()},
                self.classes,
                self.dir / "confusion_matrix.png",
                title=f"{title} | final round",
            )


# ---------------------------------------------------------------------- reading
def partition_label(cfg: DictConfig | dict) -> str:
    """``iid``, ``dirichlet(alpha=0.1)``, ``pathological(classes_per_site=2)``..."""
    part = dict(cfg.get("partition") or {"name": "iid"})
    params = {k: v for k, v in part.items() if k not in ("name", "min_samples")}
    inner = ",".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )
    return f"{part['name']}({inner})" if inner else str(part["name"])


@dataclass(frozen=True)
class Shipped:
    """The model ``fedscan export`` ships from a run folder (:meth:`RunRecord.checkpoint`)
    and the test figures the run recorded for exactly that model."""

    file: str  # model.pt | best.pt | last.pt
    round: int | None  # the federated round it holds; None for a centralised / pooled model
    refitted: bool  # the model after federation.bn_refit / head_refit
    tests: dict[str, dict[str, Any]]  # its test metrics per split

    @property
    def label(self) -> str:
        """``best.pt, round 8``, ``last.pt, round 10 (refitted)``, ``model.pt``."""
        if self.round is None:
            return self.file
        return f"{self.file}, round {self.round}" + (" (refitted)" if self.refitted else "")


@dataclass(frozen=True)
class RunRecord:
    """A run folder as read back: its kind, resolved config and metrics document."""

    dir: Path
    kind: str
    cfg: DictConfig
    doc: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.doc["label"])

    @property
    def synthetic(self) -> bool:
        return bool(self.doc["synthetic"])

    @property
    def dataset(self) -> str:
        """The dataset's name; the synthetic set by its domain (``synthetic_brain_mri``),
        as centralised, pooled and local runs record it (a federated folder says
        ``synthetic``), so that every kind of run of one dataset lands in one table."""
        name = str(self.doc["dataset"])
        if name == "synthetic":
            return f"synthetic_{self.cfg.dataset.get('domain', 'brain_mri')}"
        return name

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def strategy(self) -> str:
        return str(self.cfg.strategy.name)

    @property
    def strategy_params(self) -> dict[str, Any]:
        """The strategy's parameters (``mu`` for FedProx...), from ``config.yaml``."""
        params = OmegaConf.to_container(self.cfg.strategy, resolve=True)
        return {k: v for k, v in params.items() if k != "name"}

    @property
    def head_init(self) -> str:
        """The one-shot head the run started from (``none``, ``fed3r``, ``fedncm``)."""
        return str(self.cfg.federation.get("head_init", "none"))

    @property
    def bn_refit(self) -> bool:
        """BatchNorm statistics re-estimated after the last round."""
        return bool(self.cfg.federation.get("bn_refit", False))

    @property
    def head_refit(self) -> str:
        """The head re-solved after the last round (``none``, ``fed3r``, ``fedncm``)."""
        return str(self.cfg.federation.get("head_refit", "none"))

    @property
    def method(self) -> str:
        """The run's label, keyed by the names of what it ran: ``pooled``, ``local``,
        ``centralised``, or the strategy with the parameter the study varies
        (``fedprox(mu=0.1)``); a one-shot head comes first (``fed3r+fedavg``, or alone,
        ``fed3r one-shot``; baselines ``pooled+fed3r``, ``pooled+fed3r+ft``), the
        remedies applied while training after the strategy, each as its name in
        ``configs/remedy/`` (``fedavg+fedbabu``, ``fedavg+fixbn(3)``, ``fedavg+fedbn``,
        ``fedavg+balanced_softmax``, ``fed3r_frozen+fedavg``), and what is re-estimated
        after the last round last: ``fedavg+refit(bn,fed3r)``."""
        parts = ["bn"] if self.bn_refit else []
        parts += [] if self.head_refit == "none" else [self.head_refit]
        return self._method() + (f"+refit({','.join(parts)})" if parts else "")

    def _remedies(self) -> list[str]:
        """The remedies applied while training, by their configs/remedy/ names."""
        fed, train = self.cfg.federation, self.cfg.get("train") or {}
        names = []
        if bool(fed.get("head_freeze", False)) and self.head_init == "none":
            names.append("fedbabu")  # the initial head held fixed
        if self.kind == "federated" and bool(fed.get("fedbn", False)):
            names.append("fedbn")
        fixbn = int(fed.get("freeze_bn_from", 0))
        if self.kind == "federated" and fixbn:  # BatchNorm statistics held from this round
            names.append(f"fixbn({fixbn})")
        if str(train.get("loss", "cross_entropy")) == "balanced_softmax":
            names.append("balanced_softmax")
        return names

    def _method(self) -> str:
        head = self.head_init
        if head != "none" and bool(self.cfg.federation.get("head_freeze", False)):
            head = f"{head}_frozen"  # the solved head held fixed (remedy=fed3r_frozen)
        trained = int(self.cfg.rounds) > 0
        remedies = "".join(f"+{r}" for r in self._remedies()) if trained else ""
        if self.kind != "federated":
            if head == "none":
                return self.kind + remedies
            return f"{self.kind}+{head}" + ("+ft" if trained else "") + remedies
        if head != "none" and not trained:
            return f"{head} one-shot"
        params = ",".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.strategy_params.items()
            if k == "mu"  # the parameter the study varies; the others are fixed defaults
        )
        name = f"{self.strategy}({params})" if params else self.strategy
        name += remedies
        return name if head == "none" else f"{head}+{name}"

    @property
    def partition(self) -> str:
        """The partition label; ``-`` for runs that pool every site's data."""
        return "-" if self.kind in ("pooled", "centralised") else partition_label(self.cfg)

    @cached_property
    def epoch_budget(self) -> int:
        """Local epochs a federated site trains over the run (baselines train this many)."""
        return federation_settings(self.cfg).epoch_budget

    @property
    def rounds(self) -> list[dict[str, Any]]:
        self._require("federated")
        return list(self.doc["rounds"])

    @property
    def evaluated_rounds(self) -> list[dict[str, Any]]:
        """Federated rounds with server-side test metrics (every ``evaluate_every``)."""
        return [r for r in self.rounds if r["global"]]

    @property
    def history(self) -> list[dict[str, Any]]:
        self._require("centralised", "pooled")
        return list(self.doc["history"])

    @property
    def sites(self) -> list[dict[str, Any]]:
        """Local baseline: one entry per site, ``final`` = its model's test metrics."""
        self._require("local")
        return list(self.doc["sites"])

    def final(self) -> dict[str, dict[str, Any]]:
        """Test metrics per split at the end of training: the last evaluated round of a
        federated run (after its refit, if any), the final model of a centralised /
        pooled one (``val`` left out). The exported model's are :meth:`shipped`'s."""
        if self.kind == "federated":
            evaluated = self.evaluated_rounds
            if not evaluated:
                raise DataError(self.dir / "metrics.json", "no evaluated round yet")
            return dict(evaluated[-1]["global"])
        self._require("centralised", "pooled")
        return {k: v for k, v in self.doc["final"].items() if k != "val"}

    def shipped(self) -> Shipped:
        """The model ``fedscan export`` ships and its recorded test figures. Federated:
        ``best.pt`` holds the round ``best`` in ``metrics.json`` names (refitted or not;
        a refit re-records its round and keeps the figures before it as
        ``before_refit``), else ``last.pt`` the last recorded round. A shipped round the
        server did not evaluate (``federation.evaluate_every``) has no test figures: a
        :class:`DataError` says so rather than showing another round's."""
        path = self.checkpoint()
        if self.kind != "federated":
            return Shipped(path.name, None, False, self.final())
        rnd, refitted = self._shipped_round(path)
        row = next((r for r in self.rounds if r["round"] == rnd), None)
        if row is None:
            raise DataError(
                self.dir / "metrics.json", f"{path.name} holds round {rnd}, not recorded"
            )
        tests = row["global"] if refitted or "before_refit" not in row else row["before_refit"]
        if not tests:
            every = self.cfg.federation.get("evaluate_every", 1)
            raise DataError(
                self.dir,
                f"{path.name} holds round {rnd}, which was not evaluated on the test splits "
                f"(federation.evaluate_every={every}): no figures of the shipped model",
            )
        return Shipped(path.name, rnd, refitted, dict(tests))

    def _shipped_round(self, path: Path) -> tuple[int, bool]:
        """(round, refitted) of the federated checkpoint ``path``."""
        if not self.rounds:
            raise DataError(self.dir / "metrics.json", "no round recorded yet")
        best = self.doc.get("best")
        if path.name == "best.pt" and best:
            return int(best["round"]), bool(best.get("refitted", False))
        if path.name == "last.pt":  # written after its round's record
            row = self.rounds[-1]
            return int(row["round"]), "before_refit" in row
        # a best.pt from before metrics.json named its round: the checkpoint says
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file: name it, do not crash
            raise DataError(path, f"unreadable checkpoint ({type(exc).__name__})") from None
        return int(state["round"]), bool(state.get(REFITTED, False))

    def unfinished(self) -> str | None:
        """Why a federated run is not finished (still running, or interrupted), or None.
        The other kinds write ``metrics.json`` once, at the end."""
        if self.kind != "federated":
            return None
        rows = self.rounds
        done, wanted = max((r["round"] for r in rows), default=0), int(self.cfg.rounds)
        resume = f"running, or interrupted (continue it: federation.resume={self.dir})"
        if not rows or done < wanted:
            return f"round {done} of {wanted} recorded: {resume}"
        last = next(r for r in rows if r["round"] == done)
        if federation_settings(self.cfg).refits and "before_refit" not in last:
            return f"the refit after round {done} is not recorded: {resume}"
        return None

    def used_sites(self) -> int | None:
        """How many sites the run trained with: the distinct sites in its records
        (federated: every site that replied; local: one model per site); None for a run
        that pools the data (centralised, pooled)."""
        if self.kind == "local":
            return len(self.sites)
        if self.kind != "federated":
            return None
        phases = [rows for rnd in self.rounds for rows in rnd["sites"].values()]
        seen = {(r.get(NODE_ID), r.get(SITE_ID)) for rows in phases for r in rows}
        most = max((len(rows) for rows in phases), default=0)  # rows without ids
        return max(len(seen - {(None, None)}), most) or int(self.cfg.federation.num_sites)

    def site_rows(self, phase: str, rnd: int = -1) -> list[dict[str, Any]]:
        """The sites' reply metrics of a federated round (``phase``: train | evaluate)."""
        rounds = self.rounds
        return list(rounds[rnd]["sites"].get(phase, [])) if rounds else []

    def mean_site_val_accuracy(self) -> float:
        """The federation's own validation score: the sites' validation accuracy of the
        final global model, weighted by their validation sizes."""
        return site_weighted_mean(self.site_rows("evaluate"), "val_accuracy") or 0.0

    def checkpoint(self) -> Path:
        """The model file to use: ``model.pt`` (centralised), else ``best.pt``, else
        ``last.pt`` (federated)."""
        found = next((self.dir / n for n in CHECKPOINTS if (self.dir / n).exists()), None)
        if found is None:
            why = (
                "a local-only baseline keeps no shared model (each site trained its own and "
                "only its test scores were kept); export a federated run, a pooled baseline "
                "(method=pooled) or a `fedscan train` run"
                if self.kind == "local"
                else "no model.pt, best.pt or last.pt"
            )
            raise DataError(self.dir, f"nothing to export: {why}")
        return found

    def _require(self, *kinds: str) -> None:
        if self.kind not in kinds:
            raise DataError(self.dir, f"a {self.kind} run has no such record (needs {kinds})")


def read_run(run_dir: Path | str) -> RunRecord:
    """Read a run folder; a missing file, an unknown kind or another format version is
    a :class:`DataError` naming the file."""
    run_dir = Path(run_dir).expanduser().resolve()
    mpath, cpath = run_dir / "metrics.json", run_dir / "config.yaml"
    if not mpath.exists() or not cpath.exists():
        raise DataError(run_dir, "not a fedscan run folder (metrics.json and config.yaml needed)")
    try:
        doc = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(mpath, f"unreadable metrics: {exc}") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if version is None:
        raise DataError(
            mpath, f"no format version: written by an older fedscan (this one reads {VERSION})"
        )
    if version != VERSION:
        raise DataError(mpath, f"format version {version}; this fedscan reads {VERSION}")
    if doc.get("kind") not in KINDS:
        raise DataError(mpath, f"unknown run kind {doc.get('kind')!r}; known: {list(KINDS)}")
    cfg = OmegaConf.load(cpath)
    for key, value in ADDED_LATER.items():
        if OmegaConf.select(cfg, key, default=None) is None and key.split(".")[0] in cfg:
            OmegaConf.update(cfg, key, value, force_add=True)
    for key, (choice_key, choice, value) in ADDED_LATER_IN.items():
        chosen = OmegaConf.select(cfg, choice_key, default=None) == choice
        if chosen and OmegaConf.select(cfg, key, default=None) is None:
            OmegaConf.update(cfg, key, value, force_add=True)
    drop_removed(cfg)
    return RunRecord(dir=run_dir, kind=doc["kind"], cfg=cfg, doc=doc)


def drop_removed(cfg: DictConfig) -> None:
    """Delete each removed key (:data:`REMOVED`) an old ``config.yaml`` holds at the value
    that is today's behaviour, so the run reads and compares as a run of today; at any
    other value (an ``model.freeze_bn=true`` run) it is kept, and reports show it."""
    for key, (value, _) in REMOVED.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node and node[leaf] == value:
            del node[leaf]

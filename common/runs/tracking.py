"""Experiment tracking: every run folder mirrored into MLflow, so a sweep is one table.

Why MLflow: researchers run Hydra sweeps of dozens of runs; comparing them by
opening run folders does not scale, and MLflow's UI compares a whole experiment
in one table with the curves beside it. The run folder stays the record of truth
(the report, resume and every driver read it); MLflow is a mirror of it.

Rules this module keeps:

- **Tracking never loses a run.** Every MLflow call is guarded: the first failure
  logs one warning naming ``tracking.uri`` and switches tracking off for that run;
  training and the run folder carry on. An ``http(s)`` server is probed before the
  run starts, with a short timeout, so an unreachable one costs seconds, not the
  minutes of MLflow's own retries.
- **One process logs.** The process that writes the run folder: ``fedscan train``,
  the baselines, and the ServerApp of a federation. A site never imports this
  module, so sites need no tracking credentials (``MLFLOW_TRACKING_USERNAME`` /
  ``_PASSWORD`` / ``_TOKEN`` are read on the server only), and the site metrics in
  MLflow are those the sites already send.
- **MlflowClient, not the fluent API.** No process-global "active run": the
  in-process simulation engine runs the ServerApp in a thread.
- The local store is SQLite (MLflow 3's default backend; its file store is
  legacy), ``<runs_dir>/.mlflow/mlflow.db``, with artifacts beside it in
  ``<runs_dir>/.mlflow/artifacts`` rather than in whatever directory the command
  was started from. Hidden, so that ``runs/*/`` still means the run folders.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedscan.common.core.errors import ConfigError
from fedscan.common.federated.site_names import site_key
from fedscan.common.federated.wire import NODE_ID, SITE_ID, SITE_NAME

log = logging.getLogger("fedscan.tracking")

NAMES = ("mlflow", "none")
DEFAULT_EXPERIMENT = "fedscan"
# In runs_dir, hidden: `fedscan report runs/*/` and scripts that list run folders skip it
HOME = ".mlflow"
STORE = f"{HOME}/mlflow.db"
ARTIFACTS = f"{HOME}/artifacts"
LINK = "mlflow.json"  # in the run folder: which MLflow run mirrors it (resume continues it)
PROBE_TIMEOUT_S = 5.0
# What a run folder holds that is worth mirroring (checkpoints are not: 10-100 MB each)
ARTIFACT_SUFFIXES = (".json", ".yaml", ".png", ".csv")
_BATCH = 100  # MLflow's log_batch limit per call is 1000 metrics / 100 params


def tracking_name(cfg: DictConfig) -> str:
    """``tracking.name``, checked; a config from before tracking existed reads as none."""
    section = cfg.get("tracking")
    name = "none" if section is None else str(section.get("name"))
    if name not in NAMES:
        raise ConfigError("tracking", f"unknown '{name}'; use one of {list(NAMES)}")
    return name


def store_uri(cfg: DictConfig) -> str:
    """``tracking.uri``, or the SQLite store in the runs directory."""
    uri = cfg.tracking.get("uri")
    if uri:
        return str(uri)
    runs = Path(str(cfg.runs_dir)).expanduser().resolve()
    return f"sqlite:///{runs / STORE}"


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``a.b.c -> text`` for every leaf of the resolved config (MLflow params are text)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flat_params(value, name + ".")
        else:
            yield name, json.dumps(value) if isinstance(value, list) else str(value)


def split_scalars(tests: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """A split's metrics as MLflow keys: ``test_official/accuracy``, per class
    ``test_official/recall/glioma``, interval ends ``test_official/accuracy/ci_low``,
    per scan ``test_scan_grouped/per_scan/accuracy``."""
    out: dict[str, float] = {}
    for split, metrics in tests.items():
        _scalars(metrics, f"{split}/", out)
    return out


def _scalars(metrics: Mapping[str, Any], prefix: str, out: dict[str, float]) -> None:
    for key, value in metrics.items():
        if key == "per_class" and isinstance(value, Mapping):
            for cls, per in value.items():
                for m, v in per.items():
                    _put(out, f"{prefix}{m}/{cls}", v)
        elif key == "ci" and isinstance(value, Mapping):
            for m, ends in value.items():
                if m == "recall" and isinstance(ends, Mapping):
                    for cls, (lo, hi) in ends.items():
                        _put(out, f"{prefix}recall/{cls}/ci_low", lo)
                        _put(out, f"{prefix}recall/{cls}/ci_high", hi)
                elif isinstance(ends, list | tuple) and len(ends) == 2:
                    _put(out, f"{prefix}{m}/ci_low", ends[0])
                    _put(out, f"{prefix}{m}/ci_high", ends[1])
        elif key == "per_scan" and isinstance(value, Mapping):
            _scalars(value, f"{prefix}per_scan/", out)
        else:
            _put(out, f"{prefix}{key}", value)


def site_scalars(sites: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, float]:
    """The sites' reply metrics of one round, keyed by the site's name
    (:func:`~fedscan.common.federated.site_names.site_key`): ``site0/train/val_accuracy``
    (the site's model after local training, on its validation split),
    ``site0/evaluate/val_accuracy`` (the global model on it); a deployed site is
    ``hospital-a/...`` (its ``site-name``) or ``node1234/...`` (its node id)."""
    out: dict[str, float] = {}
    for phase, rows in sites.items():
        for row in rows:
            site = site_key(row)
            for key, value in row.items():
                if key not in (SITE_ID, NODE_ID, SITE_NAME):
                    _put(out, f"{site}/{phase}/{key}", value)
    return out


def _put(out: dict[str, float], key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if math.isfinite(float(value)):
        out[key.replace(" ", "_")] = float(value)


class Tracker:
    """The MLflow mirror of one run folder; every method is a no-op once disabled."""

    def __init__(self, client: Any = None, run_id: str | None = None, uri: str = "") -> None:
        self._client, self.run_id, self.uri = client, run_id, uri

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never end a training run
            log.warning(
                "tracking.uri=%s: %s failed (%s: %s); tracking is off for the rest of this "
                "run, its run folder is complete",
                self.uri,
                what,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            self._client = None
            return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """``metrics`` at ``step`` (epoch or round), in batches MLflow accepts."""
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._guard(
                "log_batch", self._client.log_batch, self.run_id, metrics=items[i : i + 1000]
            )

    def log_round(
        self, rnd: int, tests: Mapping[str, Mapping[str, Any]], sites: Mapping[str, Any]
    ) -> None:
        """A federated round: global test metrics (when evaluated) and site metrics."""
        self.log_metrics({**split_scalars(tests), **site_scalars(sites)}, rnd)

    def finish(self, run_dir: Path, *, failed: bool = False) -> None:
        """Upload the run folder's records and plots, and close the MLflow run."""
        if not self.active:
            return
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and path.suffix in ARTIFACT_SUFFIXES and path.name != LINK:
                self._guard("log_artifact", self._client.log_artifact, self.run_id, str(path))
        status = "FAILED" if failed else "FINISHED"
        self._guard("set_terminated", self._client.set_terminated, self.run_id, status)
        if self.active:
            log.info("tracked in MLflow: %s (run %s)", self.uri, self.run_id)


def _probe(uri: str) -> None:
    """Fail fast on a server that does not answer (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).raise_for_status()
    except requests.RequestException as exc:
        raise ConnectionError(f"no MLflow server answers at {uri} ({exc})") from None


def start_tracking(cfg: DictConfig, run_dir: Path, *, kind: str) -> Tracker:
    """The tracker of the run in ``run_dir``: a new MLflow run, or, when the folder's
    ``mlflow.json`` names one in the same store (a resumed federation), that run again.
    ``tracking=none`` or any failure gives a disabled tracker (with a warning)."""
    if tracking_name(cfg) == "none":
        return Tracker()
    uri = store_uri(cfg)
    try:
        with _store_warnings_quiet():
            return _start(cfg, run_dir, kind=kind, uri=uri)
    except Exception as exc:
        log.warning(
            "tracking.uri=%s: %s: %s; this run is not tracked, its run folder is complete "
            "(tracking=none switches tracking off)",
            uri,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return Tracker()


def _start(cfg: DictConfig, run_dir: Path, *, kind: str, uri: str) -> Tracker:
    """:func:`start_tracking`'s MLflow calls (any exception: not tracked)."""
    _probe(uri)
    from mlflow import MlflowClient

    local = uri.startswith("sqlite:///") and not cfg.tracking.get("uri")
    if local:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    link = run_dir / LINK
    if link.exists():
        linked = json.loads(link.read_text())
        if linked.get("uri") == uri:
            client.update_run(linked["run_id"], status="RUNNING")
            log.info("tracking: continuing MLflow run %s", linked["run_id"])
            return Tracker(client, linked["run_id"], uri)
    name = str(cfg.tracking.get("experiment") or DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifacts = None
        if local:
            artifacts = (Path(str(cfg.runs_dir)).expanduser().resolve() / ARTIFACTS).as_uri()
        experiment_id = client.create_experiment(name, artifact_location=artifacts)
    tags = {
        "fedscan.kind": kind,
        "fedscan.run_dir": str(run_dir),
        "fedscan.dataset": str(cfg.dataset.name),
        "fedscan.method": str(cfg.get("method", "centralised")),
        "fedscan.strategy": str(cfg.strategy.name),
    }
    run = client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
    tracker = Tracker(client, run.info.run_id, uri)
    from mlflow.entities import Param

    tree = OmegaConf.to_container(cfg, resolve=True)
    params = [Param(k, v[:6000]) for k, v in flat_params(tree)]
    for i in range(0, len(params), _BATCH):
        tracker._guard(
            "log_batch", client.log_batch, run.info.run_id, params=params[i : i + _BATCH]
        )
    link.write_text(json.dumps({"uri": uri, "run_id": run.info.run_id}))
    return tracker


def track_finished(cfg: DictConfig, run_dir: Path) -> None:
    """Mirror a finished centralised, pooled or local run folder: its per-epoch
    history at each epoch, its test metrics at the last step."""
    from fedscan.common.runs.record import read_run

    if tracking_name(cfg) == "none":
        return
    rec = read_run(run_dir)
    tracker = start_tracking(cfg, run_dir, kind=rec.kind)
    if not tracker.active:
        return
    last = 0
    if rec.kind in ("centralised", "pooled"):
        for i, row in enumerate(rec.history, 1):  # train_loss, val_accuracy, lr...
            epoch = int(row.get("epoch", i))
            scalars: dict[str, float] = {}
            for key, value in row.items():
                if key != "epoch":
                    _put(scalars, key, value)
            tracker.log_metrics(scalars, epoch)
            last = max(last, epoch)
        tracker.log_metrics(split_scalars(rec.final()), last)
    else:  # local: every site's own model on the test splits
        for site in rec.sites:
            scalars = split_scalars(site["final"])
            tracker.log_metrics({f"{site_key(site)}/{k}": v for k, v in scalars.items()}, 0)
    tracker.finish(run_dir)


@contextmanager
def _store_warnings_quiet() -> Iterator[None]:
    """MLflow 3.17's SQLite store trips a SQLAlchemy 2.1 deprecation warning when it is
    opened, which the user cannot act on; silenced while it opens, and only then.
    (Its Alembic migration lines are INFO: the entry points set those loggers' levels.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The ``noload`` loader strategy is deprecated")
        yield

"""A run folder: one self-contained directory per run, with its config and outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def partition_label(cfg: DictConfig | dict) -> str:
    """``iid``, ``dirichlet(alpha=0.1)``, ``pathological(classes_per_site=2)``..."""
    part = dict(cfg.get("partition") or {"name": "iid"})
    params = {k: v for k, v in part.items() if k not in ("name", "min_samples")}
    inner = ",".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )
    return f"{part['name']}({inner})" if inner else str(part["name"])

"""The federated run folder: per-round metrics, per-site metrics, checkpoints, resume.

Framework-free so the same folder format serves ``flwr run``, ``fedscan
simulate`` and the report tooling. ``metrics.json`` is rewritten after every
round, so an interrupted run leaves a readable record up to its last round, and
``last.pt`` holds everything needed to continue at the next round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from common.errors import DataError
from common.plots import plot_confusion
from common.runs import partition_label, write_config, write_json
from common.sitereport import COUNT_PREFIX, counts_from_sites, write_partition_report


class FederatedRun:
    def __init__(self, run_dir: Path, cfg: DictConfig, *, label: str, classes: Sequence[str]):
        self.dir, self.cfg, self.label, self.classes = run_dir, cfg, label, list(classes)
        self.rounds: list[dict[str, Any]] = []
        self.best_score = float("-inf")
        self.best_metric = str(cfg.federation.best_metric)
        self._t = time.perf_counter()
        write_config(run_dir, cfg)

    # ------------------------------------------------------------------ resume
    @classmethod
    def resume(cls, run_dir: Path, cfg: DictConfig, *, label: str, classes: Sequence[str]):
        ckpt = run_dir / "last.pt"
        if not ckpt.exists():
            raise DataError(ckpt, "cannot resume: no last.pt checkpoint in this run folder")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        run = cls(run_dir, cfg, label=label, classes=classes)
        run.rounds = state["rounds"]
        run.best_score = state["best_score"]
        return run, state

    # ------------------------------------------------------------------ rounds
    def record(self, rnd: int, tests: dict[str, dict], sites: dict[str, list[dict]]) -> dict:
        now = time.perf_counter()
        row = {"round": rnd, "seconds": round(now - self._t, 2), "global": tests, "sites": sites}
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

    def is_best(self, tests: dict[str, dict]) -> bool:
        first = next(iter(tests.values()))
        score = first[self.best_metric]
        score = -score if self.best_metric.endswith("loss") else score
        if score > self.best_score:
            self.best_score = score
            return True
        return False

    def checkpoint(
        self, rnd: int, arrays: dict[str, torch.Tensor], strategy_state: dict, *, best: bool
    ) -> None:
        state = {
            "round": rnd,
            "arrays": arrays,
            "strategy_state": strategy_state,
            "rounds": self.rounds,
            "best_score": self.best_score,
            "classes": self.classes,
            "model": dict(self.cfg.model),
        }
        tmp = self.dir / "last.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.dir / "last.pt")
        if best:
            torch.save(state, self.dir / "best.pt")

    # ------------------------------------------------------------------ output
    def _write(self) -> None:
        write_json(self.dir / "metrics.json", {"label": self.label, "rounds": self.rounds})

    def finish(self) -> None:
        from common.plots import plot_round_curves

        if not self.rounds:
            return
        title = f"{self.label} | {self.cfg.strategy.name} | {self.cfg.model.name}"
        plot_round_curves(self.rounds, self.dir / "curves.png", title=title)
        last = self.rounds[-1]["global"]
        plot_confusion(
            {k: v["confusion_matrix"] for k, v in last.items()},
            self.classes,
            self.dir / "confusion_matrix.png",
            title=f"{title} | final round",
        )

"""How a round's aggregate is obtained over Flower's Message API (no secure aggregation).

:class:`MessageRounds` is what :class:`~fedscan.server.federation.Federation` asks
for each round: a training round through the configured strategy's public methods
(``configure_train`` -> ``grid.send_and_receive`` -> ``aggregate_train``, what
Flower's ``Strategy.start()`` does inside its own loop), the sites' evaluation the
same way, and a statistics round (every site's sums, added here). The SecAgg+ path
(``server/secure.py``) replaces the training and statistics rounds and keeps the
evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from fedscan.common.federated.head_init import sum_statistics
from fedscan.common.federated.settings import FederationSettings
from fedscan.common.federated.wire import ARRAYS, CONFIG, HEAD_INIT, RUN_KEY
from fedscan.server.strategies import (
    SiteNames,
    SiteRecording,
    export_state,
    import_state,
    reply_row,
)

log = logging.getLogger("fedscan.server")

Arrays = dict[str, torch.Tensor]


class Aggregator(Protocol):
    """What the federation loop asks of a path (plain Message API or SecAgg+)."""

    names: SiteNames

    def train(self, rnd: int, arrays: Arrays) -> tuple[Arrays, list[dict]]:
        """One training round from the global ``arrays``: the new global arrays (the
        same ones when nothing could be aggregated) and the sites' reply rows."""

    def evaluate(self, rnd: int, arrays: Arrays) -> list[dict]:
        """The sites' validation metrics of ``arrays`` (empty: no federated evaluation)."""

    def sum_statistics(self, kind: str, arrays: Arrays) -> tuple[dict | None, list[dict]]:
        """The sites' summed ``kind`` statistics under ``arrays`` (``None``: no total)
        and their reply rows; the server never needs one site's sums on its own."""

    def export_state(self) -> dict[str, Any]:
        """The strategy state a resumed run needs (``last.pt``)."""

    def import_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`export_state`'s output (a resumed run)."""

    def close(self) -> None:
        """Stop what the path started (threads); called once, also after a failure."""


class MessageRounds:
    """Rounds through the strategy's Message-API methods; ``strategy`` is the
    configured one, possibly inside Flower's central-DP wrapper, ``recording`` the
    configured one itself (it keeps the sites' rows)."""

    def __init__(
        self,
        grid: Grid,
        strategy: Any,
        recording: SiteRecording,
        fed: FederationSettings,
        *,
        run_key: str,
    ) -> None:
        self.grid, self.strategy, self.recording = grid, strategy, recording
        self.names = recording.names
        self.timeout = float(fed.round_timeout_s)
        self.run_key = run_key

    def train(self, rnd: int, arrays: Arrays) -> tuple[Arrays, list[dict]]:
        # run-key: sites keep their privacy ledger per run folder, so a resumed run
        # continues their accounting instead of starting from zero
        config = ConfigRecord({RUN_KEY: self.run_key})
        messages = self.strategy.configure_train(rnd, ArrayRecord(arrays), config, self.grid)
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        new, _ = self.strategy.aggregate_train(rnd, replies)
        rows = self.recording.take_rows(rnd, "train")
        return (arrays if new is None else new.to_torch_state_dict()), rows

    def evaluate(self, rnd: int, arrays: Arrays) -> list[dict]:
        config = ConfigRecord()
        messages = self.strategy.configure_evaluate(rnd, ArrayRecord(arrays), config, self.grid)
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        self.strategy.aggregate_evaluate(rnd, replies)
        return self.recording.take_rows(rnd, "evaluate")

    def sum_statistics(self, kind: str, arrays: Arrays) -> tuple[dict | None, list[dict]]:
        """Every connected site is asked (a Flower ``query`` message); their sums are
        added here."""
        messages = [
            Message(
                content=RecordDict(
                    {
                        ARRAYS: ArrayRecord(arrays),
                        CONFIG: ConfigRecord({HEAD_INIT: kind, RUN_KEY: self.run_key}),
                    }
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in self.grid.get_node_ids()
        ]
        stats, rows = [], []
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                site = self.names(reply.metadata.src_node_id)
                log.warning("statistics round: %s failed: %s", site, reply.error.reason)
                continue
            sums = {k: a.numpy() for k, a in reply.content[ARRAYS].items()}
            stats.append(sums)
            row = reply_row(reply)
            self.names.learn(row)
            row["bytes"] = int(sum(a.nbytes for a in sums.values()))
            rows.append(row)
        return (sum_statistics(stats) if stats else None), rows

    def export_state(self) -> dict[str, Any]:
        return export_state(self.strategy)

    def import_state(self, state: Mapping[str, Any]) -> None:
        import_state(self.strategy, state)

    def close(self) -> None:
        return None


def kib_per_site(rows: list[dict]) -> float | None:
    """The statistics round's mean reply size (KiB), where the rows say it."""
    sizes = [r["bytes"] for r in rows if "bytes" in r]
    return float(np.mean(sizes)) / 1024 if sizes else None

"""Flower's SecAgg+ workflow on fedscan's mask generator, without a site that never
shared its keys, and with every halted round named.

:class:`PinnedSecAggPlusWorkflow` is Flower's ``SecAggPlusWorkflow`` with three
changes, each made around Flower's own stage methods (nothing of theirs copied):

- **masks**: the workflow removes the masks with
  :func:`fedscan.common.federated.masks.generate` (SHAKE-256) instead of Flower's
  32-bit-seeded Mersenne Twister (flwrlabs/flower issue 7522, fix proposed in PR
  7570); the patch is installed and checked each time the workflow starts, as the
  site mod's is on every SecAgg+ message (``client/secagg.py``).
- **handshake**: the setup stage announces ``secure_aggregation.mask_generator``
  to the sites (a site on another one refuses with an error reply) and reads each
  site's announcement in its reply; a site announcing another generator, or none (an
  older fedscan, plain Flower), is refused by node id before it receives any key.
- **dropped before keys**: Flower keeps a site that did not answer the setup or the
  key-sharing stage among the sampled sites and in its neighbours' sets, so the
  unmask stage asks for shares that were never made and the round halts ("Not enough
  shares"). Here such a site is removed from both after those two stages; its
  neighbours never masked against it (a site adds pairwise masks only for the
  neighbours whose key shares it received), so the round completes with the rest
  when the reconstruction threshold still holds, and halts at once, naming the
  sites, when it does not.

Every halted stage is logged with the sites that failed it and why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedscan.common.core.errors import ConfigError
from fedscan.common.federated import masks
from fedscan.common.federated.wire import HEAD_INIT, MASK_GENERATOR, SERVER_ROUND, round_number

log = logging.getLogger("fedscan.server")

FIT_CONFIG = "fitins.config"  # Flower's legacy record of a fit message's config


def install_server_masks() -> None:
    """Flower's workflow unmasks with fedscan's generator from here on (checked)."""
    masks.install(SecAggPlusWorkflow.unmask_stage, "flwr's SecAggPlusWorkflow.unmask_stage")


class _Relay:
    """The grid of one protocol stage: records what was sent and every reply, and
    adds ``stamp`` to each outgoing protocol config. Everything else is the grid's."""

    def __init__(self, grid: Grid, stamp: Mapping[str, Any] | None = None) -> None:
        self._grid, self._stamp = grid, dict(stamp or {})
        self.sent: set[int] = set()
        self.replies: list[Message] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            self.sent.add(msg.metadata.dst_node_id)
            if self._stamp:
                msg.content.config_records[RECORD_KEY_CONFIGS].update(self._stamp)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def failed(self, among: Iterable[int] | None = None) -> dict[int, str]:
        """Node id -> why, for the sites that sent an error or nothing at all."""
        answered = {m.metadata.src_node_id for m in self.replies}
        why = {m.metadata.src_node_id: _reason(m) for m in self.replies if m.has_error()}
        why.update({nid: "no reply (lost or timed out)" for nid in self.sent - answered})
        keep = self.sent if among is None else set(among)
        return {nid: r for nid, r in sorted(why.items()) if nid in keep}


def _reason(msg: Message) -> str:
    text = " ".join(str(msg.error.reason or f"error code {msg.error.code}").split())
    return text if len(text) <= 400 else text[:400] + " ..."


class PinnedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` on fedscan's masks, refusing sites on another generator
    and completing rounds without sites that dropped before sharing their keys."""

    def __init__(self, *args: Any, mask_generator: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_generator = mask_generator
        self._label = "SecAgg+ round"

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        install_server_masks()
        super().__call__(grid, context)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        relay = _Relay(grid, stamp={MASK_GENERATOR: self.mask_generator})
        super().setup_stage(relay, context, state)
        self._label = _round_label(context, state)
        if not state.nid_to_neighbours:  # no site, or one: Flower said which above
            return self._halted("setup", relay, "fewer than 2 sites were sampled")
        self._refuse_other_generators(relay, state)
        return self._without_keyless(state, "setup", relay)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        relay = _Relay(grid)
        super().share_keys_stage(relay, context, state)
        return self._without_keyless(state, "share keys", relay)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        relay = _Relay(grid)
        ok = super().collect_masked_vectors_stage(relay, context, state)
        if not ok:
            return self._halted(
                "collect masked vectors", relay, self._threshold_text(state, _short(state))
            )
        if lost := relay.failed(relay.sent - state.active_node_ids):
            log.warning(
                "%s: site(s) %s dropped after sharing their keys (%s); the others' shares "
                "remove their masks",
                self._label,
                _ids(lost),
                _why(lost),
            )
        return True

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        relay = _Relay(grid)
        if super().unmask_stage(relay, context, state):
            return True
        return self._halted(
            "unmask",
            relay,
            f"fewer than secure_aggregation.reconstruction_threshold={state.threshold} shares "
            "came back for some site's secret",
        )

    def _refuse_other_generators(self, relay: _Relay, state: WorkflowState) -> None:
        """Sites whose setup reply announces another mask generator (or none) leave the
        round before any key is forwarded to them, or theirs to anyone."""
        for reply in relay.replies:
            if reply.has_error():
                continue
            nid = reply.metadata.src_node_id
            announced = reply.content.config_records[RECORD_KEY_CONFIGS].get(MASK_GENERATOR)
            why = masks.refusal(
                announced, own=self.mask_generator, peer=f"site {nid}", this="the server"
            )
            if why is None:
                continue
            log.error("%s: SecAgg+ refuses site %d: %s", self._label, nid, why)
            state.active_node_ids.discard(nid)
            state.nid_to_publickeys.pop(nid, None)
            state.failures.append(ConfigError("secure_aggregation.mask_generator", why))

    def _without_keyless(self, state: WorkflowState, stage: str, relay: _Relay) -> bool:
        """Remove the sampled sites that are no longer active after ``stage`` (setup or
        share keys: none of them shared a key) from the sampled set and every neighbour
        set, then check the reconstruction threshold on what is left."""
        gone = state.sampled_node_ids - state.active_node_ids
        if gone:
            state.sampled_node_ids = state.sampled_node_ids - gone
            for nid in gone:
                state.nid_to_neighbours.pop(nid, None)
            for neighbours in state.nid_to_neighbours.values():
                neighbours -= gone
            failed = relay.failed(gone)
            failed.update({n: "refused (mask generator)" for n in gone if n not in failed})
            log.warning(
                "%s: site(s) %s left SecAgg+ at the %s stage, before sharing keys (%s); "
                "the round goes on with %d site(s)",
                self._label,
                _ids(failed),
                stage,
                _why(failed),
                len(state.sampled_node_ids),
            )
        if len(state.sampled_node_ids) < max(2, state.threshold):
            return self._halted(
                stage,
                relay,
                f"{len(state.sampled_node_ids)} site(s) left, fewer than 2 or than secure_"
                f"aggregation.reconstruction_threshold={state.threshold}",
            )
        if short := _short(state):
            return self._halted(stage, relay, self._threshold_text(state, short))
        return True

    def _threshold_text(self, state: WorkflowState, short: Mapping[int, int]) -> str:
        counts = ", ".join(f"site {n}: {c}" for n, c in sorted(short.items()))
        return (
            f"too few sites left to rebuild secrets: secure_aggregation."
            f"reconstruction_threshold={state.threshold} needs that many active sites among "
            f"each site's neighbours (itself included), and {counts}"
        )

    def _halted(self, stage: str, relay: _Relay, reason: str) -> bool:
        failed = relay.failed()
        log.error(
            "%s: SecAgg+ halted at the %s stage: %s. Site(s) that failed this stage: %s. "
            "No aggregate this round: the global model is unchanged",
            self._label,
            stage,
            reason,
            _why(failed) if failed else "none",
        )
        return False


def _short(state: WorkflowState) -> dict[int, int]:
    """Sampled sites with fewer active neighbours (themselves included) than the
    threshold, with how many they have (Flower's own check, with the counts)."""
    counts = {
        nid: len(state.nid_to_neighbours.get(nid, set()) & state.active_node_ids)
        for nid in state.sampled_node_ids
    }
    return {nid: c for nid, c in counts.items() if c < state.threshold}


def _round_label(context: LegacyContext, state: WorkflowState) -> str:
    """The run's round (continuing across a resume) or the statistics round, from the
    fit config fedscan's strategies send; Flower's round when there is none."""
    for fitins in state.nid_to_fitins.values():
        config = fitins.config_records.get(FIT_CONFIG, {})
        if HEAD_INIT in config:
            return f"statistics round ({config[HEAD_INIT]})"
        if SERVER_ROUND in config:
            return f"round {round_number(config)}"
        break
    current = context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]
    return f"SecAgg+ round {current}"


def _ids(failed: Mapping[int, str]) -> str:
    return ", ".join(map(str, sorted(failed)))


def _why(failed: Mapping[int, str]) -> str:
    return "; ".join(f"site {nid}: {why}" for nid, why in sorted(failed.items()))

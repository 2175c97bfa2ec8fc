"""Flower's SecAgg+ site mod on fedscan's mask generator, with the generator handshake.

``secaggplus_mod`` derives every mask with Flower's ``pseudo_rand_gen`` (a 32-bit
seeded Mersenne Twister, flwrlabs/flower issue 7522); :func:`pinned_secaggplus_mod`
points it at :func:`fedscan.common.federated.masks.generate` on every SecAgg+
message (a deployed site runs each message in a fresh ``flwr-clientapp`` process,
so installing once per round would not do), failing loudly if the patch no longer
takes effect. At the setup stage, before any key exists, the site checks the
generator the server announces and refuses another (or none), naming
``secure_aggregation.mask_generator``; its setup reply announces its own, which the
server checks in turn (``server/secagg.py``). Drop the patch, not the handshake,
once Flower releases a fixed generator.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import _collect_masked_vectors
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedscan.common.core.errors import ConfigError
from fedscan.common.federated import masks
from fedscan.common.federated.wire import MASK_GENERATOR

log = logging.getLogger("fedscan.site")


def install_site_masks() -> None:
    """Flower's site mod masks with fedscan's generator from here on (checked)."""
    masks.install(_collect_masked_vectors, "flwr's secaggplus_mod._collect_masked_vectors")


def pinned_secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``secaggplus_mod`` with fedscan's masks; refuses a server on another generator
    at the setup stage (an error reply naming the setting, before any key is made)."""
    install_site_masks()
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    setup = configs.get(Key.STAGE) == Stage.SETUP
    if setup:
        why = masks.refusal(
            configs.get(MASK_GENERATOR), own=masks.GENERATOR, peer="the server", this="this site"
        )
        if why is not None:
            log.error("SecAgg+ refused: %s", why)
            raise ConfigError("secure_aggregation.mask_generator", why)
    reply = secaggplus_mod(msg, context, call_next)
    if setup and reply.has_content() and RECORD_KEY_CONFIGS in reply.content.config_records:
        reply.content.config_records[RECORD_KEY_CONFIGS][MASK_GENERATOR] = masks.GENERATOR
    return reply

"""The keys of fedscan's federated messages, in one place.

Client, server, strategies and the run folder all read and write these. Some are
Flower's own (``server-round``, ``proximal-mu``, ``num-examples``: FedAvg weighs
by it), some are fedscan's. Plain strings, so this module needs no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Message content records
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

# Train / evaluate config, server -> site
SERVER_ROUND = "server-round"  # Flower: 1-based round of this ServerApp run
ROUND_OFFSET = "round-offset"  # fedscan: rounds done before a resume
RUN_KEY = "run-key"  # fedscan: run folder name; sites key their privacy ledger by it
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx
HEAD_INIT = "head-init"  # fedscan: the statistics round's kind (fed3r | fedncm), on a query
SCAFFOLD_C = "scaffold-c"  # ArrayRecord beside ARRAYS on a train message: SCAFFOLD's c
SCAFFOLD_DELTA = "scaffold-dc"  # ArrayRecord beside ARRAYS on a train reply: delta c_i
# Secure aggregation (legacy messages carry parameters as an unnamed list): their names, as
# JSON text in the fit / evaluate config, in the order of the list
PARAMETER_NAMES = "fedscan-keys"
STATISTICS_SCALE = "statistics-scale"  # the statistics round under SecAgg+: sums / this
MAX_WEIGHT = "max-weight"  # ... sent with this num-examples: every site weighs the same
CLIPPING_RANGE = "clipping-range"  # ... must stay within SecAgg+'s clipping range
STATISTICS_KEYS = "statistics-keys"  # reply metric: the statistics' names, in order (JSON)
# SecAgg+'s mask generator (common/federated/masks.py), in the setup stage's protocol
# config (server -> site) and in a site's setup reply (site -> server): each refuses the other
# on a mismatch, before any key is shared
MASK_GENERATOR = "fedscan-mask-generator"

# Reply metrics, site -> server
NUM_EXAMPLES = "num-examples"  # Flower's weighting key; 0 = "do not average me"
SITE_ID = "partition-id"  # the site's partition in simulation; NO_SITE in deployment
COUNT_PREFIX = "n_train_"  # + class name: the site's training images of that class
NODE_ID = "node_id"  # added by the server to every recorded reply
SITE = "site"  # ConfigRecord beside METRICS on a reply: the site's SITE_NAME, when it has one

# Node config (SuperNode --node-config; simulation injects the first two)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
SITE_NAME = "site-name"  # deployment, optional: the site's stable name (else its node id)

NO_SITE = -1  # SITE_ID of a deployed site: it has a folder, not a partition


def round_number(config: Mapping[str, Any]) -> int:
    """The run's round (1-based, continuing across a resume) from a train/evaluate config."""
    return int(config.get(SERVER_ROUND, 1)) + int(config.get(ROUND_OFFSET, 0))


def node_site(node_config: Mapping[str, Any]) -> tuple[int | None, int | None, str]:
    """``(partition_id, num_partitions, data_path)`` of a node.

    A node with a ``data-path`` is a deployed site and has no partition (both
    ``None``); otherwise it is simulation's partition ``partition-id`` of
    ``num-partitions`` (Flower always injects both there).
    """
    data_path = str(node_config.get(DATA_PATH, "") or "")
    if data_path:
        return None, None, data_path
    return int(node_config.get(PARTITION_ID, 0)), int(node_config.get(NUM_PARTITIONS, 1)), ""

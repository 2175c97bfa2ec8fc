"""How a site is named in everything fedscan writes and logs.

In simulation a site is its partition (``site 0``). A deployed site has no partition
(every one reports ``partition-id`` -1), so naming it by partition collapsed every
deployed site into one: MLflow kept only the last site's metrics, the partition
report and the cross-site matrix one row. A deployed site is named by its
``site-name`` node-config entry when it has one (``flower-supernode --node-config
'data-path="..." site-name="hospital-a"'``: stable across restarts), else by the
node id the SuperLink assigned (``node 1234``; stable while the SuperNode keeps its
registration).

One function names a site from what its reply carries (:func:`site_label`), so the
metrics rows, MLflow keys, partition report, cross-site matrix, the privacy ledger's
log lines and the server's warnings cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fedscan.common.core.errors import ConfigError
from fedscan.common.federated.wire import NO_SITE, NODE_ID, SITE_ID, SITE_NAME

# Safe in an MLflow key, a file name and a log line; no space, so no label of a
# partition ("site 0") can be spelled by a deployed site
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_site_name(value: Any) -> str | None:
    """The ``site-name`` node-config value, checked; ``None`` when not set."""
    if value is None or value == "":
        return None
    name = str(value)
    if not _NAME.fullmatch(name):
        raise ConfigError(
            SITE_NAME,
            f"{name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (it names the site in MLflow keys and file names)",
        )
    return name


def site_label(row: Mapping[str, Any]) -> str:
    """``site 0`` (a simulated partition), the site's ``site-name``, or ``node 1234``
    (its node id), from a reply row (or any mapping with those keys)."""
    pid = int(row.get(SITE_ID, NO_SITE))
    if pid != NO_SITE:
        return f"site {pid}"
    if row.get(SITE_NAME):
        return str(row[SITE_NAME])
    if NODE_ID in row:
        return f"node {int(row[NODE_ID])}"
    return "site (unnamed)"


def site_key(row: Mapping[str, Any]) -> str:
    """The label as one token for metric keys: ``site0``, ``hospital-a``, ``node1234``."""
    return site_label(row).replace(" ", "")

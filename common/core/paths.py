"""Where data, caches and runs live: config keys first, then environment variables.

The public datasets are read-only in CI, so nothing is ever written next to the
images: caches go to ``cache_dir`` (``FEDSCAN_CACHE``, default ``~/.cache/fedscan``).

Everything here is ``os`` / ``pathlib`` only: the CLI checks data folders with it
before torch or Flower load, so a bad path is answered in about a second.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedscan.common.core.errors import ConfigError

DATA_ENV = "FEDSCAN_DATA"
CACHE_ENV = "FEDSCAN_CACHE"
# Datasets read from under the data root (dataset.path relative to it, or absolute)
ROOTED_DATASETS = ("brain_mri", "lung_ct")


def data_root(configured: str | os.PathLike | None) -> Path | None:
    """The folder holding ``brain-tumor-mri/`` and ``iq-oth-nccd/``, or ``None`` if unset."""
    return data_root_source(configured)[0]


def data_root_source(configured: str | os.PathLike | None) -> tuple[Path | None, str]:
    """The data root and the setting it came from: ``data_root`` (the config key) before
    ``FEDSCAN_DATA`` (the environment); ``(None, "")`` when neither is set. Errors name
    the setting, so the user knows which of the two to fix."""
    if configured not in (None, ""):
        return Path(str(configured)).expanduser().resolve(), "data_root"
    value = os.environ.get(DATA_ENV)
    if value:
        return Path(value).expanduser().resolve(), DATA_ENV
    return None, ""


def check_dataset_folder(dataset: Mapping[str, Any], configured_root: str | None) -> None:
    """Fail with a :class:`ConfigError` naming the setting to fix (``dataset.path``,
    ``data_root`` or ``FEDSCAN_DATA``) when the folder ``dataset`` reads does not exist.

    Only looks at folders (no image is read): the CLI, the ServerApp and a simulated
    site call it while composing the config, before any heavy import.
    """
    name = str(dataset.get("name"))
    if name not in (*ROOTED_DATASETS, "site") or not dataset.get("path"):
        return  # synthetic reads nothing; a site without a path is validated by its loader
    rel = Path(str(dataset["path"])).expanduser()
    if rel.is_absolute():
        if not rel.is_dir():
            raise ConfigError("dataset.path", f"{rel}: no such folder (dataset '{name}')")
        return
    root, source = data_root_source(configured_root)
    if root is None:
        if name == "site":  # a site folder relative to the working directory
            if not rel.is_dir():
                raise ConfigError("dataset.path", f"{rel.resolve()}: no such folder")
            return
        raise ConfigError(
            "data_root",
            f"dataset '{name}' reads {rel}/ under a data root, and none is set: set "
            f"{DATA_ENV}=/path or data_root=/path to the folder holding brain-tumor-mri/ and "
            "iq-oth-nccd/ (or run dataset=synthetic, or name no dataset for the SYNTHETIC "
            "embedded default)",
        )
    if not root.is_dir():
        raise ConfigError(source, f"{root}: no such folder")
    if not (root / rel).is_dir():
        raise ConfigError(
            source,
            f"{root} holds no {rel}/ (dataset '{name}', dataset.path={rel}); it should be "
            "the folder holding brain-tumor-mri/ and iq-oth-nccd/",
        )


def cache_root(configured: str | os.PathLike | None) -> Path:
    value = configured if configured not in (None, "") else os.environ.get(CACHE_ENV)
    root = Path(value).expanduser() if value else Path.home() / ".cache" / "fedscan"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()

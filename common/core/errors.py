"""Exceptions that name the thing a user has to fix (a file, a folder or a config key)."""

from __future__ import annotations

from pathlib import Path


class FedscanError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(FedscanError):
    """A configuration value is missing or invalid; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        # a CLI flag or an environment variable (FEDSCAN_DATA) is no config key
        what = (
            "option"
            if key.startswith("-")
            else "environment variable"
            if key.isupper()
            else "config key"
        )
        super().__init__(f"{what} '{key}': {message}")


class DataError(FedscanError):
    """A data folder or file cannot be used; the message names the path."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


class UnreadableImageError(DataError):
    """One image could not be decoded; ``reason`` is short enough for an audit table."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.reason = reason
        super().__init__(path, f"unreadable image ({reason})")

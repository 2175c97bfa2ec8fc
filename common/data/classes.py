"""Canonical class names per imaging domain, and the aliases found in the wild.

Public datasets and hospital folders spell classes differently (``Bengin cases``,
``no_tumor``, ``glioma_tumor``...). Mapping every spelling to one canonical name
at read time means labels mean the same thing at every site of a federation.
"""

from __future__ import annotations

import re

BRAIN_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
LUNG_CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")

CLASSES: dict[str, tuple[str, ...]] = {"brain_mri": BRAIN_CLASSES, "lung_ct": LUNG_CLASSES}

_ALIASES: dict[str, dict[str, str]] = {
    "brain_mri": {
        "glioma": "glioma",
        "gliomatumor": "glioma",
        "meningioma": "meningioma",
        "meningiomatumor": "meningioma",
        "notumor": "notumor",
        "notumour": "notumor",
        "notumorcases": "notumor",
        "normal": "notumor",
        "healthy": "notumor",
        "pituitary": "pituitary",
        "pituitarytumor": "pituitary",
    },
    "lung_ct": {
        "normal": "normal",
        "normalcases": "normal",
        "benign": "benign",
        "benigncases": "benign",
        "bengin": "benign",  # upstream IQ-OTH/NCCD spelling
        "bengincases": "benign",
        "malignant": "malignant",
        "malignantcases": "malignant",
    },
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def canonical_class(domain: str, name: str) -> str | None:
    """Return the canonical class for a folder name, or ``None`` if it is not a known alias."""
    if domain not in _ALIASES:
        raise KeyError(f"unknown domain '{domain}', expected one of {sorted(_ALIASES)}")
    return _ALIASES[domain].get(_key(name))


def known_aliases(domain: str) -> list[str]:
    """Spellings accepted for ``domain`` (for error messages)."""
    return sorted(_ALIASES[domain])

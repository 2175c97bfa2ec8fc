"""Option names that settings validation needs before torch is imported.

A bad value (``train.augment=heavy``, ``federation.head_init=ridge``) should be
answered in well under a second; the modules that implement these options import
torch, which takes seconds. They import their names from here instead.
"""

from __future__ import annotations

AUGMENT_PRESETS = ("none", "light", "standard")
HEAD_INITS = ("none", "fed3r", "fedncm")

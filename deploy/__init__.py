"""The deployment layer: exported model packages, ``fedscan predict`` and ``fedscan serve``."""

"""Whole commands behind the CLI: ``fedscan audit``, ``fedscan site check``, ``fedscan report``."""

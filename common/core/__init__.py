"""Errors that name what to fix, registries, paths, the one config tree, process helpers."""

"""Framework-free core of fedscan (nothing here imports Flower).

Sub-packages, each importing only the ones listed before it:

- ``core``: errors, registries, paths, the config tree, process helpers.
- ``data``: reading, decoding, caching, de-duplicating, splitting and partitioning images.
- ``learn``: models, training and evaluation loops, metrics, typed training settings.
- ``federated``: what one site does in a federation (exchange, local training, DP-SGD,
  the site trainer) and the wire keys its messages use.
- ``runs``: a run's life: validation before any work, the run folder (write and read),
  plots and the partition report.
- ``commands``: whole commands a user runs (``audit``, ``site check``, ``report``).

``tests/test_architecture.py`` enforces the order.
"""

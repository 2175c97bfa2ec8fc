"""Framework-free core of fedscan: data, transforms, models, training, metrics.

Nothing in this package imports Flower, so every piece can be unit-tested and
reused by the centralised baseline, the ClientApp and the ServerApp alike.
"""

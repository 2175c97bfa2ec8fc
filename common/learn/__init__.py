"""Models, training and evaluation loops, metrics and the typed ``train`` settings.
Knows nothing of federations."""

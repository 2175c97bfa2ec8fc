"""Images to arrays: datasets, decoding (JPEG / PNG / DICOM), caches, leakage groups,
splits and site partitions. Knows nothing of models."""

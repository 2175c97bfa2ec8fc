"""A run's life: validation before any work, the run folder contract (write and
read, for centralised, baseline and federated runs), plots, the partition report."""

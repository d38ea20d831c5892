"""Training: the one loop shared by `prune` and `train`, optimizer groups and schedule,
checkpoints with exact resume, metrics, and data parallelism. The one place that knows everything."""

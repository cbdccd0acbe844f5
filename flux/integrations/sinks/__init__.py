"""Metrics sinks beyond metrics.jsonl: TensorBoard (`logging.tensorboard`)."""

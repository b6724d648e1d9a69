"""Monitoring: drift of new data against the training data, and batch inference."""

"""Evaluation a person can read: metrics per class, calibration, explanations, the model card."""

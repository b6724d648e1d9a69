"""Training: the Lightning fit, its callbacks and calibration, the hardware it runs on, tuning."""

"""Tuning: verification against the float64 reference, Optuna studies, and the tuner."""

"""The one-machine implementations of the contracts: subprocess training, Optuna tuning, HTTP endpoints."""

"""Experiments built from the trainer: each module is a command (python -m resnet_jax.experiments.NAME)."""

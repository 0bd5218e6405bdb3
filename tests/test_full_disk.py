"""A full or read-only disk during training: one error line, the data kept, an exact resume."""

import errno
import json
import logging
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import run_main

from configs import smoke
from resnet_jax import checkpointing, cli, train, workdir_claim


def _args(workdir, toy_folder):
    return [
        "--config",
        "configs/smoke.py",
        f"--workdir={workdir}",
        f"--config.data_dir={toy_folder}",
        "--config.num_train_steps=120",
        "--config.checkpoint_every_steps=10",
        "--config.eval_every_steps=60",
        "--config.keep_checkpoints=20",
    ]


def _final_arrays(workdir, step=120):
    checkpointer = ocp.StandardCheckpointer()
    return [
        checkpointer.restore(workdir / "checkpoints" / str(step) / item)
        for item in ("model", "optimizer")
    ]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MB tmpfs (this needs the right to mount, as root in CI's container has)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the in-process "
            "tests below cover the same error path"
        )
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_disk_that_fills_up_stops_the_run_with_one_line_and_the_rerun_ends_exact(
    small_filesystem, toy_folder, tmp_path
):
    workdir = small_filesystem / "run"
    full = run_main(*_args(workdir, toy_folder), "--compilation_cache=none")
    assert full.returncode == 1, full.stderr[-3000:]
    assert "(compilation cache off)" in full.stderr  # The first step's line says so.
    # Only the run's own INFO lines and the error: none of the libraries' tracebacks.
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert all(line[0] in "IW" and "] " in line for line in lines[:-1]), lines[:20]
    newest = checkpointing.complete_steps(workdir)[-1]
    assert 0 < newest < 120
    assert lines[-1] == (
        f"error: cannot write in {workdir}: no space is left. The run stopped; the newest "
        f"complete checkpoint is step {newest} in {workdir / 'checkpoints'}, where the rerun "
        "resumes (unfinished saves are ignored). Free space (or make the folder writable) and "
        "rerun the same command."
    )
    assert not (workdir / "eval_results.json").exists()
    assert not (workdir / "RUNNING.json").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)
    resumed = run_main(*_args(workdir, toy_folder))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint step {newest}" in resumed.stderr
    reference = tmp_path / "reference"
    assert run_main(*_args(reference, toy_folder)).returncode == 0
    for x, y in zip(
        jax.tree.leaves(_final_arrays(workdir)),
        jax.tree.leaves(_final_arrays(reference)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert json.loads((workdir / "eval_results.json").read_text()) == json.loads(
        (reference / "eval_results.json").read_text()
    )


def test_a_failed_save_in_process_names_the_newest_complete_checkpoint(
    toy_folder, tmp_path, monkeypatch
):
    config = smoke.get_config()
    config.data_dir = str(toy_folder)
    config.num_train_steps = 6
    config.checkpoint_every_steps = config.eval_every_steps = config.log_every_steps = 2
    real_save = checkpointing.save

    def save_until_full(manager, state, *args, **kwargs):
        if int(state.step) == 4:
            manager.wait_until_finished()  # The step-2 save completed before the disk filled.
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(manager, state, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save", save_until_full)
    with pytest.raises(workdir_claim.WorkdirError) as error:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(error.value).startswith(
        f"cannot write in {tmp_path / 'run'}: no space is left. The run stopped; the newest "
        f"complete checkpoint is step 2 in {tmp_path / 'run' / 'checkpoints'}"
    )
    assert checkpointing.complete_steps(tmp_path / "run") == [2]
    assert not (tmp_path / "run" / "RUNNING.json").exists()


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space is left"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is used up"),
        # What Orbax's TensorStore writes raise: a ValueError carrying the OS error's code.
        (
            ValueError(
                'RESOURCE_EXHAUSTED: Error writing "params.fc.bias/0" ... Failed to write 487 '
                "bytes to file 5: No space left on device [os_error_code='28']"
            ),
            "no space is left",
        ),
        (OSError(errno.EACCES, "Permission denied"), "permission to write is denied"),
        (OSError(errno.ENOENT, "No such file or directory"), None),
        (ValueError("shapes differ"), None),
    ],
)
def test_storage_failures_are_recognised_by_errno_or_message(error, reason):
    assert checkpointing.storage_failure(error) == reason


def test_a_storage_failure_is_found_in_the_error_it_caused():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("save failed") from cause
    except RuntimeError as error:
        assert checkpointing.storage_failure(error) == "no space is left"


def test_library_lines_restating_a_full_disk_are_hidden_ours_are_not():
    def record(path, message):
        return logging.LogRecord("x", logging.ERROR, path, 1, message, None, None)

    quiet = cli._QuietLibraries()
    disk = "Failed to write 487 bytes: No space left on device [os_error_code='28']"
    assert not quiet.filter(record("/site-packages/orbax/future.py", disk))
    assert quiet.filter(record("/site-packages/orbax/future.py", "another failure"))
    assert quiet.filter(record("/x/resnet_jax/train.py", disk))

"""Checkpoints: exact resume after SIGKILL, SIGTERM, eval from a checkpoint, bad checkpoints."""

import json
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import MAIN, ROOT, freeze, main_environment, run_main, tiny_state

from configs import smoke
from resnet_jax import checkpointing, config_checks, defaults, evaluate, sharding, train

STEPS, EVERY = 60, 20  # 10 epochs of the toy folder; evaluations at 30 and 60.
STEP_LINE = re.compile(r"\] step (\d+)/\d+ ")


def main_args(workdir, toy_folder, *extra):
    return [
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        f"--config.data_dir={toy_folder}",
        f"--config.num_train_steps={STEPS}",
        f"--config.checkpoint_every_steps={EVERY}",
        "--config.eval_every_steps=30",
        "--config.log_every_steps=1",
        *extra,
    ]


def start_and_stop_at(args, workdir, min_step, stop_signal, while_frozen=None):
    """Starts a run and stops it with `stop_signal` between two checkpoints.

    The run is frozen (SIGSTOP) once it has logged `min_step`; if by then no checkpoint
    is complete, or it stands exactly at one, it is let go again until the next step.
    `while_frozen(pid)`, if given, is called while it is frozen, before the signal.

    Returns (the last step it logged before the signal, its stderr, its exit code).
    """
    process = subprocess.Popen(
        [*MAIN, *args], cwd=ROOT, env=main_environment(), stderr=subprocess.PIPE, text=True
    )
    last_logged, lines = 0, []
    for line in process.stderr:
        lines.append(line)
        match = STEP_LINE.search(line)
        if not match:
            continue
        last_logged = int(match.group(1))
        if last_logged >= min_step:
            freeze(process)
            steps = checkpointing.complete_steps(workdir)
            if steps and max(steps) < last_logged:
                break
            process.send_signal(signal.SIGCONT)
    assert last_logged >= min_step, "".join(lines[-30:])
    if while_frozen is not None:
        while_frozen(process.pid)
    process.send_signal(stop_signal)
    if stop_signal != signal.SIGKILL:
        process.send_signal(signal.SIGCONT)
    rest = process.stderr.read()
    process.wait(timeout=300)
    return last_logged, "".join(lines) + rest, process.returncode


def final_arrays(workdir, step=STEPS):
    """The model and optimizer arrays of a finished run, read back with plain Orbax."""
    checkpointer = ocp.StandardCheckpointer()
    folder = workdir / "checkpoints" / str(step)
    return {
        item: checkpointer.restore(folder / item)
        for item in ("model", "optimizer", "ema")
        if (folder / item).exists()
    }


def assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference_run(toy_folder, tmp_path_factory):
    """An uninterrupted run on 4 simulated devices."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_main(*main_args(workdir, toy_folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device input" in result.stderr  # auto keeps a small folder on the devices
    (workdir / "stderr.txt").write_text(result.stderr)
    return workdir


def logged_eval_top1(workdir):
    """step -> eval top-1 as the run logged it."""
    lines = re.findall(
        r"\] eval at step (\d+): top1 ([0-9.]+) ", (workdir / "stderr.txt").read_text()
    )
    return {int(step): float(top1) for step, top1 in lines}


def test_sigkill_then_rerun_ends_bitwise_identical(reference_run, toy_folder, tmp_path):
    workdir = tmp_path / "killed"
    args = main_args(workdir, toy_folder)

    def second_launch(pid):
        """The same command again while the first run lives: refused, and nothing written."""
        before = sorted((p.name, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
        second = run_main(*args)
        assert second.returncode == 1, second.stderr[-3000:]
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: {workdir} is in use by the run of process {pid} on ")
        assert f"kill {pid}" in error and "another --workdir" in error
        assert sorted((p.name, p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before
        # Reading commands do not claim: evaluating the run's latest checkpoint works now.
        evaluated = run_main(*eval_args(workdir, toy_folder), devices=1)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads(evaluated.stdout.strip().splitlines()[-1])["step"] == max(
            checkpointing.complete_steps(workdir)
        )

    last_logged, _, returncode = start_and_stop_at(
        args, workdir, 25, signal.SIGKILL, while_frozen=second_launch
    )
    assert returncode == -signal.SIGKILL
    assert (workdir / "RUNNING.json").exists()  # Left by the killed run.
    assert not (workdir / "eval_results.json").exists()
    latest = max(checkpointing.complete_steps(workdir))
    # Killed between checkpoints: the steps after `latest` are lost and must be redone.
    assert latest in (20, 30, 40) and latest < last_logged < STEPS
    resumed = run_main(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint step {latest}" in resumed.stderr
    # The killed run's claim is stale (its process is gone): taken over, then given back.
    assert "left by an earlier run: its process" in resumed.stderr
    assert not (workdir / "RUNNING.json").exists()
    assert_bitwise_equal(final_arrays(workdir), final_arrays(reference_run))
    reference = json.loads((reference_run / "eval_results.json").read_text())
    assert json.loads((workdir / "eval_results.json").read_text()) == reference


# The streamed runs also have every addition of the modern recipes on: the train step's
# augmentations, SAM and an EMA, all of which must resume exactly too.
STREAM = (
    "--config.input=stream",
    "--config.input_workers=2",
    "--config.policy=trivialaugment",
    "--config.cutout_size=6",
    "--config.random_erasing=0.5",
    "--config.mixup_alpha=0.4",
    "--config.cutmix_alpha=1.0",
    "--config.sam_rho=0.05",
    "--config.ema_decay=0.9",
)


@pytest.fixture(scope="module")
def stream_reference_run(toy_folder, tmp_path_factory):
    """An uninterrupted run on the streaming input (two grain workers), every recipe option on."""
    workdir = tmp_path_factory.mktemp("stream_reference")
    result = run_main(*main_args(workdir, toy_folder, *STREAM))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stream input" in result.stderr
    return workdir


def test_stream_input_with_every_recipe_option_sigkill_then_rerun_ends_bitwise_identical(
    stream_reference_run, toy_folder, tmp_path
):
    workdir = tmp_path / "killed"
    args = main_args(workdir, toy_folder, *STREAM)
    # start_and_stop_at reads the killed run's stderr to its end, which comes only once
    # the orphaned grain workers (they share the pipe) have noticed and exited too.
    last_logged, _, returncode = start_and_stop_at(args, workdir, 25, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    latest = max(checkpointing.complete_steps(workdir))
    assert latest in (20, 30, 40) and latest < last_logged < STEPS
    state_file = workdir / "checkpoints" / str(latest) / "data_iterator" / "process_0-of-1.json"
    assert json.loads(state_file.read_text())["next_step"] == latest
    resumed = run_main(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint step {latest}" in resumed.stderr
    # The same settings, tuple-valued ones (random_erasing_area) included: no false alarm.
    assert "input settings differ" not in resumed.stderr
    arrays = final_arrays(workdir)
    assert set(arrays) == {"model", "optimizer", "ema"}
    assert_bitwise_equal(arrays, final_arrays(stream_reference_run))
    reference = json.loads((stream_reference_run / "eval_results.json").read_text())
    assert {"top1", "ema_top1", "ema_loss"} <= set(reference)
    assert json.loads((workdir / "eval_results.json").read_text()) == reference


def pack_run(cwd, archive, *workdirs):
    return subprocess.run(
        ["bash", ROOT / "scripts" / "pack_run.sh", archive, *workdirs],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sigterm_saves_at_the_next_step_then_the_packed_run_resumes_exactly_elsewhere(
    reference_run, toy_folder, tmp_path
):
    workdir = tmp_path / "preempted"
    refused = []
    _, stderr, returncode = start_and_stop_at(
        main_args(workdir, toy_folder),
        workdir,
        25,
        signal.SIGTERM,
        while_frozen=lambda pid: refused.append(pack_run(tmp_path, "held.tgz", "preempted")),
    )
    # 128 + SIGTERM: "stopped, not finished" to schedulers that restart failed jobs.
    assert returncode == 143, stderr[-3000:]
    match = re.search(
        r"SIGTERM received: saved a checkpoint at step (\d+) in (\S+) and stopped", stderr
    )
    assert match, stderr[-3000:]
    stopped_at = int(match.group(1))
    assert 25 <= stopped_at < STEPS
    kept = checkpointing.complete_steps(workdir)
    assert len(kept) >= 2 and kept[-1] == stopped_at  # 20 (or later ones) and the stop's
    # A run that holds its workdir is not packed.
    assert refused[0].returncode == 2 and "stop it with SIGTERM" in refused[0].stderr
    assert not (tmp_path / "held.tgz").exists()

    packed = pack_run(tmp_path, "moved/run.tgz", "preempted/")
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout.startswith(f"preempted: step {stopped_at}\n")
    # Another machine: another folder, the archive extracted there, the same command.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["tar", "-xzf", tmp_path / "moved" / "run.tgz"], cwd=elsewhere, check=True)
    moved = elsewhere / "preempted"
    assert checkpointing.complete_steps(moved) == [stopped_at]
    assert (moved / "config.json").read_text() == (workdir / "config.json").read_text()
    assert list(moved.glob("events.out.tfevents.*"))
    resumed = run_main(*main_args(moved, toy_folder))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from checkpoint step {stopped_at}" in resumed.stderr
    assert_bitwise_equal(final_arrays(moved), final_arrays(reference_run))


def test_rerunning_a_finished_run_trains_no_further(reference_run, toy_folder):
    before = final_arrays(reference_run)
    again = run_main(*main_args(reference_run, toy_folder))
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpointing.complete_steps(reference_run)[-1] == STEPS
    assert_bitwise_equal(final_arrays(reference_run), before)


def eval_args(workdir, toy_folder, *extra):
    return [
        "--config",
        "configs/smoke.py",
        "--mode=eval",
        "--workdir",
        str(workdir),
        f"--config.data_dir={toy_folder}",
        *extra,
    ]


def test_eval_mode_on_one_device_without_optimizer_state(reference_run, toy_folder, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(reference_run, workdir)
    (workdir / "eval_results.json").unlink()
    for step in checkpointing.complete_steps(
        workdir
    ):  # Evaluation must not need the optimizer state.
        shutil.rmtree(workdir / "checkpoints" / str(step) / "optimizer")
    result = run_main(*eval_args(workdir, toy_folder), devices=1)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    written = json.loads((workdir / "evaluations" / f"step_{STEPS}.json").read_text())
    assert printed == written
    reference = json.loads((reference_run / "eval_results.json").read_text())
    assert written["step"] == STEPS and written["num_examples"] == 63
    assert written["top1"] == reference["top1"] and written["top5"] == reference["top5"]
    assert written["loss"] == pytest.approx(reference["loss"], rel=1e-4)


def test_evaluating_an_image_folder_leaves_tensorflow_unloaded(reference_run, toy_folder, tmp_path):
    # TensorFlow (5-6 s to import on these cores) serves tfds datasets and training's
    # TensorBoard writer; main's evaluation of an image folder has no use for it.
    workdir = tmp_path / "copy"
    shutil.copytree(reference_run, workdir)
    program = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('resnet_jax.main', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('tensorflow loaded:', 'tensorflow' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, *eval_args(workdir, toy_folder)],
        cwd=ROOT,
        env=main_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == STEPS
    assert result.stderr.strip().splitlines()[-1] == "tensorflow loaded: False"


def test_eval_checkpoint_selects_a_step(reference_run, toy_folder, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(reference_run, workdir)
    steps = checkpointing.complete_steps(workdir)
    # Saved: 20, 30 (evaluated), 40, 60 (evaluated). Kept: the latest 2, and the best by
    # eval top-1 (on a tie the newer step is the best, as Orbax's BestN sorts stably).
    top1 = logged_eval_top1(reference_run)
    assert sorted(top1) == [30, 60]
    assert steps == ([30, 40, 60] if top1[30] > top1[60] else [40, 60])
    assert (
        checkpointing.select_step(checkpointing.create_manager(workdir, read_only=True), "best")
        == max((top1[s], s) for s in top1)[1]
    )
    final = (workdir / "eval_results.json").read_text()
    result = run_main(*eval_args(workdir, toy_folder, f"--config.eval_checkpoint={steps[0]}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == steps[0]
    # Each evaluation is kept apart; the training run's final result is left as it was.
    assert (
        json.loads((workdir / "evaluations" / f"step_{steps[0]}.json").read_text())["step"]
        == (steps[0])
    )
    assert (workdir / "eval_results.json").read_text() == final
    missing = run_main(*eval_args(workdir, toy_folder, "--config.eval_checkpoint=7"))
    assert missing.returncode == 1
    assert f"No checkpoint step 7 in {workdir / 'checkpoints'}. Available steps: {steps}" in (
        missing.stderr
    )
    # A run folder the evaluation cannot write to (here a file in the way of evaluations/;
    # a read-only folder for a user, which root ignores): the result is printed all the same.
    shutil.rmtree(workdir / "evaluations")
    (workdir / "evaluations").write_text("in the way")
    result = run_main(*eval_args(workdir, toy_folder, f"--config.eval_checkpoint={steps[0]}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == steps[0]
    assert "The evaluation is printed only: not saved: cannot write" in result.stderr


# In-process tests of the checkpoint module on a tiny state.


@pytest.fixture(scope="module")
def state_and_config():
    config = smoke.get_config()
    state, _ = tiny_state(config, sharding.make_mesh(), num_classes=3)
    return config, state


def save_steps(workdir, config, state, steps, metrics=None, keep=3):
    manager = checkpointing.create_manager(workdir, keep)
    for i, step in enumerate(steps):
        state_at = state.replace(
            step=jnp.asarray(step, jnp.int32),
            params=jax.tree.map(lambda p, s=step: p + s, state.params),
        )
        checkpointing.save(
            manager,
            state_at,
            config,
            {"data": {"seed": 0}},
            None if metrics is None else metrics[i],
        )
    manager.wait_until_finished()
    return manager


def test_keeps_the_latest_n_plus_the_best(state_and_config, tmp_path):
    config, state = state_and_config
    top1 = [0.5, 0.9, 0.6, 0.7, 0.65]
    manager = save_steps(
        tmp_path, config, state, [1, 2, 3, 4, 5], [{"top1": t} for t in top1], keep=2
    )
    assert manager.all_steps() == [2, 4, 5]
    assert checkpointing.select_step(manager, "best") == 2
    assert checkpointing.select_step(manager, "latest") == 5


def corrupt_arrays(step_dir):
    for path in (step_dir / "model").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * 10)


def test_resume_skips_a_corrupt_latest_step_with_a_warning(state_and_config, tmp_path, caplog):
    config, state = state_and_config
    save_steps(tmp_path, config, state, [10, 20])
    corrupt_arrays(tmp_path / "checkpoints" / "20")
    # A save that was cut short leaves only Orbax's temporary folder: never a step.
    (tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1").mkdir()
    manager = checkpointing.create_manager(tmp_path)
    assert manager.all_steps() == [10, 20]
    with caplog.at_level("WARNING"):
        restored, meta = checkpointing.restore_for_resume(manager, state)
    assert int(restored.step) == 10 and meta["step"] == 10
    np.testing.assert_array_equal(
        restored.params["fc"]["bias"], np.asarray(state.params["fc"]["bias"]) + 10
    )
    assert "Checkpoint step 20" in caplog.text and "is corrupt" in caplog.text
    assert manager.all_steps() == [10]
    assert (tmp_path / "corrupt_checkpoints" / "20" / "model").is_dir()  # Kept, not deleted.


def test_readable_but_altered_arrays_fail_the_fingerprint(state_and_config, tmp_path):
    config, state = state_and_config
    manager = save_steps(tmp_path / "a", config, state, [10])
    # Another run's step 10: arrays of the same shapes, other values, perfectly readable.
    save_steps(
        tmp_path / "b",
        config,
        state.replace(params=jax.tree.map(lambda p: p + 7, state.params)),
        [10],
    )
    model_dir = tmp_path / "a" / "checkpoints" / "10" / "model"
    shutil.rmtree(model_dir)
    shutil.copytree(tmp_path / "b" / "checkpoints" / "10" / "model", model_dir)
    altered = ocp.StandardCheckpointer().restore(model_dir)  # Readable...
    assert not np.array_equal(altered["params"]["fc"]["bias"], state.params["fc"]["bias"] + 10)
    with pytest.raises(checkpointing.CorruptCheckpointError, match="model arrays differ") as e:
        checkpointing.restore(
            manager, 10, {"model": checkpointing.model_tree(state)}
        )  # ...but refused.
    assert e.value.proven


def test_eval_of_a_corrupt_step_is_a_clear_error(state_and_config, tmp_path, toy_folder):
    config, state = state_and_config
    save_steps(tmp_path, config, state, [10, 20])
    corrupt_arrays(tmp_path / "checkpoints" / "20")
    config = config.copy_and_resolve_references()
    config.data_dir = str(toy_folder)
    with pytest.raises(
        checkpointing.UnusableStepError, match=r"Checkpoint step 20 in .* is corrupt: .*\[10\]"
    ) as raised:
        evaluate.evaluate_checkpoint(config, str(tmp_path))
    # The command adds its own way of choosing a step (main: --config.eval_checkpoint).
    assert str(raised.value.with_flag("--config.eval_checkpoint=STEP")).endswith(
        "Use another step with --config.eval_checkpoint=STEP (available: [10])."
    )


def test_a_checkpoint_of_another_model_names_the_mismatching_parameters(
    state_and_config, tmp_path, toy_folder
):
    config, state = state_and_config
    save_steps(tmp_path, config, state, [10])
    config = config.copy_and_resolve_references()
    config.data_dir = str(toy_folder)
    config.model.num_classes = 7
    with pytest.raises(checkpointing.CheckpointError) as error:
        evaluate.evaluate_checkpoint(config, str(tmp_path))
    message = str(error.value)
    assert "does not fit the configured model" in message
    assert "fc/kernel: checkpoint [16, 3] vs model [16, 7]" in message
    assert "fc/bias: checkpoint [3] vs model [7]" in message
    config.model.num_classes = None
    config.model.name = "resnet14"
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"params/layer1_1/conv1/kernel: checkpoint missing vs model \[3, 3, 4, 4\]",
    ):
        evaluate.evaluate_checkpoint(config, str(tmp_path))


def test_resume_with_another_optimizer_is_an_error_that_moves_nothing(state_and_config, tmp_path):
    config, state = state_and_config
    manager = save_steps(tmp_path, config, state, [10, 20])
    no_momentum = config.copy_and_resolve_references()
    no_momentum.momentum = 0.0
    other, _ = tiny_state(no_momentum, sharding.make_mesh(), num_classes=3)
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"(?s)does not fit the configured optimizer. It was written with momentum=0.9.*"
        r"opt_state.* vs optimizer missing",
    ):
        checkpointing.restore_for_resume(manager, other)
    assert manager.all_steps() == [10, 20]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_when_no_step_can_be_read_nothing_is_moved(state_and_config, tmp_path):
    config, state = state_and_config
    save_steps(tmp_path, config, state, [10, 20])
    for step in (10, 20):  # Both unreadable: nothing shows the fault is the steps' own.
        corrupt_arrays(tmp_path / "checkpoints" / str(step))
    manager = checkpointing.create_manager(tmp_path)
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"(?s)No checkpoint in .* could be restored:.*step 20: its arrays cannot be read"
        r".*step 10: .*Nothing was moved or deleted",
    ):
        checkpointing.restore_for_resume(manager, state)
    assert manager.all_steps() == [10, 20]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_resume_with_another_model_is_an_error_not_a_fallback(state_and_config, tmp_path):
    config, state = state_and_config
    manager = save_steps(tmp_path, config, state, [10])
    other, _ = tiny_state(config, sharding.make_mesh(), num_classes=5)
    with pytest.raises(
        checkpointing.CheckpointError, match=r"fc/kernel: checkpoint \[16, 3\] vs model \[16, 5\]"
    ):
        checkpointing.restore_for_resume(manager, other)
    assert manager.all_steps() == [10]  # Not moved aside: it is not corrupt.


def test_eval_without_a_checkpoint_says_so(tmp_path, toy_folder):
    config = smoke.get_config()
    config.data_dir = str(toy_folder)
    with pytest.raises(checkpointing.CheckpointError, match=r"No checkpoint in .*Train first"):
        evaluate.evaluate_checkpoint(config, str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(checkpointing.CheckpointError, match=r"No checkpoint in .*Train first"):
        evaluate.evaluate_checkpoint(config, str(tmp_path))


def test_a_checkpoint_holds_what_resuming_needs(reference_run):
    meta_dir = reference_run / "checkpoints" / str(STEPS) / "meta"
    meta = json.loads(next(meta_dir.glob("*")).read_text())
    assert meta["step"] == STEPS
    assert meta["config"]["model"]["name"] == "resnet8"
    assert meta["rng"] == {"seed": 0, "step": STEPS}
    assert meta["data"]["steps_per_epoch"] == 6 and meta["data"]["global_batch_size"] == 32
    assert meta["topology"] == {"processes": 1, "devices": 4}
    assert meta["schedule"] == {
        "lr_schedule": "cosine",
        "learning_rate": 0.1,
        "warmup_steps": 0,
        "num_train_steps": STEPS,
    }
    assert "opt_state/1/0/.trace/fc/kernel" in meta["optimizer_shapes"]
    arrays = final_arrays(reference_run)
    assert set(arrays["model"]) == {"params", "batch_stats"}
    assert int(arrays["optimizer"]["step"]) == STEPS

    # SGD's momentum: one buffer per parameter, of its shape, moved by the training.
    def names(path):
        return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    params = {
        names(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(arrays["model"]["params"])[0]
    }
    momentum = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(arrays["optimizer"]["opt_state"])[0]:
        keys = names(path)
        if "trace" in keys:
            momentum[keys[keys.index("trace") + 1 :]] = leaf
    assert sorted(momentum) == sorted(params) and len(params) > 10
    assert all(momentum[k].shape == params[k].shape for k in params)
    assert all(np.abs(momentum[k]).max() > 0 for k in params)


def test_a_resume_that_would_change_the_schedule_is_refused_unless_allowed(toy_folder, tmp_path):
    config = smoke.get_config()
    config.data_dir = str(toy_folder)
    config.num_train_steps, config.eval_every_steps = 8, 8
    train.train_and_evaluate(config, str(tmp_path))
    longer = config.copy_and_resolve_references()
    longer.num_train_steps = 16  # Would re-stretch the cosine from step 8 on.
    with pytest.raises(
        config_checks.ConfigError,
        match=r"at step 8 .* with num_train_steps 8 -> 16 would change the learning-rate "
        r"schedule .*--config.num_train_steps=8, .*--config.allow_schedule_change=True",
    ):
        train.train_and_evaluate(longer, str(tmp_path))
    assert checkpointing.complete_steps(tmp_path) == [8]
    longer.allow_schedule_change = True
    assert train.train_and_evaluate(longer, str(tmp_path))["step"] == 16


@pytest.fixture(scope="module")
def epoch_run(toy_folder, tmp_path_factory):
    """One epoch of the smoke config (6 steps of 32) on the toy folder: a budget in epochs."""
    workdir = tmp_path_factory.mktemp("epoch")
    config = smoke.get_config()
    config.data_dir = str(toy_folder)
    config.num_train_steps, config.num_epochs = -1, 1.0
    assert train.train_and_evaluate(config, str(workdir))["step"] == 6
    return workdir, config


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error")]


def test_a_resume_with_another_batch_size_is_refused_naming_it(epoch_run, toy_folder):
    workdir, _ = epoch_run
    result = run_main(
        "--config",
        "configs/smoke.py",
        "--workdir",
        workdir,
        f"--config.data_dir={toy_folder}",
        "--config.num_train_steps=-1",
        "--config.num_epochs=1",
        "--config.batch_size=16",
    )
    assert result.returncode == 1
    # Half the batch, twice the steps per epoch: a budget in epochs is twice the steps.
    assert error_lines(result) == [
        f"error: Resuming the checkpoint at step 6 in {workdir / 'checkpoints'} with "
        "batch_size 32 -> 16 (which changes the steps per epoch, 6 -> 12) would change the "
        "learning-rate schedule (num_train_steps 6 -> 12), so the rate would jump there. "
        "Rerun with --config.batch_size=32, use a new --workdir, or pass "
        "--config.allow_schedule_change=True to continue on the new schedule."
    ]
    assert "input settings differ" not in result.stderr and "Traceback" not in result.stderr
    assert checkpointing.complete_steps(workdir) == [6]


def test_an_allowed_resume_warns_naming_only_what_changed(epoch_run, caplog):
    workdir, config = epoch_run
    manager = checkpointing.create_manager(workdir, read_only=True)
    meta = checkpointing.read_meta(manager, 6)
    halved = config.copy_and_resolve_references()
    halved.batch_size, halved.allow_schedule_change = 16, True
    run_meta = {
        "data": {**meta["data"], "global_batch_size": 16, "steps_per_epoch": 12},
        "schedule": {**meta["schedule"], "num_train_steps": 12},
    }
    state, _ = tiny_state(config, sharding.make_mesh(), num_classes=3)
    with caplog.at_level("WARNING"):
        state, same_data = checkpointing.resume(manager, state, run_meta, halved)
    assert int(state.step) == 6 and not same_data
    assert [r.getMessage() for r in caplog.records if r.pathname == checkpointing.__file__] == [
        "Continuing from step 6 on a changed learning-rate schedule (num_train_steps 6 -> 12).",
        "The input settings differ from those of the checkpoint at step 6 "
        "(global_batch_size 32 -> 16, steps_per_epoch 6 -> 12): training continues, "
        "but not with the batches an uninterrupted run would see.",
    ]
    # No config key changed the schedule, the data did (twice the examples): it says so.
    grown = {
        "data": {**meta["data"], "num_examples": 384, "steps_per_epoch": 12},
        "schedule": run_meta["schedule"],
    }
    with pytest.raises(
        config_checks.ConfigError,
        match=r"would change the learning-rate schedule \(num_train_steps 6 -> 12\), so the "
        r"rate would jump there; the input settings changed \(num_examples 192 -> 384, "
        r"steps_per_epoch 6 -> 12\)\. Resume with the run's data",
    ):
        checkpointing.resume(manager, state, grown, config)


def test_a_resume_on_another_topology_or_from_an_older_record(epoch_run, caplog, monkeypatch):
    """What `resume` says about the data order, from the checkpoint's records."""
    workdir, config = epoch_run
    manager = checkpointing.create_manager(workdir, read_only=True)
    meta = checkpointing.read_meta(manager, 6)
    run_meta = {key: meta[key] for key in ("data", "schedule", "topology")}
    state, _ = tiny_state(config, sharding.make_mesh(), num_classes=3)

    def resumed_from(saved):
        monkeypatch.setattr(checkpointing, "restore_for_resume", lambda _, s: (s, saved))
        caplog.clear()
        with caplog.at_level("INFO"):
            _, same_data = checkpointing.resume(manager, state, run_meta, config)
        lines = [r.getMessage() for r in caplog.records if r.pathname == checkpointing.__file__]
        return same_data, lines

    # Written by 2 processes of 2 devices: the same batches, and one info line.
    same_data, lines = resumed_from({**meta, "topology": {"processes": 2, "devices": 4}})
    assert same_data and lines == [
        "Resuming step 6, saved by 2 processes, 4 devices, on 1 process, 4 devices: the data "
        "order is unaffected (it depends on the seed, the step and the global batch only)."
    ]
    # One process's record from before the order became global: its batches are today's.
    old = {k: v for k, v in meta["data"].items() if k != "global_batch_size"}
    single = {**old, "process_count": 1, "per_process_batch_size": 32}
    same_data, lines = resumed_from({**meta, "data": single})
    assert same_data and lines == []
    # Two processes' record from then: other batches, said in one line.
    double = {**old, "process_count": 2, "per_process_batch_size": 16}
    same_data, lines = resumed_from({**meta, "data": double})
    assert not same_data and lines == [
        "The checkpoint at step 6 was written by 2 processes before the data order became "
        "global (the same on any number of processes): training continues, but not with the "
        "batches an uninterrupted run of that version would have seen."
    ]


def test_eval_with_a_config_of_another_dataset_names_both_and_the_runs_own(epoch_run, toy_folder):
    workdir, _ = epoch_run
    result = run_main("--config", "configs/resnet18.py", "--workdir", workdir, "--mode=eval")
    assert result.returncode == 1
    # Said before opening cifar100, which is not there to open (nor to download).
    assert error_lines(result) == [
        f"error: the checkpoint at step 6 in {workdir} was trained on image_folder "
        f"({toy_folder}), but the config asks for cifar100: pass the config the run was "
        f"trained with, --config configs/from_workdir.py:{workdir} (its config.json; add "
        "--config.data_dir=PATH if the data moved)."
    ]
    assert "Traceback" not in result.stderr
    # The config it points to is the run's: its dataset and data.
    own = defaults.from_workdir(str(workdir))
    assert (own.dataset, own.data_dir) == ("image_folder", str(toy_folder))

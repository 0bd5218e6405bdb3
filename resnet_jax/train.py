"""The training loop: start or resume, step, log, evaluate, checkpoint, stop on SIGTERM.

`train_and_evaluate` opens the input, builds the state and the compiled steps
(`resnet_jax.steps`), resumes from the newest readable checkpoint, and runs the loop.
With several processes the loop runs nothing eagerly on arrays that span them: the
steps carry their metrics, the host reads them with `jax.device_get` (a local copy of a
replicated value, no communication), and one step finishes feeding the next, so at most
one program with cross-process collectives is in flight at a time.
"""

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from resnet_jax import (
    checkpointing,
    compile_cache,
    config_checks,
    data,
    evaluate,
    progress,
    sharding,
    steps,
    workdir_claim,
)
from resnet_jax.data import augment
from resnet_jax.models import create_model

# 128 + SIGTERM, as a shell reports it: non-zero, so whatever restarts failed jobs reruns it.
PREEMPTED_EXIT_STATUS = 128 + int(signal.SIGTERM)


def _check_finite(first: int, last_step: int) -> None:
    """Raises FloatingPointError if `first` (a first non-finite step) names a step."""
    if first != steps.NO_STEP:
        raise FloatingPointError(
            f"Training diverged: the loss was not finite at step {first} (reported at step "
            f"{last_step}). Lower --config.learning_rate, add warmup with "
            "--config.warmup_epochs, or check the input data."
        )


class _StopRequest:
    """Notes a SIGTERM (what a preempted Cloud TPU VM gets) so the loop can stop cleanly.

    The handler only sets a flag: the loop checks it at each step boundary, saves and
    returns. With several processes, jax's preemption service (started by
    `jax.distributed.initialize`) catches the signal, and Orbax's `reached_preemption`
    makes every process agree on the step to stop at.
    """

    def __init__(self, manager: Any):
        self.received = False
        self._manager = manager
        self._previous = None

    def __enter__(self) -> "_StopRequest":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self._manager.reached_preemption(step)
        return self.received


def _data_settings(
    config: ml_collections.ConfigDict,
    inputs: data.Input,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """What decides the order and content of the training batches (besides the step).

    Not the topology: the batches are the same on any number of processes and devices
    (the run's "topology" record says which it ran on).

    The run's one record of its data settings: saved with each step as "data" and
    compared on resume by `checkpointing.resume`. The train step's augmentations are
    recorded only when one is on, so that checkpoints of runs without them keep the
    record they always had. The record is in its saved (JSON) form, tuples as lists, so
    that it compares equal to the one a checkpoint gives back.
    """
    augmentation = augment.Settings.from_config(config)
    extra = {"augmentation": dataclasses.asdict(augmentation)} if augmentation.active else {}
    if inputs.mode == "stream" and config.augment == "random_resized_crop":
        # The decoder changes the pixels of the Inception crop (not the crop drawn). PIL's
        # pixels are those of the runs from before the setting, whose record lacks it.
        if config.stream_decoder != "pil":
            extra["stream_decoder"] = config.stream_decoder
    record = {
        "dataset": config.dataset,
        "split": config.train_split,
        "input": inputs.mode,
        "image_size": config.image_size,
        "augment": config.augment,
        "num_examples": inputs.train.num_examples,
        "global_batch_size": config.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "seed": config.seed,
        "crop_padding": config.crop_padding,
        "random_flip": config.random_flip,
        **extra,
    }
    return json.loads(json.dumps(record))


def _remove_if_empty(folders: list) -> None:
    """Removes `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # Not empty: the run wrote something.
            return


def _claim(workdir, cleanup: contextlib.ExitStack) -> None:
    """Takes the workdir for this run (process 0 for all), released when the run ends.

    Raises:
      workdir_claim.WorkdirError: another live run holds it, or it cannot be written.
    """
    claim = workdir_claim.Claim(workdir, jax.process_index(), jax.process_count())
    problem = ""
    if jax.process_index() == 0:
        try:
            claim.take()
        except workdir_claim.WorkdirError as e:
            problem = str(e)
        else:
            cleanup.callback(claim.release)
            if claim.took_over:
                logging.warning(
                    "Took over the claim on %s left by an earlier run: %s.",
                    workdir,
                    claim.took_over,
                )
    if jax.process_count() > 1:
        # Every process learns process 0's outcome before any of them writes.
        failed = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
        if failed and not problem:
            problem = f"process 0 could not claim {workdir} (its output says why)."
    if problem:
        raise workdir_claim.WorkdirError(problem)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, evaluates periodically and at the end.

    The starting state is the newest readable checkpoint in `workdir/checkpoints`, else
    a fresh initialisation from `config.seed` (`checkpointing.resume` gives the order and
    the checks). A SIGTERM saves a checkpoint at the next step boundary and returns early.

    Returns:
      The final evaluation (also written to `workdir/eval_results.json`), or
      {"preempted": True, "step": N} after a SIGTERM.
    """
    with contextlib.ExitStack() as cleanup:  # Stops the stream's workers, however it ends.
        try:
            return _train_and_evaluate(config, workdir, cleanup)
        except Exception as e:
            # The first failed write (a checkpoint, an event file, a JSON) on a full or
            # read-only disk ends the run with one line; checkpoints in flight stay unfinished.
            reason = checkpointing.storage_failure(e)
            if reason is None:
                raise
            absolute = checkpointing.absolute_workdir(workdir)
            raise workdir_claim.WorkdirError(
                checkpointing.storage_error_message(absolute, reason)
            ) from None


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    started = time.perf_counter()
    shown_workdir = workdir.rstrip("/")  # As the user typed it, for the closing line.
    workdir = checkpointing.absolute_workdir(workdir)
    if jax.process_index() == 0 and str(workdir).startswith("/"):
        # A run that stops before writing anything (say, a dataset it cannot download)
        # leaves no empty folder behind; runs after the claim's release (a LIFO stack).
        created = [folder for folder in (workdir, *workdir.parents) if not folder.exists()]
        cleanup.callback(_remove_if_empty, created)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise workdir_claim.WorkdirError(
            f"cannot create {workdir} ({e.strerror or e}): choose a folder you can write, "
            "or fix its permissions, then rerun."
        ) from None
    _claim(workdir, cleanup)
    mesh = sharding.make_mesh()
    # Both batch sizes are checked here, before any step: a bad eval batch size must not
    # wait for the first evaluation, hours in, to fail.
    local_batch = sharding.per_process_batch_size(config.batch_size, mesh)
    sharding.per_process_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    logging.info("Opening %s's training and evaluation data ...", config.dataset)
    inputs = data.open_input(config, mesh)
    cleanup.callback(inputs.close)  # The evaluations' workers, kept between them.
    num_classes = config_checks.resolve_num_classes(config, inputs.train.num_classes)
    steps_per_epoch = inputs.steps_per_epoch(config.batch_size)
    num_steps = config.num_train_steps
    if num_steps <= 0:
        num_steps = max(1, int(config.num_epochs * steps_per_epoch))
    learning_rate_fn = steps.create_learning_rate_fn(config, steps_per_epoch, num_steps)
    model = create_model(config.model, num_classes, config.half_precision)
    tx = steps.create_optimizer(config, learning_rate_fn)
    state = steps.create_train_state(config, model, tx, mesh)
    train_step_fn = steps.compile_train_step(config, learning_rate_fn, mesh)
    eval_step_fn = steps.compile_eval_step(mesh, config)
    manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
    # What each checkpoint's metadata records about the run besides its config.
    run_meta = {
        "data": _data_settings(config, inputs, steps_per_epoch),
        # Where it ran: a resume on another topology continues the same batches.
        "topology": {"processes": jax.process_count(), "devices": mesh.devices.size},
        "schedule": steps.schedule_settings(config, steps_per_epoch, num_steps),
        # For predict: what each output means and how an image file becomes an input.
        "class_names": list(inputs.class_names),
        "preprocessing": data.preprocessing(config),
    }
    state, same_data = checkpointing.resume(manager, state, run_meta, config)
    start_step = int(state.step)

    # A recipe that fixes num_train_steps (the paper's 64k) ignores num_epochs: say so.
    budget = ""
    if config.num_train_steps > 0:
        budget = "; num_train_steps sets the budget, num_epochs is not used"
    logging.info(
        "Training %s on %s: %d examples, %d classes, steps %d to %d (%d per epoch, %.1f "
        "epochs%s), global batch %d over %d devices in %d processes, %s input.",
        config.model.name,
        config.dataset,
        inputs.train.num_examples,
        num_classes,
        start_step,
        num_steps,
        steps_per_epoch,
        num_steps / steps_per_epoch,
        budget,
        config.batch_size,
        mesh.devices.size,
        jax.process_count(),
        inputs.mode,
    )
    for warning in steps.schedule_warnings(run_meta["schedule"], num_steps):
        logging.warning(warning)
    evaluate.write_json(workdir / "config.json", config.to_dict())
    # TensorBoard only: the loop logs its own one line per log step (resnet_jax.progress)
    # where the default writer's logging part would print one line per scalar group.
    writer = metric_writers.AsyncMultiWriter(
        [metric_writers.SummaryWriter(str(workdir))] if jax.process_index() == 0 else []
    )
    hooks = [
        periodic_actions.ReportProgress(
            num_train_steps=num_steps, writer=writer, every_steps=config.log_every_steps
        )
    ]
    if config.profile_num_steps and jax.process_index() == 0:
        # Profiles steps 10 to 10 + profile_num_steps (TensorBoard's profile tab); a step
        # count alone, so short runs get their trace too.
        hooks.append(
            periodic_actions.Profile(
                logdir=workdir,
                num_profile_steps=config.profile_num_steps,
                profile_duration_ms=None,
            )
        )

    batches = inputs.train_batches(local_batch, start_step)
    cleanup.callback(batches.close)
    saved_iterator = batches.checkpointable
    if saved_iterator is not None and same_data:
        # The stream's saved state (its next step): the same batches as start_step gives.
        checkpointing.restore_data_iterator(manager, start_step, saved_iterator)

    train_metrics = steps.empty_metrics(steps.TrainMetrics, mesh)

    def save(eval_results: dict[str, Any] | None = None) -> None:
        # Never save a diverged state: check the steps not yet logged first.
        first = jax.device_get(train_metrics.first_nonfinite_step.step)
        _check_finite(int(first), int(state.step))
        checkpointing.save(manager, state, config, run_meta, eval_results, saved_iterator)

    wait_each_step = sharding.host_waits_for_each_step()
    eval_results: dict[str, Any] = {}
    pace = progress.TrainProgress(start_step, num_steps, config.batch_size)
    if start_step < num_steps:
        logging.info("Compiling the train step (step %d waits for it) ...", start_step + 1)
    with _StopRequest(manager) as stop_requested:
        for step in range(start_step + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(batches)
                if wait_each_step:
                    jax.block_until_ready(state)
                state, train_metrics = train_step_fn(state, train_metrics, batch)
            if step == start_step + 1:  # Input, initialisation and compilation are behind.
                jax.block_until_ready(state)
                pace.first_step_done(step)
                logging.info(
                    "Step %d done %.1f s after the run started (%s).",
                    step,
                    time.perf_counter() - started,
                    compile_cache.summary(),
                )
            for hook in hooks:
                hook(step)
            last = step == num_steps
            if step % config.log_every_steps == 0 or last:
                values = steps.read_metrics(train_metrics)
                _check_finite(values["first_nonfinite_step"], step)
                del values["first_nonfinite_step"]
                rate = pace.images_per_second(step)
                logging.info(pace.line(step, values, rate))
                scalars = {f"train_{k}": v for k, v in values.items()}
                scalars["train_examples_per_sec"] = rate
                writer.write_scalars(step, scalars)
                train_metrics = steps.empty_metrics(steps.TrainMetrics, mesh)
            evaluated = step % config.eval_every_steps == 0 or last
            if evaluated:
                eval_started = time.perf_counter()
                eval_results = evaluate.evaluate(eval_step_fn, state, inputs, config, mesh)
                logging.info(
                    progress.eval_line(step, eval_results, time.perf_counter() - eval_started)
                )
                writer.write_scalars(step, {f"eval_{k}": v for k, v in eval_results.items()})
                eval_results["step"] = step
            # Saving at each evaluation lets "keep the best by eval top-1" see every score.
            saved = step % config.checkpoint_every_steps == 0 or evaluated or last
            if saved:
                save(eval_results if evaluated else None)
            if not last and stop_requested(step):
                if not saved:
                    save()
                manager.wait_until_finished()
                writer.flush()
                logging.warning(
                    "SIGTERM received: saved a checkpoint at step %d in %s and stopped "
                    "(exit status %d). Rerun the same command to resume.",
                    step,
                    manager.directory,
                    PREEMPTED_EXIT_STATUS,
                )
                return {"preempted": True, "step": step}
    manager.wait_until_finished()
    writer.flush()
    if not eval_results:  # Already trained to the end: evaluate what there is.
        eval_results = evaluate.evaluate(eval_step_fn, state, inputs, config, mesh)
        eval_results["step"] = int(state.step)
    eval_results.update(model=config.model.name, dataset=config.dataset)
    evaluate.write_json(workdir / "eval_results.json", eval_results)
    logging.info("Final evaluation: %s", evaluate.rounded(eval_results))
    logging.info(progress.closing_line(shown_workdir, eval_results, time.perf_counter() - started))
    return eval_results

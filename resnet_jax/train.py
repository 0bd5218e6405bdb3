"""Training and evaluation: pure step functions, and the loop that drives them.

`train_step` and `eval_step` are module-level pure functions; `train_and_evaluate` binds
the config into them with `functools.partial`, compiles them once with `jax.jit` over a
mesh of every device (batch sharded, state replicated, state donated) and runs the loop.

With several processes every operation on arrays that span them is a program that all
processes must run in the same order. So the loop runs nothing eagerly on such arrays:
each step merges its metrics into a running collection that it carries (as does each
eval step), the host reads that collection with `jax.device_get` (a local copy of a
replicated value, no communication), and one step finishes feeding the next, so at most
one program with cross-process collectives is in flight at a time.
"""

import contextlib
import functools
import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from etils import epath
from flax.training import train_state

from resnet_jax import checkpointing, compile_options, config_checks, data, sharding
from resnet_jax.models import create_model

_NO_STEP = np.iinfo(np.int32).max
# --mode=eval writes WORKDIR/evaluations/step_<N>.json: one file per evaluated step.
EVALUATIONS_DIR = "evaluations"
# Exit status of a run stopped by SIGTERM after saving: 128 + SIGTERM, what a shell reports
# for a process that SIGTERM ended. Schedulers read non-zero as "not finished": Kubernetes
# (restartPolicy OnFailure), systemd (Restart=on-failure) and SLURM job scripts rerun it.
PREEMPTED_EXIT_STATUS = 128 + int(signal.SIGTERM)


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the BatchNorm running statistics."""

    batch_stats: Any


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
    """The first step whose loss was NaN or infinite (`_NO_STEP` if none), kept on device."""

    step: jnp.ndarray

    @classmethod
    def from_model_output(cls, *, loss: jnp.ndarray, step: jnp.ndarray, **_) -> "FirstNonFinite":
        return cls(step=jnp.where(jnp.isfinite(loss), _NO_STEP, step).astype(jnp.int32))

    def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
        return type(self)(step=jnp.minimum(self.step, other.step))

    def compute(self) -> jnp.ndarray:
        return self.step

    @classmethod
    def empty(cls) -> "FirstNonFinite":
        return cls(step=jnp.array(_NO_STEP, jnp.int32))


@flax.struct.dataclass
class NumExamples(metrics.Metric):
    """How many examples the (masked) batches held."""

    count: jnp.ndarray

    @classmethod
    def from_model_output(cls, *, mask: jnp.ndarray, **_) -> "NumExamples":
        return cls(count=mask.sum().astype(jnp.int32))

    def merge(self, other: "NumExamples") -> "NumExamples":
        return type(self)(count=self.count + other.count)

    def compute(self) -> jnp.ndarray:
        return self.count

    @classmethod
    def empty(cls) -> "NumExamples":
        return cls(count=jnp.array(0, jnp.int32))


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    first_nonfinite_step: FirstNonFinite


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    num_examples: NumExamples


def _accuracies(logits: jnp.ndarray, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-example top-1 and top-5 hits (top-k with k = number of classes if fewer than 5)."""
    top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    _, top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    top5 = (top_k == labels[:, None]).any(-1).astype(jnp.float32)
    return top1, top5


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(
    state: TrainState,
    metrics: TrainMetrics,
    batch: dict[str, jnp.ndarray],
    *,
    learning_rate_fn: optax.Schedule,
    label_smoothing: float,
) -> tuple[TrainState, TrainMetrics]:
    """One SGD step on a global batch; BatchNorm statistics are those of the whole batch.

    Returns the new state and `metrics` merged with this step's.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    top1, top5 = _accuracies(logits, batch["label"])
    step_metrics = TrainMetrics.single_from_model_output(
        loss=loss,
        top1=top1,
        top5=top5,
        learning_rate=learning_rate_fn(state.step),
        step=state.step + 1,
    )
    return new_state, metrics.merge(step_metrics)


def eval_step(
    state: TrainState, metrics: EvalMetrics, batch: dict[str, jnp.ndarray]
) -> EvalMetrics:
    """`metrics` merged with those of one padded batch; examples with mask False count nowhere."""
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    top1, top5 = _accuracies(logits, batch["label"])
    batch_metrics = EvalMetrics.single_from_model_output(
        loss=cross_entropy(logits, batch["label"]),
        top1=top1,
        top5=top5,
        mask=batch["mask"],
    )
    return metrics.merge(batch_metrics)


@functools.cache
def _empty_metrics_fn(cls: type[metrics.Collection], mesh: jax.sharding.Mesh) -> Callable:
    return jax.jit(cls.empty, out_shardings=sharding.replicated(mesh))


def empty_metrics(cls: type[metrics.Collection], mesh: jax.sharding.Mesh) -> Any:
    """An empty `cls` collection replicated over `mesh`, made by a compiled program."""
    return _empty_metrics_fn(cls, mesh)()


def read_metrics(collection: metrics.Collection) -> dict[str, float | int]:
    """Computes a replicated collection on this host: a local copy, no cross-process work."""
    return {k: np.asarray(v).item() for k, v in jax.device_get(collection).compute().items()}


def schedule_settings(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> dict[str, Any]:
    """Everything that decides the learning rate at each step, in steps.

    A checkpoint records it, so that a resume can tell whether the schedule changed.
    """
    settings = {
        "lr_schedule": config.lr_schedule,
        "learning_rate": config.learning_rate,
        "warmup_steps": int(round(config.warmup_epochs * steps_per_epoch)),
    }
    if config.lr_schedule == "cosine":
        settings["num_train_steps"] = num_train_steps
    elif config.lr_schedule in ("multistep", "piecewise"):
        if config.lr_schedule == "multistep":
            boundaries = [int(s) for s in config.lr_decay_steps]
        else:
            boundaries = [int(round(e * steps_per_epoch)) for e in config.lr_decay_epochs]
        settings.update(decay_steps=boundaries, decay_factor=config.lr_decay_factor)
    return settings


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_epochs`, then the configured schedule.

    Boundaries of "multistep" (steps) and "piecewise" (epochs) are absolute: they count
    from the start of training, warmup included. One that falls inside the warmup scales
    the rest of the warmup ramp too (the rate at step t is ramp(t) x decay(t)).
    """
    settings = schedule_settings(config, steps_per_epoch, num_train_steps)
    base, warmup = config.learning_rate, settings["warmup_steps"]
    if config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(base, max(1, num_train_steps - warmup))
    elif config.lr_schedule == "constant":
        main = optax.constant_schedule(base)
    else:
        decay = optax.piecewise_constant_schedule(
            base, {b: settings["decay_factor"] for b in settings["decay_steps"]}
        )
        if not warmup:
            return decay
        return lambda step: decay(step) * jnp.minimum(1.0, step / warmup)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as PyTorch's SGD does).

    Unless `weight_decay_all`, BatchNorm scales/biases and biases (every 1-D parameter)
    are not decayed.
    """

    def decay_mask(params):
        return jax.tree.map(lambda p: config.weight_decay_all or p.ndim > 1, params)

    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """Initialises parameters from `config.seed`, replicated over the mesh."""

    def init(rng):
        image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        variables = model.init(rng, image, train=False)
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
        )

    return jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.key(config.seed))


def with_normalized_images(step_fn: Callable, config: ml_collections.ConfigDict) -> Callable:
    """`step_fn(state, carry, batch)` fed uint8 images, normalised inside the compiled step."""
    mean, std = data.normalization(config)

    def step(state: Any, carry: Any, batch: dict[str, jnp.ndarray]) -> Any:
        return step_fn(state, carry, {**batch, "image": data.normalize(batch["image"], mean, std)})

    return step


def compile_eval_step(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> Callable:
    """The jitted eval step for `mesh` (batch sharded, state and metrics replicated)."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        with_normalized_images(eval_step, config),
        in_shardings=(replicated, replicated, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
        donate_argnums=1,
        compiler_options=compile_options.cpu_options(config.cpu_convolutions),
    )


def compile_steps(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh
) -> tuple[Callable, Callable]:
    """The jitted train step (state and metrics donated) and eval step for `mesh`."""
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    p_train_step = jax.jit(
        with_normalized_images(
            functools.partial(
                train_step,
                learning_rate_fn=learning_rate_fn,
                label_smoothing=config.label_smoothing,
            ),
            config,
        ),
        in_shardings=(replicated, replicated, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=(0, 1),
        compiler_options=compile_options.cpu_options(config.cpu_convolutions),
    )
    return p_train_step, compile_eval_step(mesh, config)


def eval_loop(
    step_fn: Callable,
    carry: Any,
    state: TrainState,
    inputs: data.Input,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    on_batch: Callable[[int, int], None] | None = None,
) -> Any:
    """Folds `carry = step_fn(state, carry, batch)` over every padded, masked eval batch.

    Every example of the evaluation split is in exactly one batch, with mask True;
    `on_batch(done, total)` (if given) is called after each batch, for progress.
    """
    local_batch = sharding.per_process_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    num_batches, batches = inputs.eval_batches(local_batch)
    for index, batch in enumerate(batches):
        carry = step_fn(state, carry, sharding.global_batch(batch, mesh))
        if on_batch is not None:
            on_batch(index + 1, num_batches)
    return carry


def evaluate(
    p_eval_step: Callable,
    state: TrainState,
    inputs: data.Input,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, float | int]:
    """Top-1, top-5 and loss over every evaluation example, each counted exactly once."""
    totals = eval_loop(p_eval_step, empty_metrics(EvalMetrics, mesh), state, inputs, config, mesh)
    values = read_metrics(totals)
    return {k: values[k] for k in ("top1", "top5", "loss", "num_examples")}


def _check_finite(first: int, last_step: int) -> None:
    """Raises FloatingPointError if `first` (a first non-finite step) names a step."""
    if first != _NO_STEP:
        raise FloatingPointError(
            f"Training diverged: the loss was not finite at step {first} (reported at step "
            f"{last_step}). Lower --config.learning_rate, add warmup with "
            "--config.warmup_epochs, or check the input data."
        )


def resolve_num_classes(config: ml_collections.ConfigDict, dataset_classes: int) -> int:
    """The model's output count: the dataset's, unless the config sets a compatible one."""
    wanted = config.model.num_classes
    if wanted is not None and wanted < dataset_classes:
        raise config_checks.ConfigError(
            f"model.num_classes={wanted} but dataset {config.dataset!r} has {dataset_classes} "
            f"classes. Unset it or use --config.model.num_classes={dataset_classes}."
        )
    return wanted or dataset_classes


def _write_json(path: epath.Path, payload: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


class _StopRequest:
    """Notes a SIGTERM (what a preempted Cloud TPU VM gets) so the loop can stop cleanly.

    The handler only sets a flag: the loop checks it at each step boundary, saves and
    returns. With several processes, jax's preemption service (started by
    `jax.distributed.initialize`) catches the signal and makes every process agree on
    the step to stop at.
    """

    def __init__(self):
        self.received = False
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
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.received


def _data_position(
    config: ml_collections.ConfigDict,
    inputs: data.Input,
    per_process_batch_size: int,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """What decides the order and content of the training batches (besides the step)."""
    return {
        "dataset": config.dataset,
        "split": config.train_split,
        "input": inputs.mode,
        "image_size": config.image_size,
        "augment": config.augment,
        "num_examples": inputs.train.num_examples,
        "process_count": inputs.train.process_count,
        "per_process_batch_size": per_process_batch_size,
        "steps_per_epoch": steps_per_epoch,
        "seed": config.seed,
        "crop_padding": config.crop_padding,
        "random_flip": config.random_flip,
    }


def _resume(
    manager, state, run_info: dict[str, Any], config: ml_collections.ConfigDict
) -> tuple[TrainState, dict[str, Any] | None]:
    """The state to start from, and the metadata of the checkpoint it came from (or None)."""
    state, meta = checkpointing.restore_for_resume(manager, state)
    if meta is None:
        return state, None
    if "imported" in meta and meta["step"] == 0:
        logging.info("Starting from the weights imported from %s.", meta["imported"]["state_dict"])
    elif meta.get("data") != run_info["data"]:
        logging.warning(
            "The input settings differ from those of the checkpoint (%s, now %s): training "
            "continues from step %d, but not with the batches an uninterrupted run would see.",
            meta["data"], run_info["data"], meta["step"],
        )  # fmt: skip
    saved = meta.get("schedule", run_info["schedule"])
    if saved != run_info["schedule"]:
        changed = ", ".join(
            f"{k}: {saved.get(k)} -> {run_info['schedule'].get(k)}"
            for k in sorted(set(saved) | set(run_info["schedule"]))
            if saved.get(k) != run_info["schedule"].get(k)
        )
        if not config.allow_schedule_change:
            raise config_checks.ConfigError(
                f"The learning-rate schedule differs from that of the checkpoint at step "
                f"{meta['step']} in {manager.directory} ({changed}), so the rate would jump "
                "there. Resume with the run's settings (its config.json), pass "
                "--config.allow_schedule_change=True to continue on the new schedule, or "
                "use a new --workdir."
            )
        logging.warning(
            "Continuing from step %d on a changed learning-rate schedule (%s).",
            meta["step"], changed,
        )  # fmt: skip
    return state, meta


def absolute_workdir(workdir: str | epath.Path) -> epath.Path:
    """`workdir` as an absolute path (Orbax needs one); URLs such as gs://... stay as given."""
    path = epath.Path(workdir).expanduser()
    # epath's absolute() would prefix a gs:// path with the working directory.
    return path if path.is_absolute() else path.absolute()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, evaluates periodically and at the end.

    The starting state is, in this order: the newest readable checkpoint in
    `workdir/checkpoints`, else a fresh initialisation from `config.seed`. A SIGTERM
    saves a checkpoint at the next step boundary and returns early.

    Returns:
      The final evaluation (also written to `workdir/eval_results.json`), or
      {"preempted": True, "step": N} after a SIGTERM.
    """
    with contextlib.ExitStack() as cleanup:  # Stops the stream's workers, however it ends.
        return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    workdir = absolute_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh()
    # Both batch sizes are checked here, before any step: a bad eval batch size must not
    # wait for the first evaluation, hours in, to fail.
    local_batch = sharding.per_process_batch_size(config.batch_size, mesh)
    sharding.per_process_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    inputs = data.open_input(config, mesh)
    num_classes = resolve_num_classes(config, inputs.train.num_classes)
    steps_per_epoch = inputs.steps_per_epoch(local_batch)
    num_steps = config.num_train_steps
    if num_steps <= 0:
        num_steps = max(1, int(config.num_epochs * steps_per_epoch))
    learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, num_steps)
    model = create_model(config.model, num_classes, config.half_precision)
    state = create_train_state(config, model, create_optimizer(config, learning_rate_fn), mesh)
    p_train_step, p_eval_step = compile_steps(config, learning_rate_fn, mesh)
    manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
    run_info = {
        "data": _data_position(config, inputs, local_batch, steps_per_epoch),
        "schedule": schedule_settings(config, steps_per_epoch, num_steps),
        # For predict: what each output means and how an image file becomes an input.
        "class_names": list(inputs.class_names),
        "preprocessing": data.preprocessing(config),
    }
    state, resumed = _resume(manager, state, run_info, config)
    start_step = int(state.step)

    logging.info(
        "Training %s on %s: %d examples, %d classes, steps %d to %d (%d per epoch), global "
        "batch %d over %d devices in %d processes, %s input.",
        config.model.name, config.dataset, inputs.train.num_examples, num_classes, start_step,
        num_steps, steps_per_epoch, config.batch_size, mesh.devices.size, jax.process_count(),
        inputs.mode,
    )  # fmt: skip
    _write_json(workdir / "config.json", config.to_dict())
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
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
    data_iterator = getattr(batches, "iterator", None)
    if data_iterator is not None and resumed and resumed.get("data") == run_info["data"]:
        # The stream's saved state (its next step): the same batches as start_step gives.
        checkpointing.restore_data_iterator(manager, start_step, data_iterator)
    if hasattr(batches, "close"):
        cleanup.callback(batches.close)

    def save(eval_results: dict[str, Any] | None = None) -> None:
        # Never save a diverged state: check the steps not yet logged first.
        first = jax.device_get(train_metrics.first_nonfinite_step.step)
        _check_finite(int(first), int(state.step))
        checkpointing.save(manager, state, config, run_info, eval_results, data_iterator)

    train_metrics = empty_metrics(TrainMetrics, mesh)
    eval_results: dict[str, Any] = {}
    interval_start, interval_step = time.perf_counter(), start_step
    with _StopRequest() as stop_requested:
        for step in range(start_step + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, train_metrics = p_train_step(state, train_metrics, next(batches))
            for hook in hooks:
                hook(step)
            last = step == num_steps
            if step % config.log_every_steps == 0 or last:
                values = read_metrics(train_metrics)
                _check_finite(values["first_nonfinite_step"], step)
                elapsed = time.perf_counter() - interval_start
                scalars = {
                    f"train_{k}": v for k, v in values.items() if k != "first_nonfinite_step"
                }
                scalars["train_examples_per_sec"] = (
                    (step - interval_step) * config.batch_size / elapsed
                )
                writer.write_scalars(step, scalars)
                train_metrics = empty_metrics(TrainMetrics, mesh)
                interval_start, interval_step = time.perf_counter(), step
            evaluated = step % config.eval_every_steps == 0 or last
            if evaluated:
                eval_results = evaluate(p_eval_step, state, inputs, config, mesh)
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
                    step, manager.directory, PREEMPTED_EXIT_STATUS,
                )  # fmt: skip
                return {"preempted": True, "step": step}
    manager.wait_until_finished()
    writer.flush()
    if not eval_results:  # Already trained to the end: evaluate what there is.
        eval_results = evaluate(p_eval_step, state, inputs, config, mesh)
        eval_results["step"] = int(state.step)
    eval_results.update(model=config.model.name, dataset=config.dataset)
    _write_json(workdir / "eval_results.json", eval_results)
    logging.info("Final evaluation: %s", _rounded(eval_results))
    return eval_results


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def open_checkpoint(workdir: epath.Path, which: str) -> tuple[Any, int]:
    """A read-only manager of `workdir`'s checkpoints, and the step `which` names.

    Raises:
      CheckpointError: there are no checkpoints, or none that `which` names.
    """
    if not (workdir / checkpointing.CHECKPOINT_DIR).exists():
        raise checkpointing.CheckpointError(
            f"No checkpoint in {workdir}: {workdir / checkpointing.CHECKPOINT_DIR} does not "
            "exist. Train first (--mode=train with this --workdir), import weights "
            "(python -m resnet_jax.import_torch), or point --workdir at the directory of a "
            "trained run."
        )
    manager = checkpointing.create_manager(workdir, read_only=True)
    return manager, checkpointing.select_step(manager, which)


def restore_model(
    manager: Any,
    step: int,
    model: nn.Module,
    image_size: int,
    placement: jax.sharding.Sharding,
    how_to_choose: str = "--config.eval_checkpoint=STEP",
) -> dict[str, Any]:
    """Reads the params and BN statistics of `step` for `model`, placed on `placement`.

    Raises:
      CheckpointError: the step does not fit the model, or is corrupt (the message
        lists the other steps to try, and `how_to_choose` one).
    """
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
    template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), template
    )
    try:
        variables, _, _ = checkpointing.restore(manager, step, template)
    except checkpointing.CorruptCheckpointError as e:
        others = [s for s in manager.all_steps() if s != step]
        raise checkpointing.CheckpointError(
            f"Checkpoint step {step} in {manager.directory} is corrupt: {e}. Use another "
            f"step with {how_to_choose} (available: {others})."
        ) from e
    return variables


def checkpoint_state(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    which: str,
    how_to_choose: str = "--config.eval_checkpoint=STEP",
) -> tuple[TrainState, jax.sharding.Mesh, data.Input]:
    """The model of checkpoint `which` of `workdir` (no optimizer), with its mesh and eval input.

    Only the model (params and BN statistics) is read, replicated over this machine's
    devices, whatever the device count of the run that saved it. `state.step` is the
    checkpoint's step.
    """
    manager, step = open_checkpoint(workdir, which)
    mesh = sharding.make_mesh()
    sharding.per_process_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    inputs = data.open_input(config, mesh, train=False)
    num_classes = resolve_num_classes(config, inputs.eval.num_classes)
    model = create_model(config.model, num_classes, config.half_precision)
    variables = restore_model(
        manager, step, model, config.image_size, sharding.replicated(mesh), how_to_choose
    )
    state = TrainState(
        step=step,
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=None,
        opt_state=None,
    )
    return state, mesh, inputs


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the checkpoint `config.eval_checkpoint` of `workdir` on the test split.

    Only the model (params and BN statistics) is read, onto this machine's devices,
    whatever the device count of the run that saved it.

    Returns:
      top1, top5, loss, num_examples, step, checkpoint, model, dataset; also written to
      `workdir/evaluations/step_<step>.json`, one file per evaluated step, so that it
      never replaces the training run's own `eval_results.json`.
    """
    workdir = absolute_workdir(workdir)
    state, mesh, inputs = checkpoint_state(config, workdir, config.eval_checkpoint)
    step = int(state.step)
    results = evaluate(compile_eval_step(mesh, config), state, inputs, config, mesh)
    results.update(
        step=step,
        checkpoint=str(config.eval_checkpoint),
        model=config.model.name,
        dataset=config.dataset,
    )
    path = workdir / EVALUATIONS_DIR / f"step_{step}.json"
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, results)
    logging.info(
        "Evaluation of checkpoint step %d: %s (written to %s)", step, _rounded(results), path
    )
    return results

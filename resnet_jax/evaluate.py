"""Evaluation: every test example once, from a training state or a checkpoint.

`eval_loop` folds a compiled function over the padded, masked evaluation batches; the
evaluation metrics, the report's confusion matrix and the layer statistics of the
experiments are such folds. `checkpoint_state` reads a checkpoint's model (no optimizer)
onto whatever devices this machine has, and `evaluate_checkpoint` is `--mode=eval`.
"""

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from etils import epath

from resnet_jax import checkpointing, config_checks, data, defaults, sharding, steps
from resnet_jax.models import create_model, validate_model_config

# --mode=eval writes WORKDIR/evaluations/step_<N>.json: one file per evaluated step.
EVALUATIONS_DIR = "evaluations"


def eval_loop(
    step_fn: Callable,
    carry: Any,
    state: steps.TrainState,
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
    wait_each_step = sharding.host_waits_for_each_step()
    for index, batch in enumerate(batches):
        batch = sharding.global_batch(batch, mesh)
        if wait_each_step:
            jax.block_until_ready(carry)
        carry = step_fn(state, carry, batch)
        if on_batch is not None:
            on_batch(index + 1, num_batches)
    return carry


def evaluate(
    eval_step_fn: Callable,
    state: steps.TrainState,
    inputs: data.Input,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> dict[str, float | int]:
    """Top-1, top-5 and loss over every evaluation example, each counted exactly once.

    For a state that keeps an EMA, the EMA weights are evaluated too: ema_top1, ema_top5,
    ema_loss beside the raw weights' top1, top5, loss.
    """
    empty = steps.empty_metrics(steps.EvalMetrics, mesh)
    totals = eval_loop(eval_step_fn, empty, state, inputs, config, mesh)
    results = steps.read_eval_metrics(totals)
    if state.ema is not None:
        averaged = state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])
        empty = steps.empty_metrics(steps.EvalMetrics, mesh)
        totals = eval_loop(eval_step_fn, empty, averaged, inputs, config, mesh)
        ema = steps.read_eval_metrics(totals)
        results.update({f"ema_{k}": v for k, v in ema.items() if k != "num_examples"})
    return results


def write_json(path: epath.Path, payload: dict[str, Any]) -> None:
    """Writes `payload` from process 0 only (every process holds the same values)."""
    if jax.process_index() == 0:
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def rounded(values: dict[str, Any]) -> dict[str, Any]:
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
    weights: str = "raw",
) -> dict[str, Any]:
    """Reads the params and BN statistics of `step` for `model`, placed on `placement`.

    `weights` is "raw" (the trained ones) or "ema" (their moving average).

    Raises:
      CheckpointError: the step does not fit the model, or has no EMA when asked for.
      UnusableStepError: the step is corrupt (the message lists the other steps).
    """
    assert weights in config_checks.EVAL_WEIGHTS, weights
    item = "ema" if weights == "ema" else "model"
    template = steps.variables_template(model, image_size, placement)
    try:
        restored, _ = checkpointing.restore(manager, step, {item: template})
    except checkpointing.CorruptCheckpointError as e:
        raise checkpointing.UnusableStepError(
            step, manager.directory, f"is corrupt: {e}", manager.all_steps()
        ) from e
    return restored[item]


def _read_meta(manager: Any, step: int) -> dict[str, Any]:
    """The step's metadata; UnusableStepError (naming the other steps) if it is unreadable."""
    try:
        return checkpointing.read_meta(manager, step)
    except checkpointing.CorruptCheckpointError as e:
        raise checkpointing.UnusableStepError(
            step, manager.directory, f"is unusable: {e}", manager.all_steps()
        ) from e


def check_trained_on(config: ml_collections.ConfigDict, meta: dict[str, Any], workdir: Any) -> None:
    """Refuses a config of another dataset than the one the checkpoint's run was trained on.

    Checked before any dataset opens: the config's dataset would be read (or downloaded)
    only to fail at the model's shapes, or to evaluate the model on classes it never saw.
    Weights imported by import_torch (step 0) record a preprocessing, not the data they
    were trained on: their dataset is not checked.

    Raises:
      ConfigError: `config.dataset` is not the dataset the checkpoint records.
    """
    if "imported" in meta and meta["step"] == 0:
        return
    try:
        trained = defaults.saved_config(meta["config"], f"the metadata of step {meta['step']}")
    except ValueError:  # Written by a newer version (a key unknown here): nothing to compare.
        return
    dataset = trained.dataset
    if dataset == config.dataset:
        return
    where = f" ({trained.data_dir})" if trained.data_dir else ""
    raise config_checks.ConfigError(
        f"the checkpoint at step {meta['step']} in {workdir} was trained on "
        f"{dataset}{where}, but the config asks for {config.dataset}: pass the "
        f"config the run was trained with, --config configs/from_workdir.py:{workdir} (its "
        "config.json; add --config.data_dir=PATH if the data moved)."
    )


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A checkpoint's model on one device, with what is needed to feed it images.

    `preprocessing` is the evaluation's (image_size, resize_size, mean, std) as stored
    with the checkpoint; `class_names` has one name per output (placeholders when the run
    recorded none); `weights` says which were read, "raw" or "ema".
    """

    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    step: int
    directory: epath.Path
    preprocessing: dict[str, Any]
    class_names: list[str]
    weights: str = "raw"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_trained_model(
    workdir: str | epath.Path, which: str = "latest", weights: str = "raw"
) -> TrainedModel:
    """The model of checkpoint `which` (latest, best or a step) of `workdir`, on one device.

    `weights`: "raw" or "ema" (the moving average, for runs that kept one).

    Settings come from the checkpoint's own record of its config, not from a config file.

    Raises:
      CheckpointError: no checkpoint, or none that `which` names.
      UnusableStepError: the step is corrupt or records an invalid model.
    """
    manager, step = open_checkpoint(checkpointing.absolute_workdir(workdir), which)
    meta = _read_meta(manager, step)
    try:
        config = defaults.saved_config(meta["config"], f"the metadata of step {step}")
        validate_model_config(config.model)
    except ValueError as e:
        raise checkpointing.UnusableStepError(
            step, manager.directory, f"records an invalid model: {e}", manager.all_steps()
        ) from e
    num_classes = meta["shapes"]["params/fc/bias"][0]
    preprocessing = meta.get("preprocessing") or data.preprocessing(config)
    names = meta.get("class_names") or []
    if len(names) != num_classes:
        names = [f"class {i}" for i in range(num_classes)]
    model = create_model(config.model, num_classes, config.half_precision)
    variables = restore_model(
        manager,
        step,
        model,
        preprocessing["image_size"],
        jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
        weights,
    )
    return TrainedModel(
        model=model,
        variables=variables,
        config=config,
        step=step,
        directory=epath.Path(manager.directory),
        preprocessing=preprocessing,
        class_names=list(names),
        weights=weights,
    )


def checkpoint_state(
    config: ml_collections.ConfigDict, workdir: epath.Path, which: str, weights: str = "raw"
) -> tuple[steps.TrainState, jax.sharding.Mesh, data.Input]:
    """The model of checkpoint `which` of `workdir` (no optimizer), with its mesh and eval input.

    Only the model (params and BN statistics; with `weights="ema"` their moving average)
    is read, replicated over this machine's devices, whatever the device count of the run
    that saved it. `state.step` is the checkpoint's step.

    Raises:
      ConfigError: `config` is of another dataset than the checkpoint's (`check_trained_on`).
    """
    manager, step = open_checkpoint(workdir, which)
    check_trained_on(config, _read_meta(manager, step), workdir)
    mesh = sharding.make_mesh()
    sharding.per_process_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    inputs = data.open_input(config, mesh, train=False)
    num_classes = config_checks.resolve_num_classes(config, inputs.eval.num_classes)
    model = create_model(config.model, num_classes, config.half_precision)
    variables = restore_model(
        manager, step, model, config.image_size, sharding.replicated(mesh), weights
    )
    state = steps.TrainState(
        step=step,
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=None,
        opt_state=None,
    )
    return state, mesh, inputs


def evaluation_name(step: int, config: ml_collections.ConfigDict) -> str:
    """The file --mode=eval writes: step_<N>[_ema][_flip].json, one per step and setting."""
    suffix = ("_ema" if config.eval_weights == "ema" else "") + (
        "_flip" if config.eval_flip else ""
    )
    return f"step_{step}{suffix}.json"


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the checkpoint `config.eval_checkpoint` of `workdir` on the test split.

    Only the model (params and BN statistics, raw or EMA as `config.eval_weights` says)
    is read, onto this machine's devices, whatever the device count of the run that saved
    it; `config.eval_flip` turns on flip test-time augmentation.

    Returns:
      top1, top5, loss, num_examples, step, checkpoint, weights, flip, model, dataset; also
      written to `workdir/evaluations/` (`evaluation_name`), one file per evaluated step
      and setting, so that it never replaces the training run's own `eval_results.json`.
    """
    workdir = checkpointing.absolute_workdir(workdir)
    state, mesh, inputs = checkpoint_state(
        config, workdir, config.eval_checkpoint, config.eval_weights
    )
    step = int(state.step)
    try:
        results = evaluate(steps.compile_eval_step(mesh, config), state, inputs, config, mesh)
    finally:
        inputs.close()
    results.update(
        step=step,
        checkpoint=str(config.eval_checkpoint),
        weights=config.eval_weights,
        flip=config.eval_flip,
        model=config.model.name,
        dataset=config.dataset,
    )
    path = workdir / EVALUATIONS_DIR / evaluation_name(step, config)
    try:
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        where = f"written to {path}"
    except OSError as e:  # A run folder one may read but not write (shared, read-only).
        where = f"not saved: cannot write {path} ({e.strerror or e})"
        logging.warning("The evaluation is printed only: %s.", where)
    logging.info("Evaluation of checkpoint step %d: %s (%s)", step, rounded(results), where)
    return results

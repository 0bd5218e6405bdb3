"""Orbax checkpoints of a run: save, resume past corrupt steps, restore a model to evaluate.

A step is written as three Orbax items under `WORKDIR/checkpoints/<step>/`:
- `model`: params and batch_stats (all that evaluation needs);
- `optimizer`: the optax state and the step counter;
- `meta` (JSON): the run's config, the input position, the parameter shapes and a
  SHA-256 fingerprint of each of the two array items.

Orbax writes a step into a temporary folder and renames it when complete, so a save
cut short (SIGKILL, preemption) never shows up as a step. A step whose files were
damaged afterwards fails its fingerprint or its read: resuming moves it to
`WORKDIR/corrupt_checkpoints/` with a warning and takes the step before it.

The input pipeline is a pure function of (data, seed, step), so the step and the seed
recorded here are the whole state of the data order and augmentation randomness.
"""

import hashlib
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the configured model."""


class CorruptCheckpointError(CheckpointError):
    """A step's files cannot be read back as they were written."""


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def fingerprint(tree: Any) -> str:
    """SHA-256 over every array's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        # Replicated arrays: every process holds the whole value, even across hosts.
        value = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(f"{_path_name(path)}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def shapes(tree: Any) -> dict[str, list[int]]:
    return {
        _path_name(path): list(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def model_tree(state: Any) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def optimizer_tree(state: Any) -> dict[str, Any]:
    return {"opt_state": state.opt_state, "step": state.step}


def create_manager(
    workdir: str | epath.Path, keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager that keeps the latest `keep` steps plus the best by eval top-1."""
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics["top1"],
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        # best_fn makes Orbax write each step's metrics to disk, so "best" survives a
        # restart; which steps are kept is decided by the policy alone.
        best_fn=lambda metrics: metrics["top1"],
        best_mode="max",
        preservation_policy=None if read_only else policy,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(
        epath.Path(workdir) / CHECKPOINT_DIR,
        options=options,
        item_names=("model", "optimizer", "meta"),
    )


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    config: ml_collections.ConfigDict,
    data_position: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> int:
    """Saves `state` at its step (asynchronously; call `manager.wait_until_finished()`)."""
    step = int(state.step)
    model, optimizer = model_tree(state), optimizer_tree(state)
    meta = {
        "step": step,
        "config": json.loads(config.to_json()),
        "data": data_position,
        # Order and augmentation are drawn from (seed, step): that is the RNG state.
        "rng": {"seed": config.seed, "step": step},
        "shapes": shapes(model),
        "fingerprints": {"model": fingerprint(model), "optimizer": fingerprint(optimizer)},
    }
    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            optimizer=ocp.args.StandardSave(optimizer),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
    )
    return step


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
    except Exception as e:  # Orbax raises many kinds of errors for damaged files.
        raise CorruptCheckpointError(
            f"its metadata cannot be read ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(meta, dict) or "fingerprints" not in meta:
        raise CorruptCheckpointError("its metadata is incomplete")
    return meta


def check_compatible(meta: dict[str, Any], expected: dict[str, list[int]], where: str) -> None:
    """Raises CheckpointError naming every parameter whose presence or shape differs."""
    saved = meta["shapes"]
    problems = [
        f"{name}: checkpoint {saved.get(name, 'missing')} vs model {expected.get(name, 'missing')}"
        for name in sorted(set(saved) | set(expected))
        if saved.get(name) != expected.get(name)
    ]
    if problems:
        config = meta.get("config", {})
        model = config.get("model", {})
        listed = "\n  ".join(problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise CheckpointError(
            f"{where} does not fit the configured model. It was written by model "
            f"{model.get('name')!r} (num_classes={model.get('num_classes')}, dataset "
            f"{config.get('dataset')!r}). Mismatching parameters:\n  {listed}\n"
            "Use the checkpoint's model settings (see its config in the workdir's "
            "config.json), or a new --workdir."
        )


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    model_template: Any,
    optimizer_template: Any | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """Reads one step onto the shardings of the templates, verifying its fingerprints.

    Args:
      manager: the run's checkpoint manager.
      step: the step to read.
      model_template: {"params", "batch_stats"} arrays (or ShapeDtypeStructs) with the
        shapes, dtypes and shardings wanted; the device count may differ from the save.
      optimizer_template: the same for {"opt_state", "step"}, or None to skip it.

    Returns:
      (model, optimizer or None, meta).

    Raises:
      CheckpointError: the step does not fit the templates.
      CorruptCheckpointError: the step cannot be read back as written.
    """
    where = f"Checkpoint step {step} in {manager.directory}"
    meta = _read_meta(manager, step)
    check_compatible(meta, shapes(model_template), where)
    items = {"model": ocp.args.StandardRestore(_abstract(model_template))}
    if optimizer_template is not None:
        items["optimizer"] = ocp.args.StandardRestore(_abstract(optimizer_template))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        raise CorruptCheckpointError(f"its arrays cannot be read ({type(e).__name__}: {e})") from e
    for name in items:
        if fingerprint(restored[name]) != meta["fingerprints"][name]:
            raise CorruptCheckpointError(f"the {name} arrays differ from what was saved")
    optimizer = restored["optimizer"] if optimizer_template is not None else None
    return restored["model"], optimizer, meta


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path | None:
    """Moves a bad step out of the manager's sight (nothing is deleted)."""
    source = epath.Path(manager.directory) / str(step)
    target = epath.Path(manager.directory).parent / CORRUPT_DIR / str(step)
    if jax.process_index() == 0 and source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.parent / f"{step}.{suffix}"
        source.rename(target)
    manager.reload()
    return target


def restore_for_resume(
    manager: ocp.CheckpointManager, state: Any
) -> tuple[Any, dict[str, Any] | None]:
    """The newest readable step applied to `state`, or (state, None) if there is none.

    A corrupt step is moved aside with a warning and the previous one is tried; a step
    that does not fit the model is an error (resuming it would be wrong, not unlucky).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            model, optimizer, meta = restore(
                manager, step, model_tree(state), optimizer_tree(state)
            )
        except CorruptCheckpointError as e:
            moved = _quarantine(manager, step)
            logging.warning(
                "Checkpoint step %d in %s is corrupt (%s). Moved it to %s; falling back "
                "to the previous step.", step, manager.directory, e, moved,
            )  # fmt: skip
            continue
        state = state.replace(
            params=model["params"],
            batch_stats=model["batch_stats"],
            opt_state=optimizer["opt_state"],
            step=optimizer["step"],
        )
        logging.info("Resumed from checkpoint step %d in %s.", step, manager.directory)
        return state, meta
    if steps:
        raise CheckpointError(
            f"None of the checkpoints {steps} in {manager.directory} could be read; they "
            f"were moved to {epath.Path(manager.directory).parent / CORRUPT_DIR}. Rerun to "
            "start from scratch, or restore them from a backup."
        )
    return state, None


def select_step(manager: ocp.CheckpointManager, which: str) -> int:
    """The step that `which` ("latest", "best" or a step number) names in `manager`."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(
            f"No checkpoint in {manager.directory}. Train first (--mode=train with this "
            "--workdir), or point --workdir at the directory of a trained run."
        )
    which = str(which)
    if which == "latest":
        return steps[-1]
    if which == "best":
        scored = [(manager.metrics(step) or {}).get("top1") for step in steps]
        candidates = [
            (score, step) for score, step in zip(scored, steps, strict=True) if score is not None
        ]
        if not candidates:
            raise CheckpointError(
                f"No checkpoint in {manager.directory} has eval metrics to pick the best by. "
                f"Use --config.eval_checkpoint=latest or a step ({steps})."
            )
        return max(candidates)[1]
    if int(which) not in steps:
        raise CheckpointError(
            f"No checkpoint step {which} in {manager.directory}. Available steps: {steps} "
            "(or 'latest', 'best')."
        )
    return int(which)

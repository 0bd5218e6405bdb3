"""Orbax checkpoints of a run: save, resume past corrupt steps, restore a model to evaluate.

A step is written under `WORKDIR/checkpoints/<step>/` as the Orbax items that
`create_manager` registers:
- `model`: params and batch_stats (all that evaluation needs);
- `optimizer`: the optax state and the step counter;
- `ema` (only for runs that keep one): the moving average of params and batch_stats;
- `meta` (JSON): the run's config and metadata (`run_meta`), the parameter shapes and a
  SHA-256 fingerprint of each array item;
- `data_iterator` (only for the streaming input): its iterator state, one file per process.

Orbax writes a step into a temporary folder and renames it when complete, so a save
cut short (SIGKILL, preemption) never shows up as a step. A step whose files were
damaged afterwards fails its fingerprint or its read. A run starts through `resume`,
which says in what order a starting state is chosen; `restore_for_resume` skips such
steps, moves them to `WORKDIR/corrupt_checkpoints/` (never deletes) and keeps several
processes agreeing on every decision.

The input pipeline is a pure function of (data settings, step), so the step and the
data settings (`run_meta["data"]`, compared in `resume`) are the whole state of the data
order and augmentation randomness, whatever the topology (`run_meta["topology"]`): a
run resumes on another number of processes or devices on the same batches. The format
also keeps `meta["rng"]` (seed and step, never read) and, in the iterator's file, the few
settings its own `set_state` checks.
"""

import enum
import errno
import hashlib
import json
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from resnet_jax import config_checks, defaults

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
# The item holding the streaming input's iterator state, one JSON file per process.
DATA_ITERATOR = "data_iterator"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the configured model."""


class CorruptCheckpointError(CheckpointError):
    """A step could not be read back as it was written.

    `proven` is True when its files were read and differ from what was saved (a
    fingerprint mismatch, incomplete metadata), False when reading itself failed: damaged
    files, or a problem of this machine (permissions, the storage service).
    """

    def __init__(self, message: str, proven: bool):
        super().__init__(message)
        self.proven = proven


def absolute_workdir(workdir: str | epath.Path) -> epath.Path:
    """`workdir` as an absolute path (Orbax needs one); URLs such as gs://... stay as given."""
    path = epath.Path(workdir).expanduser()
    # epath's absolute() would prefix a gs:// path with the working directory.
    return path if path.is_absolute() else path.absolute()


# How a failed write says that the disk is full or read-only, in the errors of Python
# (errno), TensorStore (Orbax's writer: os_error_code) and the libraries' log lines.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space is left",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission to write is denied",
}
STORAGE_MARKERS = {
    "No space left on device": "no space is left",
    "os_error_code='28'": "no space is left",
    "Disk quota exceeded": "the disk quota is used up",
    "Read-only file system": "the file system is read-only",
    "os_error_code='30'": "the file system is read-only",
    "os_error_code='13'": "permission to write is denied",
}


def storage_failure(error: BaseException) -> str | None:
    """What about the disk made `error` (or an error it arose from) fail, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[error.errno]
        text = str(error)
        for marker, reason in STORAGE_MARKERS.items():
            if marker in text:
                return reason
        error = error.__cause__ or error.__context__
    return None


def complete_steps(workdir: str | epath.Path) -> list[int]:
    """The steps whose save finished (Orbax renames a step's folder to its number when done)."""
    folder = epath.Path(workdir) / CHECKPOINT_DIR
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def storage_error_message(workdir: str | epath.Path, reason: str) -> str:
    """The one line for a run stopped because its workdir could not be written."""
    steps = complete_steps(workdir)
    resume = (
        f"the newest complete checkpoint is step {steps[-1]} in {epath.Path(workdir) / CHECKPOINT_DIR}, "
        "where the rerun resumes (unfinished saves are ignored)"
        if steps
        else "no checkpoint is complete yet, so the rerun starts from step 0"
    )
    return (
        f"cannot write in {workdir}: {reason}. The run stopped; {resume}. Free space (or "
        "make the folder writable) and rerun the same command."
    )


class UnusableStepError(CheckpointError):
    """A step that was asked for by name cannot be used; other steps may be.

    The command that asked adds the flag that picks another step (`with_flag`).
    """

    def __init__(self, step: int, directory: Any, problem: str, available: list[int]):
        self.step, self.directory, self.problem = step, directory, problem
        self.others = [s for s in available if s != step]
        super().__init__(self.message())

    def message(self, flag: str | None = None) -> str:
        where = f"Checkpoint step {self.step} in {self.directory} {self.problem}."
        if flag is None:
            return f"{where} Other steps: {self.others}."
        return f"{where} Use another step with {flag} (available: {self.others})."

    def with_flag(self, flag: str) -> CheckpointError:
        """The same error, saying which flag of the command picks another step."""
        return CheckpointError(self.message(flag))


def _path_name(path: tuple) -> str:
    # Not jax.tree_util.keystr(simple=True): it writes an optax NamedTuple field as
    # "trace" where this writes ".trace", and saved checkpoints hold these names in their
    # fingerprints and shapes; another spelling would fail every existing checkpoint.
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
    # flax.traverse_util.flatten_dict would do for the model, but not for optax's states
    # (NamedTuples and tuples, not dicts).
    return {
        _path_name(path): list(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def model_tree(state: Any) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def optimizer_tree(state: Any) -> dict[str, Any]:
    return {"opt_state": state.opt_state, "step": state.step}


def array_items(state: Any) -> dict[str, Any]:
    """The state's arrays by checkpoint item: model, optimizer and (if kept) ema."""
    items = {"model": model_tree(state), "optimizer": optimizer_tree(state)}
    if state.ema is not None:
        items["ema"] = state.ema
    return items


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
        # Nothing is saved through a read-only manager (Orbax warns unless this says so).
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
    )
    return ocp.CheckpointManager(
        epath.Path(workdir) / CHECKPOINT_DIR,
        options=options,
        item_names=("model", "optimizer", "ema", "meta", DATA_ITERATOR),
    )


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    config: ml_collections.ConfigDict,
    run_meta: dict[str, Any],
    metrics: dict[str, float] | None = None,
    data_iterator: Any = None,
) -> int:
    """Saves `state` at its step (asynchronously; call `manager.wait_until_finished()`).

    Args:
      manager: the run's checkpoint manager.
      state: the train state.
      config: the run's config, stored with the step.
      run_meta: JSON-able facts about the run stored in the step's metadata under their
        keys (the trainer stores "data", "schedule", "class_names" and "preprocessing").
      metrics: the evaluation of this step, if any ("top1" picks the best step).
      data_iterator: the streaming input's grain iterator, if any: its state (one file
        per process) is saved with the step, through grain's Orbax handler.

    Returns:
      The step saved.
    """
    step = int(state.step)
    arrays = array_items(state)
    meta = {
        **run_meta,
        "step": step,
        "config": json.loads(config.to_json()),
        # Kept for the format (nothing reads it): the run's data record is "data".
        "rng": {"seed": config.seed, "step": step},
        "shapes": shapes(arrays["model"]),
        "optimizer_shapes": shapes(arrays["optimizer"]),
        "fingerprints": {name: fingerprint(tree) for name, tree in arrays.items()},
    }
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    items["meta"] = ocp.args.JsonSave(meta)
    if data_iterator is not None:
        items[DATA_ITERATOR] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(
        step,
        args=ocp.args.Composite(**items),
        metrics=metrics,
        force=True,
    )
    return step


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The step's metadata (config, class names, shapes, fingerprints, ...).

    Raises:
      CorruptCheckpointError: it cannot be read, or lacks the fingerprints.
    """
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
    except Exception as e:  # Orbax raises many kinds of errors for unreadable files.
        raise CorruptCheckpointError(
            f"its metadata cannot be read ({type(e).__name__}: {e})", proven=False
        ) from e
    if not isinstance(meta, dict) or "fingerprints" not in meta:
        raise CorruptCheckpointError("its metadata is incomplete", proven=True)
    return meta


def check_compatible(
    meta: dict[str, Any], expected: dict[str, list[int]], where: str, item: str = "model"
) -> None:
    """Raises CheckpointError naming every array of `item` whose presence or shape differs.

    Args:
      meta: the step's metadata.
      expected: path -> shape of the arrays wanted (`shapes(...)` of a template).
      where: names the step in the message.
      item: "model" or "optimizer" (not checked for steps saved without its shapes).
    """
    saved = meta.get("shapes" if item == "model" else f"{item}_shapes")
    if saved is None:
        return
    problems = [
        f"{name}: checkpoint {saved.get(name, 'missing')} vs {item} {expected.get(name, 'missing')}"
        for name in sorted(set(saved) | set(expected))
        if saved.get(name) != expected.get(name)
    ]
    if not problems:
        return
    recorded = meta.get("config", {})  # As the checkpoint wrote it, for the message only.
    listed = "\n  ".join(problems[:20]) + (
        f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    )
    if item == "model":
        model = recorded.get("model", {})
        written = (
            f"model {model.get('name')!r} (num_classes={model.get('num_classes')}, dataset "
            f"{recorded.get('dataset')!r})"
        )
    else:
        written = ", ".join(
            f"{key}={recorded.get(key)}"
            for key in ("momentum", "nesterov", "weight_decay", "sam_rho")
        )
    raise CheckpointError(
        f"{where} does not fit the configured {item}. It was written with {written}. "
        f"Mismatching arrays:\n  {listed}\nUse the checkpoint's {item} settings (see its "
        "config in the workdir's config.json), or a new --workdir."
    )


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(
    manager: ocp.CheckpointManager, step: int, templates: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads items of one step onto the shardings of the templates, verifying their fingerprints.

    Args:
      manager: the run's checkpoint manager.
      step: the step to read.
      templates: by item name ("model", "optimizer", "ema"), arrays (or
        ShapeDtypeStructs) with the shapes, dtypes and shardings wanted; "model" and "ema"
        are {"params", "batch_stats"}, "optimizer" is {"opt_state", "step"}. The device
        count may differ from the save.

    Returns:
      (the restored items by name, meta).

    Raises:
      CheckpointError: the step does not fit the templates, or has no EMA when asked for.
      CorruptCheckpointError: the step cannot be read back as written.
    """
    where = f"Checkpoint step {step} in {manager.directory}"
    meta = read_meta(manager, step)
    if "ema" in templates and "ema" not in meta["fingerprints"]:
        raise CheckpointError(
            f"{where} has no moving average of the weights: its run was trained with "
            "ema_decay=0. Use the raw weights (eval_weights=raw, --weights=raw), or a run "
            "trained with --config.ema_decay > 0 (a resume with EMA needs a new --workdir)."
        )
    for name, template in templates.items():
        item = "optimizer" if name == "optimizer" else "model"
        check_compatible(meta, shapes(template), where, item=item)
    items = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in templates.items()}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many kinds of errors for unreadable files.
        raise CorruptCheckpointError(
            f"its arrays cannot be read ({type(e).__name__}: {e})", proven=False
        ) from e
    for name in items:
        if fingerprint(restored[name]) != meta["fingerprints"][name]:
            raise CorruptCheckpointError(
                f"the {name} arrays differ from what was saved", proven=True
            )
    return {name: restored[name] for name in items}, meta


def _quarantine(manager: ocp.CheckpointManager, failed: dict[int, str], restored: int) -> None:
    """Moves the steps that `failed` out of the manager's sight, with a warning each.

    Nothing is deleted. Every process calls it: process 0 moves the folders, the others
    wait for it before they list the steps again.
    """
    root = epath.Path(manager.directory)
    targets = []
    for step in failed:
        target = root.parent / CORRUPT_DIR / str(step)
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.parent / f"{step}.{suffix}"
        if jax.process_index() == 0 and (root / str(step)).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            (root / str(step)).rename(target)
        targets.append(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("resnet_jax: corrupt checkpoints moved")
    manager.reload()
    for (step, why), target in zip(failed.items(), targets, strict=True):
        logging.warning(
            "Checkpoint step %d in %s is corrupt (%s), while step %d reads fine: moved it to %s.",
            step,
            manager.directory,
            why,
            restored,
            target,
        )


class Outcome(enum.IntEnum):
    """What trying to restore a step gave, by severity: all processes act on the worst one."""

    RESTORED = 0
    UNREADABLE = 1  # Reading failed (damaged files, or this machine's storage).
    ALTERED = 2  # Read, but not what was written (fingerprint, metadata).
    UNUSABLE = 3  # Does not fit the model or optimizer, or another error.


def _agree(outcome: Outcome) -> tuple[Outcome, int]:
    """The worst outcome over all processes, and the first process that had it."""
    if jax.process_count() == 1:
        return outcome, 0
    from jax.experimental import multihost_utils

    outcomes = np.asarray(multihost_utils.process_allgather(np.int32(outcome))).reshape(-1)
    return Outcome(int(outcomes.max())), int(outcomes.argmax())


def restore_for_resume(
    manager: ocp.CheckpointManager, state: Any
) -> tuple[Any, dict[str, Any] | None]:
    """The newest step that every process can restore, applied to `state`.

    Steps are tried newest first. A step that does not fit the model or the optimizer is
    an error (resuming it would be wrong, not unlucky). Once a step is restored, the newer
    steps that failed to read are moved to `corrupt_checkpoints/` with a warning (a read
    that fails while an older step reads fine is the step's own fault). If none can be
    restored, nothing is moved and the error lists why each failed.

    With several processes, each tries the same step, and they exchange their outcomes
    (a compiled all-gather, run by every process in the same order), so all of them
    resume from the same step, raise together, or move the same steps.

    Returns:
      (state, the step's metadata), or (state, None) if there is no checkpoint.
    """
    failed: dict[int, str] = {}
    for step in sorted(manager.all_steps(), reverse=True):
        outcome, error, restored = Outcome.UNUSABLE, None, None
        try:
            restored = restore(manager, step, array_items(state))
            outcome = Outcome.RESTORED
        except CorruptCheckpointError as e:
            outcome, error = (Outcome.ALTERED if e.proven else Outcome.UNREADABLE), e
        except Exception as e:  # Reported below, once every process knows.
            error = e
        worst, process = _agree(outcome)
        if worst == Outcome.UNUSABLE:
            if outcome == Outcome.UNUSABLE:
                raise error
            raise CheckpointError(
                f"Process {process} could not use checkpoint step {step} in "
                f"{manager.directory}; its log says why."
            )
        if worst != Outcome.RESTORED:
            failed[step] = str(error) if error else f"process {process} could not read it"
            continue
        arrays, meta = restored
        if failed:
            _quarantine(manager, failed, step)
        state = state.replace(
            params=arrays["model"]["params"],
            batch_stats=arrays["model"]["batch_stats"],
            opt_state=arrays["optimizer"]["opt_state"],
            step=arrays["optimizer"]["step"],
            ema=arrays.get("ema"),
        )
        logging.info("Resumed from checkpoint step %d in %s.", step, manager.directory)
        return state, meta
    if failed:
        listed = "\n  ".join(f"step {step}: {why}" for step, why in failed.items())
        raise CheckpointError(
            f"No checkpoint in {manager.directory} could be restored:\n  {listed}\n"
            "Nothing was moved or deleted. If the storage is reachable and these files are "
            "damaged, restore them from a backup, or start from scratch with a new "
            "--workdir (or after moving the checkpoints folder aside)."
        )
    return state, None


def _topology(topology: dict[str, Any]) -> str:
    processes, devices = topology.get("processes"), topology.get("devices")
    return f"{processes} process{'es' if processes != 1 else ''}, {devices} devices"


def _changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """`key old -> new` for each setting that differs (nested ones as `outer.key`)."""
    changes = []
    for key in sorted(set(saved) | set(now), key=str):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key} {_shown(old)} -> {_shown(new)}")
    return changes


def _shown(value: Any) -> str:
    """A setting as the command line writes it: tuples for JSON lists."""
    return str(tuple(value)) if isinstance(value, list) else str(value)


def _schedule_refusal(
    meta: dict[str, Any], run_meta: dict[str, Any], config: ml_collections.ConfigDict, where: str
) -> str:
    """Why a resume would change the learning-rate schedule: the config keys that changed."""
    from resnet_jax import steps  # Here: every command imports this module, few need flax.

    schedule = ", ".join(_changes(meta.get("schedule", {}), run_meta["schedule"]))
    saved_data = meta.get("data") or {}
    try:
        saved = defaults.saved_config(meta.get("config", {}), where)
        keys = [key for key in steps.SCHEDULE_KEYS if saved[key] != config[key]]
    except ValueError:  # A key today's defaults lack: only the schedule's change is known.
        keys = []
    if not keys:
        # Not the config: the data (its size, the process count) changed the steps per epoch.
        data = ", ".join(_changes(saved_data, run_meta["data"])) or "unknown"
        return (
            f"Resuming the checkpoint at step {meta['step']} in {where} would change the "
            f"learning-rate schedule ({schedule}), so the rate would jump there; the input "
            f"settings changed ({data}). Resume with the run's data, use a new --workdir, or "
            "pass --config.allow_schedule_change=True to continue on the new schedule."
        )
    causes = [f"{key} {_shown(saved[key])} -> {_shown(config[key])}" for key in keys]
    old_epoch, new_epoch = saved_data.get("steps_per_epoch"), run_meta["data"]["steps_per_epoch"]
    if "batch_size" in keys and old_epoch not in (None, new_epoch):
        causes[keys.index("batch_size")] += (
            f" (which changes the steps per epoch, {old_epoch} -> {new_epoch})"
        )
    old_values = " ".join(f"--config.{key}={_shown(saved[key])}" for key in keys)
    return (
        f"Resuming the checkpoint at step {meta['step']} in {where} with {', '.join(causes)} "
        f"would change the learning-rate schedule ({schedule}), so the rate would jump there. "
        f"Rerun with {old_values}, use a new --workdir, or pass "
        "--config.allow_schedule_change=True to continue on the new schedule."
    )


def resume(
    manager: ocp.CheckpointManager,
    state: Any,
    run_meta: dict[str, Any],
    config: ml_collections.ConfigDict,
) -> tuple[Any, bool]:
    """The state a run starts from, and whether its input continues from the checkpoint's.

    The starting state is, in this order:
    1. the newest step that every process can restore (`restore_for_resume`), weights
       imported by `import_torch` (step 0) included;
    2. otherwise `state` as given, the fresh initialisation.
    A restored step with a learning-rate schedule other than `run_meta["schedule"]` is
    refused (the rate would jump) unless `config.allow_schedule_change`; one with data
    settings other than `run_meta["data"]` continues with a warning, on other batches; one
    saved on another topology (`run_meta["topology"]`) continues the same batches, with
    an info line.

    Returns:
      (state, whether a step saved with this run's data settings was restored: then the
      input state saved with it (`restore_data_iterator`) continues the same batches).

    Raises:
      CheckpointError: as `restore_for_resume`.
      config_checks.ConfigError: the schedule changed and `allow_schedule_change` is off
        (the message names the config keys that changed it), or the run keeps a moving
        average of its weights that this config would drop.
    """
    state, meta = restore_for_resume(manager, state)
    if meta is None:
        return state, False
    saved_ema = (meta.get("config") or {}).get("ema_decay", 0.0)
    if saved_ema and not config.ema_decay:
        raise config_checks.ConfigError(
            f"The checkpoint at step {meta['step']} in {manager.directory} keeps a moving "
            f"average of the weights (ema_decay={saved_ema}), which this config "
            "(ema_decay=0) would leave out of every later checkpoint. Rerun with "
            f"--config.ema_decay={saved_ema}, as the run was started. Nothing was changed."
        )
    saved, now = meta.get("schedule", run_meta["schedule"]), run_meta["schedule"]
    if saved != now:
        if not config.allow_schedule_change:
            raise config_checks.ConfigError(
                _schedule_refusal(meta, run_meta, config, str(manager.directory))
            )
        logging.warning(
            "Continuing from step %d on a changed learning-rate schedule (%s).",
            meta["step"],
            ", ".join(_changes(saved, now)),
        )
    # Here: the data package loads tensorflow_datasets, which predict and report skip.
    from resnet_jax.data import splits

    saved_data = splits.global_settings(meta.get("data") or {})
    same_data = saved_data == run_meta["data"]
    if "imported" in meta and meta["step"] == 0:
        logging.info("Starting from the weights imported from %s.", meta["imported"]["state_dict"])
    elif "process_count" in saved_data:  # several processes' record, from before
        logging.warning(
            "The checkpoint at step %d was written by %d processes before the data order "
            "became global (the same on any number of processes): training continues, but "
            "not with the batches an uninterrupted run of that version would have seen.",
            meta["step"],
            saved_data["process_count"],
        )
    elif not same_data:
        logging.warning(
            "The input settings differ from those of the checkpoint at step %d (%s): "
            "training continues, but not with the batches an uninterrupted run would see.",
            meta["step"],
            ", ".join(_changes(saved_data, run_meta["data"])),
        )
    elif "topology" in meta and meta["topology"] != run_meta.get("topology", meta["topology"]):
        logging.info(
            "Resuming step %d, saved by %s, on %s: the data order is unaffected (it "
            "depends on the seed, the step and the global batch only).",
            meta["step"],
            _topology(meta["topology"]),
            _topology(run_meta["topology"]),
        )
    return state, same_data


def restore_data_iterator(manager: ocp.CheckpointManager, step: int, iterator: Any) -> bool:
    """Sets `iterator` to the input state saved with `step`; False if the step has none.

    Also False when the step was saved on another number of processes (grain keeps one
    file per process, named by their count): the iterator's state is the next step and
    the data settings, which the caller already has (the checkpoint's step, the data
    record `resume` compared), so the iterator started at the step is the same.
    """
    folder = epath.Path(manager.directory) / str(step) / DATA_ITERATOR
    mine = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not mine.exists():
        return False
    manager.restore(
        step,
        args=ocp.args.Composite(**{DATA_ITERATOR: grain.checkpoint.CheckpointRestore(iterator)}),
    )
    return True


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
                f"Ask for latest or one of its steps ({steps}) instead of best."
            )
        return max(candidates)[1]
    if int(which) not in steps:
        raise CheckpointError(
            f"No checkpoint step {which} in {manager.directory}. Available steps: {steps} "
            "(or 'latest', 'best')."
        )
    return int(which)

"""How a split divides among processes and into batches; the same in every process.

Also the tags of the random streams drawn from a run's seed, and the padding of eval
batches.

For evaluation, process i of P holds examples [i*n//P, (i+1)*n//P) of a split, in the
split's fixed order. For training every process reads from the whole split: the batch of
step s is one global batch drawn from (seed, s), and each process takes its rows of it
(`sharding.process_rows`), so the batches do not depend on the number of processes.

Not `tfds.split_for_jax_process`: it cuts the split with tfds's even_splits,
which gives the extra examples to the first shards, and image folders (which tfds
does not read here) must be cut the same way as tfds datasets, on both input paths.
"""

import math
from typing import Any

import jax
import numpy as np

from resnet_jax.data.errors import DatasetError

# The random streams of one seed, each folded in (jax) or mixed in (grain's seeds) with
# its own tag, so that the shuffle of epoch e and the augmentations of step s (often
# equal numbers) draw different numbers. Changing one changes every run's batches.
SHUFFLE_TAG = 0  # The epoch order (data.device, data.stream).
CROP_FLIP_TAG = 1  # The crops and flips made by the input (data.device, data.stream).
STEP_AUGMENT_TAG = 2  # The train step's augmentations (data.augment).


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Process `process_index`'s examples [start, stop) of a split of `num_examples`."""
    return (
        process_index * num_examples // process_count,
        (process_index + 1) * num_examples // process_count,
    )


def process_position(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), each defaulting to jax's; DatasetError if out of range."""
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise DatasetError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )
    return process_index, process_count


def check_eval_capacity(num_local: int, per_process_batch_size: int, num_batches: int) -> None:
    """Raises DatasetError unless `num_batches` batches hold this process's `num_local` examples."""
    batch = per_process_batch_size
    if batch <= 0:
        raise DatasetError(f"per-process batch size {batch} must be positive.")
    if num_batches * batch < num_local:
        raise DatasetError(
            f"{num_batches} eval batches of {batch} cannot hold the {num_local} examples of "
            f"this process: compute num_batches with num_eval_batches()."
        )


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Returns the number of train steps in one epoch, the same for every topology.

    An epoch is one pass over the whole training split in one global order (every
    process reads from all of it and takes its rows of each global batch); what does
    not fill a whole global batch is dropped.

    Args:
      num_examples: Examples in the whole split.
      global_batch_size: Examples per step, all processes together.

    Returns:
      num_examples // global_batch_size.

    Raises:
      DatasetError: The global batch is larger than the split.
    """
    if global_batch_size <= 0:
        raise DatasetError(f"batch size {global_batch_size} must be positive.")
    steps = num_examples // global_batch_size
    if steps == 0:
        raise DatasetError(
            f"The batch size {global_batch_size} is larger than the {num_examples} training "
            f"examples, so an epoch has no step: use a smaller --config.batch_size (at most "
            f"{num_examples})."
        )
    return steps


def num_eval_batches(num_examples: int, process_count: int, per_process_batch_size: int) -> int:
    """Returns the number of eval batches, the same for every process.

    Args:
      num_examples: Examples in the whole split.
      process_count: Number of processes.
      per_process_batch_size: Batch size of one process.

    Returns:
      ceil(ceil(num_examples / process_count) / per_process_batch_size): enough
      for the largest shard.
    """
    if per_process_batch_size <= 0:
        raise DatasetError(f"per-process batch size {per_process_batch_size} must be positive.")
    return math.ceil(math.ceil(num_examples / process_count) / per_process_batch_size)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`batch` zero-padded to `size` rows, with "mask": True on its own rows.

    Every eval batch then has one shape (one compilation), and the mask keeps the
    padding out of the metrics.

    Args:
      batch: Arrays with the same number of rows, at most `size` (0 for a batch that is
        all padding).
      size: Rows of the result.

    Returns:
      A new dict: each array of `batch` as zeros [size, ...] of its dtype holding its
      rows first, and "mask" bool [size].
    """
    count = len(next(iter(batch.values())))
    assert count <= size, (count, size)
    padded = {}
    for key, value in batch.items():
        padded[key] = np.zeros((size, *value.shape[1:]), value.dtype)
        padded[key][:count] = value
    padded["mask"] = np.arange(size) < count
    return padded


def global_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Saved data settings (a checkpoint's data record, the stream's iterator state) in
    today's form, where their batches are today's.

    Before the order became global they held the process count and one process's batch.
    A single process's batches were already the global ones: its settings get the global
    batch size instead. Those of several processes stay as they were (other batches).
    """
    if settings.get("process_count") != 1 or "global_batch_size" in settings:
        return settings
    old = ("per_process_batch_size", "process_index", "process_count")
    return {
        **{k: v for k, v in settings.items() if k not in old},
        "global_batch_size": settings.get("per_process_batch_size"),
    }

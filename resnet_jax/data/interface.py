"""The one interface of the input paths: what the training loop and evaluation call.

`data.device.DeviceInput` and `data.stream.StreamInput` implement `Input`; their train
batches implement `TrainBatches`. The loop never asks which path it has.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import jax

from resnet_jax.data import splits


class TrainBatches(Protocol):
    """Endless global train batches from a given step on.

    Each item is {"image": uint8 [B, H, W, 3], "label": int32 [B]}, global arrays sharded
    over the mesh's "data" axis.

    Attributes:
      checkpointable: An iterator whose state goes into every checkpoint (grain's
        checkpoint handler saves and restores it), or None when the step alone
        determines the batches.
    """

    checkpointable: Any

    def __iter__(self) -> TrainBatches: ...

    def __next__(self) -> dict[str, jax.Array]: ...

    def close(self) -> None:
        """Releases what the batches hold (worker processes); safe to call twice."""


@dataclasses.dataclass
class Input(abc.ABC):
    """The training and evaluation data of a run, and the batches made from them.

    Attributes:
      train: The whole training split (every process reads from all of it and takes
        its rows of each global batch), or None when opened for evaluation only. Both
        kinds of split have num_examples, num_classes, class_names, process_index and
        process_count.
      eval: This process's evaluation split.
      config: The run's config.
      mesh: The devices the batches go to.
    """

    mode = ""  # "device" or "stream", for logs and the checkpoint's record.
    train: Any | None
    eval: Any
    config: Any
    mesh: jax.sharding.Mesh

    @property
    def class_names(self) -> tuple[str, ...]:
        # Both splits have the training split's classes (the same labels in tfds; the
        # training split's class folders for an image folder).
        return self.eval.class_names

    def steps_per_epoch(self, global_batch_size: int) -> int:
        assert self.train is not None, "opened for evaluation only"
        return splits.steps_per_epoch(self.train.num_examples, global_batch_size)

    def num_eval_batches(self, per_process_batch_size: int) -> int:
        return splits.num_eval_batches(
            self.eval.num_examples, self.eval.process_count, per_process_batch_size
        )

    @abc.abstractmethod
    def train_batches(self, per_process_batch_size: int, start_step: int) -> TrainBatches:
        """Global uint8 train batches from global step `start_step` on, forever.

        The batch of step s depends on the data, the seed, s and the global batch size
        only: not on the number of processes or devices.
        """

    @abc.abstractmethod
    def eval_batches(self, per_process_batch_size: int) -> tuple[int, Iterator[dict[str, Any]]]:
        """(number of batches, this process's padded, masked uint8 eval batches).

        The number is the same in every process; batches past the end of a process's
        shard are all padding (mask False).
        """

    def close(self) -> None:  # noqa: B027  (most paths hold nothing to release)
        """Releases what the evaluations keep between them (worker processes); safe to
        call twice. Train batches are closed on their own."""
        return

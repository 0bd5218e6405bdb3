"""Input: where examples come from, and how batches reach the devices.

Two paths behind one interface (`open_input`), chosen by `config.input`:

- "device" (`data.device`): the training split, uint8, lives on the accelerators;
  shuffling, crops and flips run in compiled code, so the host does no per-step work.
  For datasets that fit in device memory: CIFAR-10/100, small image folders.
- "stream" (`data.stream`): grain reads examples lazily from tfds `array_record` files
  or image folders, decodes and augments them in worker processes, and sends uint8
  batches; host memory stays bounded by a few batches whatever the dataset's size.
- "auto" (the default): "device" when the training split takes at most a quarter of a
  device's memory (of host memory on CPU, per local device) and the augmentation is
  the CIFAR one, "stream" otherwise.

Either way the devices receive uint8 images and normalise them inside the compiled
step (`normalize`), the batch of step s is a pure function of (data, seed, s), every
evaluation example is counted once, and a file that cannot be read is named.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax import sharding
from resnet_jax.config_checks import AUGMENTATIONS, INPUT_MODES
from resnet_jax.data import device, sources
from resnet_jax.data.sources import (
    IMAGE_EXTENSIONS,
    DatasetError,
    DatasetSplit,
    hide_accelerators_from_tensorflow,
    normalization,
    num_classes,
    num_eval_batches,
    preprocessing,
    read_image,
    steps_per_epoch,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "AUGMENTATIONS",
    "INPUT_MODES",
    "DatasetError",
    "DatasetSplit",
    "Input",
    "choose_mode",
    "hide_accelerators_from_tensorflow",
    "normalization",
    "normalize",
    "num_classes",
    "num_eval_batches",
    "open_input",
    "preprocessing",
    "read_image",
    "steps_per_epoch",
]

# "auto" keeps the device-resident split to this share of a device's memory: the
# model, its activations and the optimizer need the rest.
_DEVICE_MEMORY_SHARE = 0.25


def normalize(images: jnp.ndarray, mean: Any, std: Any) -> jnp.ndarray:
    """uint8 images to float32 (x / 255 - mean) / std per channel, inside compiled code."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / jnp.float32(255.0) - mean) / std


def _device_memory_budget(mesh: jax.sharding.Mesh) -> int:
    """Bytes the device-resident split may take on each device."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = local[0].memory_stats() if local else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"] * _DEVICE_MEMORY_SHARE)
    # CPU devices share the host's memory, each holding its own copy of the shard.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host * _DEVICE_MEMORY_SHARE) // max(1, len(local))


def choose_mode(config: Any, num_train_examples: int, mesh: jax.sharding.Mesh) -> str:
    """Returns "device" or "stream": `config.input`, or for "auto" what fits.

    `config.input` and `config.augment` are checked by `config_checks.validate`.
    """
    if config.input != "auto":
        return config.input
    if config.augment != "crop_flip":
        return "stream"
    need = device.split_bytes(num_train_examples, config.image_size, jax.process_count())
    return "device" if need <= _device_memory_budget(mesh) else "stream"


@dataclasses.dataclass
class Input:
    """The training and evaluation data of a run, and the batches made from them.

    Attributes:
      mode: "device" or "stream".
      train: This process's training split (in memory for "device", opened for "stream").
      eval: This process's evaluation split.
    """

    mode: str
    train: Any
    eval: Any
    config: Any
    mesh: jax.sharding.Mesh

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    def steps_per_epoch(self, per_process_batch_size: int) -> int:
        return steps_per_epoch(
            self.train.num_examples, self.train.process_count, per_process_batch_size
        )

    def train_batches(self, per_process_batch_size: int, start_step: int) -> Any:
        """Global uint8 train batches from `start_step` on, forever.

        Returns:
          An iterator of {"image": uint8 [B, H, W, 3], "label": int32 [B]} global arrays
          sharded over the mesh; on the stream path it has `iterator` (grain's, whose
          state goes into checkpoints) and `close()` (stops the workers).
        """
        config = self.config
        if self.mode == "device":
            return device.DeviceTrainBatches(
                self.train,
                self.mesh,
                per_process_batch_size=per_process_batch_size,
                seed=config.seed,
                start_step=start_step,
                crop_padding=config.crop_padding,
                random_flip=config.random_flip,
            )
        from resnet_jax.data import stream

        iterator = stream.train_batches(
            self.train,
            per_process_batch_size=per_process_batch_size,
            seed=config.seed,
            start_step=start_step,
            image_size=config.image_size,
            augment=config.augment,
            crop_padding=config.crop_padding,
            random_flip=config.random_flip,
            num_workers=num_workers(config),
        )
        return _GlobalBatches(iterator, self.mesh)

    def eval_batches(self, per_process_batch_size: int) -> tuple[int, Iterator[dict[str, Any]]]:
        """(number of batches, this process's padded, masked uint8 eval batches)."""
        count = num_eval_batches(
            self.eval.num_examples, self.eval.process_count, per_process_batch_size
        )
        if self.mode == "device":
            batches = device.eval_batches(
                self.eval, per_process_batch_size=per_process_batch_size, num_batches=count
            )
        else:
            from resnet_jax.data import stream

            batches = stream.eval_batches(
                self.eval,
                per_process_batch_size=per_process_batch_size,
                num_batches=count,
                image_size=self.config.image_size,
                resize_size=self.config.eval_resize_size,
                num_workers=num_workers(self.config),
            )
        return count, batches


class _GlobalBatches:
    """A host iterator of process-local batches, yielding global arrays.

    Attributes:
      iterator: The host iterator (grain's, checkpointable: saved with each step).
    """

    def __init__(self, iterator: Any, mesh: jax.sharding.Mesh):
        self.iterator = iterator
        self._mesh = mesh

    def __iter__(self) -> _GlobalBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return sharding.global_batch(next(self.iterator), self._mesh)

    def close(self) -> None:
        """Stops the worker processes."""
        self.iterator.close()


def num_workers(config: Any) -> int:
    """Worker processes of the streaming path: `config.input_workers`, -1 = one per core."""
    workers = config.input_workers
    if workers < 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return workers


def open_input(config: Any, mesh: jax.sharding.Mesh, *, train: bool = True) -> Input:
    """Opens the run's splits on the path `config.input` chooses.

    Args:
      config: The run's config (dataset, data_dir, input, augment, image_size, ...).
      mesh: The devices batches go to.
      train: False opens the evaluation split only (evaluating a checkpoint); `Input.train`
        is then the evaluation split too.

    Raises:
      DatasetError: any problem with the data or the input settings, with what to do.
    """
    count = 0
    if config.input == "auto" and config.augment == "crop_flip":
        count = sources.count_examples(config, config.train_split)
    mode = choose_mode(config, count, mesh)
    if mode == "device":
        opened = [sources.load_split(config, config.eval_split)]
        if train:
            opened.insert(0, sources.load_split(config, config.train_split))
    else:
        from resnet_jax.data import stream

        if config.dataset != "image_folder":
            # Prepared (downloaded, or from manual_dir) as array_record if it is not yet.
            sources.prepared_builder(config, file_format="array_record")
        opened = [stream.open_split(config, config.eval_split)]
        if train:
            opened.insert(0, stream.open_split(config, config.train_split))
    return Input(mode, opened[0], opened[-1], config, mesh)

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
step (`normalize`), the batch of step s is a pure function of (data, seed, s, global
batch size), the same on any number of processes and devices, every
evaluation example is counted once, and a file that cannot be read is named.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.data import device, sources, tfds_source
from resnet_jax.data.catalog import normalization, preprocessing
from resnet_jax.data.decode import read_image
from resnet_jax.data.errors import DatasetError
from resnet_jax.data.folders import IMAGE_EXTENSIONS
from resnet_jax.data.interface import Input, TrainBatches
from resnet_jax.data.sources import DatasetSplit, num_classes
from resnet_jax.data.splits import pad_batch
from resnet_jax.data.tfds_source import hide_accelerators_from_tensorflow

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "DatasetSplit",
    "Input",
    "TrainBatches",
    "choose_mode",
    "hide_accelerators_from_tensorflow",
    "normalization",
    "normalize",
    "num_classes",
    "open_input",
    "pad_batch",
    "preprocessing",
    "read_image",
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
    # CPU devices share the host's memory, each holding its own copy of the split.
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
    need = device.split_bytes(num_train_examples, config.image_size)
    return "device" if need <= _device_memory_budget(mesh) else "stream"


def open_input(config: Any, mesh: jax.sharding.Mesh, *, train: bool = True) -> Input:
    """Opens the run's splits on the path `config.input` chooses.

    Args:
      config: The run's config (dataset, data_dir, input, augment, image_size, ...).
      mesh: The devices batches go to.
      train: False opens the evaluation split only (evaluating a checkpoint); `Input.train`
        is then None.

    Raises:
      DatasetError: any problem with the data or the input settings, with what to do.
    """
    count = 0
    if config.input == "auto" and config.augment == "crop_flip":
        count = sources.count_examples(config, config.train_split)
    if choose_mode(config, count, mesh) == "device":
        eval_split = sources.load_split(config, config.eval_split)
        train_split = None
        if train:  # The whole split in every process: the order is global.
            train_split = sources.load_split(
                config, config.train_split, process_index=0, process_count=1
            )
        return device.DeviceInput(train_split, eval_split, config, mesh)
    from resnet_jax.data import stream

    if config.dataset != "image_folder":
        # Prepared (downloaded, or from manual_dir) as array_record if it is not yet.
        tfds_source.prepared_builder(config, file_format="array_record")
    eval_split = stream.open_split(config, config.eval_split)
    train_split = None
    if train:
        train_split = stream.open_split(
            config, config.train_split, process_index=0, process_count=1
        )
    return stream.StreamInput(train_split, eval_split, config, mesh)

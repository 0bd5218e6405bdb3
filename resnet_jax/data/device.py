"""The device-resident input path, for datasets that fit in accelerator memory.

Each process loads the whole training split once (`sources.load_split`) and places it,
uint8, on every one of its devices. From then on the host sends nothing: one compiled
program per step picks the examples of the step from an epoch order kept on the
devices, pads, crops and flips them, and hands the train step a uint8 batch already
split over the devices. The order of each epoch is drawn once, at the epoch's first
step, by another small compiled program.

The batch of step s is one global batch, whatever the topology: epoch e visits the
split in an order drawn from (seed, e), step s takes the next global batch of it, and
the crop offsets and flips of step s are drawn from (seed, s) for the whole global
batch. Each device computes only its own rows (its position along the mesh's "data"
axis). So a resumed run sees exactly the batches of an uninterrupted one, also on
another number of processes or devices, as long as the global batch is the same.

Evaluation batches come from this process's shard of the evaluation split, as uint8
(`eval_batches`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from resnet_jax import sharding
from resnet_jax.data import interface, splits
from resnet_jax.data.sources import DatasetSplit


def split_bytes(num_examples: int, image_size: int) -> int:
    """Bytes one device holds for a training split of `num_examples` RGB uint8 squares."""
    return num_examples * image_size * image_size * 3


def _on_every_local_device(value: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global array [num_devices, *value.shape]: row d is `value` of device d's process."""
    spec = jax.sharding.NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS))
    shape = (mesh.devices.size, *value.shape)
    # Called once per local device, each of which holds one row: this process's value.
    return jax.make_array_from_callback(shape, spec, lambda index: value[None])


def draw_augmentation(
    key: jax.Array, batch: int, crop_padding: int, random_flip: bool
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Crop offsets int32 [batch, 2] and flips bool [batch] drawn from `key`.

    Offsets are uniform in [0, 2 * crop_padding] on each axis, a flip has probability
    1/2 (never with random_flip False): the CIFAR augmentation of the paper (section 4.2).
    """
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (batch, 2), 0, 2 * crop_padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,)) & random_flip
    return offsets, flips


def apply_augmentation(
    images: jnp.ndarray, offsets: jnp.ndarray, flips: jnp.ndarray, crop_padding: int
) -> jnp.ndarray:
    """Each image zero-padded by `crop_padding`, cropped back at its offset, maybe flipped."""
    _, height, width, channels = images.shape
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    cropped = jax.vmap(
        lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
    )(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)


# Folded into the keys of the epoch order and of the crops and flips: runs of one process
# drew with its index, 0, before the order became global, and keep their batches.
_ORDER_KEY_TAG = 0


def _epoch_order(epoch: jnp.ndarray, *, root: jax.Array, num_rows: int) -> jnp.ndarray:
    """Per device: [1, num_rows], the order of `epoch` over the whole split."""
    key = jax.random.fold_in(jax.random.fold_in(root, splits.SHUFFLE_TAG), epoch)
    return jax.random.permutation(jax.random.fold_in(key, _ORDER_KEY_TAG), num_rows)[None]


def _draw_batch(
    images: jnp.ndarray,
    labels: jnp.ndarray,
    order: jnp.ndarray,
    step: jnp.ndarray,
    *,
    root: jax.Array,
    steps_per_epoch: int,
    global_batch: int,
    per_device: int,
    crop_padding: int,
    random_flip: bool,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Per device: its rows of the global batch of `step` (images, labels), and step + 1."""
    first_row = jax.lax.axis_index(sharding.DATA_AXIS) * per_device
    start = (step % steps_per_epoch) * global_batch + first_row
    rows = jax.lax.dynamic_slice(order[0], (start,), (per_device,))
    picked = images[0][rows]
    if crop_padding > 0 or random_flip:
        key = jax.random.fold_in(jax.random.fold_in(root, splits.CROP_FLIP_TAG), step)
        # Drawn for the whole global batch, then sliced: the same batch whatever the
        # number of processes and devices.
        offsets, flips = draw_augmentation(
            jax.random.fold_in(key, _ORDER_KEY_TAG), global_batch, crop_padding, random_flip
        )
        picked = apply_augmentation(
            picked,
            jax.lax.dynamic_slice_in_dim(offsets, first_row, per_device),
            jax.lax.dynamic_slice_in_dim(flips, first_row, per_device),
            crop_padding,
        )
    return picked, labels[0][rows], step + 1


class DeviceTrainBatches:
    """Train batches drawn on the devices from a split held there; see the module docstring.

    Iterating yields {"image": uint8 [B, H, W, 3], "label": int32 [B]} as global arrays
    sharded over the mesh's "data" axis, forever, starting at global step `start_step`.
    """

    def __init__(
        self,
        split: DatasetSplit,
        mesh: Mesh,
        *,
        per_process_batch_size: int,
        seed: int,
        start_step: int,
        crop_padding: int = 4,
        random_flip: bool = True,
    ):
        assert seed >= 0 and start_step >= 0 and crop_padding >= 0, (seed, start_step, crop_padding)
        assert split.process_count == 1, "the whole training split, in every process"
        global_batch, _ = sharding.process_rows(mesh, per_process_batch_size)
        per_device = global_batch // mesh.devices.size
        self.steps_per_epoch = splits.steps_per_epoch(split.num_examples, global_batch)
        self.checkpointable = None  # The step alone determines the batches.
        self._images = _on_every_local_device(split.images, mesh)
        self._labels = _on_every_local_device(split.labels.astype(np.int32), mesh)

        root = jax.random.key(seed)
        data, scalar = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
        order = functools.partial(_epoch_order, root=root, num_rows=split.num_examples)
        draw = functools.partial(
            _draw_batch,
            root=root,
            steps_per_epoch=self.steps_per_epoch,
            global_batch=global_batch,
            per_device=per_device,
            crop_padding=crop_padding,
            random_flip=random_flip,
        )
        self._order_fn = jax.jit(jax.shard_map(order, mesh=mesh, in_specs=scalar, out_specs=data))
        self._draw_fn = jax.jit(
            jax.shard_map(
                draw, mesh=mesh, in_specs=(data, data, data, scalar), out_specs=(data, data, scalar)
            ),
            donate_argnums=3,
        )
        # The step of the next batch. The draw advances its copy on the devices, so the
        # host sends nothing per step; the host's copy only tells when an epoch starts.
        self._step = start_step
        self._step_on_devices = jax.device_put(
            np.asarray(start_step, np.int32), sharding.replicated(mesh)
        )
        self._epoch, self._order = -1, None  # The epoch whose order `_order` holds.

    def __iter__(self) -> DeviceTrainBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        epoch = self._step // self.steps_per_epoch
        if epoch != self._epoch:
            self._order = self._order_fn(np.int32(epoch))
            self._epoch = epoch
        images, labels, self._step_on_devices = self._draw_fn(
            self._images, self._labels, self._order, self._step_on_devices
        )
        self._step += 1
        return {"image": images, "label": labels}

    def close(self) -> None:
        """Nothing to stop: the split stays on the devices until the object goes."""


def eval_batches(
    split: DatasetSplit, *, per_process_batch_size: int, num_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example of this process's shard once, in order, padded and masked.

    Args:
      split: This process's shard.
      per_process_batch_size: Examples per batch.
      num_batches: Batches to yield, the same in every process (see
        `splits.num_eval_batches`); batches past the end of the shard are all padding.

    Returns:
      An iterator of `num_batches` dicts: "image" uint8 [B, H, W, 3] (zeros where
      padded), "label" int32 [B] (0 where padded) and "mask" bool [B] (False where padded).

    Raises:
      DatasetError: num_batches is too small to cover the shard.
    """
    splits.check_eval_capacity(len(split.labels), per_process_batch_size, num_batches)
    return _eval_batches(split, per_process_batch_size, num_batches)


def _eval_batches(split: DatasetSplit, batch: int, num_batches: int) -> Iterator[dict[str, Any]]:
    for b in range(num_batches):
        rows = slice(b * batch, (b + 1) * batch)
        yield splits.pad_batch({"image": split.images[rows], "label": split.labels[rows]}, batch)


class DeviceInput(interface.Input):
    """The device-resident path: splits loaded into host memory, the training one placed on the devices."""

    mode = "device"

    def train_batches(self, per_process_batch_size: int, start_step: int) -> DeviceTrainBatches:
        assert self.train is not None, "opened for evaluation only"
        return DeviceTrainBatches(
            self.train,
            self.mesh,
            per_process_batch_size=per_process_batch_size,
            seed=self.config.seed,
            start_step=start_step,
            crop_padding=self.config.crop_padding,
            random_flip=self.config.random_flip,
        )

    def eval_batches(self, per_process_batch_size: int) -> tuple[int, Iterator[dict[str, Any]]]:
        count = self.num_eval_batches(per_process_batch_size)
        batches = eval_batches(
            self.eval, per_process_batch_size=per_process_batch_size, num_batches=count
        )
        return count, batches

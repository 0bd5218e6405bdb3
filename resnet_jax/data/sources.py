"""Where examples come from: the dataset's classes and splits, and in-memory loading.

`load_split` keeps each process's shard of a split in host memory as uint8 (CIFAR-100
train is 150 MB), ready to be placed on the devices (`data.device`); tfds datasets come
through `tfds_source`, image folders through `folders`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from resnet_jax.data import catalog, folders, splits, tfds_source


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value.
class DatasetSplit:
    """One process's shard of a split, in host memory.

    Attributes:
      images: uint8 [n_local, image_size, image_size, 3], this process's shard only.
      labels: int32 [n_local].
      num_examples: Examples in the whole split, all processes together.
      num_classes: Number of classes of the dataset.
      class_names: Name of each class, indexed by label.
      process_index: Which shard this is.
      process_count: Number of shards the split was cut into.
    """

    images: np.ndarray
    labels: np.ndarray
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...]
    process_index: int
    process_count: int


def class_names(config: Any) -> tuple[str, ...]:
    """The name of each class of `config.dataset`, by label, without preparing anything.

    Raises:
      DatasetError: Unknown dataset name, or an image folder that is missing.
    """
    if config.dataset == "image_folder":
        return tuple(folders.class_folders(folders.split_folder(config, config.train_split)))
    return tuple(tfds_source.tfds_builder(config).info.features["label"].names)


def num_classes(config: Any) -> int:
    """Returns the number of classes of `config.dataset` without preparing anything.

    Args:
      config: Needs `dataset`, `data_dir`.

    Returns:
      10 for cifar10, 100 for cifar100, the label count in a tfds dataset's metadata,
      the number of class folders in `<data_dir>/train` for image_folder.

    Raises:
      DatasetError: Unknown dataset name, or an image folder that is missing.
    """
    info = catalog.dataset_info(config)
    if info.num_classes is not None:
        return info.num_classes
    return len(class_names(config))


def count_examples(config: Any, split: str) -> int:
    """Examples in `split`, from tfds's metadata or the folder's file list; nothing decoded.

    A tfds dataset is prepared first if it is not yet (as `load_split` would).
    """
    if config.dataset == "image_folder":
        return len(folders.list_image_folder(config, split).labels)
    return tfds_source.split_info(tfds_source.prepared_builder(config), config, split).num_examples


def load_split(
    config: Any,
    split: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DatasetSplit:
    """Loads this process's shard of a split into host memory.

    Process i of P gets examples [i*n//P, (i+1)*n//P) of the split, in the fixed
    order the split is stored in (tfds's record order for CIFAR; for image
    folders a fixed shuffle of the files, so that no shard is missing classes).
    CIFAR is prepared by tfds on first use (downloaded, or read from
    `config.manual_dir`), and read from `config.data_dir` afterwards.

    Training loads the whole split in every process (process_index=0, process_count=1):
    its order is global, and each process takes its rows of each batch. Evaluation
    loads each process's shard.

    Args:
      config: Needs `dataset`, `data_dir`, `manual_dir`, `image_size` and (for image
        folders) `eval_resize_size`.
      split: A split of the tfds dataset ("train", "test", "validation", ...), or a
        subfolder of the image folder.
      process_index: This process; defaults to `jax.process_index()`.
      process_count: Number of processes; defaults to `jax.process_count()`.

    Returns:
      The shard, with images resized to `config.image_size` where needed.

    Raises:
      DatasetError: Any problem with the data: unknown dataset or split, a
        dataset that cannot be downloaded, a missing or malformed image folder,
        an unreadable image file.
    """
    process_index, process_count = splits.process_position(process_index, process_count)
    image_size = int(config.image_size)
    assert image_size > 0, image_size  # Checked by config_checks.validate.

    if config.dataset == "image_folder":
        images, labels, num_examples, names = folders.load(
            config, split, process_index, process_count, image_size
        )
    else:
        images, labels, num_examples, names = tfds_source.load(
            config, split, process_index, process_count
        )
        if images.shape[1:3] != (image_size, image_size):
            images = folders.resize_all(images, image_size)
    return DatasetSplit(
        images=images,
        labels=labels,
        num_examples=num_examples,
        num_classes=len(names),
        class_names=names,
        process_index=process_index,
        process_count=process_count,
    )

"""What is known about each dataset by name: classes, archive, channel statistics.

Only CIFAR-10/100 and image folders are described here; any other name is a
tensorflow-datasets dataset, looked up in tfds's catalogue and normalised with
ImageNet's statistics.
"""

import dataclasses
from typing import Any

import numpy as np

# Built in: statistics and offline instructions known. Any other name is looked up in
# tensorflow-datasets' catalogue (mnist, food101, imagenet2012, ...).
DATASET_NAMES = ("cifar10", "cifar100", "image_folder")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset's class count, download archive and per-channel statistics."""

    num_classes: int | None  # None: counted from the folder.
    archive: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Per-channel statistics of each training set, in [0, 1] pixel units. They are
# constants rather than computed from the data so that every process, and every
# run, normalises identically whatever shard it holds.
_DATASETS = {
    # CIFAR-10's std is the per-pixel std of the training set (0.247, ...), not the
    # (0.2023, 0.1994, 0.2010) found in many scripts, which does not match the data.
    "cifar10": DatasetInfo(
        10, "cifar-10-binary.tar.gz", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": DatasetInfo(
        100, "cifar-100-binary.tar.gz", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "image_folder": DatasetInfo(None, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Other tfds datasets are normalised with ImageNet's statistics, as image folders are.
_OTHER_TFDS = dataclasses.replace(_DATASETS["image_folder"])


def dataset_info(config: Any) -> DatasetInfo:
    return _DATASETS.get(config.dataset, _OTHER_TFDS)


def normalization(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """Returns the per-channel (mean, std) of `config.dataset` in [0, 1] pixel units.

    Args:
      config: Needs `dataset`.

    Returns:
      (mean, std), each float32 of shape (3,). Image folders get ImageNet's.
    """
    info = dataset_info(config)
    return np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)


def preprocessing(config: Any) -> dict[str, Any]:
    """What evaluation (and prediction) does to an image, as stored with a checkpoint."""
    mean, std = normalization(config)
    return {
        "image_size": int(config.image_size),
        "resize_size": int(config.eval_resize_size),
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
    }

"""Datasets in host memory and deterministic numpy batches.

tensorflow-datasets prepares CIFAR once; after that each process keeps only its
shard of a split in host memory as uint8 (CIFAR-100 train is 150 MB), and
batches are cut and augmented in numpy. The train batch at step s is a pure
function of (data, seed, s, process_index), so a run resumed at step s sees
exactly the batches an uninterrupted run would have seen.

TensorFlow is only used by tfds to prepare and read the records; it is kept off
the accelerators, which belong to JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import pathlib
import queue
import socket
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

DATASET_NAMES = ("cifar10", "cifar100", "image_folder")
SPLITS = ("train", "test")

# Extensions PIL decodes out of the box; other files in a class folder (README,
# .DS_Store, ...) are ignored rather than treated as broken images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR_HOST = "www.cs.toronto.edu"
_CIFAR_SIZE = 32


@dataclasses.dataclass(frozen=True)
class _DatasetInfo:
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
    "cifar10": _DatasetInfo(
        10, "cifar-10-binary.tar.gz", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": _DatasetInfo(
        100, "cifar-100-binary.tar.gz", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "image_folder": _DatasetInfo(None, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetError(ValueError):
    """A problem with the data or its configuration that the user has to fix."""


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


def _dataset_info(config: Any) -> _DatasetInfo:
    name = config.dataset
    if name not in _DATASETS:
        raise DatasetError(
            f"Unknown dataset {name!r}: config.dataset must be one of {DATASET_NAMES}, "
            f"for example --config.dataset=cifar100."
        )
    return _DATASETS[name]


def num_classes(config: Any) -> int:
    """Returns the number of classes of `config.dataset` without preparing anything.

    Args:
      config: Needs `dataset`, and `data_dir` for image folders.

    Returns:
      10 for cifar10, 100 for cifar100, the number of class folders in
      `<data_dir>/train` for image_folder.

    Raises:
      DatasetError: Unknown dataset name, or an image folder that is missing.
    """
    info = _dataset_info(config)
    if info.num_classes is not None:
        return info.num_classes
    return len(_class_folders(_image_folder_split_dir(config, "train")))


def normalization(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """Returns the per-channel (mean, std) of `config.dataset` in [0, 1] pixel units.

    Args:
      config: Needs `dataset`.

    Returns:
      (mean, std), each float32 of shape (3,). Image folders get ImageNet's.
    """
    info = _dataset_info(config)
    return np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)


def preprocessing(config: Any) -> dict[str, Any]:
    """What evaluation (and prediction) does to an image, as stored with a checkpoint."""
    mean, std = normalization(config)
    return {
        "image_size": int(config.image_size),
        "resize_size": int(config.get("eval_resize_size", 0)),
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
    }


def _shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    return (
        process_index * num_examples // process_count,
        (process_index + 1) * num_examples // process_count,
    )


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

    Args:
      config: Needs `dataset`, `data_dir`, `manual_dir`, `image_size` and (for image
        folders) `eval_resize_size`.
      split: "train" or "test".
      process_index: This process; defaults to `jax.process_index()`.
      process_count: Number of processes; defaults to `jax.process_count()`.

    Returns:
      The shard, with images resized to `config.image_size` where needed.

    Raises:
      DatasetError: Any problem with the data: unknown dataset or split, a
        dataset that cannot be downloaded, a missing or malformed image folder,
        an unreadable image file.
    """
    info = _dataset_info(config)
    if split not in SPLITS:
        raise DatasetError(f"Unknown split {split!r}: use one of {SPLITS}.")
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise DatasetError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )
    image_size = int(config.image_size)
    if image_size <= 0:
        raise DatasetError(f"config.image_size={image_size} must be positive, e.g. 32.")

    if config.dataset == "image_folder":
        images, labels, num_examples, class_names = _load_image_folder(
            config, split, process_index, process_count, image_size
        )
    else:
        images, labels, num_examples, class_names = _load_tfds(
            config, info, split, process_index, process_count
        )
        if image_size != _CIFAR_SIZE:
            images = _resize_all(images, image_size)
    return DatasetSplit(
        images=images,
        labels=labels,
        num_examples=num_examples,
        num_classes=len(class_names),
        class_names=class_names,
        process_index=process_index,
        process_count=process_count,
    )


# ----------------------------------------------------------------------------
# CIFAR through tensorflow-datasets.


def hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (which only reads data here) off the GPUs that JAX uses."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        # RuntimeError: TF was initialised earlier (main.py already hid the GPUs).
        pass


def _offline_help(config: Any, info: _DatasetInfo, builder: Any, reason: str) -> str:
    # tfds looks in <data_dir>/downloads/manual when manual_dir is not given, so
    # that folder works with or without the flag.
    folder = config.manual_dir or os.fspath(builder.data_dir_root / "downloads" / "manual")
    return (
        f"Cannot prepare dataset {config.dataset!r}: tensorflow-datasets has to download "
        f"{_CIFAR_URL}{info.archive}, and {reason}. To prepare it offline, download "
        f"{info.archive} from {_CIFAR_URL} on a machine with internet access, put it at "
        f"{os.path.join(folder, info.archive)} and rerun the same command with "
        f"--config.manual_dir={folder} . This is needed once: the prepared dataset is "
        f"stored in {builder.data_dir} and reused afterwards."
    )


def _can_reach(host: str, port: int = 443, timeout: float = 10.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _prepare(builder: Any, config: Any, info: _DatasetInfo) -> None:
    manual_dir = config.manual_dir
    # epath, not pathlib: tfds data dirs (and so the default manual dir) may be gs:// URLs.
    effective_manual_dir = epath.Path(manual_dir or builder.data_dir_root / "downloads" / "manual")
    have_archive = (effective_manual_dir / info.archive).is_file()
    behind_proxy = any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    )
    # Without network tfds retries the download 10 times with backoff, which
    # takes minutes (3.5 min measured with tfds 4.9.10) before it fails. One
    # direct connection attempt answers the same question in seconds. Behind a
    # proxy a direct connection says nothing, so let tfds try.
    if not have_archive and not behind_proxy and not _can_reach(_CIFAR_HOST):
        raise DatasetError(
            _offline_help(config, info, builder, f"this machine cannot reach {_CIFAR_HOST}")
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=download_config)
    except tfds.core.download.download_manager.NonMatchingChecksumError as e:
        raise DatasetError(
            f"The {info.archive} that tensorflow-datasets used has the wrong checksum, so it "
            f"is incomplete or not the official file. Download {info.archive} again from "
            f"{_CIFAR_URL}, put it at {effective_manual_dir / info.archive} and rerun. "
            f"Details: {e}"
        ) from e
    except Exception as e:
        # Processes that share a data_dir may prepare at the same time; the one
        # that finishes second fails to move its copy into place. The data is
        # there all the same.
        if tfds.builder(config.dataset, data_dir=config.data_dir).is_prepared():
            return
        import requests  # tfds downloads with it.

        if isinstance(e, tfds.download.DownloadError | requests.exceptions.RequestException):
            raise DatasetError(
                _offline_help(config, info, builder, f"the download failed ({e})")
            ) from e
        raise


def _load_tfds(
    config: Any, info: _DatasetInfo, split: str, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...]]:
    hide_accelerators_from_tensorflow()
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    if not builder.is_prepared():
        _prepare(builder, config, info)
        builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    num_examples = builder.info.splits[split].num_examples
    class_names = tuple(builder.info.features["label"].names)
    start, stop = _shard_bounds(num_examples, process_index, process_count)
    if start == stop:
        # tfds rejects empty slices; a process may still own no example of a
        # tiny split and must then take part in evaluation with padding only.
        empty = np.zeros((0, _CIFAR_SIZE, _CIFAR_SIZE, 3), np.uint8)
        return empty, np.zeros((0,), np.int32), num_examples, class_names
    data = tfds.as_numpy(
        builder.as_dataset(
            split=f"{split}[{start}:{stop}]",
            shuffle_files=False,
            batch_size=-1,
            # The default interleaves up to 16 files; one at a time keeps the
            # stored order, so the shards of all processes line up end to end.
            read_config=tfds.ReadConfig(interleave_cycle_length=1),
        )
    )
    images = np.ascontiguousarray(data["image"], dtype=np.uint8)
    labels = np.asarray(data["label"], dtype=np.int32)
    return images, labels, num_examples, class_names


# ----------------------------------------------------------------------------
# Image folders, read directly with PIL.
#
# tfds.folder_dataset.ImageFolder (tfds 4.9.10) does not fit, checked on a
# small folder: a corrupt file fails inside tf.data as an InvalidArgumentError
# ("Unknown image file format") that does not name the file; it does not
# resize, and as_dataset(batch_size=-1) silently zero-pads images of other sizes
# to the largest one; it lists only .jpg/.jpeg/.png (skipping .bmp/.gif without a
# word); and every subfolder of the root becomes a split. Reading the files with
# PIL gives file-level errors and one conversion for every format in a few lines.


def _image_folder_root(config: Any) -> pathlib.Path:
    if not config.data_dir:
        raise DatasetError(
            "config.data_dir is not set: with --config.dataset=image_folder pass "
            "--config.data_dir=/path/to/folder, a folder holding train/<class>/<image> and "
            "test/<class>/<image>."
        )
    root = pathlib.Path(config.data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"Image folder {root} does not exist: check --config.data_dir; it must hold "
            f"train/<class>/<image> and test/<class>/<image>."
        )
    return root


def _image_folder_split_dir(config: Any, split: str) -> pathlib.Path:
    root = _image_folder_root(config)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"Image folder {root} has no {split}/ subfolder ({split_dir} is missing): it "
            f"must hold train/<class>/<image> and test/<class>/<image>."
        )
    return split_dir


def _class_folders(split_dir: pathlib.Path) -> list[str]:
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(
            f"{split_dir} has no class folders: put each class's images in their own "
            f"subfolder, {split_dir}/<class_name>/<image>."
        )
    return names


def _list_images(class_dir: pathlib.Path) -> list[pathlib.Path]:
    files = sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DatasetError(
            f"Class folder {class_dir} has no images (files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}): add images to it or remove the folder."
        )
    return files


def _resize_and_crop(image: Image.Image, image_size: int, resize_size: int) -> Image.Image:
    """The evaluation geometry: see `read_image`."""
    if not resize_size:
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return image
    width, height = image.size
    if min(width, height) != resize_size:
        # The shorter side becomes resize_size; the longer one keeps the aspect ratio,
        # truncated as torchvision's Resize(int) does.
        if width <= height:
            size = (resize_size, int(resize_size * height / width))
        else:
            size = (int(resize_size * width / height), resize_size)
        image = image.resize(size, Image.Resampling.BILINEAR)
        width, height = image.size
    # The central crop, rounded as torchvision's CenterCrop rounds.
    left = int(round((width - image_size) / 2.0))
    top = int(round((height - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


def read_image(path: str | os.PathLike, image_size: int, resize_size: int = 0) -> np.ndarray:
    """Decodes an image file as evaluation sees it: uint8 [image_size, image_size, 3] RGB.

    Any mode (L, RGBA, P, CMYK, 16-bit, ...) is converted to RGB like torchvision's
    loader does (alpha dropped, first frame of an animation), after the EXIF rotation.

    Args:
      path: the file.
      image_size: side of the square result.
      resize_size: 0 resizes the whole image to image_size x image_size (CIFAR-like data);
        N > 0 resizes the shorter side to N (skipped when it is N already) and takes the
        central image_size square: the ImageNet evaluation (256, then 224).

    Raises:
      DatasetError: the file cannot be read as an image (the message names it), or
        0 < resize_size < image_size.
    """
    if 0 < resize_size < image_size:
        raise DatasetError(
            f"eval_resize_size={resize_size} must be 0 or at least image_size={image_size}."
        )
    try:
        with Image.open(path) as image:
            # Camera JPEGs are often stored sideways with an EXIF rotation tag.
            image = ImageOps.exif_transpose(image).convert("RGB")
            return np.asarray(_resize_and_crop(image, image_size, resize_size), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(
            f"Cannot read image file {path} ({type(e).__name__}: {e}): remove or replace this file."
        ) from e


def _fill_in_parallel(count: int, image_size: int, make: Any) -> np.ndarray:
    """uint8 [count, size, size, 3] with row i = make(i), made on every core.

    PIL releases the GIL while decoding and resizing, so threads use all cores.
    """
    out = np.zeros((count, image_size, image_size, 3), np.uint8)

    def fill(i: int) -> None:
        out[i] = make(i)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(fill, range(count)):
            pass
    return out


def _read_images(paths: list[pathlib.Path], image_size: int, resize_size: int) -> np.ndarray:
    return _fill_in_parallel(
        len(paths), image_size, lambda i: read_image(paths[i], image_size, resize_size)
    )


def _load_image_folder(
    config: Any, split: str, process_index: int, process_count: int, image_size: int
) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...]]:
    class_names = _class_folders(_image_folder_split_dir(config, "train"))
    split_dir = _image_folder_split_dir(config, split)
    if split != "train":
        split_classes = _class_folders(split_dir)
        if split_classes != class_names:
            missing = sorted(set(class_names) - set(split_classes))
            extra = sorted(set(split_classes) - set(class_names))
            raise DatasetError(
                f"{split_dir} must have the same class folders as "
                f"{split_dir.parent / 'train'}, but it lacks {missing} and has extra "
                f"{extra}: add or remove folders so that both list the same classes."
            )
    paths: list[pathlib.Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = _list_images(split_dir / name)
        paths.extend(files)
        labels.extend([label] * len(files))
    # Files are listed class by class; a fixed shuffle (the same in every process
    # and every run) keeps a contiguous shard from holding only a few classes.
    order = np.random.default_rng(0).permutation(len(paths))
    num_examples = len(paths)
    start, stop = _shard_bounds(num_examples, process_index, process_count)
    mine = order[start:stop]
    images = _read_images([paths[i] for i in mine], image_size, config.eval_resize_size)
    shard_labels = np.asarray(labels, dtype=np.int32)[mine]
    return images, shard_labels, num_examples, tuple(class_names)


def _resize_all(images: np.ndarray, image_size: int) -> np.ndarray:
    def resize(i: int) -> np.ndarray:
        image = Image.fromarray(images[i])
        return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))

    return _fill_in_parallel(len(images), image_size, resize)


# ----------------------------------------------------------------------------
# Batches.


def steps_per_epoch(num_examples: int, process_count: int, per_process_batch_size: int) -> int:
    """Returns the number of train steps in one epoch, the same for every process.

    Shards differ in size by at most one example; each process uses the first
    num_examples // process_count examples of its epoch permutation, and drops
    what does not fill a whole batch.

    Args:
      num_examples: Examples in the whole split.
      process_count: Number of processes.
      per_process_batch_size: Batch size of one process.

    Returns:
      (num_examples // process_count) // per_process_batch_size.

    Raises:
      DatasetError: The batch is larger than a process's shard.
    """
    if per_process_batch_size <= 0:
        raise DatasetError(f"per-process batch size {per_process_batch_size} must be positive.")
    per_process = num_examples // process_count
    steps = per_process // per_process_batch_size
    if steps == 0:
        raise DatasetError(
            f"The per-process batch size {per_process_batch_size} is larger than the "
            f"{per_process} training examples each of the {process_count} processes holds "
            f"({num_examples} in all), so an epoch has no step: use a smaller "
            f"--config.batch_size (at most {per_process * process_count} in all)."
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


def _as_channel_stats(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32).reshape(-1)
    if array.shape != (3,):
        raise DatasetError(f"{name} must have one value per RGB channel, got {value!r}.")
    return array


def _normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def _augment(
    images: np.ndarray, rng: np.random.Generator, crop_padding: int, random_flip: bool
) -> np.ndarray:
    """Random crop of the zero-padded images and random horizontal flip, as one gather."""
    batch, height, width, _ = images.shape
    rows = np.broadcast_to(np.arange(height), (batch, height))
    cols = np.broadcast_to(np.arange(width), (batch, width))
    if crop_padding > 0:
        p = crop_padding
        images = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = rng.integers(0, 2 * p + 1, size=(batch, 2))
        rows = rows + offsets[:, :1]
        cols = cols + offsets[:, 1:]
    if random_flip:
        flip = rng.random(batch) < 0.5
        cols = np.where(flip[:, None], cols[:, ::-1], cols)
    index = np.arange(batch)[:, None, None]
    return images[index, rows[:, :, None], cols[:, None, :]]


def train_batches(
    split: DatasetSplit,
    *,
    per_process_batch_size: int,
    seed: int,
    start_step: int,
    mean: Any,
    std: Any,
    crop_padding: int = 4,
    random_flip: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's train batches forever, from global step `start_step`.

    Step s belongs to epoch e = s // steps_per_epoch. Epoch e visits this
    process's shard in an order drawn from (seed, e, process_index), dropping the
    remainder; the augmentation of step s is drawn from (seed, s, process_index).
    So the batch of step s does not depend on where the iterator started.

    Args:
      split: This process's shard.
      per_process_batch_size: Examples per batch.
      seed: Data seed (non-negative).
      start_step: Global step of the first batch (non-negative).
      mean: Per-channel mean, [0, 1] units, shape (3,).
      std: Per-channel std, [0, 1] units, shape (3,).
      crop_padding: Zero padding on each side before the random crop back to
        the image size; 0 disables cropping.
      random_flip: Whether to flip horizontally with probability 1/2.

    Returns:
      An endless iterator of {"image": float32 [B, H, W, 3] normalised,
      "label": int32 [B]}. Arguments are checked at the call, not at the first
      batch.
    """
    if seed < 0 or start_step < 0:
        raise DatasetError(f"seed={seed} and start_step={start_step} must be non-negative.")
    if crop_padding < 0:
        raise DatasetError(f"crop_padding={crop_padding} must be >= 0.")
    mean = _as_channel_stats(mean, "mean")
    std = _as_channel_stats(std, "std")
    batch = per_process_batch_size
    steps = steps_per_epoch(split.num_examples, split.process_count, batch)
    return _train_batches(
        split, batch, steps, seed, start_step, mean, std, crop_padding, random_flip
    )


# Distinct stream tags keep the shuffle of epoch e and the augmentation of step s
# (often equal numbers) from drawing the same random stream.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def _train_batches(
    split: DatasetSplit,
    batch: int,
    steps: int,
    seed: int,
    step: int,
    mean: np.ndarray,
    std: np.ndarray,
    crop_padding: int,
    random_flip: bool,
) -> Iterator[dict[str, np.ndarray]]:
    num_local = len(split.labels)
    epoch, order = -1, None
    while True:
        step_epoch, index_in_epoch = divmod(step, steps)
        if step_epoch != epoch:
            epoch = step_epoch
            rng = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch, split.process_index])
            order = rng.permutation(num_local)
        indices = order[index_in_epoch * batch : (index_in_epoch + 1) * batch]
        images = split.images[indices]
        if crop_padding > 0 or random_flip:
            rng = np.random.default_rng([seed, _AUGMENT_STREAM, step, split.process_index])
            images = _augment(images, rng, crop_padding, random_flip)
        yield {"image": _normalize(images, mean, std), "label": split.labels[indices]}
        step += 1


def eval_batches(
    split: DatasetSplit,
    *,
    per_process_batch_size: int,
    num_batches: int,
    mean: Any,
    std: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example of this process's shard once, in order, padded and masked.

    Args:
      split: This process's shard.
      per_process_batch_size: Examples per batch.
      num_batches: Batches to yield, the same in every process (see
        `num_eval_batches`); batches past the end of the shard are all padding.
      mean: Per-channel mean, [0, 1] units, shape (3,).
      std: Per-channel std, [0, 1] units, shape (3,).

    Returns:
      An iterator of `num_batches` dicts: "image" float32 [B, H, W, 3]
      normalised (zeros where padded), "label" int32 [B] (0 where padded) and
      "mask" bool [B] (False where padded).

    Raises:
      DatasetError: num_batches is too small to cover the shard.
    """
    batch = per_process_batch_size
    if batch <= 0:
        raise DatasetError(f"per-process batch size {batch} must be positive.")
    num_local = len(split.labels)
    if num_batches * batch < num_local:
        raise DatasetError(
            f"{num_batches} eval batches of {batch} cannot hold the {num_local} examples of "
            f"this process: compute num_batches with num_eval_batches()."
        )
    mean = _as_channel_stats(mean, "mean")
    std = _as_channel_stats(std, "std")
    return _eval_batches(split, batch, num_batches, mean, std)


def _eval_batches(
    split: DatasetSplit, batch: int, num_batches: int, mean: np.ndarray, std: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    shape = split.images.shape[1:]
    for b in range(num_batches):
        images = split.images[b * batch : (b + 1) * batch]
        count = len(images)
        image = np.zeros((batch, *shape), np.float32)
        label = np.zeros((batch,), np.int32)
        image[:count] = _normalize(images, mean, std)
        label[:count] = split.labels[b * batch : (b + 1) * batch]
        yield {"image": image, "label": label, "mask": np.arange(batch) < count}


# ----------------------------------------------------------------------------
# Prefetch.

T = TypeVar("T")


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetch(iterator: Iterable[T], buffer_size: int = 2) -> Iterator[T]:
    """Runs `iterator` ahead in a background thread, `buffer_size` items deep.

    The thread starts at once, so the first batches are being made while the
    caller still sets up. An exception raised by `iterator` is re-raised in the
    consumer. The thread is a daemon so it never keeps the program from exiting,
    and it stops producing once the returned iterator is closed or collected.

    Args:
      iterator: Items to produce (typically `train_batches(...)`).
      buffer_size: Items produced ahead of the consumer (at least 1).

    Returns:
      An iterator over the same items.
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size={buffer_size} must be >= 1.")
    items: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        # Time out now and then to notice a consumer that has gone away.
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # noqa: B036 - handed to the consumer, not swallowed.
            put(_Raised(e))
            return
        put(_DONE)

    threading.Thread(target=produce, name="prefetch", daemon=True).start()

    def consume() -> Iterator[T]:
        try:
            while True:
                item = items.get()
                if item is _DONE:
                    return
                if isinstance(item, _Raised):
                    raise item.error
                yield item
        finally:
            stop.set()

    return consume()

"""Where examples come from: tfds datasets, image folders, image files.

tensorflow-datasets prepares CIFAR once; after that `load_split` keeps each
process's shard of a split in host memory as uint8 (CIFAR-100 train is 150 MB),
ready to be placed on the devices (`data.device`). Image folders are listed here
and decoded with PIL, file by file (`read_image`), which names any file it
cannot read.

TensorFlow is only used by tfds to prepare and read the records; it is kept off
the accelerators, which belong to JAX.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import pathlib
import socket
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps

# Built in: statistics and offline instructions known. Any other name is looked up in
# tensorflow-datasets' catalogue (mnist, food101, imagenet2012, ...).
DATASET_NAMES = ("cifar10", "cifar100", "image_folder")

# Extensions PIL decodes out of the box; other files in a class folder (README,
# .DS_Store, ...) are ignored rather than treated as broken images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR_HOST = "www.cs.toronto.edu"
# Where tfds downloads most datasets from (its own mirror, and many datasets' sources).
_TFDS_HOST = "storage.googleapis.com"


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
# Other tfds datasets are normalised with ImageNet's statistics, as image folders are.
_OTHER_TFDS = dataclasses.replace(_DATASETS["image_folder"])


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
    return _DATASETS.get(config.dataset, _OTHER_TFDS)


def tfds_builder(config: Any) -> Any:
    """tfds's builder of `config.dataset` in `config.data_dir` (nothing is prepared).

    Raises:
      DatasetError: no such dataset in tfds's catalogue, or one without an "image"
        and a class "label" feature.
    """
    try:
        builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetError(
            f"Unknown dataset {config.dataset!r}: config.dataset is neither image_folder nor a "
            f"tensorflow-datasets dataset; use image_folder or the name of a tfds image "
            f"classification dataset (cifar10, cifar100, imagenet2012, ...; see "
            f"https://www.tensorflow.org/datasets/catalog)."
        ) from e
    features = builder.info.features
    label = features["label"] if "label" in features else None
    if "image" not in features or not isinstance(label, tfds.features.ClassLabel):
        raise DatasetError(
            f"tfds dataset {config.dataset!r} is not an image classification dataset: it "
            f"needs an 'image' feature and a class 'label' feature, it has {list(features)}."
        )
    return builder


def class_names(config: Any) -> tuple[str, ...]:
    """The name of each class of `config.dataset`, by label, without preparing anything.

    Raises:
      DatasetError: Unknown dataset name, or an image folder that is missing.
    """
    if config.dataset == "image_folder":
        return tuple(
            _class_folders(_image_folder_split_dir(config, config.get("train_split", "train")))
        )
    return tuple(tfds_builder(config).info.features["label"].names)


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
    info = _dataset_info(config)
    if info.num_classes is not None:
        return info.num_classes
    return len(class_names(config))


def count_examples(config: Any, split: str) -> int:
    """Examples in `split`, from tfds's metadata or the folder's file list; nothing decoded.

    A tfds dataset is prepared first if it is not yet (as `load_split` would).
    """
    if config.dataset == "image_folder":
        return len(list_image_folder(config, split).labels)
    return split_info(prepared_builder(config), config, split).num_examples


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
    process_index, process_count = process_position(process_index, process_count)
    image_size = int(config.image_size)
    if image_size <= 0:
        raise DatasetError(f"config.image_size={image_size} must be positive, e.g. 32.")

    if config.dataset == "image_folder":
        images, labels, num_examples, names = _load_image_folder(
            config, split, process_index, process_count, image_size
        )
    else:
        images, labels, num_examples, names = _load_tfds(
            config, split, process_index, process_count
        )
        if images.shape[1:3] != (image_size, image_size):
            images = _resize_all(images, image_size)
    return DatasetSplit(
        images=images,
        labels=labels,
        num_examples=num_examples,
        num_classes=len(names),
        class_names=names,
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
    if info.archive is None:
        return (
            f"Cannot prepare tfds dataset {config.dataset!r}: {reason}. Some datasets "
            f"(imagenet2012, ...) must be downloaded by hand: follow the instructions at "
            f"https://www.tensorflow.org/datasets/catalog/{config.dataset}, put the files in "
            f"a folder and pass it as --config.manual_dir. The prepared dataset is stored in "
            f"{builder.data_dir} and reused afterwards."
        )
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
    if info.archive is None:
        # Other tfds datasets: any file in the manual folder may be what they need.
        have_archive = effective_manual_dir.is_dir() and any(effective_manual_dir.iterdir())
        host = _TFDS_HOST
    else:
        have_archive = (effective_manual_dir / info.archive).is_file()
        host = _CIFAR_HOST
    behind_proxy = any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    )
    # Without network tfds retries the download 10 times with backoff, which
    # takes minutes (3.5 min measured with tfds 4.9.10) before it fails. One
    # direct connection attempt answers the same question in seconds. Behind a
    # proxy a direct connection says nothing, so let tfds try.
    if not have_archive and not behind_proxy and not _can_reach(host):
        raise DatasetError(
            _offline_help(config, info, builder, f"this machine cannot reach {host}")
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=download_config)
    except tfds.core.download.download_manager.NonMatchingChecksumError as e:
        if info.archive is None:
            raise DatasetError(
                _offline_help(config, info, builder, f"a checksum failed: {e}")
            ) from e
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
        if tfds.builder(config.dataset, data_dir=config.data_dir or None).is_prepared():
            return
        import requests  # tfds downloads with it.

        if info.archive is None:
            # Manual-download datasets fail with an AssertionError naming the folder.
            raise DatasetError(_offline_help(config, info, builder, f"tfds says: {e}")) from e
        if isinstance(e, tfds.download.DownloadError | requests.exceptions.RequestException):
            raise DatasetError(
                _offline_help(config, info, builder, f"the download failed ({e})")
            ) from e
        raise


def prepared_builder(config: Any, file_format: str | None = None) -> Any:
    """tfds's builder of `config.dataset`, prepared (downloaded, or from manual_dir) if needed.

    Args:
      config: Needs `dataset`, `data_dir`, `manual_dir`.
      file_format: How to store a dataset prepared here ("array_record" for the
        streaming path); None is tfds's default. An already prepared dataset is used
        as it is.
    """
    hide_accelerators_from_tensorflow()
    builder = tfds_builder(config)
    if not builder.is_prepared():
        if file_format is not None:
            builder = tfds.builder(
                config.dataset, data_dir=config.data_dir or None, file_format=file_format
            )
        _prepare(builder, config, _dataset_info(config))
        builder = tfds_builder(config)
    return builder


def split_info(builder: Any, config: Any, split: str) -> Any:
    if split not in builder.info.splits:
        raise DatasetError(
            f"tfds dataset {config.dataset!r} has no split {split!r}; it has "
            f"{sorted(builder.info.splits)}: set --config.train_split / --config.eval_split."
        )
    return builder.info.splits[split]


def _load_tfds(
    config: Any, split: str, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...]]:
    builder = prepared_builder(config)
    num_examples = split_info(builder, config, split).num_examples
    names = tuple(builder.info.features["label"].names)
    shape = builder.info.features["image"].shape
    if None in shape[:2]:
        raise DatasetError(
            f"tfds dataset {config.dataset!r} has images of varying sizes, which are not "
            f"held in memory: use --config.input=stream."
        )
    start, stop = _shard_bounds(num_examples, process_index, process_count)
    if start == stop:
        # tfds rejects empty slices; a process may still own no example of a
        # tiny split and must then take part in evaluation with padding only.
        empty = np.zeros((0, *shape[:2], 3), np.uint8)
        return empty, np.zeros((0,), np.int32), num_examples, names
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
    if images.shape[-1] == 1:  # Grayscale (mnist, ...): the same value in R, G and B.
        images = np.repeat(images, 3, axis=-1)
    labels = np.asarray(data["label"], dtype=np.int32)
    return images, labels, num_examples, names


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


def _read_images(paths: list[str], image_size: int, resize_size: int) -> np.ndarray:
    return _fill_in_parallel(
        len(paths), image_size, lambda i: read_image(paths[i], image_size, resize_size)
    )


@dataclasses.dataclass(frozen=True, eq=False)
class FolderListing:
    """The image files of one split of an image folder, with labels; nothing decoded.

    Files are listed class by class, then put in a fixed shuffled order (the same in
    every process and every run), so that a contiguous shard holds every class.

    Attributes:
      split_dir: The split's folder.
      names: bytes [n], each file's path relative to split_dir ("<class>/<file>"): a
        few tens of bytes per file, not a Python object, for million-file folders.
      labels: int32 [n], index of each file's class in `class_names`.
      class_names: The class folders of the training split, sorted.
    """

    split_dir: pathlib.Path
    names: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def path(self, index: int) -> str:
        return os.path.join(self.split_dir, os.fsdecode(self.names[index]))

    def shard(self, process_index: int, process_count: int) -> FolderListing:
        """Process i of P's files: [i*n//P, (i+1)*n//P) of the shuffled list."""
        start, stop = _shard_bounds(len(self.labels), process_index, process_count)
        return dataclasses.replace(
            self, names=self.names[start:stop], labels=self.labels[start:stop]
        )


def list_image_folder(config: Any, split: str) -> FolderListing:
    """Lists `<data_dir>/<split>/<class>/<image>`; classes are those of the training split.

    Raises:
      DatasetError: a missing folder, no class folders, an empty class, or classes
        that differ from the training split's.
    """
    train_split = config.get("train_split", "train")
    class_names = _class_folders(_image_folder_split_dir(config, train_split))
    split_dir = _image_folder_split_dir(config, split)
    if split != train_split:
        split_classes = _class_folders(split_dir)
        if split_classes != class_names:
            missing = sorted(set(class_names) - set(split_classes))
            extra = sorted(set(split_classes) - set(class_names))
            raise DatasetError(
                f"{split_dir} must have the same class folders as "
                f"{split_dir.parent / train_split}, but it lacks {missing} and has extra "
                f"{extra}: add or remove folders so that both list the same classes."
            )
    names: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = _list_images(split_dir / name)
        names.extend(os.fsencode(os.path.join(name, f.name)) for f in files)
        labels.extend([label] * len(files))
    order = np.random.default_rng(0).permutation(len(names))
    return FolderListing(
        split_dir=split_dir,
        names=np.asarray(names, dtype=bytes)[order],
        labels=np.asarray(labels, dtype=np.int32)[order],
        class_names=tuple(class_names),
    )


def _load_image_folder(
    config: Any, split: str, process_index: int, process_count: int, image_size: int
) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...]]:
    listing = list_image_folder(config, split)
    mine = listing.shard(process_index, process_count)
    paths = [mine.path(i) for i in range(len(mine.labels))]
    images = _read_images(paths, image_size, config.eval_resize_size)
    return images, mine.labels, len(listing.labels), listing.class_names


def _resize_all(images: np.ndarray, image_size: int) -> np.ndarray:
    def resize(i: int) -> np.ndarray:
        image = Image.fromarray(images[i])
        return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))

    return _fill_in_parallel(len(images), image_size, resize)


# ----------------------------------------------------------------------------
# How a split divides into batches.


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

"""Image folders: listing, sharding and loading them, and writing them.

A folder holds `<split>/<class>/<image>`; classes are the training split's folder
names, sorted. Every file is decoded by `decode.read_image`, which names any file it
cannot read.

Not tfds's `ImageFolder`: a corrupt file fails inside tf.data without its name, images
of other sizes are zero-padded rather than resized, only .jpg/.jpeg/.png are listed,
and every subfolder of the root becomes a split (docs/design_notes.md).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax.data import splits
from resnet_jax.data.decode import read_image
from resnet_jax.data.errors import DatasetError

# Extensions PIL decodes out of the box; other files in a class folder (README,
# .DS_Store, ...) are ignored rather than treated as broken images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _root(config: Any) -> pathlib.Path:
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


def split_folder(config: Any, split: str) -> pathlib.Path:
    root = _root(config)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"Image folder {root} has no {split}/ subfolder ({split_dir} is missing): it "
            f"must hold train/<class>/<image> and test/<class>/<image>."
        )
    return split_dir


def class_folders(split_dir: pathlib.Path) -> list[str]:
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
        start, stop = splits.shard_bounds(len(self.labels), process_index, process_count)
        return dataclasses.replace(
            self, names=self.names[start:stop], labels=self.labels[start:stop]
        )


def list_image_folder(config: Any, split: str) -> FolderListing:
    """Lists `<data_dir>/<split>/<class>/<image>`; classes are those of the training split.

    Raises:
      DatasetError: a missing folder, no class folders, an empty class, or classes
        that differ from the training split's.
    """
    train_split = config.train_split
    class_names = class_folders(split_folder(config, train_split))
    split_dir = split_folder(config, split)
    if split != train_split:
        split_classes = class_folders(split_dir)
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


def load(
    config: Any, split: str, process_index: int, process_count: int, image_size: int
) -> tuple[np.ndarray, np.ndarray, int, tuple[str, ...]]:
    listing = list_image_folder(config, split)
    mine = listing.shard(process_index, process_count)
    paths = [mine.path(i) for i in range(len(mine.labels))]
    images = _read_images(paths, image_size, config.eval_resize_size)
    return images, mine.labels, len(listing.labels), listing.class_names


def resize_all(images: np.ndarray, image_size: int) -> np.ndarray:
    def resize(i: int) -> np.ndarray:
        image = Image.fromarray(images[i])
        return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))

    return _fill_in_parallel(len(images), image_size, resize)


def write_images(
    split_dir: str | os.PathLike,
    images: Any,
    labels: Any,
    class_folders: list[str],
    names: list[str],
) -> int:
    """Writes image i as `split_dir/<class_folders[labels[i]]>/<names[i]>` (format by suffix).

    The one writer of image folders: the dataset exports and the benchmarks use it.

    Args:
      split_dir: The split's folder (created, with every class folder, even empty ones).
      images: uint8 arrays [H, W] (grey) or [H, W, 3], one per image.
      labels: The class index of each image.
      class_folders: Folder name of each class.
      names: File name of each image, e.g. "00042.png".

    Returns:
      The number of images written.
    """
    split_dir = pathlib.Path(split_dir)
    for folder in class_folders:
        (split_dir / folder).mkdir(parents=True, exist_ok=True)
    count = 0
    for image, label, name in zip(images, labels, names, strict=True):
        Image.fromarray(np.asarray(image, np.uint8)).save(split_dir / class_folders[label] / name)
        count += 1
    return count

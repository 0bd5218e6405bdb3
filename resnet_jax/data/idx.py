"""Reader of the MNIST idx format (MNIST, Fashion-MNIST, KMNIST, EMNIST).

The format (LeCun's MNIST page): a big-endian header of two zero bytes, a type byte
(0x08: unsigned byte) and a byte giving the number of dimensions, then one big-endian
uint32 per dimension, then the values in row-major order. Image files have 3
dimensions (count, rows, columns; magic 0x00000803), label files 1 (magic 0x00000801).
Files may be gzip-compressed (`.gz`), as the datasets are distributed.

Torchvision (`FashionMNIST(raw/...)`), Keras (`~/.keras/datasets/fashion-mnist`) and
Debian's `dataset-fashion-mnist` keep these same files, so they train here without a
download: scripts/export_idx.py writes them as an image folder.
"""

import dataclasses
import gzip
import math
import pathlib

import numpy as np

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_UNSIGNED_BYTE = 0x08

# The file names of the official distribution, per split (with or without .gz).
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Fashion-MNIST's classes in label order (the dataset's README).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class IdxError(Exception):
    """An idx file that is missing, truncated, of another kind, or not matching its pair."""


@dataclasses.dataclass(frozen=True)
class IdxSplit:
    images: np.ndarray  # uint8 [n, rows, cols]
    labels: np.ndarray  # uint8 [n]


def read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
    """The array stored in one idx file, checked against the expected magic number.

    Raises:
      IdxError: the file is missing, not idx, of the other kind, or shorter or longer
        than its header says.
    """
    path = pathlib.Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise IdxError(f"{path} does not exist.") from None
    except (OSError, EOFError) as e:
        raise IdxError(f"{path} cannot be read ({e}): the file is damaged or not gzip.") from None
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise IdxError(f"{path} is {len(data)} bytes, too short for an idx header.")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        other = {IMAGES_MAGIC: "an images file", LABELS_MAGIC: "a labels file"}.get(found)
        what = f"it is {other}" if other else "not an idx file"
        raise IdxError(
            f"{path}: magic number 0x{found:08x} where {kind} have 0x{magic:08x}: {what}."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if data[2] != _UNSIGNED_BYTE or len(data) < header:
        raise IdxError(f"{path}: not an unsigned-byte idx file with a complete header.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    # math.prod: a damaged header's dimensions can overflow np.prod's int64.
    expected = header + math.prod(shape)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise IdxError(
            f"{path} is {state}: its header gives shape {shape}, {expected:,} bytes, but the "
            f"file holds {len(data):,}. Download or copy it again."
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def find_file(folder: pathlib.Path, stem: str) -> pathlib.Path:
    """folder/stem, or folder/stem.gz; the missing-file error names both."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise IdxError(f"{folder} has neither {stem} nor {stem}.gz.")


def read_split(folder: pathlib.Path, split: str) -> IdxSplit:
    """The images and labels of `split` ("train" or "test") from the official file names.

    Raises:
      IdxError: a file is missing or damaged, or the two files disagree on the count.
    """
    folder = pathlib.Path(folder)
    images_stem, labels_stem = SPLIT_FILES[split]
    images = read_idx(find_file(folder, images_stem), IMAGES_MAGIC)
    labels = read_idx(find_file(folder, labels_stem), LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise IdxError(
            f"{folder}: {split} images must be 3-dimensional and labels 1-dimensional, got "
            f"shapes {images.shape} and {labels.shape}."
        )
    if len(images) != len(labels):
        raise IdxError(
            f"{folder}: the {split} split has {len(images):,} images but {len(labels):,} "
            "labels: the two files are not a pair."
        )
    return IdxSplit(images=images, labels=labels)

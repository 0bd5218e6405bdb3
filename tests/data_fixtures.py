"""Small datasets in the real on-disk formats, written for tests.

Tests import this module directly (`from data_fixtures import ...`): pytest puts
tests/ on sys.path because tests/ has a conftest.py and no __init__.py.
"""

from __future__ import annotations

import io
import os
import tarfile
from unittest import mock

import numpy as np
from PIL import Image

CIFAR100_ARCHIVE = "cifar-100-binary.tar.gz"

FINE_LABEL_NAMES = tuple(f"fine_{i:02d}" for i in range(100))
COARSE_LABEL_NAMES = tuple(f"coarse_{i:02d}" for i in range(20))


def _cifar100_records(
    rng: np.random.Generator, num: int
) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(num, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, size=num).astype(np.int32)
    coarse = (fine // 5).astype(np.int32)
    records = np.empty((num, 2 + 3072), dtype=np.uint8)
    records[:, 0] = coarse
    records[:, 1] = fine
    # The official layout is channel-major: 1024 R, then 1024 G, then 1024 B.
    records[:, 2:] = images.transpose(0, 3, 1, 2).reshape(num, 3072)
    return records.tobytes(), images, fine, coarse


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar100_archive(
    manual_dir: str | os.PathLike, num_train: int, num_test: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Writes `manual_dir/cifar-100-binary.tar.gz` in the official binary format.

    Every image is uniformly random noise, so no two images are equal and a test
    can find each loaded image in the archive by its pixels.

    Args:
      manual_dir: Folder to write the archive into (created if missing).
      num_train: Number of training records.
      num_test: Number of test records.
      seed: Seed of the random pixels and labels.

    Returns:
      {"train": {...}, "test": {...}}, each with "images" (uint8 [n, 32, 32, 3],
      HWC, in archive order), "fine_labels" and "coarse_labels" (int32 [n]).
    """
    rng = np.random.default_rng(seed)
    os.makedirs(manual_dir, exist_ok=True)
    written = {}
    members = {}
    for split, num in (("train", num_train), ("test", num_test)):
        data, images, fine, coarse = _cifar100_records(rng, num)
        members[f"{split}.bin"] = data
        written[split] = {"images": images, "fine_labels": fine, "coarse_labels": coarse}
    members["coarse_label_names.txt"] = ("\n".join(COARSE_LABEL_NAMES) + "\n").encode()
    members["fine_label_names.txt"] = ("\n".join(FINE_LABEL_NAMES) + "\n").encode()
    with tarfile.open(os.path.join(manual_dir, CIFAR100_ARCHIVE), "w:gz") as tar:
        for name, data in members.items():
            _add_member(tar, f"cifar-100-binary/{name}", data)
    return written


def prepare_cifar100(
    data_dir: str | os.PathLike, manual_dir: str | os.PathLike, file_format: str | None = None
) -> None:
    """Prepares tfds's real cifar100 builder from a test archive in `manual_dir`.

    Only the checksum validation is patched: the test archive is in the official
    format but is not the official file, so its sha256 cannot match the one tfds
    registers. Product code never does this.

    Args:
      data_dir: tfds data directory to prepare into.
      manual_dir: Folder holding cifar-100-binary.tar.gz.
      file_format: tfds file format; None is tfds's default (tfrecord). The streaming
        input reads through random access, which needs "array_record".
    """
    import tensorflow_datasets as tfds

    def record_without_validating(self, url, url_info, path):
        del path
        # Keep the bookkeeping the real method does; skip only the comparison.
        self._recorded_url_infos[url] = url_info

    with mock.patch.object(
        tfds.download.DownloadManager,
        "_register_or_validate_checksums",
        record_without_validating,
    ):
        extra = {"file_format": file_format} if file_format else {}
        builder = tfds.builder("cifar100", data_dir=os.fspath(data_dir), **extra)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
        )


def write_image_folder(
    root: str | os.PathLike,
    class_colors: dict[str, tuple[int, int, int]],
    num_train_per_class: int,
    num_test_per_class: int,
    size: int = 32,
    seed: int = 0,
    mixed_formats: bool = False,
) -> dict[str, dict[str, list[str]]]:
    """Writes `root/{train,test}/<class>/*.png`: each class a dominant colour plus noise.

    The noise (+-24 per channel) is small next to typical colour differences, so a
    tiny network tells the classes apart easily; the colour is also what tests use
    to check that an image came back with the right label.

    Args:
      root: Folder to create.
      class_colors: Class name -> RGB colour of its images.
      num_train_per_class: Images per class in train/.
      num_test_per_class: Images per class in test/.
      size: Side of the square images (PNG).
      seed: Seed of the noise.
      mixed_formats: If True, the first images of each train class are written
        as a grayscale PNG (of the colour's luminance, so only shape is checked),
        an RGBA PNG, a JPEG of another size and a palette PNG, to exercise
        conversion to RGB and resizing.

    Returns:
      {split: {class: [file paths]}}.
    """
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, list[str]]] = {}
    for split, num in (("train", num_train_per_class), ("test", num_test_per_class)):
        written[split] = {}
        for name, color in class_colors.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            paths = []
            for i in range(num):
                noise = rng.integers(-24, 25, size=(size, size, 3))
                pixels = np.clip(np.asarray(color)[None, None, :] + noise, 0, 255)
                image = Image.fromarray(pixels.astype(np.uint8), "RGB")
                path = os.path.join(folder, f"{i:04d}.png")
                if mixed_formats and split == "train" and i < 4:
                    if i == 0:
                        image = image.convert("L")
                    elif i == 1:
                        image = image.convert("RGBA")
                    elif i == 2:
                        image = image.resize((size * 2 + 3, size + 5))
                        path = os.path.join(folder, f"{i:04d}.jpg")
                    else:
                        image = image.convert("P")
                image.save(path)
                paths.append(path)
            written[split][name] = paths
    return written


IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """`array` (uint8) in the idx format: 0, 0, type 0x08, ndim, big-endian dims, values."""
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_dataset(
    folder: str | os.PathLike, num_train: int, num_test: int, size: int = 28, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """The four gzip idx files of an MNIST-like dataset, with the official names.

    Labels cycle through 0-9 (every class present); pixels are random. Returns
    {split: {"images": uint8 [n, size, size], "labels": uint8 [n]}} as written.
    """
    import gzip

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for name, array in zip(IDX_FILES[split], (images, labels), strict=True):
            with gzip.open(os.path.join(folder, name), "wb") as f:
                f.write(idx_bytes(array))
        written[split] = {"images": images, "labels": labels}
    return written

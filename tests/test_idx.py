"""resnet_jax/data/idx.py and scripts/export_idx.py on idx files written here in the real format."""

import gzip
import importlib.util
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from resnet_jax.data import idx

# Train labels in file order, two of each class, shuffled so that "the first of each class"
# is not simply the first ten; the test split cycles through the classes once.
TRAIN_LABELS = [3, 7, 0, 3, 9, 1, 5, 0, 2, 8, 6, 4, 1, 9, 7, 5, 2, 6, 8, 4]
TEST_LABELS = list(range(10))
# The first image of each class in TRAIN_LABELS (0 at 2, 1 at 5, 2 at 8, 3 at 0, ...), sorted.
FIRST_OF_EACH_CLASS = [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
FOLDERS = (
    "0_t_shirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def images_bytes(images):
    """An idx3-ubyte file: magic 0x00000803, count, rows, columns (big-endian), pixels."""
    count, rows, cols = images.shape
    return struct.pack(">IIII", 0x803, count, rows, cols) + images.astype(np.uint8).tobytes()


def labels_bytes(labels):
    """An idx1-ubyte file: magic 0x00000801, count, then one byte per label."""
    return struct.pack(">II", 0x801, len(labels)) + bytes(labels)


def write_gzip(path, data):
    with gzip.open(path, "wb") as f:
        f.write(data)


def write_dataset(folder, seed=0):
    """The four official gzip files; returns {split: (images uint8 [n, 28, 28], labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, labels in (("train", TRAIN_LABELS), ("test", TEST_LABELS)):
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images_name, labels_name = FILES[split]
        write_gzip(folder / images_name, images_bytes(images))
        write_gzip(folder / labels_name, labels_bytes(labels))
        written[split] = (images, np.asarray(labels, np.uint8))
    return written


def load_export_idx():
    """scripts/export_idx.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("export_idx", ROOT / "scripts" / "export_idx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_export(*args):
    return subprocess.run(
        [sys.executable, "scripts/export_idx.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(src, written, out): the idx files, what they hold, and export_idx.py's folder of them
    (--classes fashion_mnist --train_subset 10)."""
    root = tmp_path_factory.mktemp("idx")
    written = write_dataset(root / "src")
    counts = load_export_idx().export(root / "src", root / "out", "fashion_mnist", 10)
    assert counts == {"train": 20, "test": 10, "train10": 10}
    return root / "src", written, root / "out"


def test_read_split_returns_exactly_what_was_written(exported):
    src, written, _ = exported
    for split, (images, labels) in written.items():
        read = idx.read_split(src, split)
        assert read.images.dtype == np.uint8 and read.images.shape == (len(labels), 28, 28)
        np.testing.assert_array_equal(read.images, images)
        np.testing.assert_array_equal(read.labels, labels)


def test_raw_files_read_as_gzip_ones(tmp_path):
    # Torchvision's raw/ folder keeps the files decompressed.
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels_bytes([9, 0, 4]))
    read = idx.read_split(tmp_path, "test")
    np.testing.assert_array_equal(read.images, images)
    assert read.labels.tolist() == [9, 0, 4]


@pytest.mark.parametrize(
    "kind,data,match",
    [
        # A download cut short: the header says 20 images, the last row of one is missing.
        (
            "images",
            lambda images: images_bytes(images)[:-28],
            r"is truncated: .* shape \(20, 28, 28\), 15,696 bytes, but the file holds 15,668",
        ),
        (
            "images",
            lambda images: images_bytes(images) + b"\0",
            r"is longer than its header says: .* 15,696 bytes, but the file holds 15,697",
        ),
        # The labels file under the images file's name, and the other way round.
        (
            "images",
            lambda images: labels_bytes(TRAIN_LABELS),
            r"magic number 0x00000801 where images have 0x00000803: it is a labels file",
        ),
        (
            "labels",
            lambda images: images_bytes(images),
            r"magic number 0x00000803 where labels have 0x00000801: it is an images file",
        ),
        ("images", lambda images: b"\0\0\x08", r"is 3 bytes, too short for an idx header"),
        (
            "images",
            lambda images: b"\x1f\x8b" + images_bytes(images)[2:],
            r"magic number 0x1f8b0803 where images have 0x00000803: not an idx file",
        ),
    ],
    ids=["truncated", "one_byte_long", "labels_as_images", "images_as_labels", "short", "other"],
)
def test_a_damaged_file_is_an_error_naming_it(tmp_path, kind, data, match):
    images, _ = write_dataset(tmp_path)["train"]
    name = FILES["train"][0 if kind == "images" else 1]
    write_gzip(tmp_path / name, data(images))
    with pytest.raises(idx.IdxError, match=match) as error:
        idx.read_split(tmp_path, "train")
    assert str(error.value).startswith(str(tmp_path / name))


def test_images_and_labels_of_other_counts_are_not_a_pair(tmp_path):
    write_dataset(tmp_path)
    write_gzip(tmp_path / FILES["train"][1], labels_bytes(TRAIN_LABELS[:19]))
    with pytest.raises(
        idx.IdxError, match=r"train split has 20 images but 19 labels: .* not a pair"
    ):
        idx.read_split(tmp_path, "train")


def test_a_gz_file_that_is_not_gzip(tmp_path):
    written = write_dataset(tmp_path)
    (tmp_path / FILES["test"][0]).write_bytes(images_bytes(written["test"][0]))  # Not gzipped.
    with pytest.raises(idx.IdxError, match=r"t10k-images-idx3-ubyte.gz cannot be read .*not gzip"):
        idx.read_split(tmp_path, "test")
    # A gzip stream cut short is damaged the same way.
    data = gzip.compress(images_bytes(written["test"][0]))
    (tmp_path / FILES["test"][0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(idx.IdxError, match=r"cannot be read .*damaged or not gzip"):
        idx.read_split(tmp_path, "test")


def test_a_missing_file_names_both_names(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / FILES["test"][1]).unlink()
    with pytest.raises(
        idx.IdxError, match=r"has neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte.gz"
    ):
        idx.read_split(tmp_path, "test")
    with pytest.raises(idx.IdxError, match=r"does not exist"):
        idx.read_idx(tmp_path / "nothing.gz", idx.IMAGES_MAGIC)


def test_export_writes_every_image_once_as_its_pixels(exported):
    _, written, out = exported
    for split, (images, labels) in written.items():
        assert sorted(p.name for p in (out / split).iterdir()) == list(FOLDERS)
        for label, folder in enumerate(FOLDERS):
            files = sorted((out / split / folder).iterdir())
            expected = np.flatnonzero(labels == label)
            assert [f.name for f in files] == [f"{i:05d}.png" for i in expected]
            for f, index in zip(files, expected, strict=True):
                with Image.open(f) as image:
                    assert image.mode == "L" and image.size == (28, 28)
                    np.testing.assert_array_equal(np.asarray(image), images[index])
    assert len(list(out.glob("*/*/*.png"))) == 20 + 10 + 10


def test_train_subset_is_the_first_of_each_class_in_file_order(exported):
    _, written, out = exported
    images = written["train"][0]
    files = sorted((out / "train10").glob("*/*.png"), key=lambda f: int(f.stem))
    assert [int(f.stem) for f in files] == FIRST_OF_EACH_CLASS
    for f in files:
        index = int(f.stem)
        assert f.parent.name == FOLDERS[TRAIN_LABELS[index]]
        np.testing.assert_array_equal(np.asarray(Image.open(f)), images[index])
    # Classes are balanced: one each here; two each (everything) for 20.
    export_idx = load_export_idx()
    labels = np.asarray(TRAIN_LABELS)
    assert export_idx.subset_indices(labels, 10, 10).tolist() == FIRST_OF_EACH_CLASS
    assert export_idx.subset_indices(labels, 20, 10).tolist() == list(range(20))
    with pytest.raises(ValueError, match="--train_subset 15 is not a positive multiple of the 10"):
        export_idx.subset_indices(labels, 15, 10)
    with pytest.raises(ValueError, match="--train_subset -10 is not a positive multiple"):
        export_idx.subset_indices(labels, -10, 10)
    with pytest.raises(ValueError, match="--train_subset 30: class 0 has only 2 training images"):
        export_idx.subset_indices(labels, 30, 10)


def test_the_exported_folder_loads_through_the_real_loader(exported):
    from configs import fashion_mnist
    from resnet_jax.data import sources

    _, written, out = exported
    config = fashion_mnist.get_config()
    config.data_dir = str(out)
    split = sources.load_split(config, "train", process_index=0, process_count=1)
    assert split.images.shape == (20, 28, 28, 3) and split.images.dtype == np.uint8
    assert split.num_classes == 10 and split.num_examples == 20
    assert split.class_names == FOLDERS
    # Grey read as RGB: three equal channels.
    np.testing.assert_array_equal(split.images[..., 0], split.images[..., 1])
    np.testing.assert_array_equal(split.images[..., 0], split.images[..., 2])
    # The loader shuffles the files with a fixed permutation: compare (label, pixels) pairs.
    images, labels = written["train"]
    loaded = sorted(
        (int(lb), im[..., 0].tobytes()) for lb, im in zip(split.labels, split.images, strict=True)
    )
    expected = sorted((int(lb), im.tobytes()) for lb, im in zip(labels, images, strict=True))
    assert loaded == expected


def test_the_command_prints_the_counts(tmp_path):
    write_dataset(tmp_path / "src")
    result = run_export(tmp_path / "src", tmp_path / "out", "--classes", "fashion_mnist")
    assert result.returncode == 0, result.stderr
    assert f"Wrote 20 train, 10 test images to {tmp_path / 'out'}." in result.stdout
    assert len(list((tmp_path / "out" / "train").glob("*/*.png"))) == 20
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]


def test_the_command_refuses_a_truncated_file_and_a_used_folder(tmp_path):
    written = write_dataset(tmp_path / "src")
    out = tmp_path / "out"
    # A truncated test file: nothing is written, not even the train split read before it.
    images = written["test"][0]
    write_gzip(tmp_path / "src" / FILES["test"][0], images_bytes(images)[:-1])
    result = run_export(tmp_path / "src", out)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "t10k-images-idx3-ubyte.gz is truncated" in line
    assert not out.exists()
    # A folder that already holds something is left as it is.
    write_gzip(tmp_path / "src" / FILES["test"][0], images_bytes(images))
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_export(tmp_path / "src", out)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {out} is not an empty folder: choose a new one."
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"

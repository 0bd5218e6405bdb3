"""Data sources: tfds's real cifar100 builder on a small archive, image folders, image files."""

import re
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_fixtures import (
    CIFAR100_ARCHIVE,
    FINE_LABEL_NAMES,
    prepare_cifar100,
    write_cifar100_archive,
    write_image_folder,
)
from PIL import Image

from configs import default
from resnet_jax import config_checks, defaults
from resnet_jax.data import folders, sources, tfds_source
from resnet_jax.data.errors import DatasetError

NUM_TRAIN, NUM_TEST = 250, 101
BATCH = 32
SPE = NUM_TRAIN // BATCH  # 7 steps per epoch, 26 examples dropped.
# Per-channel statistics of each training set as published (CIFAR: over the 50,000
# training images, std per pixel; ImageNet: torchvision's). The pipeline must map data
# with these moments to mean 0 and std 1 in every channel, in RGB order.
PUBLISHED = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "image_folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
MEAN, STD = (np.asarray(v, np.float32) for v in PUBLISHED["cifar100"])
COLORS = {"red": (210, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_config(**overrides):
    values = dict(
        dataset="cifar100", data_dir=None, manual_dir=None, image_size=32, eval_resize_size=0
    )
    values.update(overrides)
    return defaults.saved_config(values, "the test's config")


def normalize(images):
    return (images.astype(np.float32) / np.float32(255) - MEAN) / STD


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp("manual")
    data_dir = tmp_path_factory.mktemp("tfds")
    written = write_cifar100_archive(manual_dir, NUM_TRAIN, NUM_TEST, seed=1)
    prepare_cifar100(data_dir, manual_dir)
    config = make_config(data_dir=str(data_dir), manual_dir=str(manual_dir))
    return config, written


@pytest.fixture(scope="module")
def train_split(cifar):
    config, _ = cifar
    return sources.load_split(config, "train", process_index=0, process_count=1)


def archive_positions(images, archive_images):
    """Index in the archive of each image (random pixels: every image is unique)."""
    where = {image.tobytes(): i for i, image in enumerate(archive_images)}
    return np.asarray([where[image.tobytes()] for image in images])


def positions_in(split, batch_images):
    """Index in `split` of each image of an unaugmented normalised batch."""
    where = {image.tobytes(): i for i, image in enumerate(normalize(split.images))}
    return np.asarray([where[image.tobytes()] for image in batch_images])


# --- CIFAR-100 through tfds -------------------------------------------------------


@pytest.mark.parametrize("split, num", [("train", NUM_TRAIN), ("test", NUM_TEST)])
def test_cifar100_matches_archive(cifar, split, num):
    config, written = cifar
    data = sources.load_split(config, split, process_index=0, process_count=1)
    assert data.images.shape == (num, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (num,) and data.labels.dtype == np.int32
    assert (data.num_examples, data.num_classes) == (num, 100)
    assert data.class_names == FINE_LABEL_NAMES
    assert (data.process_index, data.process_count) == (0, 1)
    assert sources.num_classes(config) == 100

    # tfds stores the records in its own (hashed) order, not the archive's.
    # Every archive image comes back exactly once, with its fine label, in the
    # order of tfds's `id` feature ("train_00042" = archive record 42).
    positions = archive_positions(data.images, written[split]["images"])
    np.testing.assert_array_equal(np.sort(positions), np.arange(num))
    np.testing.assert_array_equal(data.labels, written[split]["fine_labels"][positions])
    ids = tfds.as_numpy(
        tfds.builder("cifar100", data_dir=config.data_dir).as_dataset(
            split=split, batch_size=-1, read_config=tfds.ReadConfig(interleave_cycle_length=1)
        )
    )["id"]
    np.testing.assert_array_equal(positions, [int(i.decode().split("_")[1]) for i in ids])


def test_prepared_dataset_is_reused_without_network_or_archive(cifar, monkeypatch, tmp_path):
    config, _ = cifar

    def must_not_run(*args, **kwargs):
        raise AssertionError("a prepared dataset must not be prepared or downloaded again")

    monkeypatch.setattr(tfds_source.socket, "create_connection", must_not_run)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run)
    reused = make_config(data_dir=config.data_dir, manual_dir=str(tmp_path / "empty"))
    split = sources.load_split(reused, "test", process_index=0, process_count=1)
    assert split.num_examples == NUM_TEST and len(split.labels) == NUM_TEST


def test_tfds_split_names_and_metadata(cifar):
    config, _ = cifar
    assert sources.class_names(config) == FINE_LABEL_NAMES  # from tfds's metadata
    assert sources.count_examples(config, "test") == NUM_TEST
    with pytest.raises(DatasetError, match=r"has no split 'validation'.*\['test', 'train'\]"):
        sources.load_split(config, "validation", process_index=0, process_count=1)


def test_cifar100_process_shards_cover_split_once_in_order(cifar, train_split):
    config, _ = cifar
    shards = [
        sources.load_split(config, "train", process_index=i, process_count=3) for i in range(3)
    ]
    assert [len(s.labels) for s in shards] == [83, 83, 84]  # [i*250//3, (i+1)*250//3)
    assert all(s.num_examples == NUM_TRAIN and s.process_count == 3 for s in shards)
    assert [s.process_index for s in shards] == [0, 1, 2]
    np.testing.assert_array_equal(np.concatenate([s.images for s in shards]), train_split.images)
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), train_split.labels)


def test_cifar100_resized(cifar, train_split):
    config, _ = cifar
    config = make_config(data_dir=config.data_dir, image_size=40)
    data = sources.load_split(config, "train", process_index=1, process_count=2)
    assert data.images.shape == (125, 40, 40, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.labels, train_split.labels[125:])
    # Each slot holds its own image (the resize runs on several threads), resized by PIL.
    expected = [
        np.asarray(Image.fromarray(image).resize((40, 40), Image.Resampling.BILINEAR))
        for image in train_split.images[125:]
    ]
    np.testing.assert_array_equal(data.images, np.stack(expected))


def test_num_classes_of_the_built_in_datasets():
    assert sources.num_classes(make_config(dataset="cifar10")) == 10


# --- Image folders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, COLORS, 6, 2, size=32, mixed_formats=True)
    return root


def test_image_folder(image_folder):
    config = make_config(dataset="image_folder", data_dir=str(image_folder), image_size=24)
    assert sources.num_classes(config) == 3
    train = sources.load_split(config, "train", process_index=0, process_count=1)
    assert train.class_names == ("blue", "green", "red")  # sorted folder names
    assert train.num_classes == 3 and train.num_examples == 18
    assert train.images.shape == (18, 24, 24, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(train.labels), [6, 6, 6])
    gray = 0
    for image, label in zip(train.images, train.labels, strict=True):
        if (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
            gray += 1  # the grayscale file, converted to RGB
            continue
        mean_color = image.reshape(-1, 3).mean(0)
        expected = np.asarray(COLORS[train.class_names[label]])
        assert np.abs(mean_color - expected).max() < 25, (label, mean_color)
    assert gray == 3

    test = sources.load_split(config, "test", process_index=0, process_count=1)
    assert test.class_names == train.class_names
    np.testing.assert_array_equal(np.bincount(test.labels), [2, 2, 2])

    # Shards of all processes cover the split once; a process may own nothing.
    shards = [
        sources.load_split(config, "test", process_index=i, process_count=8) for i in range(8)
    ]
    assert sum(len(s.labels) for s in shards) == 6 and len(shards[0].labels) == 0
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), test.labels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder_errors(tmp_path, split):
    def load(data_dir, dataset="image_folder"):
        config = make_config(dataset=dataset, data_dir=data_dir and str(data_dir))
        return sources.load_split(config, split, process_index=0, process_count=1)

    with pytest.raises(DatasetError, match=r"Unknown dataset 'imagenet'.*image_folder.*cifar10"):
        load(tmp_path, dataset="imagenet")
    with pytest.raises(DatasetError, match="Unknown dataset"):
        sources.num_classes(make_config(dataset="imagenet"))
    with pytest.raises(DatasetError, match=r"data_dir is not set.*--config.data_dir="):
        load(None)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(str(missing)) + ".*does not exist"):
        load(missing)
    with pytest.raises(DatasetError, match=r"no train/ subfolder"):
        load(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "train")) + " has no class"):
        load(tmp_path)
    for top in ("train", "test"):
        (tmp_path / top / "cat").mkdir()
        (tmp_path / top / "cat" / "README.txt").write_text("not an image")
    empty = tmp_path / split / "cat"
    if split == "test":
        write_image_folder(tmp_path, {"cat": (1, 2, 3)}, 1, 0)
    with pytest.raises(DatasetError, match=re.escape(str(empty)) + " has no images"):
        load(tmp_path)
    write_image_folder(tmp_path, {"cat": (1, 2, 3)}, 1, 1)
    corrupt = tmp_path / split / "cat" / "x.png"
    corrupt.write_bytes(b"this is not a png at all")
    with pytest.raises(DatasetError, match=re.escape(str(corrupt)) + r".*remove or replace"):
        load(tmp_path)


def test_image_folder_test_classes_must_match(tmp_path):
    write_image_folder(tmp_path, {"cat": (200, 0, 0), "dog": (0, 200, 0)}, 1, 1)
    write_image_folder(tmp_path / "extra", {"cow": (0, 0, 200)}, 0, 1)
    (tmp_path / "extra" / "test" / "cow").rename(tmp_path / "test" / "cow")
    config = make_config(dataset="image_folder", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=r"same class folders.*extra \['cow'\]"):
        sources.load_split(config, "test", process_index=0, process_count=1)


def test_image_folder_num_classes_needs_train(tmp_path):
    config = make_config(dataset="image_folder", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path)) + ".*no train/"):
        sources.num_classes(config)


# --- Preparing CIFAR without the archive / without network ------------------------


def test_offline_without_archive_says_where_to_put_it(tmp_path, monkeypatch):
    # Empty data_dir and manual_dir: tfds would have to download. Connections
    # fail here as they do on this offline machine (DNS error at once), so the
    # test also never downloads on a machine that does have network.
    def no_network(*args, **kwargs):
        raise OSError("simulated: Name or service not known")

    monkeypatch.setattr(tfds_source.socket, "create_connection", no_network)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # with a proxy, tfds would try anyway
    config = make_config(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    (tmp_path / "manual").mkdir()
    start = time.monotonic()
    with pytest.raises(DatasetError) as info:
        sources.load_split(config, "train", process_index=0, process_count=1)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert str(tmp_path / "manual" / CIFAR100_ARCHIVE) in message
    assert f"--config.manual_dir={tmp_path / 'manual'}" in message
    assert "https://www.cs.toronto.edu/~kriz/" in message


def test_another_tfds_dataset_offline_fails_fast_with_the_catalog_page(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("simulated: Name or service not known")

    monkeypatch.setattr(tfds_source.socket, "create_connection", no_network)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    config = make_config(dataset="mnist", data_dir=str(tmp_path / "tfds"), image_size=28)
    start = time.monotonic()
    with pytest.raises(DatasetError, match=r"'mnist': this machine cannot reach storage") as info:
        sources.load_split(config, "train", process_index=0, process_count=1)
    assert time.monotonic() - start < 20  # tfds's own retries take minutes
    assert "https://www.tensorflow.org/datasets/catalog/mnist" in str(info.value)
    assert sources.num_classes(config) == 10  # from the metadata, without preparing


def test_failed_download_inside_tfds_becomes_dataset_error(tmp_path, monkeypatch):
    # Where the host looks reachable but the download still fails, tfds's own
    # error is turned into the same advice. The download is made to fail at
    # once, so the test never touches the network.
    import requests

    def no_network(*args, **kwargs):
        raise requests.exceptions.ConnectionError("simulated: network unreachable")

    monkeypatch.setattr(tfds_source, "_can_reach", lambda *a, **k: True)
    from tensorflow_datasets.core.download import downloader  # a submodule tfds loads lazily

    monkeypatch.setattr(downloader, "_open_url", no_network)
    config = make_config(dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=r"download failed.*simulated") as info:
        sources.load_split(config, "test", process_index=0, process_count=1)
    manual = tmp_path / "downloads" / "manual"
    assert str(manual / "cifar-10-binary.tar.gz") in str(info.value)
    assert f"--config.manual_dir={manual}" in str(info.value)


def test_wrong_archive_is_rejected_by_checksum(tmp_path, monkeypatch):
    # Product code validates the archive against tfds's registered checksum; a
    # file in manual_dir means no network check is needed at all.
    def unreachable(*args, **kwargs):
        raise AssertionError("must not probe the network when the archive is there")

    monkeypatch.setattr(tfds_source, "_can_reach", unreachable)
    write_cifar100_archive(tmp_path / "manual", 4, 2)
    config = make_config(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    with pytest.raises(
        DatasetError, match=r"wrong checksum.*Download cifar-100-binary.tar.gz again"
    ):
        sources.load_split(config, "train", process_index=0, process_count=1)


def test_read_image_resize_then_centre_crop(tmp_path):
    """eval_resize_size: the shorter side to N (kept when already N), then the centre crop."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(400, 256, 3), dtype=np.uint8)  # 256 wide, 400 high
    Image.fromarray(pixels).save(tmp_path / "tall.png")
    crop = folders.read_image(tmp_path / "tall.png", 224, resize_size=256)
    # Already 256 on its shorter side: not resampled, the exact central pixels.
    np.testing.assert_array_equal(crop, pixels[88:312, 16:240])

    Image.fromarray(pixels).resize((300, 500)).save(tmp_path / "big.png")
    crop = folders.read_image(tmp_path / "big.png", 224, resize_size=256)
    resized = np.asarray(Image.open(tmp_path / "big.png").resize((256, 426), Image.BILINEAR))
    np.testing.assert_array_equal(crop, resized[101:325, 16:240])  # round((426-224)/2) = 101

    # 0: the whole image squeezed to the square, as CIFAR-like folders are read.
    whole = folders.read_image(tmp_path / "big.png", 32)
    assert whole.shape == (32, 32, 3)
    with pytest.raises(DatasetError, match="eval_resize_size=200 must be 0 or"):
        folders.read_image(tmp_path / "big.png", 224, resize_size=200)


def test_image_folder_with_eval_resize_size(image_folder):
    config = make_config(
        dataset="image_folder", data_dir=str(image_folder), image_size=24, eval_resize_size=28
    )
    test = sources.load_split(config, "test", process_index=0, process_count=1)
    assert test.images.shape == (6, 24, 24, 3)
    # Each file's central 24 px of its 28 px resize (not the whole image squeezed to 24).
    listing = folders.list_image_folder(config, "test")
    expected = [folders.read_image(listing.path(i), 24, 28) for i in range(6)]
    squeezed = [folders.read_image(listing.path(i), 24) for i in range(6)]
    np.testing.assert_array_equal(test.images, np.stack(expected))
    np.testing.assert_array_equal(test.labels, listing.labels)
    assert not np.array_equal(test.images, np.stack(squeezed))
    bad = default.get_config()
    bad.image_size, bad.eval_resize_size = 24, 20
    with pytest.raises(config_checks.ConfigError, match="eval_resize_size=20 must be 0"):
        config_checks.validate(bad)

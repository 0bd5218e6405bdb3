"""Input pipeline: tfds's real cifar100 builder on a small archive, image folders, batches."""

import re
import time

import ml_collections
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
from resnet_jax import config_checks, input_pipeline
from resnet_jax.input_pipeline import DatasetError, DatasetSplit

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
    return ml_collections.ConfigDict(values)


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
    return input_pipeline.load_split(config, "train", process_index=0, process_count=1)


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
    data = input_pipeline.load_split(config, split, process_index=0, process_count=1)
    assert data.images.shape == (num, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (num,) and data.labels.dtype == np.int32
    assert (data.num_examples, data.num_classes) == (num, 100)
    assert data.class_names == FINE_LABEL_NAMES
    assert (data.process_index, data.process_count) == (0, 1)
    assert input_pipeline.num_classes(config) == 100

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

    monkeypatch.setattr(input_pipeline.socket, "create_connection", must_not_run)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run)
    reused = make_config(data_dir=config.data_dir, manual_dir=str(tmp_path / "empty"))
    split = input_pipeline.load_split(reused, "test", process_index=0, process_count=1)
    assert split.num_examples == NUM_TEST and len(split.labels) == NUM_TEST


def test_cifar100_process_shards_cover_split_once_in_order(cifar, train_split):
    config, _ = cifar
    shards = [
        input_pipeline.load_split(config, "train", process_index=i, process_count=3)
        for i in range(3)
    ]
    assert [len(s.labels) for s in shards] == [83, 83, 84]  # [i*250//3, (i+1)*250//3)
    assert all(s.num_examples == NUM_TRAIN and s.process_count == 3 for s in shards)
    assert [s.process_index for s in shards] == [0, 1, 2]
    np.testing.assert_array_equal(np.concatenate([s.images for s in shards]), train_split.images)
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), train_split.labels)


def test_cifar100_resized(cifar, train_split):
    config, _ = cifar
    config = make_config(data_dir=config.data_dir, image_size=40)
    data = input_pipeline.load_split(config, "train", process_index=1, process_count=2)
    assert data.images.shape == (125, 40, 40, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.labels, train_split.labels[125:])


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_batches_have_zero_mean_unit_std_on_data_with_the_published_moments(dataset):
    mean, std = (np.asarray(v) for v in PUBLISHED[dataset])
    # Half the pixels of each channel at mean - std, half at mean + std: exactly the
    # published mean and std, up to the rounding to uint8.
    sign = np.where(np.arange(8 * 32 * 32).reshape(8, 32, 32, 1) % 2, 1.0, -1.0)
    images = np.round(255 * (mean + sign * std)).astype(np.uint8)
    split = DatasetSplit(images, np.zeros(8, np.int32), 8, 10, tuple("abcdefghij"), 0, 1)
    config_mean, config_std = input_pipeline.normalization(make_config(dataset=dataset))
    assert config_mean.dtype == config_std.dtype == np.float32
    (batch,) = input_pipeline.eval_batches(
        split, per_process_batch_size=8, num_batches=1, mean=config_mean, std=config_std
    )
    channels = batch["image"].reshape(-1, 3)
    np.testing.assert_allclose(channels.mean(0), 0.0, atol=0.01)
    np.testing.assert_allclose(channels.std(0), 1.0, atol=0.01)


def test_num_classes_of_the_built_in_datasets():
    assert input_pipeline.num_classes(make_config(dataset="cifar10")) == 10


# --- Train batches ----------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def batches(split, start_step=0, n=1, seed=0, **kwargs):
    it = input_pipeline.train_batches(
        split,
        per_process_batch_size=BATCH,
        seed=seed,
        start_step=start_step,
        mean=MEAN,
        std=STD,
        **kwargs,
    )
    return take(it, n)


def test_steps_per_epoch():
    assert input_pipeline.steps_per_epoch(NUM_TRAIN, 1, BATCH) == 7
    assert input_pipeline.steps_per_epoch(50_000, 8, 64) == 97  # 6250 // 64
    assert input_pipeline.steps_per_epoch(101, 2, 50) == 1
    with pytest.raises(DatasetError, match=r"larger than the 50 training examples.*smaller"):
        input_pipeline.steps_per_epoch(101, 2, 51)


def test_train_batch_is_normalised_permutation_without_repeats(train_split):
    epochs = batches(train_split, n=2 * SPE, crop_padding=0, random_flip=False)
    for batch in epochs:
        assert batch["image"].shape == (BATCH, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
    seen = []
    for epoch in (epochs[:SPE], epochs[SPE:]):
        positions = np.concatenate([positions_in(train_split, b["image"]) for b in epoch])
        assert len(set(positions.tolist())) == SPE * BATCH  # no repeat inside an epoch
        for b, idx in zip(epoch, np.split(positions, SPE), strict=True):
            # Exactly (x / 255 - mean) / std of the chosen images, with their labels.
            np.testing.assert_array_equal(b["image"], normalize(train_split.images[idx]))
            np.testing.assert_array_equal(b["label"], train_split.labels[idx])
        seen.append(positions)
    assert not np.array_equal(seen[0], seen[1])  # each epoch has its own order


def test_train_batches_are_a_function_of_seed_and_step(train_split):
    reference = batches(train_split, n=2 * SPE + 2)
    again = batches(train_split, n=2 * SPE + 2)
    for a, b in zip(reference, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # Resuming at step k gives batch k, then k+1, ..., across epoch boundaries.
    for k in (3, SPE - 1, SPE, 2 * SPE + 1):
        resumed = batches(train_split, start_step=k, n=2 * SPE + 2 - k)
        for a, b in zip(reference[k:], resumed, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    other = batches(train_split, seed=1, n=1)[0]
    assert not np.array_equal(other["label"], reference[0]["label"])
    assert not np.array_equal(other["image"], reference[0]["image"])


def test_crop_and_flip(train_split):
    plain = batches(train_split, n=2, crop_padding=0, random_flip=False)
    augmented = batches(train_split, n=2)
    pad = 4
    shifted = flipped = 0
    for p, a in zip(plain, augmented, strict=True):
        np.testing.assert_array_equal(p["label"], a["label"])  # same order, only augmented
        sources = train_split.images[positions_in(train_split, p["image"])]
        padded = np.pad(sources, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        for source, image in zip(padded, a["image"], strict=True):
            # The augmented image is one crop of the zero-padded source, maybe flipped.
            matches = [
                (dy, dx, flip)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                for flip in (False, True)
                if np.array_equal(
                    image,
                    normalize(source[dy : dy + 32, dx : dx + 32][:, :: -1 if flip else 1][None])[0],
                )
            ]
            assert len(matches) == 1
            dy, dx, flip = matches[0]
            shifted += (dy, dx) != (pad, pad)
            flipped += flip
    assert 2 * BATCH * 0.7 < shifted and 2 * BATCH * 0.3 < flipped < 2 * BATCH * 0.7


# --- Eval batches -----------------------------------------------------------------


def test_eval_batches_cover_split_once(cifar):
    config, _ = cifar
    split = input_pipeline.load_split(config, "test", process_index=0, process_count=1)
    num = input_pipeline.num_eval_batches(NUM_TEST, 1, BATCH)
    assert num == 4  # ceil(101 / 32)
    out = list(
        input_pipeline.eval_batches(
            split, per_process_batch_size=BATCH, num_batches=num, mean=MEAN, std=STD
        )
    )
    assert len(out) == num
    mask = np.concatenate([b["mask"] for b in out])
    assert mask.dtype == bool and mask.sum() == NUM_TEST
    np.testing.assert_array_equal(mask, np.arange(num * BATCH) < NUM_TEST)
    labels = np.concatenate([b["label"] for b in out])
    images = np.concatenate([b["image"] for b in out])
    np.testing.assert_array_equal(labels[mask], split.labels)
    np.testing.assert_array_equal(images[mask], normalize(split.images))
    assert not images[~mask].any() and not labels[~mask].any()
    with pytest.raises(DatasetError, match="num_eval_batches"):
        list(
            input_pipeline.eval_batches(
                split, per_process_batch_size=BATCH, num_batches=3, mean=MEAN, std=STD
            )
        )


def test_eval_batches_two_processes(cifar):
    config, _ = cifar
    full = input_pipeline.load_split(config, "test", process_index=0, process_count=1)
    num = input_pipeline.num_eval_batches(NUM_TEST, 2, 16)
    assert num == 4  # ceil(ceil(101 / 2) / 16)
    labels, counts = [], []
    for i in range(2):
        shard = input_pipeline.load_split(config, "test", process_index=i, process_count=2)
        out = list(
            input_pipeline.eval_batches(
                shard, per_process_batch_size=16, num_batches=num, mean=MEAN, std=STD
            )
        )
        counts.append(len(out))
        labels.append(np.concatenate([b["label"][b["mask"]] for b in out]))
    assert counts == [num, num]
    assert [len(x) for x in labels] == [50, 51]
    np.testing.assert_array_equal(np.concatenate(labels), full.labels)


def test_eval_batches_of_an_empty_shard_are_all_padding():
    empty = DatasetSplit(
        images=np.zeros((0, 8, 8, 3), np.uint8),
        labels=np.zeros((0,), np.int32),
        num_examples=1,
        num_classes=2,
        class_names=("a", "b"),
        process_index=1,
        process_count=2,
    )
    out = list(
        input_pipeline.eval_batches(
            empty, per_process_batch_size=4, num_batches=1, mean=MEAN, std=STD
        )
    )
    assert len(out) == 1 and out[0]["image"].shape == (4, 8, 8, 3) and not out[0]["mask"].any()


# --- Image folders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, COLORS, 6, 2, size=32, mixed_formats=True)
    return root


def test_image_folder(image_folder):
    config = make_config(dataset="image_folder", data_dir=str(image_folder), image_size=24)
    assert input_pipeline.num_classes(config) == 3
    train = input_pipeline.load_split(config, "train", process_index=0, process_count=1)
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

    test = input_pipeline.load_split(config, "test", process_index=0, process_count=1)
    assert test.class_names == train.class_names
    np.testing.assert_array_equal(np.bincount(test.labels), [2, 2, 2])

    # Shards of all processes cover the split once; a process may own nothing.
    shards = [
        input_pipeline.load_split(config, "test", process_index=i, process_count=8)
        for i in range(8)
    ]
    assert sum(len(s.labels) for s in shards) == 6 and len(shards[0].labels) == 0
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), test.labels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder_errors(tmp_path, split):
    def load(data_dir, dataset="image_folder"):
        config = make_config(dataset=dataset, data_dir=data_dir and str(data_dir))
        return input_pipeline.load_split(config, split, process_index=0, process_count=1)

    with pytest.raises(DatasetError, match=r"Unknown dataset 'imagenet'.*cifar10.*image_folder"):
        load(tmp_path, dataset="imagenet")
    with pytest.raises(DatasetError, match="Unknown dataset"):
        input_pipeline.num_classes(make_config(dataset="imagenet"))
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
        input_pipeline.load_split(config, "test", process_index=0, process_count=1)


def test_image_folder_num_classes_needs_train(tmp_path):
    config = make_config(dataset="image_folder", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path)) + ".*no train/"):
        input_pipeline.num_classes(config)


# --- Preparing CIFAR without the archive / without network ------------------------


def test_offline_without_archive_says_where_to_put_it(tmp_path, monkeypatch):
    # Empty data_dir and manual_dir: tfds would have to download. Connections
    # fail here as they do on this offline machine (DNS error at once), so the
    # test also never downloads on a machine that does have network.
    def no_network(*args, **kwargs):
        raise OSError("simulated: Name or service not known")

    monkeypatch.setattr(input_pipeline.socket, "create_connection", no_network)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # with a proxy, tfds would try anyway
    config = make_config(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    (tmp_path / "manual").mkdir()
    start = time.monotonic()
    with pytest.raises(DatasetError) as info:
        input_pipeline.load_split(config, "train", process_index=0, process_count=1)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert str(tmp_path / "manual" / CIFAR100_ARCHIVE) in message
    assert f"--config.manual_dir={tmp_path / 'manual'}" in message
    assert "https://www.cs.toronto.edu/~kriz/" in message


def test_failed_download_inside_tfds_becomes_dataset_error(tmp_path, monkeypatch):
    # Where the host looks reachable but the download still fails, tfds's own
    # error is turned into the same advice. The download is made to fail at
    # once, so the test never touches the network.
    import requests

    def no_network(*args, **kwargs):
        raise requests.exceptions.ConnectionError("simulated: network unreachable")

    monkeypatch.setattr(input_pipeline, "_can_reach", lambda *a, **k: True)
    monkeypatch.setattr(tfds.core.download.downloader, "_open_url", no_network)
    config = make_config(dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=r"download failed.*simulated") as info:
        input_pipeline.load_split(config, "test", process_index=0, process_count=1)
    manual = tmp_path / "downloads" / "manual"
    assert str(manual / "cifar-10-binary.tar.gz") in str(info.value)
    assert f"--config.manual_dir={manual}" in str(info.value)


def test_wrong_archive_is_rejected_by_checksum(tmp_path, monkeypatch):
    # Product code validates the archive against tfds's registered checksum; a
    # file in manual_dir means no network check is needed at all.
    def unreachable(*args, **kwargs):
        raise AssertionError("must not probe the network when the archive is there")

    monkeypatch.setattr(input_pipeline, "_can_reach", unreachable)
    write_cifar100_archive(tmp_path / "manual", 4, 2)
    config = make_config(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    with pytest.raises(
        DatasetError, match=r"wrong checksum.*Download cifar-100-binary.tar.gz again"
    ):
        input_pipeline.load_split(config, "train", process_index=0, process_count=1)


# --- Prefetch ---------------------------------------------------------------------


def test_prefetch_yields_in_order_and_reraises():
    assert list(input_pipeline.prefetch(iter(range(10)), buffer_size=3)) == list(range(10))

    def broken():
        yield 1
        yield 2
        raise RuntimeError("producer broke")

    it = input_pipeline.prefetch(broken())
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="producer broke"):
        next(it)


def test_read_image_resize_then_centre_crop(tmp_path):
    """eval_resize_size: the shorter side to N (kept when already N), then the centre crop."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(400, 256, 3), dtype=np.uint8)  # 256 wide, 400 high
    Image.fromarray(pixels).save(tmp_path / "tall.png")
    crop = input_pipeline.read_image(tmp_path / "tall.png", 224, resize_size=256)
    # Already 256 on its shorter side: not resampled, the exact central pixels.
    np.testing.assert_array_equal(crop, pixels[88:312, 16:240])

    Image.fromarray(pixels).resize((300, 500)).save(tmp_path / "big.png")
    crop = input_pipeline.read_image(tmp_path / "big.png", 224, resize_size=256)
    resized = np.asarray(Image.open(tmp_path / "big.png").resize((256, 426), Image.BILINEAR))
    np.testing.assert_array_equal(crop, resized[101:325, 16:240])  # round((426-224)/2) = 101

    # 0: the whole image squeezed to the square, as CIFAR-like folders are read.
    whole = input_pipeline.read_image(tmp_path / "big.png", 32)
    assert whole.shape == (32, 32, 3)
    with pytest.raises(input_pipeline.DatasetError, match="eval_resize_size=200 must be 0 or"):
        input_pipeline.read_image(tmp_path / "big.png", 224, resize_size=200)


def test_image_folder_with_eval_resize_size(image_folder):
    config = make_config(
        dataset="image_folder", data_dir=str(image_folder), image_size=24, eval_resize_size=28
    )
    test = input_pipeline.load_split(config, "test", process_index=0, process_count=1)
    assert test.images.shape == (6, 24, 24, 3)
    bad = default.get_config()
    bad.image_size, bad.eval_resize_size = 24, 20
    with pytest.raises(config_checks.ConfigError, match="eval_resize_size=20 must be 0"):
        config_checks.validate(bad)

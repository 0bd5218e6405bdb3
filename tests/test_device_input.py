"""The device-resident input path: batches drawn on the devices, uint8 eval batches, normalisation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_jax import data, defaults, sharding
from resnet_jax.data import device, sources, splits
from resnet_jax.data.errors import DatasetError
from resnet_jax.data.sources import DatasetSplit

BATCH = 16
NUM_TRAIN, NUM_TEST = 64, 37  # the session's `cifar` fixture
SPE = NUM_TRAIN // BATCH
# Per-channel statistics as published (CIFAR: over the 50,000 training images, std per
# pixel; ImageNet: torchvision's). Data with these moments must come out mean 0, std 1.
PUBLISHED = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "image_folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def make_config(**overrides):
    values = dict(
        dataset="cifar100", data_dir=None, manual_dir=None, image_size=32, eval_resize_size=0
    )
    values.update(overrides)
    return defaults.saved_config(values, "the test's config")


@pytest.fixture(scope="module")
def train_split(cifar):
    root, _ = cifar
    config = make_config(data_dir=str(root / "data"), manual_dir=str(root / "manual"))
    return sources.load_split(config, "train", process_index=0, process_count=1)


def batches(split, start_step=0, n=1, seed=0, devices=None, **kwargs):
    mesh = sharding.make_mesh(devices)
    it = device.DeviceTrainBatches(
        split, mesh, per_process_batch_size=BATCH, seed=seed, start_step=start_step, **kwargs
    )
    out = []
    for _ in range(n):
        batch = next(it)
        assert batch["image"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
        out.append({k: np.asarray(v) for k, v in batch.items()})
    return out


def positions_in(split, images):
    """Index in `split` of each image of an unaugmented batch (random pixels: all unique)."""
    where = {image.tobytes(): i for i, image in enumerate(split.images)}
    return np.asarray([where[image.tobytes()] for image in images])


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_normalize_gives_zero_mean_unit_std_on_data_with_the_published_moments(dataset):
    mean, std = (np.asarray(v) for v in PUBLISHED[dataset])
    # Half the pixels of each channel at mean - std, half at mean + std: exactly the
    # published mean and std, up to the rounding to uint8.
    sign = np.where(np.arange(8 * 32 * 32).reshape(8, 32, 32, 1) % 2, 1.0, -1.0)
    images = np.round(255 * (mean + sign * std)).astype(np.uint8)
    config_mean, config_std = data.normalization(make_config(dataset=dataset))
    assert config_mean.dtype == config_std.dtype == np.float32
    out = jax.jit(data.normalize)(images, config_mean, config_std)
    assert out.dtype == jnp.float32
    channels = np.asarray(out).reshape(-1, 3)
    np.testing.assert_allclose(channels.mean(0), 0.0, atol=0.01)
    np.testing.assert_allclose(channels.std(0), 1.0, atol=0.01)


def test_train_batch_is_a_permutation_without_repeats(train_split):
    epochs = batches(train_split, n=2 * SPE, crop_padding=0, random_flip=False)
    seen = []
    for epoch in (epochs[:SPE], epochs[SPE:]):
        for batch in epoch:
            assert batch["image"].shape == (BATCH, 32, 32, 3) and batch["image"].dtype == np.uint8
            assert batch["label"].shape == (BATCH,) and batch["label"].dtype == np.int32
        positions = np.concatenate([positions_in(train_split, b["image"]) for b in epoch])
        assert len(set(positions.tolist())) == SPE * BATCH  # no repeat inside an epoch
        for b, idx in zip(epoch, np.split(positions, SPE), strict=True):
            np.testing.assert_array_equal(b["label"], train_split.labels[idx])
        seen.append(positions)
    assert not np.array_equal(seen[0], seen[1])  # each epoch has its own order


def test_train_batches_are_a_function_of_seed_and_step(train_split):
    reference = batches(train_split, n=2 * SPE + 2)
    # Resuming at step k gives batch k, then k+1, ..., across epoch boundaries.
    for k in (3, SPE, 2 * SPE + 1):
        resumed = batches(train_split, start_step=k, n=2 * SPE + 2 - k)
        for a, b in zip(reference[k:], resumed, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    other = batches(train_split, seed=1, n=1)[0]
    assert not np.array_equal(other["label"], reference[0]["label"])


def test_one_and_four_devices_draw_the_same_batches(train_split):
    one = batches(train_split, n=SPE + 1, devices=jax.devices()[:1])
    four = batches(train_split, n=SPE + 1, devices=jax.devices()[:4])
    for a, b in zip(one, four, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def numpy_augment(image, dy, dx, flip, pad):
    """The definition: a crop of the zero-padded image at (dy, dx), then maybe a mirror."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    crop = padded[dy : dy + height, dx : dx + width]
    return crop[:, ::-1] if flip else crop


def test_augmentation_is_crop_of_padded_image_and_flip_with_uniform_offsets():
    pad, n = 4, 20_000
    offsets, flips = jax.jit(device.draw_augmentation, static_argnums=(1, 2, 3))(
        jax.random.key(0), n, pad, True
    )
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    # Offsets uniform over the 9 x 9 grid, flips fair, independent of each other.
    counts = np.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81)
    expected = n / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.size == 81 and chi2 < 130  # 80 dof: p(chi2 > 130) < 0.001
    assert abs(flips.mean() - 0.5) < 0.015
    assert abs(flips[offsets[:, 0] < 4].mean() - flips[offsets[:, 0] >= 4].mean()) < 0.03
    _, no_flips = device.draw_augmentation(jax.random.key(0), 64, pad, False)
    assert not np.asarray(no_flips).any()

    images = np.random.default_rng(0).integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    chosen = np.asarray([[0, 0], [8, 8], [4, 4], [1, 7], [8, 0], [3, 2]], np.int32)
    flip = np.asarray([False, True, False, True, True, False])
    out = np.asarray(device.apply_augmentation(images, chosen, flip, pad))
    for image, (dy, dx), f, got in zip(images, chosen, flip, out, strict=True):
        np.testing.assert_array_equal(got, numpy_augment(image, dy, dx, f, pad))


def test_train_batches_are_augmented_copies_of_the_unaugmented_ones(train_split):
    plain = batches(train_split, n=2, crop_padding=0, random_flip=False)
    augmented = batches(train_split, n=2)
    pad, shifted, flipped = 4, 0, 0
    for p, a in zip(plain, augmented, strict=True):
        np.testing.assert_array_equal(p["label"], a["label"])  # same order, only augmented
        for source, image in zip(p["image"], a["image"], strict=True):
            matches = [
                (dy, dx, flip)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                for flip in (False, True)
                if np.array_equal(image, numpy_augment(source, dy, dx, flip, pad))
            ]
            assert len(matches) == 1
            dy, dx, flip = matches[0]
            shifted += (dy, dx) != (pad, pad)
            flipped += flip
    assert 2 * BATCH * 0.7 < shifted and 2 * BATCH * 0.25 < flipped < 2 * BATCH * 0.75


def test_bad_arguments():
    split = DatasetSplit(
        np.zeros((8, 4, 4, 3), np.uint8), np.zeros(8, np.int32), 8, 1, ("a",), 0, 1
    )
    mesh = sharding.make_mesh()
    # Data-dependent: only the split knows its size.
    with pytest.raises(DatasetError, match="larger than the 8 training examples"):
        device.DeviceTrainBatches(split, mesh, per_process_batch_size=12, seed=0, start_step=0)
    # The config's values are checked once, where they enter (config_checks.validate, and
    # sharding.per_process_batch_size for the batch); below that they are asserted.
    with pytest.raises(AssertionError):
        device.DeviceTrainBatches(split, mesh, per_process_batch_size=4, seed=-1, start_step=0)
    with pytest.raises(AssertionError):
        device.DeviceTrainBatches(split, mesh, per_process_batch_size=6, seed=0, start_step=0)


# --- Eval batches -----------------------------------------------------------------


def test_eval_batches_cover_split_once(cifar):
    root, written = cifar
    config = make_config(data_dir=str(root / "data"))
    split = sources.load_split(config, "test", process_index=0, process_count=1)
    num = splits.num_eval_batches(NUM_TEST, 1, BATCH)
    assert num == 3  # ceil(37 / 16)
    out = list(device.eval_batches(split, per_process_batch_size=BATCH, num_batches=num))
    assert len(out) == num
    mask = np.concatenate([b["mask"] for b in out])
    assert mask.dtype == bool and mask.sum() == NUM_TEST
    np.testing.assert_array_equal(mask, np.arange(num * BATCH) < NUM_TEST)
    labels = np.concatenate([b["label"] for b in out])
    images = np.concatenate([b["image"] for b in out])
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(labels[mask], split.labels)
    np.testing.assert_array_equal(images[mask], split.images)
    assert not images[~mask].any() and not labels[~mask].any()
    with pytest.raises(DatasetError, match="num_eval_batches"):
        list(device.eval_batches(split, per_process_batch_size=BATCH, num_batches=2))


def test_eval_batches_two_processes(cifar):
    root, _ = cifar
    config = make_config(data_dir=str(root / "data"))
    full = sources.load_split(config, "test", process_index=0, process_count=1)
    num = splits.num_eval_batches(NUM_TEST, 2, 8)
    assert num == 3  # ceil(ceil(37 / 2) / 8)
    labels = []
    for i in range(2):
        shard = sources.load_split(config, "test", process_index=i, process_count=2)
        out = list(device.eval_batches(shard, per_process_batch_size=8, num_batches=num))
        assert len(out) == num
        labels.append(np.concatenate([b["label"][b["mask"]] for b in out]))
    assert [len(x) for x in labels] == [18, 19]
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
    out = list(device.eval_batches(empty, per_process_batch_size=4, num_batches=1))
    assert len(out) == 1 and out[0]["image"].shape == (4, 8, 8, 3) and not out[0]["mask"].any()


def test_auto_keeps_what_fits_on_the_devices_and_streams_the_rest():
    mesh = sharding.make_mesh()
    config = ml_collections.ConfigDict(
        dict(input="auto", augment="crop_flip", image_size=32, dataset="cifar100")
    )
    assert data.choose_mode(config, 50_000, mesh) == "device"  # CIFAR: 150 MB
    config.image_size = 224
    assert data.choose_mode(config, 1_281_167, mesh) == "stream"  # ImageNet: 193 GB
    config.image_size, config.augment = 32, "random_resized_crop"
    assert data.choose_mode(config, 50_000, mesh) == "stream"  # needs the original files
    config.input, config.augment = "device", "crop_flip"
    assert data.choose_mode(config, 1_281_167, mesh) == "device"  # as asked
    assert device.split_bytes(50_000, 32) == 153_600_000
    assert device.split_bytes(50_001, 32) == 50_001 * 3072  # the whole split in every process


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"input": "gpu"}, r"Unknown input 'gpu'\. Valid choices: auto, device, stream"),
        ({"augment": "mixup"}, r"Unknown augment 'mixup'.*crop_flip, random_resized_crop"),
        (
            {"input": "device", "augment": "random_resized_crop"},
            r"input=device crops and flips the stored images only.*--config.input=stream",
        ),
        ({"input_workers": -2}, r"input_workers=-2 must be -1 \(one per core\)"),
    ],
)
def test_bad_input_settings_are_refused_with_the_choices(overrides, match):
    from configs import default
    from resnet_jax import config_checks

    config = default.get_config()
    config.update(overrides)
    with pytest.raises(config_checks.ConfigError, match=match):
        config_checks.validate(config)

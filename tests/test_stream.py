"""Streaming input (resnet_jax.data.stream): grain over image folders and tfds array_record."""

import json
import multiprocessing
import os
import re
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from data_fixtures import (
    FINE_LABEL_NAMES,
    prepare_cifar100,
    write_cifar100_archive,
    write_image_folder,
)
from helpers import ROOT
from PIL import Image, ImageOps, JpegImagePlugin

from resnet_jax import defaults
from resnet_jax.data import decode, folders, sources, splits, stream
from resnet_jax.data.errors import DatasetError

COLORS = {"red": (210, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
NUM_TRAIN_PER_CLASS, NUM_TEST_PER_CLASS, FILE_SIZE = 15, 7, 12
NUM_TRAIN = NUM_TRAIN_PER_CLASS * len(COLORS)  # 45
NUM_TEST = NUM_TEST_PER_CLASS * len(COLORS)  # 21
SIZE = 16  # Files are 12 px: the pipeline resizes them.


def make_config(root, **overrides):
    values = dict(
        dataset="image_folder",
        data_dir=str(root),
        manual_dir=None,
        image_size=SIZE,
        eval_resize_size=0,
    )
    values.update(overrides)
    return defaults.saved_config(values, "the test's config")


def train_args(**overrides):
    values = dict(
        global_batch_size=4,
        seed=0,
        start_step=0,
        image_size=SIZE,
        augment="crop_flip",
        crop_padding=2,
        random_flip=True,
        num_workers=0,
    )
    values.update(overrides)
    return values


def take(iterator, count):
    """`count` batches as plain numpy copies (batches from workers live in shared memory)."""
    return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(count)]


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for step, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.keys() == b.keys(), step
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step}, {key}")


def class_of_color(image, class_names):
    """The class whose colour is nearest the image's mean colour."""
    mean = image.reshape(-1, 3).mean(axis=0)
    distances = [np.abs(mean - np.asarray(COLORS[name])).sum() for name in class_names]
    return int(np.argmin(distances))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_folder")
    write_image_folder(
        root, COLORS, NUM_TRAIN_PER_CLASS, NUM_TEST_PER_CLASS, size=FILE_SIZE, seed=2
    )
    return root


@pytest.fixture(scope="module")
def reference(folder):
    """45 train batches of 4 from step 0 (4 epochs of 11 steps and one more), in-process."""
    split = stream.open_split(make_config(folder), "train", process_index=0, process_count=1)
    iterator = stream.train_batches(split, **train_args())
    batches = take(iterator, 45)
    iterator.close()
    return split, batches


def test_one_epoch_is_the_split_minus_the_remainder(folder):
    # Evaluation opens each process's shard: process 1 of 2 holds examples [22, 45) of
    # the fixed file shuffle, 23 files, the in-memory path's shard of the same process.
    config = make_config(folder, image_size=FILE_SIZE)
    shard = stream.open_split(config, "train", process_index=1, process_count=2)
    assert (shard.num_examples, shard.num_classes, len(shard.records)) == (NUM_TRAIN, 3, 23)
    whole = stream.open_split(config, "train", process_index=0, process_count=1)
    assert [r.source for r in shard.records] == [whole.records[i].source for i in range(22, 45)]
    in_memory_shard = sources.load_split(config, "train", process_index=1, process_count=2)
    assert len(in_memory_shard.labels) == 23
    # Training reads the whole split: 45 files, an epoch of 45 // 6 = 7 steps of 6, so 3
    # files sit out each epoch.
    split = whole
    assert split.class_names == ("blue", "green", "red") and len(split.records) == NUM_TRAIN
    in_memory = sources.load_split(config, "train", process_index=0, process_count=1)
    label_of = {
        img.tobytes(): int(label)
        for img, label in zip(in_memory.images, in_memory.labels, strict=True)
    }
    assert len(label_of) == NUM_TRAIN

    # No crop, no flip, files at their own size: each batch image is a decoded file.
    iterator = stream.train_batches(
        split,
        **train_args(global_batch_size=6, crop_padding=0, random_flip=False, image_size=12),
    )
    epochs = [take(iterator, 7), take(iterator, 7)]
    iterator.close()
    orders = []
    for batches in epochs:
        seen = []
        for batch in batches:
            assert batch["image"].dtype == np.uint8 and batch["image"].shape == (6, 12, 12, 3)
            assert batch["label"].dtype == np.int32 and batch["label"].shape == (6,)
            for image, label in zip(batch["image"], batch["label"], strict=True):
                assert label_of[image.tobytes()] == label
                assert class_of_color(image, split.class_names) == label
                seen.append(image.tobytes())
        assert len(seen) == 42 and len(set(seen)) == 42  # No repeats within an epoch.
        orders.append(seen)
    assert orders[0] != orders[1]  # Each epoch has its own shuffle.


def test_processes_take_their_rows_of_one_global_batch(folder, reference):
    """Any split of the rows over processes gives the global batches of one process."""
    split, batches = reference
    parts = []
    for rows in ((0, 1), (2, 3)):  # two processes, two rows each
        iterator = stream.train_batches(split, **train_args(rows=rows, start_step=9))
        parts.append(take(iterator, 4))
        iterator.close()
    for step, (first, second) in enumerate(zip(*parts, strict=True)):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([first[key], second[key]]), batches[9 + step][key]
            )
    iterator = stream.train_batches(split, **train_args(rows=(1, 3), num_workers=2))
    (part,) = take(iterator, 1)
    iterator.close()
    np.testing.assert_array_equal(part["image"], batches[0]["image"][[1, 3]])
    # The saved state names the global batch, not the rows: any topology restores it.
    assert iterator.get_state() == {"next_step": 1, "seed": 0, "global_batch_size": 4}


def test_order_is_grains_shuffle_slice_repeat():
    """stream._Order computes the sequence grain's dataset chain gives (runs keep their order)."""
    records = [f"record{i}" for i in range(23)]
    order = stream._Order(records, kept=20, seed=12345)
    grains = grain.MapDataset.source(records).shuffle(seed=12345).slice(slice(0, 20)).repeat()
    positions = range(3 * 20 + 7)  # three epochs and a bit
    assert [order[p] for p in positions] == [grains[p] for p in positions]
    # Each epoch: 20 distinct records of the 23, in a shuffle of its own.
    epochs = [[order[e * 20 + i] for i in range(20)] for e in range(3)]
    assert all(len(set(epoch)) == 20 for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_batches_are_a_pure_function_of_seed_and_step(folder, reference):
    split, batches = reference
    steps = splits.steps_per_epoch(NUM_TRAIN, 4)
    assert steps == 11  # 45 // 4: one example sits out each epoch.
    # Started inside epoch 0, running into epoch 2.
    start = steps - 2
    iterator = stream.train_batches(split, **train_args(start_step=start))
    assert_same_batches(take(iterator, steps + 4), batches[start : start + steps + 4])
    iterator.close()
    # Worker processes: the same batches, bitwise, across two epoch boundaries.
    iterator = stream.train_batches(split, **train_args(num_workers=2))
    assert_same_batches(take(iterator, 2 * steps + 3), batches[: 2 * steps + 3])
    iterator.close()
    # Another seed: other batches.
    iterator = stream.train_batches(split, **train_args(seed=1))
    other = take(iterator, 2)
    iterator.close()
    assert not np.array_equal(other[0]["image"], batches[0]["image"])
    assert not np.array_equal(other[1]["label"], batches[1]["label"])


def test_state_restores_the_next_batches(folder, reference):
    split, batches = reference
    iterator = stream.train_batches(split, **train_args())
    take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))
    iterator.close()
    assert state["next_step"] == 7
    fresh = stream.train_batches(split, **train_args())
    fresh.set_state(state)
    assert_same_batches(take(fresh, 3), batches[7:10])
    fresh.close()
    # The trainer's pattern: start at the checkpoint's step, then restore its state.
    resumed = stream.train_batches(split, **train_args(start_step=7))
    resumed.set_state(state)
    assert_same_batches(take(resumed, 1), batches[7:8])
    resumed.close()

    # With worker processes: saved after batch 12 (in epoch 1), restored into new workers.
    iterator = stream.train_batches(split, **train_args(num_workers=2))
    assert_same_batches(take(iterator, 12), batches[:12])
    state = json.loads(json.dumps(iterator.get_state()))
    iterator.close()
    fresh = stream.train_batches(split, **train_args(num_workers=2))
    fresh.set_state(state)
    assert_same_batches(take(fresh, 3), batches[12:15])
    fresh.close()

    # A state saved with other settings has other batches: refused, with the reason.
    other = stream.train_batches(split, **train_args(seed=5))
    with pytest.raises(DatasetError, match="seed: saved 0, now 5"):
        other.set_state(state)
    # A single process's state from before the order became global: the same batches.
    old = {"next_step": 7, "seed": 0, "per_process_batch_size": 4, "process_index": 0}
    fresh = stream.train_batches(split, **train_args())
    fresh.set_state({**old, "process_count": 1})
    assert_same_batches(take(fresh, 1), batches[7:8])
    fresh.close()
    # One of two processes then: other batches, refused.
    with pytest.raises(DatasetError, match="global_batch_size: saved None, now 4"):
        other.set_state({**old, "process_count": 2})
    other.close()


def test_crop_flip_is_a_crop_of_the_padded_resized_file(folder, reference):
    split, batches = reference
    pad = 2
    sources_by_label = {label: [] for label in range(3)}
    for name, label in zip(split.class_names, range(3), strict=True):
        for path in sorted((folder / "train" / name).iterdir()):
            image = folders.read_image(path, SIZE)
            sources_by_label[label].append(np.pad(image, ((pad, pad), (pad, pad), (0, 0))))
    offsets, flips = [], []
    for batch in batches[:6]:
        for image, label in zip(batch["image"], batch["label"], strict=True):
            matches = [
                (top, left, flip)
                for padded in sources_by_label[int(label)]
                for top in range(2 * pad + 1)
                for left in range(2 * pad + 1)
                for flip in (False, True)
                if np.array_equal(
                    padded[top : top + SIZE, left : left + SIZE][:, ::-1]
                    if flip
                    else padded[top : top + SIZE, left : left + SIZE],
                    image,
                )
            ]
            assert len(matches) == 1, matches
            offsets.append(matches[0][:2])
            flips.append(matches[0][2])
    assert len(offsets) == 24
    assert len(set(offsets)) >= 5  # Offsets spread over the 25 possible ones.
    assert 0 < sum(flips) < len(flips)


def test_random_resized_crop_batches(folder, reference):
    split, _ = reference
    iterator = stream.train_batches(split, **train_args(augment="random_resized_crop"))
    batch = take(iterator, 2)
    iterator.close()
    plain = {
        folders.read_image(p, SIZE).tobytes()
        for name in split.class_names
        for p in (folder / "train" / name).iterdir()
    }
    resized = 0
    for b in batch:
        assert b["image"].dtype == np.uint8 and b["image"].shape == (4, SIZE, SIZE, 3)
        for image, label in zip(b["image"], b["label"], strict=True):
            resized += image.tobytes() in plain
            assert class_of_color(image, split.class_names) == label
    # A crop of (nearly) the whole file, unflipped, is a plain resize: rare, not never.
    assert resized <= 1


def _gradient_image(width, height):
    x = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, axis=1)
    pixels = np.stack([x, y, 255 - x], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _reference_crop(path, image_size, seed):
    """Full decode, upright, then the same crop box and resize."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    left, top, w, h = decode._inception_crop_box(*image.size, np.random.default_rng(seed))
    box = (left, top, left + w, top + h)
    return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box))


def test_inception_crop_geometry_exif_and_draft(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, w, h = decode._inception_crop_box(640, 480, rng)
        assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 480
        assert 0.08 * 0.97 <= w * h / (640 * 480) <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # A strip too thin for any try: the central crop with the ratio clamped to 3/4.
    assert decode._inception_crop_box(10, 200, np.random.default_rng(0)) == (0, 93, 10, 13)

    # A PNG stored sideways with EXIF orientation 6: the crop is of the upright image,
    # exactly the full-decode reference (PNG has no reduced-size decoding).
    upright = _gradient_image(90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # Displayed after a 270 degree rotation.
    png = tmp_path / "sideways.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(png, exif=exif)
    record = stream._Record(str(png), 0, None)
    for seed in range(5):
        got = decode.random_resized_crop(record, 16, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, _reference_crop(png, 16, seed))
        # And the upright image itself (lossless) gives the same pixels.
        assert got.shape == (16, 16, 3)

    # A 480x360 JPEG cropped to 16 px: decoded at 1/8 scale, close to the full decode.
    jpeg = tmp_path / "photo.jpg"
    _gradient_image(480, 360).save(jpeg, quality=95)
    scales = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        answer = real_draft(self, mode, size)
        scales.append(self.decoderconfig[0] if answer else 1)
        return answer

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    with open(jpeg, "rb") as f:
        record = stream._Record("photo", 0, f.read())  # As a tfds record: bytes.
    for seed in range(5):
        got = decode.random_resized_crop(record, 16, np.random.default_rng(seed))
        want = _reference_crop(jpeg, 16, seed)
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 4
    assert len(scales) == 5 and min(scales) >= 2  # Every crop decoded at reduced size.


def test_evaluation_passes_keep_one_pool_of_workers_and_give_each_pass_whole(folder):
    config = make_config(folder)
    split = stream.open_split(config, "test", process_index=0, process_count=1)
    batch = 4
    count = splits.num_eval_batches(NUM_TEST, 1, batch) + 1  # 6 of images, 1 of padding.
    settings = dict(per_process_batch_size=batch, num_batches=count, image_size=SIZE)
    in_process = [
        {k: np.array(v) for k, v in b.items()}
        for b in stream.eval_batches(split, **settings, resize_size=0, num_workers=0)
    ]
    assert len(in_process) == 7 and not in_process[-1]["mask"].any()

    def one_pass(passes, stop_after=None):
        got = []
        for b in passes.one_pass():
            got.append({k: np.array(v) for k, v in b.items()})
            if len(got) == stop_after:
                break
        return got

    passes = stream.EvalPasses(split, **settings, resize_size=0, num_workers=2)
    try:
        assert_same_batches(one_pass(passes), in_process)
        workers = {p.pid for p in multiprocessing.active_children()}
        assert len(workers) == 2
        # The next passes start where the pool stands: at the first batch, same workers.
        for _ in range(2):
            assert_same_batches(one_pass(passes), in_process)
            assert {p.pid for p in multiprocessing.active_children()} == workers
        # A pass given up halfway stops the pool; the next pass is whole, from new workers.
        assert_same_batches(one_pass(passes, stop_after=3), in_process[:3])
        assert not workers & {p.pid for p in multiprocessing.active_children()}
        assert_same_batches(one_pass(passes), in_process)
        assert len(multiprocessing.active_children()) == 2
    finally:
        passes.close()
    assert not multiprocessing.active_children()
    passes.close()  # Twice is fine.


def test_eval_covers_each_example_once_over_two_processes(folder):
    config = make_config(folder)
    batch = 4
    count = splits.num_eval_batches(NUM_TEST, 2, batch)
    assert count == 3  # Shards of 10 and 11: 3 batches of 4 each.
    seen = []
    for process, workers in ((0, 0), (1, 2)):
        split = stream.open_split(config, "test", process_index=process, process_count=2)
        got = list(
            stream.eval_batches(
                split,
                per_process_batch_size=batch,
                num_batches=count,
                image_size=SIZE,
                resize_size=0,
                num_workers=workers,
            )
        )
        got = [{k: np.array(v) for k, v in b.items()} for b in got]
        assert len(got) == count
        images = np.concatenate([b["image"] for b in got])
        labels = np.concatenate([b["label"] for b in got])
        mask = np.concatenate([b["mask"] for b in got])
        assert images.dtype == np.uint8 and labels.dtype == np.int32 and mask.dtype == bool
        local = len(split.records)
        assert local == (10, 11)[process]
        np.testing.assert_array_equal(mask, np.arange(count * batch) < local)
        assert not images[local:].any() and not labels[local:].any()
        # In order, and equal to the in-memory path's shard.
        in_memory = sources.load_split(config, "test", process_index=process, process_count=2)
        np.testing.assert_array_equal(images[:local], in_memory.images)
        np.testing.assert_array_equal(labels[:local], in_memory.labels)
        seen.extend(images[:local])
    every_file = [
        folders.read_image(p, SIZE).tobytes()
        for name in ("blue", "green", "red")
        for p in (folder / "test" / name).iterdir()
    ]
    assert sorted(image.tobytes() for image in seen) == sorted(every_file)

    with pytest.raises(DatasetError, match="cannot hold the 10 examples"):
        stream.eval_batches(
            stream.open_split(config, "test", process_index=0, process_count=2),
            per_process_batch_size=batch,
            num_batches=2,
            image_size=SIZE,
            resize_size=0,
            num_workers=0,
        )


def test_eval_resize_then_central_crop_matches_read_image(tmp_path):
    root = tmp_path / "rect"
    for split, count in (("train", 1), ("val", 5)):
        os.makedirs(root / split / "only")
        for i in range(count):
            _gradient_image(20 + 3 * i, 13 + i).save(root / split / "only" / f"{i}.png")
    split = stream.open_split(make_config(root), "val", process_index=0, process_count=1)
    (got,) = stream.eval_batches(
        split, per_process_batch_size=5, num_batches=1, image_size=8, resize_size=10, num_workers=0
    )
    paths = [record.source for record in split.records]
    want = np.stack([folders.read_image(p, 8, 10) for p in paths])
    np.testing.assert_array_equal(got["image"], want)
    assert got["mask"].all()


@pytest.fixture(scope="module")
def cifar_array_record(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_array_record")
    written = write_cifar100_archive(root / "manual", num_train=40, num_test=13, seed=5)
    prepare_cifar100(root / "data", root / "manual", "array_record")
    return root / "data", written


def test_tfds_array_record(cifar_array_record):
    data_dir, written = cifar_array_record
    config = make_config(data_dir, dataset="cifar100", image_size=32)
    split = stream.open_split(config, "train", process_index=0, process_count=1)
    assert split.num_examples == 40 and split.num_classes == 100
    assert split.class_names == FINE_LABEL_NAMES
    archive = {
        image.tobytes(): int(label)
        for image, label in zip(
            written["train"]["images"], written["train"]["fine_labels"], strict=True
        )
    }
    iterator = stream.train_batches(
        split,
        **train_args(global_batch_size=8, image_size=32, crop_padding=0, random_flip=False),
    )
    epoch = take(iterator, 5)  # 40 / 8: the whole split, nothing dropped.
    iterator.close()
    seen = []
    for batch in epoch:
        assert batch["image"].shape == (8, 32, 32, 3)
        for image, label in zip(batch["image"], batch["label"], strict=True):
            assert archive[image.tobytes()] == label  # The archive's pixels and fine label.
            seen.append(image.tobytes())
    assert sorted(seen) == sorted(archive)

    # Two processes' eval shards of the test split: each record once, in record order.
    test_archive = {
        image.tobytes(): int(label)
        for image, label in zip(
            written["test"]["images"], written["test"]["fine_labels"], strict=True
        )
    }
    seen = []
    for process in range(2):
        shard = stream.open_split(config, "test", process_index=process, process_count=2)
        for b in stream.eval_batches(
            shard,
            per_process_batch_size=4,
            num_batches=2,
            image_size=32,
            resize_size=0,
            num_workers=0,
        ):
            for image, label, valid in zip(b["image"], b["label"], b["mask"], strict=True):
                if valid:
                    assert test_archive[image.tobytes()] == label
                    seen.append(image.tobytes())
    assert sorted(seen) == sorted(test_archive)

    # A record that does not decode is named by split and index.
    record = split.records[3]._replace(data=b"not an image")
    with pytest.raises(DatasetError, match=r"record 3 of the 'train' split of tfds dataset"):
        decode.read_record(record, 32, 0)


def test_tfds_array_record_trains_through_the_stream_path(cifar_array_record, tmp_path):
    from configs import smoke
    from resnet_jax import train

    data_dir, _ = cifar_array_record
    config = smoke.get_config()
    config.dataset, config.data_dir, config.image_size = "cifar100", str(data_dir), 32
    config.input, config.input_workers = "stream", 0
    config.batch_size, config.eval_batch_size = 8, 8
    config.num_train_steps, config.log_every_steps = 10, 5  # 40 / 8: two epochs.
    config.eval_every_steps = config.checkpoint_every_steps = 10
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(config, str(workdir))
    assert results["num_examples"] == 13 and results["step"] == 10  # every test record once
    # The iterator's state went into the checkpoint through grain's Orbax handler.
    saved = json.loads((workdir / "checkpoints/10/data_iterator/process_0-of-1.json").read_text())
    assert saved["next_step"] == 10 and saved["global_batch_size"] == 8
    meta = json.loads((workdir / "checkpoints/10/meta/metadata").read_text())
    assert meta["data"]["input"] == "stream" and meta["data"]["image_size"] == 32
    assert meta["class_names"] == list(FINE_LABEL_NAMES)


def test_tfds_not_prepared_or_tfrecord_is_a_clear_error(tmp_path, cifar):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = make_config(empty, dataset="cifar100")
    with pytest.raises(DatasetError, match="is not prepared") as raised:
        stream.open_split(config, "train", process_index=0, process_count=1)
    assert f"data_dir={str(empty)!r}, file_format='array_record'" in str(raised.value)
    assert "--config.input=device" in str(raised.value)
    assert not any(empty.iterdir())  # Nothing downloaded, nothing written.

    tfrecord_dir = cifar[0] / "data"  # conftest's cifar100, prepared as tfrecord.
    config = make_config(tfrecord_dir, dataset="cifar100")
    with pytest.raises(DatasetError, match=r"prepared as \['tfrecord'\]") as raised:
        stream.open_split(config, "train", process_index=0, process_count=1)
    message = str(raised.value)
    assert "array_record" in message and "delete" in message
    command = re.search(r'python -c "(.*?)"', message).group(1)
    assert f"tfds.builder('cifar100', data_dir={str(tfrecord_dir)!r}" in command

    with pytest.raises(DatasetError, match="neither image_folder nor a tensorflow-datasets"):
        stream.open_split(
            make_config(empty, dataset="no_such_dataset"), "train", process_index=0, process_count=1
        )


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_file_stops_with_its_path(tmp_path, workers):
    write_image_folder(tmp_path, {"a": (200, 0, 0), "b": (0, 200, 0)}, 6, 1, size=8)
    bad = tmp_path / "train" / "b" / "0003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    split = stream.open_split(make_config(tmp_path), "train", process_index=0, process_count=1)
    # 12 files, 3 steps of 4: the epoch uses every file, the broken one too.
    iterator = stream.train_batches(split, **train_args(num_workers=workers))
    with pytest.raises(DatasetError, match=re.escape(f"Cannot read image file {bad} ")):
        take(iterator, 3)
    iterator.close()


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    from PIL import Image
    opens = [0]
    real_open = Image.open
    def counting_open(*args, **kwargs):
        opens[0] += 1
        return real_open(*args, **kwargs)
    Image.open = counting_open
    from resnet_jax import defaults
    from resnet_jax.data import stream
    def peak_rss_mb():
        # VmHWM: the peak of this program's own memory. ru_maxrss is not: it starts
        # from the parent's RSS at fork (pytest's, hundreds of MB), kept across exec.
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    def main():
        config = defaults.saved_config(dict(dataset="image_folder", data_dir=sys.argv[1]), "argv")
        split = stream.open_split(config, "train", process_index=0, process_count=1)
        iterator = stream.train_batches(
            split, global_batch_size=16, seed=0, start_step=0, image_size=96,
            augment="crop_flip", crop_padding=4, random_flip=True, num_workers=0)
        start = time.perf_counter()
        next(iterator)
        first = time.perf_counter() - start
        opens_at_first = opens[0]
        for _ in range(19):
            next(iterator)
        iterator.close()
        peak_mb = peak_rss_mb()
        print(json.dumps(dict(peak_mb=peak_mb, opens_at_first=opens_at_first,
                              opens=opens[0], first_batch_s=first)))
    if __name__ == "__main__":
        main()
    """
)


def _probe(folder):
    process = subprocess.Popen(
        [sys.executable, "-c", _MEMORY_PROBE, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=120)  # Drains both pipes.
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"the memory probe on {folder} took over 120 s")
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_memory_and_first_batch_do_not_grow_with_the_dataset(tmp_path):
    # 8 px files decoded at 96 px: holding the decoded split would take 28 KB per
    # file, 8 MB for the small folder and 83 MB for the large one.
    colors = {f"c{i}": (25 * i, 250 - 25 * i, 128) for i in range(10)}
    write_image_folder(tmp_path / "small", colors, 30, 0, size=8, seed=0)
    write_image_folder(tmp_path / "large", colors, 300, 0, size=8, seed=0)
    small, large = _probe(tmp_path / "small"), _probe(tmp_path / "large")
    print(f"memory probe: 300 files {small}, 3000 files {large}")
    # 20 batches of 16 = 320 decodes, whatever the folder: the first batch comes after
    # a few batches' worth of opens (threads run ahead 2 batches), not all 3000 files.
    for result in (small, large):
        assert result["opens_at_first"] <= 4 * 16
        assert result["opens"] <= (20 + 4) * 16
    assert large["peak_mb"] <= small["peak_mb"] + 25, (small, large)


# Stored pixels for each EXIF orientation: the inverse of PIL's exif_transpose step.
_STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def test_opencv_crop_follows_exif_and_draft_within_rounding(tmp_path):
    upright = _gradient_image(96, 64)
    for orientation, method in _STORED.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        (upright if method is None else upright.transpose(method)).save(path, quality=95, exif=exif)
        with Image.open(path) as stored:
            assert ImageOps.exif_transpose(stored).size == (96, 64), orientation
        record = stream._Record(str(path), 0, None)
        for seed in range(3):
            got = decode.random_resized_crop(record, 16, np.random.default_rng(seed), "opencv")
            want = _reference_crop(path, 16, seed)
            assert got.shape == (16, 16, 3) and got.dtype == np.uint8
            # A wrong turn of the image would be off by ~100 levels on this gradient.
            error = np.abs(got.astype(int) - want.astype(int)).mean()
            assert error < 3, (orientation, seed, error)
    # Reduced-size decoding: a 480x360 JPEG cropped to 16 px, close to the full decode.
    jpeg = tmp_path / "photo.jpg"
    _gradient_image(480, 360).save(jpeg, quality=95)
    rng = np.random.default_rng(0)
    boxes = [decode._inception_crop_box(480, 360, rng) for _ in range(5)]
    assert all(decode._reduction(w, h, 16) >= 2 for _, _, w, h in boxes)
    record = stream._Record("photo", 0, jpeg.read_bytes())
    for seed in range(5):
        got = decode.random_resized_crop(record, 16, np.random.default_rng(seed), "opencv")
        assert np.abs(got.astype(int) - _reference_crop(jpeg, 16, seed).astype(int)).mean() < 4


def test_opencv_decoder_leaves_other_files_to_pil_and_names_broken_ones(tmp_path):
    png = tmp_path / "a.png"
    _gradient_image(40, 30).save(png)
    record = stream._Record(str(png), 0, None)
    for seed in range(3):
        np.testing.assert_array_equal(
            decode.random_resized_crop(record, 8, np.random.default_rng(seed), "opencv"),
            decode.random_resized_crop(record, 8, np.random.default_rng(seed), "pil"),
        )
    broken = tmp_path / "broken.jpg"
    _gradient_image(40, 30).save(broken, quality=90)
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(DatasetError, match="broken.jpg"):
        decode.random_resized_crop(
            stream._Record(str(broken), 0, None), 8, np.random.default_rng(0), "opencv"
        )


def test_pil_decoder_batches_equal_the_previous_pipeline(folder, reference):
    """Decoding whole batches (this change) gives the per-record pipeline's exact pixels."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import input_benchmark
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    split, _ = reference
    before = input_benchmark.before_batches(split, 4, SIZE, 0)
    now = stream.train_batches(
        split, **train_args(augment="random_resized_crop", crop_padding=0), decoder="pil"
    )
    # 12 steps: past the end of the first epoch (11 steps), into the reshuffled second.
    assert_same_batches(take(now, 12), take(before, 12))
    before.close()
    now.close()

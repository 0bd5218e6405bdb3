"""Streaming input: grain pipelines that read, decode and augment examples lazily.

For datasets larger than host memory (ImageNet). A split is opened as a list of
files (image folders) or as tfds `array_record` files, which allow random access;
nothing is decoded until a batch needs it, and at most a few batches per worker are
in flight, so memory does not grow with the dataset.

The pipeline is a grain `MapDataset`: the global batch of step s (B examples, all
processes together) holds the examples at positions s*B .. s*B+B-1 of an endless
sequence of epochs over the whole training split, and everything about an example is
a function of its position:

- epoch e = s // steps_per_epoch visits the split in grain's index shuffle seeded
  from the seed and e, and keeps its first steps_per_epoch * B examples (the
  remainder is dropped);
- the random crop and flip of an example come from a Philox generator keyed by the
  seed at a counter set by the example's position (as grain's `random_map` seeds it,
  so runs made with it keep their crops).

Each process reads and decodes only its rows of each global batch (those its devices
hold, `sharding.process_rows`). So a run that starts (or resumes) at step k gets
exactly the batches an uninterrupted run gets from step k on, with any number of
worker processes, and on any number of hosts and devices; the iterator's state is
just the next step.

An image that cannot be decoded stops the run with a `DatasetError` naming the file
(image folders) or the split and record (tfds), also when a worker process hit it.
Skipping it instead would change the length of the epoch and so the batch of every
later step: a resumed run would no longer see what an uninterrupted one sees, and
nobody would learn that the file is broken.

Here: the records of a split (image files or tfds records, not decoded), the grain
pipelines of train and eval batches, and the checkpointable train iterator. Decoding
and the crops are in `data.decode`; the tfds checks and their messages in
`data.tfds_source`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags

from resnet_jax import sharding
from resnet_jax.data import decode, folders, interface, splits, tfds_source
from resnet_jax.data.errors import DatasetError

# In-process (num_workers=0): threads decode whole batches ahead; PIL releases the
# GIL while decoding. grain's defaults (16 threads, 500 elements ahead) would hold
# 500 batches: our elements are batches, not records.
_IN_PROCESS_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
# In a worker process the worker itself runs ahead of the consumer (one batch in its
# output queue while it makes the next), so it needs no threads of its own.
_WORKER_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_WORKER_BUFFER = 1


class _Record(NamedTuple):
    """One example, not decoded.

    Attributes:
      source: The image file (image folders), or where the record is (tfds), for messages.
      label: The class index.
      data: The encoded image (tfds), or None: read the file `source`.
    """

    source: str
    label: int
    data: bytes | None


def _check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"index {index} is not in [0, {length}).")


class _FolderRecords(Sequence):
    """Random access to this process's files of an image folder split."""

    def __init__(self, listing: folders.FolderListing):
        self._listing = listing

    def __len__(self) -> int:
        return len(self._listing.labels)

    def __getitem__(self, index: int) -> _Record:
        _check_index(index, len(self))
        return _Record(self._listing.path(index), int(self._listing.labels[index]), None)


class _TfdsRecords(Sequence):
    """Random access to this process's records [start, stop) of a tfds array_record split.

    The tfds data source holds open file readers, which do not cross process
    boundaries: each process (the trainer, each grain worker) opens its own.
    """

    def __init__(
        self, name: str, data_dir: str | None, split: str, start: int, stop: int, location: str
    ):
        self._name = name
        self._data_dir = data_dir
        self._split = split
        self._start = start
        self._stop = stop
        self._location = location
        self._source = self._open()

    def _open(self) -> Any:
        import tensorflow_datasets as tfds

        builder = tfds.builder(self._name, data_dir=self._data_dir)
        # The encoded bytes: decoded here like image files, with PIL's reduced-size
        # JPEG decoding where the crop allows.
        return builder.as_data_source(self._split, decoders={"image": tfds.decode.SkipDecoding()})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_source"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._source = self._open()

    def __len__(self) -> int:
        return self._stop - self._start

    def describe(self, record: int) -> str:
        return (
            f"record {record} of the {self._split!r} split of tfds dataset {self._name!r} "
            f"({self._location})"
        )

    def __getitem__(self, index: int) -> _Record:
        # Past the end lie other processes' records: an error, as for any sequence.
        _check_index(index, len(self))
        record = self._start + index
        where = self.describe(record)
        try:
            example = self._source[record]
        except Exception as e:  # noqa: BLE001 - any reader failure gets the record's name.
            raise DatasetError(
                f"Cannot read {where} ({type(e).__name__}: {e}): the prepared files are "
                f"damaged or incomplete; delete {self._location} and prepare the dataset "
                f"again."
            ) from e
        return _Record(where, int(example["label"]), bytes(example["image"]))


@dataclasses.dataclass(frozen=True, eq=False)
class StreamSplit:
    """One split opened for random access; nothing decoded yet.

    Attributes:
      num_examples: Examples in the whole split, all processes together.
      class_names: Name of each class, indexed by label.
      num_classes: Number of classes.
      process_index: Which shard `records` is.
      process_count: Number of shards the split is cut into.
      records: This process's shard: a random-access sequence of undecoded examples.
    """

    num_examples: int
    class_names: tuple[str, ...] = dataclasses.field(repr=False)
    num_classes: int
    process_index: int
    process_count: int
    records: Sequence = dataclasses.field(repr=False)


def open_split(
    config: Any,
    split: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> StreamSplit:
    """Opens this process's shard of a split for streaming; decodes nothing.

    Process i of P gets examples [i*n//P, (i+1)*n//P) of the split in its fixed
    order, as `sources.load_split` does: for image folders a fixed shuffle of the
    files (the same as the in-memory path, so both see the same shards and labels),
    for tfds the stored record order.

    Training opens the whole split in every process (process_index=0,
    process_count=1): its order is global, and each process takes its rows of each
    batch. Evaluation opens each process's shard.

    Args:
      config: Needs `dataset` ("image_folder" or a tfds dataset name) and `data_dir`
        (the folder; for tfds its data directory, None for tfds's default).
      split: A subfolder of the image folder ("train", "test", "val", ...), or a split
        of the tfds dataset ("train", "validation", ...).
      process_index: This process; defaults to `jax.process_index()`.
      process_count: Number of processes; defaults to `jax.process_count()`.

    Returns:
      The opened split.

    Raises:
      DatasetError: A missing or malformed image folder, an unknown tfds dataset or
        split, or a tfds dataset that is not prepared as array_record (the message
        gives the command that prepares it). Nothing is ever downloaded here.
    """
    process_index, process_count = splits.process_position(process_index, process_count)
    if config.dataset == "image_folder":
        records, num_examples, class_names = _open_image_folder(
            config, split, process_index, process_count
        )
    else:
        records, num_examples, class_names = _open_tfds(config, split, process_index, process_count)
    return StreamSplit(
        num_examples=num_examples,
        class_names=class_names,
        num_classes=len(class_names),
        process_index=process_index,
        process_count=process_count,
        records=records,
    )


def _open_image_folder(
    config: Any, split: str, process_index: int, process_count: int
) -> tuple[_FolderRecords, int, tuple[str, ...]]:
    # The same listing, order and shards as the in-memory path (sources.load_split).
    listing = folders.list_image_folder(config, split)
    shard = listing.shard(process_index, process_count)
    return _FolderRecords(shard), len(listing.labels), listing.class_names


def _open_tfds(
    config: Any, split: str, process_index: int, process_count: int
) -> tuple[_TfdsRecords, int, tuple[str, ...]]:
    builder = tfds_source.array_record_builder(config)
    num_examples = tfds_source.split_info(builder, config, split).num_examples
    class_names = tuple(builder.info.features["label"].names)
    start, stop = splits.shard_bounds(num_examples, process_index, process_count)
    data_dir = config.data_dir or None  # "" (an empty flag) is tfds's default too
    location = os.fspath(builder.data_dir)
    records = _TfdsRecords(config.dataset, data_dir, split, start, stop, location)
    return records, num_examples, class_names


# ----------------------------------------------------------------------------
# One record, decoded (data.decode) and, for training, cropped and flipped.


def _example_rng(seed: int) -> np.random.Generator:
    """A Philox generator keyed by `seed`; `_at` moves it to one example's stream."""
    return np.random.Generator(np.random.Philox(seed))


def _at(rng: np.random.Generator, position: int) -> np.random.Generator:
    """`rng` reset to the stream of the example at `position`: counter (0, 0, 0, position).

    The key comes from the seed, the counter from the position, so each example's draws
    depend on nothing else: grain's `random_map` derives them the same way, and the crops
    of runs made with it are unchanged.
    """
    state = rng.bit_generator.state
    state["state"]["counter"] = np.array([0, 0, 0, position], dtype=np.uint64)
    state["buffer"] = np.zeros(4, dtype=np.uint64)
    state["buffer_pos"] = 4
    state["has_uint32"] = 0
    state["uinteger"] = 0
    rng.bit_generator.state = state
    return rng


@dataclasses.dataclass(frozen=True)
class _TrainDecode:
    """Decode with the crop of `augment` (see `train_batches`), then a random horizontal flip."""

    image_size: int
    augment: str
    crop_padding: int
    random_flip: bool
    decoder: str

    def __call__(self, record: _Record, rng: np.random.Generator, out: np.ndarray) -> None:
        """Writes the record's training image into `out` (uint8 [size, size, 3])."""
        if self.augment == "random_resized_crop":
            decode.random_resized_crop(record, self.image_size, rng, self.decoder, out)
        else:
            # crop_flip: resize, then a random crop of the zero-padded image.
            image = decode.read_record(record, self.image_size, 0)
            p = self.crop_padding
            if p > 0:
                padded = np.pad(image, ((p, p), (p, p), (0, 0)))
                top, left = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
                image = padded[top : top + self.image_size, left : left + self.image_size]
            out[...] = image
        if self.random_flip and rng.random() < 0.5:
            decode.flip(out)


@dataclasses.dataclass(frozen=True)
class _Order:
    """The endless sequence of the training records, by position.

    Position p is example p % kept of epoch e = p // kept: the epoch visits the split
    in grain's index shuffle seeded with (seed + e) and keeps its first `kept` records.
    This is what grain's `MapDataset.source(records).shuffle(seed).slice(slice(0, kept))
    .repeat()` yields, computed without its per-element statistics and index arithmetic
    (about 0.02 ms a record in a micro-benchmark here); a test holds the two equal.
    """

    records: Sequence
    kept: int
    seed: int

    def __getitem__(self, position: int) -> _Record:
        epoch, index = divmod(position, self.kept)
        shuffled = grain.experimental.index_shuffle(
            index, max_index=len(self.records) - 1, seed=(self.seed + epoch) % 2**32, rounds=4
        )
        return self.records[shuffled]


@dataclasses.dataclass(frozen=True)
class _TrainBatch(grain.transforms.Map):
    """This process's rows of global batch number `step`, decoded into one preallocated array.

    Row r of the global batch is position step * global_batch + r of `order`, cropped
    and flipped with the draws of `_at(position)`; example j of the result is row rows[j].
    """

    order: _Order
    global_batch: int
    rows: tuple[int, ...]
    crop_seed: int
    decode_one: _TrainDecode

    def map(self, step: int) -> dict[str, np.ndarray]:
        size = self.decode_one.image_size
        images = np.empty((len(self.rows), size, size, 3), np.uint8)
        labels = np.empty((len(self.rows),), np.int32)
        rng = _example_rng(self.crop_seed)
        first = step * self.global_batch
        for j, row in enumerate(self.rows):
            record = self.order[first + row]
            self.decode_one(record, _at(rng, first + row), images[j])
            labels[j] = record.label
        return {"image": images, "label": labels}


@dataclasses.dataclass(frozen=True)
class _EvalDecode(grain.transforms.Map):
    """The evaluation geometry of `decode.read_image`."""

    image_size: int
    resize_size: int

    def map(self, record: _Record) -> dict[str, np.ndarray]:
        image = decode.read_record(record, self.image_size, self.resize_size)
        return {"image": image, "label": np.int32(record.label)}


# ----------------------------------------------------------------------------
# Batches.


def _seed(seed: int, stream: int) -> int:
    """A 32-bit grain seed for one (seed, purpose)."""
    # The 0 is the process index the seeds of one process were drawn with before the
    # order became global: single-process runs keep their batches.
    sequence = np.random.SeedSequence([seed, stream, 0])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in each worker: ends it once the trainer is gone, even after a SIGKILL.

    A killed trainer cannot stop its workers, which would otherwise keep running (and
    hold the trainer's output pipes open) as orphans.
    """
    del worker_index, worker_count
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _iterate(batches: grain.MapDataset, num_workers: int) -> grain.DatasetIterator:
    if num_workers == 0:
        return iter(batches.to_iter_dataset(_IN_PROCESS_READ))
    if not flags.FLAGS.is_parsed():
        # With jax's profiler loaded, grain's multiprocess prefetch reads an absl flag
        # (grain_enable_multiprocess_worker_profiling); outside an absl app (tests,
        # notebooks, scripts) that raises UnparsedFlagAccessError. The defaults are right.
        flags.FLAGS.mark_as_parsed()
    # grain gives worker w the batches w, w+N, w+2N, ... and interleaves them back in
    # order; each batch is made whole by one worker, so batches do not depend on N.
    dataset = batches.to_iter_dataset(_WORKER_READ).mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=_WORKER_BUFFER
        ),
        worker_init_fn=_exit_with_parent,
    )
    return iter(dataset)


class TrainIterator(grain.DatasetIterator):
    """Endless train batches; its state is the next global step.

    The batches are a pure function of the step, so the step is all there is to
    save: unlike the state of grain's multiprocess iterator, it restores with any
    number of workers and into an iterator started at any step. Worker processes
    start at the first batch, and are restarted by `set_state` only when the step
    changes.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        *,
        start_step: int,
        num_workers: int,
        data_settings: dict[str, int],
    ):
        super().__init__()
        self._batches = batches
        self._num_workers = num_workers
        self._data_settings = data_settings
        self._step = start_step
        self._iterator: grain.DatasetIterator | None = None

    def _started(self) -> grain.DatasetIterator:
        if self._iterator is None:
            self._iterator = _iterate(self._batches[self._step :], self._num_workers)
        return self._iterator

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._started())
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """{"next_step": the step of the next batch, and what the batches depend on}."""
        return {"next_step": self._step, **self._data_settings}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues with the batch of step `state["next_step"]`.

        A state saved by one process before the order became global (no
        "global_batch_size") is read as the same settings: its batches were these.

        Raises:
          DatasetError: The state belongs to other settings (seed, global batch size),
            or to a run of several processes from before the order became global;
            their batches differ.
        """
        if "next_step" not in state:
            raise DatasetError(
                f"{state!r} is not a state of the streaming train iterator (no next_step): "
                f"it was saved by another input path; start from the checkpoint's step "
                f"instead (start_step)."
            )
        state = splits.global_settings(state)
        changed = {
            k: (state.get(k), v) for k, v in self._data_settings.items() if state.get(k) != v
        }
        if changed:
            details = ", ".join(f"{k}: saved {old}, now {new}" for k, (old, new) in changed.items())
            raise DatasetError(
                f"The saved input state was made with other settings ({details}), so its "
                f"batches differ from these: keep the settings of the saved run, or start "
                f"from the checkpoint's step (start_step) without restoring the input state."
            )
        step = int(state["next_step"])
        if step < 0:
            raise DatasetError(f"next_step={step} in the saved input state must be >= 0.")
        if step != self._step:
            self._close_workers()
            self._step = step

    def start_prefetch(self) -> None:
        self._started().start_prefetch()

    def _close_workers(self) -> None:
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def close(self) -> None:
        self._close_workers()
        super().close()


def train_batches(
    split: StreamSplit,
    *,
    global_batch_size: int,
    rows: Sequence[int] | None = None,
    seed: int,
    start_step: int,
    image_size: int,
    augment: str,
    crop_padding: int,
    random_flip: bool,
    num_workers: int,
    decoder: str = "opencv",
) -> TrainIterator:
    """This process's rows of the global train batches forever, from step `start_step` on.

    Args:
      split: The opened training split, whole (every process reads from all of it).
      global_batch_size: Examples per step, all processes together.
      rows: The rows of each global batch this process makes, in order
        (`sharding.process_rows`); None for all of them (one process).
      seed: Data seed (non-negative).
      start_step: Global step of the first batch (non-negative).
      image_size: Side of the square images.
      augment: "crop_flip" (resize to image_size, zero-pad by crop_padding, random
        crop back; CIFAR) or "random_resized_crop" (the Inception crop of 8-100% of
        the area, aspect ratio 3/4-4/3, resized; ImageNet).
      crop_padding: Zero padding of crop_flip on each side; 0 disables the crop.
      random_flip: Whether to flip horizontally with probability 1/2.
      num_workers: 0 decodes in this process (with two threads); N > 0 in N grain
        worker processes.
      decoder: What decodes and resizes random_resized_crop's JPEGs: "opencv" or "pil"
        (see `data.decode`).

    Returns:
      An endless iterator of {"image": uint8 [B, image_size, image_size, 3] (not
      normalised), "label": int32 [B]}, with `get_state` / `set_state` (a
      JSON-serialisable dict) for checkpoints and `close` to stop its workers.
      Arguments are checked here, not at the first batch.

    Raises:
      DatasetError: A global batch larger than the split.
    """
    # The config's values, checked by config_checks.validate where they entered.
    assert seed >= 0 and start_step >= 0 and image_size > 0, (seed, start_step, image_size)
    assert augment in ("crop_flip", "random_resized_crop"), augment
    assert crop_padding >= 0 and num_workers >= 0, (crop_padding, num_workers)
    assert decoder in decode.DECODERS, decoder
    assert split.process_count == 1, "the whole training split, in every process"
    batch = global_batch_size
    rows = tuple(range(batch)) if rows is None else tuple(rows)
    assert rows and all(0 <= row < batch for row in rows), (rows, batch)
    steps = splits.steps_per_epoch(split.num_examples, batch)
    order = _Order(split.records, steps * batch, _seed(seed, splits.SHUFFLE_TAG))
    # Batch s decodes this process's rows of positions s*B .. s*B+B-1 straight into its
    # arrays (one copy per image, no per-record grain elements to stack), for ever (as
    # grain's repeat()).
    batches = grain.MapDataset.range(sys.maxsize // batch).map(
        _TrainBatch(
            order,
            batch,
            rows,
            _seed(seed, splits.CROP_FLIP_TAG),
            _TrainDecode(image_size, augment, crop_padding, random_flip, decoder),
        )
    )
    data_settings = {"seed": seed, "global_batch_size": batch}
    return TrainIterator(
        batches, start_step=start_step, num_workers=num_workers, data_settings=data_settings
    )


def _eval_dataset(
    split: StreamSplit, batch: int, num_batches: int, image_size: int, resize_size: int
) -> grain.MapDataset:
    """The shard's decoded, padded eval batches (no padding-only batches), checked."""
    splits.check_eval_capacity(len(split.records), batch, num_batches)
    assert image_size > 0, image_size
    assert resize_size == 0 or resize_size >= image_size, (resize_size, image_size)
    return (
        grain.MapDataset.source(split.records)
        .map(_EvalDecode(image_size, resize_size))
        .batch(batch, drop_remainder=False)
        .map(functools.partial(splits.pad_batch, size=batch))
    )


def _padding_batches(count: int, batch: int, image_size: int) -> Iterator[dict[str, np.ndarray]]:
    """`count` batches of padding only (mask False), for past the end of a shard."""
    empty = {
        "image": np.zeros((0, image_size, image_size, 3), np.uint8),
        "label": np.zeros((0,), np.int32),
    }
    return (splits.pad_batch(empty, batch) for _ in range(count))


def eval_batches(
    split: StreamSplit,
    *,
    per_process_batch_size: int,
    num_batches: int,
    image_size: int,
    resize_size: int,
    num_workers: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of this process's shard once, in order, then padding.

    Args:
      split: The opened evaluation split.
      per_process_batch_size: Examples per batch.
      num_batches: Batches to yield, the same in every process (`splits.num_eval_batches`).
      image_size: Side of the square images.
      resize_size: As `decode.read_image`: 0 resizes the whole image; N resizes the
        shorter side to N and takes the central image_size crop (ImageNet: 256, 224).
      num_workers: 0 decodes in this process; N > 0 in N grain worker processes,
        started for these batches and stopped after them (`EvalPasses` keeps them).

    Returns:
      An iterator of `num_batches` dicts: "image" uint8 [B, image_size, image_size, 3]
      (zeros where padded), "label" int32 [B] (0 where padded), "mask" bool [B].

    Raises:
      DatasetError: num_batches too small for the shard.
    """
    assert num_workers >= 0, num_workers
    batch = per_process_batch_size
    decoded = _eval_dataset(split, batch, num_batches, image_size, resize_size)
    # Past the end of the shard (an empty shard: from the start), batches of padding only.
    padding = _padding_batches(num_batches - len(decoded), batch, image_size)
    return itertools.chain(_iterate(decoded, num_workers) if len(decoded) else (), padding)


class EvalPasses:
    """Passes over the evaluation batches, decoded by one pool of grain workers kept
    from one pass to the next.

    A worker costs an interpreter and the project's imports to start (seconds of CPU
    each), which every evaluation paid again for each of its workers, twice with an EMA.
    Here the pool runs through the shard's batches over and over (the evaluation is
    deterministic), each pass takes exactly one round of them, and the workers wait,
    a batch ahead, for the next pass. A pass left unfinished stops the pool, so the
    next one starts a fresh pool at the first batch. `close` stops the workers.

    Args: as `eval_batches`, with num_workers > 0.
    """

    def __init__(
        self,
        split: StreamSplit,
        *,
        per_process_batch_size: int,
        num_batches: int,
        image_size: int,
        resize_size: int,
        num_workers: int,
    ):
        assert num_workers > 0, num_workers
        self.per_process_batch_size = per_process_batch_size
        self._decoded = _eval_dataset(
            split, per_process_batch_size, num_batches, image_size, resize_size
        )
        self._num_padding = num_batches - len(self._decoded)
        self._image_size = image_size
        self._num_workers = num_workers
        self._iterator: grain.DatasetIterator | None = None

    def one_pass(self) -> Iterator[dict[str, np.ndarray]]:
        """The `num_batches` batches of one evaluation, as `eval_batches` gives them."""
        if len(self._decoded):
            if self._iterator is None:
                self._iterator = _iterate(self._decoded.repeat(), self._num_workers)
            finished = False
            try:
                for _ in range(len(self._decoded)):
                    yield next(self._iterator)
                finished = True
            finally:
                if not finished:  # Out of step with the pool: start afresh next time.
                    self.close()
        yield from _padding_batches(
            self._num_padding, self.per_process_batch_size, self._image_size
        )

    def close(self) -> None:
        """Stops the workers (a later pass starts new ones); safe to call twice."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def num_workers(config: Any) -> int:
    """Worker processes of the streaming path: `config.input_workers`, -1 = one per core."""
    workers = config.input_workers
    if workers < 0:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return workers


class StreamTrainBatches:
    """Global train batches from grain's host iterator of process-local ones.

    Attributes:
      checkpointable: The host iterator (its state, the next step, is saved with each step).
    """

    def __init__(self, iterator: TrainIterator, mesh: Any):
        self.checkpointable = iterator
        self._mesh = mesh

    def __iter__(self) -> StreamTrainBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        # grain hands the workers' batches over in shared memory, freed when their last
        # reference goes. On the CPU, jax can keep the very buffer as the array, so the
        # run's last batches outlived it and Python warned at exit of "leaked
        # shared_memory objects"; a copy (0.4 MB for CIFAR's 128 images) frees them here.
        local = {
            key: np.array(value, copy=True) for key, value in next(self.checkpointable).items()
        }
        return sharding.global_batch(local, self._mesh)

    def close(self) -> None:
        """Stops the worker processes."""
        self.checkpointable.close()


class StreamInput(interface.Input):
    """The streaming path: splits opened for random access, decoded by grain workers."""

    mode = "stream"

    def train_batches(self, per_process_batch_size: int, start_step: int) -> StreamTrainBatches:
        assert self.train is not None, "opened for evaluation only"
        config = self.config
        global_batch_size, rows = sharding.process_rows(self.mesh, per_process_batch_size)
        iterator = train_batches(
            self.train,
            global_batch_size=global_batch_size,
            rows=rows,
            seed=config.seed,
            start_step=start_step,
            image_size=config.image_size,
            augment=config.augment,
            crop_padding=config.crop_padding,
            random_flip=config.random_flip,
            num_workers=num_workers(config),
            decoder=config.stream_decoder,
        )
        return StreamTrainBatches(iterator, self.mesh)

    _eval_passes: EvalPasses | None = None  # The worker pool of the evaluations.

    def eval_batches(self, per_process_batch_size: int) -> tuple[int, Iterator[dict[str, Any]]]:
        count = self.num_eval_batches(per_process_batch_size)
        settings = {
            "per_process_batch_size": per_process_batch_size,
            "num_batches": count,
            "image_size": self.config.image_size,
            "resize_size": self.config.eval_resize_size,
            "num_workers": num_workers(self.config),
        }
        if settings["num_workers"] == 0:
            return count, eval_batches(self.eval, **settings)
        passes = self._eval_passes
        if passes is None or passes.per_process_batch_size != per_process_batch_size:
            self.close()
            passes = self._eval_passes = EvalPasses(self.eval, **settings)
        return count, passes.one_pass()

    def close(self) -> None:
        if self._eval_passes is not None:
            self._eval_passes.close()
            self._eval_passes = None

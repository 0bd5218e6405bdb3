"""tensorflow-datasets: the builder, preparation (with a clear message offline), reading.

tfds prepares a dataset once (downloaded, or from `config.manual_dir`); after that
`load` reads a process's shard of a split into host memory as uint8, and
`array_record_builder` checks that the streaming path can read it (`data.stream`), or
says how to prepare it. TensorFlow is only used by tfds to prepare and read the
records; it is kept off the accelerators, which belong to JAX.
"""

import os
import socket
import sys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from resnet_jax.data import catalog, splits
from resnet_jax.data.errors import DatasetError

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR_HOST = "www.cs.toronto.edu"
# Where tfds downloads most datasets from (its own mirror, and many datasets' sources).
_TFDS_HOST = "storage.googleapis.com"


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


def hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (which only reads data here) off the GPUs that JAX uses."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        # RuntimeError: TF was initialised earlier (main.py already hid the GPUs).
        pass


def _offline_help(config: Any, info: catalog.DatasetInfo, builder: Any, reason: str) -> str:
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


def _prepare(builder: Any, config: Any, info: catalog.DatasetInfo) -> None:
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
    # Offline, tfds retries its download for minutes before failing; one direct
    # connection answers in seconds. Behind a proxy it says nothing: let tfds try.
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
        _prepare(builder, config, catalog.dataset_info(config))
        builder = tfds_builder(config)
    return builder


def _prepare_command(name: str, data_dir: str | None, manual_dir: str | None) -> str:
    builder_args = [repr(name)]
    if data_dir:
        builder_args.append(f"data_dir={data_dir!r}")
    builder_args.append("file_format='array_record'")
    prepare_args = ""
    if manual_dir:
        prepare_args = f"download_config=tfds.download.DownloadConfig(manual_dir={manual_dir!r})"
    return (
        f'python -c "import tensorflow_datasets as tfds; '
        f'tfds.builder({", ".join(builder_args)}).download_and_prepare({prepare_args})"'
    )


def array_record_builder(config: Any) -> Any:
    """tfds's builder of `config.dataset`, already prepared as array_record (random access).

    Raises:
      DatasetError: the dataset is unknown, not prepared, or prepared in another file
        format; the message gives the command that prepares it. Nothing is prepared here.
    """
    if "tensorflow" in sys.modules:
        # Reading array_record needs no TensorFlow; if something imported it, keep it
        # off the accelerators.
        hide_accelerators_from_tensorflow()
    name = config.dataset
    data_dir = config.data_dir or None  # "" (an empty flag) is tfds's default too
    manual_dir = config.manual_dir
    builder = tfds_builder(config)  # a known image classification dataset
    command = _prepare_command(name, data_dir, manual_dir)
    manual_hint = (
        ""
        if manual_dir
        else "for datasets you download by hand, such as imagenet2012, add "
        "download_config=tfds.download.DownloadConfig(manual_dir=<folder with the files>); "
    )
    data_dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    if not builder.is_prepared():
        raise DatasetError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir_root}, and the "
            f"opening a split to stream never prepares it. Prepare it once as array_record: {command} "
            f"({manual_hint}`tfds build {name}{data_dir_flag} --file_format=array_record` "
            f"does the same where apache-beam is installed, which tfds 4.9's command line "
            f"needs). A small dataset (CIFAR) can instead use --config.input=device, which "
            f"prepares it by itself."
        )
    info = builder.info
    if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in info.available_file_formats():
        formats = sorted(f.value for f in info.available_file_formats())
        raise DatasetError(
            f"tfds dataset {name!r} in {builder.data_dir} is prepared as {formats}, but "
            f"the streaming input needs random access, which only array_record gives. "
            f"Prepare it again as array_record: delete {builder.data_dir} (tfds keeps one "
            f"format per version folder), then run {command} (or run that with another "
            f"data_dir and pass it as --config.data_dir). A small dataset (CIFAR) can "
            f"instead use --config.input=device."
        )
    return builder


def split_info(builder: Any, config: Any, split: str) -> Any:
    if split not in builder.info.splits:
        raise DatasetError(
            f"tfds dataset {config.dataset!r} has no split {split!r}; it has "
            f"{sorted(builder.info.splits)}: set --config.train_split / --config.eval_split."
        )
    return builder.info.splits[split]


def load(
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
    start, stop = splits.shard_bounds(num_examples, process_index, process_count)
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

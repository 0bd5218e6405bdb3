"""Writes idx files (MNIST, Fashion-MNIST, ...) as an image folder for the trainer.

    sudo apt-get install dataset-fashion-mnist     # Debian: the four official files
    python scripts/export_idx.py /usr/share/datasets/fashion-mnist data/fashion_mnist \
        --classes fashion_mnist --train_subset 10000

SRC holds the official file names (`train-images-idx3-ubyte[.gz]`, `train-labels-...`,
`t10k-images-...`, `t10k-labels-...`), as Debian, torchvision (`<root>/FashionMNIST/raw`)
and Keras (`~/.keras/datasets/fashion-mnist`) keep them. OUT gets
`{train,test}/<label>_<class>/<index>.png`, 28x28 greyscale, for
`--config.dataset=image_folder --config.data_dir=OUT` (configs/fashion_mnist.py).
Class folders are numbered so that their sorted order is the label order.

`--train_subset N` also writes `train<N>/`: the first N / classes images of each class
of the training split, in file order, for experiments that need a smaller training set
(`--config.train_split=train<N>`).

Why not tfds's `fashion_mnist` builder: it checks the archives' checksums, and Debian's
files are re-compressed (same decompressed bytes, other .gz bytes), so it rejects them.
Here every file's header, size and pairing are checked instead (resnet_jax/data/idx.py).
"""

import argparse
import pathlib
import re
import sys

import numpy as np

from resnet_jax.data import folders, idx

CLASS_NAMES = {"fashion_mnist": idx.FASHION_MNIST_CLASSES}


def class_folders(names: list[str] | None, num_classes: int) -> list[str]:
    """Folder name of each label: `<label>_<slug>`, zero-padded so they sort by label."""
    width = len(str(num_classes - 1))
    if names is None:
        return [f"{label:0{width}d}" for label in range(num_classes)]
    slugs = [re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") for name in names]
    return [f"{label:0{width}d}_{slug}" for label, slug in enumerate(slugs)]


def subset_indices(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """The first size / num_classes indices of each class, in file order."""
    if size <= 0 or size % num_classes:
        raise ValueError(
            f"--train_subset {size} is not a positive multiple of the {num_classes} classes."
        )
    per_class = size // num_classes
    picked = []
    for label in range(num_classes):
        where = np.flatnonzero(labels == label)
        if len(where) < per_class:
            raise ValueError(
                f"--train_subset {size}: class {label} has only {len(where)} training images."
            )
        picked.append(where[:per_class])
    return np.sort(np.concatenate(picked))


def write_split(out: pathlib.Path, split: idx.IdxSplit, class_folders: list[str], indices) -> int:
    indices = np.asarray(list(indices), np.int64)
    return folders.write_images(
        out,
        split.images[indices],
        split.labels[indices],
        class_folders,
        [f"{index:05d}.png" for index in indices],
    )


def export(src: pathlib.Path, out: pathlib.Path, classes: str | None, train_subset: int) -> dict:
    """Writes OUT/{train,test}[, train<N>]; returns the image count of each split written.

    Raises:
      idx.IdxError: a file is missing, damaged or does not match its pair.
      ValueError: the labels do not fit the class names, or a bad subset size.
    """
    splits = {name: idx.read_split(src, name) for name in idx.SPLIT_FILES}
    num_classes = int(max(s.labels.max() for s in splits.values())) + 1
    names = list(CLASS_NAMES[classes]) if classes else None
    if names is not None and num_classes > len(names):
        raise ValueError(
            f"The labels go up to {num_classes - 1}, but --classes {classes} has "
            f"{len(names)} classes: these are not {classes} files."
        )
    class_dirs = class_folders(names, len(names) if names else num_classes)
    subset = None
    if train_subset != 0:
        subset = subset_indices(splits["train"].labels, train_subset, len(class_dirs))
    counts = {}
    for name, split in splits.items():
        counts[name] = write_split(out / name, split, class_dirs, range(len(split.labels)))
    if subset is not None:
        counts[f"train{train_subset}"] = write_split(
            out / f"train{train_subset}", splits["train"], class_dirs, subset
        )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=pathlib.Path, help="Folder holding the four idx files.")
    parser.add_argument("out", type=pathlib.Path, help="Folder to write (train/ and test/).")
    parser.add_argument(
        "--classes",
        choices=sorted(CLASS_NAMES),
        default=None,
        help="Name the class folders (default: the label numbers only).",
    )
    parser.add_argument(
        "--train_subset",
        type=int,
        default=0,
        help="Also write train<N>/, N training images balanced over the classes.",
    )
    args = parser.parse_args()
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        sys.exit(f"error: {args.out} is not an empty folder: choose a new one.")
    try:
        counts = export(args.src, args.out, args.classes, args.train_subset)
    except (idx.IdxError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(
        "Wrote "
        + ", ".join(f"{n:,} {split}" for split, n in counts.items())
        + f" images to {args.out}."
    )


if __name__ == "__main__":
    main()

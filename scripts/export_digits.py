"""Writes scikit-learn's handwritten digits as an image folder: a real dataset offline.

    pip install -e ".[experiments]"   # scikit-learn, which ships the data in its wheel
    python scripts/export_digits.py data/digits

The 1,797 greyscale 8x8 digits (UCI "Optical Recognition of Handwritten Digits", 43
writers; scikit-learn's `load_digits`) become `OUT/{train,test}/<digit>/<index>.png`
for `--config.dataset=image_folder --config.data_dir=OUT`. Every fifth image of each
class (by its index in the dataset) goes to test/: 1,442 train and 355 test images, the
same on every machine. Pixels (0-16 in the source) are scaled to 0-255; the files keep
the source's 8x8 size (training resizes them to --config.image_size).

CIFAR cannot be downloaded on offline machines and synthetic images do not show how
depth affects optimisation; these digits are small enough for CPU experiments
(docs/results.md's degradation run) and real enough for the effect to appear.
"""

import argparse
import pathlib
import sys

import numpy as np

from resnet_jax.data import folders

TEST_EVERY = 5


def export(out: pathlib.Path) -> dict[str, int]:
    """Writes the folder; returns the image count of each split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit('error: scikit-learn is not installed: pip install -e ".[experiments]"')
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target
    # Every fifth image of each class, counted in dataset order, is a test image.
    rank = np.zeros(len(labels), np.int64)
    seen = np.zeros(10, np.int64)
    for index, label in enumerate(labels):
        rank[index], seen[label] = seen[label], seen[label] + 1
    is_test = rank % TEST_EVERY == TEST_EVERY - 1
    counts = {}
    for split, chosen in (("train", ~is_test), ("test", is_test)):
        indices = np.flatnonzero(chosen)
        counts[split] = folders.write_images(
            out / split,
            pixels[indices],
            labels[indices],
            [str(d) for d in range(10)],
            [f"{i:04d}.png" for i in indices],
        )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="Folder to write (train/ and test/).")
    args = parser.parse_args()
    if any((args.out / split).exists() for split in ("train", "test")):
        sys.exit(f"error: {args.out} already holds train/ or test/: choose an empty folder.")
    counts = export(args.out)
    print(f"Wrote {counts['train']} train and {counts['test']} test images to {args.out}.")


if __name__ == "__main__":
    main()

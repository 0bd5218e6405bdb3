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
from PIL import Image

TEST_EVERY = 5


def export(out: pathlib.Path) -> dict[str, int]:
    """Writes the folder; returns the image count of each split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit('error: scikit-learn is not installed: pip install -e ".[experiments]"')
    digits = load_digits()
    counts = {"train": 0, "test": 0}
    seen = np.zeros(10, np.int64)
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "test" if seen[label] % TEST_EVERY == TEST_EVERY - 1 else "train"
        seen[label] += 1
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
        counts[split] += 1
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

"""scripts/export_digits.py: scikit-learn's digits as an image folder the trainer reads."""

import subprocess
import sys

import numpy as np
from helpers import ROOT
from PIL import Image


def test_every_digit_is_written_once_with_its_label(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    result = subprocess.run(
        [sys.executable, "scripts/export_digits.py", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Wrote 1442 train and 355 test images" in result.stdout
    digits = load_digits()
    files = sorted(out.glob("*/*/*.png"))
    assert len(files) == len(digits.images) == 1797
    indices = sorted(int(f.stem) for f in files)
    assert indices == list(range(1797))
    for f in files[::37]:
        index, label = int(f.stem), int(f.parent.name)
        assert label == digits.target[index]
        pixels = np.asarray(Image.open(f))
        assert pixels.shape == (8, 8)
        np.testing.assert_array_equal(pixels, np.round(digits.images[index] * 255 / 16))
    # Every fifth image of each class is a test image: 355 in all, 34 to 36 per class.
    per_class = [len(list((out / "test" / str(d)).iterdir())) for d in range(10)]
    assert sum(per_class) == 355 and set(per_class) <= {34, 35, 36}
    again = subprocess.run(
        [sys.executable, "scripts/export_digits.py", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "already holds" in again.stderr

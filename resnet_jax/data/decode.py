"""Image decoding with PIL, and the crops taken while decoding: one place for both paths.

- `read_image`: a file (or file object) as evaluation sees it, whole or resized and
  centre-cropped; the image folders of the in-memory path and `predict` use it.
- `read_record`: the same for a streamed record, a file or a tfds record's bytes.
- `random_resized_crop`: the Inception crop of training (ImageNet), drawn before
  decoding so that a JPEG can be decoded at reduced size.

Any mode (L, RGBA, P, CMYK, 16-bit, ...) becomes RGB after the EXIF rotation, and an
image that cannot be decoded raises a `DatasetError` naming the file or the record.
"""

from __future__ import annotations

import io
import math
import os
from typing import IO, Protocol

import numpy as np
from PIL import ExifTags, Image, ImageOps

from resnet_jax.data.errors import DatasetError

# The Inception crop: area fraction and aspect ratio ranges, tries before the fallback.
_CROP_AREA = (0.08, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10

# EXIF orientations (5-8) that store the image rotated by 90 degrees.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class Encoded(Protocol):
    """An image not decoded yet (`stream`'s records).

    Attributes:
      source: The image file, or where the bytes come from (for messages).
      data: The encoded image, or None: read the file `source`.
    """

    @property
    def source(self) -> str: ...

    @property
    def data(self) -> bytes | None: ...


def _resize_and_crop(image: Image.Image, image_size: int, resize_size: int) -> Image.Image:
    """The evaluation geometry: see `read_image`."""
    if not resize_size:
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return image
    width, height = image.size
    if min(width, height) != resize_size:
        # The shorter side becomes resize_size; the longer one keeps the aspect ratio,
        # truncated as torchvision's Resize(int) does.
        if width <= height:
            size = (resize_size, int(resize_size * height / width))
        else:
            size = (int(resize_size * width / height), resize_size)
        image = image.resize(size, Image.Resampling.BILINEAR)
        width, height = image.size
    # The central crop, rounded as torchvision's CenterCrop rounds.
    left = int(round((width - image_size) / 2.0))
    top = int(round((height - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


def _unreadable_file(path: object, error: BaseException) -> DatasetError:
    return DatasetError(
        f"Cannot read image file {path} ({type(error).__name__}: {error}): "
        f"remove or replace this file."
    )


def read_image(
    path: str | os.PathLike | IO[bytes], image_size: int, resize_size: int = 0
) -> np.ndarray:
    """Decodes an image file as evaluation sees it: uint8 [image_size, image_size, 3] RGB.

    Any mode (L, RGBA, P, CMYK, 16-bit, ...) is converted to RGB like torchvision's
    loader does (alpha dropped, first frame of an animation), after the EXIF rotation.

    Args:
      path: the file.
      image_size: side of the square result.
      resize_size: 0 resizes the whole image to image_size x image_size (CIFAR-like data);
        N > 0 resizes the shorter side to N (skipped when it is N already) and takes the
        central image_size square: the ImageNet evaluation (256, then 224).

    Raises:
      DatasetError: the file cannot be read as an image (the message names it), or
        0 < resize_size < image_size.
    """
    if 0 < resize_size < image_size:
        raise DatasetError(
            f"eval_resize_size={resize_size} must be 0 or at least image_size={image_size}."
        )
    try:
        with Image.open(path) as image:
            # Camera JPEGs are often stored sideways with an EXIF rotation tag.
            image = ImageOps.exif_transpose(image).convert("RGB")
            return np.asarray(_resize_and_crop(image, image_size, resize_size), dtype=np.uint8)
    except _DECODE_ERRORS as e:
        raise _unreadable_file(path, e) from e


def read_record(record: Encoded, image_size: int, resize_size: int) -> np.ndarray:
    """`read_image` on the record's file, or on its bytes (tfds)."""
    if record.data is None:
        return read_image(record.source, image_size, resize_size)
    try:
        return read_image(io.BytesIO(record.data), image_size, resize_size)
    except DatasetError as e:
        raise _undecodable(record, e.__cause__ or e) from e


def _undecodable(record: Encoded, error: BaseException) -> DatasetError:
    if record.data is None:
        return _unreadable_file(record.source, error)
    return DatasetError(
        f"Cannot decode the image of {record.source} ({type(error).__name__}: {error}): "
        f"the prepared dataset is damaged; prepare it again."
    )


def _inception_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of the Inception crop, as torchvision draws it."""
    area = width * height
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(_CROP_TRIES):
        target_area = area * rng.uniform(*_CROP_AREA)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # The fallback: the central crop, its aspect ratio clamped to the range.
    in_ratio = width / height
    if in_ratio < _CROP_RATIO[0]:
        w, h = width, int(round(width / _CROP_RATIO[0]))
    elif in_ratio > _CROP_RATIO[1]:
        w, h = int(round(height * _CROP_RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(record: Encoded, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Decodes the Inception crop of the record's image, resized to image_size squared.

    The crop is drawn in the upright (EXIF-rotated) image before anything is decoded,
    so a JPEG can be decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode) whenever the
    crop still has at least image_size pixels on each side at that scale: a 224 crop
    of a 10% area of a 2000 px photo needs no full-size decode.
    """
    try:
        with Image.open(record.source if record.data is None else io.BytesIO(record.data)) as image:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            swap = orientation in _SWAPPING_ORIENTATIONS
            stored_width, stored_height = image.size
            width, height = (stored_height, stored_width) if swap else (stored_width, stored_height)
            left, top, crop_width, crop_height = _inception_crop_box(width, height, rng)
            wanted = (
                math.ceil(width * image_size / crop_width),
                math.ceil(height * image_size / crop_height),
            )
            drafted = image.draft("RGB", wanted[::-1] if swap else wanted)
            # draft() answers (mode, box of the original in reduced pixels); None: full size.
            scale = 1.0 if drafted is None else drafted[1][2] / stored_width
            image = ImageOps.exif_transpose(image).convert("RGB")
            box = (
                left * scale,
                top * scale,
                (left + crop_width) * scale,
                (top + crop_height) * scale,
            )
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
            return np.asarray(image, dtype=np.uint8)
    except _DECODE_ERRORS as e:
        raise _undecodable(record, e) from e

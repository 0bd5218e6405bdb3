"""Image decoding with PIL, and the crops taken while decoding: one place for both paths.

- `read_image`: a file (or file object) as evaluation sees it, whole or resized and
  centre-cropped; the image folders of the in-memory path and `predict` use it.
- `read_record`: the same for a streamed record, a file or a tfds record's bytes.
- `random_resized_crop`: the Inception crop of training (ImageNet), drawn before
  decoding so that a JPEG can be decoded at reduced size, by one of two decoders:
  "opencv" (the default; OpenCV's libjpeg-turbo and a bilinear resize without
  antialiasing, as TensorFlow's and big_vision's Inception crops resize) or "pil"
  (PIL's antialiased bilinear resize, as torchvision's; about half the speed).
- `flip`: the horizontal flip of training, in place.

Any mode (L, RGBA, P, CMYK, 16-bit, ...) becomes RGB after the EXIF rotation, and an
image that cannot be decoded raises a `DatasetError` naming the file or the record.
Evaluation always decodes with PIL, so its pixels match `predict` and the exports; the
"opencv" decoder takes only baseline RGB or greyscale JPEGs, and leaves every other file
to PIL (its pixels before the resize are PIL's: both use libjpeg-turbo).
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

# Decoders of the training crop (config.stream_decoder).
DECODERS = ("opencv", "pil")
# JPEG modes OpenCV decodes to the RGB that PIL's convert("RGB") gives.
_OPENCV_MODES = ("RGB", "L")
# libjpeg-turbo's DCT scaling: OpenCV's IMREAD_REDUCED_* bit for each reduction.
_OPENCV_REDUCTION_BITS = {1: 0, 2: 16, 4: 32, 8: 64}
_opencv = None


def _cv2():
    """OpenCV, imported on first use and kept to one thread (workers are processes)."""
    global _opencv
    if _opencv is None:
        import cv2

        cv2.setNumThreads(1)
        _opencv = cv2
    return _opencv


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


def random_resized_crop(
    record: Encoded,
    image_size: int,
    rng: np.random.Generator,
    decoder: str = "pil",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decodes the Inception crop of the record's image, resized to image_size squared.

    The crop is drawn in the upright (EXIF-rotated) image before anything is decoded,
    so a JPEG can be decoded at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's DCT scaling)
    whenever the crop still has at least image_size pixels on each side at that scale:
    a 224 crop of a 10% area of a 2000 px photo needs no full-size decode. Both
    decoders draw the same crop from `rng` and decode the same pixels; they differ in
    the resize (see the module docstring).

    Args:
      record: The image.
      image_size: Side of the square result.
      rng: Draws the crop.
      decoder: "opencv" or "pil" (`DECODERS`).
      out: Where to write the result (uint8 [image_size, image_size, 3]); None: a new array.

    Returns:
      The crop, uint8 [image_size, image_size, 3] (`out` if given).
    """
    if out is None:
        out = np.empty((image_size, image_size, 3), np.uint8)
    try:
        data = record.data
        if data is None:
            with open(record.source, "rb") as f:
                data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            swap = orientation in _SWAPPING_ORIENTATIONS
            stored_width, stored_height = image.size
            width, height = (stored_height, stored_width) if swap else (stored_width, stored_height)
            box = _inception_crop_box(width, height, rng)
            if decoder == "opencv" and image.format == "JPEG" and image.mode in _OPENCV_MODES:
                return _opencv_crop(data, box, (stored_width, orientation), out)
            out[...] = _pil_crop(image, box, image_size, (width, height), swap)
            return out
    except _DECODE_ERRORS as e:
        raise _undecodable(record, e) from e


def _reduction(crop_width: int, crop_height: int, image_size: int) -> int:
    """The largest DCT reduction (1, 2, 4, 8) that keeps image_size pixels across the crop."""
    for factor in (8, 4, 2):
        if min(crop_width, crop_height) >= image_size * factor:
            return factor
    return 1


def _pil_crop(
    image: Image.Image,
    box: tuple[int, int, int, int],
    image_size: int,
    upright_size: tuple[int, int],
    swap: bool,
) -> np.ndarray:
    left, top, crop_width, crop_height = box
    width, height = upright_size
    wanted = (
        math.ceil(width * image_size / crop_width),
        math.ceil(height * image_size / crop_height),
    )
    stored_width = image.size[0]
    drafted = image.draft("RGB", wanted[::-1] if swap else wanted)
    # draft() answers (mode, box of the original in reduced pixels); None: full size.
    scale = 1.0 if drafted is None else drafted[1][2] / stored_width
    image = ImageOps.exif_transpose(image).convert("RGB")
    scaled = (left * scale, top * scale, (left + crop_width) * scale, (top + crop_height) * scale)
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=scaled)
    return np.asarray(image, dtype=np.uint8)


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned as EXIF `orientation` says (PIL's exif_transpose); a view."""
    if orientation in (5, 6, 7, 8):
        pixels = pixels.transpose(1, 0, 2)
    if orientation in (2, 3, 6, 7):
        pixels = pixels[:, ::-1]
    if orientation in (3, 4, 7, 8):
        pixels = pixels[::-1]
    return pixels


def _opencv_crop(
    data: bytes, box: tuple[int, int, int, int], stored: tuple[int, int], out: np.ndarray
) -> np.ndarray:
    cv2 = _cv2()
    image_size = out.shape[0]
    left, top, crop_width, crop_height = box
    stored_width, orientation = stored
    factor = _reduction(crop_width, crop_height, image_size)
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION | _OPENCV_REDUCTION_BITS[factor]
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None:
        raise OSError("OpenCV could not decode this JPEG (damaged or truncated)")
    # libjpeg rounds reduced sizes up: the exact scale, as for PIL's draft.
    scale = pixels.shape[1] / stored_width
    pixels = _upright(pixels, orientation)
    rows, cols = pixels.shape[:2]
    x0, x1 = round(left * scale), round((left + crop_width) * scale)
    y0, y1 = round(top * scale), round((top + crop_height) * scale)
    x0, y0 = min(x0, cols - 1), min(y0, rows - 1)
    crop = pixels[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
    if orientation != 1:
        crop = np.ascontiguousarray(crop)  # OpenCV takes no negative strides.
    return cv2.resize(crop, (image_size, image_size), dst=out, interpolation=cv2.INTER_LINEAR)


def flip(image: np.ndarray) -> np.ndarray:
    """Mirrors the (contiguous) image [H, W, 3] left to right, in place; returns it.

    OpenCV's flip: a tenth of the time of numpy's copy of a reversed view.
    """
    return _cv2().flip(image, 1, dst=image)
